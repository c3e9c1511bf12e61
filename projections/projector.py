"""Exactly-once projection of the event store into the DuckDB view.

The projector reads the store's notification log after the position it has reached, turns a batch
of notifications into Arrow tables, applies them with set-based SQL and records the new position
in the same DuckDB transaction: a crash before the commit leaves the old position and none of the
rows, so a restart neither loses nor double-counts an event.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import duckdb
import orjson
import pyarrow as pa
from eventsourcing.utils import get_topic

from cdp.domain import Customer
from projections.tables import DATA_COLUMNS, DDL, EVENT_COLUMNS, PROFILE_COLUMNS, recompute_customers_sql

NAME = "unified_view"
TOPIC_EVENT = get_topic(Customer.EventRecorded)
TOPIC_REGISTERED = get_topic(Customer.Registered)
TOPIC_LINKED = get_topic(Customer.SourceLinked)
TOPIC_MERGED = get_topic(Customer.Merged)

_EVENT_SELECT = ", ".join(
    f"{name}::TIMESTAMPTZ AS {name}" if name == "time"
    else f"{name}::DATE AS {name}" if name == "date_of_birth"
    else f"{name}::JSON AS {name}" if name == "items"
    else name
    for name in EVENT_COLUMNS
)


def connect(path: Path | str, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(path), read_only=read_only)
    con.execute("SET TimeZone = 'UTC'")
    return con


class BatchRows:
    """Columns of one batch, filled event by event, handed to DuckDB as Arrow tables."""

    def __init__(self) -> None:
        self.events: dict[str, list[Any]] = {name: [] for name in EVENT_COLUMNS}
        self.sources: dict[str, list[Any]] = {
            k: [] for k in ("business_unit", "source_id", "customer_id", "linked_by", "evidence", "position")
        }
        self.merges: list[tuple[str, str, str, str, int]] = []  # (absorbed, survivor, rule, evidence, position)
        self.touched: set[str] = set()

    def add(self, position: int, topic: str, customer_id: str, state: dict[str, Any]) -> None:
        if topic == TOPIC_EVENT:
            self._add_event(position, customer_id, state)
        elif topic == TOPIC_REGISTERED:
            self._add_source(position, customer_id, state["business_unit"], state["source_id"], "new_customer", None)
        elif topic == TOPIC_LINKED:
            self._add_source(position, customer_id, state["business_unit"], state["source_id"],
                             state["rule"], state["evidence"])
        elif topic == TOPIC_MERGED:
            self.merges.append((state["absorbed_id"], customer_id, state["rule"],
                                orjson.dumps(state["evidence"]).decode(), position))
            self.touched.add(customer_id)
        # Absorbed is the mirror of Merged on the other customer: nothing more to project.

    def _add_source(self, position, customer_id, unit, source_id, rule, evidence) -> None:
        s = self.sources
        s["business_unit"].append(unit)
        s["source_id"].append(source_id)
        s["customer_id"].append(customer_id)
        s["linked_by"].append(rule)
        s["evidence"].append(None if evidence is None else orjson.dumps(evidence).decode())
        s["position"].append(position)
        self.touched.add(customer_id)

    def _add_event(self, position: int, customer_id: str, state: dict[str, Any]) -> None:
        e = self.events
        e["event_id"].append(state["event_id"])
        e["event_source"].append(state["event_source"])
        e["customer_id"].append(customer_id)
        e["business_unit"].append(state["business_unit"])
        e["source_id"].append(state["source_id"])
        e["type"].append(state["event_type"])
        e["time"].append(state["time"])
        e["position"].append(position)
        data = state["data"]
        for name in DATA_COLUMNS:
            value = data.get(name)
            if name == "items" and value is not None:
                value = orjson.dumps(value).decode()
            elif name in ("amount", "duration_seconds", "score") and value is not None:
                value = float(value)
            e[name].append(value)
        profile = state["profile"]
        for name in PROFILE_COLUMNS:
            e[name].append(profile.get(name))
        self.touched.add(customer_id)

    def merge_map(self) -> list[tuple[str, str]]:
        """(absorbed, final survivor) with chains inside the batch resolved."""
        direct = {absorbed: survivor for absorbed, survivor, *_ in self.merges}

        def final(cid: str) -> str:
            while cid in direct:
                cid = direct[cid]
            return cid

        return [(absorbed, final(absorbed)) for absorbed in direct]


class Projector:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = connect(self.path)
        for statement in DDL:
            self.con.execute(statement)
        self.con.execute("INSERT INTO projection_state SELECT ?, 0 WHERE NOT EXISTS "
                         "(SELECT 1 FROM projection_state WHERE name = ?)", [NAME, NAME])

    @property
    def position(self) -> int:
        return self.con.execute("SELECT position FROM projection_state WHERE name = ?", [NAME]).fetchall()[0][0]

    def apply(self, notifications: Iterable[Any], decode: Callable[[Any], dict[str, Any]],
              recompute: bool = True) -> int:
        """Projects one batch of notifications; returns how many were applied."""
        rows = BatchRows()
        last = None
        count = 0
        for n in notifications:
            rows.add(n.id, n.topic, n.originator_id.hex, decode(n))
            last = n.id
            count += 1
        if last is None:
            return 0
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            if rows.events["event_id"]:
                con.register("batch_events", pa.table(rows.events))
                con.execute(f"INSERT INTO customer_events BY NAME SELECT {_EVENT_SELECT} FROM batch_events")
                con.unregister("batch_events")
            if rows.sources["source_id"]:
                con.register("batch_sources", pa.table(rows.sources))
                con.execute("INSERT INTO customer_sources BY NAME SELECT business_unit, source_id, customer_id, "
                            "linked_by, evidence::JSON AS evidence, position FROM batch_sources")
                con.unregister("batch_sources")
            absorbed = self._apply_merges(rows)
            if recompute:
                touched = pa.table({"customer_id": sorted(rows.touched | absorbed)})
                con.register("touched", touched)
                for statement in recompute_customers_sql("touched"):
                    con.execute(statement)
                con.unregister("touched")
            con.execute("UPDATE projection_state SET position = ? WHERE name = ?", [last, NAME])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return count

    def _apply_merges(self, rows: BatchRows) -> set[str]:
        if not rows.merges:
            return set()
        con = self.con
        mapping = rows.merge_map()
        con.register("batch_merges", pa.table({
            "absorbed_id": [a for a, _ in mapping], "survivor_id": [s for _, s in mapping]}))
        for table in ("customer_events", "customer_sources"):
            con.execute(f"UPDATE {table} SET customer_id = m.survivor_id FROM batch_merges m "
                        f"WHERE {table}.customer_id = m.absorbed_id")
        con.execute("UPDATE customer_redirects SET survivor_id = m.survivor_id FROM batch_merges m "
                    "WHERE customer_redirects.survivor_id = m.absorbed_id")
        con.unregister("batch_merges")
        final = dict(mapping)
        con.executemany(
            "INSERT INTO customer_redirects VALUES (?, ?, ?, ?::JSON, ?)",
            [(a, final.get(s, s), rule, evidence, pos) for a, s, rule, evidence, pos in rows.merges],
        )
        return set(final)

    def catch_up(self, store: Any, batch_size: int = 20000, recompute: bool = True,
                 progress: Callable[[int], None] | None = None) -> int:
        """Applies everything the store has after our position; returns the number applied."""
        total = 0
        while True:
            notifications = store.notifications(self.position, batch_size)
            if not notifications:
                break
            total += self.apply(notifications, store.decode, recompute=recompute)
            if progress:
                progress(len(notifications))
        return total

    def recompute_all(self) -> None:
        self.con.execute("BEGIN TRANSACTION")
        for statement in recompute_customers_sql(None):
            self.con.execute(statement)
        self.con.execute("COMMIT")

    def close(self) -> None:
        self.con.close()


def rebuild(store: Any, path: Path, batch_size: int = 50000,
            progress: Callable[[int], None] | None = None) -> int:
    """Builds a fresh view beside the live one from the whole store, then swaps it in, so the
    live view stays queryable until the new one is complete."""
    staging = path.with_name(path.name + ".rebuild")
    for leftover in (staging, Path(str(staging) + ".wal")):
        leftover.unlink(missing_ok=True)
    projector = Projector(staging)
    try:
        applied = projector.catch_up(store, batch_size=batch_size, recompute=False, progress=progress)
        projector.recompute_all()
        projector.con.execute("CHECKPOINT")
    finally:
        projector.close()
    os.replace(staging, path)
    Path(str(path) + ".wal").unlink(missing_ok=True)
    return applied
