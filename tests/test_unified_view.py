"""The spine end to end: identity links and merges, the view, rebuild, crash and restart."""
import json
import os
import signal
import subprocess
import sys
import time

from tests.events import event, write

TABLES = ("customers", "customer_sources", "customer_events", "customer_redirects")


def snapshot(cdp) -> dict:
    return {t: cdp.query(f"SELECT * FROM {t} ORDER BY ALL") for t in TABLES}


def test_shared_identifiers_link_units_and_a_bridging_record_merges_two_customers(cdp, tmp_path):
    write(tmp_path / "a.jsonl", [
        event("1", "retail", "R1", "cdp.purchase", customer={"email": "ann@example.org", "first_name": "Ann"},
              amount=20.0, time="2025-01-01T10:00:00Z"),
        event("2", "telecom", "T1", "cdp.call", customer={"phone": "+44 7911 123123", "last_name": "Lee"},
              time="2025-01-02T10:00:00Z"),
        event("3", "bank", "B1", customer={"email": " ANN@example.org", "phone": "07911 123123"},
              time="2025-01-03T10:00:00Z"),
        event("4", "retail", "R1", "cdp.purchase", customer={}, amount=5.0, order_id="o-2",
              time="2025-01-04T10:00:00Z"),
    ])
    cdp("ingest", str(tmp_path / "a.jsonl"))

    customers = cdp.query("SELECT * FROM customers")
    assert len(customers) == 1
    golden = customers[0]
    assert golden["business_units"] == ["bank", "retail", "telecom"]
    assert (golden["first_name"], golden["last_name"], golden["email"], golden["phone"]) == \
           ("Ann", "Lee", "ann@example.org", "+447911123123")
    assert (golden["orders"], golden["lifetime_value"], golden["sources"], golden["events"]) == (2, 25.0, 3, 4)
    sources = cdp.query("SELECT business_unit, source_id, linked_by FROM customer_sources ORDER BY position")
    assert [s["linked_by"] for s in sources] == ["new_customer", "new_customer", "shared_email"]
    redirect = cdp.query("SELECT absorbed_id, survivor_id, rule FROM customer_redirects")
    assert len(redirect) == 1 and redirect[0]["survivor_id"] == golden["customer_id"]
    assert redirect[0]["rule"] == "shared_phone"

    # the absorbed id still finds the person
    shown = json.loads(cdp("customer", "show", redirect[0]["absorbed_id"], "--format", "json").stdout)
    assert shown["customer_id"] == golden["customer_id"]


def test_rebuild_gives_exactly_the_incremental_view(cdp, tmp_path):
    from cdp.demo import DemoSpec, generate

    demo = generate(tmp_path / "demo", DemoSpec(people=300, seed=5, invalid_rate=0.01))
    bridges = write(tmp_path / "bridges.jsonl", [  # records that prove two customers are one, twice in a chain
        event("m1", "retail", "RX1", customer={"email": "x1@example.org"}),
        event("m2", "telecom", "TX1", customer={"phone": "07911 123555"}),
        event("m3", "bank", "BX1", customer={"national_id": "XY123456Z"}),
        event("m4", "bank", "BX2", customer={"email": "x1@example.org", "phone": "07911123555"}),
        event("m5", "retail", "RX2", customer={"email": "x1@example.org", "national_id": "XY 12 34 56 Z"}),
    ])
    # small store batches and projection batches: many incremental steps with merges in between
    small = {"CDP_BATCH_SIZE": "500", "CDP_PROJECTION_BATCH": "700"}
    for path in [*demo.event_files, bridges]:
        cdp("ingest", str(path), extra_env=small)
    incremental = snapshot(cdp)
    assert incremental["customer_redirects"], "the data should contain merges"

    result = cdp("projections", "rebuild")

    assert "rebuilt" in result.stdout
    assert snapshot(cdp) == incremental


