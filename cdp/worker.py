"""`cdp worker`: the streaming worker, a Faust (faust-streaming) app.

    cdp.events ──► ingest (validate, normalise; bad → cdp.deadletter) ──► Pipeline.process_batch
                   (identity → event store, under the writers' lock) ──► projector catch-up ──►
                   changed profiles → cdp.profiles

The agent takes the topic in batches (`CDP_WORKER_BATCH` messages or `CDP_WORKER_LINGER_MS`) and
hands each batch to one worker thread that runs the same stages as the embedded pipeline; the
event loop stays free for Kafka heartbeats and the progress line. Faust acknowledges a batch only
when the agent asks for the next one, i.e. after the store transaction committed, and commits only
acknowledged offsets: a crash at any point redelivers at most the uncommitted batches, which the
store's event keys then drop. A batch that fails for good stops the process at once (exit code
70) without acknowledging anything, so nothing is skipped either.
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
from cdp.pipeline import Pipeline, Summary
from cdp.store import Batch
from ingest.deadletter import DeadLetterTopic
from ingest.producer import PRODUCER_CONFIG
from projections.changelog import profile_messages

EXIT_BATCH_FAILED = 70
PROGRESS_SECONDS = 5.0
FOLLOW_SECONDS = 1.0
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


class BatchHandler:
    """Everything the worker thread owns: pipeline (store, index, view) and the producer."""

    def __init__(self, cfg: Settings, producer: LoopProducer):
        self.cfg = cfg
        self.producer = producer
        self.deadletter = DeadLetterTopic(self.producer, cfg.topic(topics.DEADLETTER))
        self.pipeline = Pipeline(cfg, project=True, deadletter=self.deadletter)
        self.summary = Summary()
        self.consumed = 0
        self.published = 0

    def handle(self, messages: Sequence[tuple[bytes | None, str]]) -> None:
        ingestor = self.pipeline.ingestor
        records = [ingestor.from_message(value, origin) for value, origin in messages]
        self.pipeline.process_batch(records, self.summary, committed=self.publish_profiles)
        self.consumed += len(messages)

    def publish_profiles(self, batch: Batch) -> None:
        """Runs after the commit, under the writers' lock: profiles leave in commit order."""
        if not batch.events:
            return
        pipeline = self.pipeline
        projector = pipeline.projector
        projector.catch_up(pipeline.store, self.cfg.projection_batch)
        changed, merged = set(), {}
        for event in batch.events:
            cid = event.originator_id if isinstance(event.originator_id, str) else event.originator_id.hex
            survivor = pipeline.index.survivor(cid)
            changed.add(survivor)
            if survivor != cid:
                merged[cid] = survivor
        topic = self.cfg.topic(topics.PROFILES)
        for key, value in profile_messages(projector.con, changed, merged, projector.position):
            self.producer.send(topic, key=key, value=value)
            self.published += 1
        self.producer.flush()

    def follow(self) -> None:
        """Idle: keep this worker's view up with what the other workers commit."""
        self.pipeline.projector.catch_up(self.pipeline.store, self.cfg.projection_batch)

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
                f"dead-lettered {s.rejected:,} | profiles published {handler.published:,}")


def consumer_lag(app: Any) -> int | None:
    """Messages on the assigned partitions not yet committed by this worker."""
    consumer = app.consumer
    try:
        lag = 0
        for tp in consumer.assignment():
            committed = consumer._committed_offset.get(tp) or 0  # faust keeps no public accessor
            lag += max(consumer.highwater(tp) - committed, 0)
        return lag
    except Exception:  # not assigned yet, or highwater unknown before the first fetch
        return None


def build_app(cfg: Settings) -> Any:
    import faust

    app = faust.App(
        cfg.topic(cfg.worker_group),
        broker=f"kafka://{cfg.require_kafka()}",
        datadir=str(cfg.home / "faust"),
        web_enabled=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_commit_every=cfg.worker_batch,
        stream_buffer_maxsize=max(4096, cfg.worker_batch * 2),
        # a worker killed with -9 leaves the group after this, and its partitions move on
        broker_session_timeout=SESSION_TIMEOUT,
        broker_heartbeat_interval=SESSION_TIMEOUT / 4,
    )
    events = app.topic(cfg.topic(topics.EVENTS), key_serializer="raw", value_serializer="raw")
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp-batch")
    producer = LoopProducer(cfg.require_kafka())
    state: dict[str, Any] = {}
    progress = Progress()

    def handler() -> BatchHandler:
        if "handler" not in state:
            state["handler"] = BatchHandler(cfg, producer)
        return state["handler"]

    async def run_batch(messages: list[tuple[bytes | None, str]]) -> None:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(executor, lambda: handler().handle(messages))
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            # stopping: let the batch finish before Faust acknowledges it on the way out
            await asyncio.wait([future])
            if future.exception() is not None:
                fail(future.exception())
            raise
        except Exception as error:
            fail(error)

    @app.agent(events)
    async def resolve(stream: Any) -> None:
        if producer.producer is None:
            await producer.start()
        async for batch in stream.take_events(cfg.worker_batch, within=cfg.worker_linger_ms / 1000):
            await run_batch([(e.message.value, f"{e.message.topic}:{e.message.partition}:{e.message.offset}")
                             for e in batch])

    @app.timer(FOLLOW_SECONDS)
    async def follow() -> None:
        if "handler" in state:
            await asyncio.get_running_loop().run_in_executor(executor, state["handler"].follow)

    @app.timer(PROGRESS_SECONDS)
    async def report() -> None:
        if "handler" in state:
            print(progress.line(state["handler"], consumer_lag(app)), file=sys.stderr, flush=True)

    @app.on_before_shutdown.connect
    async def stop(*_: Any, **__: Any) -> None:
        if "handler" in state:
            print(progress.line(state["handler"], consumer_lag(app)), file=sys.stderr, flush=True)

    # created before the first message, so a start-up problem (store, schemas) shows at once
    executor.submit(handler).result()
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
    app = build_app(cfg)
    print(f"[worker {os.getpid()}] consuming {cfg.topic(topics.EVENTS)} at {cfg.kafka_bootstrap} as group "
          f"{cfg.topic(cfg.worker_group)}; store {'PostgreSQL' if cfg.event_store else cfg.sqlite_path}; "
          f"view {cfg.duckdb_path}", file=sys.stderr, flush=True)
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
