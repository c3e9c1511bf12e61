"""Privacy through a running `cdp serve`: export, erasure and the audit trail over HTTP (httpx on
a real socket), `cdp erase` and `cdp audit` beside the server (as subprocesses), the tombstone a
Kafka-mode server publishes (read with kcat), and writers that drop an erased person without a
restart."""
from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import threading
import time
import zipfile
from collections import Counter

import httpx
import pytest

from tests.events import event, jsonl
from tests.serving import cloudevent, deadletter, new_keys, start_server, wait_until
from tests.test_streaming import kafka_env  # noqa: F401 (a fixture)
from tests.test_privacy import (ANN, GHOST, GHOST_NEEDLES, NEEDLES, files_holding, ghost_rejects, ingest,
                                invalid_event_of_ann, needles_in, others, people_events)


@pytest.fixture
def people(cdp, tmp_path):
    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    (tmp_path / "bad.jsonl").write_bytes(invalid_event_of_ann())
    cdp("ingest", str(tmp_path / "bad.jsonl"))
    keys = new_keys(cdp.env, {"read": ("read", None), "retail_read": ("read", "retail"), "admin": ("admin", None)})
    return keys


def refusal(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["message"]


def test_export_erase_and_audit_over_http(cdp, tmp_path, people):
    keys = people
    before = others(cdp)
    # the rewrite left to the server's stop or, after a kill, its start (a running one: see below)
    env = {**cdp.env, "CDP_RATE_LIMIT": "1000", "CDP_VIEW_REWRITE_DELAY": "off"}
    server = start_server(env, tmp_path / "serve.log")
    try:
        read, unit, admin = (server.client(keys[k]) for k in ("read", "retail_read", "admin"))
        ann = read.get("/v1/profiles/email:Quorra.Zephyrine@example.org").json()["customer_id"]

        full = read.get(f"/v1/profiles/customer_id:{ann}/export").json()
        assert full["golden_record"]["last_name"] == "Zephyrine"
        assert [r["event_id"] for r in full["rejected_inputs"]] == ["bad1", "bad2"]  # bad3 is another's
        assert sorted(e["event_id"] for e in full["events"]) == ["a1", "a2", "a3", "a4"]
        assert sorted(s["business_unit"] for s in full["source_records"]) == ["bank", "retail"]
        # a unit's key: the golden record and its own unit's rows, as the profile API shows them
        mine = unit.get(f"/v1/profiles/customer_id:{ann}/export").json()
        assert sorted(e["event_id"] for e in mine["events"]) == ["a1", "a2"]
        assert [s["business_unit"] for s in mine["source_records"]] == ["retail"]
        assert mine["merged_customers"] == [] and mine["golden_record"]["customer_id"] == ann
        assert "rejected_inputs" not in mine  # other units' inputs among them
        archive = zipfile.ZipFile(io.BytesIO(admin.get("/v1/profiles/retail:R-1/export?format=zip").content))
        assert {"customer.json", "events.csv", "source_records.csv", "consents.csv",
                "rejected_inputs.csv"} <= set(archive.namelist())
        rows = list(csv.DictReader(io.StringIO(archive.read("events.csv").decode())))
        assert sorted(r["event_id"] for r in rows) == ["a1", "a2", "a3", "a4"]
        assert any("Wobblesworth branch" in r["comment"] for r in rows)

        refusal(read.delete(f"/v1/profiles/customer_id:{ann}"), 403, "forbidden")
        refusal(read.get("/v1/audit"), 403, "forbidden")
        refusal(admin.get("/v1/audit?since=yesterday"), 400, "invalid_request")
        refusal(unit.get("/v1/profiles/bank:B-3/export"), 404, "not_found")
        paths = read.get("/openapi.json").json()["paths"]
        assert {"get", "delete"} <= set(paths["/v1/profiles/{ref}"]) and "/v1/profiles/{ref}/export" in paths
        assert "/v1/audit" in paths

        health = lambda: httpx.get(server.url + "/health").json()  # noqa: E731
        assert health()["view_rewrite_pending"] is False
        erased = admin.delete("/v1/profiles/email:quorra.zephyrine@example.org").json()
        assert erased["customer_id"] == ann and erased["sources"] == 2 and erased["deadletter_entries"] == 2
        # the file the server holds open keeps free blocks until its rewrite at stop: said, not hidden
        assert erased["view_rewrite_pending"] is True and health()["view_rewrite_pending"] is True
        refusal(read.get(f"/v1/profiles/customer_id:{ann}"), 404, "not_found")
        refusal(admin.delete(f"/v1/profiles/customer_id:{ann}"), 404, "not_found")

        # `cdp erase` beside the running server goes to the server, which holds the view
        done = cdp("erase", "bob.other@example.org", "--yes")
        assert "erased customer" in done.stdout and "1 source record(s)" in done.stdout
        assert "rewrites the view's file CDP_VIEW_REWRITE_DELAY after the erasure" in done.stderr
        refusal(read.get("/v1/profiles/email:bob.other@example.org"), 404, "not_found")

        entries = admin.get("/v1/audit", params={"customer": ann}).json()["entries"]
        actions = [(e["action"], e["actor"]) for e in entries]
        read_id, unit_id, admin_id = (new for new in _key_ids(cdp, keys))
        assert ("read", f"key:{read_id}") in actions and ("export", f"key:{unit_id}") in actions
        assert ("export", f"key:{admin_id}") in actions and actions[-1] == ("erase", f"key:{admin_id}")
        assert all(e["at"] and e["customer_id"] == ann for e in entries)
        listed = json.loads(cdp("audit", "--format", "json").stdout)  # the CLI asks the server
        assert any(e["action"] == "erase" and e["actor"].startswith("local") for e in listed)
        assert admin.get("/v1/audit", params={"since": "2999-01-01"}).json() == {"entries": []}
    finally:
        server.stop(signal.SIGKILL)
    # killed before it could rewrite the view's file: the next start does, before it opens it
    assert (cdp.home / "view.duckdb.erased").exists()
    server = start_server(env, tmp_path / "serve.log")
    assert not (cdp.home / "view.duckdb.erased").exists()
    assert httpx.get(server.url + "/health").json()["view_rewrite_pending"] is False
    server.stop()
    assert files_holding(cdp.home, NEEDLES) == {}
    assert others(cdp)[0] == [r for r in before[0] if r["first_name"] == "Cat"]  # Bob was erased too


def test_a_running_server_rewrites_the_view_after_an_erasure(cdp, tmp_path, people):
    before = others(cdp)
    publish = new_keys(cdp.env, {"shop": ("publish", "retail")})["shop"]
    log = tmp_path / "serve.log"
    server = start_server({**cdp.env, "CDP_RATE_LIMIT": "100000", "CDP_VIEW_REWRITE_DELAY": "1"}, log)
    answers: Counter = Counter()
    looking = threading.Event()

    def look_up() -> None:  # a CRM looking someone else up all along
        with server.client(people["read"]) as crm:
            while looking.is_set():
                answers[crm.get("/v1/profiles/bank:B-3").status_code] += 1

    looking.set()
    crm = threading.Thread(target=look_up)
    crm.start()
    try:
        erased = server.client(people["admin"]).delete("/v1/profiles/email:quorra.zephyrine@example.org").json()
        assert erased["view_rewrite_pending"] is True
        wait_until(lambda: httpx.get(server.url + "/health").json()["view_rewrite_pending"] is False, 60,
                   "the view's rewrite by the running server")
        looking.clear()
        crm.join()
        # no byte of the person in any file, the server still running on the rewritten view
        assert files_holding(cdp.home, NEEDLES) == {}
        wait_until(lambda: "rewritten after an erasure" in log.read_text(), 30, "the rewrite's log line")
        assert server.process.poll() is None
        # copied while the look-ups went on; they waited only for the swap (not the closed way)
        assert "while reads and new events went on" in log.read_text(), log.read_text()[-2000:]
        # a look-up never failed: answered, or told to come back while the file was rewritten
        assert set(answers) <= {200, 503} and answers[200] > 0, answers
        # it follows the store on from the fresh file: a new customer, accepted and readable
        new = event("n1", "retail", "R-9", customer={"email": "dan.new@example.org"})
        assert server.client(publish).post("/events", json=new, headers={
            "Content-Type": "application/cloudevents+json"}).status_code == 200
        read = server.client(people["read"])
        wait_until(lambda: read.get("/v1/profiles/retail:R-9").status_code == 200, 30, "the new customer")
        assert read.get("/v1/profiles/email:quorra.zephyrine@example.org").status_code == 404
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
    finally:
        looking.clear()
        server.stop()
    rows = [r for r in others(cdp)[0] if r["email"] != "dan.new@example.org"]
    assert rows == before[0]


def test_a_running_server_rewrites_the_view_after_an_erasure_made_elsewhere(cdp, tmp_path, people):
    """An erasure committed to the store by another application (another machine's command on a
    shared store, here one beside the server): the server's read side takes it in, which marks
    the view's file, and the server rewrites it as it does after its own."""
    from cdp.application import CustomerApplication
    from cdp.config import Settings

    log = tmp_path / "serve.log"
    server = start_server({**cdp.env, "CDP_VIEW_REWRITE_DELAY": "1"}, log)
    try:
        read = server.client(people["read"])
        ann = read.get("/v1/profiles/email:quorra.zephyrine@example.org").json()["customer_id"]
        with CustomerApplication(Settings.from_env(cdp.env)) as elsewhere:
            elsewhere.erase(ann)
        wait_until(lambda: read.get(f"/v1/profiles/customer_id:{ann}").status_code == 404, 30, "the erasure")
        wait_until(lambda: "rewritten after an erasure" in log.read_text(), 60, "the rewrite's log line")
        assert httpx.get(server.url + "/health").json()["view_rewrite_pending"] is False
        view = [p for p in cdp.home.iterdir() if p.name.startswith("view.duckdb")]
        assert {str(p.name): found for p in view if (found := needles_in(p.read_bytes(), NEEDLES))} == {}
    finally:
        server.stop()


def test_a_running_servers_rejects_are_kept_across_an_erasure(cdp, tmp_path, people):
    """The server's resolver appends rejected inputs to the dead-letter file, which an erasure
    rewrites meanwhile (from the HTTP process): an input rejected after the erasure is in the
    file, not appended to the replaced one and lost."""
    publish = new_keys(cdp.env, {"shop": ("publish", "retail")})["shop"]
    server = start_server({**cdp.env, "CDP_VIEW_REWRITE_DELAY": "off"}, tmp_path / "serve.log")
    try:
        shop = server.client(publish)

        def reject(event_id: str) -> None:
            bad = {**cloudevent(event_id, "retail", f"R-{event_id}"), "time": "yesterday"}
            answer = shop.post("/events", json=bad, headers={"Content-Type": "application/cloudevents+json"})
            assert answer.status_code == 400, answer.text
            wait_until(lambda: event_id in [d["event_id"] for d in deadletter(cdp.home)], 30, f"{event_id} dead-lettered")

        reject("before")
        erased = server.client(people["admin"]).delete("/v1/profiles/email:quorra.zephyrine@example.org")
        assert erased.status_code == 200 and erased.json()["deadletter_entries"] == 2
        reject("after")
    finally:
        server.stop()
    assert [d["event_id"] for d in deadletter(cdp.home)] == ["bad3", "before", "after"]


def test_a_person_only_the_dead_letter_holds_is_erased_over_http(cdp, tmp_path, people):
    """DELETE /v1/profiles of an e-mail or a source record no customer carries (and `cdp erase` of
    one beside the server) removes the dead-letter entries carrying it and suppresses it: her
    valid event sent afterwards is answered as accepted, dropped, and dead-lettered without input."""
    ingest(cdp, tmp_path, "ghost.jsonl", ghost_rejects())
    publish = new_keys(cdp.env, {"shop": ("publish", "retail")})["shop"]
    server = start_server({**cdp.env, "CDP_RATE_LIMIT": "1000"}, tmp_path / "serve.log")
    try:
        admin, read = server.client(people["admin"]), server.client(people["read"])
        # her access request: an admin key gets the rejected inputs carrying her e-mail, a read key nothing
        held = admin.get("/v1/profiles/email:" + GHOST["email"] + "/export")
        assert held.status_code == 200, held.text
        assert held.json()["customer_id"] is None and [r["event_id"] for r in held.json()["rejected_inputs"]] == ["g1"]
        archive = zipfile.ZipFile(io.BytesIO(admin.get(f"/v1/profiles/email:{GHOST['email']}/export?format=zip").content))
        assert [r["event_id"] for r in csv.DictReader(io.StringIO(archive.read("rejected_inputs.csv").decode()))] == ["g1"]
        refusal(read.get("/v1/profiles/email:" + GHOST["email"] + "/export"), 404, "not_found")
        refusal(read.delete("/v1/profiles/email:" + GHOST["email"]), 403, "forbidden")
        refusal(admin.delete("/v1/profiles/customer_id:0123456789abcdef0123456789abcdef"), 404, "not_found")
        erased = admin.delete("/v1/profiles/email:" + GHOST["email"])
        assert erased.status_code == 200, erased.text
        body = erased.json()
        assert body["customer_id"] is None and body["customer_ids"] == [] and body["deadletter_entries"] == 1
        assert body["suppressed"] is True
        done = cdp("erase", "+44 7911 123462", "--yes")  # beside the server: the server erases it
        assert "no customer carried it; 1 dead-letter entr(ies); identifier suppressed" in done.stdout
        assert admin.delete("/v1/profiles/bank:B-G").json()["deadletter_entries"] == 1
        assert [d["event_id"] for d in deadletter(cdp.home)] == ["bad1", "bad2", "bad3", "x1"]

        later = cloudevent("g7", "retail", "R-G7", customer={"email": GHOST["email"], "first_name": "Wilhelmina"})
        answer = server.client(publish).post("/events", json=later,
                                             headers={"Content-Type": "application/cloudevents+json"})
        assert answer.status_code == 200 and answer.json()["accepted"] == 1, answer.text
        wait_until(lambda: any(d["event_id"] == "g7" for d in deadletter(cdp.home)), 30, "g7 dead-lettered")
        assert [d for d in deadletter(cdp.home) if d["event_id"] == "g7"][0]["reason"] == "suppressed"
        refusal(read.get("/v1/profiles/email:" + GHOST["email"]), 404, "not_found")
        entries = admin.get("/v1/audit").json()["entries"]
        assert [(e["customer_id"], e["detail"]["identifiers"]) for e in entries if e["action"] == "erase"] == [
            (None, ["email"]), (None, ["phone"]), (None, ["source"])]
        assert [(e["customer_id"], e["detail"]["entries"]) for e in entries if e["action"] == "export"] == [
            (None, 1), (None, 1)]
    finally:
        server.stop()
    assert files_holding(cdp.home, GHOST_NEEDLES) == {}


def _key_ids(cdp, keys: dict[str, str]) -> list[str]:
    """Ids of the read, unit-read and admin keys, as `cdp keys list` shows them."""
    listed = json.loads(cdp("keys", "list", "--format", "json").stdout)
    by_prefix = {k["key"].rstrip("…"): k["key_id"] for k in listed}
    return [next(i for p, i in by_prefix.items() if keys[name].startswith(p)) for name in ("read", "retail_read", "admin")]


def test_a_clean_shutdown_keeps_queued_reads_and_rewrites_the_view(cdp, tmp_path, people):
    server = start_server({**cdp.env, "CDP_RATE_LIMIT": "1000"}, tmp_path / "serve.log")
    try:
        read = server.client(people["read"])
        ann = read.get("/v1/profiles/retail:R-1").json()["customer_id"]
        for _ in range(4):
            assert read.get("/v1/profiles/bank:B-3").status_code == 200
        assert server.client(people["admin"]).delete(f"/v1/profiles/customer_id:{ann}").status_code == 200
        for _ in range(3):
            assert read.get("/v1/profiles/bank:B-3").status_code == 200
    finally:
        server.stop()  # SIGTERM at once: the queued entries are appended before the process ends
    assert files_holding(cdp.home, NEEDLES) == {}
    entries = json.loads(cdp("audit", "--format", "json").stdout)
    assert [e["action"] for e in entries] == ["read"] * 5 + ["erase"] + ["read"] * 3


def test_key_creation_and_revocation_are_audited(cdp):
    made = cdp("keys", "create", "--scope", "read", "--unit", "retail")
    key_id = made.stderr.split()[1]
    cdp("keys", "revoke", key_id)
    entries = json.loads(cdp("audit", "--format", "json").stdout)
    assert [(e["action"], e["detail"]["key_id"], e["detail"]["unit"]) for e in entries] == [
        ("key_create", key_id, "retail"), ("key_revoke", key_id, "retail")]
    assert all(e["actor"].startswith("local") for e in entries)


def test_a_running_writer_drops_an_erased_person_without_restart(cdp, tmp_path):
    """Two applications on one store, as a worker and `cdp erase` are: after the erase, the
    writer's next batch neither links a new record to the erased customer (their identity keys
    went) nor lets a suppressed identifier in."""
    from cdp.application import CustomerApplication
    from cdp.config import Settings

    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    settings = Settings.from_env(cdp.env)
    writer, eraser = CustomerApplication(settings), CustomerApplication(settings)
    try:
        writer.resolver  # loaded, as a running worker's is
        ann = cdp.query("SELECT customer_id FROM customers WHERE last_name = 'Zephyrine'")[0]["customer_id"]
        eraser.erase(ann, suppress=False)
        back = _accepted(settings, event("w1", "shop", "S-1", customer={"email": ANN["email"]}))
        summary = writer.ingest([back])
        stored = writer.store.query("SELECT customer_id FROM identity_keys WHERE kind = 'source' AND value = ?",
                                    ("shop:S-1",))
        assert summary.suppressed == 0 and len(stored) == 1 and stored[0][0] != ann  # a new customer

        other = cdp.query("SELECT customer_id FROM customers WHERE last_name = 'Other'")[0]["customer_id"]
        eraser.erase(other, suppress=True)
        summary = writer.ingest([_accepted(settings, event("w2", "shop", "S-2", customer={"email": "bob.other@example.org"}))])
        assert summary.suppressed == 1
    finally:
        writer.close()
        eraser.close()


def _accepted(settings, raw: dict):
    from cdp.pipeline import make_ingestor
    from ingest.records import Accepted

    record = make_ingestor(settings).from_event(raw, "test")
    assert isinstance(record, Accepted), record
    return record


@pytest.mark.kafka
def test_a_kafka_mode_server_publishes_the_tombstone(cdp, tmp_path, people, kafka_bootstrap, fresh_topic_prefix):
    """…and keeps the erased person's events sent to its collector afterwards out of the raw
    cdp.events topic (the workers would drop them, but the topic keeps them in the clear)."""
    env = {**cdp.env, "CDP_KAFKA_BOOTSTRAP": kafka_bootstrap, "CDP_TOPIC_PREFIX": fresh_topic_prefix,
           "CDP_RATE_LIMIT": "1000"}
    publish = new_keys(env, {"retail": ("publish", "retail")})["retail"]
    server = start_server(env, tmp_path / "serve.log")
    try:
        admin = server.client(people["admin"])
        ann = admin.get("/v1/profiles/retail:R-1").json()["customer_id"]
        assert admin.delete(f"/v1/profiles/customer_id:{ann}").status_code == 200
        # and a person no customer stands for, by her e-mail: the collector learns it at once too
        assert admin.delete("/v1/profiles/email:" + GHOST["email"]).json()["suppressed"] is True
        sent = [cloudevent("k1", "retail", "R-1", "cdp.purchase", order_id="o1", amount=5.0, currency="EUR"),
                cloudevent("k2", "retail", "R-8", customer={"email": ANN["email"], "first_name": "Quorralind"}),
                cloudevent("k3", "retail", "R-9", customer={"email": "eve.new@example.org"}),
                cloudevent("k5", "retail", "R-G", customer={"email": GHOST["email"], "first_name": "Wilhelmina"})]
        answer = server.client(publish).post("/events", content=json.dumps(sent),
                                             headers={"Content-Type": "application/cloudevents-batch+json"})
        assert answer.status_code == 200 and answer.json()["accepted"] == 4  # a unit learns nothing of an erasure
        broken = cloudevent("k4", "retail", "R-8", "cdp.purchase", amount="lots", customer={"email": ANN["email"]})
        answer = server.client(publish).post("/events", content=json.dumps(broken),
                                             headers={"Content-Type": "application/cloudevents+json"})
        assert answer.status_code == 400
        events = subprocess.run(["kcat", "-b", kafka_bootstrap, "-C", "-t", f"{fresh_topic_prefix}cdp.events",
                                 "-e", "-q"], capture_output=True, text=True, timeout=60, check=True).stdout
        assert [json.loads(line)["id"] for line in events.splitlines()] == ["k3"]
        rejects = subprocess.run(["kcat", "-b", kafka_bootstrap, "-C", "-t", f"{fresh_topic_prefix}cdp.deadletter",
                                  "-e", "-q"], capture_output=True, text=True, timeout=60, check=True).stdout
        entries = [json.loads(line) for line in rejects.splitlines()]
        assert sorted((e["event_id"], e["reason"], e["input"]) for e in entries) == [
            ("k1", "suppressed", None), ("k2", "suppressed", None), ("k4", "suppressed", None),
            ("k5", "suppressed", None)]
        assert needles_in(events.encode() + rejects.encode(), NEEDLES + GHOST_NEEDLES) == []

        def last_message() -> str | None:
            out = subprocess.run(["kcat", "-b", kafka_bootstrap, "-C", "-t", f"{fresh_topic_prefix}cdp.profiles",
                                  "-e", "-q", "-K", "\t", "-Z", "-f", "%k\t%S\n"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
            mine = [line for line in out.splitlines() if line.startswith(ann)]
            return mine[-1] if mine else None

        wait_until(lambda: last_message() == f"{ann}\t-1", 30, "the tombstone on cdp.profiles")
    finally:
        server.stop()


def profile_messages(bootstrap: str, topic: str) -> Counter:
    """Messages on cdp.profiles per key ("key\tsize", a tombstone's size -1), read with kcat."""
    out = subprocess.run(["kcat", "-b", bootstrap, "-C", "-t", topic, "-e", "-q", "-K", "\t", "-Z",
                          "-f", "%k\t%S\n"], capture_output=True, text=True, timeout=60, check=True).stdout
    return Counter(out.splitlines())


@pytest.mark.kafka
def test_a_kafka_mode_server_publishes_nothing_twice_across_the_views_rewrite(cdp, tmp_path, people, kafka_bootstrap,
                                                                             fresh_topic_prefix):
    """The rewrite pauses the read side's publisher with its other writers and a new read side
    publishes from the position the copy holds: nothing already on cdp.profiles is sent again,
    and what comes after the swap is published."""
    env = {**cdp.env, "CDP_KAFKA_BOOTSTRAP": kafka_bootstrap, "CDP_TOPIC_PREFIX": fresh_topic_prefix,
           "CDP_RATE_LIMIT": "1000", "CDP_VIEW_REWRITE_DELAY": "3"}
    topic = f"{fresh_topic_prefix}cdp.profiles"
    log = tmp_path / "serve.log"
    server = start_server(env, log)
    try:
        admin = server.client(people["admin"])
        ann, other = (admin.get(f"/v1/profiles/{ref}").json()["customer_id"] for ref in ("retail:R-1", "bank:B-3"))
        assert admin.delete(f"/v1/profiles/customer_id:{ann}").status_code == 200
        wait_until(lambda: profile_messages(kafka_bootstrap, topic)[f"{ann}\t-1"] == 1, 30, "Ann's tombstone")
        before = profile_messages(kafka_bootstrap, topic)
        # its log line comes once the new read side serves (/health stops saying pending at the swap)
        wait_until(lambda: "rewritten after an erasure" in log.read_text(), 60, "the view's rewrite")
        assert "while reads and new events went on" in log.read_text(), log.read_text()[-2000:]
        time.sleep(2)  # a publisher that would send a range again has had its time
        assert profile_messages(kafka_bootstrap, topic) == before
        # the new read side publishes: another erasure, after the swap, gets its tombstone once
        assert admin.delete(f"/v1/profiles/customer_id:{other}").status_code == 200
        wait_until(lambda: profile_messages(kafka_bootstrap, topic)[f"{other}\t-1"] == 1, 30, "the other tombstone")
        after = profile_messages(kafka_bootstrap, topic)
        assert after - before == Counter({f"{other}\t-1": 1})  # the tombstone, nothing sent again
    finally:
        server.stop()


@pytest.mark.kafka
@pytest.mark.postgres
def test_a_running_kafka_worker_suppresses_an_erased_person(kafka_env, kafka_bootstrap, fresh_topic_prefix,
                                                            fresh_postgres_dsn, tmp_path):
    """A worker started before the erasure (its identity index and suppression list loaded) drops
    the erased person's re-sent record without a restart, and stores a new person's. The record
    comes from a unit's machine that only publishes (a publisher that holds the store would not
    send it: test_privacy.test_publishing_drops_an_erased_persons_events_and_keeps_only_their_ids)."""
    import psycopg

    from tests.test_streaming import cdp as run, read_topic, start_worker, stop, stored_keys, wait_for

    worker = start_worker(kafka_env("worker"), tmp_path / "worker.log")
    cli = kafka_env("cli")
    try:
        wait_for(lambda: "consuming" in (tmp_path / "worker.log").read_text(), 60, "the worker", [worker])
        (tmp_path / "people.jsonl").write_bytes(jsonl(people_events()))
        run(cli, "ingest", "--kafka", str(tmp_path / "people.jsonl"))
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= 8, 120, "the people stored", [worker])
        run(cli, "projections", "rebuild")
        assert "2 source record(s)" in run(cli, "erase", "retail:R-1", "--yes").stdout
        resent = [event("n1", "bank", "B-9", customer={"email": ANN["email"]}),
                  event("c1", "shop", "S-1", customer={"email": "dee.new@example.org", "first_name": "Dee"})]
        (tmp_path / "resent.jsonl").write_bytes(jsonl(resent))
        unit = {k: v for k, v in kafka_env("unit").items() if k != "CDP_EVENT_STORE"}
        run(unit, "ingest", "--kafka", str(tmp_path / "resent.jsonl"))
        dead = lambda: [v for _, v in read_topic(kafka_bootstrap, f"{fresh_topic_prefix}cdp.deadletter")
                        if v and v.get("reason") == "suppressed"]
        wait_for(lambda: dead() and stored_keys(fresh_postgres_dsn) >= 9, 120, "the resent events handled", [worker])
    finally:
        stop(worker)
    assert [(d["event_id"], d["input"]) for d in dead()] == [("n1", None)]
    with psycopg.connect(fresh_postgres_dsn) as conn:
        sources = {r[0] for r in conn.execute("SELECT value FROM identity_keys WHERE kind = 'source'")}
    assert "shop:S-1" in sources and "bank:B-9" not in sources and "retail:R-1" not in sources
