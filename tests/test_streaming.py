"""Kafka streaming end to end, on the real broker and a real PostgreSQL store, CLI as subprocesses:
`cdp ingest --kafka` publishes, `cdp worker` processes resolve, and the outcome equals the
embedded run on the same input: same customers (same groups of source records), same event
counts and amount sums; with two workers at once, and across a `kill -9`."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import orjson
import psycopg
import pytest

from cdp.demo import DemoSpec, generate

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

CDP = [sys.executable, "-m", "cdp"]


# --------------------------------------------------------------------------------------- helpers


def cdp(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*CDP, *args], env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update(CDP_HOME=str(home), CDP_AS_OF="2025-06-30", **extra)
    return env


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([*CDP, "worker"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"), start_new_session=True)


def stop(worker: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if worker.poll() is None:
        worker.send_signal(sig)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def stored_keys(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        exists = conn.execute("SELECT to_regclass('cdp_event_keys') IS NOT NULL").fetchone()[0]
        return conn.execute("SELECT count(*) FROM cdp_event_keys").fetchone()[0] if exists else 0


def wait_for(condition, timeout: float, what: str, workers=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for worker in workers:
            assert worker.poll() is None, f"a worker exited with {worker.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def facts(home: Path) -> dict[frozenset, tuple[int, float]]:
    """customer (as the set of its source records) -> (events, amount sum), from a view."""
    con = duckdb.connect(str(home / "view.duckdb"), read_only=True)
    try:
        rows = con.execute("""
            SELECT list(s.business_unit || ':' || s.source_id), any_value(e.events), any_value(e.amount)
            FROM customer_sources s JOIN (
                SELECT customer_id, count(*) AS events, round(coalesce(sum(amount), 0), 2) AS amount
                FROM customer_events GROUP BY customer_id) e USING (customer_id)
            GROUP BY s.customer_id""").fetchall()
        customers = con.execute("SELECT count(*) FROM customers").fetchone()[0]
    finally:
        con.close()
    assert customers == len(rows), "every customer has sources and events"
    return {frozenset(sources): (events, amount) for sources, events, amount in rows}


def totals(view: dict[frozenset, tuple[int, float]]) -> tuple[int, int, float]:
    return len(view), sum(e for e, _ in view.values()), round(sum(a for _, a in view.values()), 2)


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo_input(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    directory = tmp_path_factory.mktemp("demo")
    files = generate(directory, DemoSpec(people=400, seed=11, invalid_rate=0.01))
    return [str(p) for p in files.event_files]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, demo_input: list[str]) -> dict[frozenset, tuple[int, float]]:
    home = tmp_path_factory.mktemp("embedded")
    cdp(environment(home), "ingest", *demo_input)
    return facts(home)


@pytest.fixture
def kafka_env(kafka_bootstrap: str, fresh_topic_prefix: str, fresh_postgres_dsn: str, tmp_path: Path):
    """Environment for this test's topics and its own PostgreSQL store; `home(name)` per process."""
    def home(name: str, **extra: str) -> dict[str, str]:
        return environment(tmp_path / name, CDP_KAFKA_BOOTSTRAP=kafka_bootstrap,
                           CDP_TOPIC_PREFIX=fresh_topic_prefix, CDP_EVENT_STORE=fresh_postgres_dsn,
                           CDP_KAFKA_PARTITIONS="4", **extra)
    return home


def rebuilt(env: dict[str, str]) -> dict[frozenset, tuple[int, float]]:
    """The view rebuilt from the shared store by a fresh process."""
    cdp(env, "projections", "rebuild")
    return facts(Path(env["CDP_HOME"]))


# ----------------------------------------------------------------------------------------- tests


def test_postgres_store_equals_sqlite_and_drops_redelivery(fresh_postgres_dsn: str, tmp_path: Path,
                                                           demo_input: list[str], embedded) -> None:
    env = environment(tmp_path / "pg", CDP_EVENT_STORE=fresh_postgres_dsn)
    cdp(env, "ingest", *demo_input)
    assert facts(tmp_path / "pg") == embedded
    again = cdp(env, "ingest", *demo_input).stdout
    assert "duplicates ignored" in again
    assert facts(tmp_path / "pg") == embedded
    assert rebuilt(environment(tmp_path / "pg-rebuilt", CDP_EVENT_STORE=fresh_postgres_dsn)) == embedded


