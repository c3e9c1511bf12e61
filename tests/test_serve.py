"""`cdp serve` in the embedded default (SQLite, no broker), through real sockets: Segment's own
Python SDK, curl for the CloudEvents modes, httpx for the rest, and `cdp` as a subprocess."""
from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.events import write
from tests.serving import cloudevent, deadletter, new_key, new_keys, start_server, wait_until


@pytest.fixture
def served(cdp, tmp_path):
    """A running server on a fresh CDP_HOME with keys: publish for retail and bank, group read,
    retail read, admin."""
    keys = new_keys(cdp.env, {"retail": ("publish", "retail"), "bank": ("publish", "bank"), "read": ("read", None),
                              "retail_read": ("read", "retail"), "admin": ("admin", None)})
    server = start_server({**cdp.env, "CDP_RATE_LIMIT": "1000", "CDP_QUERY_TIMEOUT": "2"}, tmp_path / "serve.log")
    yield server, keys
    server.stop()


def profile(server, key, ref, **params):
    return server.client(key).get(f"/v1/profiles/{ref}", params=params)


def settled(server, key: str) -> None:
    """Reads follow within moments (the intake is resolved into the store, the view projected after
    the commit): wait for it (longer on a busy machine, where catch-up work yields the CPU)."""
    wait_until(lambda: (lambda h: h["intake_pending"] == 0 and h["view_position"] == h["store_head"])(
        httpx.get(server.url + "/health").json()), 30, "the view to catch up")


def test_segment_sdk_identify_and_track_become_one_profile(served, cdp) -> None:
    from segment.analytics.client import Client

    server, keys = served
    errors = []
    sdk = Client(write_key=keys["retail"], host=server.url, sync_mode=True, gzip=True,
                 on_error=lambda e, batch: errors.append(e), max_retries=1)
    sdk.track(anonymous_id="visitor-9", event="Product Viewed", properties={"sku": "S-1"})
    sdk.identify(user_id="u-42", anonymous_id="visitor-9",
                 traits={"email": "Ann.Lee@Example.org", "firstName": "Ann", "lastName": "Lee",
                         "birthday": "1990-04-05", "address": {"city": "Leeds", "postalCode": "LS1 4AP"}})
    sdk.track(user_id="u-42", event="Order Completed",
              properties={"order_id": "o-1", "revenue": 30.0, "currency": "gbp",
                          "products": [{"sku": "S-1", "quantity": 2, "price": 15.0}]})
    sdk.page(user_id="u-42", name="Checkout", properties={"path": "/checkout"})
    # a full name alone (no firstName, lastName) is split at its first space
    sdk.identify(user_id="u-43", traits={"email": "bo@example.org", "name": "Bo  van der Berg"})
    sdk.identify(user_id="u-44", traits={"email": "cy@example.org", "name": "Cy"})
    sdk.flush()
    assert errors == []
    settled(server, keys["read"])
    names = {ref: {k: v["value"] for k, v in profile(server, keys["read"], ref).json()["golden_record"].items()
                   if k in ("first_name", "last_name")} for ref in ("retail:u-43", "retail:u-44")}
    assert names == {"retail:u-43": {"first_name": "Bo", "last_name": "van der Berg"},
                     "retail:u-44": {"first_name": "Cy"}}
    body = profile(server, keys["read"], "email:ann.lee@example.org").json()
    golden = body["golden_record"]
    assert golden["first_name"] == {"value": "Ann", "source": "retail:u-42"}
    assert golden["date_of_birth"]["value"] == "1990-04-05" and golden["city"]["value"] == "Leeds"
    assert body["metrics"]["orders"] == 1 and body["metrics"]["lifetime_value"] == 30.0
    # the anonymous visitor's history is stitched on, as a merge with its rule
    assert {"kind": "anonymous_id", "value": "visitor-9"} in body["identifiers"]
    assert [m["rule"] for m in body["merges"]] == ["anonymous_id"]
    same = profile(server, keys["read"], "anonymous_id:visitor-9").json()
    assert same["customer_id"] == body["customer_id"]
    events = server.client(keys["read"]).get(f"/v1/profiles/customer_id:{body['customer_id']}/events").json()
    assert [e["type"] for e in events["events"]] == ["cdp.page", "cdp.purchase", "cdp.identify", "cdp.track"]
    purchase = events["events"][1]
    assert purchase["items"] == [{"sku": "S-1", "quantity": 2, "unit_price": 15.0}] and purchase["currency"] == "GBP"
    assert events["events"][3]["properties"] == {"sku": "S-1"}
    # the merged-away visitor's id answers with the survivor, and says so
    absorbed = body["merges"][0]["absorbed_id"]
    moved = profile(server, keys["read"], f"customer_id:{absorbed}").json()
    assert moved["customer_id"] == body["customer_id"] and moved["merged_from"] == absorbed
    # a resend of the same messageIds changes nothing
    sdk.track(user_id="u-42", event="Order Completed", message_id="fixed-1",
              properties={"order_id": "o-2", "revenue": 5})
    sdk.track(user_id="u-42", event="Order Completed", message_id="fixed-1",
              properties={"order_id": "o-2", "revenue": 5})
    sdk.flush()
    settled(server, keys["read"])
    assert profile(server, keys["read"], "retail:u-42").json()["metrics"]["orders"] == 2
    # the CLI asks the running server (the server holds the view's file)
    rows = cdp.query("SELECT type, count(*) AS n FROM customer_events GROUP BY type ORDER BY type")
    assert rows == [{"type": t, "n": n} for t, n in
                    [("cdp.identify", 3), ("cdp.page", 1), ("cdp.purchase", 2), ("cdp.track", 1)]]
    shown = json.loads(cdp("customer", "show", "ann.lee@example.org", "--format", "json").stdout)
    assert shown["customer_id"] == body["customer_id"]
    cdp("export", str(cdp.home / "out"))
    assert pq.read_table(cdp.home / "out" / "customer_events.parquet").num_rows == 7
    cdp("report", str(cdp.home / "report"))
    assert "<svg" in (cdp.home / "report" / "report.html").read_text()
    refused = cdp("query", "DELETE FROM customers", check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("cdp: error: query failed: only read-only queries")


def curl(server, key: str, *args: str) -> tuple[int, dict]:
    done = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-X", "POST", f"{server.url}/events",
                           "-H", f"Authorization: Bearer {key}", *args], capture_output=True, text=True, timeout=60)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)



