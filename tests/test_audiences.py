"""Audiences and destinations the way users use them: the `cdp` command as a subprocess, a real
HTTP receiver on 127.0.0.1 (which fails its first requests), the real Kafka broker read by kcat."""
from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.events import event, write

AS_OF = "2025-02-01"
SECRET = "s3cret-for-tests"


class Receiver:
    """A webhook receiver: answers `plan` (status, Retry-After) to its first requests, 200 after;
    records every request and checks the signature of each."""

    def __init__(self, plan: list[tuple[int, str | None]] | None = None, secret: str | None = None):
        self.plan = list(plan or [])
        self.secret = secret
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client wants

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    status, retry_after = receiver.plan.pop(0) if receiver.plan else (200, None)
                    receiver.requests.append({"at": time.monotonic(), "status": status, "body": body,
                                              "key": self.headers.get("Idempotency-Key"),
                                              "signed": receiver.verify(body, self.headers.get("X-CDP-Signature"))})
                self.send_response(status)
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def verify(self, body: bytes, header: str | None) -> bool:
        if self.secret is None:
            return header is None
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        return header is not None and hmac.compare_digest(expected, header)

    def kept(self) -> list[dict]:
        """What a receiver that keeps each idempotency key once would keep (answered 2xx)."""
        seen, out = set(), []
        for r in self.requests:
            if 200 <= r["status"] < 300 and r["key"] not in seen:
                seen.add(r["key"])
                out.append(json.loads(r["body"]))
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(plan=None, secret=None) -> Receiver:
        made.append(Receiver(plan, secret))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def shop(cdp_at, tmp_path):
    """Three customers: ann (spends 120, consents to email), bob (spends 80, consents), cat (spends
    20, never consents); `cdp` at CDP_AS_OF=2025-02-01 with quick retries."""
    cdp = cdp_at(tmp_path / "home", AS_OF, CDP_DELIVERY_BACKOFF="0.05", CDP_DELIVERY_ATTEMPTS="4")
    people = {"ann": 120.0, "bob": 80.0, "cat": 20.0}
    events = []
    for n, (name, amount) in enumerate(people.items()):
        who = {"email": f"{name}@example.com", "first_name": name.title()}
        events.append(event(f"p{n}", "retail", name, "cdp.purchase", "2025-01-10T10:00:00Z", who, amount=amount,
                            order_id=f"o{n}"))
        if name != "cat":
            events.append(event(f"c{n}", "retail", name, "cdp.consent", "2025-01-11T10:00:00Z", who,
                                purpose="email_marketing", granted=True))
    cdp("ingest", str(write(tmp_path / "shop.jsonl", events)))
    cdp.tmp = tmp_path
    return cdp


def _ids(cdp) -> dict[str, str]:
    return {row["email"].split("@")[0]: row["customer_id"] for row in cdp.query("SELECT customer_id, email FROM customers")}


def _changes(cdp, audience: str) -> list[tuple[str, str]]:
    return [(r["customer_id"], r["action"]) for r in cdp.query(
        f"SELECT customer_id, action FROM audience_changes WHERE audience = '{audience}' ORDER BY change_id")]


