"""`cdp worker`: the streaming worker, a Faust (faust-streaming) app.

    cdp.events ──► ingest (validate, normalise; bad → cdp.deadletter) ──► Pipeline.process_batch
                   (identity → event store, under the writers' lock)

Workers resolve and commit, nothing else: the view and `cdp.profiles` belong to `cdp serve`, which
follows the store (cdp/server/readside.py).

A Faust task consumes the topic in batches (`CDP_WORKER_BATCH` messages, or what arrived within
`CDP_WORKER_LINGER_MS`) and hands each batch to threads that run the same stages as the embedded
pipeline, so the event loop stays free for Kafka heartbeats and the progress line. Offsets are
committed only after the batch's store transaction committed: a crash at any point redelivers at
most the uncommitted batches, which the store's event keys then drop. A batch that fails for good
stops the process at once (exit code 70) without committing its offsets, so nothing is skipped.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from cdp import topics
from cdp.config import Settings
from cdp.pipeline import Pipeline
from cdp.summary import Summary
from ingest.deadletter import DeadLetterTopic
from ingest.producer import PRODUCER_CONFIG
from ingest.records import Accepted, Rejected

EXIT_BATCH_FAILED = 70
PROGRESS_SECONDS = 5.0
SESSION_TIMEOUT = 10.0


class LoopProducer:
    """`send()` and `flush()` for the batch thread, sent by an aiokafka producer on the event loop:
    its record batches are built in C, about six times faster than kafka-python's. `flush()` blocks
    until the broker acknowledged everything sent (and raises if it did not)."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.pending: list[tuple[str, bytes | None, bytes | None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.producer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        self.loop = asyncio.get_running_loop()
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id="cdp-worker", acks="all", enable_idempotence=True,
            linger_ms=PRODUCER_CONFIG["linger_ms"], max_batch_size=PRODUCER_CONFIG["batch_size"])
        await self.producer.start()

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None) -> None:
        self.pending.append((topic, key, value))

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        asyncio.run_coroutine_threadsafe(self._send(pending), self.loop).result()

    async def _send(self, pending: list[tuple[str, bytes | None, bytes | None]]) -> None:
        acks = [await self.producer.send(topic, key=key, value=value) for topic, key, value in pending]
        await asyncio.gather(*acks)

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


class BatchHandler:
    """Everything the worker thread owns: pipeline (store, index) and the producer."""

    def __init__(self, cfg: Settings, producer: LoopProducer):
        self.cfg = cfg
        self.producer = producer
        self.deadletter = DeadLetterTopic(self.producer, cfg.topic(topics.DEADLETTER))
        self.pipeline = Pipeline(cfg, project=False, deadletter=self.deadletter)
        self.summary = Summary()
        self.consumed = 0
        self.last_batch = (0, 0.0)  # events, seconds

    def parse(self, messages: Sequence[tuple[bytes | None, str]]) -> list[Accepted | Rejected]:
        ingestor = self.pipeline.ingestor
        return [ingestor.from_message(value, origin) for value, origin in messages]

    def store(self, records: Sequence[Accepted | Rejected]) -> None:
        started = time.perf_counter()
        self.pipeline.process_batch(records, self.summary)
        self.consumed += len(records)
        self.last_batch = (len(records), time.perf_counter() - started)

    def close(self) -> None:
        self.pipeline.close()


class Progress:
    """One line on stderr every few seconds: consumed, stored, rate, consumer lag."""

    def __init__(self) -> None:
        self.started = self.last_time = time.monotonic()
        self.last_count = 0

    def line(self, handler: BatchHandler, lag: int | None) -> str:
        now = time.monotonic()
        rate = (handler.consumed - self.last_count) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_count = now, handler.consumed
        s = handler.summary
        return (f"[worker {os.getpid()}] consumed {handler.consumed:,} ({rate:,.0f}/s) "
                f"lag {'?' if lag is None else f'{lag:,}'} | stored {s.stored_events:,} "
                f"new customers {s.new_customers:,} merges {s.merges:,} duplicates {s.duplicates:,} "
                f"dead-lettered {s.rejected:,} | "
                f"last batch {handler.last_batch[0]:,} in {handler.last_batch[1] * 1000:,.0f} ms")