def test_a_visitor_named_before_its_events_arrive_lands_on_the_user(served) -> None:
    """An identify (or an alias) resolved before the visitor's own first event: the visitor's id
    is linked to the user ahead of its events, rule `anonymous_id`, and they land on the user."""
    from segment.analytics.client import Client

    server, keys = served
    sdk = Client(write_key=keys["retail"], host=server.url, sync_mode=True, max_retries=1)
    sdk.identify(user_id="u-50", anonymous_id="visitor-50", traits={"email": "eve@example.org"})
    sdk.alias(user_id="u-51", previous_id="visitor-51")
    sdk.flush()
    settled(server, keys["read"])
    sdk.track(anonymous_id="visitor-50", event="Product Viewed", properties={"sku": "S-50"})
    sdk.track(anonymous_id="visitor-51", event="Product Viewed", properties={"sku": "S-51"})
    sdk.flush()
    settled(server, keys["read"])
    for user, visitor in (("email:eve@example.org", "visitor-50"), ("retail:u-51", "visitor-51")):
        body = profile(server, keys["read"], user).json()
        assert profile(server, keys["read"], f"anonymous_id:{visitor}").json()["customer_id"] == body["customer_id"]
        linked = [s for s in body["sources"] if s["source_id"] == f"anonymous:{visitor}"]
        assert [(s["rule"], s["evidence"]["anonymous"]) for s in linked] == [("anonymous_id", f"retail:anonymous:{visitor}")]
        events = server.client(keys["read"]).get(f"/v1/profiles/customer_id:{body['customer_id']}/events").json()
        assert "cdp.track" in [e["type"] for e in events["events"]]  # the visitor's view is on the user's timeline

