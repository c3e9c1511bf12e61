"""`cdp serve` beside `cdp worker` on the real broker and a real PostgreSQL store: analysts query
while the worker consumes, the HTTP collector answers after the broker acknowledged, and a
`kill -9` of the server mid-stream leaves the view and `cdp.profiles` complete, nothing doubled."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.serving import cloudevent, console_session, console_split, new_keys, start_server, wait_until
from tests.test_streaming import (  # noqa: F401 (fixtures)
    cdp, demo_input, embedded, kafka_env, read_topic, start_worker, stop, stored_keys)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

FACTS_SQL = """
    SELECT list(s.business_unit || ':' || s.source_id) AS sources,
           any_value(e.events) AS events, any_value(e.amount) AS amount
    FROM customer_sources s JOIN (
        SELECT customer_id, count(*) AS events, round(coalesce(sum(amount), 0), 2) AS amount
        FROM customer_events GROUP BY customer_id) e USING (customer_id)
    GROUP BY s.customer_id"""


def query(env: dict[str, str], sql: str) -> list[dict]:
    """`cdp query` as an analyst runs it (through the server when one runs)."""
    done = subprocess.run([sys.executable, "-m", "cdp", "query", sql, "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_serve_with_a_worker_on_postgres_survives_kill_9(kafka_env, kafka_bootstrap: str, fresh_topic_prefix: str,
                                                         fresh_postgres_dsn: str, tmp_path: Path,
                                                         demo_input: list[str], embedded) -> None:
    serve_env = kafka_env("serve", CDP_RATE_LIMIT="1000")
    keys = new_keys(serve_env, {"publish": ("publish", "shop"), "read": ("read", None)})
    expected_events = sum(e for e, _ in embedded.values()) + 3
    server = start_server(serve_env, tmp_path / "serve.log")
    worker = None
    try:
        # the collector with Kafka: answered after the broker acknowledged; the worker stores it
        with server.client(keys["publish"]) as client:
            batch = [cloudevent(f"h-{i}", "shop", f"S{i}", customer={"email": f"h{i}@example.org"}) for i in range(3)]
            answer = client.post("/events", json=batch, headers={"Content-Type": "application/cloudevents-batch+json"})
            assert answer.status_code == 200 and answer.json()["accepted"] == 3
        cdp(kafka_env("publisher"), "ingest", "--kafka", *demo_input)
        worker = start_worker(kafka_env("worker", CDP_WORKER_BATCH="20", CDP_WORKER_LINGER_MS="10"),
                              tmp_path / "worker.log")
        # analysts query while the worker consumes (`cdp query` itself, a process start per query,
        # is too slow to catch this worker mid-stream: it is checked through the server below)
        answered = []
        with server.client(keys["read"]) as analyst:
            while stored_keys(fresh_postgres_dsn) < expected_events // 3:
                answer = analyst.post("/v1/query", json={"sql": "SELECT count(*) FROM customer_events"})
                assert answer.status_code == 200
                answered.append(answer.json()["rows"][0][0])
        assert answered, "no query answered while the worker consumed"
        server.stop(signal.SIGKILL)
        assert stored_keys(fresh_postgres_dsn) < expected_events, "killed mid-stream"
        server = start_server(serve_env, tmp_path / "serve.log")
        wait_until(lambda: stored_keys(fresh_postgres_dsn) >= expected_events, 180, "all events stored")
        health = lambda: server.client().get("/health").json()  # noqa: E731
        wait_until(lambda: health()["view_position"] == health()["store_head"], 60, "the view to catch up")
        wait_until(lambda: health()["resolver"] == "ready", 60, "the decider's identity state to load")
        rows = query(serve_env, FACTS_SQL.replace("\n", " "))
        view = {frozenset(r["sources"]): (r["events"], r["amount"]) for r in rows}
        counts = query(serve_env, "SELECT count(*) AS n, count(DISTINCT event_id || event_source) AS d, "
                                  "(SELECT count(*) FROM customers) AS c FROM customer_events")[0]
        assert counts["n"] == counts["d"] == expected_events  # nothing lost, nothing doubled
        for key in embedded:
            assert key in view and view[key] == embedded[key]
        customers = {r["customer_id"]: r["events"] for r in query(serve_env, "SELECT customer_id, events FROM customers")}
        # cdp.profiles: every customer's latest message is its current profile; no message twice
        topic = f"{fresh_topic_prefix}cdp.profiles"

        def complete() -> bool:
            latest = dict(read_topic(kafka_bootstrap, topic))
            return all(latest.get(c, {}).get("events") == n for c, n in customers.items())

        wait_until(complete, 60, "cdp.profiles to carry every current profile")
        messages = read_topic(kafka_bootstrap, topic)
        repeated = Counter((k, json.dumps(v, sort_keys=True)) for k, v in messages)
        assert max(repeated.values()) == 1, "a profile message was published twice"
        latest = dict(messages)
        assert {k for k, v in latest.items() if "merged_into" not in v} == set(customers)
    finally:
        server.stop()
        if worker is not None:
            stop(worker)


def test_anonymous_visitor_is_stitched_by_the_worker(kafka_env, tmp_path: Path) -> None:
    """Segment's SDK through `cdp serve` with Kafka: the worker resolves, and an identify (or an
    alias) carrying the visitor's id stitches the visitor's history onto the known user, whether
    the visitor's events were stored before it or arrive after it."""
    from segment.analytics.client import Client

    serve_env = kafka_env("serve", CDP_RATE_LIMIT="1000")
    keys = new_keys(serve_env, {"publish": ("publish", "shop"), "read": ("read", None), "admin": ("admin", None)})
    server = start_server(serve_env, tmp_path / "serve.log")
    worker = start_worker(kafka_env("worker", CDP_WORKER_BATCH="20", CDP_WORKER_LINGER_MS="10"), tmp_path / "worker.log")
    try:
        errors: list = []
        sdk = Client(write_key=keys["publish"], host=server.url, sync_mode=True, on_error=lambda e, b: errors.append(e),
                     max_retries=1)
        reader = server.client(keys["read"])
        found = lambda ref: reader.get(f"/v1/profiles/{ref}")  # noqa: E731
        sdk.track(anonymous_id="visitor-7", event="Product Viewed", properties={"sku": "S-7"})
        sdk.track(anonymous_id="visitor-8", event="Product Viewed", properties={"sku": "S-8"})
        sdk.flush()
        wait_until(lambda: found("anonymous_id:visitor-8").status_code == 200, 120, "the visitors' events")
        sdk.identify(user_id="u-7", anonymous_id="visitor-7", traits={"email": "cy@example.org"})
        sdk.identify(user_id="u-8", traits={"email": "di@example.org"})
        sdk.alias(user_id="u-8", previous_id="visitor-8")
        sdk.flush()
        assert errors == []
        for user, visitor in (("cy@example.org", "visitor-7"), ("di@example.org", "visitor-8")):
            wait_until(lambda: found(f"email:{user}").status_code == 200 and
                       found(f"email:{user}").json()["merges"], 120, f"{visitor} stitched onto {user}")
            body = found(f"email:{user}").json()
            assert [m["rule"] for m in body["merges"]] == ["anonymous_id"]
            assert {"kind": "anonymous_id", "value": visitor} in body["identifiers"]
            assert found(f"anonymous_id:{visitor}").json()["customer_id"] == body["customer_id"]
            assert body["metrics"]["events"] >= 2  # the visitor's track is on the user's timeline
        # the other order: the worker stores the identify (or alias) before the visitor's first event
        sdk.identify(user_id="u-9", anonymous_id="visitor-9", traits={"email": "ed@example.org"})
        sdk.alias(user_id="u-10", previous_id="visitor-10")
        sdk.flush()
        wait_until(lambda: found("shop:u-10").status_code == 200 and found("email:ed@example.org").status_code == 200,
                   120, "the identify and the alias")
        for visitor in ("visitor-9", "visitor-10"):
            sdk.track(anonymous_id=visitor, event="Product Viewed", properties={"sku": visitor})
        sdk.flush()
        for user, visitor in (("email:ed@example.org", "visitor-9"), ("shop:u-10", "visitor-10")):
            wait_until(lambda: found(user).json()["metrics"]["events"] == 2, 120, f"{visitor}'s event on {user}")
            body = found(user).json()
            assert found(f"anonymous_id:{visitor}").json()["customer_id"] == body["customer_id"]
            assert [s["rule"] for s in body["sources"] if s["source_id"] == f"anonymous:{visitor}"] == ["anonymous_id"]
        # reversible: a steward splits the visitor off in the console (the server's kept application
        # decides, under the writers' lock), and the visitor's history leaves with it
        ed = found("email:ed@example.org").json()["customer_id"]
        with console_session(server, keys["admin"]) as browser:
            split = console_split(browser, ed, "shop:anonymous:visitor-9")
        assert split.status_code == 303, split.text
        wait_until(lambda: found("anonymous_id:visitor-9").json()["customer_id"] != ed, 60, "the split in the view")
        assert found("email:ed@example.org").json()["metrics"]["events"] == 1
        assert found("anonymous_id:visitor-9").json()["metrics"]["events"] == 1
    finally:
        server.stop()
        stop(worker)


