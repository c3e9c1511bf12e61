"""`cdp serve`: wires the read side, the writer and the HTTP API, runs uvicorn.

The server leaves `CDP_HOME/server.json` (mode 0600) with its address, process id and a key made
at start-up for this machine's CLI: whoever can read CDP_HOME can read the view's file anyway, so
the CLI (`cdp query`, `customer show`, `report`, `export`) uses that key to ask the server instead
of opening the file the server holds. The key lives only in memory and in that file, and dies
with the process.
"""
from __future__ import annotations

import asyncio
import gc
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from operator import methodcaller
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import duckdb
import orjson

from cdp.application import ERASED_FROM, record_identifiers
from cdp.audit import AuditTrail, Entry
from cdp.config import ConfigError, Settings
from cdp.erasure import (Erased, finish_unfinished, mark_view_rewrite, note_tables_left, pending_view_rewrite,
                         rejected_inputs, retry_left_tables, rewrite_view_if_pending, scrub_deadletter,
                         surname_shared)
from cdp.keys import Key
from cdp.pipeline import screened
from cdp.server import viewgate
from cdp.server.access import Denied, Gate, RateLimiter
from cdp.server.readside import LOOKUP_INDEXES, PROFILES, ReadSide, erased_ids, erases_anyone
from cdp.server.viewgate import ViewGate
from cdp.store import SCRUB_RETRY_PATIENCE_MS
from ingest.deadletter import expire_entries
from ingest.durable import locked
from ingest.records import Accepted, Rejected
from projections import access, erasure as view_erasure

T = TypeVar("T")
DECISIONS_WAIT_SECONDS = 60  # a decision waits up to VIEW_WAIT_SECONDS for the view, after its own work
WRITERS_PAUSE_SECONDS = 30  # a delivery round to a slow receiver may take this long before the copy starts
REWRITE_RETRY_SECONDS = 30  # the view's rewrite, when requests reading it did not finish in time
# The store's tables an erasure could not rewrite (PostgreSQL: another session held one): tried
# again this long after, then twice as long after each try that still finds one held, up to the most
STORE_SCRUB_RETRY_SECONDS = (5, 300)
VIEW_WAIT_SECONDS = 15  # a person's command: how long its page waits for the view to show the result
DEADLETTER_EXPIRY_SECONDS = 86400  # how often a running server removes dead-letter entries past their retention


@dataclass
class FreshCopy:
    """A fresh copy of the view, ready to be swapped in (Service._copy_view)."""
    path: Path
    erased: bool  # it caught up with an erasure: its file holds that person's deleted rows, rewrite again
    said: str  # how long its parts took, for the log


