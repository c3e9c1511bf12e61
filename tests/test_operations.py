"""Operations: a worker rides out a PostgreSQL and a broker outage, names a full disk and an
unwritable folder in one line, refuses a consumer group that belongs to another store, stops
cleanly on SIGTERM and can be watched over HTTP. Real Kafka and PostgreSQL; the tests that stop a
service start a private one of their own (tests/private_services.py)."""
from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import psycopg
import pytest

from cdp.demo import DemoSpec, generate
from tests.private_services import PrivateService, free_port, mount_tmpfs, unmount
from tests.test_streaming import CDP, cdp, environment, facts, rebuilt, start_worker, stop, stored_keys, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def small_input(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    files = generate(tmp_path_factory.mktemp("ops-demo"), DemoSpec(people=200, seed=23, invalid_rate=0.01))
    return [str(p) for p in files.event_files]


@pytest.fixture(scope="module")
def small_embedded(tmp_path_factory: pytest.TempPathFactory, small_input: list[str]):
    home = tmp_path_factory.mktemp("ops-embedded")
    cdp(environment(home), "ingest", *small_input)
    view = facts(home)
    return view, sum(events for events, _ in view.values())


def recorded(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM cdp_events WHERE topic LIKE '%EventRecorded'").fetchone()[0]


def worker_env(home: Path, bootstrap: str, prefix: str, store: str, **extra: str) -> dict[str, str]:
    settings = {"CDP_KAFKA_PARTITIONS": "4", "CDP_WORKER_BATCH": "100", "CDP_WORKER_LINGER_MS": "20", **extra}
    return environment(home, CDP_KAFKA_BOOTSTRAP=bootstrap, CDP_TOPIC_PREFIX=prefix, CDP_EVENT_STORE=store,
                       **settings)


def stop_cleanly(worker: subprocess.Popen, log: Path) -> str:
    """SIGTERM; the worker must exit 0. Returns its log."""
    stop(worker, signal.SIGTERM)
    text = log.read_text()
    assert worker.returncode == 0, text[-3000:]
    return text


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def private(name: str):
    """A fixture: a private `name` service, started for the test and removed after it."""
    @pytest.fixture(name=f"private_{name}")
    def service(tmp_path: Path):
        started = PrivateService(name, tmp_path / f"{name}-service")
        started.start()
        yield started
        started.remove()
    return service


private_postgres = private("postgres")
private_kafka = private("kafka")


# ----------------------------------------------------------------------------------- outages


def test_postgres_outage_is_waited_out_by_the_same_worker(private_postgres: PrivateService, kafka_bootstrap: str,
                                                          fresh_topic_prefix: str, tmp_path: Path,
                                                          small_input: list[str], small_embedded) -> None:
    embedded, expected = small_embedded
    dsn = private_postgres.address
    env = worker_env(tmp_path / "worker", kafka_bootstrap, fresh_topic_prefix, dsn)
    first, rest = small_input[:1], small_input[1:]
    cdp(env, "ingest", "--kafka", *first)
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        wait_for(lambda: stored_keys(dsn) >= 300, 120, "the first events", [worker])
        private_postgres.stop()
        down = time.monotonic()
        # the rest arrives during the outage: the worker has a batch to store and must wait for it
        # (an idle worker does not touch the store: it keeps no view since `cdp serve` owns it)
        cdp(env, "ingest", "--kafka", *rest)
        time.sleep(max(0.0, 20 - (time.monotonic() - down)))
        assert worker.poll() is None, log.read_text()[-3000:]
        wait_for(lambda: "waiting for PostgreSQL at" in log.read_text(), 10, "the progress line to say so", [worker])
        private_postgres.start()
        back = time.monotonic()
        wait_for(lambda: stored_keys(dsn) >= expected, 120, "every event stored", [worker])
        recovered = time.monotonic() - back
    finally:
        text = stop_cleanly(worker, log)
    print(f"PostgreSQL down {back - down:.0f} s; every event stored {recovered:.1f} s after it was back; "
          f"the worker said: {[line for line in text.splitlines() if 'is back after' in line]}")
    assert "PostgreSQL unreachable at 127.0.0.1:" in text and "is back after" in text
    assert recorded(dsn) == expected
    assert rebuilt(environment(tmp_path / "rebuilt", CDP_EVENT_STORE=dsn)) == embedded


def test_broker_outage_leaves_the_store_to_other_writers(private_kafka: PrivateService, fresh_postgres_dsn: str,
                                                         fresh_topic_prefix: str, tmp_path: Path,
                                                         small_input: list[str], small_embedded) -> None:
    embedded, expected = small_embedded
    env = worker_env(tmp_path / "worker", private_kafka.address, fresh_topic_prefix, fresh_postgres_dsn)
    cdp(env, "ingest", "--kafka", *small_input)
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(orjson.dumps({
        "specversion": "1.0", "id": f"extra-{i}", "source": "bank/crm", "type": "cdp.identify",
        "time": "2025-03-01T10:00:00Z", "datacontenttype": "application/json",
        "data": {"business_unit": "bank", "customer": {"source_id": f"X{i}", "email": f"x{i}@extra.example"}},
    }).decode() + "\n" for i in range(100)))
    try:
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= 300, 120, "the first events", [worker])
        private_kafka.stop()
        # an embedded ingest on the same store gets the writers' lock while the broker is away
        embedded_env = environment(tmp_path / "embedded", CDP_EVENT_STORE=fresh_postgres_dsn)
        started = time.monotonic()
        done = subprocess.run([*CDP, "ingest", str(extra)],
                              env=embedded_env, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert worker.poll() is None, log.read_text()[-3000:]
        time.sleep(5)
        private_kafka.start()
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= expected + 100, 120, "every event stored", [worker])
        time.sleep(2)
    finally:
        text = stop_cleanly(worker, log)
    print(f"embedded ingest of 100 events beside a worker whose broker is down: {took:.1f} s")
    assert recorded(fresh_postgres_dsn) == expected + 100
    assert "Kafka broker unreachable at" in text
    lines = text.splitlines()
    assert len(lines) < 150, f"{len(lines)} log lines for a short outage"
    assert sum("Unable connect" in line for line in lines) <= 4
    assert "\x1b" not in text and "is overlapping" not in text


