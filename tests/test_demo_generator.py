"""The demo data generator: reproducible, well-formed, truthful, fast."""

import csv
import re
import tomllib
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest

from cdp.demo import DemoSpec, generate, iter_events
from cdp.demo.generator import EVENT_TYPES
from identity.evaluation import read_truth

ENVELOPE = ("specversion", "id", "source", "type", "time", "subject", "datacontenttype", "data")
SOURCES = {"retail": {"retail/pos", "retail/web"}, "bank": {"bank/core"}, "telecom": {"telecom/crm"}}
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
UNIT_IDS = {"retail": re.compile(r"^R\d{7}$"), "bank": re.compile(r"^B-\d{5,}$"), "telecom": re.compile(r"^T\d{8,}$")}


def read_lines(files):
    """(unit, good events, bad lines as (kind, raw)) from the JSONL files."""
    good, bad = [], []
    for path in files:
        if path.suffix != ".jsonl":
            continue
        unit = path.stem
        for raw in path.read_bytes().splitlines():
            try:
                ev = orjson.loads(raw)
            except orjson.JSONDecodeError:
                bad.append(("broken_json", raw))
                continue
            data = ev["data"]
            if ev["type"] not in EVENT_TYPES:
                bad.append(("unknown_type", raw))
            elif "business_unit" not in data:
                bad.append(("missing_business_unit", raw))
            elif any(isinstance(data.get(f), str) for f in ("amount", "duration_seconds", "score", "granted")):
                bad.append(("wrong_type", raw))
            else:
                good.append((unit, ev))
    return good, bad


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    spec = DemoSpec(people=1500, seed=11, invalid_rate=0.01)
    calls = []
    files = generate(directory, spec, progress=calls.append, csv_unit="telecom")
    return spec, files, calls


def test_reproducible_same_seed_same_bytes(tmp_path: Path):
    spec = DemoSpec(people=300, seed=3, invalid_rate=0.02)
    a = generate(tmp_path / "a", spec, csv_unit="telecom")
    b = generate(tmp_path / "b", spec, csv_unit="telecom")
    c = generate(tmp_path / "c", DemoSpec(people=300, seed=4, invalid_rate=0.02))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "truth.csv" in names and "telecom_customers.mapping.toml" in names
    assert not [n for n in names if n.startswith(".")]  # temporary runs cleaned up
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (a.events, a.invalid, a.source_records) == (b.events, b.invalid, b.source_records)
    assert (tmp_path / "a" / "retail.jsonl").read_bytes() != (tmp_path / "c" / "retail.jsonl").read_bytes()
    assert c.event_files == [tmp_path / "c" / f"{u}.jsonl" for u in ("retail", "bank", "telecom")]


def test_envelope_and_types(demo):
    spec, files, _ = demo
    good, bad = read_lines(files.event_files)
    assert len(good) == files.events and len(bad) == files.invalid
    types = Counter(ev["type"] for _, ev in good)
    assert set(types) == set(EVENT_TYPES)
    for unit, ev in good:
        assert list(ev) == list(ENVELOPE)
        assert ev["specversion"] == "1.0" and ev["datacontenttype"] == "application/json"
        assert ev["source"] in SOURCES[unit]
        assert RFC3339.match(ev["time"]) and "2024-11-01" <= ev["time"][:10] <= "2026-11-02"
        data = ev["data"]
        assert data["business_unit"] == unit
        assert ev["subject"] == data["customer"]["source_id"]
        assert UNIT_IDS[unit].match(data["customer"]["source_id"])
        if ev["type"] == "cdp.purchase":
            assert 1 <= len(data["items"]) <= 4 and data["currency"] == "EUR"
            total = sum(i["quantity"] * i["unit_price"] for i in data["items"])
            assert data["amount"] == pytest.approx(total, abs=0.005)
        elif ev["type"] == "cdp.feedback":
            assert (0 <= data["score"] <= 10) if data["kind"] == "nps" else (1 <= data["score"] <= 5)
        elif ev["type"] == "cdp.consent":
            assert isinstance(data["granted"], bool)
        elif ev["type"] == "cdp.call":
            assert isinstance(data["duration_seconds"], int) and data["direction"] in ("inbound", "outbound")
    emails = Counter(ev["data"]["action"] for _, ev in good if ev["type"] == "cdp.email")
    assert emails["sent"] > emails["opened"] > emails["clicked"] > 0
    # some events carry only the source_id, identify events carry the profile
    only_id = sum(1 for _, ev in good if list(ev["data"]["customer"]) == ["source_id"])
    assert 0.2 * len(good) < only_id < 0.8 * len(good)
    # ids unique over all lines, bad ones included
    ids = [ev["id"] for _, ev in good] + [re.search(rb'"id":"([^"]+)"', raw).group(1).decode() for _, raw in bad]
    assert len(ids) == len(set(ids))


