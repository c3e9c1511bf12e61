"""Where `cdp serve` hands what arrives over HTTP: the one place that calls the write path.

* embedded (no Kafka): into the intake (cdp/intake.py), the HTTP request answered once it is
  committed there; requests arriving together are committed together (group commit). A second
  thread takes the records out in commit order and runs the pipeline's batch command on them
  (dead-letter the rejected, resolve and commit the accepted, stitch visitors);
* Kafka configured: onto `cdp.events` (acks=all, idempotent producer), the request answered after
  the broker acknowledged every record; the workers resolve and commit.

Rejected messages go to the dead-letter (the JSONL file, or `cdp.deadletter`) with their reason.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from cdp import topics
from cdp.config import Settings
from cdp.intake import Intake
from ingest.deadletter import DeadLetterFile, DeadLetterTopic
from ingest.producer import PRODUCER_CONFIG, message_key
from ingest.records import Accepted, Rejected

GROUP_COMMIT_RECORDS = 5000
ACK_SECONDS = 30.0
DRAIN_SECONDS = 60.0


class EmbeddedWriter:
    """One thread commits requests to the intake, another owns the pipeline (store, resolver)."""

    def __init__(self, cfg: Settings, committed: Callable[[], None]):
        from cdp.pipeline import Pipeline
        from cdp.summary import Summary

        self.pipeline = Pipeline(cfg, project=False, deadletter=DeadLetterFile(cfg.deadletter_path))
        self.summary = Summary()
        self.committed = committed
        self.intake = Intake(cfg.intake_path)
        self._lock = threading.Lock()  # the pipeline: one batch or one person's command at a time
        self._queue: queue.Queue[tuple[Sequence[Accepted | Rejected], Future] | None] = queue.Queue()
        self._waiting = threading.Event()  # the intake has records for the pipeline
        self._stopping = threading.Event()
        self.error: BaseException | None = None  # the pipeline's last failure (it retries)
        self._intake_thread = threading.Thread(target=self._take_in, name="cdp-intake", daemon=True)
        self._pipeline_thread = threading.Thread(target=self._resolve, name="cdp-writer", daemon=True)
        self._intake_thread.start()
        self._pipeline_thread.start()
        self._waiting.set()  # what an earlier run accepted and did not resolve

    @property
    def app(self) -> Any:
        """The application (the store's reader for the read side, in this process)."""
        return self.pipeline.app

    @property
    def pending(self) -> int:
        """Records accepted and not yet through the pipeline."""
        return self.intake.pending

    def submit(self, records: Sequence[Accepted | Rejected]) -> Future:
        """A future done once every record is durable in the intake (or failed with the reason)."""
        done: Future = Future()
        self._queue.put((records, done))
        return done

    def _take_in(self) -> None:
        while (item := self._queue.get()) is not None:
            group = [item]
            size = len(item[0])
            while size < GROUP_COMMIT_RECORDS:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                group.append(more)
                size += len(more[0])
            try:
                self.intake.append([records for records, _ in group])
            except BaseException as error:  # every request of the group hears it (and may resend)
                for _, done in group:
                    done.set_exception(error)
                continue
            for _, done in group:
                done.set_result(None)
            self._waiting.set()

    def _resolve(self) -> None:
        """The intake's records through the pipeline, oldest first, then dropped from the intake."""
        while True:
            self._waiting.wait()
            self._waiting.clear()
            while True:
                upto, records = self.intake.oldest(GROUP_COMMIT_RECORDS)
                if not upto:
                    break
                try:
                    with self._lock:
                        self.pipeline.process_batch(records, self.summary)
                except Exception as error:  # noqa: BLE001 - kept in the intake: tried again
                    self.error = error
                    self._stopping.wait(1.0)
                    self._waiting.set()
                    break
                self.error = None
                self.intake.drop(upto, len(records))
                self.committed()
            if self._stopping.is_set() and (self.intake.pending == 0 or self.error is not None):
                return

    def command(self, work: Callable[[Any], Any]) -> Any:
        """`work(app)`, a person's command (a split, a review verdict) on this writer's
        application, between two batches."""
        with self._lock:
            result = work(self.pipeline.app)
        self.committed()
        return result

    def close(self) -> None:
        """Stops taking requests and resolves what the intake holds (up to DRAIN_SECONDS)."""
        self._queue.put(None)
        self._intake_thread.join(timeout=30)
        self._stopping.set()
        self._waiting.set()
        self._pipeline_thread.join(timeout=DRAIN_SECONDS)
        if not self._pipeline_thread.is_alive():
            self.pipeline.close()
            self.intake.close()


class KafkaWriter:
    """Accepted records to `cdp.events` as the unit sent them, keyed business_unit:source_id."""

    def __init__(self, cfg: Settings):
        from kafka import KafkaProducer

        topics.ensure(cfg)
        self.producer = KafkaProducer(bootstrap_servers=cfg.require_kafka(), client_id="cdp-serve",
                                      **{**PRODUCER_CONFIG, "linger_ms": 2})
        self.topic = cfg.topic(topics.EVENTS)
        self.deadletter = DeadLetterTopic(self.producer, cfg.topic(topics.DEADLETTER))

    def write(self, records: Sequence[Accepted | Rejected]) -> None:
        """Produces the whole request, then waits for every acknowledgement (no flush per record)."""
        futures = []
        for record in records:
            if isinstance(record, Rejected):
                self.deadletter.write(record)
            else:
                futures.append(self.producer.send(self.topic, key=message_key(record), value=record.raw))
        for future in futures:
            future.get(timeout=ACK_SECONDS)  # raises when the broker did not acknowledge

    def close(self) -> None:
        self.producer.flush(timeout=ACK_SECONDS)
        self.producer.close(timeout=10)
