"""The embedded dead-letter file (ingest/deadletter.py): a writer that keeps going while an erasure
rewrites the file loses none of its entries, and none of those the rewrite kept; entries past their
retention are removed by the CLI and by a running server."""
from __future__ import annotations

import json
import multiprocessing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

from ingest.deadletter import DeadLetterFile, remove_entries
from ingest.records import Rejected
from tests.events import event, write
from tests.serving import start_server, wait_until


def rejected(event_id: str) -> Rejected:
    return Rejected(reason="schema", origin="test", kind="schema", raw=f'{{"id": "{event_id}"}}', event_id=event_id)


def event_ids(path: Path) -> list[str]:
    return [json.loads(line)["event_id"] for line in path.read_text().splitlines()]


def test_entries_written_after_a_rewrite_land_in_the_new_file(tmp_path):
    path = tmp_path / "deadletter.jsonl"
    writer = DeadLetterFile(path)
    for event_id in ("keep-1", "drop-1"):
        writer.write(rejected(event_id))
    writer.flush()
    assert remove_entries(path, lambda line: b"drop" in line) == 1
    writer.write(rejected("keep-2"))
    writer.close()
    assert event_ids(path) == ["keep-1", "keep-2"]


def _write_many(path: Path, count: int) -> None:
    with DeadLetterFile(path) as writer:
        for n in range(count):
            writer.write(rejected(f"w-{n}"))
            writer.flush()  # a batch each, as the pipeline flushes


def third(line: bytes) -> bool:
    return int(json.loads(line)["event_id"][2:]) % 3 == 0


def test_a_rewrite_beside_a_writing_process_loses_nothing(tmp_path):
    """Another process (the server's resolver) appends batch after batch while this one removes
    entries again and again: every entry the rewrites did not remove is in the file at the end."""
    path = tmp_path / "deadletter.jsonl"
    count = 2000
    writer = multiprocessing.get_context("spawn").Process(target=_write_many, args=(path, count))
    writer.start()
    removed = rewrites = 0
    while writer.is_alive():
        removed += remove_entries(path, third)
        rewrites += 1
    writer.join()
    removed += remove_entries(path, third)
    assert writer.exitcode == 0 and rewrites > 1
    assert event_ids(path) == [f"w-{n}" for n in range(count) if n % 3]
    assert removed == len(range(0, count, 3))


def aged_entry(event_id: str, days: float, person: str) -> bytes:
    """A dead-letter line as a run `days` ago left it, its input naming `person`."""
    at = datetime.now(timezone.utc) - timedelta(days=days)
    return orjson.dumps({"rejected_at": at.isoformat(), "reason": "schema", "origin": "old.jsonl:1",
                         "event_id": event_id, "source": "retail/test",
                         "input": json.dumps({"id": event_id, "data": {"customer": {"last_name": person}}})}) + b"\n"


def test_entries_past_their_retention_are_removed(cdp, tmp_path):
    """Rejected inputs hold personal data in the clear: the dead-letter file keeps them for
    CDP_DEADLETTER_RETENTION (four weeks by default, as the cdp.deadletter topic), then the next
    command that writes the file or opens the view removes them; `off` keeps them for good."""
    cdp("ingest", str(write(tmp_path / "people.jsonl", [event("p1", "retail", "R-1", customer={"email": "p@x.org"})])))
    path = cdp.home / "deadletter.jsonl"
    aged = aged_entry("old1", 40, "Oldpersonson") + aged_entry("recent1", 3, "Recentperson")

    path.write_bytes(aged)
    broken = event("new1", "retail", "R-2", "cdp.purchase", amount="lots")
    cdp("ingest", str(write(tmp_path / "bad.jsonl", [broken])))
    assert event_ids(path) == ["recent1", "new1"] and b"Oldpersonson" not in path.read_bytes()

    path.write_bytes(aged)
    cdp("query", "SELECT 1", extra_env={"CDP_DEADLETTER_RETENTION": "off"})
    assert event_ids(path) == ["old1", "recent1"]
    cdp("query", "SELECT 1")  # only reads the view: removes them too
    assert event_ids(path) == ["recent1"]
    cdp("query", "SELECT 1", extra_env={"CDP_DEADLETTER_RETENTION": "2d"})
    assert path.read_bytes() == b""

    bad = cdp("query", "SELECT 1", extra_env={"CDP_DEADLETTER_RETENTION": "soon"}, check=False)
    assert bad.returncode != 0 and "CDP_DEADLETTER_RETENTION" in bad.stderr and "Traceback" not in bad.stderr


def test_a_running_server_removes_expired_entries(cdp, tmp_path):
    """`cdp serve` removes them when it starts (and once a day), whether or not it rejects anything."""
    cdp("ingest", str(write(tmp_path / "people.jsonl", [event("p1", "retail", "R-1", customer={"email": "p@x.org"})])))
    path = cdp.home / "deadletter.jsonl"
    path.write_bytes(aged_entry("old1", 40, "Oldpersonson") + aged_entry("recent1", 3, "Recentperson"))
    server = start_server(cdp.env, tmp_path / "serve.log")
    try:
        wait_until(lambda: event_ids(path) == ["recent1"], 30, "the expired entry removed")
        assert "removed 1 dead-letter entr(ies) older than CDP_DEADLETTER_RETENTION" in (tmp_path / "serve.log").read_text()
    finally:
        server.stop()