class EventConsumer:
    """cdp.events in batches through aiokafka, inside a Faust task.

    Faust's own Stream path (`take_events`) delivered about 3,900 events/s on the development
    machine with no work at all, below the 5,000 events/s the worker must sustain; its per-event
    machinery (Event objects, channels, per-event acks) is the cost. So the worker keeps Faust for
    the app, the worker lifecycle, signals and timers, and consumes with the client Faust is built
    on (aiokafka), a batch per `getmany`. Offsets are committed explicitly, and only after the
    batch's store transaction committed. Two threads overlap the work: while batch n is stored,
    batch n+1 is fetched and parsed; stores stay in order (one store thread)."""

    def __init__(self, cfg: Settings, handler: BatchHandler):
        self.cfg = cfg
        self.handler = handler
        self.parse_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp-parse")
        self.store_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp-store")
        self.consumer: Any = None
        self.committed: dict[Any, int] = {}

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer

        cfg = self.cfg
        self.consumer = consumer = AIOKafkaConsumer(
            cfg.topic(topics.EVENTS), bootstrap_servers=cfg.require_kafka(), group_id=cfg.topic(cfg.worker_group),
            client_id="cdp-worker", enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=cfg.worker_batch, fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            # a worker killed with -9 leaves the group after this, and its partitions move on
            session_timeout_ms=int(SESSION_TIMEOUT * 1000), heartbeat_interval_ms=int(SESSION_TIMEOUT * 250))
        await consumer.start()
        loop = asyncio.get_running_loop()
        pending: tuple[asyncio.Future, dict] | None = None
        try:
            while True:
                fetched = await consumer.getmany(timeout_ms=cfg.worker_linger_ms, max_records=cfg.worker_batch)
                batch = None
                if fetched:
                    messages = [(m.value, f"{m.topic}:{m.partition}:{m.offset}")
                                for records in fetched.values() for m in records]
                    offsets = {tp: records[-1].offset + 1 for tp, records in fetched.items()}
                    batch = (await loop.run_in_executor(self.parse_pool, self.handler.parse, messages), offsets)
                if pending is not None:
                    await self.finish(pending)
                    pending = None
                if batch is not None:
                    pending = (loop.run_in_executor(self.store_pool, self.handler.store, batch[0]), batch[1])
        finally:  # stopping: the batch being stored finishes and is committed before we leave
            if pending is not None:
                await self.finish(pending)
            await consumer.stop()

    async def finish(self, pending: tuple[asyncio.Future, dict]) -> None:
        from aiokafka.errors import CommitFailedError, IllegalStateError

        future, offsets = pending
        await asyncio.wait([future])
        if future.exception() is not None:
            fail(future.exception())
        try:
            await self.consumer.commit(offsets)
            self.committed.update(offsets)
        except (CommitFailedError, IllegalStateError):
            # partitions moved to another worker meanwhile (a rebalance during the batch, or just
            # before the commit: "partition is not assigned"): it re-reads them, the event keys drop them
            pass

    def lag(self) -> int | None:
        """Messages on this worker's partitions not yet committed."""
        try:
            return sum(max((self.consumer.highwater(tp) or 0) - self.committed.get(tp, 0), 0)
                       for tp in self.consumer.assignment())
        except Exception:  # not started or not assigned yet
            return None


def build_app(cfg: Settings) -> Any:
    import faust

    app = faust.App(
        cfg.topic(cfg.worker_group) + ".app",
        broker=f"kafka://{cfg.require_kafka()}",
        datadir=str(cfg.home / "faust"),
        web_enabled=False,
        # Faust's own consumer then only follows the app's internal leader topic (no traffic);
        # cdp.events is consumed by EventConsumer. Tasks start once that group settled, so a
        # killed worker must leave it as quickly as the events group.
        broker_session_timeout=SESSION_TIMEOUT,
        broker_heartbeat_interval=SESSION_TIMEOUT / 4,
    )
    producer = LoopProducer(cfg.require_kafka())
    # created before the loop runs, so a start-up problem (store, schemas) shows at once
    handler = BatchHandler(cfg, producer)
    consumer = EventConsumer(cfg, handler)
    progress = Progress()

    @app.task
    async def consume() -> None:
        await producer.start()
        try:
            await consumer.run()
        finally:
            await producer.stop()
            print(progress.line(handler, None), file=sys.stderr, flush=True)

    @app.timer(PROGRESS_SECONDS)
    async def report() -> None:
        print(progress.line(handler, consumer.lag()), file=sys.stderr, flush=True)

    return app


def fail(error: BaseException) -> None:
    """A batch that cannot be stored: stop now, acknowledging nothing (a restart retries it)."""
    print(f"cdp worker: error: batch failed, stopping without committing its offsets: {error!r}",
          file=sys.stderr, flush=True)
    os._exit(EXIT_BATCH_FAILED)


def run(cfg: Settings) -> None:
    import faust

    cfg.require_kafka()
    created = topics.ensure(cfg)
    if created:
        print(f"[worker] created topics: {', '.join(created)}", file=sys.stderr)
    cfg.home.mkdir(parents=True, exist_ok=True)  # Faust's data folder; no view lives here any more
    app = build_app(cfg)
    print(f"[worker {os.getpid()}] consuming {cfg.topic(topics.EVENTS)} at {cfg.kafka_bootstrap} as group "
          f"{cfg.topic(cfg.worker_group)}; store {'PostgreSQL' if cfg.event_store else cfg.sqlite_path} "
          "(the view and cdp.profiles: cdp serve)", file=sys.stderr, flush=True)
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