def test_a_restart_resends_nothing_a_crash_left_on_cdp_profiles_unrecorded(kafka_env, kafka_bootstrap: str,
                                                                          fresh_topic_prefix: str,
                                                                          tmp_path: Path) -> None:
    """The crash this guards against lands between the broker's acknowledgement of a batch's
    profiles and the view's record of it: the view is put back in exactly that state (its published
    position and offsets from before the batch), and the restarted server must not send the
    batch's profiles a second time, nor miss any."""
    import duckdb

    from cdp.config import Settings

    env, publisher = kafka_env("serve"), kafka_env("publisher")
    topic = f"{fresh_topic_prefix}cdp.profiles"
    view = Settings.from_env(env).duckdb_path
    events = tmp_path / "events.jsonl"

    def ingest(*lines: dict) -> None:
        events.write_text("".join(json.dumps(line) + "\n" for line in lines))
        cdp(publisher, "ingest", str(events))  # straight into the shared store, as a unit's import

    def published_keys() -> set[str]:
        return {key for key, _ in read_topic(kafka_bootstrap, topic)}

    def recorded(con) -> tuple:
        return (con.execute("SELECT position FROM projection_state WHERE name = 'profiles'").fetchall(),
                sorted(con.execute("SELECT * FROM changelog_offsets").fetchall()))

    server = start_server(env, tmp_path / "serve.log")
    try:
        ingest(*[cloudevent(f"a-{i}", "retail", f"R{i}", customer={"email": f"a{i}@example.org"}) for i in range(5)])
        wait_until(lambda: len(published_keys()) == 5, 60, "the first profiles")
    finally:
        server.stop()
    with duckdb.connect(str(view)) as con:
        before = recorded(con)
    assert before[1], "the view records the offsets it published up to"
    server = start_server(env, tmp_path / "serve.log")
    try:  # one batch: two known customers change, one is new
        ingest(cloudevent("b-1", "retail", "R1", customer={"first_name": "Ann"}),
               cloudevent("b-2", "retail", "R2", customer={"first_name": "Bo"}),
               cloudevent("b-3", "bank", "B9", customer={"email": "b9@example.org"}))
        wait_until(lambda: len(read_topic(kafka_bootstrap, topic)) == 8, 60, "the batch's three profiles")
    finally:
        server.stop()
    with duckdb.connect(str(view)) as con:  # the crash: acknowledged by the broker, not recorded
        assert recorded(con) != before
        con.execute("UPDATE projection_state SET position = ? WHERE name = 'profiles'", [before[0][0][0]])
        con.execute("DELETE FROM changelog_offsets")
        con.executemany("INSERT INTO changelog_offsets VALUES (?, ?, ?)", before[1])
    server = start_server(env, tmp_path / "serve.log")
    try:  # a later event: its profile comes after whatever the restart publishes again
        ingest(cloudevent("c-1", "telecom", "T1", customer={"email": "t1@example.org"}))
        wait_until(lambda: len(published_keys()) == 7, 60, "the later profile")
    finally:
        server.stop()
    messages = read_topic(kafka_bootstrap, topic)
    repeated = Counter((key, json.dumps(value, sort_keys=True)) for key, value in messages)
    assert max(repeated.values()) == 1, "a profile message was published twice"
    assert len(messages) == 9
