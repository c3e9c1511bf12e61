"""The read side: the one owner of the DuckDB view while `cdp serve` runs.

A thread follows the event store — woken by the writers in this process, by PostgreSQL's
LISTEN/NOTIFY on the store's channel, or by a short poll for SQLite written by other processes —
and projects exactly once (rows and position in one DuckDB transaction, projections/projector.py).
With Kafka, a second thread publishes the changed profiles of each projected batch to
`cdp.profiles` and records, in the view, the store position whose profiles the broker
acknowledged and the offsets reached: a crash between the two never skips a profile, and the
restart sends none of the range twice (published.py). The two run side by side so that waiting for the broker
never holds back the next batch's visibility (measured: publishing inside the follow loop let
batches grow to thousands of events and profiles took seconds to show). API key events from the
same notifications feed the key ring.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import duckdb
import orjson

from cdp import keys as api_keys
from cdp.config import Settings, today
from cdp.contracts import stored_events
from cdp.delivery import DeliveryLoop
from cdp.server import priority, published, stages
from cdp.server.viewgate import WriterPause
from projections import metrics
from projections.changelog import LISTED_IDS, profile_messages, tombstones
from projections.projector import view_position
from projections.tables import scope_members
from projections.transactions import transaction

PROFILES = "profiles"  # projection_state row: store position whose profiles were published
POLL_SECONDS = 0.2
SCORES_NICE = 19  # the score refresh's thread: lowest priority (ReadSide._refresh_beside)
# Point look-ups of the profile API (one customer by id, e-mail, phone or source record) use these
# ART indexes instead of scanning the tables; measured: p50 167 → 31 ms on 200k customers, cold.
LOOKUP_INDEXES = (
    "CREATE INDEX IF NOT EXISTS lookup_customers ON customers (customer_id)",
    "CREATE INDEX IF NOT EXISTS lookup_events_customer ON customer_events (customer_id)",
    "CREATE INDEX IF NOT EXISTS lookup_events_email ON customer_events (email)",
    "CREATE INDEX IF NOT EXISTS lookup_events_phone ON customer_events (phone)",
    "CREATE INDEX IF NOT EXISTS lookup_sources_customer ON customer_sources (customer_id)",
    "CREATE INDEX IF NOT EXISTS lookup_sources_source ON customer_sources (source_id)",
    "CREATE INDEX IF NOT EXISTS lookup_redirects ON customer_redirects (absorbed_id)",
    # a profile's merges (the ids it absorbed): a point read rather than a scan that DuckDB spreads
    # over its worker threads (200,000 merges: p50 1.2 → 0.6 ms, p99 2.5 → 0.8 ms)
    "CREATE INDEX IF NOT EXISTS lookup_redirects_survivor ON customer_redirects (survivor_id)",
    # not a look-up: a live batch deletes its known customers' unit rows before deriving them again;
    # without it that is a scan of the whole table (1,000,000 customers: 44-60 ms CPU for 10 ids,
    # 2.4-2.8 ms with it)
    "CREATE INDEX IF NOT EXISTS lookup_units_customer ON customer_business_units (customer_id)",
)


class ReadSide:
    def __init__(self, cfg: Settings, app: Any, producer: Any = None,
                 on_batch: Callable[[list[tuple]], None] | None = None, keyring: api_keys.KeyRing | None = None):
        """`app` is the CustomerApplication: read here (notifications, head), never written.
        `keyring`: the API keys a previous read side kept (the server's gate holds it), followed on."""
        from cdp.viewwriter import make_projector

        self.cfg = cfg
        self.store = app
        self.producer = producer  # None: embedded without Kafka, no changelog
        self.on_batch = on_batch
        before = priority.thread_ids()
        self.projector = make_projector(cfg)
        if cfg.serve_threads:
            # CDP_SERVE_THREADS; unset: one on two cores or fewer (config.default_serve_threads)
            self.projector.con.execute(f"SET threads = {int(cfg.serve_threads)}")
        self._duckdb_threads = priority.thread_ids() - before  # mostly the projector's work
        self.projector.con.execute("INSERT INTO projection_state SELECT ?, 0 WHERE NOT EXISTS "
                                   "(SELECT 1 FROM projection_state WHERE name = ?)", [PROFILES, PROFILES])
        if producer is not None:  # cdp.profiles' bookkeeping (published.py): only where there is a changelog
            self.projector.con.execute(published.DDL)
        self.missing_indexes = self.create_indexes()
        # the threads below hold these while they write the view: the projecting thread `projecting`,
        # the score refresh, the cdp.profiles publisher and the delivery loop `upkeep` (a rewrite of
        # the view's file pauses the upkeep for its copy, the projecting for its last catch-up)
        self.projecting, self.upkeep = WriterPause(), WriterPause()
        self.delivery = DeliveryLoop(self.projector.con, cfg, hold=self.upkeep.writing)  # audience changes
        self.keyring = keyring if keyring is not None else api_keys.load(app)
        self.published = 0
        self.follow_error: BaseException | None = None
        self.publish_error: BaseException | None = None
        self.scored_at = 0.0
        self._refresh: threading.Thread | None = None  # the score refresh running beside the projector
        self._refresh_inline = False
        self._wake = threading.Event()
        self._woken: float | None = None  # when the store's notification that set `_wake` arrived (stage lines)
        self._woken_now: float | None = None  # … the one the batch being read answers (None: a poll, a writer here)
        self._stop = threading.Event()
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._cursor_lock = threading.Lock()
        self._caught_up = threading.Condition()
        self._threads = [threading.Thread(target=self._follow, name="cdp-read-side", daemon=True)]
        # batches projected but not yet published: (store position reached, customer ids, erased ids)
        self._unpublished: list[tuple[int, list[str], list[str], float]] = []  # …, when it was handed over
        self._unpublished_ready = threading.Condition()
        if producer is not None:
            self._threads.append(threading.Thread(target=self._publish, name="cdp-profiles", daemon=True))
        if app.store.is_postgres:
            self._threads.append(threading.Thread(target=self._listen, name="cdp-store-listener", daemon=True))

    def create_indexes(self) -> list[str]:
        """DuckDB keeps ART indexes in memory: one that does not fit CDP_DUCKDB_MEMORY is left out
        (look-ups then scan that table); returns the names left out."""
        missing = []
        for statement in LOOKUP_INDEXES:
            try:
                self.projector.con.execute(statement)
            except duckdb.OutOfMemoryException:
                missing.append(statement.split()[5])
        return missing

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        priority.lower(self.cfg.catch_up_nice, self._duckdb_threads)
        for thread in self._threads:
            thread.start()
        self.delivery.start()

    def stop(self) -> None:
        self._stop.set()
        for writers in self.writer_pauses:
            writers.end()  # writers a rewrite paused leave without writing
        self._wake.set()
        with self._unpublished_ready:
            self._unpublished_ready.notify_all()
        for thread in self._threads:
            if thread.name != "cdp-store-listener":
                thread.join(timeout=30)
        if self._refresh is not None:
            self._refresh.join(timeout=60)
        self.delivery.stop()
        for cursor in self._cursors:
            cursor.close()
        self.projector.close()

    @property
    def writer_pauses(self) -> tuple[WriterPause, WriterPause]:
        return self.projecting, self.upkeep

    def resume_writing(self) -> None:
        """After a rewrite that paused the writers and did not swap the file: they go on."""
        for writers in self.writer_pauses:
            writers.resume()

    @property
    def error(self) -> BaseException | None:
        """What keeps the view or `cdp.profiles` from following the store now (None: nothing)."""
        return self.follow_error or self.publish_error

    def wake(self) -> None:
        """New events were committed (by this process)."""
        self._wake.set()

    # -- reading -----------------------------------------------------------------------------

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection of this thread's own on the view: reads see committed batches only."""
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._local.cursor = self.projector.con.cursor()
            with self._cursor_lock:
                self._cursors.append(cursor)
        return cursor

    def head(self) -> int:
        """The store's highest position now (what the view should reach)."""
        return self.store.max_position()

    @property
    def position(self) -> int:
        """The store position the view reached (read on this thread's own connection)."""
        return view_position(self.cursor())

    def wait_for(self, position: int, timeout: float) -> bool:
        """Blocks until the view reached `position` (True) or `timeout` passed (False)."""
        deadline = time.monotonic() + timeout
        with self._caught_up:
            while self.position < position:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()
                self._caught_up.wait(left)
        return True

    def checkpoint(self, attempts: int = 20) -> bool:
        """Moves the view's write-ahead log into its file (after an erasure: the log held the
        person's rows); retried while another write of the view's is under way (the projector's
        batch, a refresh of the scores), for a second by default. False when one still was: the
        log then goes with the file's rewrite after the erasure (the old file's log is dropped
        at the swap), and the erasure, committed, stands."""
        for attempt in range(attempts):
            try:
                self.cursor().execute("CHECKPOINT")
                return True
            except duckdb.TransactionException:
                if attempt < attempts - 1:
                    time.sleep(0.05)
        return False

    # -- following ---------------------------------------------------------------------------

    def _follow(self) -> None:
        priority.lower(self.cfg.catch_up_nice)  # look-ups and the collector answer first
        while not self._stop.is_set():
            try:
                with self.projecting.writing() as allowed:
                    if not allowed:
                        return
                    self.catch_up()
                self.follow_error = None
            except Exception as error:  # the store away: report on /health, retry
                self.follow_error = error
                self._stop.wait(1.0)
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()
            self._woken_now, self._woken = self._woken, None

    def catch_up(self) -> int:
        """Projects what the store has beyond the view, publishes the changed profiles; returns
        the number of notifications applied."""
        projector, store = self.projector, self.store
        applied = 0
        while True:
            noticed, used = time.time(), time.thread_time()
            notifications = store.raw_notifications(projector.position, self.cfg.projection_batch)
            if not notifications:
                break
            read = time.time()
            self.keyring.take(notifications)
            self._project(notifications)
            if self.cfg.trace_stages:
                stages.log(stages.PROJECTED, events=len(notifications), first=notifications[0][0],
                           last=notifications[-1][0], woken=self._woken_now, noticed=noticed,
                           read=read, committed=time.time(), cpu=time.thread_time() - used)
            applied += len(notifications)
            self._hand_to_publisher(notifications)
            if self.on_batch is not None:  # before the waiters wake: a decision answered has had it
                self.on_batch(notifications)
            with self._caught_up:
                self._caught_up.notify_all()
            self.delivery.wake()
            if len(notifications) < self.cfg.projection_batch:
                break  # all the store had: what commits next wakes this thread (no second read to learn so)
        self._follow_today()
        now = time.monotonic()
        if not self.scored_at and metrics.state(projector.con)[0] == projector.as_of:
            # the view was scored for this as-of date: the next refresh after the interval, not on
            # the first live batch (a refresh of a large view held that batch back for seconds)
            self.scored_at = now
        if now - self.scored_at >= self.cfg.score_interval or (applied and not self.scored_at):
            self.scored_at = now
            self._refresh_scores()
        return applied

    def _follow_today(self) -> None:
        """Without CDP_AS_OF the scores are as of today (UTC): a server running past midnight
        moves on to the new day and refreshes everyone's scores at once, rather than keeping the
        day it started on. Not while a refresh runs: it is computing against the day before."""
        if self.cfg.as_of_fixed or (self._refresh is not None and self._refresh.is_alive()):
            return
        day = today()
        if day != self.projector.as_of:
            self.projector.as_of = day
            self.scored_at = time.monotonic() - self.cfg.score_interval  # due now

    def _project(self, notifications: list[tuple]) -> None:
        """One batch into the view. A batch that collides with a score refresh running beside it
        (both updated one row, e.g. an audience membership: DuckDB refuses the second writer) was
        rolled back whole; it is applied again once the refresh ended (exactly once: its position
        did not move). A customer row the batch replaces while the refresh updates it is no
        collision: the batch's row (scored by the last refresh, as after every batch) wins."""
        also = () if self.producer is not None else (PROFILES,)
        while True:
            try:
                self.projector.apply(notifications, also=also)
                return
            except duckdb.TransactionException:
                refresh = self._refresh
                if refresh is None or not refresh.is_alive():
                    raise
                refresh.join()

    # -- scores --------------------------------------------------------------------------------

    def _refresh_scores(self) -> None:
        """Recomputes every customer's scores (projector.refresh_metrics) on a thread and a cursor
        of its own, so that new batches keep becoming visible meanwhile (on 1,000,000 customers a
        refresh takes seconds). After a refresh lost a write conflict to the projecting thread,
        the next one runs here, between two batches, as it always did before, so it cannot starve."""
        if self._refresh is not None and self._refresh.is_alive():
            return
        if self._refresh_inline:
            self._refresh_inline = False
            with self._traced_refresh(inline=True):
                self.projector.refresh_metrics()
            self.delivery.wake()
            return
        self._refresh = threading.Thread(target=self._refresh_beside, name="cdp-scores", daemon=True)
        self._refresh.start()

    def _refresh_beside(self) -> None:
        # the refresh is upkeep: its thread yields the CPU to the stream and to answering (1,000,000
        # customers, Kafka, bench.visible over 60 s, which a refresh falls in, interleaved: p99
        # HTTP / cdp.profiles 734/804 and 577/625 ms at the same niceness, 466/514 and 411/450 lowered)
        priority.lower(SCORES_NICE)
        cursor = self.projector.con.cursor()
        try:
            with self.upkeep.writing() as allowed:
                if not allowed:
                    return
                with self._traced_refresh(inline=False):
                    self.projector.refresh_metrics(cursor)
            self.delivery.wake()
        except Exception:  # noqa: BLE001 - e.g. a batch updated a row first: again, between two batches
            self._refresh_inline = True
            self.scored_at -= self.cfg.score_interval
        finally:
            cursor.close()

    @contextmanager
    def _traced_refresh(self, inline: bool) -> Iterator[None]:
        """A stage line per refresh (CDP_TRACE_STAGES): when it ran, where, and whether it committed."""
        began, used, ok = time.time(), time.thread_time(), False
        try:
            yield
            ok = True
        finally:
            if self.cfg.trace_stages:
                stages.log(stages.SCORED, began=began, ended=time.time(), cpu=time.thread_time() - used,
                           inline=inline, ok=ok)

    # -- publishing cdp.profiles -----------------------------------------------------------------

    def _hand_to_publisher(self, notifications: list[tuple]) -> None:
        """After a batch committed to the view: its changed customers to the publishing thread
        (with Kafka); without Kafka there is no changelog and the published position moved with
        the view, in the batch's own commit (projector.apply's `also`)."""
        if self.producer is None:
            return
        with self._unpublished_ready:
            self._unpublished.append((notifications[-1][0], [r[1] for r in notifications], erased_ids(notifications),
                                      time.time()))
            self._unpublished_ready.notify()

    def _publish(self) -> None:
        """The publishing thread: first what a crash left unpublished (read again from the store),
        then each batch the follow thread hands over, several at once when it falls behind. After
        an error the batches in hand are dropped and their range is read from the store again."""
        con = self.cursor()
        recovered = False
        while not self._stop.is_set():
            try:
                if not recovered:
                    with self.upkeep.writing() as allowed:
                        if not allowed:
                            return
                        self.publish_profiles(con)
                    recovered, self.publish_error = True, None
                with self._unpublished_ready:
                    while not self._unpublished and not self._stop.is_set():
                        self._unpublished_ready.wait(1.0)
                    batches, self._unpublished = self._unpublished, []
                if not batches:
                    continue
                with self.upkeep.writing() as allowed:
                    if not allowed:  # the next read side publishes them: they are past its published position
                        return
                    self._publish_batches(con, batches)
                self.publish_error = None
            except Exception as error:  # the broker away: report on /health, retry from the store
                self.publish_error = error
                recovered = False
                with self._unpublished_ready:
                    self._unpublished.clear()
                self._stop.wait(1.0)

    def _publish_batches(self, con: duckdb.DuckDBPyConnection, batches: list[tuple]) -> None:
        began, used = time.time(), time.thread_time()
        done = published_position(con)
        batches = [b for b in batches if b[0] > done]  # a recovery covered these
        if batches:
            built = self._send_profiles(con, [cid for b in batches for cid in b[1]],
                                        [cid for b in batches for cid in b[2]], batches[-1][0])
            if self.cfg.trace_stages:
                stages.log(stages.PUBLISHED, first=done + 1, last=batches[-1][0], handed=batches[0][3],
                           began=began, built=built, acked=time.time(), cpu=time.thread_time() - used)

    def _send_profiles(self, con: duckdb.DuckDBPyConnection, ids: list[str], erased: list[str], upto: int,
                       already: published.Tail | None = None) -> float:
        """Sends the current profiles of `ids` (and tombstones of `erased`) but those `already` on
        the topic, waits for the broker's acks, then records `upto` as published and the offsets
        reached; returns when the messages were made (stage lines)."""
        changed, merged = changed_customers(con, ids)
        topic = self.cfg.topic("cdp.profiles")
        messages = profile_messages(con, changed, merged, upto) + tombstones(erased)
        if already:
            messages = [(key, value) for key, value in messages if already.get(key, False) != value]
        built = time.time()
        sent = [self.producer.send(topic, key=key, value=value) for key, value in messages]
        self.published += len(sent)
        self.producer.flush()
        reached: dict[int, int] = {}
        for partition, offset in (future.result() for future in sent):
            reached[partition] = max(reached.get(partition, 0), offset + 1)
        with transaction(con):
            con.execute("UPDATE projection_state SET position = ? WHERE name = ?", [upto, PROFILES])
            published.record_offsets(con, topic, reached)
        return built

    def publish_profiles(self, con: duckdb.DuckDBPyConnection) -> None:
        """Profiles of the customers changed between the published position and the view's, the
        changes read again from the store (after a restart or an error). A range a crash left on
        the topic unrecorded is published first, whole and with its own position, so that the
        profiles it already carries are not sent twice (published.py)."""
        already = published.unrecorded_tail(con, self.cfg.kafka_bootstrap, self.cfg.topic("cdp.profiles"))
        done = published_position(con)
        upto = view_position(con)
        unrecorded = min(published.last_position(already), upto)
        if unrecorded > done:
            rows = [r for batch in self.notification_batches(done, unrecorded) for r in batch]
            self._send_profiles(con, [r[1] for r in rows], erased_ids(rows), unrecorded, already)
            done = unrecorded
        for rows in self.notification_batches(done, upto):
            self._send_profiles(con, [r[1] for r in rows], erased_ids(rows), rows[-1][0])

    def notification_batches(self, after: int, upto: int) -> Iterator[list[tuple]]:
        """The store's notifications after `after` up to `upto`, a projection batch at a time (also
        what a rewrite's copy of the view follows: Service._follow)."""
        while after < upto:
            batch = [r for r in self.store.raw_notifications(after, self.cfg.projection_batch) if r[0] <= upto]
            if not batch:
                return
            yield batch
            after = batch[-1][0]

    def _listen(self) -> None:
        """PostgreSQL: the store's recorder NOTIFYs its channel on every insert; wake on it."""
        import psycopg

        channel = self.store.recorder.channel_name
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.cfg.event_store, autocommit=True) as conn:
                    conn.execute(f'LISTEN "{channel}"')
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            if self._woken is None:
                                self._woken = time.time()
                            self._wake.set()
            except Exception:
                self._stop.wait(1.0)  # reconnect; the poll keeps the view moving meanwhile


