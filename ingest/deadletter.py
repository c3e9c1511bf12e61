"""The embedded dead-letter: one JSON object per rejected input, appended to a JSONL file.

Each entry keeps the reason, where the input came from and the input itself (as text; invalid UTF-8
is replaced so the entry stays readable), so nothing a unit sent is lost and it can be replayed once
fixed. The Kafka worker publishes the same entries to `cdp.deadletter`. Inputs hold personal data in
the clear, so entries are kept for a retention period (CDP_DEADLETTER_RETENTION, four weeks by
default as the topic's) and then removed (expire_entries).
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import orjson

from ingest.durable import locked, replace_whole
from ingest.records import Rejected

FLUSH_BYTES = 1 << 20  # entries held before they are written out, at the latest
EXPIRY_CHECK_SECONDS = 3600  # a writer looks for expired entries at most this often


def entry(rejected: Rejected) -> dict[str, Any]:
    return {
        "rejected_at": datetime.now(timezone.utc).isoformat(),
        "reason": rejected.reason,
        "origin": rejected.origin,
        "event_id": rejected.event_id,
        "source": rejected.source,
        "input": rejected.raw,
        **rejected.extra,
    }


class DeadLetterFile:
    """Appends entries, written out at each flush (the pipeline's: once per batch), when they pass
    FLUSH_BYTES, and on close, so a crash loses at most the current batch's rejections. Each write
    takes the file's lock and opens the file now at the path: an erasure may rewrite it meanwhile
    from another process (remove_entries), and an open handle would go on appending to the
    replaced file, where the entries are lost."""

    def __init__(self, path: Path, retention_seconds: float | None = None):
        self.path = path
        self.retention_seconds = retention_seconds  # None: entries are kept for good
        self._pending: list[bytes] = []
        self._bytes = 0
        self._expiry_checked = float("-inf")
        self.count = 0

    def write(self, rejected: Rejected) -> None:
        line = orjson.dumps(entry(rejected)) + b"\n"
        self._pending.append(line)
        self._bytes += len(line)
        self.count += 1
        if self._bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        if time.monotonic() - self._expiry_checked >= EXPIRY_CHECK_SECONDS:
            self._expiry_checked = time.monotonic()
            expire_entries(self.path, self.retention_seconds)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(lock_of(self.path)), open(self.path, "ab") as out:
            out.write(b"".join(self._pending))
        self._pending.clear()
        self._bytes = 0

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "DeadLetterFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock_of(path: Path) -> Path:
    """The dead-letter file's lock, between its writers and remove_entries."""
    return path.with_name(path.name + ".lock")


def remove_entries(path: Path, removed: Callable[[bytes], bool]) -> int:
    """Rewrites the file without the entries (lines) `removed` says go, under the file's lock so
    that no writer appends meanwhile; the new file replaces the old whole (a crash leaves one or the
    other). Returns how many went."""
    if not path.exists():
        return 0
    with locked(lock_of(path)):
        with open(path, "rb") as source:
            lines = source.readlines()
        kept = [line for line in lines if not removed(line)]
        if len(kept) < len(lines):
            replace_whole(path, kept, ".scrub")
    return len(lines) - len(kept)


def expire_entries(path: Path, retention_seconds: float | None) -> int:
    """Removes the entries rejected longer ago than the retention (None: none); returns how many
    went. Entries are appended as they come, so the first one that can be read says whether any
    has expired: a look at the file's head, not a read of it, when none has."""
    if retention_seconds is None or not path.exists():
        return 0
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=retention_seconds)
    with open(path, "rb") as source:
        oldest = next((at for at in map(_rejected_at, source) if at is not None), None)
    if oldest is None or oldest >= cutoff:
        return 0
    return remove_entries(path, lambda line: (at := _rejected_at(line)) is not None and at < cutoff)


def _rejected_at(line: bytes) -> datetime | None:
    """When the entry was written (an entry that does not say stays: it is never expired)."""
    try:
        at = datetime.fromisoformat(orjson.loads(line)["rejected_at"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def matching_entries(path: Path, wanted: Callable[[bytes], bool]) -> list[dict[str, Any]]:
    """The entries (parsed) `wanted` says are wanted, in the file's order, read under its lock so
    that no half-written line is read."""
    if not path.exists():
        return []
    with locked(lock_of(path)):
        with open(path, "rb") as source:
            lines = source.readlines()
    return [orjson.loads(line) for line in lines if wanted(line)]


class DeadLetterTopic:
    """The same entries as messages on a Kafka topic (`cdp.deadletter`), keyed by the event's
    `source` and `id` when it had them; `producer` is a kafka-python KafkaProducer."""

    def __init__(self, producer: Any, topic: str):
        self.producer = producer
        self.topic = topic
        self.count = 0

    def write(self, rejected: Rejected) -> None:
        key = f"{rejected.source}:{rejected.event_id}".encode() if rejected.event_id else None
        self.producer.send(self.topic, key=key, value=orjson.dumps(entry(rejected)))
        self.count += 1

    def flush(self) -> None:
        self.producer.flush()

    def close(self) -> None:
        self.flush()
