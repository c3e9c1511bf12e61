"""What a person typed in the search box, recognised and normalised the way ingest normalises
identifiers, then found in the view: an e-mail, a phone number (any format ingest accepts), a
customer id, `unit:source_id`, or else a name (typo-tolerant, projections/search.py)."""
from __future__ import annotations

import re
from typing import Any, Sequence

import duckdb

from ingest.normalise import email as normal_email, phone as normal_phone
from projections import profiles, search

CUSTOMER_ID = re.compile(r"^[0-9a-f]{32}$")
SOURCE_REF = re.compile(r"^([a-z][a-z0-9_-]{0,63}):(\S+)$")
DIGITS = re.compile(r"\d")
PHONE_DIGITS = 6  # fewer digits than this is not taken for a phone number


def recognise(q: str, regions: Sequence[str]) -> tuple[str, list[str]]:
    """(kind, normalised values): kind is email, phone, customer_id, a business unit, or name. A
    phone number is read as ingest reads one (phonenumbers: spaces, dots, dashes, brackets, 00 or
    +, `tel:` URIs, vanity letters, extensions) in each region a unit's numbers may be written in
    (CDP_DEFAULT_PHONE_REGION, CDP_PHONE_REGIONS), so one typed nationally is found whatever unit
    recorded it."""
    text = q.strip()
    if "@" in text:
        return "email", [normal_email(text) or text.lower()]
    if CUSTOMER_ID.match(text.replace("-", "").lower()):
        return "customer_id", [text.replace("-", "").lower()]
    match = SOURCE_REF.match(text)
    if match and match[1] != "tel":
        return match[1], [match[2]]
    if len(DIGITS.findall(text)) >= PHONE_DIGITS:
        numbers = sorted({n for region in regions if (n := normal_phone(text, region))})
        if numbers:
            return "phone", numbers
    return "name", [text]


def find(con: duckdb.DuckDBPyConnection, q: str, unit: str | None, regions: Sequence[str],
         limit: int = 20) -> tuple[str, list[dict[str, Any]]]:
    """(what q was taken for, matching customers as search rows); a unit sees the customers it knows."""
    kind, values = recognise(q, regions)
    if kind == "name":
        return kind, search.by_name(con, values[0], unit, limit)
    found = {f.customer_id for value in values for f in profiles.find(con, kind, value, unit)}
    return kind, search.by_ids(con, sorted(found)[:limit])
