"""Customer metrics against a small hand-computed dataset, ingested by `cdp ingest` as a subprocess
with a fixed CDP_AS_OF. Every expected value below is worked out by hand in the comments from the
definitions in docs/metrics.md."""
from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import duckdb
import pytest

from tests.events import event, write

AS_OF = "2026-06-30"
_ids = itertools.count(1)
SOURCES = {"retail": "retail/pos", "bank": "bank/core", "telecom": "telecom/crm"}


def ev(unit: str, source_id: str, etype: str, day: str, email: str | None = None, **fields) -> dict:
    return event(f"e{next(_ids)}", unit, source_id, etype, time=f"{day}T12:00:00Z", source=SOURCES[unit],
                 customer={"email": email} if email else None, **fields)


def purchase(unit: str, source_id: str, day: str, amount: float, channel: str) -> dict:
    return ev(unit, source_id, "cdp.purchase", day, order_id=f"O-{next(_ids)}", amount=amount, channel=channel)


def email(unit, source_id, day, campaign, action):
    return ev(unit, source_id, "cdp.email", day, campaign=campaign, action=action)


def feedback(unit, source_id, day, kind, score):
    return ev(unit, source_id, "cdp.feedback", day, kind=kind, score=score)


def consent(unit, source_id, day, purpose, granted):
    return ev(unit, source_id, "cdp.consent", day, purpose=purpose, granted=granted)


def call(unit, source_id, day, direction, outcome):
    return ev(unit, source_id, "cdp.call", day, direction=direction, outcome=outcome)


# A (ann): retail R0000001 and bank B-00001, one person (same email) -> one customer in two units.
ANN = [
    ev("retail", "R0000001", "cdp.identify", "2025-12-01", "ann@example.com"),
    ev("bank", "B-00001", "cdp.identify", "2025-12-02", "ann@example.com"),
    consent("retail", "R0000001", "2026-01-01", "email_marketing", True),
    purchase("retail", "R0000001", "2026-01-10", 100.00, "pos"),
    feedback("retail", "R0000001", "2026-02-01", "nps", 9),
    purchase("retail", "R0000001", "2026-03-15", 50.00, "web"),
    email("retail", "R0000001", "2026-03-20", "c1", "sent"),
    email("retail", "R0000001", "2026-03-21", "c1", "opened"),
    email("retail", "R0000001", "2026-03-22", "c1", "clicked"),
    feedback("retail", "R0000001", "2026-04-01", "nps", 5),
    call("retail", "R0000001", "2026-04-02", "inbound", "complaint"),
    call("retail", "R0000001", "2026-04-03", "outbound", "sale"),
    feedback("retail", "R0000001", "2026-04-04", "csat", 4),
    feedback("retail", "R0000001", "2026-04-05", "csat", 2),
    email("retail", "R0000001", "2026-04-20", "c2", "sent"),
    purchase("bank", "B-00001", "2026-05-01", 200.00, "branch"),
    email("retail", "R0000001", "2026-05-01", "c2", "unsubscribed"),
    consent("retail", "R0000001", "2026-05-02", "third_party_sharing", False),
    purchase("retail", "R0000001", "2026-06-20", 30.00, "pos"),
]
BOB = [  # lapsed: last purchase 510 days before as-of; re-consented after unsubscribing
    ev("retail", "R0000002", "cdp.identify", "2024-12-01", "bob@example.com"),
    email("retail", "R0000002", "2025-01-01", "c0", "sent"),
    email("retail", "R0000002", "2025-01-02", "c0", "unsubscribed"),
    purchase("retail", "R0000002", "2025-01-05", 40.00, "web"),
    purchase("retail", "R0000002", "2025-02-05", 60.00, "web"),
    consent("retail", "R0000002", "2025-03-01", "email_marketing", True),
]
CAT = [  # one purchase 41 days ago
    ev("telecom", "T00000001", "cdp.identify", "2026-05-01", "cat@example.com"),
    purchase("telecom", "T00000001", "2026-05-20", 25.00, "store"),
]
DAN = [  # never bought
    ev("telecom", "T00000002", "cdp.identify", "2026-01-01", "dan@example.com"),
    feedback("telecom", "T00000002", "2026-02-01", "nps", 10),
]
EVE = [  # three big purchases, the last 211 days ago
    ev("bank", "B-00002", "cdp.identify", "2025-09-01", "eve@example.com"),
    purchase("bank", "B-00002", "2025-10-01", 500.00, "online"),
    purchase("bank", "B-00002", "2025-11-01", 500.00, "online"),
    purchase("bank", "B-00002", "2025-12-01", 500.00, "online"),
    feedback("bank", "B-00002", "2025-12-10", "nps", 7),
    feedback("bank", "B-00002", "2025-12-11", "csat", 1),
]
FAY = [  # small regular buyer
    ev("retail", "R0000003", "cdp.identify", "2026-01-15", "fay@example.com"),
    purchase("retail", "R0000003", "2026-02-01", 10.00, "pos"),
    purchase("retail", "R0000003", "2026-04-01", 10.00, "pos"),
    purchase("retail", "R0000003", "2026-06-01", 10.00, "pos"),
]
PEOPLE = {"ann": ANN, "bob": BOB, "cat": CAT, "dan": DAN, "eve": EVE, "fay": FAY}


