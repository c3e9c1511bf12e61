"""Where `cdp serve` hands what arrives over HTTP: the one place that calls the write path.

* embedded (no Kafka): into the intake (cdp/intake.py), the HTTP request answered once it is
  committed there; requests arriving together are committed together (group commit). A process
  of its own (the resolver, so identity resolution does not share the HTTP process's interpreter
  lock) takes the records out in commit order and runs the pipeline's batch command on them
  (dead-letter the rejected, resolve and commit the accepted, stitch visitors), then drops them;
* Kafka configured: onto `cdp.events` (acks=all, idempotent producer: librdkafka, see
  cdp/server/producer.py), the request answered after the broker acknowledged every record; the
  workers resolve and commit.

Rejected messages go to the dead-letter (the JSONL file, or `cdp.deadletter`) with their reason.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence, TypeVar

from cdp import topics
from cdp.config import Settings
from cdp.intake import Intake
from cdp.pipeline import suppressed_entry
from ingest.deadletter import DeadLetterFile, DeadLetterTopic
from ingest.producer import message_key
from ingest.records import Accepted, Rejected

GROUP_COMMIT_RECORDS = 5000
ACK_SECONDS = 30.0
DRAIN_SECONDS = 60.0
RETRY_SECONDS = 1.0
DROP_RECORDS = 50_000  # resolved records dropped from the intake at least this often (a restart redoes them)
T = TypeVar("T")


def run_commands(app: Any, commands: Any) -> None:
    """Runs the people's commands waiting on `commands` (`work(app)`, e.g. a console split) on the
    resolver's own application and answers each with ("ok", result) or ("raised", error)."""
    while commands.poll():
        work = commands.recv()
        try:
            answer = ("ok", work(app))
        except Exception as error:  # noqa: BLE001 - the server raises it where the person asked
            answer = ("raised", error)
        commands.send(answer)


def resolve_intake(cfg: Settings, wake: Any, stop: Any, report: Any, parent: int, commands: Any) -> None:
    """The resolver process: the intake's records through the pipeline, oldest first; reports
    ("committed", n) or ("error", text) to the server; between batches, runs the people's commands
    the server sends on `commands` (the embedded store's one writer, its state already loaded).
    Ends when told to (after draining) or when the server is gone (kill -9). `wake` is the reading
    end of a pipe the server writes a byte to after each intake commit or command."""
    from cdp.pipeline import Pipeline
    from cdp.server import stages
    from cdp.summary import Summary

    # Ctrl-C or a stop signal to the whole process group is the server's to handle: it tells this
    # process to drain and stop; a resolver killed mid-batch would only redo that batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The intake is durable, so resolving may wait: with CDP_CATCH_UP_NICE the HTTP process
    # (accepting, answering look-ups) comes first, and the resolver takes the CPU it leaves
    # (cdp/server/priority.py).
    # Nothing the HTTP process waits for is locked here for long: the wake-up is a pipe, and the
    # intake's rows are dropped when the resolver caught up (or every DROP_RECORDS), not per batch.
    os.nice(cfg.catch_up_nice)
    intake = Intake(cfg.intake_path)
    summary = Summary()
    done = undropped = 0  # the last request in the store; records resolved and still in the intake
    with Pipeline(cfg, project=False, deadletter=DeadLetterFile(cfg.deadletter_path, cfg.deadletter_retention)) as pipeline:
        pipeline.app.resolver  # noqa: B018 - loaded now, not on the first request or a person's first decision
        report.send(("ready", None))  # /health: a person's decision no longer waits for this load
        head = pipeline.app.max_position() if cfg.trace_stages else 0
        while os.getppid() == parent:
            if wake.poll(0.5):
                os.read(wake.fileno(), 1 << 16)  # every wake-up so far: the loop below takes all
            failed = False
            while os.getppid() == parent:
                run_commands(pipeline.app, commands)  # between batches: a person does not wait for the backlog
                upto, records = intake.oldest(GROUP_COMMIT_RECORDS, after=done)
                if not upto:
                    break
                taken = time.time()
                try:
                    pipeline.process_batch(records, summary)
                except Exception as error:  # noqa: BLE001 - kept in the intake: tried again
                    report.send(("error", f"{type(error).__name__}: {error}"))
                    failed = True
                    stop.wait(RETRY_SECONDS)
                    break
                done, undropped = upto, undropped + len(records)
                if cfg.trace_stages:
                    first, head = head + 1, pipeline.app.max_position()
                    stages.log(stages.RESOLVED, records=len(records), first=first, last=head, taken=taken,
                               committed=time.time())
                if undropped >= DROP_RECORDS:
                    intake.drop(done)
                    undropped = 0
                report.send(("committed", len(records)))
            if undropped:  # caught up (or failing): what is in the store leaves the intake
                intake.drop(done)
                undropped = 0
            if stop.is_set() and (failed or intake.pending() == 0):
                break
    intake.close()


