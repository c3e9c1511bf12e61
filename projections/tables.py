"""The DuckDB unified view: table definitions and the set-based SQL that derives `customers`.

`customer_events`, `customer_sources` and `customer_redirects` are facts copied from the store;
`customers` (and `customer_business_units`) are *derived* from them by one GROUP BY, for the
customers a batch touched or for all; the time- and population-relative scores on `customers` are
then recomputed for everyone by projections.metrics.refresh (a batch's customers meanwhile scored
by the last refresh's boundaries and model).
Because the derivation depends only on those facts (ties broken by store position), the view
built incrementally and the view rebuilt in one pass come out identical.
"""
from __future__ import annotations

from typing import Collection, Mapping

import duckdb

from cdp.contracts.profile import PROFILE_COLUMNS
from projections import metrics
from projections.survivorship import events_source, golden_columns, golden_sources_type
DATA_COLUMNS = {
    "amount": "DOUBLE", "currency": "VARCHAR", "order_id": "VARCHAR", "channel": "VARCHAR", "items": "JSON",
    "direction": "VARCHAR", "duration_seconds": "DOUBLE", "outcome": "VARCHAR",
    "campaign": "VARCHAR", "action": "VARCHAR", "platform": "VARCHAR",
    "score": "DOUBLE", "kind": "VARCHAR", "comment": "VARCHAR",
    "purpose": "VARCHAR", "granted": "BOOLEAN",
    "event_name": "VARCHAR", "properties": "JSON",  # cdp.track, cdp.page … (HTTP collector)
}
EVENT_COLUMNS = {
    "event_id": "VARCHAR NOT NULL",
    "event_source": "VARCHAR NOT NULL",
    "customer_id": "VARCHAR NOT NULL",
    "business_unit": "VARCHAR NOT NULL",
    "source_id": "VARCHAR NOT NULL",
    "type": "VARCHAR NOT NULL",
    "time": "TIMESTAMPTZ NOT NULL",
    "position": "BIGINT NOT NULL",
    **DATA_COLUMNS,
    **{name: ("DATE" if name == "date_of_birth" else "VARCHAR") for name in PROFILE_COLUMNS},
}


def _columns(spec: dict[str, str]) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in spec.items())


DDL = (
    "CREATE TABLE IF NOT EXISTS projection_state (name VARCHAR PRIMARY KEY, position BIGINT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS customer_events ({_columns(EVENT_COLUMNS)})",
    # a view made before a data column existed takes it on (rows are inserted BY NAME)
    *(f"ALTER TABLE customer_events ADD COLUMN IF NOT EXISTS {name} {kind}" for name, kind in DATA_COLUMNS.items()),
    "CREATE TABLE IF NOT EXISTS customer_sources (business_unit VARCHAR NOT NULL, source_id VARCHAR NOT NULL, "
    "customer_id VARCHAR NOT NULL, linked_by VARCHAR NOT NULL, evidence JSON, position BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS customer_redirects (absorbed_id VARCHAR NOT NULL, survivor_id VARCHAR NOT NULL, "
    "rule VARCHAR NOT NULL, evidence JSON, position BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS customers (customer_id VARCHAR NOT NULL, "
    + ", ".join(f"{c} {'DATE' if c == 'date_of_birth' else 'VARCHAR'}" for c in PROFILE_COLUMNS)
    + ", business_units VARCHAR[], sources INTEGER, events BIGINT, "
    f"first_seen TIMESTAMPTZ, last_seen TIMESTAMPTZ, {metrics.CUSTOMER_METRIC_COLUMNS}, "
    f"golden_sources {golden_sources_type(PROFILE_COLUMNS)})",
    *metrics.DDL,
)

# Golden record: each field by its survivorship rule (projections/survivorship.py), with its source.
CUSTOMERS_SELECT = """
SELECT e.customer_id,
  {golden},
  list_sort(list_distinct(list(e.business_unit))) AS business_units,
  {sources}::INTEGER AS sources,
  count(*) AS events,
  min(e.time) AS first_seen,
  max(e.time) AS last_seen,
  {facts}
FROM {events} e
"""


VIEW = "unified_view"  # the view's row in projection_state


def view_position(con: duckdb.DuckDBPyConnection) -> int:
    """The store position the view holds, as `con`'s transaction sees it."""
    return con.execute("SELECT position FROM projection_state WHERE name = ?", [VIEW]).fetchall()[0][0]


