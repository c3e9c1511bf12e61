"""Tried as an attacker and as a careless user would (issue 14): user SQL cannot reach the
machine's files, bad input never costs a good event, every user error is one line."""
from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from tests.events import event, write


def deadletter(cdp) -> list[dict]:
    path = cdp.home / "deadletter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def one_line_error(result) -> str:
    """The command failed with exactly one line `cdp: error: …`, no traceback, no binding noise."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cdp: error: "), result.stderr
    return lines[0]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_view(cdp, directory):
    write(directory / "e.jsonl", [
        event("1", "retail", "R1", "cdp.purchase", customer={"email": "ann@example.org", "first_name": "Ann"}),
        event("2", "bank", "B1", customer={"email": "ann@example.org"}),
    ])
    cdp("ingest", str(directory / "e.jsonl"))
    return cdp


@pytest.fixture
def view(cdp, tmp_path):
    """A small view of one's own, for tests that change or damage it."""
    return build_view(cdp, tmp_path)


@pytest.fixture(scope="module")
def shared_view(tmp_path_factory, cdp_at):
    """One small view for the tests that only read it (and check it stays as it was)."""
    directory = tmp_path_factory.mktemp("hardening")
    return build_view(cdp_at(directory / "home"), directory)


# ------------------------------------------------------------------------------ the SQL sandbox

