"""The embedded dead-letter: one JSON object per rejected input, appended to a JSONL file.

Each entry keeps the reason, where the input came from and the input itself (as text; invalid UTF-8
is replaced so the entry stays readable), so nothing a unit sent is lost and it can be replayed once
fixed. The Kafka worker publishes the same entries to `cdp.deadletter`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from ingest.records import Rejected


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
    """Appends entries; flushed on close so a crash loses at most the current batch's rejections."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None
        self.count = 0

    def write(self, rejected: Rejected) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
        self._file.write(orjson.dumps(entry(rejected)) + b"\n")
        self.count += 1

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "DeadLetterFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
