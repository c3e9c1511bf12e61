"""The profile API's questions: one customer by any of its ids, as a CRM wants it, optionally seen
through one business unit's eyes (only customers the unit knows; of them, the golden record and the
unit's own records and events)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import orjson

from projections.metrics import FACT_COLUMNS, SCORE_COLUMNS
from projections.tables import DATA_COLUMNS, PROFILE_COLUMNS
from projections.transactions import transaction

ID_TYPES = ("customer_id", "email", "phone", "anonymous_id")
IDENTIFIER_COLUMNS = ("email", "phone", "national_id", "loyalty_id")
JSON_COLUMNS = {name for name, kind in DATA_COLUMNS.items() if kind == "JSON"}
ANONYMOUS = "anonymous:"  # ingest/segment.py: an anonymous visitor's source_id


@dataclass(frozen=True)
class Found:
    customer_id: str
    merged_from: str | None = None  # the id asked for, when it was merged into customer_id


_PARSED: dict[str, duckdb.Statement] = {}


def parsed(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.Statement:
    """A look-up statement parsed once (by the calling thread's own connection, the first time):
    DuckDB parses a string on every execute, and on these point reads that was a fifth of the work
    (1,000,000 customers, in process, p50: the customer's row 1.23 → 1.12 ms, the parts' union
    1.70 → 1.30, find by e-mail 0.49 → 0.38). Each execute binds and plans its own copy of it."""
    statement = _PARSED.get(sql)
    if statement is None:
        statement = _PARSED[sql] = con.extract_statements(sql)[0]
    return statement


def _rows(con: duckdb.DuckDBPyConnection, sql: str | duckdb.Statement, params: Any) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params)
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


def knows(con: duckdb.DuckDBPyConnection, customer_id: str, unit: str | None) -> bool:
    """Whether `unit` (None: the group) has a record of this customer."""
    sql = "SELECT 1 FROM customers WHERE customer_id = ?" if unit is None else \
        "SELECT 1 FROM customer_sources WHERE customer_id = ? AND business_unit = ? LIMIT 1"
    return bool(con.execute(parsed(con, sql), [customer_id] if unit is None else [customer_id, unit]).fetchall())


def _distinct(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[Found]:
    """The customers a point read names, each once, in id order. The read is a plain equality filter
    on an indexed column (no DISTINCT, aggregate or subquery), which DuckDB answers on the calling
    thread through the ART index; those others hand work to DuckDB's worker threads, which the
    projector keeps busy while ingest runs: measured on 1,000,000 customers, that wait, not the
    reading, made the look-up's p99. Customers repeat across a person's events: deduplicated here."""
    return [Found(c) for c in sorted({row[0] for row in con.execute(parsed(con, sql), params).fetchall()})]


def find(con: duckdb.DuckDBPyConnection, id_type: str, value: str, unit: str | None) -> list[Found]:
    """Customers whose `id_type` is `value` (id_type a unit name: that unit's source_id)."""
    if id_type == "customer_id":
        sql = "SELECT survivor_id FROM customer_redirects WHERE absorbed_id = ?"
        rows = con.execute(parsed(con, sql), [value]).fetchall()
        found = [Found(rows[0][0], value)] if rows else [Found(value)]
    elif id_type in ("email", "phone"):
        found = _distinct(con, f"SELECT customer_id FROM customer_events WHERE {id_type} = ?", [value])
    elif id_type == "anonymous_id":
        found = _distinct(con, "SELECT customer_id FROM customer_sources WHERE source_id = ?", [ANONYMOUS + value])
    else:
        found = _distinct(con, "SELECT customer_id FROM customer_sources WHERE business_unit = ? AND source_id = ?",
                          [id_type, value])
    if unit is None and id_type != "customer_id":  # found in the view's rows: the customer exists
        return found
    return [f for f in found if knows(con, f.customer_id, unit)]


def _parts_sql(unit_scoped: bool) -> str:
    """The profile's lists in one statement of point reads, told apart by `part`: its source
    records, the events that carry an identifier or a consent, and (group-wide) the merges it
    absorbed. Rows come back in no order; `profile` orders them by store position. (The customer's
    row joined in as one more part made the look-up slower, not faster: 51 columns padded onto
    every row; measured in process on 1,000,000 customers, interleaved, p50 3.8 → 4.2 ms.)"""
    own = "AND business_unit = $unit" if unit_scoped else ""
    carried = " OR ".join(f"{c} IS NOT NULL" for c in IDENTIFIER_COLUMNS)
    merges = "" if unit_scoped else """
    UNION ALL BY NAME
    SELECT 'merge' AS part, absorbed_id, rule, evidence::VARCHAR AS evidence, position
    FROM customer_redirects WHERE survivor_id = $id"""
    return f"""
    SELECT 'source' AS part, business_unit, source_id, linked_by AS rule, evidence::VARCHAR AS evidence, position
    FROM customer_sources WHERE customer_id = $id {own}
    UNION ALL BY NAME
    SELECT 'event' AS part, {", ".join(IDENTIFIER_COLUMNS)}, type, purpose, granted, time, position
    FROM customer_events WHERE customer_id = $id {own} AND (type = 'cdp.consent' OR {carried}){merges}"""


def _consent(changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per purpose, the latest answer given and when the purpose last changed (`changes` in store
    order): arg_max(granted, position) and max(time) by purpose, on the few rows of one customer."""
    latest: dict[Any, dict[str, Any]] = {}
    for change in changes:
        now = latest.setdefault(change["purpose"], {"purpose": change["purpose"], "granted": None,
                                                    "updated_at": change["time"]})
        if change["granted"] is not None:
            now["granted"] = change["granted"]
        now["updated_at"] = max(now["updated_at"], change["time"])
    return [{"purpose": p["purpose"], "granted": p["granted"], "updated_at": p["updated_at"]}
            for p in sorted(latest.values(), key=lambda p: (p["purpose"] is None, p["purpose"]))]


PARTS_SQL = {scoped: _parts_sql(scoped) for scoped in (False, True)}
SOURCE_FIELDS = ("business_unit", "source_id", "rule", "evidence", "position")
MERGE_FIELDS = ("absorbed_id", "rule", "evidence", "position")


def _profile_rows(con: duckdb.DuckDBPyConnection, customer_id: str, unit: str | None
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The customer's row ({} when unknown) and the parts' rows in store order, read in one
    transaction so that both see the same batch."""
    params = {"id": customer_id} if unit is None else {"id": customer_id, "unit": unit}
    with transaction(con):
        rows = _rows(con, parsed(con, "SELECT * FROM customers WHERE customer_id = ?"), [customer_id])
        parts = _rows(con, parsed(con, PARTS_SQL[unit is not None]), params)
    return (rows[0] if rows else {}), sorted(parts, key=lambda r: r["position"])


def _identifiers(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each identifier the customer's events carried, once, ordered by kind then value."""
    seen = {(c, e[c]) for e in events for c in IDENTIFIER_COLUMNS if e.get(c) is not None}
    return [{"kind": kind, "value": value} for kind, value in sorted(seen)]


def profile(con: duckdb.DuckDBPyConnection, customer_id: str, unit: str | None) -> dict[str, Any]:
    """Golden record (each value with its source), identifiers, source records with the rule that
    linked them, metrics and consent; a unit sees its own source records only."""
    row, parts = _profile_rows(con, customer_id, unit)

    def part(name: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{f: r[f] for f in fields} for r in parts if r["part"] == name]

    events = [r for r in parts if r["part"] == "event"]
    sources, merges = part("source", SOURCE_FIELDS), part("merge", MERGE_FIELDS)
    consent = _consent([e for e in events if e["type"] == "cdp.consent"])
    sources_of = row.get("golden_sources") or {}
    golden = {name: {"value": row[name], "source": sources_of.get(name)}
              for name in PROFILE_COLUMNS if row.get(name) is not None}
    for item in (*sources, *merges):
        item["evidence"] = orjson.loads(item["evidence"]) if item["evidence"] else None
    identifiers = _identifiers(events) + [{"kind": "anonymous_id", "value": s["source_id"][len(ANONYMOUS):]}
                                          for s in sources if s["source_id"].startswith(ANONYMOUS)]
    return {
        "customer_id": customer_id,
        "golden_record": golden,
        "identifiers": identifiers,
        "sources": sources,
        "merges": merges,
        "metrics": {name: row.get(name) for name in ("events", "first_seen", "last_seen", "business_units",
                                                      *FACT_COLUMNS, *SCORE_COLUMNS)},
        "consent": consent,
    }


def events(con: duckdb.DuckDBPyConnection, customer_id: str, unit: str | None, kind: str | None,
           limit: int, cursor: int | None) -> tuple[list[dict[str, Any]], int | None]:
    """One page of the timeline, newest first; the cursor is the last row's store position."""
    where, params = ["customer_id = ?"], [customer_id]
    for clause, value in (("business_unit = ?", unit), ("type = ?", kind), ("position < ?", cursor)):
        if value is not None:
            where.append(clause)
            params.append(value)
    rows = _rows(con, f"SELECT * EXCLUDE (customer_id) FROM customer_events WHERE {' AND '.join(where)} "
                      f"ORDER BY position DESC LIMIT {int(limit) + 1}", params)
    more = len(rows) > limit
    rows = rows[:limit]
    page = [{k: (orjson.loads(v) if k in JSON_COLUMNS else v) for k, v in r.items() if v is not None} for r in rows]
    return page, (rows[-1]["position"] if more else None)
