"""Right of access and portability: everything the view holds about one person, as JSON and CSV
a person can read (golden record with scores, source records, every event, identity decisions,
consents with when and where they were given).

Every section is one query; CSVs are written by DuckDB (`COPY … TO`), the JSON file holds the same
sections together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import orjson

# section -> query of the customer's rows ($id: the customer id)
SECTIONS = {
    "golden_record": "SELECT * FROM customers WHERE customer_id = $id",
    "source_records": "SELECT business_unit, source_id, linked_by, evidence FROM customer_sources "
                      "WHERE customer_id = $id ORDER BY position",
    "events": "SELECT * EXCLUDE (position) FROM customer_events WHERE customer_id = $id ORDER BY time, position",
    "identity_decisions": "SELECT * EXCLUDE (position) FROM identity_decisions WHERE customer_id = $id "
                          "OR (other_business_unit, other_source_id) IN (SELECT (business_unit, source_id) "
                          "FROM customer_sources WHERE customer_id = $id) ORDER BY position",
    "merged_customers": "SELECT absorbed_id, rule, evidence FROM customer_redirects WHERE survivor_id = $id "
                        "ORDER BY position",
    "consents": "SELECT purpose, arg_max(granted, (time, position)) AS granted, max(time) AS time, "
                "arg_max(business_unit, (time, position)) AS business_unit, "
                "arg_max(event_source, (time, position)) AS source, "
                "arg_max(event_id, (time, position)) AS event_id "
                "FROM customer_events WHERE customer_id = $id AND type = 'cdp.consent' GROUP BY purpose ORDER BY purpose",
}


def _plain(value: Any) -> Any:
    """JSON for what orjson does not know (dates are ISO text, decimals numbers)."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def export_customer(con: duckdb.DuckDBPyConnection, customer_id: str, directory: Path) -> list[Path]:
    """Writes `customer.json` and one CSV per section into `directory`; returns the files."""
    directory.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"customer_id": customer_id}
    written = []
    for name, sql in SECTIONS.items():
        cursor = con.execute(sql, {"id": customer_id})
        columns = [d[0] for d in cursor.description]
        rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
        document[name] = rows[0] if name == "golden_record" and rows else rows
        path = directory / f"{name}.csv"
        con.execute(f"COPY ({sql}) TO '{path}' (HEADER, DELIMITER ',')", {"id": customer_id})
        written.append(path)
    path = directory / "customer.json"
    path.write_bytes(orjson.dumps(document, default=_plain, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return [path, *written]
