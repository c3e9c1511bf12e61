"""Faults met by the embedded `cdp ingest`, each one line naming the component and the remedy, a
failure exit code, no traceback: a full disk, a read-only one, a store a newer cdp wrote."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cdp.demo import DemoSpec, generate
from tests.private_services import mount_tmpfs, unmount


@pytest.fixture
def mounted(tmp_path: Path):
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        directory = tmp_path / name
        mount_tmpfs(directory, options)
        mounts.append(directory)
        return directory

    yield mount
    for directory in mounts:
        unmount(directory)


@pytest.mark.parametrize("options, expected", [
    ("size=1m", "disk full: no space left on the disk holding {home}: free space there or point CDP_HOME "
                "at a larger disk"),
    ("size=1m,ro", "permission denied: {home}"),
])
def test_ingest_on_a_full_or_read_only_disk_says_so_in_one_line(cdp, mounted, tmp_path: Path, options: str,
                                                                expected: str) -> None:
    files = generate(tmp_path / "input", DemoSpec(people=200, seed=3))
    home = mounted("disk", options) / "home"
    done = cdp("ingest", *map(str, files.event_files), check=False, extra_env={"CDP_HOME": str(home)})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("cdp: error: " + expected.format(home=home)), lines


def test_a_store_written_by_a_newer_cdp_is_refused_in_one_line(cdp, tmp_path: Path) -> None:
    import sqlite3

    from tests.events import event, write

    events = write(tmp_path / "e.jsonl", [event("e1", "retail", "R1", customer={"email": "a@example.org"})])
    cdp("ingest", str(events))
    store = cdp.home / "events.sqlite"
    with sqlite3.connect(store) as conn:
        (store_id,), = conn.execute("SELECT store_id FROM cdp_store").fetchall()
        conn.execute("UPDATE cdp_store SET schema_version = schema_version + 1")
    assert len(store_id) == 32
    done = cdp("ingest", str(events), check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"cdp: error: the event store at {store} has schema version 2, this cdp knows up to 1: upgrade cdp "
        "to the version the other writers run"]
