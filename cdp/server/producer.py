"""`cdp serve`'s Kafka producer: librdkafka (confluent-kafka), acks=all and idempotent.

The server produces on the request path (the collector answers once the broker acknowledged every
record of a request) and publishes `cdp.profiles`. kafka-python built record batches and ran its
network loop in Python, on the thread that shares the interpreter lock with every HTTP request,
look-up and the read side: at 1,000 events/s that thread alone used ~5% of the server's CPU and
the broker's acknowledgement of a request took 20-35 ms (p50) where the broker's own round trip
was 4 ms. librdkafka batches, sends and retries on threads of its own, outside the lock; Python
only hands records over and resolves each one's future when its delivery report arrives (a
thread here serves the reports, waiting outside the lock).

Keys are partitioned like kafka-python and the Java client (murmur2), so one unit's record lands
on the same partition whichever of the platform's producers sent it.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from ingest.producer import PRODUCER_CONFIG

POLL_SECONDS = 0.1


class DeliveryFailed(RuntimeError):
    """The broker did not acknowledge a record (after librdkafka's retries)."""


class AckedProducer:
    """`send()` returns a future resolved when the broker acknowledged the record (or failed);
    `flush()` waits for everything sent and raises when something sent since the last flush
    was not acknowledged."""

    def __init__(self, bootstrap: str, client_id: str, linger_ms: int = PRODUCER_CONFIG["linger_ms"]):
        from confluent_kafka import Producer

        self.producer = Producer({
            "bootstrap.servers": bootstrap, "client.id": client_id,
            "acks": "all", "enable.idempotence": PRODUCER_CONFIG["enable_idempotence"],
            "linger.ms": linger_ms, "batch.size": PRODUCER_CONFIG["batch_size"],
            "message.max.bytes": PRODUCER_CONFIG["max_request_size"],
            "partitioner": "murmur2_random",  # kafka-python's and Java's placement of keyed records
            # small requests go out at once (kafka-python's default too): with Nagle's algorithm a
            # request's produce waited behind the previous one's unacknowledged packet
            "socket.nagle.disable": True,
        })
        self._failed: list[BaseException] = []
        self._failed_lock = threading.Lock()
        self._stop = threading.Event()
        self._reports = threading.Thread(target=self._serve_reports, name="cdp-kafka-reports", daemon=True)
        self._reports.start()

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None) -> Future:
        """The future's result: the record's (partition, offset)."""
        done: Future = Future()

        def report(error: Any, message: Any) -> None:
            if error is None:
                done.set_result((message.partition(), message.offset()))
                return
            failure = DeliveryFailed(f"{topic}: {error}")
            with self._failed_lock:
                self._failed.append(failure)
            done.set_exception(failure)

        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=report)
                return done
            except BufferError:  # librdkafka's queue is full: wait for deliveries to make room
                self.producer.poll(POLL_SECONDS)

    def flush(self, timeout: float | None = None) -> None:
        left = self.producer.flush(-1 if timeout is None else timeout)
        with self._failed_lock:
            failed, self._failed = self._failed, []
        if left:
            raise DeliveryFailed(f"{left} record(s) not acknowledged within {timeout} s")
        if failed:
            raise failed[0]

    def _serve_reports(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(POLL_SECONDS)  # waits outside the interpreter lock

    def close(self, timeout: float = 10) -> None:
        try:
            self.producer.flush(timeout)
        finally:
            self._stop.set()
            self._reports.join(timeout=5)