def test_files_in_time_order_and_identify_first(demo):
    _, files, _ = demo
    good, _ = read_lines(files.event_files)
    first = {}
    by_unit = defaultdict(list)
    for unit, ev in good:
        by_unit[unit].append(ev["time"])
        first.setdefault((unit, ev["subject"]), ev["type"])
    for times in by_unit.values():
        assert times == sorted(times)
    assert set(first.values()) == {"cdp.identify"}


def test_invalid_lines(demo):
    _, files, _ = demo
    good, bad = read_lines(files.event_files)
    kinds = Counter(kind for kind, _ in bad)
    assert set(kinds) == {"broken_json", "unknown_type", "missing_business_unit", "wrong_type"}
    assert 0.004 < files.invalid / files.events < 0.02
    assert any(b'"amount":"twelve"' in raw for kind, raw in bad if kind == "wrong_type")
    # bad lines are not source records of their own
    truth = read_truth(files.truth_file)
    assert {(u, ev["subject"]) for u, ev in good} == set(truth)


def test_no_invalid_by_default(tmp_path: Path):
    files = generate(tmp_path, DemoSpec(people=200))
    good, bad = read_lines(files.event_files)
    assert files.invalid == 0 and bad == [] and len(good) == files.events


def test_truth(demo):
    spec, files, calls = demo
    truth = read_truth(files.truth_file)
    rows = files.truth_file.read_text().splitlines()
    assert rows[0] == "business_unit,source_id,person_id"
    assert len(rows) - 1 == len(truth) == files.source_records
    assert len(set(truth.values())) == spec.people == files.people
    units = defaultdict(set)
    records = Counter(truth.values())
    for (unit, _), person in truth.items():
        units[person].add(unit)
    spread = Counter(len(u) for u in units.values())
    assert spread[1] > spread[2] > spread[3] > 0
    assert 0.2 < (spread[2] + spread[3]) / spec.people < 0.6
    duplicates = sum(1 for p, n in records.items() if n > len(units[p]))
    assert 0.01 * spec.people < duplicates < 0.1 * spec.people
    # size relation documented on DemoSpec: ≈ people × 1.55 × events_per_record
    assert 0.85 < files.events / (spec.people * 1.55 * spec.events_per_record) < 1.15
    assert calls and calls[-1] == files.events and calls == sorted(calls)


def test_profiles_are_perturbed_realistically(demo):
    _, files, _ = demo
    good, _ = read_lines(files.event_files)
    identifies = [(u, ev["data"]["customer"]) for u, ev in good if ev["type"] == "cdp.identify"]
    phones = [c["phone"] for _, c in identifies if "phone" in c]
    assert any(p.startswith("+44 ") for p in phones) and any(p.startswith("0044 ") for p in phones)
    assert any(p.startswith("(0") for p in phones)
    assert any(e != e.strip() or e != e.lower() for _, c in identifies if (e := c.get("email")))
    assert all("national_id" not in c for u, c in identifies if u != "bank")
    assert any("national_id" in c for u, c in identifies if u == "bank")
    assert all("loyalty_id" not in c for u, c in identifies if u != "retail")
    assert any("loyalty_id" in c for u, c in identifies if u == "retail")
    no_email = sum(1 for _, c in identifies if "email" not in c) / len(identifies)
    assert 0.15 < no_email < 0.45


