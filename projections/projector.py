"""Exactly-once projection of the event store into the DuckDB view.

The projector reads the store's notification log after the position it has reached, turns a batch
of notifications into Arrow tables, applies them with set-based SQL and records the new position
in the same DuckDB transaction: a crash before the commit leaves the old position and none of the
rows, so a restart neither loses nor double-counts an event.
"""
from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import duckdb
import pyarrow as pa
from cdp.contracts import audience_events, stored_events
from projections import audiences, erasure, metrics
from projections.registrations import registered_customers
from projections.identity_tables import DDL as IDENTITY_DDL, DECISION_TOPICS, INSERT_DECISIONS, SPLIT_MOVES, apply_splits_sql
from projections.transactions import transaction
from projections.tables import (BATCH_EVENTS, DATA_COLUMNS, DDL, EVENT_COLUMNS, PROFILE_COLUMNS, VIEW as NAME,
                               prepare_listed_sql, recompute_customers_sql, scope_members, view_position)

TOPIC_EVENT = stored_events.EVENT_RECORDED
TOPIC_REGISTERED = stored_events.REGISTERED
TOPIC_LINKED = stored_events.SOURCE_LINKED
TOPIC_MERGED = stored_events.MERGED
TOPIC_SPLIT = stored_events.SPLIT
TOPIC_SPLIT_OFF = stored_events.SPLIT_OFF

# a batch without these leaves audiences and destinations as they are (skips their per-batch SQL)
DEFINITION_TOPICS = frozenset((
    audience_events.AUDIENCE_DEFINED, audience_events.AUDIENCE_REDEFINED, audience_events.AUDIENCE_DELETED,
    audience_events.DESTINATION_DEFINED, audience_events.DESTINATION_REDEFINED, audience_events.DESTINATION_DELETED))
RESHAPING_TOPICS = frozenset((TOPIC_MERGED, TOPIC_SPLIT, TOPIC_SPLIT_OFF, stored_events.ERASED))
LISTED_SCOPE_MAX = 2000  # touched customers recomputed through a constant id list, beyond: a join


def _struct(columns: dict[str, str]) -> str:
    return "{" + ", ".join(f'"{name}": "{kind}"' for name, kind in columns.items()) + "}"


# How EventRecorded's stored state reads as a DuckDB STRUCT: parsed once per row by from_json.
_EVENT_STATE = _struct({
    "event_id": "VARCHAR", "event_source": "VARCHAR", "event_type": "VARCHAR", "time": "VARCHAR",
    "business_unit": "VARCHAR", "source_id": "VARCHAR",
}).rstrip("}") + ', "profile": ' + _struct({c: "VARCHAR" for c in PROFILE_COLUMNS}) + ', "data": ' + _struct(
    {name: ("JSON" if kind == "JSON" else kind) for name, kind in DATA_COLUMNS.items()}) + "}"

_EVENT_FIELDS = {
    "event_id": "s.event_id", "event_source": "s.event_source", "customer_id": "customer_id",
    "business_unit": "s.business_unit", "source_id": "s.source_id", "type": "s.event_type",
    "time": "s.time::TIMESTAMPTZ", "position": "position",
    **{name: f"s.data.{name}" for name in DATA_COLUMNS},
    **{name: f"s.profile.{name}" + ("::DATE" if name == "date_of_birth" else "") for name in PROFILE_COLUMNS},
}
assert set(_EVENT_FIELDS) == set(EVENT_COLUMNS)

