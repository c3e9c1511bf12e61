"""The identifiers an input carries wherever they sit in it, for an input that was rejected.

A valid event's identifiers come from its validated customer block (normalise.customer). A rejected
one may be malformed anywhere, yet still carry an erased person's e-mail or phone: this finds them
in the customer block when there is one and, in any case, in the text itself, normalised the same
way, so the caller can tell whether the input is an erased person's (cdp/application.py) before the
dead-letter keeps it.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import orjson

from ingest import normalise

# addresses and numbers as they appear in running text or JSON strings; each is then normalised
# (normalise.email, normalise.linking_phone), which decides what counts
EMAIL_IN_TEXT = re.compile(r"[^\s@\"'<>(),;:\\\[\]{}]+@[^\s@\"'<>(),;:\\\[\]{}]+\.[^\s@\"'<>(),;:\\\[\]{}]+")
PHONE_IN_TEXT = re.compile(r"\+?\d[\d ()./-]{5,}\d")
ID_FIELDS = ("national_id", "loyalty_id")


def identifiers_in(raw: str | None, region_for: Callable[[str], str],
                   other_regions: Iterable[str] = ()) -> set[tuple[str, str]]:
    """(kind, normalised value) pairs for every identifier in `raw`: the source record, e-mail,
    phone and national and loyalty ids of its customer block when it parses, and every e-mail and
    linking phone number anywhere in its text (phones read in `region_for` the unit the input
    names, or of no unit: the default region; those in the text in `other_regions` too, the
    group's other units': a note may quote a customer's number as written where they live)."""
    if not raw:
        return set()
    found: set[tuple[str, str]] = set()
    unit = None
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        event = None
    data = event.get("data") if isinstance(event, dict) else None
    if isinstance(data, dict) and isinstance(data.get("business_unit"), str):
        unit = data["business_unit"]
    region = region_for(unit or "")
    if isinstance(data, dict) and isinstance(data.get("customer"), dict):
        found |= _customer_block(data["customer"], unit, region)
    found |= {("email", value) for value in map(normalise.email, EMAIL_IN_TEXT.findall(raw)) if value}
    regions = {region, *other_regions}
    found |= {("phone", value) for value in (normalise.linking_phone(m, r) for m in PHONE_IN_TEXT.findall(raw)
                                             for r in regions) if value}
    return found


def _customer_block(customer: dict[str, Any], unit: str | None, region: str) -> set[tuple[str, str]]:
    """The identifiers of a customer block that failed validation: each field on its own."""
    found: set[tuple[str, str]] = set()
    source_id = customer.get("source_id")
    if unit and isinstance(source_id, str) and source_id:
        found.add(("source", f"{unit}:{source_id}"))
    for kind, normal in (("email", normalise.email), ("phone", lambda v: normalise.linking_phone(v, region)),
                         *((field, normalise.compact_id) for field in ID_FIELDS)):
        value = customer.get(kind)
        if isinstance(value, str) and value:
            normalised = normal(value)
            if normalised:
                found.add((kind, normalised))
    return found