def rows(home: Path, sql: str) -> list[dict]:
    con = duckdb.connect(str(home / "view.duckdb"), read_only=True)
    try:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r)) for r in cursor.fetchall()]
    finally:
        con.close()


@pytest.fixture(scope="module")
def view(tmp_path_factory, cdp_at) -> Path:
    home = tmp_path_factory.mktemp("metrics")
    events = sorted((e for person in PEOPLE.values() for e in person), key=lambda e: e["time"])
    cdp_at(home, AS_OF)("ingest", str(write(home / "events.jsonl", events)))
    return home


@pytest.fixture(scope="module")
def by_email(view) -> dict[str, dict]:
    return {r["email"].split("@")[0]: r for r in rows(view, "SELECT * FROM customers")}


def test_one_row_per_person(by_email):
    assert sorted(by_email) == sorted(PEOPLE)
    assert by_email["ann"]["business_units"] == ["bank", "retail"]


def test_purchase_facts(by_email):
    ann = by_email["ann"]
    assert (ann["orders"], ann["lifetime_value"], ann["avg_order_value"]) == (4, 380.0, 95.0)
    assert ann["first_purchase_at"].date().isoformat() == "2026-01-10"
    assert ann["last_purchase_at"].date().isoformat() == "2026-06-20"
    assert (by_email["eve"]["orders"], by_email["eve"]["lifetime_value"]) == (3, 1500.0)
    dan = by_email["dan"]
    assert (dan["orders"], dan["lifetime_value"], dan["avg_order_value"], dan["first_purchase_at"]) == (0, 0.0, None, None)


def test_recency_against_as_of(by_email):
    # 2026-06-30 minus the last purchase day
    assert {k: v["recency_days"] for k, v in by_email.items()} == {
        "ann": 10, "bob": 510, "cat": 41, "dan": None, "eve": 211, "fay": 29}


def test_rfm_scores(by_email):
    # buyers ranked (percent_rank over 5 buyers: 0, .25, .5, .75, 1 -> 1, 2, 3, 4, 5; ties share the lower)
    # recency, oldest first: bob 510, eve 211, cat 41, fay 29, ann 10
    # orders: cat 1, bob 2, eve 3 = fay 3 (both rank 3 -> 3), ann 4
    # lifetime value: cat 25, fay 30, bob 100, ann 380, eve 1500
    expected = {"ann": (5, 5, 4), "bob": (1, 2, 3), "cat": (3, 1, 1), "eve": (2, 3, 5), "fay": (4, 3, 2),
                "dan": (None, None, None)}
    got = {k: (v["rfm_recency"], v["rfm_frequency"], v["rfm_monetary"]) for k, v in by_email.items()}
    assert got == expected


def test_rfm_segment_and_tier(by_email):
    assert {k: v["rfm_segment"] for k, v in by_email.items()} == {
        "ann": "champions",   # R5 F5
        "bob": "lost",        # R1 F2
        "cat": "potential",   # R3 F1: recent enough, not R>=4 for "new"
        "eve": "at_risk",     # R2 F3
        "fay": "loyal",       # R4 F3
        "dan": "prospect"}
    assert {k: v["tier"] for k, v in by_email.items()} == {
        "ann": "high_value",  # 5+5+4 = 14
        "eve": "potential",   # 2+3+5 = 10
        "fay": "potential",   # 4+3+2 = 9
        "bob": "regular", "cat": "regular", "dan": "regular"}


def test_lifecycle_stage(by_email):
    assert {k: v["lifecycle_stage"] for k, v in by_email.items()} == {
        "dan": "prospect",
        "cat": "new",         # first purchase 41 days before as-of
        "bob": "churned",     # 510 days without a purchase
        "eve": "at_risk",     # 211 days without a purchase
        "ann": "active", "fay": "active"}


