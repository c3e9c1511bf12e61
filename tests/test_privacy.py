"""Privacy: personal data encrypted at rest, erasure that leaves no byte of the person on disk,
suppression of an erased person's identifiers. The CLI runs as a subprocess, as users run it."""
from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.databases import with_dbname
from tests.events import event, jsonl, write
from tests.serving import new_keys, start_server, wait_until

ANN = {"email": "Quorra.Zephyrine@Example.org", "phone": "+44 7911 123461", "first_name": "Quorralind",
       "last_name": "Zephyrine", "address": {"street": "17 Wobblesworth Lane", "city": "Leeds", "postcode": "LS1 4AB"}}
# what must not be found anywhere afterwards, case-insensitively (the phone as stored: E.164)
NEEDLES = ["quorra.zephyrine@example.org", "+447911123461", "7911123461", "quorralind", "zephyrine", "wobblesworth"]
OTHERS = [
    ("retail", "R-2", {"email": "bob.other@example.org", "first_name": "Bob", "last_name": "Other",
                       "address": {"street": "1 High Street", "city": "York"}}),
    ("bank", "B-3", {"email": "cat.third@example.org", "phone": "+44 7700 900999", "first_name": "Cat",
                     "last_name": "Third"}),
]
OTHERS_SQL = ("SELECT customer_id, email, phone, first_name, last_name, street, events, business_units "
              "FROM customers ORDER BY customer_id")
SUMS_SQL = "SELECT count(*) AS events, sum(amount) AS amount FROM customer_events"


def people_events() -> list:
    events = [
        event("a1", "retail", "R-1", customer=ANN),
        event("a2", "retail", "R-1", "cdp.purchase", amount=42.5, customer={"email": ANN["email"]}),
        event("a3", "bank", "B-1", customer={"email": ANN["email"], "first_name": "Quorralind", "last_name": "Zephyrine"}),
        event("a4", "bank", "B-1", "cdp.feedback", comment="Quorralind says the Wobblesworth branch is great"),
    ]
    for n, (unit, source_id, customer) in enumerate(OTHERS):
        events.append(event(f"o{n}", unit, source_id, customer=customer))
        events.append(event(f"p{n}", unit, source_id, "cdp.purchase", amount=10.0 + n, order_id=f"o-{n}"))
    return events


def invalid_event_of_ann() -> bytes:
    """Events the schema rejects: one carrying Ann's e-mail, one only her name and street (spelled
    another way, from a record of a unit that never sent a valid one), one with another person's
    name and street: all land in the dead-letter."""
    bad = event("bad1", "retail", "R-1", "cdp.purchase", amount="lots", customer={"email": ANN["email"]})
    named = event("bad2", "telecom", "T-44", "cdp.purchase", amount="lots",
                  customer={"first_name": "QUORRALIND", "last_name": "Zéphyrine",
                            "address": {"street": "17 Wobblesworth Ln"}})
    other = event("bad3", "telecom", "T-45", "cdp.purchase", amount="lots",
                  customer={"first_name": "Bob", "last_name": "Other", "address": {"street": "1 High Street"}})
    return jsonl([bad, named, other])


def files_holding(home: Path, needles: list[str]) -> dict[str, list[str]]:
    """Every file under home (recursively) that contains a needle, case-insensitively."""
    found: dict[str, list[str]] = {}
    for path in home.rglob("*"):
        if path.is_file() and path.name != "input.jsonl":
            hits = needles_in(path.read_bytes(), needles)
            if hits:
                found[str(path.relative_to(home))] = hits
    return found


def needles_in(data: bytes, needles: list[str]) -> list[str]:
    """The needles `data` contains, case-insensitively."""
    data = data.lower()
    return [n for n in needles if n.encode() in data]