def test_webhook_gets_every_change_once_per_key_signed_despite_failures(shop, receiver):
    hook = receiver(plan=[(503, "0"), (429, "1"), (500, None), (503, None)], secret=SECRET)
    ids = _ids(shop)
    shop("audiences", "create", "big_spenders", "--where", "lifetime_value >= 50", "--consent", "email_marketing")
    shop("destinations", "create", "crm", "--webhook", hook.url, "--audiences", "big_spenders", "--secret", "-",
         "--fields", "email,first_name,lifetime_value", input=SECRET + "\n")
    out = shop("audiences", "sync").stdout
    assert "crm: 2 delivered, 0 to the dead-letter" in out

    # ann withdraws consent: she exits without any other change
    withdraw = event("c9", "retail", "ann", "cdp.consent", "2025-01-20T10:00:00Z", {"email": "ann@example.com"},
                     purpose="email_marketing", granted=False)
    shop("ingest", str(write(shop.tmp / "withdraw.jsonl", [withdraw])))
    assert "crm: 1 delivered" in shop("audiences", "sync").stdout
    assert shop("audiences", "sync").stdout.startswith("crm: 0 delivered")  # nothing pending twice

    assert sorted(_changes(shop, "big_spenders")) == sorted(
        [(ids["ann"], "entered"), (ids["bob"], "entered"), (ids["ann"], "exited")])
    kept = hook.kept()
    assert sorted((m["customer_id"], m["action"]) for m in kept) == sorted(_changes(shop, "big_spenders"))
    entered = {m["customer_id"]: m for m in kept if m["action"] == "entered"}
    assert entered[ids["ann"]]["profile"] == {"email": "ann@example.com", "first_name": "Ann", "lifetime_value": 120.0}
    exited = [m for m in kept if m["action"] == "exited"]
    assert set(exited[0]) == {"audience", "action", "customer_id", "time", "change_id"}  # ids only
    # duplicates only as retries: one body per key, every request signed
    bodies = defaultdict(set)
    for r in hook.requests:
        bodies[r["key"]].add(r["body"])
    assert all(len(b) == 1 for b in bodies.values()) and len(bodies) == 3
    assert len(hook.requests) == 3 + 4 and all(r["signed"] for r in hook.requests)
    # Retry-After: 1 was honoured by the change that got it
    got_429 = next(r for r in hook.requests if r["status"] == 429)
    after = [r["at"] for r in hook.requests if r["key"] == got_429["key"] and r["at"] > got_429["at"]]
    assert after and after[0] - got_429["at"] >= 0.9


def test_dead_letter_then_retry_with_the_same_key(shop, receiver):
    hook = receiver(plan=[(400, None), (400, None)])
    shop("audiences", "create", "all", "--where", "orders > 0")
    shop("destinations", "create", "crm", "--webhook", hook.url, "--audiences", "all")
    result = shop("audiences", "sync")
    assert "crm: 1 delivered, 2 to the dead-letter" in result.stdout and "destinations retry" in result.stderr
    listed = json.loads(shop("destinations", "list", "--format", "json").stdout)
    assert [(d["name"], d["dead_letters"], d["pending"]) for d in listed] == [("crm", 2, 0)]
    refused = {r["key"] for r in hook.requests if r["status"] == 400}
    assert len(refused) == 2 and len(hook.requests) == 3  # a 400 is not retried
    assert "2 delivered from the dead-letter, 0 still failing" in shop("destinations", "retry").stdout
    assert {r["key"] for r in hook.requests[3:]} == refused
    assert len(hook.kept()) == 3
    assert shop.query("SELECT count(*) AS n FROM destination_deadletter") == [{"n": 0}]


def test_score_refresh_moves_members_without_new_events(shop, cdp_at, receiver):
    ids = _ids(shop)
    shop("audiences", "create", "lapsed", "--where", "recency_days > 60")
    shop("audiences", "create", "recent", "--where", "recency_days <= 60")
    assert _changes(shop, "lapsed") == []
    assert sorted(_changes(shop, "recent")) == sorted((ids[n], "entered") for n in ("ann", "bob", "cat"))
    later = cdp_at(shop.home, "2025-06-01")
    later("audiences", "sync")
    assert sorted(_changes(later, "lapsed")) == sorted((ids[n], "entered") for n in ("ann", "bob", "cat"))
    assert [c for c in _changes(later, "recent") if c[1] == "exited"] == sorted((ids[n], "exited") for n in ("ann", "bob", "cat"))
    members = later.query("SELECT audience, count(*) FILTER (WHERE until IS NULL) AS now_in, count(*) AS stays "
                          "FROM audience_members GROUP BY ALL ORDER BY ALL")
    assert members == [{"audience": "lapsed", "now_in": 3, "stays": 3}, {"audience": "recent", "now_in": 0, "stays": 3}]
    show = later("audiences", "show", "recent", "--format", "json").stdout
    assert [row["size"] for row in json.loads(show)] == [3, 0]


