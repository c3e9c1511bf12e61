"""The `cdp` command's surface: the demo, queries, customer lookups and its errors."""
import csv
import io
import json
import re

import pytest

from tests.events import event, write


def test_demo_generates_three_units_runs_the_pipeline_and_scores_identity(cdp):
    result = cdp("demo", "--people", "150", "--seed", "3")
    out = " ".join(result.stdout.split())
    for label in ("events read", "accepted", "rejected (dead-letter)", "source records", "unified customers",
                  "merges", "identity precision (pairwise)", "identity recall (pairwise)"):
        assert label in out
    precision = float(re.search(r"identity precision \(pairwise\) │ ([0-9.]+)", out).group(1))
    recall = float(re.search(r"identity recall \(pairwise\) │ ([0-9.]+)", out).group(1))
    assert 0.9 <= precision <= 1.0 and 0.5 <= recall <= 1.0
    units = cdp.query("SELECT DISTINCT business_unit FROM customer_sources ORDER BY 1")
    assert [u["business_unit"] for u in units] == ["bank", "retail", "telecom"]
    types = cdp.query("SELECT DISTINCT type FROM customer_events ORDER BY 1")
    assert len(types) == 7
    assert (cdp.home / "deadletter.jsonl").exists()  # the demo includes some bad events on purpose


@pytest.fixture
def small_view(cdp, tmp_path):
    write(tmp_path / "e.jsonl", [
        event("1", "retail", "R1", "cdp.purchase", customer={"email": "ann@example.org", "first_name": "Ann",
                                                           "phone": "07911 123123"}, amount=20.0),
        event("2", "bank", "B-7", customer={"email": "ann@example.org", "last_name": "Lee"}),
        event("3", "telecom", "T1", "cdp.call", customer={"first_name": "Bob"}),
    ])
    cdp("ingest", str(tmp_path / "e.jsonl"))
    return cdp


def test_query_formats(small_view):
    cdp = small_view
    sql = "SELECT first_name, lifetime_value FROM customers ORDER BY first_name"
    as_json = json.loads(cdp("query", sql, "--format", "json").stdout)
    assert as_json == [{"first_name": "Ann", "lifetime_value": 20.0}, {"first_name": "Bob", "lifetime_value": 0.0}]
    as_csv = list(csv.reader(io.StringIO(cdp("query", sql, "--format", "csv").stdout)))
    assert as_csv == [["first_name", "lifetime_value"], ["Ann", "20.0"], ["Bob", "0.0"]]
    table = cdp("query", sql).stdout
    assert "first_name" in table and "Ann" in table and "Bob" in table


def test_query_is_read_only(small_view):
    result = small_view("query", "DELETE FROM customers", check=False)
    assert result.returncode == 1
    assert "read-only" in result.stderr.lower()
    assert small_view.query("SELECT count(*) AS n FROM customers") == [{"n": 2}]


@pytest.mark.parametrize("who", ["ann@example.org", " ANN@Example.org", "+44 7911 123123", "07911123123",
                                 "bank:B-7", "retail:R1"])
def test_customer_show_finds_the_person_by_any_identifier(small_view, who):
    picture = json.loads(small_view("customer", "show", who, "--format", "json").stdout)
    assert picture["golden_record"]["first_name"] == "Ann"
    assert picture["golden_record"]["last_name"] == "Lee"
    assert {(s["business_unit"], s["source_id"]) for s in picture["sources"]} == {("retail", "R1"), ("bank", "B-7")}
    assert sorted(t["type"] for t in picture["timeline"]) == ["cdp.identify", "cdp.purchase"]


def test_customer_show_by_id_prints_tables(small_view):
    customer_id = small_view.query("SELECT customer_id FROM customers WHERE first_name = 'Bob'")[0]["customer_id"]
    out = small_view("customer", "show", customer_id).stdout
    assert "Bob" in out and "telecom" in out and "cdp.call" in out


@pytest.mark.parametrize("args, message", [
    (["query", "SELEC nonsense"], "query failed: Parser Error"),
    (["query", "SELECT 1", "--format", "xml"], "Invalid value for '--format'"),
    (["customer", "show", "???"], "cannot tell what '???' is"),
    (["customer", "show", "nobody@example.org"], "no customer found for email 'nobody@example.org'"),
    (["ingest", "/no/such/file.jsonl"], "no such file: /no/such/file.jsonl"),
    (["ingest", "--mapping"], "Option '--mapping' requires an argument"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["demo", "--people", "-5"], "Invalid value for '--people'"),
])
def test_bad_arguments_print_one_clear_line_and_exit_non_zero(small_view, args, message):
    result = small_view(*args, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_configuration_is_one_line(cdp, tmp_path):
    result = cdp("ingest", str(write(tmp_path / "e.jsonl", [event("1", "retail", "R1")])), check=False,
                 extra_env={"CDP_PHONE_REGIONS": "retail=GBR"})
    assert result.returncode == 1
    assert result.stderr.strip() == ("cdp: error: CDP_PHONE_REGIONS: expected unit=REGION pairs like "
                                     "'retail=GB,bank=DE', got 'retail=GBR'")


def test_query_before_any_ingest_says_what_to_do(cdp):
    result = cdp("query", "SELECT 1", check=False)
    assert result.returncode == 1
    assert "run `cdp ingest` or `cdp demo` first" in result.stderr


def test_phone_region_per_business_unit(cdp, tmp_path):
    write(tmp_path / "e.jsonl", [event("1", "bank", "B1", customer={"phone": "030 1234567"})])
    cdp("ingest", str(tmp_path / "e.jsonl"), extra_env={"CDP_PHONE_REGIONS": "bank=DE"})
    assert cdp.query("SELECT phone FROM customers") == [{"phone": "+49301234567"}]


@pytest.fixture
def vanishing_server(cdp):
    """A "running server" in CDP_HOME/server.json that answers its health check, then hangs up on
    every other request: a `cdp serve` stopped between the CLI's check and its request."""
    import os
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
            self.close_connection = True  # anything else: no answer at all

        do_POST = do_DELETE = do_GET

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cdp.home.mkdir(parents=True, exist_ok=True)
    (cdp.home / "server.json").write_text(json.dumps(
        {"url": f"http://127.0.0.1:{server.server_port}", "pid": os.getpid(), "key": "cdp_local_test"}))
    yield server
    server.shutdown()


@pytest.mark.parametrize("args, failed", [(["audit"], "audit failed: "),
                                          (["audiences", "delete", "vip"], ""),
                                          (["destinations", "retry"], "")])
def test_a_server_that_stops_answering_is_one_line(vanishing_server, cdp, args, failed):
    done = cdp(*args, check=False, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"cdp: error: {failed}the server at http://127.0.0.1:{vanishing_server.server_port} did not answer: "
        + done.stderr.split("did not answer: ", 1)[1].strip()]