# ------------------------------------------------------------------------------ faults named


@pytest.fixture
def small_disk(tmp_path: Path):
    directory = tmp_path / "small-disk"
    mount_tmpfs(directory, "size=2m")
    yield directory
    unmount(directory)


def test_a_full_local_disk_does_not_stop_a_worker(small_disk: Path, kafka_bootstrap: str, fresh_postgres_dsn: str,
                                                 fresh_topic_prefix: str, tmp_path: Path,
                                                 small_input: list[str], small_embedded) -> None:
    """A worker keeps nothing but Faust's folder in CDP_HOME (the view is `cdp serve`'s), so a full
    local disk costs it nothing; a full disk where something is written (the embedded ingest, the
    view) is one line naming it: tests/test_faults_cli.py."""
    _, expected = small_embedded
    home = small_disk / "home"
    env = worker_env(home, kafka_bootstrap, fresh_topic_prefix, fresh_postgres_dsn)
    cdp(env, "ingest", "--kafka", *small_input)
    (small_disk / "ballast").write_bytes(b"\0" * (1900 * 1024))  # what is left: about 100 KB
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= expected, 120, "every event stored", [worker])
    finally:
        text = stop_cleanly(worker, log)
    assert recorded(fresh_postgres_dsn) == expected
    assert "Traceback" not in text


