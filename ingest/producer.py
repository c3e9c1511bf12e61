"""Publishing events to Kafka, for subsidiaries and for `cdp ingest --kafka`.

Every event is checked exactly as the worker will check it (schema, then normalisation) before it
is sent, so a unit learns about a bad event at once instead of finding it in the dead-letter later.
Messages are the CloudEvent as structured JSON, keyed by `business_unit:source_id` (one unit's
record stays in order on one partition), sent with `acks=all` and the idempotent producer, so a
retry after a lost acknowledgement does not write the event twice.

    publisher = Publisher("broker:9092", "cdp.events", validator)
    publisher.publish({"specversion": "1.0", "id": "o-1", ...})   # raises InvalidEvent
    publisher.close()                                             # flushes; raises PublishError
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from ingest.ranges import Ranges
from ingest.records import Accepted, Rejected
from ingest.stage import Ingestor
from ingest.validation import EventValidator


class InvalidEvent(ValueError):
    """The event was not sent: it does not pass the schemas or cannot be normalised."""


class PublishError(RuntimeError):
    """The broker did not acknowledge some events."""


def message_key(record: Accepted) -> bytes:
    return f"{record.business_unit}:{record.source_id}".encode()


PRODUCER_CONFIG = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 20,
    "batch_size": 512 * 1024,
    "max_request_size": 4 * 1024 * 1024,
}


class Publisher:
    def __init__(self, bootstrap: str, topic: str, validator: EventValidator,
                 region_for: Callable[[str], str] = lambda unit: "GB", max_event_bytes: int = 256 * 1024,
                 ranges: Ranges = Ranges(), **config: Any):
        from kafka import KafkaProducer

        self.topic = topic
        self.ingestor = Ingestor(validator, region_for, max_event_bytes, ranges=ranges)
        self.ingestor.keep_raw = True
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="cdp-publisher",
                                      **{**PRODUCER_CONFIG, **config})
        self.sent = 0
        self.failures: list[Exception] = []

    def publish(self, event: dict[str, Any]) -> None:
        """Checks and sends one CloudEvent (asynchronously: `flush()` waits for the broker)."""
        record = self.ingestor.from_event(event, "publish")
        if isinstance(record, Rejected):
            raise InvalidEvent(record.reason)
        self.send(record)

    def send(self, record: Accepted) -> None:
        future = self.producer.send(self.topic, key=message_key(record), value=record.raw)
        future.add_errback(self.failures.append)
        self.sent += 1

    def publish_records(self, records: Iterable[Accepted | Rejected]) -> Iterator[Rejected]:
        """Sends the accepted records; yields the rejected ones for the caller's dead-letter."""
        for record in records:
            if isinstance(record, Rejected):
                yield record
            else:
                self.send(record)

    def flush(self, timeout: float = 60) -> None:
        self.producer.flush(timeout=timeout)
        if self.failures:
            first, count = self.failures[0], len(self.failures)
            self.failures = []
            raise PublishError(f"{count} event(s) were not acknowledged by the broker: {first}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.producer.close(timeout=10)

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
