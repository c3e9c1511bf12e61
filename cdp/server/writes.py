"""Where `cdp serve` hands what arrives over HTTP: the one place that calls the write path.

* embedded (no Kafka): into the event store through the pipeline's batch command (resolve and
  commit under the writers' lock), the HTTP request answered after the store commit. Requests
  arriving together are committed together (group commit), one store transaction for many;
* Kafka configured: onto `cdp.events` (acks=all, idempotent producer), the request answered after
  the broker acknowledged; the workers resolve and commit.

Rejected messages go to the dead-letter (the JSONL file, or `cdp.deadletter`) with their reason.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from cdp import topics
from cdp.config import Settings
from identity.resolver import source_key
from ingest.deadletter import DeadLetterFile, DeadLetterTopic
from ingest.producer import PRODUCER_CONFIG, message_key
from ingest.records import Accepted, Rejected

GROUP_COMMIT_RECORDS = 5000
Stitch = tuple[str, str, Sequence[str]]  # (business unit, userId, earlier source ids)
ACK_SECONDS = 30.0


class EmbeddedWriter:
    """One thread owns the pipeline (store, resolver); requests queue their records and wait."""

    def __init__(self, cfg: Settings, committed: Callable[[], None]):
        from cdp.pipeline import Pipeline
        from cdp.summary import Summary

        self.pipeline = Pipeline(cfg, project=False, deadletter=DeadLetterFile(cfg.deadletter_path))
        self.summary = Summary()
        self.committed = committed
        self._lock = threading.Lock()  # the pipeline: one batch or one person's command at a time
        self._queue: queue.Queue[tuple[Sequence[Accepted | Rejected], Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="cdp-writer", daemon=True)
        self._thread.start()

    @property
    def app(self) -> Any:
        """The application (the store's reader for the read side, in this process)."""
        return self.pipeline.app

    def write(self, records: Sequence[Accepted | Rejected], stitches: Sequence[Stitch] = ()) -> None:
        """Returns once every accepted record is committed (or already was), and the stitches
        after them; raises if not."""
        done: Future = Future()
        self._queue.put((records, done, stitches))
        done.result()

    def _run(self) -> None:
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
                with self._lock:
                    self.pipeline.process_batch([r for records, _, _ in group for r in records], self.summary)
                    for stitch in (s for _, _, stitches in group for s in stitches):
                        self.stitch(stitch)
            except BaseException as error:  # every request of the group hears it (and may resend)
                for _, done, _ in group:
                    done.set_exception(error)
                continue
            for _, done, _ in group:
                done.set_result(None)
            self.committed()

    def command(self, work: Callable[[Any], Any]) -> Any:
        """`work(app)`, a person's command (a split, a review verdict) on this writer's
        application, between two batches."""
        with self._lock:
            result = work(self.pipeline.app)
        self.committed()
        return result

    def stitch(self, stitch: Stitch) -> None:
        """An anonymous visitor turned out to be a known user (Segment identify or alias): the
        application's `merge_visitor` command merges them (explained and split like any link)."""
        unit, user_id, earlier = stitch
        for candidate in earlier:
            self.pipeline.app.merge_visitor(source_key(unit, user_id), source_key(unit, candidate))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self.pipeline.close()


class KafkaWriter:
    """Accepted records to `cdp.events` as the unit sent them, keyed business_unit:source_id."""

    def __init__(self, cfg: Settings):
        from kafka import KafkaProducer

        topics.ensure(cfg)
        self.producer = KafkaProducer(bootstrap_servers=cfg.require_kafka(), client_id="cdp-serve",
                                      **{**PRODUCER_CONFIG, "linger_ms": 2})
        self.topic = cfg.topic(topics.EVENTS)
        self.deadletter = DeadLetterTopic(self.producer, cfg.topic(topics.DEADLETTER))

    def write(self, records: Sequence[Accepted | Rejected], stitches: Sequence[Stitch] = ()) -> None:
        """Stitches need the resolver: in Kafka mode they are not made here (see the README)."""
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