def test_cloudevents_structured_batched_and_binary_modes(served) -> None:
    server, keys = served
    one = cloudevent("ce-1", "retail", "R1", customer={"email": "bo@example.org"})
    status, _ = curl(server, keys["retail"], "-H", "Content-Type: application/cloudevents+json", "-d", json.dumps(one))
    assert status == 200
    batch = [cloudevent("ce-2", "retail", "R2", "cdp.purchase", order_id="o9", amount=9.5, currency="EUR"),
             cloudevent("ce-3", "retail", "R1", "cdp.consent", purpose="email_marketing", granted=True),
             {**cloudevent("ce-3b", "retail", "R1", "cdp.consent", purpose="email_marketing", granted=False),
              "time": "2026-03-01T12:00:00Z"}]  # withdrawn later: the profile shows the latest answer
    status, body = curl(server, keys["retail"], "-H", "Content-Type: application/cloudevents-batch+json",
                        "-d", json.dumps(batch))
    assert (status, body["accepted"]) == (200, 3)
    data = {"business_unit": "retail", "customer": {"source_id": "R1"}, "score": 9, "kind": "nps"}
    status, _ = curl(server, keys["retail"], "-H", "ce-specversion: 1.0", "-H", "ce-id: ce-4",
                     "-H", "ce-source: retail/survey", "-H", "ce-type: cdp.feedback",
                     "-H", "ce-time: 2026-03-02T10:00:00Z", "-H", "Content-Type: application/json",
                     "-d", json.dumps(data))
    assert status == 200
    settled(server, keys["read"])
    body = profile(server, keys["read"], "retail:R1").json()
    assert body["metrics"]["events"] == 4
    assert [(c["purpose"], c["granted"], c["updated_at"][:13]) for c in body["consent"]] == [
        ("email_marketing", False, "2026-03-01T12")]
    # a batch with one bad event: the others are accepted, the response names the bad one
    bad = [cloudevent("ce-5", "retail", "R5"), {**cloudevent("ce-6", "retail", "R6"), "time": "yesterday"}]
    status, body = curl(server, keys["retail"], "-H", "Content-Type: application/cloudevents-batch+json",
                        "-d", json.dumps(bad))
    assert status == 400 and body["code"] == "invalid_messages" and body["accepted"] == 1
    assert body["failed"][0]["index"] == 1 and body["failed"][0]["id"] == "ce-6" and "time" in body["failed"][0]["reason"]
    settled(server, keys["read"])
    assert profile(server, keys["read"], "retail:R5").status_code == 200
    assert [d["event_id"] for d in deadletter(server_home(server))] == ["ce-6"]


def server_home(server):
    return server.log.parent / "home"


def test_every_access_rule(served) -> None:
    server, keys = served
    bank_event = cloudevent("b-1", "bank", "B1", customer={"email": "cy@example.org"})
    retail_event = cloudevent("r-1", "retail", "R1", customer={"email": "dee@example.org"})
    assert server.client(keys["bank"]).post("/events", json=bank_event).status_code == 200
    assert server.client(keys["retail"]).post("/events", json=retail_event).status_code == 200
    anonymous = httpx.post(server.url + "/events", json=retail_event)
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthorized"
    for wrong in ("cdp_publish_retail_" + "x" * 32, keys["retail"] + "x", "' OR 1=1 --"):
        assert server.client(wrong).post("/events", json=retail_event).status_code == 401
    # a retail key publishing a bank event: 403, dead-lettered with the reason, nothing stored
    forged = cloudevent("f-1", "bank", "B666", customer={"email": "evil@example.org"})
    refused = server.client(keys["retail"]).post("/events", json=forged)
    assert refused.status_code == 403 and "bank" in refused.json()["message"]
    settled(server, keys["read"])  # dead-lettered from the intake, right after the answer
    dead = deadletter(server_home(server))
    assert [(d["event_id"], "may not publish for 'bank'" in d["reason"]) for d in dead] == [("f-1", True)]
    segment_forged = httpx.post(server.url + "/v1/identify", auth=(keys["retail"], ""),
                                json={"userId": "x", "context": {"business_unit": "bank"}})
    assert segment_forged.status_code == 403
    settled(server, keys["read"])
    # scopes: a publish key cannot read, a read key cannot publish
    assert profile(server, keys["retail"], "bank:B1").status_code == 403
    assert server.client(keys["read"]).post("/events", json=retail_event).status_code == 403
    # a unit reader sees only customers its unit knows, and of them only its own records
    assert profile(server, keys["retail_read"], "bank:B1").status_code == 404
    assert profile(server, keys["retail_read"], "email:cy@example.org").status_code == 404
    assert profile(server, keys["read"], "bank:B1").status_code == 200
    both = cloudevent("r-2", "retail", "R2", customer={"email": "cy@example.org"})
    assert server.client(keys["retail"]).post("/events", json=both).status_code == 200
    settled(server, keys["read"])
    seen = profile(server, keys["retail_read"], "email:cy@example.org").json()
    assert {s["business_unit"] for s in seen["sources"]} == {"retail"}
    events = server.client(keys["retail_read"]).get("/v1/profiles/email:cy@example.org/events").json()["events"]
    assert {e["business_unit"] for e in events} == {"retail"}
    assert {s["business_unit"] for s in profile(server, keys["read"], "email:cy@example.org").json()["sources"]} == \
        {"retail", "bank"}
    # SQL: group-wide read keys only, SELECT only, nothing of the machine
    sql = server.client(keys["read"])
    assert server.client(keys["retail_read"]).post("/v1/query", json={"sql": "SELECT 1"}).status_code == 403
    assert sql.post("/v1/query", json={"sql": "SELECT count(*) FROM customers"}).json()["rows"] == [[2]]
    for attack in ("DELETE FROM customers", "DROP TABLE customers", "SELECT 1; DELETE FROM customers",
                   "COPY customers TO '/tmp/stolen.csv'", "ATTACH '/tmp/x.db'", "SET enable_external_access = true",
                   "INSTALL httpfs", "PRAGMA database_list"):
        refused = sql.post("/v1/query", json={"sql": attack})
        assert refused.status_code == 400 and refused.json()["code"] == "read_only", attack
    for attack in ("SELECT * FROM read_text('/etc/passwd')", "SELECT * FROM read_csv('/etc/passwd')",
                   "SELECT * FROM 'http://127.0.0.1:1/x.csv'", "SELECT * FROM read_parquet('/tmp/*.parquet')"):
        refused = sql.post("/v1/query", json={"sql": attack})
        assert refused.status_code == 400 and "passwd" not in refused.text.split("message")[0], attack
        assert "root:" not in refused.text
    assert sql.post("/v1/query", json={"sql": "SELECT count(*) FROM customers"}).json()["rows"] == [[2]]