@pytest.mark.parametrize("where, message", [
    ("1; DROP TABLE customers", "not a valid predicate"),
    ("exists(SELECT * FROM read_csv('/etc/passwd'))", "customers' columns only"),
    ("1=1) UNION SELECT * FROM customers --", "not a valid predicate"),
    ("no_such_column > 1", "not a valid predicate"),
    ("customer_id IN (SELECT customer_id FROM customer_events)", "customers' columns only"),
])
def test_bad_or_hostile_predicates_are_one_line_errors(shop, where, message):
    for command in (["audiences", "create", "x", "--where", where], ["audiences", "preview", "--where", where]):
        result = shop(*command, check=False)
        assert result.returncode != 0 and message in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert shop.query("SELECT count(*) AS n FROM audiences") == [{"n": 0}]


def test_preview_saves_nothing_and_names_are_checked(shop):
    result = shop("audiences", "preview", "--where", "lifetime_value > 50", "--format", "json")
    assert "2 customers match" in result.stderr and len(json.loads(result.stdout)) == 2
    assert shop.query("SELECT count(*) AS n FROM audiences") == [{"n": 0}]
    assert "name" in shop("audiences", "create", "a:b", "--where", "true", check=False).stderr
    assert "no audience" in shop("destinations", "create", "d", "--webhook", "http://127.0.0.1:9/",
                                 "--audiences", "nope", check=False).stderr
    shop("audiences", "create", "a", "--where", "true")
    assert "exists" in shop("audiences", "create", "a", "--where", "true", check=False).stderr
    shop("audiences", "delete", "a")
    shop("audiences", "create", "a", "--where", "orders > 5")  # defined again after a delete
    assert [r["name"] for r in json.loads(shop("audiences", "list", "--format", "json").stdout)] == ["a"]


def test_secret_is_sealed_in_the_view_and_the_store(shop, receiver):
    hook = receiver()
    shop("audiences", "create", "all", "--where", "true")
    shop("destinations", "create", "crm", "--webhook", hook.url, "--audiences", "all", "--secret", SECRET)
    (sealed,) = [r["sealed_secret"] for r in shop.query("SELECT sealed_secret FROM destinations")]
    assert SECRET not in sealed and sealed.startswith("aesgcm1:")
    assert SECRET.encode() not in (shop.home / "events.sqlite").read_bytes()
    assert SECRET not in shop("destinations", "list", "--format", "json").stdout


