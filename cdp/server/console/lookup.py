"""What a person typed in the search box, recognised and normalised the way ingest normalises
identifiers, then found in the view: an e-mail, a phone number (any format ingest accepts), a
customer id, `unit:source_id`, or else a name (typo-tolerant, projections/search.py)."""
from __future__ import annotations

import re
from typing import Any

import duckdb

from ingest.normalise import email as normal_email, phone as normal_phone
from projections import profiles, search

CUSTOMER_ID = re.compile(r"^[0-9a-f]{32}$")
SOURCE_REF = re.compile(r"^([a-z][a-z0-9_-]{0,63}):(\S+)$")
PHONE_LIKE = re.compile(r"^\+?[\d\s().\-/]{6,}$")


def recognise(q: str, region: str) -> tuple[str, str]:
    """(kind, normalised value): kind is email, phone, customer_id, a business unit, or name."""
    text = q.strip()
    if "@" in text:
        return "email", normal_email(text) or text.lower()
    if CUSTOMER_ID.match(text.replace("-", "").lower()):
        return "customer_id", text.replace("-", "").lower()
    if match := SOURCE_REF.match(text):
        return match[1], match[2]
    if PHONE_LIKE.match(text) and (number := normal_phone(text, region)):
        return "phone", number
    return "name", text


def find(con: duckdb.DuckDBPyConnection, q: str, unit: str | None, region: str,
         limit: int = 20) -> tuple[str, list[dict[str, Any]]]:
    """(what q was taken for, matching customers as search rows); a unit sees the customers it knows."""
    kind, value = recognise(q, region)
    if kind == "name":
        return kind, search.by_name(con, value, unit, limit)
    found = profiles.find(con, kind, value, unit)
    return kind, search.by_ids(con, sorted({f.customer_id for f in found})[:limit])
