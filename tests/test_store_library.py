"""The event store and the eventsourcing library: the store writes through the library's public
surface only, and nothing in the process environment changes how it writes.

eventsourcing 9.5.6 reads its settings from the environment too; with POSTGRES_ENABLE_DB_FUNCTIONS
set, its `insert_events` skips the hooks a subclass could use to write more rows in the same
transaction. The store uses no such hook and reads no library setting from the environment, so
event keys and identity rows are written whatever is set.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.events import event, write

ROOT = Path(__file__).resolve().parent.parent
CDP = [sys.executable, "-m", "cdp"]
LIBRARY_SETTINGS = {  # as the library would read them, plain and with the application's prefix
    "POSTGRES_ENABLE_DB_FUNCTIONS": "y", "CDP_POSTGRES_ENABLE_DB_FUNCTIONS": "y",
    "PERSISTENCE_MODULE": "eventsourcing.popo", "CDP_PERSISTENCE_MODULE": "eventsourcing.popo",
    "CREATE_TABLE": "n", "CDP_CREATE_TABLE": "n",
}


def _private_uses(path: Path) -> list[str]:
    """`x._name` where x is not self/cls, and methods named `_name` in classes of ours that
    subclass the library's classes (overriding its private hooks)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_the_store_uses_no_private_attribute_of_the_library():
    uses = [use for name in ("store.py", "application.py") for use in _private_uses(ROOT / "cdp" / name)]
    assert uses == []
    from eventsourcing.application import Application

    from cdp.application import CustomerApplication

    # what it overrides of the library's Application: its documented extension points, nothing else
    overridden = {name for name in vars(CustomerApplication) if not name.startswith("__") and hasattr(Application, name)}
    assert overridden == {"name", "construct_env", "construct_transcoder", "close"}


def test_the_check_sees_private_uses(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(recorder):\n    recorder._insert_events(1)\n    self._ok = 1\n", encoding="utf-8")
    assert _private_uses(sample) == ["sample.py:2 ._insert_events"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update(CDP_HOME=str(home), **LIBRARY_SETTINGS, **extra)
    return env


def _ingest_twice(env: dict[str, str], path: Path) -> tuple[str, str]:
    runs = [subprocess.run([*CDP, "ingest", str(path)], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    return runs[0].stdout, runs[1].stdout


def _events(tmp_path: Path) -> Path:
    return write(tmp_path / "e.jsonl", [
        event("1", "retail", "R1", customer={"email": "ann@example.org"}),
        event("2", "bank", "B1", customer={"email": "ann@example.org"}),
        event("3", "bank", "B1", "cdp.purchase", amount=5.0),
    ])


def test_sqlite_store_ignores_the_library_settings_in_the_environment(tmp_path: Path):
    first, second = _ingest_twice(_env(tmp_path / "home"), _events(tmp_path))
    assert "stored events" in first
    assert "duplicates ignored" in second and " 3" in second.split("duplicates ignored")[1].splitlines()[0]
    import sqlite3

    with sqlite3.connect(tmp_path / "home" / "events.sqlite") as db:
        assert db.execute("SELECT count(*) FROM cdp_event_keys").fetchone()[0] == 3
        assert db.execute("SELECT count(*) FROM identity_keys").fetchone()[0] > 0


@pytest.mark.postgres
def test_postgres_store_writes_keys_and_identity_with_db_functions_set(fresh_postgres_dsn: str, tmp_path: Path):
    psycopg = pytest.importorskip("psycopg")
    env = _env(tmp_path / "home", CDP_EVENT_STORE=fresh_postgres_dsn)
    first, second = _ingest_twice(env, _events(tmp_path))
    assert " 3" in second.split("duplicates ignored")[1].splitlines()[0]
    with psycopg.connect(fresh_postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM cdp_event_keys").fetchone()[0] == 3
        assert conn.execute("SELECT count(*) FROM identity_keys").fetchone()[0] > 0
        # Registered, EventRecorded, SourceLinked, EventRecorded, EventRecorded: once each
        assert conn.execute("SELECT count(*) FROM cdp_events").fetchone()[0] == 5
