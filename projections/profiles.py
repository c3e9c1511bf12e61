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

ID_TYPES = ("customer_id", "email", "phone", "anonymous_id")
IDENTIFIER_COLUMNS = ("email", "phone", "national_id", "loyalty_id")
JSON_COLUMNS = {name for name, kind in DATA_COLUMNS.items() if kind == "JSON"}
ANONYMOUS = "anonymous:"  # ingest/segment.py: an anonymous visitor's source_id


@dataclass(frozen=True)
class Found:
    customer_id: str
    merged_from: str | None = None  # the id asked for, when it was merged into customer_id


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params)
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


def knows(con: duckdb.DuckDBPyConnection, customer_id: str, unit: str | None) -> bool:
    """Whether `unit` (None: the group) has a record of this customer."""
    sql = "SELECT 1 FROM customers WHERE customer_id = ?" if unit is None else \
        "SELECT 1 FROM customer_sources WHERE customer_id = ? AND business_unit = ? LIMIT 1"
    return bool(con.execute(sql, [customer_id] if unit is None else [customer_id, unit]).fetchall())


def find(con: duckdb.DuckDBPyConnection, id_type: str, value: str, unit: str | None) -> list[Found]:
    """Customers whose `id_type` is `value` (id_type a unit name: that unit's source_id)."""
    if id_type == "customer_id":
        rows = con.execute("SELECT survivor_id FROM customer_redirects WHERE absorbed_id = ?", [value]).fetchall()
        found = [Found(rows[0][0], value)] if rows else [Found(value)]
    elif id_type in ("email", "phone"):
        found = [Found(r[0]) for r in con.execute(
            f"SELECT DISTINCT customer_id FROM customer_events WHERE {id_type} = ? ORDER BY 1", [value]).fetchall()]
    elif id_type == "anonymous_id":
        found = [Found(r[0]) for r in con.execute(
            "SELECT DISTINCT customer_id FROM customer_sources WHERE source_id = ? ORDER BY 1",
            [ANONYMOUS + value]).fetchall()]
    else:
        found = [Found(r[0]) for r in con.execute(
            "SELECT DISTINCT customer_id FROM customer_sources WHERE business_unit = ? AND source_id = ? ORDER BY 1",
            [id_type, value]).fetchall()]
    if unit is None and id_type != "customer_id":  # found in the view's rows: the customer exists
        return found
    return [f for f in found if knows(con, f.customer_id, unit)]


def profile(con: duckdb.DuckDBPyConnection, customer_id: str, unit: str | None) -> dict[str, Any]:
    """Golden record (each value with its source), identifiers, source records with the rule that
    linked them, metrics and consent; a unit sees its own source records only."""
    row = _rows(con, "SELECT * FROM customers WHERE customer_id = ?", [customer_id])[0]
    sources_of = row.get("golden_sources") or {}
    golden = {name: {"value": row[name], "source": sources_of.get(name)}
              for name in PROFILE_COLUMNS if row.get(name) is not None}
    own = "" if unit is None else "AND business_unit = ?"
    params = [customer_id] if unit is None else [customer_id, unit]
    sources = _rows(con, f"""
        SELECT business_unit, source_id, linked_by AS rule, evidence::VARCHAR AS evidence, position
        FROM customer_sources WHERE customer_id = ? {own} ORDER BY position""", params)
    union = " UNION ALL ".join(f"SELECT '{c}' AS kind, {c} AS value FROM mine" for c in IDENTIFIER_COLUMNS)
    identifiers = _rows(con, f"""
        WITH mine AS (SELECT * FROM customer_events WHERE customer_id = ? {own})
        SELECT DISTINCT kind, value FROM ({union}) WHERE value IS NOT NULL ORDER BY kind, value""", params)
    for source in sources:
        source["evidence"] = orjson.loads(source["evidence"]) if source["evidence"] else None
    identifiers += [{"kind": "anonymous_id", "value": s["source_id"][len(ANONYMOUS):]}
                    for s in sources if s["source_id"].startswith(ANONYMOUS)]
    consent = _rows(con, f"""
        SELECT purpose, arg_max(granted, position) AS granted, max(time) AS updated_at
        FROM customer_events WHERE customer_id = ? AND type = 'cdp.consent' {own}
        GROUP BY purpose ORDER BY purpose""", params)
    merges = _rows(con, "SELECT absorbed_id, rule, evidence::VARCHAR AS evidence, position FROM customer_redirects "
                        "WHERE survivor_id = ? ORDER BY position", [customer_id]) if unit is None else []
    for merge in merges:
        merge["evidence"] = orjson.loads(merge["evidence"]) if merge["evidence"] else None
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