def test_churn_risk_and_predicted_value(by_email):
    for name, c in by_email.items():
        if name == "dan":
            assert c["churn_risk"] is None and c["predicted_value_12m"] == 0
        else:
            assert 0 <= c["churn_risk"] <= 1 and c["predicted_value_12m"] >= 0
    assert by_email["bob"]["churn_risk"] > by_email["ann"]["churn_risk"]
    assert by_email["ann"]["churn_risk"] < 0.5 and by_email["fay"]["churn_risk"] < 0.5
    assert by_email["ann"]["predicted_value_12m"] > by_email["bob"]["predicted_value_12m"]


def test_engagement_and_service(by_email):
    ann = by_email["ann"]
    # touches: store 3 (pos, pos, branch), email 2 (opened, clicked), online 1, phone 1 (inbound call)
    assert ann["preferred_channel"] == "store"
    assert by_email["bob"]["preferred_channel"] == "online"
    assert by_email["dan"]["preferred_channel"] is None
    # campaigns sent c1, c2; opened c1; clicked c1
    assert (ann["emails_sent"], ann["email_open_rate"], ann["email_click_rate"]) == (2, 0.5, 0.5)
    assert by_email["fay"]["email_open_rate"] is None
    # ann unsubscribed after granting; bob granted after unsubscribing
    assert ann["email_unsubscribed"] is True and by_email["bob"]["email_unsubscribed"] is False
    assert (ann["calls"], ann["complaints"]) == (2, 2)   # complaint call + csat 2
    assert by_email["eve"]["complaints"] == 1             # csat 1
    assert (ann["nps_score"], ann["nps_class"]) == (5, "detractor")   # latest of 9, 5
    assert by_email["dan"]["nps_class"] == "promoter" and by_email["eve"]["nps_class"] == "passive"
    assert by_email["fay"]["nps_class"] is None
    assert (ann["csat_avg"], by_email["eve"]["csat_avg"]) == (3.0, 1.0)


def test_consent_per_purpose(by_email):
    ann = by_email["ann"]
    assert (ann["consent_email_marketing"], ann["consent_third_party_sharing"], ann["consent_sms_marketing"]) == (
        True, False, None)
    assert by_email["bob"]["consent_email_marketing"] is True


def test_customer_business_units(view, by_email):
    ann = by_email["ann"]["customer_id"]
    units = {r["business_unit"]: r for r in rows(view, f"SELECT * FROM customer_business_units WHERE customer_id = '{ann}'")}
    assert (units["retail"]["spend"], units["retail"]["orders"]) == (180.0, 3)
    assert (units["bank"]["spend"], units["bank"]["orders"]) == (200.0, 1)
    # retail: 5 emails (c1 sent/opened/clicked, c2 sent/unsubscribed), 4 feedback, 2 calls; consent and
    # identify are not interactions; bank: none
    assert (units["retail"]["interactions"], units["bank"]["interactions"]) == (11, 0)
    assert units["bank"]["first_seen"].date().isoformat() == "2025-12-02"
    assert rows(view, "SELECT count(*) AS n FROM customer_business_units")[0]["n"] == 7


def test_business_unit_overlap(view):
    overlap = {(r["unit_x"], r["unit_y"]): r for r in rows(view, "SELECT * FROM business_unit_overlap")}
    # retail: ann, bob, fay; bank: ann, eve; telecom: cat, dan; only ann is in two units
    assert overlap[("retail", "retail")]["customers_both"] == 3
    retail_bank = overlap[("retail", "bank")]
    assert (retail_bank["customers_x"], retail_bank["customers_both"], retail_bank["share_of_x"]) == (3, 1, 0.3333)
    assert (retail_bank["spend_in_x"], retail_bank["spend_in_y"], retail_bank["value_both"]) == (180.0, 200.0, 380.0)
    assert overlap[("bank", "retail")]["share_of_x"] == 0.5
    assert ("retail", "telecom") not in overlap


def test_scores_follow_a_new_as_of_without_new_events(view, cdp_at):
    later = "2026-07-30"
    cdp_at(view, later)("query", "SELECT 1")
    got = {r["email"].split("@")[0]: r for r in rows(view, "SELECT * FROM customers")}
    assert got["ann"]["recency_days"] == 40 and got["bob"]["recency_days"] == 540
    assert rows(view, "SELECT as_of FROM metric_state")[0]["as_of"].isoformat() == later
    cdp_at(view, AS_OF)("query", "SELECT 1")   # back to AS_OF for the other tests
    assert rows(view, "SELECT recency_days FROM customers WHERE email = 'ann@example.com'")[0]["recency_days"] == 10