# the segment's events parsed once into BATCH_EVENTS, then appended: the recompute copies its new
# customers' rows from there (tables.recompute_customers_sql)
INSERT_EVENTS = (f"""
CREATE OR REPLACE TEMP TABLE {BATCH_EVENTS} AS
SELECT {", ".join(f"{expr} AS {name}" for name, expr in _EVENT_FIELDS.items())}
FROM (SELECT position, customer_id, from_json(decode(state), '{_EVENT_STATE}') AS s
      FROM batch WHERE topic = '{TOPIC_EVENT}')
""", f"INSERT INTO customer_events BY NAME SELECT * FROM {BATCH_EVENTS}")
INSERT_SOURCES = f"""
INSERT INTO customer_sources BY NAME
SELECT s.business_unit, s.source_id, customer_id,
       CASE WHEN topic = '{TOPIC_REGISTERED}' THEN 'new_customer' ELSE s.rule END AS linked_by,
       s.evidence AS evidence, position
FROM (SELECT position, customer_id, topic,
             from_json(decode(state), '{{"business_unit": "VARCHAR", "source_id": "VARCHAR", "rule": "VARCHAR", "evidence": "JSON"}}') AS s
      FROM batch WHERE topic IN ('{TOPIC_REGISTERED}', '{TOPIC_LINKED}'))
"""
SELECT_MERGES = f"""
SELECT s.absorbed_id, customer_id, s.rule, s.evidence, position
FROM (SELECT position, customer_id,
             from_json(decode(state), '{{"absorbed_id": "VARCHAR", "rule": "VARCHAR", "evidence": "JSON"}}') AS s
      FROM batch WHERE topic = '{TOPIC_MERGED}')
ORDER BY position
"""
TOUCHING_TOPICS = (TOPIC_EVENT, TOPIC_REGISTERED, TOPIC_LINKED, TOPIC_MERGED, TOPIC_SPLIT, TOPIC_SPLIT_OFF)
SELECT_TOUCHED = f"""
SELECT DISTINCT customer_id FROM batch
WHERE topic IN ({", ".join(f"'{topic}'" for topic in TOUCHING_TOPICS)})
"""


