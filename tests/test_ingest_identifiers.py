"""ingest/identifiers.py: the identifiers a rejected input carries, wherever they sit in it."""
from __future__ import annotations

import orjson

from ingest.identifiers import identifiers_in

REGIONS = {"telecom": "US"}


def region_for(unit: str) -> str:
    return REGIONS.get(unit, "GB")


def test_the_customer_block_of_an_invalid_event_gives_each_usable_field():
    raw = orjson.dumps({"id": "e1", "time": "2025-02-01T00:00:00Z", "data": {
        "business_unit": "retail", "amount": "lots",
        "customer": {"source_id": "R-1", "email": " Ann@Example.ORG ", "phone": "07911 123461",
                     "national_id": "ab-12 34", "loyalty_id": 17, "first_name": "Ann"}}}).decode()
    assert identifiers_in(raw, region_for) == {
        ("source", "retail:R-1"), ("email", "ann@example.org"), ("phone", "+447911123461"),
        ("national_id", "AB1234")}


def test_phones_are_read_in_the_units_region():
    raw = orjson.dumps({"data": {"business_unit": "telecom", "customer": {"phone": "(212) 555-0134"},
                                 "note": "or 212 555 0134"}}).decode()
    assert identifiers_in(raw, region_for) == {("phone", "+12125550134")}


def test_numbers_in_text_are_read_in_the_groups_other_regions_too():
    """An input of the retail unit (GB) holding numbers as written in the US, where the telecom
    unit is: read in GB alone, neither is a number; read in the group's regions too, both are
    (the customer block's as text: the whole input is read as text)."""
    raw = orjson.dumps({"data": {"business_unit": "retail", "customer": {"phone": "(212) 555-0177"},
                                 "note": "she now calls from (212) 555-0134"}}).decode()
    assert identifiers_in(raw, region_for) == set()
    assert identifiers_in(raw, region_for, {"GB", "US"}) == {("phone", "+12125550134"), ("phone", "+12125550177")}


def test_malformed_text_still_gives_its_addresses_and_numbers():
    raw = '{"broken": "write to <Ann.Other@example.co.uk>; call +44 7911 123461'
    assert identifiers_in(raw, region_for) == {("email", "ann.other@example.co.uk"), ("phone", "+447911123461")}


def test_dates_amounts_and_ids_are_not_phone_numbers():
    raw = orjson.dumps({"id": "12345678", "time": "2025-02-01T10:00:00Z", "data": {
        "business_unit": "retail", "amount": 1234567.5, "order_id": "2025-000123", "at": "me@host"}}).decode()
    assert identifiers_in(raw, region_for) == set()
    assert identifiers_in(None, region_for) == set() and identifiers_in("", region_for) == set()
