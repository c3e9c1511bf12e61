"""The embedded server's intake: what `cdp serve` accepted over HTTP, durable before it is resolved.

An HTTP request is answered once its validated records are committed here (one SQLite
transaction for every request that arrived meanwhile: group commit, WAL with `synchronous=FULL`),
not after identity resolution: the pipeline takes the records out in commit order right after
and hands them to the application's `ingest` command, then drops them. A crash between the
store's commit and the drop hands the same records over again after a restart, and the store
keeps one event per key (the CloudEvent's source + id, Segment's messageId), so nothing is lost
and nothing doubled — the same promise as a Kafka topic with offsets committed after the store.
"""
from __future__ import annotations

import sqlite3
import threading
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import orjson

from ingest.records import Accepted, Rejected

ACCEPTED = [f.name for f in fields(Accepted) if f.name != "raw"]  # raw is kept only for publishing
REJECTED = [f.name for f in fields(Rejected)]


def encode(records: Sequence[Accepted | Rejected]) -> bytes:
    return orjson.dumps([[1, [getattr(r, n) for n in ACCEPTED]] if isinstance(r, Accepted)
                         else [0, [getattr(r, n) for n in REJECTED]] for r in records])


def decode(blob: bytes) -> list[Accepted | Rejected]:
    return [Accepted(**dict(zip(ACCEPTED, values))) if accepted else Rejected(**dict(zip(REJECTED, values)))
            for accepted, values in orjson.loads(blob)]


class Intake:
    """A table of requests (one row of records each), appended by the collector, read and dropped
    in order by the pipeline (in a process of its own). Safe to share between threads."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=FULL")
        # Personal data passes through here in the clear: deleted rows are zeroed, and an emptied
        # intake truncates its WAL, so nothing of a resolved (and maybe later erased) person stays.
        self._con.execute("PRAGMA secure_delete=ON")
        self._con.execute("CREATE TABLE IF NOT EXISTS intake (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                          "records INTEGER NOT NULL, body BLOB NOT NULL)")
        self._lock = threading.Lock()

    def pending(self) -> int:
        """Records waiting for the pipeline (accepted, not yet in the store)."""
        with self._lock:
            return self._con.execute("SELECT coalesce(sum(records), 0) FROM intake").fetchone()[0]

    def append(self, requests: Sequence[Sequence[Accepted | Rejected]]) -> None:
        """Commits every request's records in one transaction; returns once they are durable."""
        rows = [(len(records), encode(records)) for records in requests if records]
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                self._con.executemany("INSERT INTO intake (records, body) VALUES (?, ?)", rows)
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    def oldest(self, limit: int, after: int = 0) -> tuple[int, list[Accepted | Rejected]]:
        """The oldest requests' records after sequence `after` (at least one request, then up to
        about `limit` records) and the last sequence number read (0: nothing waits)."""
        with self._lock:
            cursor = self._con.execute("SELECT seq, records, body FROM intake WHERE seq > ? ORDER BY seq", (after,))
            last, records = 0, []
            for seq, count, body in cursor:
                if records and len(records) + count > limit:
                    break
                last = seq
                records.extend(decode(body))
            cursor.close()
        return last, records

    def drop(self, upto: int) -> None:
        """The records up to sequence `upto` are in the store."""
        with self._lock:
            self._con.execute("DELETE FROM intake WHERE seq <= ?", (upto,))
            if self._con.execute("SELECT NOT EXISTS (SELECT 1 FROM intake)").fetchone()[0]:
                self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._con.close()