def test_revoked_key_and_rate_limit(cdp, tmp_path) -> None:
    key = new_key(cdp, "read")
    server = start_server({**cdp.env, "CDP_RATE_LIMIT": "2"}, tmp_path / "serve.log")
    try:
        client = server.client(key)
        statuses = [client.post("/v1/query", json={"sql": "SELECT 1"}) for _ in range(8)]
        limited = [r for r in statuses if r.status_code == 429]
        assert limited and int(limited[0].headers["Retry-After"]) >= 1 and limited[0].json()["code"] == "rate_limited"
        key_id = [k["key_id"] for k in json.loads(cdp("keys", "list", "--format", "json").stdout)][0]
        cdp("keys", "revoke", key_id[:10])
        wait_until(lambda: client.get("/metrics").status_code == 401, 10, "the revocation to take effect")
    finally:
        server.stop()
    listed = cdp("keys", "list").stdout
    assert "revoked" in listed and key not in listed
    assert key.encode() not in (cdp.home / "events.sqlite").read_bytes()  # stored hashed only


def test_bodies_oversize_malformed_gzip(served) -> None:
    server, keys = served
    auth = (keys["retail"], "")
    big = {"userId": "u1", "event": "Big", "properties": {"blob": "x" * 33_000}}
    assert httpx.post(server.url + "/v1/track", auth=auth, json=big).status_code == 400
    batch = {"batch": [{"type": "track", "userId": f"u{i}", "event": "E", "properties": {"b": "y" * 20_000}}
                       for i in range(30)]}
    over = httpx.post(server.url + "/v1/batch", auth=auth, json=batch)
    assert over.status_code == 400 and over.json()["code"] == "too_large"
    bomb = gzip.compress(b'{"batch": [' + b" " * 5_000_000 + b"]}")
    exploded = httpx.post(server.url + "/v1/batch", auth=auth, content=bomb, headers={"Content-Encoding": "gzip"})
    assert exploded.status_code == 400 and exploded.json()["code"] == "too_large"
    for body in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"batch": "no"}'):
        bad = httpx.post(server.url + "/v1/batch", auth=auth, content=body)
        assert bad.status_code == 400 and set(bad.json()) >= {"code", "message"}, body
    not_gzip = httpx.post(server.url + "/v1/batch", auth=auth, content=b"plain", headers={"Content-Encoding": "gzip"})
    assert not_gzip.status_code == 400
    # writeKey in the body, gzip: accepted
    good = gzip.compress(json.dumps({"writeKey": keys["retail"], "batch": [
        {"type": "identify", "userId": "g1", "traits": {"email": "g@example.org"}, "messageId": "g-1"},
        {"type": "track", "event": "No one"},
        {"type": "unknown", "userId": "g1"}]}).encode())
    mixed = httpx.post(server.url + "/v1/batch", content=good, headers={"Content-Encoding": "gzip"})
    assert mixed.status_code == 400 and mixed.json()["accepted"] == 1
    assert [f["index"] for f in mixed.json()["failed"]] == [1, 2]
    assert httpx.get(server.url + "/v1/nothing").json()["code"] == "not_found"
    assert httpx.get(server.url + "/v1/profiles/email:x").status_code == 401
    assert "Traceback" not in server.log.read_text()