class EmbeddedWriter:
    """A thread commits requests to the intake; the resolver process resolves them."""

    def __init__(self, cfg: Settings, committed: Callable[[], None], log: Callable[[str], None] = print):
        self.cfg = cfg
        self.committed = committed
        self.log = log
        self.intake = Intake(cfg.intake_path)
        self.error: str | None = None  # the resolver's last failure (it retries)
        self.ready = False  # the resolver process has loaded the identity state (its first report)
        self._queue: queue.Queue[tuple[Sequence[Accepted | Rejected], Future] | None] = queue.Queue()
        self._context = multiprocessing.get_context("spawn")
        # the intake has records (or a command waits) for the resolver: a byte down a pipe, never
        # blocking this process
        self._wake, self._waker = self._context.Pipe(duplex=False)
        os.set_blocking(self._waker.fileno(), False)
        self._stop = self._context.Event()
        self._stopping = False
        self._command_lock = threading.Lock()  # one person's command at a time on the channel
        self._resolver = self._start_resolver()
        self._threads = [threading.Thread(target=self._take_in, name="cdp-intake", daemon=True),
                         threading.Thread(target=self._hear_resolver, name="cdp-resolver-reports", daemon=True)]
        for thread in self._threads:
            thread.start()
        self._nudge()  # what an earlier run accepted and did not resolve

    def _start_resolver(self) -> Any:
        self.ready = False
        self._reports, report = self._context.Pipe(duplex=False)
        self._commands, commands = self._context.Pipe()
        process = self._context.Process(target=resolve_intake, name="cdp-resolver", daemon=True,
                                        args=(self.cfg, self._wake, self._stop, report, os.getpid(), commands))
        process.start()
        report.close()
        commands.close()
        return process

    def command(self, work: Callable[[Any], T]) -> T:
        """`work(app)` (picklable, e.g. `operator.methodcaller`) run by the resolver process on its
        application, between two batches of the intake; its result, or its error raised here."""
        with self._command_lock:
            resolver, channel = self._resolver, self._commands
            channel.send(work)
            self._nudge()
            while not channel.poll(0.5):
                if not resolver.is_alive():
                    raise RuntimeError("the resolver process ended before it answered; try again")
            kind, result = channel.recv()
        if kind == "raised":
            raise result
        return result

    @property
    def pending(self) -> int:
        """Records accepted and not yet through the pipeline."""
        return self.intake.pending()

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
            self._nudge()

    def _nudge(self) -> None:
        """Wakes the resolver; a full pipe has wake-ups enough."""
        try:
            os.write(self._waker.fileno(), b"\0")
        except (BlockingIOError, OSError):
            pass

    def _hear_resolver(self) -> None:
        """The resolver's reports wake the read side; a resolver that died is started again."""
        while not self._stopping:
            try:
                report = self._reports.recv() if self._reports.poll(0.5) else None
            except (EOFError, OSError):  # the resolver is gone
                report = None
                self._resolver.join(timeout=1)
            if report is None:
                if not self._resolver.is_alive() and not self._stop.is_set():
                    self.log(f"the resolver process ended (exit code {self._resolver.exitcode}): starting it again")
                    self._resolver = self._start_resolver()
                continue
            kind, detail = report
            if kind == "ready":
                self.ready = True
            elif kind == "error":
                if self.error != detail:
                    self.log(f"resolving the intake failed, retrying: {detail}")
                self.error = detail
            else:
                self.error = None
                self.committed()

    def close(self) -> None:
        """Stops taking requests; the resolver resolves what the intake holds (up to DRAIN_SECONDS)."""
        self._queue.put(None)
        self._threads[0].join(timeout=30)
        self._stop.set()
        self._nudge()
        self._resolver.join(timeout=DRAIN_SECONDS)
        self._stopping = True
        if self._resolver.is_alive():
            self._resolver.kill()
            self._resolver.join(timeout=10)
        self._threads[1].join(timeout=5)
        self.intake.close()


class KafkaWriter:
    """Accepted records to `cdp.events` as the unit sent them, keyed business_unit:source_id, by
    librdkafka (cdp/server/producer.py): the request waits on the event loop for its records'
    acknowledgements, no thread of the pool held meanwhile."""

    def __init__(self, cfg: Settings, screen: Callable[[Rejected], Rejected] = lambda rejected: rejected,
                 erased: Callable[[Accepted], bool] = lambda accepted: False):
        from cdp.server.producer import AckedProducer

        topics.ensure(cfg)
        self.producer = AckedProducer(cfg.require_kafka(), "cdp-serve", linger_ms=2)
        self.topic = cfg.topic(topics.EVENTS)
        self.deadletter = DeadLetterTopic(self.producer, cfg.topic(topics.DEADLETTER))
        self.screen = screen  # what of a rejected request the dead-letter keeps (pipeline.screened)
        self.erased = erased  # an erased person's accepted record: dead-lettered as suppressed, not produced
        self.trace = cfg.trace_stages

    async def write(self, records: Sequence[Accepted | Rejected]) -> None:
        """Produces the whole request, then waits for every acknowledgement (no flush per record);
        raises when the broker did not acknowledge one within ACK_SECONDS."""
        import asyncio

        called = time.time()
        futures = []
        for record in records:
            if isinstance(record, Rejected):
                self.deadletter.write(self.screen(record))
            elif self.erased(record):
                self.deadletter.write(suppressed_entry(record.source, record.event_id))
            else:
                futures.append(self.producer.send(self.topic, key=message_key(record), value=record.raw))
        produced = time.time()
        if futures:
            await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures)), ACK_SECONDS)
        if self.trace and futures:
            from cdp.server import stages

            first = next(r for r in records if isinstance(r, Accepted))
            stages.log(stages.ACCEPTED, id=first.event_id, called=called, produced=produced, acked=time.time())

    def close(self) -> None:
        self.producer.close(timeout=ACK_SECONDS)