def ingest(cdp, tmp_path: Path, name: str, payload: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(payload)
    return cdp("ingest", str(path)).stdout


def others(cdp) -> tuple[list[dict], list[dict]]:
    rows = [r for r in cdp.query(OTHERS_SQL) if r["email"] != "quorra.zephyrine@example.org"]
    return rows, cdp.query(SUMS_SQL + " WHERE customer_id IN (" + ",".join(f"'{r['customer_id']}'" for r in rows) + ")")


def test_personal_data_is_encrypted_in_the_store(cdp, tmp_path):
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    import sqlite3

    with sqlite3.connect(cdp.home / "events.sqlite") as con:
        states = b"\n".join(row[0] for row in con.execute("SELECT state FROM stored_events")).lower()
    assert b"great" not in states and b"42.5" not in states  # free text and the data block too
    for needle in ("wobblesworth", "quorralind", "bob.other@example.org", "+447700900999"):
        assert needle.encode() not in states, needle
    # … and yet the view shows them
    assert [r["first_name"] for r in cdp.query("SELECT first_name FROM customers ORDER BY 1")] == [
        "Bob", "Cat", "Quorralind"]
    key_file = cdp.home / "master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_access_export_holds_everything_about_the_person(cdp, tmp_path):
    events = people_events() + [event("a5", "retail", "R-1", "cdp.consent", purpose="profiling", granted=False,
                                      time="2025-02-01T00:00:00Z")]
    ingest(cdp, tmp_path, "people.jsonl", jsonl(events))
    ingest(cdp, tmp_path, "bad.jsonl", invalid_event_of_ann())
    out = tmp_path / "ann"
    cdp("customer", "export", "retail:R-1", str(out))
    document = json.loads((out / "customer.json").read_text())
    assert sorted(e["event_id"] for e in document["events"]) == ["a1", "a2", "a3", "a4", "a5"]
    # her inputs the dead-letter holds, as her erasure would find them (bad3 is another person's)
    assert [(r["event_id"], r["reason"].split(":")[0]) for r in document["rejected_inputs"]] == [
        ("bad1", "event 'bad1'"), ("bad2", "event 'bad2'")]
    assert "Quorra.Zephyrine@Example.org" in document["rejected_inputs"][0]["input"]
    assert document["golden_record"]["last_name"] == "Zephyrine"
    assert sorted((s["business_unit"], s["source_id"]) for s in document["source_records"]) == [
        ("bank", "B-1"), ("retail", "R-1")]
    assert [(c["purpose"], c["granted"], c["business_unit"]) for c in document["consents"]] == [
        ("profiling", False, "retail")]
    import csv

    with open(out / "events.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["event_id"] for r in rows) == ["a1", "a2", "a3", "a4", "a5"]
    assert any("Wobblesworth branch" in r["comment"] for r in rows)
    with open(out / "rejected_inputs.csv", newline="") as f:
        assert [r["event_id"] for r in csv.DictReader(f)] == ["bad1", "bad2"]
    # profiling consent withdrawn: her scores are withheld, the others' are computed
    scores = {r["last_name"]: r for r in cdp.query(
        "SELECT last_name, scores_withheld, rfm_segment, tier, churn_risk, predicted_value_12m FROM customers")}
    assert scores["Zephyrine"] == {"last_name": "Zephyrine", "scores_withheld": True, "rfm_segment": None,
                                   "tier": None, "churn_risk": None, "predicted_value_12m": None}
    assert scores["Other"]["scores_withheld"] is False and scores["Other"]["tier"] is not None

    cdp("customer", "show", "quorra.zephyrine@example.org")
    entries = json.loads(cdp("audit", "--customer", "retail:R-1", "--format", "json").stdout)
    ann = document["customer_id"]
    assert [(e["action"], e["customer_id"]) for e in entries] == [("export", ann), ("read", ann)]
    assert all(e["actor"].startswith("local") and e["at"] for e in entries)
    assert json.loads(cdp("audit", "--since", "2999-01-01", "--format", "json").stdout) == []
    bad = cdp("audit", "--since", "yesterday", check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("cdp: error: --since")


def test_erase_leaves_no_trace_and_suppresses_the_person(cdp, tmp_path):
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    path = tmp_path / "bad.jsonl"
    path.write_bytes(invalid_event_of_ann())
    cdp("ingest", str(path))
    assert files_holding(cdp.home, NEEDLES), "the test data should be on disk before the erase"
    before = others(cdp)

    refused = cdp("erase", "quorra.zephyrine@example.org", check=False, input="n\n")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    out = cdp("erase", "Quorra.Zephyrine@example.org", "--yes").stdout
    assert "2 source record(s)" in out

    assert files_holding(cdp.home, NEEDLES) == {}
    assert others(cdp) == before
    kept = [json.loads(line)["event_id"] for line in (cdp.home / "deadletter.jsonl").read_text().splitlines()]
    assert kept == ["bad3"]  # another person's entry stays
    erased = [e for e in json.loads(cdp("audit", "--format", "json").stdout) if e["action"] == "erase"]
    assert len(erased) == 1 and erased[0]["detail"]["sources"] == 2 and erased[0]["detail"]["suppressed"] is True
    missing = cdp("customer", "show", "quorra.zephyrine@example.org", check=False)
    assert missing.returncode == 1 and "no customer found" in missing.stderr

    cdp("projections", "rebuild")
    assert files_holding(cdp.home, NEEDLES) == {}
    assert others(cdp) == before

    # a unit re-sends Ann's records under new event ids: dropped, counted, dead-lettered without input
    resent = [event("n1", "bank", "B-9", customer={"email": ANN["email"]}),
              event("n2", "retail", "R-1", "cdp.purchase", amount=5.0),
              event("n3", "telecom", "T-7", customer={"phone": ANN["phone"], "first_name": "Quorralind"})]
    out = ingest(cdp, tmp_path, "resent.jsonl", jsonl(resent))
    assert "suppressed" in out
    assert files_holding(cdp.home, NEEDLES) == {}
    assert others(cdp) == before
    entries = [json.loads(line) for line in (cdp.home / "deadletter.jsonl").read_text().splitlines()]
    suppressed = [e for e in entries if e["reason"] == "suppressed"]
    assert sorted(e["event_id"] for e in suppressed) == ["n1", "n2", "n3"]
    assert all(e["input"] is None for e in suppressed)


def test_a_rejected_resend_of_an_erased_person_keeps_only_its_id(cdp, tmp_path):
    """Suppression holds for inputs the pipeline rejects too: a unit re-sending the erased person's
    records broken (schema, malformed JSON, her old event id with other content) must not put
    her back on disk through the dead-letter, while another person's rejected input is kept."""
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    cdp("erase", "quorra.zephyrine@example.org", "--yes")
    resent = jsonl([
        event("r1", "retail", "R-1", "cdp.purchase", amount="lots", customer={"email": ANN["email"]}),
        # a record the platform never saw, only her phone (as a unit writes it nationally) and name
        event("r2", "telecom", "T-80", "cdp.purchase", amount="lots",
              customer={"phone": "07911 123461", "first_name": "Quorralind", "last_name": "Zephyrine"}),
        event("a2", "retail", "R-1", "cdp.purchase", amount=99.0, customer={"email": ANN["email"]}),  # conflict
        event("r3", "telecom", "T-81", "cdp.purchase", amount="lots", customer={"first_name": "Bob"}),
    ]) + b'{"broken": "Quorra.Zephyrine@Example.org wrote this\n'
    out = ingest(cdp, tmp_path, "resent.jsonl", resent)
    assert files_holding(cdp.home, NEEDLES) == {}
    entries = [json.loads(line) for line in (cdp.home / "deadletter.jsonl").read_text().splitlines()]
    suppressed = [e for e in entries if e["reason"] == "suppressed"]
    assert sorted((e["event_id"] or "", e.get("rejected_as", "")) for e in suppressed) == [
        ("", "json"), ("a2", ""), ("r1", "schema"), ("r2", "schema")]  # a2: her event re-sent changed
    assert all(e["input"] is None for e in suppressed)
    assert [e["event_id"] for e in entries if e["reason"] != "suppressed"] == ["r3"]  # another's, input kept
    assert [e for e in entries if e["event_id"] == "r3"][0]["input"]
    assert _summary_count(out, "suppressed") == 4 and _summary_count(out, "rejected") == 1


def _summary_count(out: str, label: str) -> int:
    """A count from `cdp ingest`'s summary table, by the start of its label."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2 and cells[0].startswith(label):
            return int(cells[1].split()[0].replace(",", ""))
    raise AssertionError(f"no {label!r} in the summary:\n{out}")


def test_an_erasure_stopped_part_way_is_finished_by_the_next_command(cdp, tmp_path):
    """Stopped before the store's commit, an erasure loses nothing and can be run again; stopped
    after it, the person is gone from the store but their bytes may be in the view's file and the
    store's log: the next command that opens the view finishes the work, so nothing of them is
    left, and the dead-letter was scrubbed before the commit (its needles go with the store's rows).
    The stops are real faults: a directory where the dead-letter's or the view's fresh copy goes."""
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    (tmp_path / "bad.jsonl").write_bytes(invalid_event_of_ann())
    cdp("ingest", str(tmp_path / "bad.jsonl"))
    before = others(cdp)
    unfinished, view_marker = cdp.home / "erasure.unfinished", cdp.home / "view.duckdb.erased"

    blocker = cdp.home / "deadletter.jsonl.scrub"
    blocker.mkdir()
    stopped = cdp("erase", ANN["email"], "--yes", check=False)
    assert stopped.returncode == 1 and stopped.stderr.startswith("cdp: error: erase stopped part-way"), stopped.stderr
    blocker.rmdir()
    shown = cdp("customer", "show", ANN["email"], "--format", "json")  # finishes: nothing was committed
    assert "Quorralind" in shown.stdout and not unfinished.exists()
    assert len((cdp.home / "deadletter.jsonl").read_text().splitlines()) == 3

    blocker = cdp.home / "view.duckdb.rewrite"
    blocker.mkdir()
    stopped = cdp("erase", ANN["email"], "--yes", check=False)
    assert stopped.returncode == 1 and stopped.stderr.startswith("cdp: error: erase stopped part-way"), stopped.stderr
    assert unfinished.exists() and view_marker.exists()
    assert [json.loads(line)["event_id"] for line in (cdp.home / "deadletter.jsonl").read_text().splitlines()] == [
        "bad3"]
    blocker.rmdir()
    assert "view.duckdb" in files_holding(cdp.home, NEEDLES)  # her rows deleted, not yet her bytes

    assert cdp.query("SELECT count(*) AS n FROM customers") == [{"n": 2}]  # opens the view: finishes first
    assert files_holding(cdp.home, NEEDLES) == {}
    assert not unfinished.exists() and not view_marker.exists()
    assert others(cdp) == before
    again = cdp("erase", ANN["email"], "--yes")  # erased already: nothing left to find, nothing to scrub
    assert "no customer carried it; 0 dead-letter entr(ies)" in again.stdout


def test_an_erasure_killed_before_its_commit_loses_nothing(cdp, tmp_path):
    """`kill -9` of cdp erase while it waits to scrub the dead-letter (a writer holds the file's
    lock here), before the store's commit: nothing is erased, nothing lost, its lock died with it,
    and the next commands finish what it marked (nothing) and erase the person for good."""
    import sys

    from ingest.durable import locked

    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    (tmp_path / "bad.jsonl").write_bytes(invalid_event_of_ann())
    cdp("ingest", str(tmp_path / "bad.jsonl"))
    unfinished = cdp.home / "erasure.unfinished"
    with locked(cdp.home / "deadletter.jsonl.lock"):
        erase = subprocess.Popen([sys.executable, "-m", "cdp", "erase", ANN["email"], "--yes"], env=cdp.env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not unfinished.exists() and erase.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert unfinished.exists() and erase.poll() is None  # waiting for the lock
        erase.kill()
        erase.wait()
    shown = cdp("customer", "show", ANN["email"], "--format", "json", timeout=60)
    assert "Quorralind" in shown.stdout and not unfinished.exists()
    assert len((cdp.home / "deadletter.jsonl").read_text().splitlines()) == 3
    cdp("erase", ANN["email"], "--yes", timeout=60)
    assert files_holding(cdp.home, NEEDLES) == {}


def test_an_erasure_during_a_rebuild_has_the_rebuilt_file_rewritten(cdp, tmp_path):
    """An erasure that commits while a rebuild runs, after the rebuild replayed the person's events
    (their keys still there): the rebuilt file's deleted rows keep their bytes, so it keeps the
    mark for its rewrite, which the next command does."""
    from cdp.application import CustomerApplication
    from cdp.config import Settings
    from projections.projector import rebuild

    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    settings = Settings.from_env(cdp.env)
    ann = cdp.query("SELECT customer_id FROM customers WHERE last_name = 'Zephyrine'")[0]["customer_id"]
    erased = []

    def erase_once(_: int) -> None:  # after the first batch: her first events replayed with her keys
        if not erased:
            with CustomerApplication(settings) as other:
                erased.append(other.erase(ann))

    def view_files_holding() -> dict:
        return {k: v for k, v in files_holding(cdp.home, NEEDLES).items() if k.startswith("view.duckdb")}

    with CustomerApplication(settings) as app:
        rebuild(app, settings.duckdb_path, batch_size=4, progress=erase_once)
    assert erased and (cdp.home / "view.duckdb.erased").exists()
    assert view_files_holding()  # her rows deleted, not yet her bytes
    assert cdp.query("SELECT count(*) AS n FROM customers WHERE last_name = 'Zephyrine'") == [{"n": 0}]
    assert view_files_holding() == {} and not (cdp.home / "view.duckdb.erased").exists()


def test_a_command_waits_for_an_erasure_under_way_rather_than_finishing_it(cdp, tmp_path):
    """While an erasure runs, its marker says unfinished, and it holds CDP_HOME/erasure.lock: a
    command that opens the view meanwhile waits for it to end (then there is nothing left to do)
    instead of doing its work a second time beside it and taking the view from under it."""
    import sys

    from ingest.durable import locked

    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    unfinished = cdp.home / "erasure.unfinished"
    with locked(cdp.home / "erasure.lock"):  # as an erasure under way holds it
        unfinished.write_text('{"customer_ids": []}')
        query = subprocess.Popen([sys.executable, "-m", "cdp", "query", "SELECT count(*) AS n FROM customers",
                                  "--format", "json"], env=cdp.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(3)  # cdp query starts in about 1 s: by now it finished the work, or waits
        waiting = query.poll() is None and unfinished.exists()
        unfinished.unlink()  # the erasure's last step
    out, err = query.communicate(timeout=120)
    assert waiting and query.returncode == 0, err
    assert json.loads(out) == [{"n": 3}]


def test_a_rebuild_replaying_an_erasure_leaves_no_rewrite_due(cdp, tmp_path):
    """The replayed Erased event deletes rows that never held the person's fields (their keys were
    gone): the rebuilt view is not marked for a rewrite, and the old view's mark goes with it."""
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    cdp("erase", ANN["email"], "--yes")
    (cdp.home / "view.duckdb.erased").touch()  # as a stop before the old view's rewrite leaves it
    cdp("projections", "rebuild")
    assert sorted(p.name for p in cdp.home.iterdir() if "duckdb" in p.name) == ["view.duckdb"]
    assert files_holding(cdp.home, NEEDLES) == {}


def test_erase_without_suppression_lets_the_person_come_back(cdp, tmp_path):
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    cdp("erase", "retail:R-1", "--yes", "--keep-suppression=no")
    assert cdp.query("SELECT count(*) AS n FROM customers WHERE last_name = 'Zephyrine'") == [{"n": 0}]
    ingest(cdp, tmp_path, "back.jsonl", jsonl([event("back1", "retail", "R-1", customer=ANN)]))
    rows = cdp.query("SELECT first_name, events FROM customers WHERE last_name = 'Zephyrine'")
    assert rows == [{"first_name": "Quorralind", "events": 1}]
    cdp("projections", "rebuild")
    assert cdp.query("SELECT first_name, events FROM customers WHERE last_name = 'Zephyrine'") == rows


def test_a_lone_surname_goes_with_the_last_record_that_bears_it(cdp, tmp_path):
    """A dead-letter entry holding nothing of a person but a surname stays while another source
    record carries that surname (it is not only the erased person's), and goes with the last one."""
    ingest(cdp, tmp_path, "vex.jsonl", jsonl([
        event("v1", "retail", "R-7", customer={"email": "ann.vexbridge@example.org", "first_name": "Ann",
                                               "last_name": "Vexbridge"}),
        event("v2", "bank", "B-8", customer={"email": "dan.v@example.org", "first_name": "Dan",
                                             "last_name": "Vexbridge", "phone": "+44 7700 900123"}),
    ]))
    lone = event("bad5", "telecom", "T-9", "cdp.purchase", amount="lots", customer={"last_name": "VEXBRIDGE"})
    other = event("bad6", "telecom", "T-10", "cdp.purchase", amount="lots", customer={"last_name": "Other"})
    (tmp_path / "bad.jsonl").write_bytes(jsonl([lone, other]))
    cdp("ingest", str(tmp_path / "bad.jsonl"))

    def dead_lettered() -> list[str]:
        return [json.loads(line)["event_id"] for line in (cdp.home / "deadletter.jsonl").read_text().splitlines()]

    cdp("erase", "ann.vexbridge@example.org", "--yes")
    assert dead_lettered() == ["bad5", "bad6"]  # Dan still bears the name
    cdp("erase", "dan.v@example.org", "--yes")
    assert dead_lettered() == ["bad6"]
    assert files_holding(cdp.home, ["vexbridge"]) == {}


def test_erase_does_not_bring_the_scores_up_to_date_first(cdp, tmp_path):
    """Finding the person needs no scores, and bringing them up to a new day first cost the erase
    the time of a refresh; the next command that shows scores brings them up to date."""
    import duckdb

    cdp.env["CDP_AS_OF"] = "2025-06-30"
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    scored = "SELECT CAST(as_of AS VARCHAR) FROM metric_state"

    def scored_as_of() -> str:
        with duckdb.connect(str(cdp.home / "view.duckdb"), read_only=True) as con:
            return con.execute(scored).fetchall()[0][0]

    assert scored_as_of() == "2025-06-30"
    cdp.env["CDP_AS_OF"] = "2025-07-31"
    cdp("erase", "quorra.zephyrine@example.org", "--yes")
    assert scored_as_of() == "2025-06-30"
    assert {r["recency_days"] for r in cdp.query("SELECT recency_days FROM customers")} and scored_as_of() == "2025-07-31"


GHOST = {"email": "Wilhelmina.Quaxley@Example.org", "phone": "+44 7911 123462", "first_name": "Wilhelmina",
         "last_name": "Quaxley", "address": {"street": "9 Drumblewick Road", "city": "York"}}
# her phone as both units wrote it, and as the store would keep it (E.164)
GHOST_NEEDLES = ["wilhelmina.quaxley@example.org", "7911 123462", "7911123462", "wilhelmina", "quaxley", "drumblewick"]


def ghost_rejects() -> bytes:
    """A person every input of whose the schema rejects, so no customer stands for them and the
    dead-letter alone holds them: the full record, another unit's record with only her phone (as
    the unit writes it) and first name, a third unit's record with only her first name; and
    another person's rejected input."""
    return jsonl([
        event("g1", "retail", "R-G", "cdp.purchase", amount="lots", customer=GHOST),
        event("g2", "telecom", "T-G", "cdp.purchase", amount="lots",
              customer={"phone": "07911 123462", "first_name": "Wilhelmina"}),
        event("g3", "bank", "B-G", "cdp.purchase", amount="lots", customer={"first_name": "Wilhelmina"}),
        event("x1", "telecom", "T-45", "cdp.purchase", amount="lots", customer={"first_name": "Bob", "last_name": "Other"}),
    ])


def test_a_person_only_the_dead_letter_holds_is_erased_by_an_identifier(cdp, tmp_path):
    """`cdp erase` of an e-mail, a phone or a source record no customer carries removes the
    dead-letter entries that carry it and suppresses it: a valid event of theirs sent later is
    dropped, not made into a customer. Before, it failed with "no customer found" and the
    dead-letter kept them for good."""
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    ingest(cdp, tmp_path, "ghost.jsonl", ghost_rejects())
    assert set(GHOST_NEEDLES) - set(needles_in((cdp.home / "deadletter.jsonl").read_bytes(), GHOST_NEEDLES)) == {
        "7911123462"}
    before = others(cdp)
    missing = cdp("customer", "show", GHOST["email"], check=False)
    assert missing.returncode == 1 and "no customer found" in missing.stderr

    # her access request: what the platform holds of her is the dead-letter entries carrying her e-mail
    cdp("customer", "export", GHOST["email"], str(tmp_path / "ghost"))
    held = json.loads((tmp_path / "ghost" / "customer.json").read_text())
    assert held["customer_id"] is None and [r["event_id"] for r in held["rejected_inputs"]] == ["g1"]
    assert (tmp_path / "ghost" / "rejected_inputs.csv").exists()

    refused = cdp("erase", GHOST["email"], check=False, input="n\n")
    assert refused.returncode == 1 and "No customer carries email" in refused.stderr
    assert len(deadletter_ids(cdp)) == 4
    out = cdp("erase", GHOST["email"], "--yes").stdout
    assert "no customer carried it; 1 dead-letter entr(ies); identifier suppressed" in out
    assert deadletter_ids(cdp) == ["g2", "g3", "x1"]
    assert "1 dead-letter entr(ies)" in cdp("erase", "07911 123462", "--yes").stdout  # as the unit wrote it
    assert "1 dead-letter entr(ies)" in cdp("erase", "bank:B-G", "--yes").stdout
    assert deadletter_ids(cdp) == ["x1"]  # another person's entry stays
    assert files_holding(cdp.home, GHOST_NEEDLES) == {}
    erased = [e for e in json.loads(cdp("audit", "--format", "json").stdout) if e["action"] == "erase"]
    assert [(e["customer_id"], e["detail"]["identifiers"], e["detail"]["sources"]) for e in erased] == [
        (None, ["email"], 0), (None, ["phone"], 0), (None, ["source"], 1)]
    exported = [e for e in json.loads(cdp("audit", "--format", "json").stdout) if e["action"] == "export"]
    assert [(e["customer_id"], e["detail"]["identifiers"], e["detail"]["entries"]) for e in exported] == [
        (None, ["email"], 1)]

    # units later send her valid records: dropped, counted, dead-lettered without their input
    out = ingest(cdp, tmp_path, "later.jsonl", jsonl([
        event("g4", "retail", "R-G2", customer={"email": GHOST["email"], "first_name": "Wilhelmina"}),
        event("g5", "telecom", "T-G2", customer={"phone": GHOST["phone"], "last_name": "Quaxley"}),
        event("g6", "bank", "B-G", "cdp.purchase", amount=3.0),
    ]))
    assert _summary_count(out, "suppressed") == 3
    assert files_holding(cdp.home, GHOST_NEEDLES) == {}
    assert others(cdp) == before

    # a customer's identifier still erases the customer; an unreadable phone is refused in one line
    assert "erased customer" in cdp("erase", "bob.other@example.org", "--yes").stdout
    result = cdp("erase", "999999999999", "--yes", check=False)
    assert result.returncode == 1 and result.stderr.startswith("cdp: error: no customer found for phone")
    assert "country code" in result.stderr and "Traceback" not in result.stderr
    # a number no record is known by (not one a person answers) cannot be suppressed: said so
    out = cdp("erase", "+44 7700 900555", "--yes").stdout
    assert "identifier not suppressed (not a number one person answers" in out


def test_identifiers_a_customer_carries_by_then_are_not_erased_as_no_ones(cdp, tmp_path):
    """The CLI and the server find no customer in the view, then the store decides under its lock:
    a customer whose events arrived meanwhile carries the identifier, so nothing is suppressed and
    the caller is told to erase the customer (the server answers 409)."""
    from cdp.application import SELECT_SUPPRESSED, CustomerApplication, CustomerCarries
    from cdp.config import Settings

    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    bob = cdp.query("SELECT customer_id FROM customers WHERE email = 'bob.other@example.org'")[0]["customer_id"]
    with CustomerApplication(Settings.from_env({"CDP_HOME": str(cdp.home)})) as app:
        with pytest.raises(CustomerCarries, match=f"customer {bob} carries the email now"):
            app.erase_identifiers([("email", "nobody.yet@example.org"), ("email", "bob.other@example.org")])
        assert app.store.query(SELECT_SUPPRESSED) == []
    erased = [e for e in json.loads(cdp("audit", "--format", "json").stdout) if e["action"] == "erase"]
    assert erased == []


def deadletter_ids(cdp) -> list[str]:
    return [json.loads(line)["event_id"] for line in (cdp.home / "deadletter.jsonl").read_text().splitlines()]


def test_erase_usage_errors_are_one_line(cdp, tmp_path):
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    result = cdp("erase", "0123456789abcdef0123456789abcdef", "--yes", check=False)
    assert result.returncode == 1 and result.stderr.startswith("cdp: error: no customer found for customer_id")
    result = cdp("erase", "nobody at all", "--yes", check=False)
    assert result.returncode == 1 and result.stderr.startswith("cdp: error: cannot tell what")
    result = cdp("erase", "retail:R-1", "--yes", extra_env={"CDP_MASTER_KEY": "short"}, check=False)
    assert result.returncode == 1 and "CDP_MASTER_KEY" in result.stderr and "Traceback" not in result.stderr
    result = cdp("erase", "retail:R-1", "--yes", extra_env={"CDP_MASTER_KEY": "ab" * 32}, check=False)
    assert result.returncode == 1 and "not the one this event store was written with" in result.stderr


@pytest.mark.postgres
def test_erase_on_postgresql_leaves_nothing_in_a_dump(cdp, tmp_path, fresh_postgres_dsn):
    cdp.env["CDP_EVENT_STORE"] = fresh_postgres_dsn
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    before = others(cdp)
    dump = subprocess.run(["pg_dump", "-d", fresh_postgres_dsn], capture_output=True, check=True).stdout.lower()
    assert b"quorra.zephyrine@example.org" in dump  # the identity index holds it until the erase

    cdp("erase", "quorra.zephyrine@example.org", "--yes")
    dump = subprocess.run(["pg_dump", "-d", fresh_postgres_dsn], capture_output=True, check=True).stdout.lower()
    assert [n for n in NEEDLES if n.encode() in dump] == []
    assert files_holding(cdp.home, NEEDLES) == {}
    assert others(cdp) == before
    ingest(cdp, tmp_path, "resent.jsonl", jsonl([event("n1", "bank", "B-9", customer={"email": ANN["email"]})]))
    dump = subprocess.run(["pg_dump", "-d", fresh_postgres_dsn], capture_output=True, check=True).stdout.lower()
    assert [n for n in NEEDLES if n.encode() in dump] == []


def database_files_holding(superuser: str, dsn: str, needles: list[str]) -> dict[str, list[str]]:
    """Every file of `dsn`'s database (its tables, indexes, TOAST) that contains a needle,
    case-insensitively, read through the server after a checkpoint has written every page out."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    found: dict[str, list[str]] = {}
    dbname = conninfo_to_dict(dsn)["dbname"]
    # relations are named in their own database's catalog: the superuser reads it there
    with psycopg.connect(superuser, autocommit=True) as su, \
            psycopg.connect(with_dbname(superuser, dbname), autocommit=True) as catalog:
        su.execute("CHECKPOINT")
        oid = su.execute("SELECT oid FROM pg_database WHERE datname = %s", (dbname,)).fetchone()[0]
        for (name,) in su.execute("SELECT pg_ls_dir(%s)", (f"base/{oid}",)).fetchall():
            data = su.execute("SELECT pg_read_binary_file(%s, 0, 536870912, true)",  # gone meanwhile: NULL
                              (f"base/{oid}/{name}",)).fetchone()[0]
            hits = needles_in(bytes(data or b""), needles)
            if hits:  # named by its relation too, for whoever reads a failure
                node = name.split("_")[0].split(".")[0]
                relation = catalog.execute("SELECT relname FROM pg_class WHERE relfilenode = %s",
                                           (int(node),)).fetchone() if node.isdigit() else None
                found[name] = [*hits, f"relation {relation[0] if relation else '?'}"]
    return found


@pytest.mark.postgres
def test_erase_on_postgresql_leaves_no_deleted_row_in_the_databases_files(cdp, tmp_path, fresh_postgres_dsn,
                                                                            postgres_superuser):
    """PostgreSQL keeps deleted rows in dead tuples, where a dump does not look and the files still
    hold them: the erasure writes the tables that held the person into new files."""
    cdp.env["CDP_EVENT_STORE"] = fresh_postgres_dsn
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    before = database_files_holding(postgres_superuser, fresh_postgres_dsn, NEEDLES)
    assert "quorra.zephyrine@example.org" in {n for hits in before.values() for n in hits}

    erased = cdp("erase", "quorra.zephyrine@example.org", "--yes")
    assert "store_files" in erased.stdout and "could not be rewritten" not in erased.stderr
    assert database_files_holding(postgres_superuser, fresh_postgres_dsn, NEEDLES) == {}


@pytest.mark.postgres
def test_an_erasure_through_the_server_leaves_no_deleted_row_in_postgresqls_files(cdp, tmp_path, fresh_postgres_dsn,
                                                                                  postgres_superuser):
    """As the test above, through `cdp serve`, which rewrites the tables in the background once it
    has answered, as it does the view's file (GET /health: store_rewrite_pending). Kept in this
    file with the tests that hold a table on purpose (below): the rewrite waits for an older
    transaction in any database of the server, so one of them running meanwhile on another
    worker would leave every table."""
    cdp.env["CDP_EVENT_STORE"] = fresh_postgres_dsn
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    keys = new_keys(cdp.env, {"admin": ("admin", None)})
    assert database_files_holding(postgres_superuser, fresh_postgres_dsn, NEEDLES)
    server = start_server({**cdp.env, "CDP_RATE_LIMIT": "1000", "CDP_VIEW_REWRITE_DELAY": "off"}, tmp_path / "serve.log")
    try:
        erased = server.client(keys["admin"]).delete("/v1/profiles/email:quorra.zephyrine@example.org").json()
        assert erased["sources"] == 2 and erased["store_tables_left"] == [] and "store_rewrite_pending" in erased
        wait_until(lambda: httpx.get(server.url + "/health").json()["store_rewrite_pending"] is False, 60,
                   "the store's tables rewritten")
        assert database_files_holding(postgres_superuser, fresh_postgres_dsn, NEEDLES) == {}
    finally:
        server.stop()


def relations_holding(superuser: str, dsn: str, needles: list[str]) -> set[str]:
    """The relations of the files database_files_holding finds."""
    return {hit.removeprefix("relation ") for hits in database_files_holding(superuser, dsn, needles).values()
            for hit in hits if hit.startswith("relation ")}


@pytest.mark.postgres
def test_a_table_an_erasure_could_not_rewrite_is_rewritten_once_free(cdp, tmp_path, fresh_postgres_dsn,
                                                                      postgres_superuser):
    """A long read holds identity_records past the rewrite's 10 s: the erasure stands, and the
    command says which table still keeps the deleted rows. Commands after it try the table again
    without waiting for the read; the first once it is over rewrites it."""
    import psycopg

    cdp.env["CDP_EVENT_STORE"] = fresh_postgres_dsn
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    left = cdp.home / "erasure.store_tables"
    with psycopg.connect(fresh_postgres_dsn) as reader:
        reader.execute("LOCK TABLE identity_records IN ACCESS SHARE MODE")
        erased = cdp("erase", "quorra.zephyrine@example.org", "--yes")
        assert erased.stdout.startswith("erased customer")
        said = " ".join(erased.stderr.split())
        assert "the store's tables identity_records could not be rewritten" in said
        assert "`VACUUM FULL identity_records`" in said
        assert json.loads(left.read_text()) == ["identity_records"]
        assert relations_holding(postgres_superuser, fresh_postgres_dsn, NEEDLES) == {"identity_records"}
        # tried again, and left again, by a command that does not wait the erasure's 10 s for it
        started = time.perf_counter()
        assert cdp.query("SELECT count(*) AS n FROM customers WHERE last_name = 'Zephyrine'") == [{"n": 0}]
        assert time.perf_counter() - started < 8
        assert json.loads(left.read_text()) == ["identity_records"]
        assert relations_holding(postgres_superuser, fresh_postgres_dsn, NEEDLES) == {"identity_records"}
    assert len(cdp.query(OTHERS_SQL)) == 2  # the read is over: this command rewrites the table
    assert not left.exists()
    assert database_files_holding(postgres_superuser, fresh_postgres_dsn, NEEDLES) == {}


@pytest.mark.postgres
def test_a_running_server_rewrites_a_table_its_erasure_left_once_free(cdp, tmp_path, fresh_postgres_dsn,
                                                                       postgres_superuser):
    """As above through `cdp serve` (`cdp erase` beside it asks the server, and says on stderr that
    the tables are rewritten in the background): its rewrite gives the held table up after 10 s,
    as `cdp erase` alone does, and tries it again later."""
    import psycopg

    cdp.env["CDP_EVENT_STORE"] = fresh_postgres_dsn
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    log = tmp_path / "serve.log"
    server = start_server({**cdp.env, "CDP_RATE_LIMIT": "1000", "CDP_VIEW_REWRITE_DELAY": "off"}, log)
    try:
        health = lambda: httpx.get(server.url + "/health").json()  # noqa: E731
        with psycopg.connect(fresh_postgres_dsn) as reader:
            reader.execute("LOCK TABLE identity_records IN ACCESS SHARE MODE")
            started = time.perf_counter()
            erased = cdp("erase", "quorra.zephyrine@example.org", "--yes")
            assert time.perf_counter() - started < 8  # answered without waiting for the table
            assert "erased customer" in erased.stdout and "2 source record(s)" in erased.stdout
            assert "rewrites the store's tables the person was deleted from in the background" in erased.stderr
            assert "could not be rewritten" not in erased.stderr  # no table this role may not vacuum
            wait_until(lambda: "identity_records could not be rewritten yet" in log.read_text(), 60,
                       "the first rewrite to give the held table up")
            assert relations_holding(postgres_superuser, fresh_postgres_dsn, NEEDLES) == {"identity_records"}
            assert health()["store_rewrite_pending"] is True
        wait_until(lambda: "tables an erasure deleted from are rewritten" in log.read_text(), 60, "the server's retry")
        assert health()["store_rewrite_pending"] is False and not (cdp.home / "erasure.store_tables").exists()
        assert database_files_holding(postgres_superuser, fresh_postgres_dsn, NEEDLES) == {}
    finally:
        server.stop()


def postgres_application(home: Path, dsn: str):
    """The application on a PostgreSQL store, in this process (its scrub called directly)."""
    from cdp.application import CustomerApplication
    from cdp.config import Settings

    return CustomerApplication(Settings.from_env({"CDP_HOME": str(home), "CDP_EVENT_STORE": dsn}))


@pytest.mark.postgres
def test_a_table_another_session_holds_is_left_and_named(tmp_path, fresh_postgres_dsn, monkeypatch):
    """The rewrite waits SCRUB_LOCK_TIMEOUT_MS for a table a long read holds, then leaves it and
    says which; the others are rewritten all the same (and likewise around a table that errs). A
    snapshot older than the rewrite leaves them all."""
    import psycopg

    from cdp import store
    from cdp.application import ERASED_FROM

    monkeypatch.setattr(store, "SCRUB_LOCK_TIMEOUT_MS", 300)
    app = postgres_application(tmp_path, fresh_postgres_dsn)
    nodes = "SELECT relname, relfilenode FROM pg_class WHERE relname = ANY(%s)"
    try:
        with psycopg.connect(fresh_postgres_dsn) as reader:
            files = dict(reader.execute(nodes, (list(ERASED_FROM),)).fetchall())
            reader.execute("LOCK TABLE identity_records IN ACCESS SHARE MODE")  # as a long read would hold it
            started = time.perf_counter()
            assert app.scrub() == ["identity_records"]
            assert time.perf_counter() - started < 5
        with psycopg.connect(fresh_postgres_dsn) as reader:
            rewritten = {name for name, node in reader.execute(nodes, (list(ERASED_FROM),)).fetchall()
                         if node != files[name]}
        assert rewritten == set(ERASED_FROM) - {"identity_records"}
        assert app.scrub() == []  # the read is over
        # one that errs is left too, and the others are rewritten all the same
        assert app.store.scrub(["identity_keys", "no_such_table", "cdp_data_keys"]) == ["no_such_table"]
        # a read as of a snapshot from before a later commit (a pg_dump's) would keep in the new
        # files the rows it may still see: every table is left while it lasts
        with psycopg.connect(fresh_postgres_dsn) as dump, psycopg.connect(fresh_postgres_dsn, autocommit=True) as other:
            dump.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            dump.execute("SELECT count(*) FROM identity_keys").fetchone()
            other.execute("SELECT pg_current_xact_id()")  # a commit after the dump's snapshot
            assert app.scrub() == list(ERASED_FROM)
        assert app.scrub() == []
        # a transaction that wrote and sits idle holds the horizon by its id, without a snapshot
        # (read committed between statements), in this database or in another one of the server:
        # every table is left while it stays open
        for database in (fresh_postgres_dsn, with_dbname(fresh_postgres_dsn, "postgres")):
            with psycopg.connect(database) as idle, psycopg.connect(fresh_postgres_dsn, autocommit=True) as other:
                idle.execute("CREATE TEMP TABLE scratch (n int)")
                idle.execute("INSERT INTO scratch VALUES (1)")
                other.execute("SELECT pg_current_xact_id()")
                pid = idle.info.backend_pid
                held = other.execute("SELECT backend_xid IS NOT NULL, backend_xmin IS NULL FROM pg_stat_activity "
                                     "WHERE pid = %s", (pid,)).fetchall()
                assert held == [(True, True)], database
                assert app.scrub() == list(ERASED_FROM), database
            assert app.scrub() == []
    finally:
        app.close()


@pytest.mark.postgres
def test_a_table_the_role_may_not_vacuum_is_not_tried_again(tmp_path, fresh_postgres_dsn, postgres_superuser):
    """A table the store's role neither owns nor may vacuum as the database's owner is left by
    the rewrite (VACUUM skips it with a warning) and is not kept for the next try: no try of this
    role's would ever rewrite it."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from cdp.config import Settings
    from cdp.erasure import note_tables_left

    database = conninfo_to_dict(fresh_postgres_dsn)
    app = postgres_application(tmp_path, fresh_postgres_dsn)
    try:
        with psycopg.connect(with_dbname(postgres_superuser, database["dbname"]), autocommit=True) as su:
            su.execute("CREATE TABLE theirs (n int)")
            assert app.store.may_rewrite(["identity_keys", "theirs", "no_such_table"]) == ["identity_keys", "theirs"]
            su.execute(f'ALTER DATABASE "{database["dbname"]}" OWNER TO CURRENT_USER')  # no longer the role's
            try:
                assert app.store.may_rewrite(["identity_keys", "theirs", "no_such_table"]) == ["identity_keys"]
                assert app.scrub(["identity_keys", "theirs"]) == ["theirs"]  # as the check said
                settings = Settings.from_env({"CDP_HOME": str(tmp_path), "CDP_EVENT_STORE": fresh_postgres_dsn})
                note_tables_left(settings, app, ["identity_records", "theirs"])
                assert json.loads(settings.unscrubbed_tables_path.read_text()) == ["identity_records"]
                note_tables_left(settings, app, ["theirs"])
                assert not settings.unscrubbed_tables_path.exists()
            finally:
                su.execute(f'ALTER DATABASE "{database["dbname"]}" OWNER TO "{database["user"]}"')  # for its drop
    finally:
        app.close()


@pytest.mark.postgres
def test_a_rewrite_the_database_cuts_off_leaves_every_table_and_the_next_one_works(tmp_path, fresh_postgres_dsn,
                                                                                   postgres_superuser):
    """The erasure is committed before its tables are rewritten: a database gone meanwhile makes
    the rewrite say what it left, not fail the erasure; the next one reconnects."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from cdp.application import ERASED_FROM

    app = postgres_application(tmp_path, fresh_postgres_dsn)
    try:
        assert app.scrub() == []
        with psycopg.connect(postgres_superuser, autocommit=True) as su:
            cut = su.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                             (conninfo_to_dict(fresh_postgres_dsn)["dbname"],)).fetchone()[0]
        assert cut >= 1
        assert app.scrub() == list(ERASED_FROM)
        assert app.scrub() == []
    finally:
        app.close()


def test_a_split_is_audited_and_an_erased_customer_stays_listed(cdp, tmp_path):
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    ann = cdp.query("SELECT customer_id FROM customers WHERE last_name = 'Zephyrine'")[0]["customer_id"]
    cdp("identity", "split", ann, "--source", "bank:B-1", "--reason", "two people")
    cdp("erase", ann, "--yes")
    entries = json.loads(cdp("audit", "--customer", ann, "--format", "json").stdout)
    assert [e["action"] for e in entries] == ["split", "erase"]
    assert entries[0]["detail"]["reason"] == "two people" and entries[1]["detail"]["sources"] == 1
    # the split-off record is another person: still there, with its own data
    assert cdp.query("SELECT sources FROM customers WHERE first_name = 'Quorralind'") == [{"sources": 1}]


@pytest.mark.kafka
def test_erase_publishes_a_tombstone_on_the_profile_changelog(cdp, tmp_path, kafka_bootstrap, fresh_topic_prefix):
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    ann = cdp.query("SELECT customer_id FROM customers WHERE last_name = 'Zephyrine'")[0]["customer_id"]
    cdp.env.update(CDP_KAFKA_BOOTSTRAP=kafka_bootstrap, CDP_TOPIC_PREFIX=fresh_topic_prefix)
    cdp("erase", ann, "--yes")
    out = subprocess.run(["kcat", "-b", kafka_bootstrap, "-C", "-t", f"{fresh_topic_prefix}cdp.profiles", "-e",
                          "-q", "-K", "\t", "-Z", "-f", "%k\t%S\n"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.splitlines() == [f"{ann}\t-1"]  # key, value size -1: a tombstone (null value)


@pytest.mark.kafka
def test_tombstones_a_broker_out_of_reach_missed_go_with_the_next_erasure(cdp, tmp_path, kafka_bootstrap,
                                                                          fresh_topic_prefix):
    """The erasure itself does not wait for the broker: done everywhere else, it says the tombstone
    was not sent, keeps the id (erasure.tombstones, no personal data) and the next erasure sends it
    with its own, as does the next `cdp ingest --kafka`; a read command meanwhile does not try (it
    would wait for the broker)."""
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    ids = {r["last_name"]: r["customer_id"] for r in cdp.query("SELECT customer_id, last_name FROM customers")}
    cdp.env.update(CDP_TOPIC_PREFIX=fresh_topic_prefix)
    missed = cdp("erase", ids["Zephyrine"], "--yes", extra_env={"CDP_KAFKA_BOOTSTRAP": "127.0.0.1:9"})
    assert "tombstones were not sent to cdp.profiles (Kafka broker unreachable at 127.0.0.1:9" in missed.stderr
    assert files_holding(cdp.home, NEEDLES) == {}
    assert json.loads((cdp.home / "erasure.tombstones").read_text()) == [ids["Zephyrine"]]
    cdp.env.update(CDP_KAFKA_BOOTSTRAP=kafka_bootstrap)
    assert cdp.query("SELECT count(*) AS n FROM customers") == [{"n": 2}]
    assert (cdp.home / "erasure.tombstones").exists()
    cdp("erase", ids["Other"], "--yes")
    out = subprocess.run(["kcat", "-b", kafka_bootstrap, "-C", "-t", f"{fresh_topic_prefix}cdp.profiles", "-e",
                          "-q", "-K", "\t", "-Z", "-f", "%k\t%S\n"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert sorted(out.splitlines()) == sorted([f"{ids['Zephyrine']}\t-1", f"{ids['Other']}\t-1"])
    assert not (cdp.home / "erasure.tombstones").exists()

    # without a server, the next command that reaches the broker sends a missed one too
    missed = cdp("erase", ids["Third"], "--yes", extra_env={"CDP_KAFKA_BOOTSTRAP": "127.0.0.1:9"})
    assert "the next `cdp erase` or `cdp ingest --kafka` sends them" in missed.stderr
    published = cdp("ingest", "--kafka", str(write(tmp_path / "new.jsonl", [event("n1", "retail", "R-5")])))
    assert "sent the 1 tombstone(s) an earlier erasure could not send" in published.stderr
    out = subprocess.run(["kcat", "-b", kafka_bootstrap, "-C", "-t", f"{fresh_topic_prefix}cdp.profiles", "-e",
                          "-q", "-K", "\t", "-Z", "-f", "%k\t%S\n"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert f"{ids['Third']}\t-1" in out.splitlines() and not (cdp.home / "erasure.tombstones").exists()


@pytest.mark.kafka
def test_publishing_drops_an_erased_persons_events_and_keeps_only_their_ids(cdp, tmp_path, kafka_bootstrap,
                                                                            fresh_topic_prefix):
    """`cdp ingest --kafka` on a machine that holds the store screens what it reads as the embedded
    run does (above): a unit re-sending an old export of an erased person puts no byte of them
    back on disk or in the raw topic; their events are not published, their broken lines are kept
    as ids alone, and another person's broken line is kept whole, to be fixed."""
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    cdp("erase", "quorra.zephyrine@example.org", "--yes")
    cdp.env.update(CDP_KAFKA_BOOTSTRAP=kafka_bootstrap, CDP_TOPIC_PREFIX=fresh_topic_prefix)
    path = tmp_path / "resent.jsonl"
    path.write_bytes(jsonl([
        event("r1", "retail", "R-1", "cdp.purchase", amount="lots", customer={"email": ANN["email"]}),
        event("r2", "telecom", "T-80", "cdp.purchase", amount="lots",
              customer={"phone": "07911 123461", "first_name": "Quorralind", "last_name": "Zephyrine"}),
        event("r3", "telecom", "T-81", "cdp.purchase", amount="lots", customer={"first_name": "Bob"}),
        event("ok1", "retail", "R-7", customer={"email": "dee@example.org"}),
        event("a1b", "retail", "R-9", customer={"email": ANN["email"], "first_name": "Quorralind"}),  # valid, hers
        event("a2b", "bank", "B-1", "cdp.purchase", amount=5.0),  # valid, her erased source record
    ]) + b'{"broken": "Quorra.Zephyrine@Example.org wrote this\n')
    published = cdp("ingest", "--kafka", str(path))
    assert published.stdout.startswith("published 1 events")
    said = " ".join(published.stderr.split())
    assert "1 rejected event(s) written to" in said and "5 event(s) of erased people suppressed" in said
    entries = [json.loads(line) for line in (cdp.home / "deadletter.jsonl").read_text().splitlines()]
    assert [(e["event_id"], e["reason"] == "suppressed", e["input"] is None) for e in entries] == [
        ("r1", True, True), ("r2", True, True), ("r3", False, False), ("a1b", True, True), ("a2b", True, True),
        (None, True, True)]
    assert files_holding(cdp.home, NEEDLES) == {}
    topic = subprocess.run(["kcat", "-b", kafka_bootstrap, "-C", "-t", f"{fresh_topic_prefix}cdp.events", "-e", "-q"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert [json.loads(line)["id"] for line in topic.splitlines()] == ["ok1"]
    # a unit's machine that only publishes has no store to screen with, and gets none made
    publisher = tmp_path / "publisher"
    cdp.env["CDP_HOME"] = str(publisher)
    published = cdp("ingest", "--kafka", str(path))
    assert published.stdout.startswith("published 3 events")
    assert "4 rejected event(s) written to" in " ".join(published.stderr.split())
    assert not (publisher / "events.sqlite").exists() and not (publisher / "master.key").exists()
    entries = [json.loads(line) for line in (publisher / "deadletter.jsonl").read_text().splitlines()]
    assert [e["event_id"] for e in entries if e["input"]] == ["r1", "r2", "r3", None]
    # one that holds the store, while the store is out of reach: publishing goes on, and says so
    cdp.env.update(CDP_HOME=str(tmp_path / "outage"), CDP_EVENT_STORE="postgresql://cdp:cdp@127.0.0.1:1/cdp")
    published = cdp("ingest", "--kafka", str(path))
    assert published.stdout.startswith("published 3 events")
    said = " ".join(published.stderr.split())
    assert "4 rejected event(s) written to" in said
    assert "not checked for erased people's identifiers (PostgreSQL unreachable at 127.0.0.1:1/cdp" in said
