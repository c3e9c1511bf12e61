"""`cdp worker`: the streaming worker, a Faust (faust-streaming) app.

    cdp.events ──► ingest (validate, normalise; bad → cdp.deadletter) ──► Pipeline.process_batch
                   (identity → event store, under the writers' lock) ──► self-training when due

Workers resolve and commit, nothing else: the view and `cdp.profiles` belong to `cdp serve`, which
follows the store (cdp/server/readside.py).

A Faust task consumes the topic in batches (`CDP_WORKER_BATCH` messages, or what arrived within
`CDP_WORKER_LINGER_MS`; caught up, at most one fetch per `CDP_WORKER_GATHER_MS`) and hands each
batch to threads that run the same stages as the embedded pipeline, so the event loop stays free
for Kafka heartbeats, the progress line and the health endpoint. Offsets are committed only after
the batch's store transaction committed, with the store's id beside them: a crash at any point
redelivers at most the uncommitted batches, which the store's event keys then drop.

Outages are waited out (cdp/health.py `wait_out`): a batch that failed because PostgreSQL or the
broker went away is tried again once it answers, on reconnected connections. The worker stops
only on a fault waiting cannot cure (cdp/faults.py names it in one line: a full disk, a folder it
may not write, a store of another schema or identity), with exit code 70 and nothing committed
for the failed batch. SIGTERM finishes the batch in hand (or abandons it, uncommitted, when it is
waiting for a dependency) and exits 0.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from cdp import faults, logs, metrics, store_identity, topics
from cdp.config import ConfigError, Settings
from cdp.consumer_group import ConsumerGroup
from cdp.health import Abandoned, Health, say, serve, wait_out
from cdp.pipeline import Pipeline
from cdp.self_training import Trainer
from cdp.server import stages
from cdp.summary import Summary
from ingest.deadletter import DeadLetterTopic
from ingest.producer import PRODUCER_CONFIG
from ingest.records import Accepted, Rejected

EXIT_BATCH_FAILED = 70
PROGRESS_SECONDS = 5.0
SESSION_TIMEOUT = 10.0
SEND_TIMEOUT_MS = 10000  # a send to an unreachable broker fails after this and is tried again
FRESH_FETCH_MS = 10  # a batch's second look at the broker, for what arrived after its prefetch (EventConsumer.run)


class LoopProducer:
    """`send()` and `flush()` for the batch thread, sent by an aiokafka producer on the event loop:
    its record batches are built in C, about six times faster than kafka-python's. `flush()` blocks
    until the broker acknowledged everything sent; what it could not deliver stays queued for the
    next `flush()` and the error is raised."""

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
            linger_ms=PRODUCER_CONFIG["linger_ms"], max_batch_size=PRODUCER_CONFIG["batch_size"],
            request_timeout_ms=SEND_TIMEOUT_MS)
        await self.producer.start()

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None) -> None:
        self.pending.append((topic, key, value))

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        failed, error = asyncio.run_coroutine_threadsafe(self._send(pending), self.loop).result()
        if failed:
            self.pending = failed + self.pending
            raise error

    async def _send(self, pending: list[tuple[str, bytes | None, bytes | None]]) -> tuple[list, BaseException | None]:
        failed, error, acks = [], None, []
        for item in pending:
            try:
                acks.append((item, await self.producer.send(item[0], key=item[1], value=item[2])))
            except Exception as e:
                failed.append(item)
                error = e
        for item, ack in acks:
            try:
                await ack
            except Exception as e:
                failed.append(item)
                error = e
        return failed, error

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


class BatchHandler:
    """Everything the store thread owns: pipeline (store, index) and the producer."""

    def __init__(self, cfg: Settings, producer: LoopProducer, health: Health):
        self.cfg = cfg
        self.producer = producer
        self.health = health
        self.deadletter = DeadLetterTopic(self.producer, cfg.topic(topics.DEADLETTER))
        self.pipeline = Pipeline(cfg, project=False, deadletter=self.deadletter)
        self.summary = Summary()
        self.trainer = Trainer()
        self.consumed = 0
        self.last_batch = (0, 0.0)  # events, seconds

    def parse(self, messages: Sequence[tuple[bytes | None, str]]) -> list[Accepted | Rejected]:
        ingestor = self.pipeline.ingestor
        return [ingestor.from_message(value, origin) for value, origin in messages]

    def store(self, records: Sequence[Accepted | Rejected], fetched: float = 0.0) -> None:
        """Resolves and commits the batch, waiting out outages. The dead-letters are sent after the
        commit (Pipeline.process_batch), so a retry after a failure takes the whole batch again:
        what the failed attempt committed comes back as duplicates. `fetched`: when the consumer
        had the batch (seconds since the epoch), for the stage line (CDP_TRACE_STAGES)."""
        started = time.perf_counter()
        taken = time.time()
        head = self.pipeline.app.store.position  # as of its last batch: no query of its own
        before = (self.summary.stored_events, self.summary.rejected)

        def attempt() -> None:
            self.pipeline.process_batch(records, self.summary)

        wait_out(attempt, self.health, say, recover=self.pipeline.app.reload)
        if self.cfg.trace_stages:
            stages.log(stages.RESOLVED, records=len(records), first=head + 1, last=self.pipeline.app.store.position,
                       fetched=fetched, taken=taken, committed=time.time())
        self.self_train()
        self.health.back(faults.POSTGRES)
        seconds = time.perf_counter() - started
        self.consumed += len(records)
        self.last_batch = (len(records), seconds)
        metrics.EVENTS_CONSUMED.inc(len(records))
        metrics.EVENTS_STORED.inc(self.summary.stored_events - before[0])
        metrics.EVENTS_DEADLETTERED.inc(self.summary.rejected - before[1])
        metrics.BATCH_SECONDS.observe(seconds)

    def self_train(self) -> None:
        """Self-training as in `cdp ingest`: once enough records arrived since the latest model
        (CDP_TRAIN_MIN_RECORDS, CDP_RETRAIN_GROWTH; all writers' records count), train and
        re-resolve, in a process beside the stream (cdp/self_training.py): this worker and the
        others go on storing meanwhile and take the new model in at their next batch."""
        self.trainer.poll(self.pipeline.app)

    def close(self) -> None:
        self.pipeline.close()


class Progress:
    """One line on stderr every few seconds: consumed, stored, rate, the group's lag on the broker,
    reconnects, the last batch's latency; or what the worker is waiting for."""

    def __init__(self) -> None:
        self.started = self.last_time = time.monotonic()
        self.last_count = 0

    def line(self, handler: BatchHandler, health: Health) -> str:
        now = time.monotonic()
        rate = (handler.consumed - self.last_count) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_count = now, handler.consumed
        s = handler.summary
        waiting = health.waiting_line()
        reconnects = sum(sample.value for metric in metrics.RECONNECTS.collect() for sample in metric.samples
                         if sample.name.endswith("_total"))
        lag = health.lag
        return (f"[worker {os.getpid()}] {waiting + ' | ' if waiting else ''}consumed {handler.consumed:,} "
                f"({rate:,.0f}/s) lag {'?' if lag is None else f'{lag:,}'} | stored {s.stored_events:,} "
                f"new customers {s.new_customers:,} merges {s.merges:,} duplicates {s.duplicates:,} "
                f"dead-lettered {s.rejected:,} | "
                f"last batch {handler.last_batch[0]:,} in {handler.last_batch[1] * 1000:,.0f} ms | "
                f"reconnects {reconnects:,.0f}")


class EventConsumer:
    """cdp.events in batches through aiokafka, inside a Faust task.

    Faust's own Stream path (`take_events`) delivered about 3,900 events/s on the development
    machine with no work at all, below the 5,000 events/s the worker must sustain; its per-event
    machinery (Event objects, channels, per-event acks) is the cost. So the worker keeps Faust for
    the app, the worker lifecycle, signals and timers, and consumes with the client Faust is built
    on (aiokafka), a batch per `getmany`. Offsets are committed explicitly, and only after the
    batch's store transaction committed. Threads overlap the work: while batch n is stored, n-1's
    offsets are committed, and, while the worker is behind (its last fetch was a full batch),
    batch n+1 is fetched and parsed; caught up, it fetches once n is stored, so an event waits for
    one store at most before its own. Stores and commits each stay in order (one thread each)."""

    def __init__(self, cfg: Settings, handler: BatchHandler, health: Health, store_id: str):
        self.cfg = cfg
        self.handler = handler
        self.health = health
        self.metadata = store_identity.metadata(store_id)
        self.parse_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp-parse")
        self.store_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp-store")
        self.commit_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp-commit")
        self.committing: asyncio.Future | None = None  # the last stored batch's offsets, being committed
        self.consumer: Any = None

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
        self.health.started = True
        loop = asyncio.get_running_loop()
        pending: tuple[asyncio.Future, dict] | None = None
        behind = False  # the last fetch was a full batch: more waits on the broker
        gather, fetched_at = cfg.worker_gather_ms / 1000, loop.time()
        try:
            while True:
                if pending is not None and not behind:
                    # caught up: fetch once the batch in hand is stored, so that what arrived
                    # meanwhile is stored next, all of it, rather than behind a small batch fetched
                    # at once (which made an event wait for two stores before its own)
                    await self.finish(pending)
                    pending = None
                    # and not sooner than CDP_WORKER_GATHER_MS after the last fetch: at a light
                    # stream each store transaction otherwise took one request's events, each with
                    # its fixed cost (bench.visible, Kafka, 1,000 events/s, 18,000 events: worker
                    # CPU 7.2-7.4 → 5.2-5.3 s, taken from the read side on a shared machine;
                    # accepted → cdp.profiles p99 413/402 → 344/317 ms)
                    if (rest := gather - (loop.time() - fetched_at)) > 0:
                        await asyncio.sleep(rest)
                fetched = await consumer.getmany(timeout_ms=cfg.worker_linger_ms, max_records=cfg.worker_batch)
                fetched_at = loop.time()
                if fetched and (room := cfg.worker_batch - sum(map(len, fetched.values()))) > 0:
                    # those were prefetched while the batch in hand was stored: aiokafka fetches a
                    # partition again only once its buffered records were taken, so what arrived
                    # since waited a whole batch more (A/B, bench.visible at 1M customers, same
                    # load: accepted → worker fetched p50 269 → 33 ms). Its fetch goes out now:
                    # take that too.
                    for tp, records in (await consumer.getmany(timeout_ms=FRESH_FETCH_MS, max_records=room)).items():
                        fetched[tp] = fetched.get(tp, []) + records
                batch, behind = None, False
                if fetched:
                    messages = [(m.value, f"{m.topic}:{m.partition}:{m.offset}")
                                for records in fetched.values() for m in records]
                    behind = len(messages) >= cfg.worker_batch
                    offsets = {tp: records[-1].offset + 1 for tp, records in fetched.items()}
                    arrived = time.time()
                    batch = (await loop.run_in_executor(self.parse_pool, self.handler.parse, messages), offsets)
                if pending is not None:
                    await self.finish(pending)
                    pending = None
                if batch is not None:
                    pending = (loop.run_in_executor(self.store_pool, self.handler.store, batch[0], arrived), batch[1])
        finally:  # stopping: the batch in hand finishes and is committed, or is abandoned if it waits
            self.health.stopping.set()
            if pending is not None:
                await self.finish(pending)
            await self.committed()
            await consumer.stop()

    async def finish(self, pending: tuple[asyncio.Future, dict]) -> None:
        future, offsets = pending
        await asyncio.wait([future])
        error = future.exception()
        if isinstance(error, Abandoned):
            say(f"[worker {os.getpid()}] stopping while waiting ({error}): the offsets of the batch in hand "
                "are not committed; it is redelivered, and what of it was stored is recognised and dropped")
            return
        if error is not None:
            fail(faults.describe(error, self.cfg))
        await self.committed()  # the previous batch's offsets first: commits stay in store order
        self.committing = asyncio.ensure_future(self.commit_offsets(offsets))

    async def committed(self) -> None:
        """Waits for the offsets commit under way (if any)."""
        if self.committing is not None:
            committing, self.committing = self.committing, None
            await committing

    async def commit_offsets(self, offsets: dict) -> None:
        """Commits a stored batch's offsets while the next batch is stored: the broker's round trip
        is off the events' path (a crash before it redelivers the batch, which the store's event
        keys then drop, as for any batch stored and not yet committed)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.commit_pool, wait_out, lambda: self.commit(offsets, loop),
                                       self.health, say)
            self.health.back(faults.BROKER)
        except Abandoned:
            pass  # stopping while the broker is away: the store dropped nothing, redelivery is harmless
        except Exception as error:  # not a crash with a traceback: one line, the batch redelivered
            fail(faults.describe(error, self.cfg))

    def commit(self, offsets: dict, loop: asyncio.AbstractEventLoop) -> None:
        """Commits `offsets` with this store's id beside them (runs on a thread, retried by wait_out)."""
        from aiokafka.errors import CommitFailedError, IllegalStateError

        try:
            asyncio.run_coroutine_threadsafe(
                self.consumer.commit({tp: (offset, self.metadata) for tp, offset in offsets.items()}), loop).result()
        except (CommitFailedError, IllegalStateError):
            # partitions moved to another worker meanwhile (a rebalance: the group's generation
            # changed, or the partition is no longer assigned here): it re-reads them from the last
            # committed offsets, and the event keys drop what this batch stored
            pass


def build_app(cfg: Settings, handler: BatchHandler, producer: LoopProducer, health: Health,
              group: ConsumerGroup, store_id: str) -> Any:
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
    consumer = EventConsumer(cfg, handler, health, store_id)
    progress = Progress()
    observe_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp-observe")

    @app.task
    async def consume() -> None:
        logs.plain()  # Faust configured logging by now
        await producer.start()
        try:
            await consumer.run()
        finally:
            handler.trainer.stop()
            await producer.stop()
            say(progress.line(handler, health))

    # A loop rather than a Faust timer: a timer whose callback outlasts its interval logs
    # `Timer … is overlapping` every time.
    @app.task
    async def report() -> None:
        """The progress line every few seconds; the group's lag is asked for alongside, and a
        broker slow to answer does not hold the line up (it shows the last figure meanwhile)."""
        loop = asyncio.get_running_loop()
        observing: asyncio.Future | None = None
        while True:
            if observing is None or observing.done():
                observing = loop.run_in_executor(observe_pool, observe_group, group, health)
            await asyncio.sleep(PROGRESS_SECONDS)
            say(progress.line(handler, health))

    @app.task
    async def heartbeat() -> None:
        while True:
            health.beat = time.monotonic()
            await asyncio.sleep(1.0)

    return app


def observe_group(group: ConsumerGroup, health: Health) -> None:
    """The group's lag from the broker's committed offsets; a broker that does not answer shows."""
    try:
        health.lag = group.lag()
        health.broker_ok = True
        metrics.CONSUMER_LAG.labels(group.group).set(health.lag)
        health.back(faults.BROKER)
    except Exception as error:
        group.close()  # fresh clients next time
        fault = faults.describe(error, health.settings)
        health.broker_ok, health.lag = False, None  # no stale figure while the broker does not say
        if fault.component == faults.BROKER and health.wait_started(faults.BROKER):
            say(f"{fault.line}; waiting")


def fail(fault: faults.Fault) -> None:
    """A batch that cannot be stored: stop now, acknowledging nothing (a restart retries it)."""
    say(f"cdp worker: error: {fault.line} (the batch in hand's offsets were not committed: a restart takes it up again)")
    os._exit(EXIT_BATCH_FAILED)


def start(cfg: Settings, health: Health, reset_group: bool) -> tuple[BatchHandler, LoopProducer, ConsumerGroup]:
    """Topics, store and the group check, each waited for while its dependency is away."""
    created = wait_out(lambda: topics.ensure(cfg), health, say)
    if created:
        say(f"[worker] created topics: {', '.join(created)}")
    producer = LoopProducer(cfg.require_kafka())
    handler = wait_out(lambda: BatchHandler(cfg, producer, health), health, say)
    store = handler.pipeline.app.store
    group = ConsumerGroup(cfg)
    if reset_group:
        wait_out(group.reset, health, say)
        say(f"[worker] reset consumer group {group.group}: it reads {group.topic} from the start")
    wait_out(lambda: group.check_owner(store.store_id, store.where, store.max_position() == 0), health, say)
    return handler, producer, group


def run(cfg: Settings, health_host: str = "127.0.0.1", health_port: int | None = None,
        reset_group: bool = False) -> None:
    import faust

    cfg.require_kafka()
    logs.plain()
    health = Health(cfg)
    if health_port is not None:
        serve(health, health_host, health_port)
    # until Faust takes the signals over: SIGTERM while waiting for a dependency stops cleanly
    previous = signal.signal(signal.SIGTERM, lambda *_: health.stopping.set())
    try:
        handler, producer, group = start(cfg, health, reset_group)
    except Abandoned as waiting:
        say(f"[worker {os.getpid()}] stopped before consuming ({waiting})")
        return
    except ConfigError:
        raise
    except Exception as error:  # one line saying which component and what to do
        if os.environ.get("CDP_DEBUG"):
            raise
        raise ConfigError(faults.describe(error, cfg).line) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    store = handler.pipeline.app.store
    try:  # Faust's data folder, the one thing a worker keeps in CDP_HOME (the view is `cdp serve`'s)
        (cfg.home / "faust").mkdir(parents=True, exist_ok=True)
    except OSError as error:  # read-only or full: one line naming the path, not Faust's traceback
        raise ConfigError(faults.describe(error, cfg).line) from None
    app = build_app(cfg, handler, producer, health, group, store.store_id)
    say(f"[worker {os.getpid()}] consuming {cfg.topic(topics.EVENTS)} at {cfg.kafka_bootstrap} as group "
        f"{cfg.topic(cfg.worker_group)}; store {store.where} (id {store.store_id}) (the view and cdp.profiles: cdp serve)"
        + (f"; health on http://{health_host}:{health_port}" if health_port is not None else ""))
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.spinner = None  # its cursor codes ended up in log files
    worker.execute_from_commandline()
