"""`cdp ingest` as a user runs it: good events land in the view, bad ones in the dead-letter with
their reason, and nothing stops the run."""
import json

from tests.events import event, write


def deadletter(cdp) -> list[dict]:
    path = cdp.home / "deadletter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_each_kind_of_bad_input_is_dead_lettered_with_its_reason_and_good_events_are_kept(cdp, tmp_path):
    good = [event(f"g{i}", "retail", f"R{i}", "cdp.purchase", order_id=f"o{i}", amount=10.0 + i) for i in range(6)]
    missing_unit = event("bad-unit", "retail", "R9")
    del missing_unit["data"]["business_unit"]
    wrong_type = event("bad-amount", "retail", "R9", "cdp.purchase", amount="twelve")
    unknown = event("bad-type", "retail", "R9")
    unknown["type"] = "cdp.teleport"
    oversize = event("bad-size", "retail", "R9", customer={"first_name": "x" * 5000})
    lines = [good[0], "{broken json", good[1], unknown, good[2], missing_unit, good[3], wrong_type,
             good[4], oversize, b'{"id": "\xff\xfe"}', good[5]]
    path = write(tmp_path / "mixed.jsonl", lines)

    result = cdp("ingest", str(path), extra_env={"CDP_MAX_EVENT_BYTES": "2000"})

    assert "6 rejected" in result.stderr
    reasons = {entry["origin"]: entry["reason"] for entry in deadletter(cdp)}
    assert set(reasons) == {"mixed.jsonl:2", "mixed.jsonl:4", "mixed.jsonl:6", "mixed.jsonl:8",
                            "mixed.jsonl:10", "mixed.jsonl:11"}
    assert reasons["mixed.jsonl:2"].startswith("malformed JSON")
    assert "unknown event type 'cdp.teleport'" in reasons["mixed.jsonl:4"]
    assert "business_unit" in reasons["mixed.jsonl:6"] and "bad-unit" in reasons["mixed.jsonl:6"]
    assert "data.amount" in reasons["mixed.jsonl:8"] and "(rule: type)" in reasons["mixed.jsonl:8"]
    assert "exceeds the limit of 2000 bytes" in reasons["mixed.jsonl:10"]
    assert reasons["mixed.jsonl:11"].startswith("invalid UTF-8")
    entry = next(e for e in deadletter(cdp) if e["origin"] == "mixed.jsonl:8")
    assert json.loads(entry["input"])["id"] == "bad-amount"  # the input itself is kept for replay
    rows = cdp.query("SELECT count(*) AS n, sum(amount) AS total FROM customer_events")
    assert rows == [{"n": 6, "total": sum(10.0 + i for i in range(6))}]


def test_csv_rows_that_do_not_fit_their_mapping_are_dead_lettered_and_the_rest_ingested(cdp, tmp_path):
    (tmp_path / "legacy.csv").write_text(
        "CustNo;Email;Total;Date\n"
        "C1;ann@example.org;12,50;2025-01-02\n"
        "C2;bob@example.org;not money;2025-01-03\n"
        "C3;cy@example.org\n"
        "C4;dee@example.org;7.25;2025-01-04\n", encoding="utf-8")
    (tmp_path / "legacy.mapping.toml").write_text(
        'type = "cdp.purchase"\nbusiness_unit = "retail"\nsource = "retail/legacy"\ntime = "Date"\n'
        '[columns]\n"customer.source_id" = "CustNo"\n"customer.email" = "Email"\namount = "Total"\n'
        'order_id = "CustNo"\n[constants]\ncurrency = "EUR"\n')

    cdp("ingest", str(tmp_path / "legacy.csv"))

    origins = sorted(e["origin"] for e in deadletter(cdp))
    assert origins == ["legacy.csv:row 2", "legacy.csv:row 3"]
    rows = cdp.query("SELECT source_id, amount, email FROM customer_events ORDER BY source_id")
    assert rows == [{"source_id": "C1", "amount": 12.5, "email": "ann@example.org"},
                    {"source_id": "C4", "amount": 7.25, "email": "dee@example.org"}]


def stored_events(cdp) -> int:
    import sqlite3

    with sqlite3.connect(cdp.home / "events.sqlite") as db:
        return db.execute("SELECT count(*) FROM stored_events").fetchone()[0]


def test_reingesting_a_file_changes_nothing(cdp, tmp_path):
    path = write(tmp_path / "e.jsonl", [
        event("a1", "retail", "R1", "cdp.purchase", customer={"email": "ann@example.org"}, amount=5.0),
        event("b1", "bank", "B1", customer={"email": "ANN@example.org"}),
        event("t1", "telecom", "T1", "cdp.call", customer={"phone": "07911 123123"}),
    ])
    first = cdp("ingest", str(path))
    tables = "customers", "customer_sources", "customer_events", "customer_redirects"
    before = {t: cdp.query(f"SELECT * FROM {t} ORDER BY ALL") for t in tables}
    events_before = stored_events(cdp)

    again = cdp("ingest", str(path))

    assert "duplicates ignored │ 3" in " ".join(again.stdout.split()).replace("│ │", "│")
    assert "duplicates ignored │ 0" in " ".join(first.stdout.split()).replace("│ │", "│")
    assert {t: cdp.query(f"SELECT * FROM {t} ORDER BY ALL") for t in tables} == before
    assert stored_events(cdp) == events_before == 6  # Registered, SourceLinked, Registered + 3 EventRecorded


def test_stdin_is_read_as_jsonl(cdp):
    from tests.events import jsonl

    cdp("ingest", "-", input=jsonl([event("s1", "retail", "R1"), event("s2", "retail", "R2")]).decode())
    assert cdp.query("SELECT count(*) AS n FROM customers") == [{"n": 2}]