def connect(path: Path | str, read_only: bool = False, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    # The memory limit is handed over as a setting, never pasted into SQL (CDP_DUCKDB_MEMORY).
    con = duckdb.connect(str(path), read_only=read_only, config={"memory_limit": memory_limit} if memory_limit else {})
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")  # the CLI draws its own; DuckDB's would land in stdout
    # Top-N queries (e.g. the 100 most valuable customers) read the wide columns for the winners
    # only; DuckDB's default does that up to LIMIT 50.
    con.execute("SET late_materialization_max_rows = 1000")
    if not read_only:
        # Checkpoint rarely (and on close) rather than inside the commit of every batch.
        con.execute("SET checkpoint_threshold = '1GB'")
        # With the look-up indexes `cdp serve` keeps in the file (cdp/server/readside.py), DuckDB's
        # order-preserving batch insert fails fatally with several threads while projecting a split
        # ("batch index … is present in multiple collections") and invalidates the database:
        # measured on a 1M-event view, every split did, by the server or `cdp identity split`
        # after it. Writers take the plain insert path; readers order what they read.
        con.execute("SET preserve_insertion_order = false")
    return con


def final_survivors(merges: Sequence[tuple]) -> dict[str, str]:
    """absorbed -> survivor at the end of the batch, with chains inside the batch followed."""
    direct = {absorbed: survivor for absorbed, survivor, *_ in merges}

    def final(cid: str) -> str:
        while cid in direct:
            cid = direct[cid]
        return cid

    return {absorbed: final(absorbed) for absorbed in direct}


def segments(notifications: Sequence[tuple]) -> list[Sequence[tuple]]:
    """The batch cut after each Split and Erased, so they apply after everything before them and
    before anything after them (merges and splits do not commute; a person erased without
    suppression may come back)."""
    cuts = [i + 1 for i, n in enumerate(notifications) if n[2] in (TOPIC_SPLIT, stored_events.ERASED)]
    starts = [0, *cuts]
    return [notifications[a:b] for a, b in zip(starts, [*cuts, len(notifications)]) if a < b]


def plain(notifications: Sequence[tuple]) -> bool:
    """A batch that neither merges, splits nor erases (a live batch, almost always): one segment,
    and the customers it touched are the ids its own rows name (`touched_customers`)."""
    return RESHAPING_TOPICS.isdisjoint(n[2] for n in notifications)


def touched_customers(notifications: Sequence[tuple]) -> list[str]:
    """The customers a plain batch touched (what SELECT_TOUCHED finds), in the order they appear."""
    return list(dict.fromkeys(n[1] for n in notifications if n[2] in TOUCHING_TOPICS and n[1] is not None))


def move_position_sql(position: int, names: Sequence[str]) -> str:
    """The statement that moves the view's position (and those of `names` following it) to
    `position`, with its values written in, so that it can share a call with other statements."""
    return f"UPDATE projection_state SET position = {int(position)} WHERE name IN {scope_members(list(names))}"


def listed_scope(ids: list[str]) -> list[str] | str | None:
    """The touched customers' ids as a constant list when few (a live batch; see
    tables.scope_members), else the `touched` table (a catch-up of many); None: none."""
    if not ids:
        return None
    return ids if len(ids) <= LISTED_SCOPE_MAX else "touched"


class Projector:
    """`survivorship` is the golden record's rule per field (CDP_SURVIVORSHIP, parsed by the caller)."""

    def __init__(self, path: Path | str, as_of: date | None = None, memory_limit: str | None = None,
                 survivorship: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.as_of = as_of or date.today()
        self.survivorship = dict(survivorship or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = connect(self.path, memory_limit=memory_limit)
        for statement in (*DDL, *IDENTITY_DDL, *audiences.DDL):
            self.con.execute(statement)
        metrics.check_columns(self.con, self.path)
        metrics.register_functions(self.con)
        for statement in prepare_listed_sql(self.survivorship):
            self.con.execute(statement)
        self.con.execute("INSERT INTO projection_state SELECT ?, 0 WHERE NOT EXISTS "
                         "(SELECT 1 FROM projection_state WHERE name = ?)", [NAME, NAME])

    @property
    def position(self) -> int:
        return view_position(self.con)

    def apply(self, notifications: Sequence[tuple[int, str, str, bytes]], recompute: bool = True,
              also: Sequence[str] = ()) -> int:
        """Projects one batch of (position, customer_id, topic, state) rows; returns how many.
        `also` names other projection_state rows that follow the view in the same commit (the
        server's published position when it has no changelog: one commit per batch, not two)."""
        if not notifications:
            return 0
        # a plain batch's touched customers are known from its rows: no `touched` table to fill and
        # read back unless the audience upkeep or a long scope reads it
        listed = touched_customers(notifications) if recompute and plain(notifications) else None
        with transaction(self.con) as con:
            if listed is None:
                con.execute("CREATE OR REPLACE TEMP TABLE touched (customer_id VARCHAR)")
            audiences.begin_batch(con)
            for segment in segments(notifications):
                self._apply_segment(segment, recompute, note_touched=listed is None)
            if not recompute:
                scope = None
            else:
                scope = self._touched_scope() if listed is None else listed_scope(listed)
            # a batch that touched no customer and defined no audience (e.g. the audit entries of
            # profile reads, committed every half second while the API is read) has nothing to
            # recompute: ~100 ms of CPU saved per such batch, which held back the next one
            if scope is None and recompute and not DEFINITION_TOPICS.isdisjoint(n[2] for n in notifications):
                scope = "touched"
            # the rest in one call: each call hands the GIL back and waits to take it again (up to
            # the 5 ms switch interval while the server's other threads run Python)
            last = [move_position_sql(notifications[-1][0], [NAME, *also])]
            if scope is not None:
                if listed is not None and scope == "touched":
                    self._note_touched(listed)
                registered = registered_customers(notifications)  # nothing of theirs to look up
                upkeep = audiences.keep_prior_scores(con, scope, registered)  # None without audiences
                recomputing = recompute_customers_sql(scope, self.survivorship, registered)
                if upkeep:  # membership changes commit with the batch that caused them
                    con.execute(";\n".join(recomputing))
                    audiences.update_for_batch(con, upkeep, notifications[-1][0])
                else:
                    last = [*recomputing, *last]
            con.execute(";\n".join(last))
        return len(notifications)

    def _touched_scope(self) -> str | list[str] | None:
        """The customers this batch touched, as the `touched` table holds them (see listed_scope)."""
        return listed_scope([row[0] for row in self.con.execute(
            "SELECT DISTINCT customer_id FROM touched WHERE customer_id IS NOT NULL "
            f"LIMIT {LISTED_SCOPE_MAX + 1}").fetchall()])

    def _note_touched(self, ids: list[str]) -> None:
        """The `touched` table of a plain batch, from the ids its rows name."""
        self.con.register("touched_ids", pa.table({"customer_id": pa.array(ids, pa.string())}))
        try:
            self.con.execute("CREATE OR REPLACE TEMP TABLE touched AS SELECT customer_id FROM touched_ids")
        finally:
            self.con.unregister("touched_ids")

    def _apply_segment(self, notifications: Sequence[tuple[int, str, str, bytes]], recompute: bool,
                       note_touched: bool = True) -> None:
        positions, customers, topics, states = zip(*notifications)
        con = self.con
        con.register("batch", pa.table({
            "position": pa.array(positions, pa.int64()), "customer_id": pa.array(customers, pa.string()),
            "topic": pa.array(topics, pa.string()), "state": pa.array(states, pa.binary())}))
        present = set(topics)
        try:
            # each statement parses its topic's rows out of the batch: a fixed cost per statement,
            # skipped when the batch holds none of them (a live batch is mostly events and new
            # customers)
            facts = [*(INSERT_EVENTS if TOPIC_EVENT in present else ()),
                     *((INSERT_SOURCES,) if not present.isdisjoint((TOPIC_REGISTERED, TOPIC_LINKED)) else ()),
                     *((INSERT_DECISIONS,) if not present.isdisjoint(DECISION_TOPICS) else ())]
            if facts:  # one call (see apply)
                con.execute(";\n".join(facts))
            if not DEFINITION_TOPICS.isdisjoint(present):
                audiences.apply_definitions(con)
            absorbed = self._apply_merges(con.execute(SELECT_MERGES).fetchall()) if TOPIC_MERGED in present else set()
            if topics[-1] == TOPIC_SPLIT:
                con.execute(SPLIT_MOVES)
                for statement in apply_splits_sql(recompute):
                    con.execute(statement)
            erased = erasure.delete_erased(con, erasure.pending_marker(self.path)) if topics[-1] == stored_events.ERASED else []
            if recompute and note_touched:
                con.execute("INSERT INTO touched " + SELECT_TOUCHED)
                # the erased count as touched too: audiences drop them, and the batch's recompute
                # keeps to a list of ids rather than scanning every event for an empty scope
                if absorbed or erased:
                    con.executemany("INSERT INTO touched VALUES (?)", [(c,) for c in absorbed.union(erased)])
        finally:
            con.unregister("batch")

    def _apply_merges(self, merges: list[tuple]) -> set[str]:
        if not merges:
            return set()
        con = self.con
        final = final_survivors(merges)
        con.register("batch_merges", pa.table({
            "absorbed_id": list(final), "survivor_id": list(final.values())}))
        for table in ("customer_events", "customer_sources"):
            con.execute(f"UPDATE {table} SET customer_id = m.survivor_id FROM batch_merges m "
                        f"WHERE {table}.customer_id = m.absorbed_id")
        con.execute("UPDATE customer_redirects SET survivor_id = m.survivor_id FROM batch_merges m "
                    "WHERE customer_redirects.survivor_id = m.absorbed_id")
        con.unregister("batch_merges")
        con.executemany(
            "INSERT INTO customer_redirects VALUES (?, ?, ?, ?::JSON, ?)",
            [(a, final[a], rule, evidence, pos) for a, _, rule, evidence, pos in merges],
        )
        return set(final)

    def catch_up(self, store: Any, batch_size: int = 20000, recompute: bool = True,
                 progress: Callable[[int], None] | None = None, score: bool = True) -> int:
        """Applies everything the store has after our position, then (when recomputing and `score`)
        brings every customer's scores up to date; returns the number of notifications applied."""
        total = 0
        while True:
            notifications = store.raw_notifications(self.position, batch_size)
            if not notifications:
                break
            total += self.apply(notifications, recompute=recompute)
            if progress:
                progress(len(notifications))
        if recompute and score:
            self.refresh_metrics()
        return total

    def recompute_all(self) -> None:
        with transaction(self.con):
            for statement in recompute_customers_sql(None, self.survivorship):
                self.con.execute(statement)
        self.refresh_metrics()

    def refresh_metrics(self, con: duckdb.DuckDBPyConnection | None = None) -> bool:
        """Recomputes the time- and population-relative scores of all customers unless they were
        computed at this position for this as-of date already; True when it did. `con`: a cursor
        of the view's own (the server refreshes beside the projecting thread, see
        cdp/server/readside.py); the scores then hold for the position read there."""
        con = con or self.con
        position = view_position(con)
        if metrics.state(con) == (self.as_of, position):
            return False
        # time-relative scores move people in and out of audiences without new events
        metrics.refresh(con, self.as_of, position, then=lambda con: audiences.update_all(con, position))
        return True

    def close(self) -> None:
        self.con.close()


def refresh_view(path: Path, as_of: date) -> bool:
    """Brings the scores of an existing view up to `as_of` (and to its own position) if they are
    not; a no-op costing one read-only open otherwise. True when scores were recomputed."""
    con = connect(path, read_only=True)
    try:
        fresh = con.execute("SELECT count(*) FROM metric_state m JOIN projection_state p ON p.name = ? "
                            "WHERE m.as_of = ? AND m.position = p.position", [NAME, as_of]).fetchall()[0][0]
    except duckdb.CatalogException:
        fresh = 0
    finally:
        con.close()
    if fresh:
        return False
    projector = Projector(path, as_of)
    try:
        return projector.refresh_metrics()
    finally:
        projector.close()


def rebuild(store: Any, path: Path, batch_size: int = 50000,
            progress: Callable[[int], None] | None = None, as_of: date | None = None,
            memory_limit: str | None = None, survivorship: Mapping[str, str] | None = None,
            note: Callable[[str], None] | None = None) -> int:
    """Builds a fresh view beside the live one from the whole store, then swaps it in, so the
    live view stays queryable until the new one is complete. Audience changes and delivery
    progress are the one thing carried over from the old view (`note` hears how that went)."""
    staging = path.with_name(path.name + ".rebuild")
    erasure.discard(staging)  # an interrupted rebuild's leftovers
    started_at = store.max_position()
    projector = Projector(staging, as_of, memory_limit, survivorship)
    try:
        applied = projector.catch_up(store, batch_size=batch_size, recompute=False, progress=progress)
        projector.recompute_all()
        if path.exists():
            said = audiences.carry_delivery_history(projector.con, str(path), projector.position)
            if note is not None:
                note(said)
        projector.con.execute("CHECKPOINT")
    finally:
        projector.close()
    # Erased people's events come back without their personal fields (their keys are gone), so the
    # rows the replayed erasures deleted held none of their bytes: no rewrite is due, and the old
    # file's pending one goes with it. Unless an erasure committed while the rebuild ran: the
    # person's events may have been replayed before, with their keys, and the rows left their bytes.
    due = erasure.pending_marker(staging).exists() and erased_after(store, started_at, batch_size)
    erasure.swap_in(staging, path)  # the rebuilt file's mark, if any, becomes the view's
    if not due:
        erasure.pending_marker(path).unlink(missing_ok=True)
    return applied


def erased_after(store: Any, position: int, batch_size: int) -> bool:
    """Whether the store recorded an erasure after `position`."""
    while notifications := store.raw_notifications(position, batch_size):
        if any(topic == stored_events.ERASED for _, _, topic, _ in notifications):
            return True
        position = notifications[-1][0]
    return False