def test_kill_during_ingest_then_rerun_neither_loses_nor_double_counts(cdp, tmp_path):
    from cdp.demo import DemoSpec, generate

    demo = generate(tmp_path / "demo", DemoSpec(people=1500, seed=9))
    files = [str(p) for p in demo.event_files if p.suffix == ".jsonl"]
    env = {**cdp.env, "CDP_BATCH_SIZE": "1000", "CDP_PROJECTION_BATCH": "2000"}
    process = subprocess.Popen([sys.executable, "-m", "cdp", "ingest", *files], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = cdp.home / "events.sqlite"
    deadline = time.time() + 60
    while (not store.exists() or store.stat().st_size < 2_000_000) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL

    cdp("ingest", *files)  # the restart: same input again

    totals = cdp.query("SELECT count(*) AS events, round(sum(amount), 2) AS amount, "
                       "count(DISTINCT event_id) AS distinct_events FROM customer_events")[0]
    assert totals["events"] == totals["distinct_events"] == demo.events
    expected = 0.0
    for path in files:
        with open(path) as f:
            for line in f:
                data = json.loads(line)["data"]
                if "amount" in data:
                    expected += data["amount"]
    assert totals["amount"] == round(expected, 2)
    customers = cdp.query("SELECT sum(events) AS n FROM customers")[0]["n"]
    assert customers == demo.events


def test_stored_events_rebuild_the_customer_aggregate_with_the_library(cdp, tmp_path):
    """The fast append path writes what eventsourcing itself can read back."""
    from uuid import UUID

    from cdp.application import CustomerApplication
    from cdp.config import Settings

    write(tmp_path / "e.jsonl", [
        event("1", "retail", "R1", customer={"email": "a@example.org", "first_name": "Ann"}),
        event("2", "bank", "B1", customer={"email": "a@example.org"}),
        event("3", "bank", "B1", "cdp.purchase", amount=3.0),
    ])
    cdp("ingest", str(tmp_path / "e.jsonl"))
    customer_id = cdp.query("SELECT customer_id FROM customers")[0]["customer_id"]
    app = CustomerApplication(Settings.from_env({"CDP_HOME": str(cdp.home)}))
    try:
        customer = app.repository.get(UUID(customer_id))
    finally:
        app.close()
    assert customer.version == 5  # Registered, EventRecorded, SourceLinked, EventRecorded, EventRecorded
    assert customer.sources == [("retail", "R1"), ("bank", "B1")]
    assert customer.events == 3 and customer.profile["first_name"] == "Ann"


def test_distinct_counts_of_a_live_batch_equal_the_rebuild(cdp, tmp_path):
    """A live batch's few customers count distinct values (campaigns, purchase days, source
    records) another way than the rebuild over everyone (projections/metrics.count_distinct):
    repeats, several units and no campaign at all must come out the same."""
    write(tmp_path / "counts.jsonl", [
        event("c1", "retail", "R1", "cdp.email", customer={"email": "eve@example.org"}, campaign="spring", action="sent"),
        event("c2", "retail", "R1", "cdp.email", campaign="spring", action="sent", time="2025-01-01T11:00:00Z"),
        event("c3", "retail", "R1", "cdp.email", campaign="spring", action="opened", time="2025-01-01T12:00:00Z"),
        event("c4", "retail", "R1", "cdp.email", campaign="summer", action="sent", time="2025-01-02T10:00:00Z"),
        event("c5", "retail", "R1", "cdp.email", campaign="summer", action="clicked", time="2025-01-02T11:00:00Z"),
        event("c6", "retail", "R1", "cdp.purchase", amount=5.0, order_id="o-1", time="2025-01-03T10:00:00Z"),
        event("c7", "retail", "R1", "cdp.purchase", amount=7.0, order_id="o-2", time="2025-01-03T18:00:00Z"),
        event("c8", "retail", "R2", "cdp.purchase", customer={"email": "eve@example.org"}, amount=1.0,
              order_id="o-3", time="2025-01-05T10:00:00Z"),
        event("c9", "bank", "B1", customer={"email": "eve@example.org"}, time="2025-01-06T10:00:00Z"),
        event("c10", "bank", "B2", customer={"email": "dan@example.org"}, time="2025-01-06T10:00:00Z"),
    ])
    cdp("ingest", str(tmp_path / "counts.jsonl"), extra_env={"CDP_BATCH_SIZE": "1", "CDP_PROJECTION_BATCH": "1"})
    live = snapshot(cdp)
    eve = next(c for c in live["customers"] if c["email"] == "eve@example.org")
    assert (eve["sources"], eve["purchase_days"], eve["emails_sent"]) == (3, 2, 2)
    assert (eve["email_open_rate"], eve["email_click_rate"]) == (0.5, 0.5)
    dan = next(c for c in live["customers"] if c["email"] == "dan@example.org")
    assert (dan["sources"], dan["purchase_days"], dan["emails_sent"], dan["email_open_rate"]) == (1, 0, 0, None)

    cdp("projections", "rebuild")
    assert snapshot(cdp) == live


def test_live_batches_leave_no_rows_behind_in_the_view_s_working_tables(tmp_path):
    """A live batch copies its customers' events into a temporary table to derive their rows. Each
    batch must start from a new one: emptied with DELETE, DuckDB kept every earlier batch's rows in
    memory and in each later scan, and the server's batches grew slower the longer it ran."""
    from datetime import date

    from projections import tables
    from projections.projector import Projector
    from tests.test_audiences import _purchase, _registered_with_a_purchase

    ann, bob = "a" * 32, "b" * 32
    projector = Projector(tmp_path / "view.duckdb", date(2025, 6, 1))
    try:
        projector.apply([*_registered_with_a_purchase(1, ann, "ann", 10.0),
                         *_registered_with_a_purchase(3, bob, "bob", 1.0)])
        for n in range(40):  # each batch: one more purchase of each, so both are re-derived from all
            projector.apply([*_purchase(10 + 2 * n, ann, "ann", 10.0), *_purchase(11 + 2 * n, bob, "bob", 1.0)])
        rows = projector.con.execute(
            "SELECT customer_id, orders, lifetime_value FROM customers ORDER BY customer_id").fetchall()
        assert rows == [(ann, 41, 410.0), (bob, 41, 41.0)]
        held = projector.con.execute("SELECT estimated_size FROM duckdb_tables() WHERE table_name = ?",
                                     [tables.SCOPED_EVENTS]).fetchall()
        assert held == [(2 * 41,)]  # the last batch's customers' events, nothing of the 40 before
    finally:
        projector.close()