SCOPED_EVENTS = "scoped_events"  # a live batch's customers' events, copied out once per batch
# Made anew for each batch rather than emptied with DELETE: DuckDB keeps a temporary table's deleted
# rows in memory, and every later scan of it walks past them: the live recompute grew slower the
# longer the server ran. In process, on the 1,000,000-customer view, after 3,000 batches of 450
# events the derivation's SELECT took 12.9 -> 17.2 ms of CPU and DuckDB's memory grew by 1,135 MB
# with DELETE; made anew, 12.5 -> 12.7 ms and 701 MB (the rows the batches appended to the view).
NEW_SCOPED_EVENTS = f"CREATE OR REPLACE TEMP TABLE {SCOPED_EVENTS} AS SELECT * FROM customer_events LIMIT 0"
BATCH_EVENTS = "batch_events"  # the events of the batch (its last segment) as customer_events rows


def recompute_customers_sql(scope: str | list[str] | None, rules: Mapping[str, str],
                            fresh: Collection[str] = ()) -> list[str]:
    """Statements that re-derive `customers` and `customer_business_units`; `scope` names a table of
    touched customer_ids, or is the list of those ids, None = all; `rules` are the survivorship rules
    per field. The customers in scope are scored provisionally, by the last refresh
    (metrics.with_scores); all of them (None) by the refresh that follows. A list runs the statements
    `prepare_listed_sql` prepared on the connection.

    `fresh`: ids of the list that first appeared in this batch, every event of theirs in the
    batch's own rows (BATCH_EVENTS). They have no rows to delete and no history to look up: on
    1,000,000 customers the two deletes and the copy by id scan whole tables, ~80 ms of CPU for
    a batch of new customers whatever their number."""
    if isinstance(scope, list):
        known = [cid for cid in scope if cid not in fresh]
        new = [cid for cid in scope if cid in fresh]
        return [
            NEW_SCOPED_EVENTS,
            *([f"INSERT INTO {SCOPED_EVENTS} SELECT * FROM customer_events WHERE customer_id IN {scope_members(known)}",
               f"DELETE FROM customers WHERE customer_id IN {scope_members(known)}"] if known else []),
            *([f"INSERT INTO {SCOPED_EVENTS} BY NAME SELECT * FROM {BATCH_EVENTS}"
               + (f" WHERE customer_id IN {scope_members(new)}" if known else "")] if new else []),
            "EXECUTE recompute_listed_customers",
            *([f"DELETE FROM customer_business_units WHERE customer_id IN {scope_members(known)}"] if known else []),
            "EXECUTE recompute_listed_units",
        ]
    members = scope_members(scope) if scope is not None else ""
    where = f"WHERE customer_id IN {members}" if scope is not None else ""
    select = _customers_select(rules, events_source(rules, where), few=False)
    if scope is None:
        return ["DELETE FROM customers", f"INSERT INTO customers BY NAME {select} GROUP BY e.customer_id",
                *metrics.units_sql(None)]
    return [
        f"DELETE FROM customers WHERE customer_id IN {members}",
        f"INSERT INTO customers BY NAME "
        f"{metrics.with_scores(f'{select} WHERE e.customer_id IN {members} GROUP BY e.customer_id')}",
        *metrics.units_sql(members),
    ]


def prepare_listed_sql(rules: Mapping[str, str]) -> list[str]:
    """Run once per connection: the table a live batch copies its customers' events into, and the
    two statements that derive their rows from it, prepared. A live batch touches a few customers,
    so planning the ~50 aggregates and scanning the view twice were most of its cost (measured on
    a loaded machine: 192 → 145 ms for 50 customers of 300,000)."""
    select = _customers_select(rules, events_source(rules, table=SCOPED_EVENTS), few=True)
    return [
        NEW_SCOPED_EVENTS,
        "PREPARE recompute_listed_customers AS INSERT INTO customers BY NAME "
        f"{metrics.with_scores(f'{select} GROUP BY e.customer_id')}",
        f"PREPARE recompute_listed_units AS INSERT INTO customer_business_units "
        f"{metrics.units_select(SCOPED_EVENTS)} GROUP BY ALL",
    ]


def _customers_select(rules: Mapping[str, str], events: str, few: bool) -> str:
    return CUSTOMERS_SELECT.format(golden=golden_columns(PROFILE_COLUMNS, rules),
                                   facts=metrics.FACTS_SELECT_FEW if few else metrics.FACTS_SELECT,
                                   sources=metrics.count_distinct("(e.business_unit, e.source_id)", few=few),
                                   events=events)


def scope_members(scope: str | list[str]) -> str:
    """The customers in scope as the right side of `IN`: a table's ids, or a constant list of ids.
    DuckDB pushes a constant list into the scan of customer_events and reads the wide columns of
    the matching rows only, where a subquery joins every row (measured 635 → 222 ms for 10 touched
    customers of 300,000); the list must not be empty."""
    if isinstance(scope, str):
        return f"(SELECT customer_id FROM {scope})"
    return "(" + ", ".join("'" + cid.replace("'", "''") + "'" for cid in scope) + ")"
