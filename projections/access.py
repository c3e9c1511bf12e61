"""Right of access and portability: everything the view holds about one person, as JSON and CSV
a person can read (golden record with scores, source records, every event, identity decisions,
consents with when and where they were given); the callers add what the view does not hold (their
rejected inputs, from the dead-letter).

Every section is one query. A business unit's key sees what the profile API shows it: the golden
record, and of the rest only its own unit's rows (no merges of other units' customers). The same
document is written as files by `cdp customer export` and answered by
`GET /v1/profiles/{id}/export` (JSON, or a zip of the JSON and one CSV per section).
"""
from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path
from typing import Any

import orjson

# section -> query of the customer's rows ($id: the customer id; $unit: NULL for the group, else
# the unit whose rows alone are shown)
OWN_UNIT = "($unit IS NULL OR business_unit = $unit)"
SECTIONS = {
    "golden_record": "SELECT * FROM customers WHERE customer_id = $id",
    "source_records": "SELECT business_unit, source_id, linked_by, evidence FROM customer_sources "
                      f"WHERE customer_id = $id AND {OWN_UNIT} ORDER BY position",
    "events": "SELECT * EXCLUDE (position) FROM customer_events "
              f"WHERE customer_id = $id AND {OWN_UNIT} ORDER BY time, position",
    "identity_decisions": "SELECT * EXCLUDE (position) FROM identity_decisions WHERE (customer_id = $id "
                          "OR (other_business_unit, other_source_id) IN (SELECT (business_unit, source_id) "
                          f"FROM customer_sources WHERE customer_id = $id)) AND {OWN_UNIT} ORDER BY position",
    "merged_customers": "SELECT absorbed_id, rule, evidence FROM customer_redirects WHERE survivor_id = $id "
                        "AND $unit IS NULL ORDER BY position",
    "consents": "SELECT purpose, arg_max(granted, (time, position)) AS granted, max(time) AS time, "
                "arg_max(business_unit, (time, position)) AS business_unit, "
                "arg_max(event_source, (time, position)) AS source, "
                "arg_max(event_id, (time, position)) AS event_id "
                f"FROM customer_events WHERE customer_id = $id AND type = 'cdp.consent' AND {OWN_UNIT} "
                "GROUP BY purpose ORDER BY purpose",
}
JSON_NAME = "customer.json"


def _plain(value: Any) -> Any:
    """JSON for what orjson does not know (dates are ISO text, decimals numbers)."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def sections(con: Any, customer_id: str, unit: str | None = None) -> dict[str, tuple[list[str], list[tuple]]]:
    """Each section's columns and rows; `con` is the view (or the CLI's stand-in for a server's)."""
    found = {}
    for name, sql in SECTIONS.items():
        cursor = con.execute(sql, {k: v for k, v in (("id", customer_id), ("unit", unit)) if f"${k}" in sql})
        columns = [d[0] for d in cursor.description]
        found[name] = (columns, cursor.fetchall())
    return found


def document(customer_id: str | None, parts: dict[str, tuple[list[str], list[tuple]]]) -> dict[str, Any]:
    """The sections as one JSON-ready document (the golden record one object, the rest lists)."""
    body: dict[str, Any] = {"customer_id": customer_id}
    for name, (columns, rows) in parts.items():
        records = [dict(zip(columns, row)) for row in rows]
        body[name] = (records[0] if records else None) if name == "golden_record" else records
    return body


def to_json(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, default=_plain, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return orjson.dumps(value, default=_plain).decode()
    return _plain(value) if hasattr(value, "isoformat") else value


def to_csv(columns: list[str], rows: list[tuple]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows([_cell(v) for v in row] for row in rows)
    return out.getvalue().encode()


def files(customer_id: str | None, parts: dict[str, tuple[list[str], list[tuple]]]) -> dict[str, bytes]:
    """File name → content: the JSON document and one CSV per section."""
    return {JSON_NAME: to_json(document(customer_id, parts)),
            **{f"{name}.csv": to_csv(*part) for name, part in parts.items()}}


def to_zip(contents: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return out.getvalue()


def export_customer(con: Any, customer_id: str, directory: Path, unit: str | None = None,
                    more: dict[str, tuple[list[str], list[tuple]]] | None = None) -> list[Path]:
    """Writes `customer.json` and one CSV per section into `directory`; returns the files. `more`:
    sections from outside the view (the caller's: the person's rejected inputs)."""
    return write_files(directory, files(customer_id, {**sections(con, customer_id, unit), **(more or {})}))


def write_files(directory: Path, contents: dict[str, bytes]) -> list[Path]:
    """Writes the export's files (`files`) into `directory`; returns them."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in contents.items():
        path = directory / name
        path.write_bytes(data)
        written.append(path)
    return written