def test_query_cannot_read_or_write_files_nor_change_its_settings(view, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    target = tmp_path / "out"
    target.mkdir()
    store = view.home / "events.sqlite"
    before = digest(store)
    attacks = [
        f"SELECT * FROM read_csv('{secret}', header=false)",
        f"SELECT * FROM read_text('{secret}')",
        f"SELECT * FROM read_blob('{secret}')",
        f"SELECT * FROM glob('{tmp_path}/*')",
        f"COPY customers TO '{target}/x.csv'",
        f"COPY (SELECT 'overwritten') TO '{store}' (FORMAT csv)",
        f"EXPORT DATABASE '{target}/export'",
        f"ATTACH '{target}/other.duckdb' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        f"SELECT 1; COPY customers TO '{target}/y.csv'",
    ]
    for sql in attacks:
        line = one_line_error(view("query", sql, check=False))
        assert "top secret" not in line
    assert list(target.iterdir()) == []
    assert digest(store) == before
    assert view.query("SELECT count(*) AS n FROM customer_events") == [{"n": 2}]  # still works
    write(tmp_path / "more.jsonl", [event("3", "retail", "R2")])
    view("ingest", str(tmp_path / "more.jsonl"))  # the event store was not touched
    assert view.query("SELECT count(*) AS n FROM customer_events") == [{"n": 3}]


def test_the_sandbox_refuses_every_way_out(shared_view, tmp_path):
    """The same defences without a process per statement, for the many variants."""
    from projections.sandbox import QueryLimits, QueryRejected, run_query

    path = shared_view.home / "view.duckdb"
    for sql in [f"SELECT * FROM read_parquet('{tmp_path}/x.parquet')", "SELECT * FROM read_json('/etc/hostname')",
                "SELECT * FROM sniff_csv('/etc/hostname')", "SELECT * FROM parquet_metadata('/etc/hostname')",
                "PRAGMA memory_limit='10GB'", "RESET memory_limit", "CALL pragma_version()", "CHECKPOINT",
                "DETACH view", "USE memory", "CREATE TABLE t AS SELECT 1", "DELETE FROM customers",
                f"EXPLAIN ANALYZE COPY customers TO '{tmp_path}/z.csv'", "select 1 from"]:
        with pytest.raises(QueryRejected):
            run_query(path, sql)
    assert run_query(path, "SUMMARIZE customers").table.num_rows > 0
    assert run_query(path, "DESCRIBE customers").table.num_rows > 0
    assert run_query(path, "EXPLAIN SELECT * FROM customers").table.num_rows > 0
    assert run_query(path, "WITH c AS (SELECT 1 AS x) SELECT * FROM c").table.to_pylist() == [{"x": 1}]
    with pytest.raises(QueryRejected, match="more than 10 rows"):
        run_query(path, "SELECT * FROM range(100)", QueryLimits(rows=10))
    with pytest.raises(QueryRejected, match="longer than"):
        run_query(path, "SELECT count(*) FROM range(100000000000) a, range(100) b", QueryLimits(seconds=0.3))
    assert not list(tmp_path.glob("*.csv"))


def test_memory_setting_is_validated_not_pasted_into_sql(shared_view, tmp_path):
    planted = tmp_path / "mem.csv"
    for value in ("lots", f"1GB'; COPY (SELECT 1) TO '{planted}'; --"):
        line = one_line_error(shared_view("query", "SELECT 1", check=False, extra_env={"CDP_DUCKDB_MEMORY": value}))
        assert "CDP_DUCKDB_MEMORY" in line
    assert not planted.exists()


# ------------------------------------------------------------------------------ one line per user error

@pytest.mark.parametrize("sql", ["", ";", "-- only a comment", "/* nothing */"])
def test_empty_queries_are_one_line(shared_view, sql):
    assert "empty" in one_line_error(shared_view("query", "--", sql, check=False))


def test_json_output_of_every_duckdb_type(shared_view):
    rows = shared_view.query("SELECT INTERVAL 1 DAY AS i, 'a'::BLOB AS b, 170141183460469231731687303715884105727::HUGEINT AS h, "
                      "'10:00:00+01'::TIMETZ AS tz, 1.25::DECIMAL(10,2) AS d, [1, 2] AS l, {'k': 'v'} AS s")
    assert rows == [{"i": "0 months 1 days 0 seconds", "b": "\\x61", "h": "170141183460469231731687303715884105727",
                     "tz": rows[0]["tz"], "d": 1.25, "l": [1, 2], "s": {"k": "v"}}]
    assert rows[0]["tz"].startswith("09:00:00") or rows[0]["tz"].startswith("10:00:00")


def test_a_damaged_view_says_which_file_and_how_to_recover(view):
    (view.home / "view.duckdb").write_bytes(b"not a database" * 1000)
    for args in (("query", "SELECT 1"), ("customer", "show", "ann@example.org")):
        line = one_line_error(view(*args, check=False))
        assert "view.duckdb" in line and "cdp projections rebuild" in line
    view("projections", "rebuild")
    assert view.query("SELECT count(*) AS n FROM customer_events") == [{"n": 2}]


def test_a_damaged_event_store_says_which_file(view, tmp_path):
    (view.home / "events.sqlite").write_bytes(b"not a database" * 1000)
    write(tmp_path / "more.jsonl", [event("3", "retail", "R2")])
    line = one_line_error(view("ingest", str(tmp_path / "more.jsonl"), check=False))
    assert "events.sqlite" in line and "backup" in line


def test_terminal_output_escapes_control_characters(cdp, tmp_path):
    write(tmp_path / "e.jsonl", [event("1", "retail", "R1", customer={
        "email": "eve@example.org", "first_name": "\x1b[31mEve\x1b[0m", "last_name": "[bold]Evil\x07"})])
    cdp("ingest", str(tmp_path / "e.jsonl"))
    for args in (("customer", "show", "eve@example.org"), ("query", "SELECT first_name, last_name FROM customers")):
        out = cdp(*args).stdout
        assert "\x1b" not in out and "\x07" not in out
        assert "\\x1b[31mEve" in out and "[bold]Evil\\x07" in out
    assert cdp.query("SELECT first_name FROM customers") == [{"first_name": "\x1b[31mEve\x1b[0m"}]  # data kept


# ------------------------------------------------------------------------------ ranges at the edge

def test_extreme_values_are_dead_lettered_and_never_cost_the_good_events(cdp, tmp_path):
    bad = {
        "late-west": event("late-west", "retail", "R1", time="9999-12-31T23:59:59-01:00"),
        "early-east": event("early-east", "retail", "R1", time="0001-01-01T00:00:00+01:00"),
        "year-9999": event("year-9999", "retail", "R1", time="9999-01-01T00:00:00Z"),
        "huge": event("huge", "retail", "R1", "cdp.purchase", amount=1e308),
        "negative": event("negative", "retail", "R1", "cdp.purchase", amount=-5.0),
        "price": event("price", "retail", "R1", "cdp.purchase", items=[{"sku": "s", "quantity": 1, "unit_price": 1e300}]),
        "blank-source-id": event("blank-source-id", "retail", " "),
        "newline-source-id": event("newline-source-id", "retail", "R\n1"),
        "nul-source-id": event("nul-source-id", "retail", "R\x001"),
        "   ": event("   ", "retail", "R1"),
        "new\nline": event("new\nline", "retail", "R1"),
        "nul\x00": event("nul\x00", "retail", "R1"),
    }
    good = [event(f"g{i}", "retail", f"G{i}", "cdp.purchase", order_id=f"o{i}", amount=5.0) for i in range(3)]
    lines = [list(bad.values())[0], *good[:1], *list(bad.values())[1:], *good[1:]]
    cdp("ingest", str(write(tmp_path / "extreme.jsonl", lines)))

    entries = {e["event_id"]: e for e in deadletter(cdp)}
    assert set(entries) == set(bad)
    for event_id, entry in entries.items():
        assert entry["reason"] and json.loads(entry["input"])["id"] == event_id
    assert "CDP_MAX_FUTURE" in entries["year-9999"]["reason"] and "CDP_MAX_AMOUNT" in entries["huge"]["reason"]
    assert cdp.query("SELECT count(*) AS n, sum(amount) AS total FROM customer_events") == [{"n": 3, "total": 15.0}]
    assert cdp.query("SELECT max(lifetime_value) AS v FROM customers") == [{"v": 5.0}]


def test_bounds_are_configuration(cdp, tmp_path):
    from datetime import datetime, timedelta, timezone

    soon = (datetime.now(timezone.utc) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = write(tmp_path / "e.jsonl", [event("soon", "retail", "R1", time=soon),
                                        event("dear", "retail", "R2", "cdp.purchase", amount=150.0)])
    cdp("ingest", str(path), extra_env={"CDP_MAX_FUTURE": "1h", "CDP_MAX_AMOUNT": "100"})
    assert {e["event_id"] for e in deadletter(cdp)} == {"soon", "dear"}
    cdp("ingest", str(path), extra_env={"CDP_MAX_FUTURE": "1d", "CDP_MAX_AMOUNT": "1000"})
    assert cdp.query("SELECT count(*) AS n FROM customer_events") == [{"n": 2}]
    assert "CDP_MAX_FUTURE" in one_line_error(cdp("ingest", str(path), check=False,
                                                  extra_env={"CDP_MAX_FUTURE": "soon"}))


def test_a_vanity_freephone_number_is_shown_but_never_links(cdp, tmp_path):
    cdp("ingest", str(write(tmp_path / "e.jsonl", [
        event("1", "retail", "R1", customer={"first_name": "Ann", "phone": "0800 FLOWERS"}),
        event("2", "bank", "B1", customer={"first_name": "Bob", "phone": "0800 FLOWERS"}),
    ])))
    rows = cdp.query("SELECT count(*) AS n, count(phone) AS phones FROM customers")
    assert rows == [{"n": 2, "phones": 2}]


# ------------------------------------------------------------------------------ keys and conflicts

def test_keys_cannot_collide_and_control_characters_never_reach_a_key(cdp, tmp_path):
    cdp("ingest", str(write(tmp_path / "e.jsonl", [
        event("c", "retail", "R1", source="retail/a:b"),
        event("b:c", "retail", "R1", source="retail/a"),
        event("c", "retail", "R1", source="retail/a\x1fb"),
        event("b\x1fc", "retail", "R1", source="retail/a"),
    ])))
    assert cdp.query("SELECT count(*) AS n FROM customer_events") == [{"n": 2}]
    assert len(deadletter(cdp)) == 2


def test_a_resent_id_with_other_content_is_a_conflict_and_the_first_version_stays(cdp, tmp_path):
    first = event("o1", "retail", "R1", "cdp.purchase", amount=10.0)
    same = json.dumps(first, indent=1, sort_keys=True).replace("\n", " ")  # other spacing, same content
    corrected = event("o1", "retail", "R1", "cdp.purchase", amount=12.0)
    cdp("ingest", str(write(tmp_path / "a.jsonl", [first])))
    result = cdp("ingest", str(write(tmp_path / "b.jsonl", [same, corrected])))
    assert "conflict: 1" in " ".join(result.stdout.split())
    [entry] = deadletter(cdp)
    assert entry["reason"].startswith("event 'o1' from 'retail/test' was already stored with other content")
    assert entry["stored_digest"] != entry["digest"] and len(entry["digest"]) == 16
    assert json.loads(entry["input"])["data"]["amount"] == 12.0
    assert cdp.query("SELECT amount FROM customer_events") == [{"amount": 10.0}]


def test_a_store_with_the_old_keys_is_migrated(cdp, tmp_path):
    path = write(tmp_path / "e.jsonl", [event(str(i), "retail", f"R{i}") for i in range(3)])
    cdp("ingest", str(path))
    with sqlite3.connect(cdp.home / "events.sqlite") as db:  # as a store from before issue 14 kept them
        keys = [k for (k,) in db.execute("SELECT key FROM cdp_event_keys")]
        db.execute("DELETE FROM cdp_event_keys")
        db.execute("ALTER TABLE cdp_event_keys DROP COLUMN digest")
        db.executemany("INSERT INTO cdp_event_keys VALUES (?)",
                       [("retail/test\x1f" + k.rsplit(":", 1)[1],) for k in keys])
    result = cdp("ingest", str(path))
    assert "duplicates ignored │ 3" in " ".join(result.stdout.split()).replace("  ", " ") or \
        cdp.query("SELECT count(*) AS n FROM customer_events") == [{"n": 3}]
    assert cdp.query("SELECT count(*) AS n FROM customer_events") == [{"n": 3}]
    with sqlite3.connect(cdp.home / "events.sqlite") as db:
        assert sorted(k for (k,) in db.execute("SELECT key FROM cdp_event_keys")) == sorted(keys)


# ------------------------------------------------------------------------------ files

MAPPING = ('type = "cdp.purchase"\nbusiness_unit = "retail"\nsource = "retail/legacy"\ntime = "Date"\n'
           '[columns]\n"customer.source_id" = "CustNo"\n"customer.email" = "Email"\namount = "Total"\n'
           'order_id = "CustNo"\n[constants]\ncurrency = "EUR"\n')


def test_a_file_without_mapping_fails_the_run_before_anything_is_stored(cdp, tmp_path):
    good = write(tmp_path / "good.jsonl", [event("1", "retail", "R1")])
    (tmp_path / "a.csv").write_text("CustNo\nC1\n")
    (tmp_path / "b.parquet").write_bytes(b"PAR1")
    line = one_line_error(cdp("ingest", str(good), str(tmp_path / "a.csv"), str(tmp_path / "b.parquet"), check=False))
    assert "a.csv" in line and "b.parquet" in line and "nothing was ingested" in line
    assert not (cdp.home / "events.sqlite").exists() or \
        sqlite3.connect(cdp.home / "events.sqlite").execute("SELECT count(*) FROM cdp_event_keys").fetchone() == (0,)


def test_an_unclosed_quote_costs_only_its_own_row(cdp, tmp_path):
    (tmp_path / "legacy.txt").write_text(
        "CustNo;Email;Total;Date\n"
        "C1;ann@example.org;12,50;2025-01-02\n"
        'C2;"bob@example.org;13;2025-01-02\n'
        "C3;cy@example.org;14;2025-01-03\n"
        "C4;dee@example.org;15\n"
        'C5;"multi\nline@example.org";16;2025-01-04\n'
        "C6;ed@example.org;-5;2025-01-05\n"
        "C7;fay@example.org;17;2025-01-06\n", encoding="utf-8")
    (tmp_path / "legacy.mapping.toml").write_text(MAPPING)
    cdp("ingest", str(tmp_path / "legacy.txt"))  # .txt is CSV, like .csv and .tsv
    entries = {e["origin"]: e for e in deadletter(cdp)}
    assert set(entries) == {"legacy.txt:row 2", "legacy.txt:row 4", "legacy.txt:row 6"}
    assert "line 3" in entries["legacy.txt:row 2"]["reason"] and "quoted value is not closed" in entries["legacy.txt:row 2"]["reason"]
    assert entries["legacy.txt:row 2"]["input"] == 'C2;"bob@example.org;13;2025-01-02'
    assert entries["legacy.txt:row 4"]["input"] == "C4;dee@example.org;15"  # the input, not null
    assert entries["legacy.txt:row 6"]["input"] == "C6;ed@example.org;-5;2025-01-05"
    assert "CDP_MAX_AMOUNT" in entries["legacy.txt:row 6"]["reason"]
    rows = cdp.query("SELECT source_id FROM customer_events ORDER BY 1")
    assert [r["source_id"] for r in rows] == ["C1", "C3", "C5", "C7"]


def test_a_header_over_128_kib_is_dead_lettered_not_a_traceback(cdp, tmp_path):
    (tmp_path / "wide.csv").write_text("CustNo;Email;Total;Date;" + "x" * 200_000 + "\nC1;a@b.org;1;2025-01-01;y\n")
    (tmp_path / "wide.mapping.toml").write_text(MAPPING)
    good = write(tmp_path / "good.jsonl", [event("1", "retail", "R1")])
    result = cdp("ingest", str(tmp_path / "wide.csv"), str(good))
    assert "Traceback" not in result.stderr and "nanobind" not in result.stderr
    assert cdp.query("SELECT count(*) AS n FROM customer_events") == [{"n": 2}]
    (tmp_path / "huge.csv").write_text("CustNo;" + "x" * (1 << 21) + "\nC1;y\n")
    (tmp_path / "huge.mapping.toml").write_text(MAPPING)
    cdp("ingest", str(tmp_path / "huge.csv"))
    assert any(e["origin"] == "huge.csv:header" for e in deadletter(cdp))


def test_parquet_values_out_of_range_cost_only_their_rows(cdp, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    microseconds = [1_700_000_000_000_000, 300_000_000_000_000_000, 253_402_214_400_000_000 - 1, 1_700_000_100_000_000]
    pq.write_table(pa.table({"CustNo": ["C1", "C2", "C3", "C4"], "Email": ["a@b.org"] * 4, "Total": [1.0, 2.0, 3.0, 1e308],
                             "Date": pa.array(microseconds, pa.timestamp("us"))}), tmp_path / "legacy.parquet")
    (tmp_path / "legacy.mapping.toml").write_text(MAPPING)
    cdp("ingest", str(tmp_path / "legacy.parquet"))
    entries = {e["origin"]: e for e in deadletter(cdp)}
    assert set(entries) == {"legacy.parquet:row 2", "legacy.parquet:row 3", "legacy.parquet:row 4"}
    assert json.loads(entries["legacy.parquet:row 2"]["input"])["CustNo"] == "C2"  # year 11476: not a Python date
    assert "CDP_MAX_FUTURE" in entries["legacy.parquet:row 3"]["reason"]  # 9999-12-31
    assert "CDP_MAX_AMOUNT" in entries["legacy.parquet:row 4"]["reason"]
    assert cdp.query("SELECT source_id FROM customer_events") == [{"source_id": "C1"}]