@pytest.mark.kafka
def test_audiences_topic_read_by_kcat(shop, kafka_bootstrap, fresh_topic_prefix, cdp_at):
    if shutil.which("kcat") is None:
        pytest.fail("kcat is needed to read cdp.audiences")
    ids = _ids(shop)
    kafka = cdp_at(shop.home, AS_OF, CDP_KAFKA_BOOTSTRAP=kafka_bootstrap, CDP_TOPIC_PREFIX=fresh_topic_prefix)
    kafka("audiences", "create", "big", "--where", "lifetime_value >= 50", "--consent", "email_marketing")
    assert "cdp.audiences: 2 published" in kafka("audiences", "sync").stdout
    withdraw = event("c9", "retail", "bob", "cdp.consent", "2025-01-20T10:00:00Z", {"email": "bob@example.com"},
                     purpose="email_marketing", granted=False)
    kafka("ingest", str(write(shop.tmp / "withdraw.jsonl", [withdraw])))
    assert "cdp.audiences: 1 published" in kafka("audiences", "sync").stdout
    read = subprocess.run(["kcat", "-b", kafka_bootstrap, "-C", "-t", f"{fresh_topic_prefix}cdp.audiences", "-e",
                           "-q", "-f", "%k\t%S\t%s\n"], capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr
    records = [line.split("\t", 2) for line in read.stdout.splitlines() if line]
    by_key = defaultdict(list)
    for key, size, value in records:
        by_key[key].append(None if size == "-1" else json.loads(value))
    assert set(by_key) == {f"big:{ids['ann']}", f"big:{ids['bob']}"}
    assert by_key[f"big:{ids['ann']}"][-1]["profile"]["email"] == "ann@example.com"
    assert by_key[f"big:{ids['bob']}"][-1] is None  # exited: a tombstone


def test_definition_topics_name_the_domain_classes():
    """The projector selects definitions by these names; the library reads stored events back by them."""
    from eventsourcing.utils import get_topic

    from cdp.contracts import audience_events
    from cdp.domain import Audience, Destination

    names = {v for k, v in vars(audience_events).items() if k.isupper() and not k.startswith("_")}
    expected = {get_topic(cls) for cls in (Audience, Destination)}
    expected |= {get_topic(getattr(cls, n)) for cls in (Audience, Destination) for n in ("Defined", "Redefined", "Deleted")}
    assert names == expected


@pytest.mark.postgres
def test_definitions_are_events_in_a_postgresql_store(cdp_at, fresh_postgres_dsn, tmp_path):
    cdp = cdp_at(tmp_path / "home", AS_OF, CDP_EVENT_STORE=fresh_postgres_dsn)
    cdp("ingest", str(write(tmp_path / "one.jsonl", [event("p1", "retail", "ann", "cdp.purchase", amount=70.0)])))
    cdp("audiences", "create", "buyers", "--where", "orders > 0")
    cdp("audiences", "delete", "buyers")
    cdp("audiences", "create", "buyers", "--where", "lifetime_value > 50")
    import psycopg

    with psycopg.connect(fresh_postgres_dsn) as db:
        topics = [r[0] for r in db.execute("SELECT topic FROM cdp_events WHERE topic LIKE 'cdp.domain:Audience%' "
                                           "ORDER BY notification_id").fetchall()]
    assert [t.rsplit(".", 1)[1] for t in topics] == ["Defined", "Deleted", "Redefined"]
    # the view rebuilt from the store comes out with the same definition and members
    cdp("projections", "rebuild")
    assert cdp.query("SELECT name, predicate, deleted FROM audiences") == [
        {"name": "buyers", "predicate": "(lifetime_value > 50)", "deleted": False}]
    assert cdp.query("SELECT count(*) AS n FROM audience_members WHERE until IS NULL") == [{"n": 1}]


def test_delivery_loop_delivers_continuously_beside_the_view_owner(shop, receiver):
    """What `cdp serve` runs: a delivery thread on the view owner's connection, woken after batches."""
    from cdp.config import Settings
    from cdp.delivery import DeliveryLoop
    from projections.projector import Projector

    hook = receiver(plan=[(503, "0")])
    shop("audiences", "create", "all", "--where", "orders > 0")
    shop("destinations", "create", "crm", "--webhook", hook.url, "--audiences", "all")
    cfg = Settings.from_env(shop.env)
    projector = Projector(cfg.duckdb_path, cfg.as_of)
    loop = DeliveryLoop(projector.con, cfg, interval=0.2)
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while len(hook.kept()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        loop.stop()
        projector.close()
    assert loop.error is None and len(hook.kept()) == 3 and len(hook.requests) == 4


HOSTILE = [
    "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0",
    "customer_id IN (SELECT customer_id FROM audience_members)",
    "EXISTS (SELECT * FROM glob('/etc/*'))",
    "customer_id IN (SELECT * FROM query('SELECT customer_id FROM customer_events'))",
    "(SELECT count(*) FROM (SELECT 1 FROM read_text('/etc/hostname'))) >= 0 OR true",
]


def test_predicates_that_slipped_past_the_check_run_in_the_sandbox(shop, tmp_path):
    """Definitions stored without the CLI's check (an older version, a hand-written event): their
    predicates still read the candidate rows only, in a sandbox with no files and no other tables;
    each such audience records its error and keeps no members, the projection goes on."""
    from cdp.application import CustomerApplication
    from cdp.config import Settings

    app = CustomerApplication(Settings.from_env(shop.env))
    try:
        for n, where in enumerate(HOSTILE):
            app.define_audience(f"sneaky{n}", where, None)
    finally:
        app.close()
    shop("audiences", "create", "buyers", "--where", "orders > 0")
    shop("ingest", str(write(tmp_path / "more.jsonl", [event("p9", "retail", "dan", "cdp.purchase", amount=5.0)])))
    rows = shop.query("SELECT name, error FROM audiences ORDER BY name")
    assert [r["name"] for r in rows] == ["buyers", *(f"sneaky{n}" for n in range(len(HOSTILE)))]
    assert rows[0]["error"] is None and all(r["error"] for r in rows[1:]), rows
    members = shop.query("SELECT audience, count(*) AS n FROM audience_members WHERE until IS NULL "
                         "GROUP BY audience ORDER BY audience")
    assert members == [{"audience": "buyers", "n": 4}]


def test_a_predicate_that_works_again_clears_its_error_and_catches_up(shop, tmp_path):
    """A predicate that fails on some data (a last name that is no number) records the error and
    keeps its members; once the data lets it work again, the error is cleared and its members are
    right again."""
    shop("audiences", "create", "split", "--where", "lifetime_value / CAST(last_name AS INTEGER) > 1")
    shop("audiences", "create", "buyers", "--where", "orders > 0")
    dan = {"email": "dan@example.com", "first_name": "Dan"}

    def ingest(name: str, *events: dict) -> None:
        shop("ingest", str(write(tmp_path / name, list(events))))

    ingest("dan1.jsonl", event("d1", "retail", "dan", "cdp.purchase", "2025-01-12T10:00:00Z",
                               {**dan, "last_name": "Smith"}, amount=30.0, order_id="d1"))
    rows = {r["name"]: r["error"] for r in shop.query("SELECT name, error FROM audiences")}
    assert "Smith" in rows["split"] and rows["buyers"] is None, rows
    ingest("dan2.jsonl", event("d2", "retail", "dan", "cdp.identify", "2025-01-13T10:00:00Z",
                               {**dan, "last_name": "3"}))
    rows = {r["name"]: r["error"] for r in shop.query("SELECT name, error FROM audiences")}
    assert rows == {"split": None, "buyers": None}
    members = shop.query("SELECT m.audience, c.email FROM audience_members m JOIN customers c USING (customer_id) "
                         "WHERE m.until IS NULL ORDER BY m.audience, c.email")
    assert [(r["audience"], r["email"]) for r in members] == [
        ("buyers", "ann@example.com"), ("buyers", "bob@example.com"), ("buyers", "cat@example.com"),
        ("buyers", "dan@example.com"), ("split", "dan@example.com")]


def test_an_erased_member_exits_at_once_with_ids_only(shop):
    """`cdp erase` (which refreshes no scores) makes the person exit every audience in the batch
    that erased them: the change carries ids only, and no stay is left open."""
    shop("audiences", "create", "buyers", "--where", "orders > 0")
    shop("audiences", "create", "big", "--where", "lifetime_value > 100", "--consent", "email_marketing")
    ann = _ids(shop)["ann"]
    shop("erase", ann, "--yes")
    changes = shop.query(f"SELECT audience, action FROM audience_changes WHERE customer_id = '{ann}' "
                         "ORDER BY change_id")
    assert sorted((c["audience"], c["action"]) for c in changes) == [
        ("big", "entered"), ("big", "exited"), ("buyers", "entered"), ("buyers", "exited")]
    assert shop.query(f"SELECT count(*) AS n FROM audience_members WHERE customer_id = '{ann}' "
                      "AND until IS NULL") == [{"n": 0}]


def test_a_rebuild_sends_nothing_already_delivered(shop, receiver, tmp_path):
    """`cdp projections rebuild` keeps each change's id (so its idempotency key) and every
    destination's progress: the next sync sends nothing; a real change after it is sent once."""
    hook = receiver()
    shop("audiences", "create", "buyers", "--where", "orders > 0")
    shop("destinations", "create", "crm", "--webhook", hook.url, "--audiences", "buyers")
    shop("audiences", "sync")
    assert len(hook.requests) == 3
    before = shop.query("SELECT change_id, audience, customer_id, action FROM audience_changes ORDER BY change_id")
    rebuilt = shop("projections", "rebuild")
    assert "delivery progress kept; 0 membership change(s)" in rebuilt.stdout
    assert shop.query("SELECT change_id, audience, customer_id, action FROM audience_changes "
                      "ORDER BY change_id") == before
    shop("audiences", "sync")
    assert len(hook.requests) == 3
    shop("ingest", str(write(tmp_path / "more.jsonl", [event("p9", "retail", "dan", "cdp.purchase", amount=5.0)])))
    shop("audiences", "sync")
    shop("audiences", "sync")
    assert len(hook.requests) == 4 and len({r["key"] for r in hook.requests}) == 4
    last = json.loads(hook.requests[-1]["body"])
    assert last["action"] == "entered" and last["customer_id"] not in {b["customer_id"] for b in before}


def test_audiences_beside_a_running_serve(cdp, tmp_path, receiver):
    """While `cdp serve` owns the view the CLI's audience commands go to it (admin endpoints in the
    OpenAPI document); events arriving over HTTP reach the webhook as entered, then exited."""
    import httpx

    from tests.serving import cloudevent, new_keys, start_server, wait_until

    keys = new_keys(cdp.env, {"retail": ("publish", "retail"), "read": ("read", None)})
    hook = receiver(secret=SECRET)
    server = start_server({**cdp.env, "CDP_RATE_LIMIT": "1000"}, tmp_path / "serve.log")
    try:
        made = cdp("audiences", "create", "marketable", "--where", "orders > 0", "--consent", "email_marketing")
        assert "marketable created: 0 members" in made.stdout
        assert cdp("audiences", "create", "bad", "--where", "1; DROP TABLE customers", check=False).returncode == 1
        cdp("destinations", "create", "crm", "--webhook", hook.url, "--audiences", "marketable", "--secret", "-",
            input=SECRET + "\n")
        refused = cdp("destinations", "create", "crm", "--webhook", hook.url, "--audiences", "marketable", check=False)
        assert refused.returncode == 1 and refused.stderr.startswith("cdp: error: destination 'crm' exists")

        def send(*events: dict) -> None:
            answer = httpx.post(server.url + "/events", json=list(events), timeout=30, headers={
                "Authorization": f"Bearer {keys['retail']}", "Content-Type": "application/cloudevents-batch+json"})
            assert answer.status_code == 200, answer.text

        send(cloudevent("e1", "retail", "R1", "cdp.purchase", order_id="o1", amount=10.0, currency="EUR"),
             cloudevent("e2", "retail", "R1", "cdp.consent", purpose="email_marketing", granted=True),
             cloudevent("e3", "retail", "R2", "cdp.purchase", order_id="o2", amount=5.0, currency="EUR"))
        wait_until(lambda: len(hook.kept()) >= 1, 30, "the webhook to hear of R1 entering")
        send({**cloudevent("e4", "retail", "R1", "cdp.consent", purpose="email_marketing", granted=False),
              "time": "2026-03-02T10:00:00Z"})
        wait_until(lambda: len(hook.kept()) >= 2, 30, "the webhook to hear of R1 exiting")
        synced = cdp("audiences", "sync")
        assert "crm: 0 delivered, 0 to the dead-letter" in synced.stdout
        kept = hook.kept()
        assert [k["action"] for k in kept] == ["entered", "exited"]
        assert kept[0]["customer_id"] == kept[1]["customer_id"] and "profile" not in kept[1]
        assert all(r["signed"] for r in hook.requests)
        listed = json.loads(cdp("audiences", "list", "--format", "json").stdout)
        assert [(a["name"], a["size"]) for a in listed] == [("marketable", 0)]
        cdp("destinations", "delete", "crm")
        cdp("audiences", "delete", "marketable")
        assert cdp.query("SELECT count(*) AS n FROM audiences WHERE NOT deleted") == [{"n": 0}]
        paths = httpx.get(server.url + "/openapi.json", timeout=30).json()["paths"]
        assert {"/v1/audiences", "/v1/audiences/{name}", "/v1/audiences/sync", "/v1/destinations",
                "/v1/destinations/{name}", "/v1/destinations/retry"} <= set(paths)
        denied = httpx.post(server.url + "/v1/audiences", json={"name": "x", "where": "orders > 0"}, timeout=30,
                            headers={"Authorization": f"Bearer {keys['read']}"})
        assert denied.status_code == 403
    finally:
        server.stop()


def test_deliveries_go_on_once_each_across_the_views_rewrite(cdp, tmp_path, receiver):
    """The server rewrites the view's file after an erasure: its delivery loop pauses for the copy
    and the new read side's loop delivers what the copy holds undelivered. The webhook hears each
    change once: the members before, the erased member's exit, and the members after the swap."""
    import httpx

    from tests.serving import cloudevent, new_keys, start_server, wait_until

    keys = new_keys(cdp.env, {"retail": ("publish", "retail"), "admin": ("admin", None)})
    hook = receiver()
    log = tmp_path / "serve.log"
    server = start_server({**cdp.env, "CDP_RATE_LIMIT": "1000", "CDP_VIEW_REWRITE_DELAY": "1"}, log)

    def buy(n: int) -> None:
        event = cloudevent(f"e{n}", "retail", f"R{n}", "cdp.purchase", order_id=f"o{n}", amount=10.0, currency="EUR",
                           customer={"email": f"buyer{n}@example.org"})
        answer = httpx.post(server.url + "/events", json=event, timeout=30, headers={
            "Authorization": f"Bearer {keys['retail']}", "Content-Type": "application/cloudevents+json"})
        assert answer.status_code == 200, answer.text

    try:
        cdp("audiences", "create", "buyers", "--where", "orders > 0")
        cdp("destinations", "create", "crm", "--webhook", hook.url, "--audiences", "buyers")
        for n in (1, 2):
            buy(n)
        wait_until(lambda: len(hook.kept()) >= 2, 30, "two members entering")
        erased = httpx.delete(server.url + "/v1/profiles/retail:R2", timeout=60,
                              headers={"Authorization": f"Bearer {keys['admin']}"})
        assert erased.status_code == 200, erased.text
        buy(3)  # around the rewrite, which starts a second after the erasure
        wait_until(lambda: "rewritten after an erasure" in log.read_text(), 60, "the view's rewrite")
        buy(4)  # after the swap
        wait_until(lambda: len(hook.kept()) >= 5, 30, "the exit and two more members")
        time.sleep(2)  # a loop that would deliver something again has had its time
    finally:
        server.stop()
    assert "while reads and new events went on" in log.read_text()
    kept = [(k["customer_id"], k["action"]) for k in hook.kept()]
    assert [action for _, action in kept].count("exited") == 1 and len(kept) == len(set(kept)) == 5, kept
    assert len(hook.requests) == 5, [json.loads(r["body"]) for r in hook.requests]  # no key sent twice


def test_idempotency_keys_stay_the_uuid5_they_always_were():
    """Keys of changes already sent must not change when the code that makes them does."""
    import uuid

    from cdp.delivery import Change, idempotency_key

    namespace = uuid.UUID("0b6a1f9e-5d1c-4f37-8f55-2a9b1c0d7e42")
    for n, action in enumerate(("entered", "exited", "entered")):
        change = Change(n + 1, "bank_churn", f"cüst-{n}", action, "2026-01-01T00:00:00+00:00", None)
        assert idempotency_key("crm", change) == str(uuid.uuid5(
            namespace, f"crm\n{n + 1}\nbank_churn\ncüst-{n}\n{action}"))


def _notification(position: int, customer_id: str, topic: str, state: dict) -> tuple[int, str, str, bytes]:
    return position, customer_id, topic, json.dumps({"timestamp": {"_type_": "datetime_iso",
                                                                   "_data_": "2025-05-01T00:00:00+00:00"},
                                                     **state}).encode()


def _registered_with_a_purchase(position: int, customer_id: str, source_id: str, amount: float) -> list[tuple]:
    from cdp.contracts import stored_events

    return [_notification(position, customer_id, stored_events.REGISTERED,
                          {"business_unit": "retail", "source_id": source_id,
                           "originator_topic": stored_events.CUSTOMER}),
            *_purchase(position + 1, customer_id, source_id, amount)]


def _purchase(position: int, customer_id: str, source_id: str, amount: float) -> list[tuple]:
    from cdp.contracts import stored_events

    return [_notification(position, customer_id, stored_events.EVENT_RECORDED, {
        "event_id": f"e{position}", "event_source": "retail/pos", "event_type": "cdp.purchase",
        "time": "2025-04-01T10:00:00Z", "business_unit": "retail", "source_id": source_id,
        "profile": {"email": f"{source_id}@example.com"},
        "data": {"order_id": f"o{position}", "amount": amount, "currency": "EUR", "channel": "store"}})]


def _definitions(audiences: tuple[tuple[str, str], ...]) -> list[tuple]:
    """The store's notifications defining (name, predicate) audiences, at positions 1, 2, …"""
    from cdp.contracts import audience_events
    from projections.audiences import check_predicate

    return [_notification(n + 1, audience_events.definition_id("audience", name), audience_events.AUDIENCE_DEFINED,
                          {"name": name, "where": check_predicate(where), "consent": None,
                           "originator_topic": audience_events.AUDIENCE})
            for n, (name, where) in enumerate(audiences)]


def test_a_batch_that_registers_and_merges_keeps_members_scores_and_exits(tmp_path):
    """A batch that registers a customer and merges it into an existing member (so the new
    registration now names the member), beside a new purchase of another member: the survivor keeps
    the scores from before the batch (NULL until the next refresh) and the stays a score holds;
    both exit the audience their new purchase ends; the absorbed registration enters nothing."""
    from datetime import date

    from cdp.contracts import stored_events
    from projections.projector import Projector

    ann, cid, new = "a" * 32, "c" * 32, "e" * 32
    projector = Projector(tmp_path / "view.duckdb", date(2025, 6, 1))
    try:
        projector.apply(_definitions((("recent", "recency_days < 10000"), ("single", "orders = 1"))))
        projector.apply([*_registered_with_a_purchase(3, ann, "ann", 20.0),
                         *_registered_with_a_purchase(5, cid, "cid", 30.0)])
        projector.refresh_metrics()
        open_stays = ("SELECT audience, customer_id FROM audience_members WHERE until IS NULL "
                      "ORDER BY audience, customer_id")
        assert projector.con.execute(open_stays).fetchall() == [
            ("recent", ann), ("recent", cid), ("single", ann), ("single", cid)]
        projector.apply([*_registered_with_a_purchase(7, new, "nina", 40.0),
                         _notification(9, ann, stored_events.MERGED,
                                       {"absorbed_id": new, "rule": "email", "evidence": {}}),
                         *_purchase(10, cid, "cid", 50.0)])
        assert projector.con.execute(open_stays).fetchall() == [("recent", ann), ("recent", cid)]
        assert projector.con.execute("SELECT audience, customer_id, action FROM audience_changes WHERE position = 10 "
                                     "ORDER BY change_id").fetchall() == [("single", ann, "exited"),
                                                                          ("single", cid, "exited")]
    finally:
        projector.close()


def test_the_customers_a_batch_registered_are_those_that_are_still_themselves_and_new(tmp_path):
    """One rule (projections.registrations) decides which customers a batch registered, for the
    projector's re-derive and the audiences alike: a registration merged into an older customer is
    not one, nor is a survivor; a batch that splits, erases or records no event has none. The
    projection of such a batch is the one of its customers taken one by one: the new customer's
    row comes from its own events, the survivor's takes the absorbed one's, and the absorbed
    registration has no row and enters nothing."""
    from datetime import date

    from cdp.contracts import stored_events
    from projections.projector import Projector
    from projections.registrations import registered_customers

    ann, fay, gus = "a" * 32, "f" * 32, "9" * 32
    merged_batch = [*_registered_with_a_purchase(10, fay, "fay", 30.0),
                    *_registered_with_a_purchase(12, gus, "gus", 40.0),
                    _notification(14, ann, stored_events.MERGED, {"absorbed_id": gus, "rule": "email", "evidence": {}})]
    assert registered_customers(merged_batch) == {fay}
    split = _notification(15, ann, stored_events.SPLIT, {"source_ids": ["gus"]})
    assert registered_customers([*merged_batch, split]) == frozenset()
    assert registered_customers([n for n in merged_batch if n[2] == stored_events.REGISTERED]) == frozenset()

    projector = Projector(tmp_path / "view.duckdb", date(2025, 6, 1))
    try:
        projector.apply(_definitions((("single", "orders = 1"), ("big", "lifetime_value >= 60"))))
        projector.apply(_registered_with_a_purchase(3, ann, "ann", 20.0))
        projector.apply(merged_batch)
        assert projector.con.execute("SELECT customer_id, events, orders, lifetime_value FROM customers "
                                     "ORDER BY customer_id").fetchall() == [(ann, 2, 2, 60.0), (fay, 1, 1, 30.0)]
        assert projector.con.execute("SELECT audience, customer_id, action FROM audience_changes WHERE position = 14 "
                                     "ORDER BY change_id").fetchall() == [
            ("single", ann, "exited"), ("big", ann, "entered"), ("single", fay, "entered")]
        assert projector.con.execute("SELECT audience, customer_id FROM audience_members WHERE until IS NULL "
                                     "ORDER BY ALL").fetchall() == [("big", ann), ("single", fay)]
    finally:
        projector.close()
