"""`cdp identity …` end to end, as a user runs it: ingest, explain, review, split, re-ingest, rebuild."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.events import event as cloud_event, write

ANN = {"first_name": "Ann", "last_name": "Smith", "date_of_birth": "1980-03-04",
       "address": {"street": "12 Church Road", "city": "Leeds", "postcode": "LS1 4AB"}}


def event(unit: str, source_id: str, time: str = "2025-01-01T10:00:00Z", etype: str = "cdp.identify",
          **customer) -> dict:
    """A new event (fresh id) of a source record; keyword arguments are the customer fields."""
    return cloud_event(str(uuid.uuid4()), unit, source_id, etype, time, customer)


class Cdp:
    def __init__(self, home: Path, env: dict | None = None):
        self.home = home
        self.env = {**os.environ, "CDP_HOME": str(home), **(env or {})}
        self.files = 0

    def __call__(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "cdp", *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=300)
        if check and done.returncode != 0:
            raise AssertionError(f"cdp {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    def ingest(self, *events: dict) -> None:
        self.files += 1
        path = self.home.parent / f"input-{self.home.name}-{self.files}.jsonl"
        self("ingest", str(write(path, events)))

    def query(self, sql: str) -> list[dict]:
        return json.loads(self("query", sql, "--format", "json").stdout)

    def customer_of(self, unit: str, source_id: str) -> str:
        return self.query(f"SELECT customer_id FROM customer_sources WHERE business_unit = '{unit}' "
                          f"AND source_id = '{source_id}'")[0]["customer_id"]


@pytest.fixture
def cdp(tmp_path: Path) -> Cdp:
    return Cdp(tmp_path / "home")


def test_merge_split_reingest_round_trip_and_rebuild(cdp: Cdp):
    cdp.ingest(event("retail", "R1", email="ann@example.org", **ANN),
               event("bank", "B1", "2025-01-02T10:00:00Z", email="ann@example.org", national_id="AB123456C", **ANN),
               event("bank", "B1", "2025-01-03T10:00:00Z", "cdp.purchase"))
    merged = cdp.customer_of("retail", "R1")
    assert cdp.customer_of("bank", "B1") == merged
    assert "shared_email" in cdp("identity", "explain", merged).stdout

    out = cdp("identity", "split", merged, "--source", "bank:B1", "--reason", "different people").stdout
    assert "bank:B1" in out
    moved = cdp.customer_of("bank", "B1")
    assert moved != merged and cdp.customer_of("retail", "R1") == merged
    rows = cdp.query("SELECT customer_id, sources, events, orders FROM customers ORDER BY events")
    assert [(r["customer_id"], r["sources"], r["events"], r["orders"]) for r in rows] == [
        (merged, 1, 1, 0), (moved, 1, 2, 1)]

    # the same evidence arrives again, as new events: the split holds
    cdp.ingest(event("bank", "B1", "2025-02-01T10:00:00Z", email="ann@example.org", national_id="AB123456C", **ANN),
               event("retail", "R1", "2025-02-02T10:00:00Z", email="ann@example.org", **ANN))
    assert cdp.customer_of("bank", "B1") == moved and cdp.customer_of("retail", "R1") == merged
    explained = json.loads(cdp("identity", "explain", moved, "--format", "json").stdout)
    assert [d["kind"] for d in explained["decisions"]] == ["split"]

    snapshot = "SELECT * EXCLUDE (golden_sources), golden_sources::VARCHAR AS g FROM customers ORDER BY customer_id"
    sources = "SELECT business_unit, source_id, customer_id FROM customer_sources ORDER BY ALL"
    before = (cdp.query(snapshot), cdp.query(sources))
    cdp("projections", "rebuild")
    assert (cdp.query(snapshot), cdp.query(sources)) == before


def household(cdp: Cdp, suffix: str, street: str, postcode: str, phone: str) -> None:
    """Two members of one family: same surname, address and phone; different first names."""
    address = {"street": street, "city": "York", "postcode": postcode}
    cdp.ingest(event("retail", f"R{suffix}", first_name="Ann", last_name="Baker", phone=phone, address=address),
               event("bank", f"B{suffix}", "2025-01-02T10:00:00Z", first_name="Robert", last_name="Baker",
                     phone=phone, address=address))


def test_review_queue_confirm_and_reject(cdp: Cdp):
    household(cdp, "1", "3 Mill Lane", "YO1 7HH", "07911 123123")
    household(cdp, "2", "40 High Street", "LS2 9JT", "07911 123456")
    queue = json.loads(cdp("identity", "review", "--format", "json").stdout)
    assert sorted((q["record"], q["other_record"]) for q in queue) == [("bank:B1", "retail:R1"), ("bank:B2", "retail:R2")]
    assert all(0.5 <= q["probability"] < 0.95 for q in queue)
    table = cdp("identity", "review").stdout
    assert "first_name" in table and "last_name" in table
    ids = {q["record"]: q["review_id"] for q in queue}

    assert "rejected" in cdp("identity", "review", "--reject", ids["bank:B1"]).stdout
    assert "confirmed" in cdp("identity", "review", "--confirm", ids["bank:B2"]).stdout
    assert json.loads(cdp("identity", "review", "--format", "json").stdout) == []
    assert cdp.customer_of("bank", "B2") == cdp.customer_of("retail", "R2")
    assert cdp.customer_of("bank", "B1") != cdp.customer_of("retail", "R1")
    kinds = cdp.query("SELECT kind, count(*) AS n FROM identity_decisions GROUP BY kind ORDER BY kind")
    assert kinds == [{"kind": "confirmed", "n": 1}, {"kind": "rejected", "n": 1}, {"kind": "suggested", "n": 2}]

    # honoured from then on: a third family member's record, same evidence, does not bridge the rejected pair
    address = {"street": "3 Mill Lane", "city": "York", "postcode": "YO1 7HH"}
    cdp.ingest(event("telecom", "T1", "2025-03-01T10:00:00Z", first_name="Ann", last_name="Baker",
                     phone="07911 123123", address=address),
               event("bank", "B1", "2025-03-02T10:00:00Z", first_name="Robert", last_name="Baker",
                     phone="07911 123123", address=address))
    assert cdp.customer_of("telecom", "T1") == cdp.customer_of("retail", "R1") != cdp.customer_of("bank", "B1")
    explained = json.loads(cdp("identity", "explain", cdp.customer_of("bank", "B2"), "--format", "json").stdout)
    assert "review_confirmed" in [m["rule"] for m in explained["merges"]]


def test_explain_names_the_fields_that_decided(cdp: Cdp):
    cdp.ingest(event("retail", "R1", **ANN),
               event("bank", "B1", "2025-01-02T10:00:00Z", first_name="Anne", last_name="Smiht",
                     date_of_birth="1980-04-03", address={"street": "12 Church Rd", "postcode": "LS14AB"}))
    customer = cdp.customer_of("retail", "R1")
    assert cdp.customer_of("bank", "B1") == customer
    text = cdp("identity", "explain", customer).stdout
    assert "probabilistic" in text and "date_of_birth day_month_swapped" in text
    picture = json.loads(cdp("identity", "explain", customer, "--format", "json").stdout)
    linked = {s["record"]: s for s in picture["sources"]}["bank:B1"]
    assert set(linked["evidence"]["fields"]) == {"first_name", "last_name", "date_of_birth", "address_phone"}
    assert linked["evidence"]["fields"]["date_of_birth"]["weight"] > 0


def test_guardrail_note_is_explained(cdp: Cdp):
    people = [("Ann", "Ames"), ("Bob", "Burns"), ("Cat", "Cole"), ("Dan", "Dyer")]
    cdp.env["CDP_IDENTIFIER_LIMITS"] = "email=2"
    cdp.ingest(*[event("retail", f"R{i}", f"2025-01-0{i + 1}T10:00:00Z", first_name=f, last_name=l,
                       email="test@example.com") for i, (f, l) in enumerate(people)])
    customers = {cdp.customer_of("retail", f"R{i}") for i in range(4)}
    assert len(customers) == 3
    explained = json.loads(cdp("identity", "explain", cdp.customer_of("retail", "R3"), "--format", "json").stdout)
    [note] = explained["decisions"]
    assert note["kind"] == "guardrail" and note["evidence"] == {
        "kind": "email", "value": "test@example.com", "records": 4, "limit": 2}


def test_survivorship_rules_and_sources(cdp: Cdp):
    cdp.env["CDP_SURVIVORSHIP"] = "email=trusted:bank>retail,last_name=most_frequent"
    cdp.ingest(event("bank", "B1", "2025-01-01T10:00:00Z", email="ann@bank.example", national_id="AB123456C",
                     **ANN),
               event("retail", "R1", "2025-01-02T10:00:00Z", email="ann@shop.example", national_id="AB123456C",
                     **{**ANN, "last_name": "Smith"}),
               event("retail", "R1", "2025-01-03T10:00:00Z", **{**ANN, "last_name": "Smyth"}))
    [row] = cdp.query("SELECT email, last_name, golden_sources.email AS email_from, "
                      "golden_sources.last_name AS last_from FROM customers")
    assert row == {"email": "ann@bank.example", "last_name": "Smith", "email_from": "bank:B1",
                   "last_from": "retail:R1"}


@pytest.mark.parametrize("args, env, message", [
    (["identity", "explain", "0123456789abcdef0123456789abcdef"], {}, "no customer"),
    (["identity", "split", "0123456789abcdef0123456789abcdef", "--source", "nocolon"], {}, "UNIT:SOURCE_ID"),
    (["identity", "review", "--confirm", "a", "--reject", "b"], {}, "not both"),
    (["identity", "review", "--confirm", "abc"], {}, "no review"),
    (["identity", "review"], {"CDP_MATCH_THRESHOLD": "2"}, "CDP_MATCH_THRESHOLD"),
    (["identity", "review"], {"CDP_SURVIVORSHIP": "email=oldest"}, "CDP_SURVIVORSHIP"),
])
def test_bad_arguments_print_one_line(cdp: Cdp, args, env, message):
    cdp.ingest(event("retail", "R1", **ANN))
    done = cdp(*args, check=False, env=env)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_train_estimates_and_stores_a_model_used_from_then_on(cdp: Cdp, tmp_path: Path):
    from cdp.demo import DemoSpec, generate

    demo = generate(tmp_path / "demo", DemoSpec(people=400, seed=9, hard=True))
    cdp("ingest", *map(str, demo.event_files))
    out = cdp("identity", "train", "--seed", "3").stdout
    assert "model v1 trained on" in out and "first_name" in out
    import sqlite3

    with sqlite3.connect(cdp.home / "events.sqlite") as db:
        [(version, model)] = db.execute("SELECT version, model FROM identity_model").fetchall()
    assert version == 1 and json.loads(model)["trained_on"]["seed"] == 3
    assert "the same as the latest model" in cdp("identity", "train", "--seed", "3").stdout  # nothing new learnt
    assert "model v2" in cdp("identity", "train", "--seed", "4").stdout