def test_two_workers_end_with_the_embedded_customers(kafka_env, fresh_postgres_dsn: str, tmp_path: Path,
                                                     demo_input: list[str], embedded) -> None:
    published = cdp(kafka_env("publisher"), "ingest", "--kafka", *demo_input)
    assert "published" in published.stdout
    expected_events = sum(e for e, _ in embedded.values())
    workers = [start_worker(kafka_env(f"w{i}", CDP_WORKER_BATCH="300"), tmp_path / f"w{i}.log") for i in (1, 2)]
    try:
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= expected_events, 120, "all events stored", workers)
        time.sleep(3)  # both views follow the store within a second when idle
    finally:
        for worker in workers:
            stop(worker)
    logs = [(tmp_path / f"w{i}.log").read_text() for i in (1, 2)]
    assert all("consumed" in log for log in logs), logs  # the progress line, with lag
    assert sum(int(log.rsplit("consumed ", 1)[1].split()[0].replace(",", "")) for log in logs) >= expected_events
    assert rebuilt(kafka_env("rebuilt")) == embedded
    for i in (1, 2):  # workers resolve and commit; the view belongs to `cdp serve`
        assert not (tmp_path / f"w{i}" / "view.duckdb").exists()


def test_kill_9_mid_stream_then_restart_stores_every_event_once(kafka_env, fresh_postgres_dsn: str,
                                                                 tmp_path: Path, demo_input: list[str],
                                                                 embedded) -> None:
    cdp(kafka_env("publisher"), "ingest", "--kafka", *demo_input)
    expected_events = sum(e for e, _ in embedded.values())
    env = kafka_env("worker", CDP_WORKER_BATCH="100", CDP_WORKER_LINGER_MS="20")
    first = start_worker(env, tmp_path / "first.log")
    try:
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= 500, 120, "the first events", [first])
    finally:
        stop(first, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    assert stored_keys(fresh_postgres_dsn) < expected_events, "killed mid-stream"
    second = start_worker(env, tmp_path / "second.log")
    try:
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= expected_events, 120, "all events stored", [second])
        time.sleep(2)
    finally:
        stop(second)
    view = rebuilt(kafka_env("rebuilt"))
    assert totals(view) == totals(embedded)
    assert view == embedded
    with psycopg.connect(fresh_postgres_dsn) as conn:
        recorded = conn.execute("SELECT count(*) FROM cdp_events WHERE topic LIKE '%EventRecorded'").fetchone()[0]
    assert recorded == expected_events


def test_a_caught_up_worker_gathers_a_light_stream_into_few_transactions(kafka_env, kafka_bootstrap: str,
                                                                        fresh_topic_prefix: str,
                                                                        fresh_postgres_dsn: str, tmp_path: Path) -> None:
    from kafka import KafkaProducer

    from cdp.server import stages

    log = tmp_path / "worker.log"
    worker = start_worker(kafka_env("worker", CDP_WORKER_GATHER_MS="400", CDP_TRACE_STAGES="1"), log)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=0)

    def send(i: int) -> None:
        producer.send(f"{fresh_topic_prefix}cdp.events", key=f"retail:R{i}".encode(),
                      value=kcat_event(f"g{i}", "retail", f"R{i}", email=f"g{i}@example.org").encode()).get(30)

    try:
        send(0)  # stored once the worker has joined its group and fetches
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= 1, 90, "the first event stored", [worker])
        started = time.monotonic()
        for i in range(1, 25):  # then one event every 25 ms, each sent alone
            send(i)
            time.sleep(max(0.0, started + 0.025 * i - time.monotonic()))
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= 25, 60, "25 events stored", [worker])
    finally:
        producer.close()
        stop(worker)
    first, *batches = [b["records"] for b in stages.read(log)[stages.RESOLVED]]
    assert first + sum(batches) == 25
    # ~0.6 s of events, one fetch per 0.4 s at most (CDP_WORKER_GATHER_MS=0: 24 batches of one)
    assert len(batches) <= 4, batches


KCAT = shutil.which("kcat")


def kcat_event(event_id: str, unit: str, source_id: str, **customer: str) -> str:
    return orjson.dumps({
        "specversion": "1.0", "id": event_id, "source": f"{unit}/crm", "type": "cdp.identify",
        "time": "2025-03-01T10:00:00Z", "datacontenttype": "application/json",
        "data": {"business_unit": unit, "customer": {"source_id": source_id, **customer}},
    }).decode()


