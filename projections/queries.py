"""Read-side questions the view answers for people: finding a customer, their full picture."""
from __future__ import annotations

import re
from typing import Any

import duckdb


_HEX_ID = re.compile(r"^[0-9a-fA-F]{32}$|^[0-9a-fA-F-]{36}$")
_SOURCE_KEY = re.compile(r"^([a-z][a-z0-9_-]{0,63}):(.+)$")


class LookupError_(ValueError):
    """The thing asked for cannot be understood or found; the message says which."""


def classify(query: str) -> tuple[str, str]:
    """('customer_id' | 'email' | 'phone' | 'source', raw value) from what a person typed."""
    text = query.strip()
    if _HEX_ID.match(text):
        return "customer_id", text.replace("-", "").lower()
    if "@" in text:
        return "email", text
    match = _SOURCE_KEY.match(text)
    if match:
        return "source", text
    if re.fullmatch(r"[+0-9()\s.-]{6,}", text):
        return "phone", text
    raise LookupError_(
        f"cannot tell what {query!r} is: give a customer id, an email, a phone number or business_unit:source_id"
    )


def survivor(con: duckdb.DuckDBPyConnection, customer_id: str) -> str:
    rows = con.execute("SELECT survivor_id FROM customer_redirects WHERE absorbed_id = ?", [customer_id]).fetchall()
    return rows[0][0] if rows else customer_id


def find_customers(con: duckdb.DuckDBPyConnection, kind: str, value: str) -> list[str]:
    if kind == "customer_id":
        ids = [survivor(con, value)]
    elif kind == "source":
        unit, _, source_id = value.partition(":")
        ids = [r[0] for r in con.execute(
            "SELECT DISTINCT customer_id FROM customer_sources WHERE business_unit = ? AND source_id = ?",
            [unit, source_id]).fetchall()]
    else:
        ids = [r[0] for r in con.execute(
            f"SELECT DISTINCT customer_id FROM customer_events WHERE {kind} = ? ORDER BY 1", [value]).fetchall()]
    present = [r[0] for r in con.execute(
        "SELECT customer_id FROM customers WHERE customer_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY 1",
        [ids]).fetchall()]
    return present


def _records(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> tuple[list[str], list[tuple]]:
    cursor = con.execute(sql, params)
    columns = [d[0] for d in cursor.description]
    return columns, cursor.fetchall()


def customer_picture(con: duckdb.DuckDBPyConnection, customer_id: str, limit: int = 20) -> dict[str, Any]:
    """Golden record, source records and the latest `limit` timeline events of one customer."""
    columns, rows = _records(con, "SELECT * FROM customers WHERE customer_id = ?", [customer_id])
    golden = dict(zip(columns, rows[0])) if rows else {}
    sources = _records(con, """
        SELECT s.business_unit, s.source_id, s.linked_by, count(e.event_id) AS events,
               min(e.time) AS first_seen, max(e.time) AS last_seen
        FROM customer_sources s LEFT JOIN customer_events e
          ON e.business_unit = s.business_unit AND e.source_id = s.source_id
        WHERE s.customer_id = ?
        GROUP BY ALL ORDER BY first_seen NULLS LAST, s.business_unit, s.source_id""", [customer_id])
    timeline = _records(con, f"""
        SELECT time, business_unit, type,
          concat_ws(' ',
            CASE WHEN type = 'cdp.purchase' THEN printf('%.2f %s order %s', amount, currency, order_id) END,
            CASE WHEN type = 'cdp.call' THEN concat_ws(' ', direction, duration_seconds::INTEGER || 's', outcome) END,
            CASE WHEN type = 'cdp.email' THEN concat_ws(' ', action, campaign) END,
            CASE WHEN type = 'cdp.social' THEN concat_ws(' ', action, 'on', platform) END,
            CASE WHEN type = 'cdp.feedback' THEN concat_ws(' ', kind, score::VARCHAR, comment) END,
            CASE WHEN type = 'cdp.consent' THEN concat_ws(' ', purpose, CASE WHEN granted THEN 'granted' ELSE 'withdrawn' END) END,
            CASE WHEN type = 'cdp.identify' THEN 'profile update' END
          ) AS detail,
          source_id, event_id
        FROM customer_events WHERE customer_id = ?
        ORDER BY time DESC, position DESC LIMIT {int(limit)}""", [customer_id])
    return {
        "customer_id": customer_id,
        "golden_record": golden,
        "sources": [dict(zip(sources[0], r)) for r in sources[1]],
        "timeline": [dict(zip(timeline[0], r)) for r in timeline[1]],
    }