def test_legacy_csv_export(demo):
    _, files, _ = demo
    csv_path = files.event_files[-1]
    assert csv_path.name == "telecom_customers.csv"
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter=";"))
    truth = read_truth(files.truth_file)
    assert {r["CustomerNo"] for r in rows} == {s for (u, s) in truth if u == "telecom"}
    mapping = tomllib.loads((csv_path.parent / "telecom_customers.mapping.toml").read_text())
    assert mapping["type"] == "cdp.identify" and mapping["business_unit"] == "telecom"
    assert mapping["source"] == "telecom/legacy-export" and mapping["time"] == "Since"
    assert mapping["columns"]["customer.source_id"] == "CustomerNo"
    assert set(mapping["columns"].values()) | {"Since"} == set(rows[0])
    assert all(RFC3339.match(r["Since"]) for r in rows)


def test_iter_events_matches_files(tmp_path: Path):
    spec = DemoSpec(people=400, seed=5, invalid_rate=0.02)
    files = generate(tmp_path, spec)
    good, bad = read_lines(files.event_files)
    truth: dict = {}
    in_memory = list(iter_events(spec, valid_only=True, truth=truth))
    assert sorted(orjson.dumps(ev) for ev in in_memory) == sorted(orjson.dumps(ev) for _, ev in good)
    assert truth == read_truth(files.truth_file)
    with_bad = list(iter_events(spec))
    assert len(with_bad) == len(good) + sum(1 for k, _ in bad if k != "broken_json")


def test_hard_mode(tmp_path: Path):
    spec = DemoSpec(people=1500, seed=2, hard=True)
    truth: dict = {}
    customers: dict = {}
    for ev in iter_events(spec, truth=truth):
        if ev["type"] == "cdp.identify":
            customers[(ev["data"]["business_unit"], ev["subject"])] = ev["data"]["customer"]
    # no email shared across units by the same person
    email_units = defaultdict(set)
    for (unit, sid), c in customers.items():
        if "email" in c:
            email_units[(truth[(unit, sid)], c["email"].strip().lower())].add(unit)
    assert email_units and all(len(u) == 1 for u in email_units.values())
    # households: a phone shared by different people
    phone_people = defaultdict(set)
    for key, c in customers.items():
        if "phone" in c:
            phone_people[re.sub(r"\D", "", c["phone"])[-10:]].add(truth[key])
    assert sum(1 for p in phone_people.values() if len(p) > 1) > 0.05 * spec.people
    # ≈15 % with only name + address + date of birth
    bare = sum(1 for c in customers.values()
               if set(c) == {"source_id", "first_name", "last_name", "address", "date_of_birth"})
    assert 0.10 < bare / len(customers) < 0.20


def test_a_hundred_thousand_events_stream_in_flat_memory():
    """How fast is for bench/ (speed is measured there, not asserted on a shared machine)."""
    spec = DemoSpec(people=8200, seed=1)
    n = sum(1 for _ in iter_events(spec))
    assert n >= 100_000, n
    # memory stays flat while streaming: the peak does not grow with the number of people
    peaks = []
    for people in (500, 2500):
        tracemalloc.start()
        for _ in iter_events(DemoSpec(people=people)):
            pass
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] * 1.5 + 1_000_000 and peaks[1] < 5_000_000, peaks


def test_small_runs_and_multi_level_merge_give_the_same_bytes(tmp_path: Path, monkeypatch):
    from cdp.demo import generator

    spec = DemoSpec(people=300, seed=9, invalid_rate=0.01)
    generate(tmp_path / "one", spec)
    monkeypatch.setattr(generator, "_RUN_EVENTS", 50)
    monkeypatch.setattr(generator, "_MAX_OPEN_RUNS", 3)
    generate(tmp_path / "many", spec)
    for name in ("retail.jsonl", "bank.jsonl", "telecom.jsonl", "truth.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name
    assert not [p for p in (tmp_path / "many").iterdir() if p.name.startswith(".")]
