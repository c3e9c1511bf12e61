"""A customer's cross-channel timeline for the console: newest first by the time things happened
(not by when the platform heard of them, as the API's store-ordered pages are), filtered by type
and unit, in pages keyed by (time, position) so a page never repeats or skips an event."""
from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb
import orjson

from projections.profiles import JSON_COLUMNS


def page(con: duckdb.DuckDBPyConnection, customer_id: str, unit: str | None, kind: str | None, limit: int,
         before: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """One page and the cursor of the next ('time|position' of the page's last event), or None."""
    where, params = ["customer_id = ?"], [customer_id]
    for clause, value in (("business_unit = ?", unit), ("type = ?", kind)):
        if value is not None:
            where.append(clause)
            params.append(value)
    if before:
        stamp, _, position = before.rpartition("|")
        try:
            params += [datetime.fromisoformat(stamp), int(position)]
        except ValueError:
            raise ValueError(f"not a timeline cursor: {before!r}") from None
        where.append("(time, position) < (?, ?)")
    # the customer's events first (the customer_id index), then sorted: measured 325 → 2 ms on 1M
    # customers, where DuckDB would otherwise order the whole table by time for the top N
    cursor = con.execute(f"WITH mine AS MATERIALIZED (SELECT * EXCLUDE (customer_id) FROM customer_events "
                         f"WHERE {' AND '.join(where)}) SELECT * FROM mine "
                         f"ORDER BY time DESC, position DESC LIMIT {int(limit) + 1}", params)
    columns = [d[0] for d in cursor.description]
    rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
    more = len(rows) > limit
    rows = rows[:limit]
    events = [{k: (orjson.loads(v) if k in JSON_COLUMNS else v) for k, v in r.items() if v is not None} for r in rows]
    last = rows[-1] if rows else None
    return events, (f"{last['time'].isoformat()}|{last['position']}" if more and last else None)