def test_read_only_home_is_one_line_and_a_failure(tmp_path: Path, kafka_bootstrap: str, fresh_postgres_dsn: str,
                                                  fresh_topic_prefix: str) -> None:
    home = tmp_path / "read-only"
    mount_tmpfs(home, "size=1m,ro")
    try:
        env = worker_env(home, kafka_bootstrap, fresh_topic_prefix, fresh_postgres_dsn)
        done = subprocess.run([*CDP, "worker"], env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        unmount(home)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert lines[-1].startswith("cdp: error: permission denied: ") and str(home) in lines[-1], lines
    print(lines[-1])


# --------------------------------------------------------------------- identity, SIGTERM, health


def test_a_fresh_store_behind_an_old_group_is_refused_with_the_remedy(kafka_bootstrap: str, postgres_dsn: str,
                                                                      fresh_postgres_dsn: str, fresh_topic_prefix: str,
                                                                      tmp_path: Path, small_input: list[str],
                                                                      small_embedded) -> None:
    _, expected = small_embedded
    first = worker_env(tmp_path / "first", kafka_bootstrap, fresh_topic_prefix, fresh_postgres_dsn)
    cdp(first, "ingest", "--kafka", *small_input)
    worker = start_worker(first, tmp_path / "first.log")
    try:
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= expected, 120, "every event stored", [worker])
        time.sleep(1)
    finally:
        stop_cleanly(worker, tmp_path / "first.log")
    # the store is replaced by an empty one; the group's offsets stay on the broker
    with psycopg.connect(fresh_postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    second = worker_env(tmp_path / "second", kafka_bootstrap, fresh_topic_prefix, fresh_postgres_dsn)
    refused = cdp(second, "worker", check=False)
    group = f"{fresh_topic_prefix}cdp-worker"
    assert refused.returncode == 1
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"cdp: error: consumer group {group} has offsets on {fresh_topic_prefix}cdp.events "
                           "committed for store "), line
    assert "cdp worker --reset-group" in line
    assert (f"kafka-consumer-groups.sh --bootstrap-server {kafka_bootstrap} --group {group} "
            f"--topic {fresh_topic_prefix}cdp.events --reset-offsets --to-earliest --execute") in line
    assert stored_keys(fresh_postgres_dsn) == 0
    log = tmp_path / "reset.log"
    worker = subprocess.Popen([*CDP, "worker", "--reset-group"],
                              env=second, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)
    try:
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= expected, 120, "every event stored again", [worker])
    finally:
        stop_cleanly(worker, log)
    assert recorded(fresh_postgres_dsn) == expected


def test_sigterm_mid_stream_exits_0_and_a_restart_loses_and_doubles_nothing(
        kafka_bootstrap: str, fresh_postgres_dsn: str, fresh_topic_prefix: str, tmp_path: Path,
        small_input: list[str], small_embedded) -> None:
    embedded, expected = small_embedded
    port = free_port()
    # small batches, and the stream keeps flowing after the SIGTERM: the rest is published only then
    env = worker_env(tmp_path / "worker", kafka_bootstrap, fresh_topic_prefix, fresh_postgres_dsn,
                     CDP_WORKER_BATCH="20")
    cdp(env, "ingest", "--kafka", *small_input[:1])
    first = start_worker(env, tmp_path / "first.log")
    try:
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= 300, 120, "the first events", [first])
    finally:
        stop_cleanly(first, tmp_path / "first.log")
    assert stored_keys(fresh_postgres_dsn) < expected, "stopped mid-stream"
    cdp(env, "ingest", "--kafka", *small_input[1:])
    log = tmp_path / "second.log"
    second = subprocess.Popen([*CDP, "worker",
                               "--health-port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= expected, 120, "every event stored", [second])
        assert get(f"{base}/health")[0] == 200
        wait_for(lambda: get(f"{base}/ready")[0] == 200, 30, "readiness", [second])
        wait_for(lambda: orjson.loads(get(f"{base}/ready")[1])["consumer_lag"] == 0, 30, "lag 0", [second])
        status, body = get(f"{base}/metrics")
    finally:
        text = stop_cleanly(second, log)
    assert status == 200
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name + str(sorted(s.labels.items())): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert samples[f"cdp_consumer_lag[('group', '{fresh_topic_prefix}cdp-worker')]"] == 0
    assert samples["cdp_batch_seconds_count[]"] > 0
    assert samples["cdp_events_consumed_total[]"] > 0
    assert "lag 0" in text.strip().splitlines()[-1]
    assert "\x1b" not in text
    assert recorded(fresh_postgres_dsn) == expected
    assert rebuilt(environment(tmp_path / "rebuilt", CDP_EVENT_STORE=fresh_postgres_dsn)) == embedded
