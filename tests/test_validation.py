"""Schema validation: schemas/v1 compiled by ingest.validation.EventValidator."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from ingest.validation import EventValidator

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
TYPES = {"cdp.identify", "cdp.purchase", "cdp.call", "cdp.email", "cdp.social", "cdp.feedback", "cdp.consent"}
COLLECTOR_TYPES = {"cdp.track", "cdp.page", "cdp.screen", "cdp.group", "cdp.alias"}  # the HTTP collector's (Segment)


@pytest.fixture(scope="module")
def validator() -> EventValidator:
    return EventValidator(SCHEMAS)


def envelope(etype: str, data: dict, id: str = "abc-1") -> dict:
    return {"specversion": "1.0", "id": id, "source": "retail/pos", "type": etype,
            "time": "2024-05-01T12:00:00Z", "datacontenttype": "application/json",
            "data": {"business_unit": "retail", "customer": {"source_id": "C-1"}, **data}}


VALID = {
    "cdp.identify": {"customer": {"source_id": "C-1", "email": "a@example.com", "phone": None, "first_name": "Ana",
                                  "last_name": "Silva", "date_of_birth": "1987-04-12", "national_id": "X1",
                                  "loyalty_id": None, "address": {"street": "Main 1", "line2": None, "city": "Lyon",
                                                                  "postcode": "69001", "state": None, "country": "FR"}}},
    "cdp.purchase": {"order_id": "O-1", "amount": 59.9, "currency": "EUR", "channel": "store",
                     "items": [{"sku": "A", "quantity": 2, "unit_price": 19.95}, {"sku": "B", "quantity": 1}]},
    "cdp.call": {"direction": "inbound", "duration_seconds": 312, "outcome": "resolved"},
    "cdp.email": {"campaign": "spring", "action": "opened"},
    "cdp.social": {"platform": "instagram", "action": "comment"},
    "cdp.feedback": {"kind": "nps", "score": 9, "comment": None},
    "cdp.consent": {"purpose": "marketing_email", "granted": False},
    "cdp.track": {"event_name": "Product Viewed", "properties": {"sku": "S1"}},
    "cdp.page": {"event_name": "Home", "properties": {}},
    "cdp.screen": {"event_name": "Cart"},
    "cdp.group": {"event_name": "acme", "properties": {"plan": "pro"}},
    "cdp.alias": {"properties": {"previous_id": "anon-1"}},
}


def test_types_are_the_schema_files(validator):
    assert validator.types == frozenset(TYPES | COLLECTOR_TYPES)


def test_schema_files_are_draft_2020_12_with_urn_ids():
    for path in (SCHEMAS / "v1").glob("*.json"):
        doc = json.loads(path.read_text())
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert doc["$id"] == f"urn:cdp:schema:v1:{path.stem}"
        assert "http" not in json.dumps({k: v for k, v in doc.items() if k != "$schema"}), path


@pytest.mark.parametrize("etype", sorted(VALID))
def test_valid_event_of_each_type_passes(validator, etype):
    assert validator.check(envelope(etype, VALID[etype])) is None


def test_minimal_events_and_extension_attributes_pass(validator):
    ev = envelope("cdp.identify", {})
    del ev["datacontenttype"]
    ev["traceparent"] = "00-abc"
    ev["subject"] = "C-1"
    ev["time"] = "2024-05-01T14:00:00.250+02:00"
    assert validator.check(ev) is None


def test_readme_examples_are_valid(validator):
    text = (SCHEMAS / "README.md").read_text()
    blocks = re.findall(r"```json\n(.*?)\n```", text, re.S)
    events = [json.loads(b) for b in blocks]
    assert {e["type"] for e in events} == TYPES
    for ev in events:
        assert validator.check(ev) is None, ev["type"]


def bad(etype: str, mutate) -> dict:
    ev = envelope(etype, copy.deepcopy(VALID[etype]))
    mutate(ev)
    return ev


@pytest.mark.parametrize("etype, mutate, expected", [
    ("cdp.purchase", lambda e: e["data"].pop("business_unit"),
     "event 'abc-1': data: 'business_unit' is a required property (rule: required)"),
    ("cdp.purchase", lambda e: e["data"].update(amount="x"),
     "event 'abc-1': data.amount: 'x' is not of type 'number' (rule: type)"),
    ("cdp.feedback", lambda e: e["data"].update(score=11),
     "event 'abc-1': data.score: 11 is greater than the maximum of 10 (rule: maximum)"),
    ("cdp.feedback", lambda e: e["data"].update(kind="csat", score=0),
     "event 'abc-1': data.score: 0 is less than the minimum of 1 (rule: minimum)"),
    ("cdp.identify", lambda e: e["data"]["customer"].update(shoe_size=42),
     "event 'abc-1': data.customer: Additional properties are not allowed ('shoe_size' was unexpected) "
     "(rule: additionalProperties)"),
    ("cdp.purchase", lambda e: e["data"]["items"][1].update(quantity=0),
     "event 'abc-1': data.items[1].quantity: 0 is less than the minimum of 1 (rule: minimum)"),
])
def test_rule_violations_name_id_path_and_rule(validator, etype, mutate, expected):
    assert validator.check(bad(etype, mutate)) == expected


def test_bad_time(validator):
    msg = validator.check(bad("cdp.call", lambda e: e.update(time="2024-05-01 12:00")))
    assert msg.startswith("event 'abc-1': time: '2024-05-01 12:00' is not an RFC 3339 date-time")
    assert msg.endswith("(rule: pattern)")
    for t in ("2024-05-01", "2024-05-01T12:00:00", "2024-13-01T12:00:00Z", "yesterday"):
        assert "time:" in validator.check(bad("cdp.call", lambda e: e.update(time=t))), t


@pytest.mark.parametrize("mutate, fragment", [
    (lambda e: e["data"].update(currency="eur"), "data.currency: 'eur' does not match"),
    (lambda e: e["data"].update(business_unit="Retail"), "data.business_unit: 'Retail' does not match"),
    (lambda e: e["data"]["customer"].update(date_of_birth="12/04/1987"), "data.customer.date_of_birth:"),
    (lambda e: e["data"]["customer"].update(source_id=""), "data.customer.source_id:"),
    (lambda e: e["data"]["customer"].update(address={"country": "F"}), "data.customer.address.country:"),
    (lambda e: e.update(specversion="0.3"), "specversion:"),
    (lambda e: e.update(id=""), "id:"),
    (lambda e: e.update(datacontenttype="text/plain"), "datacontenttype:"),
    (lambda e: e.update(Trace="x"), "(root): attribute name 'Trace' is not allowed"),
    (lambda e: e["data"].update(ammount=1), "('ammount' was unexpected)"),
])
def test_more_rules(validator, mutate, fragment):
    msg = validator.check(bad("cdp.purchase", mutate))
    assert msg is not None and fragment in msg, msg
    assert msg.startswith("event '") and "(rule: " in msg and "\n" not in msg


def test_unknown_type(validator):
    msg = validator.check(envelope("cdp.foo", {}))
    assert msg == ("event 'abc-1': type: unknown event type 'cdp.foo' (known: cdp.alias, cdp.call, cdp.consent, "
                   "cdp.email, cdp.feedback, cdp.group, cdp.identify, cdp.page, cdp.purchase, cdp.screen, "
                   "cdp.social, cdp.track)")


def test_not_an_object_missing_id_and_missing_type(validator):
    assert validator.check([1, 2]) == "event is not a JSON object"
    assert validator.check("x") == "event is not a JSON object"
    ev = envelope("cdp.identify", {})
    del ev["id"]
    assert validator.check(ev) == "event <no id>: (root): 'id' is a required property (rule: required)"
    ev = envelope("cdp.identify", {})
    del ev["type"]
    assert validator.check(ev) == "event 'abc-1': (root): 'type' is a required property (rule: required)"
    ev["type"] = 7
    assert validator.check(ev) == "event 'abc-1': type: 7 is not of type 'string' (rule: type)"


def test_first_error_is_deterministic(validator):
    ev = bad("cdp.purchase", lambda e: e["data"].update(amount="x", currency="eur", order_id=5))
    first = validator.check(ev)
    assert first.startswith("event 'abc-1': data.amount:")
    assert all(validator.check(copy.deepcopy(ev)) == first for _ in range(5))


def test_values_json_cannot_hold_are_reported_not_raised(validator):
    import datetime
    msg = validator.check(bad("cdp.purchase", lambda e: e["data"].update(amount=datetime.datetime.now())))
    assert msg.startswith("event 'abc-1': ")


def test_field_types(validator):
    ft = validator.field_types("cdp.purchase")
    assert ft["data.amount"] == "number"
    assert ft["data.customer.email"] == "string"
    assert ft["data.customer.address.city"] == "string"
    assert ft["data.currency"] == "string"
    assert "data.items" not in ft and "data.customer" not in ft
    assert validator.field_types("cdp.consent")["data.granted"] == "boolean"
    assert validator.field_types("cdp.feedback")["data.kind"] == "string"
    assert validator.field_types("cdp.feedback")["data.comment"] == "string"
    assert validator.field_types("cdp.call")["data.duration_seconds"] == "number"
    assert set(validator.field_types("cdp.identify")) == {"data.business_unit"} | {
        f"data.customer.{f}" for f in ("source_id", "email", "phone", "first_name", "last_name", "date_of_birth",
                                       "national_id", "loyalty_id")} | {
        f"data.customer.address.{f}" for f in ("street", "line2", "city", "postcode", "state", "country")} | {
        "data.properties.anonymous_id"}  # the collector's identify naming the visitor it stitches
    assert validator.required_fields("cdp.purchase") == {
        "data.business_unit", "data.customer.source_id", "data.order_id", "data.amount", "data.currency"}
    with pytest.raises(KeyError):
        validator.field_types("cdp.foo")


def test_refs_resolve_offline_only(tmp_path):
    folder = tmp_path / "v1"
    folder.mkdir()
    for p in (SCHEMAS / "v1").glob("*.json"):
        (folder / p.name).write_text(p.read_text())
    (folder / "cdp.social.json").write_text(
        (folder / "cdp.social.json").read_text().replace("urn:cdp:schema:v1:customer", "https://example.com/c.json"))
    with pytest.raises(Exception):
        EventValidator(tmp_path)


def test_one_compiled_validator_checks_20000_events(validator):
    """The schemas compile once and every event of every type passes (speed: bench/, not here)."""
    events = [envelope(t, copy.deepcopy(VALID[t]), id=f"e-{i}") for i in range(2858) for t in sorted(TYPES)][:20000]
    results = [validator.check(e) for e in events]
    assert results == [None] * 20000