class Service:
    def __init__(self, cfg: Settings):
        from cdp.application import CustomerApplication
        from cdp.pipeline import make_ingestor

        self.cfg = cfg
        self.mode = "kafka" if cfg.kafka_bootstrap else "embedded"
        self.ingestor = make_ingestor(cfg)
        self.ingestor.keep_raw = self.mode == "kafka"  # published as sent
        profiles_producer = None
        if self.mode == "kafka":
            from cdp.server.producer import AckedProducer

            profiles_producer = AckedProducer(cfg.kafka_bootstrap, "cdp-serve-profiles", linger_ms=5)
        self.app = CustomerApplication(cfg)  # read here: the resolver process or the workers write
        self._profiles_producer = profiles_producer
        self.read = self._open_read_side()
        # requests that read the view hold it; a rewrite of its file closes it (viewgate.py)
        self.view_gate = ViewGate()
        # people's decisions hold this one: they wait for the view to show them, which it cannot
        # while a rewrite pauses its writers, so a rewrite first waits for those under way and
        # holds new ones back until it ends (rewrite_view; they wait outside the readers' gate,
        # viewgate.ViewRequests, and steward refuses one that gets in regardless)
        self.decision_gate = ViewGate()
        self._rewriting = threading.Lock()  # one rewrite at a time, and none once closing
        self._closing = False
        self._timers: dict[str, threading.Timer] = {}  # the view's rewrite, the store's scrub: one of each due
        self._timer_lock = threading.Lock()
        from cdp.server.writes import EmbeddedWriter, KafkaWriter

        # the Kafka collector's check of what it is sent (_carries_erased), renewed by _after_batch
        self._erased: Callable[[Iterable[tuple[str, str]]], bool] = \
            self.app.erased_screen() if self.mode == "kafka" else self.app.carries_erased
        self.writer: Any
        if self.mode == "kafka":
            self.writer = KafkaWriter(cfg, lambda rejected: screened(self.app, cfg, rejected, self._carries_erased),
                                      lambda record: self._carries_erased(record_identifiers(record)))
        else:
            self.writer = EmbeddedWriter(cfg, committed=lambda: self.read.wake(), log=self.log)  # the read side of the moment
        self.local_token = "cdp_local_" + secrets.token_urlsafe(24)
        self.gate = Gate(self.read.keyring, RateLimiter(cfg.rate_limit),
                         Key("local", "cdp_local_…", "admin", None, ""), self.local_token)
        # Kafka + PostgreSQL: people's decisions run on an application of their own, kept (its
        # identity state loaded in the background from the start); apart from `self.app`, whose
        # cached data keys the read side decrypts with while a command may reload its own
        self.decisions = threading.Lock()  # one decision at a time (the writers' lock is per connection)
        self._decider_lock = threading.Lock()
        self._decider: Any = None
        if self.mode == "kafka" and cfg.event_store:
            threading.Thread(target=self._warm_decider, name="cdp-decider", daemon=True).start()
        self.audit = AuditTrail(self._append_audit, on_error=lambda error: self.log(f"audit trail: {error!r}"))

    def _open_read_side(self, keyring: Any = None) -> ReadSide:
        # the view's owner keeps the look-up indexes in memory: its own limit (CDP_SERVE_MEMORY)
        read = ReadSide(replace(self.cfg, duckdb_memory=self.cfg.serve_memory), self.app, self._profiles_producer,
                        on_batch=self._after_batch, keyring=keyring)
        # user SQL runs on this database: no files, no network, no ATTACH, for good
        read.projector.con.execute("SET enable_external_access = false")
        return read

    def _after_batch(self, notifications: list[tuple]) -> None:
        """An erasure the read side took in, whoever made it (another machine's command on a shared
        store too): its projector marked the file (delete_erased), the rewrite is scheduled here,
        and the Kafka collector learns the erased identifiers (_carries_erased)."""
        if pending_view_rewrite(self.cfg).exists():
            self.schedule_view_rewrite()
        if self.mode == "kafka" and erases_anyone(notifications):
            self._renew_erased_screen()

    def _renew_erased_screen(self) -> None:
        """The Kafka collector's check (_carries_erased) read again from the store."""
        try:
            self._erased = self.app.erased_screen()
        except Exception as error:  # noqa: BLE001 - the workers drop what it lets through meanwhile
            self.log(f"reading the erased identifiers again failed ({error!r}); the next erasure tries again")

    def _carries_erased(self, identifiers: Iterable[tuple[str, str]]) -> bool:
        """Whether the Kafka collector keeps what it is sent out of `cdp.events` (an accepted
        record: the workers would drop it, but the raw topic keeps it in the clear until its
        retention passes) or out of the dead-letter's inputs (a rejected one) as an erased
        person's: against the erased identifiers as of the server's start or the last erasure its
        read side took in, without a store query per request on the event loop."""
        return self._erased(identifiers)

    def _append_audit(self, entries: Sequence[Entry]) -> None:
        """A batch of queued audit entries (reads) into the store, one commit (the command takes
        the writers' lock, so it comes between the resolver's or the workers' batches)."""
        self.app.record_accesses(entries)

    def audit_entries(self) -> list[dict]:
        """The audit trail, with the reads queued so far appended first."""
        self.audit.flush()
        return self.app.audit_entries()

    def erase(self, customer_id: str, suppress: bool, actor: str) -> Erased:
        """`DELETE /v1/profiles/{id}` and `cdp erase` beside this server: the application's erase
        (keys destroyed, identity rows deleted, `Erased` and its audit entry), answered once the view
        dropped the person (the read side also publishes the tombstones); then the dead-letter file
        and the store's log are scrubbed. The view's file is rewritten CDP_VIEW_REWRITE_DELAY later
        (several erasures meanwhile, once), or when the server next stops or starts (see
        `rewrite_view`)."""
        with locked(self.cfg.erasure_lock_path):
            return self._erase(customer_id, suppress, actor)

    def _erase(self, customer_id: str, suppress: bool, actor: str) -> Erased:
        started = time.perf_counter()
        embedded = self.mode == "embedded"
        removed = 0

        def first() -> None:  # once the decision may run (not while the view is rewritten)
            nonlocal removed
            view_erasure.mark(self.cfg.unfinished_erasure_path)  # finish_unfinished, at the next start, if this one stops part-way
            if embedded:  # before the commit too: after it, the identifiers that find the entries are gone
                before = self.app.erasure_of(customer_id, suppress)
                removed = scrub_deadletter(self.cfg.deadletter_path, before, surname_shared(self.app, before.sources))

        erasure = self.steward(methodcaller("erase", customer_id, suppress, actor), first)
        phases = {"store_and_view": time.perf_counter() - started}
        if embedded:
            removed += scrub_deadletter(self.cfg.deadletter_path, erasure, surname_shared(self.app))
        if self.app.store.is_postgres:  # rewritten in the background, as the view's file is: not waited for
            pending = note_tables_left(self.cfg, self.app, ERASED_FROM)
            self.schedule_store_scrub(0, patience_ms=None)
            left = [table for table in ERASED_FROM if table not in pending]  # no try of this role's would do
        else:
            left = self.app.scrub()  # SQLite: its log checkpointed and truncated, in moments
        if not self.read.checkpoint():  # the view's log held the person's rows too
            self.log("after the erasure, the view's log could not be moved into its file (a write of the view's was "
                     "under way): the file's rewrite drops it")
        mark_view_rewrite(self.cfg)
        self.schedule_view_rewrite()
        self.cfg.unfinished_erasure_path.unlink(missing_ok=True)
        phases["deadletter_and_store_files"] = time.perf_counter() - started - phases["store_and_view"]
        return Erased(erasure, removed, time.perf_counter() - started, phases, left)

    def access_export(self, customer_id: str, unit: str | None) -> dict[str, tuple[list[str], list[tuple]]]:
        """The access export's sections (projections/access.py) as `unit` may see them; for the
        group, with the person's rejected inputs the dead-letter file holds (a unit's key would
        see other units' inputs among them)."""
        parts = access.sections(self.read.cursor(), customer_id, unit)
        if unit is None:
            parts["rejected_inputs"] = rejected_inputs(self.cfg.deadletter_path, self.app, customer_id)
        return parts

    def erase_identifiers(self, identifiers: Sequence[tuple[str, str]], suppress: bool, actor: str) -> Erased:
        """`DELETE /v1/profiles/{ref}` of identifiers no customer carries, and `cdp erase` of one
        beside this server: the application's erase_identifiers, as a person's decision. Embedded,
        the dead-letter file is scrubbed before it and after (with Kafka, rejected inputs are on
        cdp.deadletter); with Kafka, the collector learns the suppressed identifiers at once. The
        store and the view hold nothing of theirs: no file is rewritten."""
        with locked(self.cfg.erasure_lock_path):
            started = time.perf_counter()
            embedded = self.mode == "embedded"
            removed = 0

            def first() -> None:
                nonlocal removed
                if embedded:
                    removed = scrub_deadletter(self.cfg.deadletter_path, self.app.identifier_erasure(identifiers))

            erasure = self.steward(methodcaller("erase_identifiers", list(identifiers), suppress, actor), first)
            if embedded:
                removed += scrub_deadletter(self.cfg.deadletter_path, erasure)
            if self.mode == "kafka" and suppress:
                self._renew_erased_screen()
            seconds = time.perf_counter() - started
            return Erased(erasure, removed, seconds, {"deadletter_and_store": seconds}, [])

    def schedule_view_rewrite(self, delay: float | None = None) -> None:
        """The view's rewrite, CDP_VIEW_REWRITE_DELAY (or `delay` seconds) from now, unless one is
        due already; nothing when the variable is `off` (the server's stop rewrites it)."""
        delay = self.cfg.view_rewrite_delay if delay is None else delay
        if delay is not None:
            self._schedule("view-rewrite", delay, self._rewrite_when_due)

    def _schedule(self, slot: str, delay: float, due: Callable[..., None], *args: Any) -> None:
        """`due(*args)` in `delay` seconds on a timer thread of its own, unless one is due in
        `slot` already or the server is closing; `due` frees the slot first (_due)."""
        with self._timer_lock:
            if self._closing or slot in self._timers:
                return
            timer = self._timers[slot] = threading.Timer(delay, due, args)
            timer.name, timer.daemon = f"cdp-{slot}", True
            timer.start()

    def _due(self, slot: str) -> None:
        with self._timer_lock:
            self._timers.pop(slot, None)

    def schedule_store_scrub(self, delay: float = STORE_SCRUB_RETRY_SECONDS[0],
                             patience_ms: int | None = SCRUB_RETRY_PATIENCE_MS) -> None:
        """Rewrites, in `delay` seconds, the store's tables an erasure deleted from and that are
        still to rewrite (retry_left_tables), and again later while one is held by another session.
        Right after an erasure it waits for such a session as `cdp erase` does (`patience_ms` None:
        SCRUB_LOCK_TIMEOUT_MS); a later try waits a quarter of a second at most, so the server's
        writers hardly wait."""
        self._schedule("store-scrub", delay, self._scrub_when_due, delay, patience_ms)

    @property
    def store_rewrite_pending(self) -> bool:
        """Whether the store's tables an erasure deleted from may still hold the deleted rows in
        their files (PostgreSQL: rewritten in the background, schedule_store_scrub)."""
        return self.cfg.unscrubbed_tables_path.exists()

    def _scrub_when_due(self, delay: float, patience_ms: int | None) -> None:
        self._due("store-scrub")
        if not self.store_rewrite_pending:
            return  # a later erasure rewrote them all
        try:
            with locked(self.cfg.erasure_lock_path):
                left = retry_left_tables(self.cfg, self.app, patience_ms)
        except Exception as error:  # noqa: BLE001 - said, and tried again
            self.log(f"rewriting the store's tables after an erasure failed ({error!r}); trying again")
            left = ["?"]
        if left:
            again = min(max(delay * 2, STORE_SCRUB_RETRY_SECONDS[0]), STORE_SCRUB_RETRY_SECONDS[1])
            self.log(f"after an erasure, the store's tables {', '.join(left)} could not be rewritten yet (held by "
                     f"another session, or the database out of reach): tried again in {again:.0f} s; their files "
                     "keep the deleted rows until then")
            self.schedule_store_scrub(again)
        else:
            self.log("the store's tables an erasure deleted from are rewritten: their files hold no deleted row")

    def _rewrite_when_due(self) -> None:
        self._due("view-rewrite")  # an erasure from now on is due for a rewrite of its own
        try:
            if not self.rewrite_view():
                self.schedule_view_rewrite(REWRITE_RETRY_SECONDS)
        except Exception as error:  # noqa: BLE001 - said, and left to the server's stop
            self.log(f"rewriting the view's file failed ({error!r}); the server's stop rewrites it")

    def rewrite_view(self) -> bool:
        """Rewrites the view's file after an erasure while the server runs; True when done (or
        nothing was pending), False when requests reading the view did not finish in time (a SQL
        query may run CDP_QUERY_TIMEOUT seconds).

        The view is copied into a fresh file while requests go on reading and events go on being
        projected, and the copy catches up with them (`_copy_view`). Only for the swap is the
        readers' gate closed (viewgate.py: new requests wait, then get 503 with Retry-After) and
        the requests in flight waited for: the old database closes, the fresh file takes its place,
        and a new read side opens it and follows on from its position. Before this, reads waited
        for the whole rewrite (3.9-4.5 s on the 1,005,500-event bench store, 11.3 s on a view of
        1,000,000 customers: bench.privacy). Should the copy fail, the file is rewritten the closed
        way (every connection closed first, as at a stop). The collector keeps accepting throughout.

        People's decisions (erase, split, review, audience definitions) wait for the view to show
        them, and a decision waiting inside the readers' gate would hold the swap back. So the
        rewrite first waits for the decisions under way and holds new ones back until it ends:
        they wait outside the readers' gate (viewgate.ViewRequests), for DECISION_WAIT_SECONDS at
        most before a 503 with Retry-After, as `steward` answers one that gets in regardless."""
        with self._rewriting:
            if self._closing or not self.view_rewrite_pending:
                return True
            if not self.decision_gate.close(DECISIONS_WAIT_SECONDS):
                self.log("the view's file was not rewritten: a person's decision did not finish; trying again")
                return False
            try:
                return self._rewrite_view()
            finally:
                self.decision_gate.open()

    def _rewrite_view(self) -> bool:
        """The rewrite itself, with people's decisions held off (rewrite_view)."""
        old, laps = self.read, [time.perf_counter()]
        fresh = self._copy_view(old)
        laps.append(time.perf_counter())
        if not self.view_gate.close(self.cfg.query_seconds + 5):
            if fresh is not None:
                view_erasure.discard(fresh.path)
            old.resume_writing()
            self.log("the view's file was not rewritten: requests reading it did not finish; trying again")
            return False
        laps.append(time.perf_counter())
        try:
            old.stop()
            if fresh is not None:
                view_erasure.swap_in(fresh.path, self.cfg.duckdb_path)
                if not fresh.erased:  # an erasure the copy caught up with left its rows' bytes in it
                    pending_view_rewrite(self.cfg).unlink(missing_ok=True)
            else:
                rewrite_view_if_pending(self.cfg)
            laps.append(time.perf_counter())
        finally:  # rewritten or not, the server reads on
            try:
                self.read = self._open_read_side(old.keyring)
                self.read.start()
            finally:
                self.view_gate.open()
        laps.append(time.perf_counter())
        if fresh is not None and fresh.erased:
            self.schedule_view_rewrite()
        waiting = laps[-1] - laps[1]
        parts = ", ".join(f"{name} {b - a:.1f} s" for name, a, b in
                          zip(("in flight", "swapping" if fresh else "copying", "opening"), laps[1:], laps[2:]))
        self.log(f"the view's file was rewritten after an erasure in {laps[-1] - laps[0]:.1f} s: "
                 + (f"{fresh.said}, " if fresh else "") + f"then reads of the view waited {waiting:.1f} s ({parts})")
        return True

    def _copy_view(self, read: ReadSide) -> FreshCopy | None:
        """The view in a fresh file, made while requests go on reading: the read side's upkeep (score
        refresh, cdp.profiles publisher, delivery loop) pauses and the tables are copied as of one
        snapshot while the projecting thread goes on; the copy then follows the store up to where the
        old view is, through a projector of its own, and only for the last stretch does the projecting
        thread pause too, so that new events wait for the swap alone. All stay paused (the swap ends
        them). None when they did not pause in time or the copy failed (then they go on, and the
        file is rewritten the closed way)."""
        from cdp.viewwriter import make_projector

        if not read.upkeep.pause(WRITERS_PAUSE_SECONDS):
            self.log("the view's writers did not pause in time; its file is rewritten while reads wait")
            return None
        started, cursor, fresh = time.perf_counter(), read.projector.con.cursor(), None
        try:
            fresh = view_erasure.copy_out(cursor, self.cfg.duckdb_path, LOOKUP_INDEXES, self.cfg.serve_memory)
            copied = time.perf_counter()
            follower = make_projector(replace(self.cfg, duckdb_memory=self.cfg.serve_memory), fresh)
            try:
                also = () if read.producer is not None else (PROFILES,)  # as the read side projects
                erased = self._follow(read, follower, also)  # while the old view moves on
                if not read.projecting.pause(WRITERS_PAUSE_SECONDS):
                    raise TimeoutError("the view's projecting thread did not pause in time")
                caught = time.perf_counter()
                erased |= self._follow(read, follower, also)
            finally:
                follower.close()
            done = time.perf_counter()
            return FreshCopy(fresh, erased, f"copied in {copied - started:.1f} s and caught up in {caught - copied:.1f} s "
                                            f"while reads and new events went on, the last {done - caught:.1f} s with "
                                            "new events waiting")
        except Exception as error:  # noqa: BLE001 - said, and done the closed way
            if fresh is not None:
                view_erasure.discard(fresh)
            read.resume_writing()
            self.log(f"copying the view's file failed ({error!r}); it is rewritten while reads wait")
            return None
        finally:
            cursor.close()

    @staticmethod
    def _follow(read: ReadSide, follower: Any, also: Sequence[str]) -> bool:
        """Applies to the follower (the copy's projector) the store's notifications up to where the
        read side's view is now; True when one of them erased someone."""
        erased = False
        for batch in read.notification_batches(follower.position, read.position):
            erased = erased or bool(erased_ids(batch))
            follower.apply(batch, also=also)
        return erased

    async def write(self, records: Sequence[Accepted | Rejected]) -> None:
        """Returns once the records are committed to the intake (embedded) or acknowledged (Kafka)."""
        if self.mode == "embedded":  # the writer's own thread commits: no worker thread waits for it
            await asyncio.shield(asyncio.wrap_future(self.writer.submit(records)))  # a gone client cancels nothing
        else:  # the records' acknowledgements are awaited on the event loop
            await self.writer.write(records)

    @property
    def resolver_state(self) -> str | None:
        """"ready" once a person's decision (erase, split, review) runs at once: the identity state
        it runs on is loaded (embedded, by the resolver process; with Kafka + PostgreSQL, by the
        decider); "loading" before, when such a request waits for the load (seconds on a large
        store). None with Kafka beside a SQLite store, where each decision loads a fresh application."""
        if self.mode == "embedded":
            return "ready" if self.writer.ready else "loading"
        if self.cfg.event_store:
            return "ready" if self._decider is not None else "loading"
        return None

    @property
    def view_rewrite_pending(self) -> bool:
        """Whether an erasure left the view's file to be rewritten (`rewrite_view`, or this
        server's stop): the person is in no table, but until then the file's free blocks may
        still hold their bytes."""
        return pending_view_rewrite(self.cfg).exists()

    @property
    def pending(self) -> int:
        """Records accepted over HTTP and not yet in the store (embedded; with Kafka the broker holds them)."""
        return self.writer.pending if self.mode == "embedded" else 0

    def steward(self, work: Callable[[Any], T], first: Callable[[], None] | None = None) -> T:
        """A person's decision, `work(app)` calling the application's command (the one the CLI
        calls: `cdp identity split|review`, `erase`, an audience's definition), returned once the
        view shows it. `work` must pickle (`operator.methodcaller`): embedded, it runs in the
        resolver process, between two of its batches, on the application it keeps (SQLite's one
        writer); with Kafka and PostgreSQL, on the application this server keeps for them (`decider`),
        under the writers' lock like the workers' batches (which refreshes it with what they
        committed). Neither loads the store's identity state again, so a decision costs the same
        on a store of millions of records. Kafka beside a SQLite store has no such refresh: there a fresh application decides.
        The reads queued for the audit trail are appended first, so the trail keeps the order
        things happened in. `first` is the caller's own step before the command, here in this
        thread, once the decision is let in (an erasure's scrub of the dead-letter)."""
        if not self.decision_gate.enter():  # a rewrite of the view's file is under way
            raise Denied(503, viewgate.REWRITING, viewgate.REWRITING_MESSAGE,
                         {"Retry-After": str(viewgate.RETRY_AFTER_SECONDS)})
        try:
            if first is not None:
                first()
            self.audit.flush()
            if self.mode == "embedded":
                result = self.writer.command(work)
            elif self.cfg.event_store:
                with self.decisions:
                    result = work(self.decider())
            else:
                from cdp.application import CustomerApplication

                with CustomerApplication(self.cfg) as app:
                    result = work(app)
            self.read.wake()
            self.read.wait_for(self.read.head(), VIEW_WAIT_SECONDS)
            return result
        finally:
            self.decision_gate.leave()

    def decider(self) -> Any:
        """The application people's decisions run on with Kafka + PostgreSQL, opened and its
        identity state loaded once (the writers' lock refreshes it before every command)."""
        with self._decider_lock:
            if self._decider is None:
                from cdp.application import CustomerApplication

                app = CustomerApplication(self.cfg)
                app.resolver  # noqa: B018 - loaded now, not on the first decision
                self._decider = app
            return self._decider

    def _warm_decider(self) -> None:
        try:
            self.decider()
        except Exception as error:  # noqa: BLE001 - the first decision opens it again, and says why
            self.log(f"loading the application for people's decisions failed: {error!r}")

    def start(self) -> None:
        self.read.start()
        self.expire_deadletter()

    def expire_deadletter(self) -> None:
        """Removes the dead-letter file's entries past CDP_DEADLETTER_RETENTION now and once a
        day while the server runs (its writer does too when it writes; a server that rejects
        nothing for weeks would otherwise keep them)."""
        try:
            removed = expire_entries(self.cfg.deadletter_path, self.cfg.deadletter_retention)
        except OSError as error:
            self.log(f"removing the dead-letter's expired entries failed ({error!r}); tried again in a day")
        else:
            if removed:
                self.log(f"removed {removed} dead-letter entr(ies) older than CDP_DEADLETTER_RETENTION")
        if self.cfg.deadletter_retention is not None:
            self._schedule("deadletter-expiry", DEADLETTER_EXPIRY_SECONDS, self._expire_when_due)

    def _expire_when_due(self) -> None:
        self._due("deadletter-expiry")
        self.expire_deadletter()

    def close(self) -> None:
        with self._timer_lock:
            self._closing = True
            for timer in self._timers.values():
                timer.cancel()
        with self._rewriting:  # a rewrite under way ends first; the one left is the stop's (run)
            pass
        self.audit.close()  # the queued reads, before the writer goes
        self.read.stop()
        self.writer.close()
        if self._profiles_producer is not None:
            self._profiles_producer.close(timeout=10)
        with self._decider_lock:
            if self._decider is not None:
                self._decider.close()
        self.app.close()

    @staticmethod
    def log(text: str) -> None:
        print(f"[serve {os.getpid()}] {text}", file=sys.stderr, flush=True)