def test_a_live_batch_scores_a_customer_as_the_last_refresh_did(demo_view, tmp_path):
    """Between two refreshes a batch's customers are scored by the last refresh's RFM boundaries
    and fitted model (metrics.with_scores, what `cdp serve` projects): a customer whose facts did
    not change gets exactly the scores the refresh gave, ties and withheld scores included."""
    from projections.metrics import SCORE_COLUMNS, register_functions, with_scores

    copy = tmp_path / "view.duckdb"
    shutil.copy(demo_view.home / "view.duckdb", copy)
    con = duckdb.connect(str(copy))
    try:
        register_functions(con)
        columns = ", ".join(["customer_id", *SCORE_COLUMNS])
        refreshed = con.execute(f"SELECT {columns} FROM customers ORDER BY customer_id").fetchall()
        unscored = f"SELECT * EXCLUDE ({', '.join(SCORE_COLUMNS)}) FROM customers"
        provisional = con.execute(f"SELECT {columns} FROM ({with_scores(unscored)}) ORDER BY customer_id").fetchall()
        spread = con.execute("SELECT count(DISTINCT rfm_recency), count(DISTINCT rfm_frequency), "
                             "count(DISTINCT rfm_monetary), count(DISTINCT tier), count(*) FILTER (WHERE "
                             "scores_withheld), count(DISTINCT churn_risk) FROM customers").fetchall()[0]
    finally:
        con.close()
    assert spread[:4] == (5, 5, 5, 3) and spread[4] > 0 and spread[5] > 50  # every boundary is exercised
    assert len(provisional) == len(refreshed) > 300
    assert provisional == refreshed


def test_overlap_is_every_pair_of_units_a_customer_is_in(demo_view):
    """business_unit_overlap against its definition, a self-join of the customers' unit rows (the
    refresh computes it without joining customers of one unit; docs/metrics.md)."""
    con = duckdb.connect(str(demo_view.home / "view.duckdb"), read_only=True)
    try:
        defined = con.execute("""
            SELECT x.business_unit, y.business_unit, count(*), sum(x.spend), sum(y.spend)
            FROM customer_business_units x JOIN customer_business_units y USING (customer_id)
            GROUP BY ALL ORDER BY ALL""").fetchall()
        kept = con.execute("SELECT unit_x, unit_y, customers_both, spend_in_x, spend_in_y FROM business_unit_overlap "
                           "ORDER BY ALL").fetchall()
    finally:
        con.close()
    assert [row[:3] for row in kept] == [row[:3] for row in defined]
    assert len(defined) == 9 and sum(row[2] for row in defined if row[0] != row[1]) > 0  # pairs of two units
    for got, expected in zip(kept, defined):
        assert got[3:] == pytest.approx(expected[3:], abs=0.006)


def test_a_refresh_rewrites_the_scores_that_differ(demo_view, tmp_path):
    """A refresh finds the rows whose stored scores differ from what it computes (here three made
    stale by hand) and writes those again; every other row keeps what it had."""
    from datetime import date

    from projections.metrics import SCORE_COLUMNS, refresh
    from tests.conftest import DEMO_AS_OF

    copy = tmp_path / "view.duckdb"
    shutil.copy(demo_view.home / "view.duckdb", copy)
    con = duckdb.connect(str(copy))
    try:
        columns = ", ".join(["customer_id", *SCORE_COLUMNS])
        before = con.execute(f"SELECT {columns} FROM customers ORDER BY customer_id").fetchall()
        segment = 1 + list(SCORE_COLUMNS).index("rfm_segment")  # after customer_id
        stale = [row[0] for row in before if row[segment] not in (None, "prospect")][:3]
        con.execute("UPDATE customers SET rfm_segment = 'lost', churn_risk = 0.999, tier = NULL, "
                    "scores_withheld = NULL WHERE customer_id IN (SELECT unnest(?))", [stale])
        position = con.execute("SELECT position FROM metric_state").fetchall()[0][0]
        refresh(con, date.fromisoformat(DEMO_AS_OF), position)
        after = con.execute(f"SELECT {columns} FROM customers ORDER BY customer_id").fetchall()
    finally:
        con.close()
    assert len(stale) == 3 and after == before