def kcat(*args: str, stdin: str | None = None) -> str:
    if KCAT is None:
        message = "kcat is not installed (scripts/services.sh kcat installs Debian's package)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true, so this is an error", pytrace=False)
        pytest.skip(message)
    done = subprocess.run([KCAT, *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def read_topic(bootstrap: str, topic: str) -> list[tuple[str, dict | None]]:
    out = kcat("-b", bootstrap, "-C", "-t", topic, "-o", "beginning", "-e", "-q", "-K", "\t")
    rows = []
    for line in filter(None, out.splitlines()):
        key, _, value = line.partition("\t")
        rows.append((key, orjson.loads(value) if value else None))
    return rows


def test_kcat_publishes_and_reads_profiles_with_a_merge(kafka_env, kafka_bootstrap: str,
                                                       fresh_topic_prefix: str, tmp_path: Path) -> None:
    from tests.serving import start_server

    events_topic, profiles = f"{fresh_topic_prefix}cdp.events", f"{fresh_topic_prefix}cdp.profiles"
    env = kafka_env("worker")
    worker = start_worker(env, tmp_path / "worker.log")
    server = start_server(kafka_env("serve"), tmp_path / "serve.log")  # publishes cdp.profiles
    try:  # the worker creates the topics before it says what it consumes
        wait_for(lambda: "consuming" in (tmp_path / "worker.log").read_text(), 60, "the worker", [worker])
        first = [
            f"retail:R1\t{kcat_event('e1', 'retail', 'R1', email='Ann@Example.org', first_name='Ann')}",
            f"bank:B7\t{kcat_event('e2', 'bank', 'B7', phone='+44 7911 123123', last_name='Lee')}",
            "bank:B8\t{\"not\": \"a cloudevent\"}",
        ]
        kcat("-b", kafka_bootstrap, "-P", "-t", events_topic, "-K", "\t", stdin="\n".join(first) + "\n")
        wait_for(lambda: len(read_topic(kafka_bootstrap, profiles)) >= 2, 90, "two profiles", [worker])
        # one record carrying both identifiers proves the two customers are one person
        both = kcat_event("e3", "telecom", "T3", email="ann@example.org", phone="07911123123")
        kcat("-b", kafka_bootstrap, "-P", "-t", events_topic, "-K", "\t", stdin=f"telecom:T3\t{both}\n")
        wait_for(lambda: any(v and "merged_into" in v for _, v in read_topic(kafka_bootstrap, profiles)),
                 90, "a redirect", [worker])
    finally:
        stop(worker)
        server.stop()
    latest = dict(read_topic(kafka_bootstrap, profiles))
    redirects = {k: v["merged_into"] for k, v in latest.items() if "merged_into" in v}
    assert len(redirects) == 1
    (absorbed, survivor), = redirects.items()
    profile = latest[survivor]
    assert profile["customer_id"] == survivor and absorbed != survivor
    assert (profile["email"], profile["phone"], profile["first_name"], profile["last_name"]) == \
        ("ann@example.org", "+447911123123", "Ann", "Lee")
    assert profile["business_units"] == ["bank", "retail", "telecom"] and profile["events"] == 3
    dead = read_topic(kafka_bootstrap, f"{fresh_topic_prefix}cdp.deadletter")
    assert len(dead) == 1 and dead[0][1]["input"] == '{"not": "a cloudevent"}' and dead[0][1]["reason"]


def test_cli_without_a_reachable_broker_says_so_in_one_line(tmp_path: Path) -> None:
    env = environment(tmp_path)
    event = tmp_path / "e.jsonl"
    event.write_text(kcat_event("e1", "retail", "R1") + "\n")
    for args in (["ingest", "--kafka", str(event)], ["worker"]):
        done = cdp(env, *args, check=False)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == ["cdp: error: CDP_KAFKA_BOOTSTRAP is not set: give the Kafka broker as host:port"]
    nobody = cdp({**env, "CDP_KAFKA_BOOTSTRAP": "127.0.0.1:1"}, "ingest", "--kafka", str(event), check=False)
    assert nobody.returncode == 1
    assert nobody.stderr.strip().splitlines() == [
        "cdp: error: Kafka broker unreachable at 127.0.0.1:1 (KafkaTimeoutError): start it or fix CDP_KAFKA_BOOTSTRAP"]