def published_position(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("SELECT position FROM projection_state WHERE name = ?", [PROFILES]).fetchall()[0][0]


def erased_ids(notifications: list[tuple]) -> list[str]:
    """The customer ids an erasure in `notifications` removed (their tombstones)."""
    return [cid for r in notifications if r[2] == stored_events.ERASED for cid in orjson.loads(r[3])["customer_ids"]]


def erases_anyone(notifications: list[tuple]) -> bool:
    """Whether `notifications` hold an erasure: a customer's (`Erased`), or of identifiers no
    customer carried (only its audit entry says so, CustomerApplication.erase_identifiers)."""
    return any(r[2] == stored_events.ERASED
               or (r[2] == stored_events.AUDIT_ENTRY and orjson.loads(r[3])["action"] == "erase")
               for r in notifications)


def changed_customers(con: duckdb.DuckDBPyConnection, ids: list[str]) -> tuple[set[str], dict[str, str]]:
    """Current ids of the customers in `ids`, and the ones merged away (absorbed → survivor)."""
    distinct = sorted(set(ids))
    merged = {}
    for start in range(0, len(distinct), LISTED_IDS):  # constant lists, as profile_messages reads
        merged.update(con.execute("SELECT absorbed_id, survivor_id FROM customer_redirects WHERE absorbed_id IN "
                                  f"{scope_members(distinct[start:start + LISTED_IDS])}").fetchall())
    changed = {merged.get(cid, cid) for cid in distinct}
    return changed, merged