def test_docs_health_metrics_and_query_formats(served) -> None:
    server, keys = served
    openapi = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/batch", "/v1/identify", "/events", "/v1/profiles/{ref}", "/v1/query"} <= set(openapi["paths"])
    page = httpx.get(server.url + "/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert httpx.get(server.url + "/docs/assets/swagger-ui-bundle.js").status_code == 200
    client = server.client(keys["read"])
    server.client(keys["retail"]).post("/events", json=cloudevent("m-1", "retail", "M1"))
    settled(server, keys["read"])
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["view_position"] == health["store_head"] > 0
    # the resolver process reports once its identity state is loaded: a person's decision then runs at once
    wait_until(lambda: httpx.get(server.url + "/health").json()["resolver"] == "ready", 30, "the resolver to load")
    assert httpx.get(server.url + "/metrics").status_code == 401
    # look-ups are answered ahead of FastAPI's router: the same answers, refusals and measurements
    assert client.get("/v1/profiles/retail:M1").json()["sources"][0]["source_id"] == "M1"
    missing = client.get("/v1/profiles/email:nobody@example.org")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert client.get("/v1/profiles/nocolon").json()["code"] == "invalid_id"
    assert httpx.get(server.url + "/v1/profiles/retail:M1").json()["code"] == "unauthorized"
    assert client.post("/v1/profiles/retail:M1").status_code == 405
    metrics = client.get("/metrics").text
    for status in (200, 400, 401, 404):
        assert f'cdp_http_requests_total{{route="/v1/profiles/{{ref}}",status="{status}"}} 1.0' in metrics
    assert 'cdp_events_received_total{api="cloudevents"} 1.0' in metrics and "cdp_view_position" in metrics
    assert "cdp_http_request_seconds_bucket" in metrics
    sql = {"sql": "SELECT customer_id, business_units FROM customers"}
    assert client.post("/v1/query", json=sql).json()["columns"] == ["customer_id", "business_units"]
    assert client.post("/v1/query?format=csv", json=sql).text.splitlines()[0] == '"customer_id","business_units"'
    arrow = pa.ipc.open_stream(client.post("/v1/query?format=arrow", json=sql).content).read_all()
    parquet = pq.read_table(io.BytesIO(client.post("/v1/query?format=parquet", json=sql).content))
    assert arrow.num_rows == parquet.num_rows == 1
    slow = client.post("/v1/query", json={"sql": "SELECT count(*) FROM range(100000000000) a"})
    assert slow.status_code == 408 and slow.json()["code"] == "timeout"


def test_kill_9_mid_stream_then_restart_keeps_every_event_once(cdp, tmp_path) -> None:
    key = new_key(cdp, "publish", "retail")
    reader = new_key(cdp, "read")  # made before the server starts: no race with its key ring's follower
    log = tmp_path / "serve.log"
    server = start_server(cdp.env, log)
    events = [cloudevent(f"k-{i}", "retail", f"R{i % 150}", "cdp.purchase", order_id=f"o{i}", amount=1.0,
                         currency="EUR") for i in range(600)]
    acknowledged: list[int] = []
    batch = 2  # many small requests: the kill must land while they are still coming, however fast they are

    def publish() -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as client:
            for start in range(0, len(events), batch):
                try:
                    if client.post("/events", json=events[start:start + batch],
                                   headers={"Content-Type": "application/cloudevents-batch+json"}).status_code == 200:
                        acknowledged.append(start)
                except httpx.HTTPError:
                    return

    sender = threading.Thread(target=publish)
    sender.start()
    wait_until(lambda: len(acknowledged) >= 5, 30, "some acknowledged batches")
    server.stop(signal.SIGKILL)
    sender.join()
    assert len(acknowledged) < len(events) // batch, "killed mid-stream"
    server = start_server(cdp.env, log)
    try:
        # every acknowledged batch is there already; the client resends everything (as clients do)
        count = lambda: server.client(reader).post(  # noqa: E731
            "/v1/query", json={"sql": "SELECT count(*), count(DISTINCT event_id) FROM customer_events"}).json()["rows"][0]
        wait_until(lambda: count()[0] >= batch * len(acknowledged), 30, "the acknowledged events")
        with server.client(key) as client:
            for start in range(0, len(events), 100):
                assert client.post("/events", json=events[start:start + 100],
                                   headers={"Content-Type": "application/cloudevents-batch+json"}).status_code == 200
        wait_until(lambda: count()[0] == 600, 30, "all events")
        assert count() == [600, 600]
        assert server.client(reader).post("/v1/query", json={
            "sql": "SELECT count(*), sum(orders) FROM customers"}).json()["rows"] == [[150, 600]]
    finally:
        server.stop()


def test_the_intake_keeps_nothing_of_what_it_resolved(served, cdp) -> None:
    """Requests pass through CDP_HOME/intake.sqlite in the clear; once resolved, no byte of them
    may stay there (an erased person must not survive in the intake's free pages or its WAL)."""
    server, keys = served
    answer = server.client(keys["retail"]).post("/v1/identify", json={
        "userId": "u-intake", "messageId": "m-intake-1",
        "traits": {"email": "Zelda.Quorn@Example.net", "lastName": "Quornfeld"}})
    assert answer.status_code == 200, answer.text
    settled(server, keys["read"])
    assert profile(server, keys["read"], "email:zelda.quorn@example.net").status_code == 200
    files = sorted(cdp.home.glob("intake.sqlite*"))
    assert files, "the embedded server keeps its intake in CDP_HOME"
    for path in files:
        data = path.read_bytes().lower()
        assert b"zelda.quorn" not in data and b"quornfeld" not in data, path.name


def test_scores_refresh_beside_the_stream_and_the_view_equals_a_rebuild(cdp, tmp_path) -> None:
    """The score refresh runs on a thread of its own while batches keep being projected (every
    second here, with the same customers bought for again and again): the view it leaves is the
    one a rebuild makes, every event once, every customer scored."""
    key = new_key(cdp, "publish", "retail")
    reader = new_key(cdp, "read")
    server = start_server({**cdp.env, "CDP_SCORE_INTERVAL": "1"}, tmp_path / "serve.log")
    try:
        with server.client(key) as client:
            for n in range(12):
                events = [cloudevent(f"s-{n}-{i}", "retail", f"R{i}", "cdp.purchase", order_id=f"o{n}-{i}",
                                     amount=float(1 + i + n), currency="EUR",
                                     customer={"email": f"c{i}@example.org"} if n == 0 else {})
                          for i in range(20)]
                assert client.post("/events", json=events,
                                   headers={"Content-Type": "application/cloudevents-batch+json"}).status_code == 200
                time.sleep(0.25)
        settled(server, reader)
        query = lambda sql: server.client(reader).post("/v1/query", json={"sql": sql}).json()["rows"]  # noqa: E731
        wait_until(lambda: query("SELECT count(*) FROM customers WHERE lifecycle_stage IS NULL") == [[0]], 20,
                   "every customer scored")
        assert query("SELECT count(*), sum(orders), count(DISTINCT rfm_segment) > 0 FROM customers") == [[20, 240, True]]
    finally:
        server.stop()
    tables = ("customers", "customer_business_units", "customer_events")
    live = {t: cdp.query(f"SELECT * FROM {t} ORDER BY ALL") for t in tables}
    cdp("projections", "rebuild")
    assert {t: cdp.query(f"SELECT * FROM {t} ORDER BY ALL") for t in tables} == live


def test_a_customer_a_batch_touches_is_scored_before_the_next_refresh(cdp, tmp_path) -> None:
    """Between two refreshes (an hour apart here) a live batch's customers are scored by the last
    refresh's boundaries and model: their profiles never show empty scores meanwhile."""
    def purchases(customer: str, day: str, amount: float, n: int = 1) -> list[dict]:
        return [{**cloudevent(f"{customer}-{day}-{i}", "retail", customer, "cdp.purchase", order_id=f"{customer}{day}{i}",
                              amount=amount, currency="EUR", customer={"email": f"{customer.lower()}@example.org"}),
                 "time": f"{day}T1{i}:00:00Z"} for i in range(n)]

    cdp.env["CDP_AS_OF"] = "2026-11-20"
    known = [e for i in range(30) for e in purchases(f"R{i}", f"2026-{1 + i % 10:02d}-1{i % 10}", 10.0 * (1 + i), 1 + i % 4)]
    cdp("ingest", str(write(tmp_path / "known.jsonl", known)))  # ends with a refresh of everyone
    key, reader = new_key(cdp, "publish", "retail"), new_key(cdp, "read")
    server = start_server({**cdp.env, "CDP_SCORE_INTERVAL": "3600"}, tmp_path / "serve.log")
    try:
        query = lambda sql: server.client(reader).post("/v1/query", json={"sql": sql}).json()["rows"]  # noqa: E731
        scored_at = query("SELECT position FROM metric_state")[0][0]
        with server.client(key) as client:
            for events in (purchases("NEW", "2026-11-19", 25.0), purchases("R0", "2026-11-19", 900.0, n=6)):
                assert client.post("/events", json=events, headers={
                    "Content-Type": "application/cloudevents-batch+json"}).status_code == 200
        settled(server, reader)
        assert query("SELECT position FROM metric_state")[0][0] == scored_at  # no refresh since
        new = profile(server, reader, "retail:NEW").json()["metrics"]
        assert (new["recency_days"], new["rfm_recency"], new["rfm_frequency"]) == (1, 5, 1)
        assert (new["rfm_segment"], new["lifecycle_stage"]) == ("new", "new") and new["tier"] is not None
        assert new["churn_risk"] is not None and new["predicted_value_12m"] > 0
        again = profile(server, reader, "retail:R0").json()["metrics"]
        assert (again["orders"], again["rfm_recency"], again["rfm_frequency"], again["rfm_monetary"]) == (7, 5, 5, 5)
        assert (again["rfm_segment"], again["tier"]) == ("champions", "high_value")
        assert query("SELECT count(*) FROM customers WHERE lifecycle_stage IS NULL OR tier IS NULL") == [[0]]
    finally:
        server.stop()


def process_stat(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name ([1] parent, [16] niceness); [] when gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    except OSError:
        return []


def niceness(pid: int) -> int:
    return int(process_stat(pid)[16])


def children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and process_stat(p)[1:2] == [str(pid)]]


def test_a_burst_is_accepted_first_and_resolved_once(cdp, tmp_path) -> None:
    """The resolver catches up at a lower priority than the HTTP process that accepts: a burst is
    answered from the durable intake, lands in the store once, and a resend changes nothing."""
    keys = new_keys(cdp.env, {"retail": ("publish", "retail"), "read": ("read", None)})
    server = start_server({**cdp.env, "CDP_RATE_LIMIT": "1000", "CDP_CATCH_UP_NICE": "10"}, tmp_path / "serve.log")
    try:
        wait_until(lambda: any(niceness(c) == niceness(server.process.pid) + 10 for c in children(server.process.pid)),
                   30, "the resolver process at niceness +10")
        batches = [{"batch": [{"type": "track", "userId": f"u{(b * 100 + i) % 40}", "event": "Product Viewed",
                               "messageId": f"burst-{b}-{i}", "timestamp": "2026-03-01T10:00:00Z"}
                              for i in range(100)]} for b in range(20)]

        def send(part: list[dict]) -> None:
            with server.client(keys["retail"]) as client:
                for body in part:
                    assert client.post("/v1/batch", json=body).status_code == 200

        senders = [threading.Thread(target=send, args=(batches[n::4],)) for n in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        send(batches[:5])  # a client's retry of what it was not sure about
        settled(server, keys["read"])
        count = server.client(keys["read"]).post("/v1/query", json={
            "sql": "SELECT count(*), count(DISTINCT event_id), count(DISTINCT customer_id) FROM customer_events"})
        assert count.json()["rows"] == [[2000, 2000, 40]]
    finally:
        server.stop()