def write_server_file(cfg: Settings, url: str, token: str) -> None:
    path = cfg.server_file
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(orjson.dumps({"url": url, "pid": os.getpid(), "key": token}))
    os.replace(temporary, path)


def run(cfg: Settings, host: str, port: int) -> None:
    import uvicorn

    from cdp import topics
    from cdp.server.console.pages import mount as mount_console
    from cdp.server.app import build_app

    if cfg.kafka_bootstrap:
        topics.ensure(cfg)
    try:
        finish_unfinished(cfg)  # an erasure while a server was killed before it could
        service = Service(cfg)
        if cfg.unscrubbed_tables_path.exists():  # still held: tried again while the server runs
            service.schedule_store_scrub()
    except duckdb.Error as error:
        raise ConfigError(f"cannot open the view {cfg.duckdb_path}: {str(error).splitlines()[0]}") from None
    app = build_app(service)
    mount_console(app, service)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    # uvicorn raises the signal that stopped it again once it has shut down: left at its default,
    # SIGTERM would then end the process before the service closes (the audit entries still queued,
    # the view's rewrite after an erasure); with this handler `run` returns and closes it
    signal.signal(signal.SIGTERM, lambda *_: None)
    service.start()
    if service.read.missing_indexes:
        Service.log(f"look-up indexes left out for want of memory (raise CDP_DUCKDB_MEMORY): "
                    f"{', '.join(service.read.missing_indexes)}")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
    Service.log(f"serving {url} ({service.mode}; store "
                f"{'PostgreSQL' if cfg.event_store else cfg.sqlite_path}; view {cfg.duckdb_path}); docs at {url}/docs")
    write_server_file(cfg, url, service.local_token)
    # what start-up made lives as long as the server: out of the collector's sight, a full
    # collection (which holds the GIL, so every look-up and request waits) walks only what
    # serving makes (py-spy of look-ups on a 1M-customer view: 2.2% of the samples in gc_collect
    # without, 0% with it; 0.6% with it while ingest runs)
    gc.freeze()
    try:
        server.run()
    finally:
        cfg.server_file.unlink(missing_ok=True)
        service.close()
        finish_unfinished(cfg)  # the view's rewrite, and the store's tables still to rewrite (briefly)
    if not server.started:
        raise OSError(f"cannot listen on {host}:{port}")
