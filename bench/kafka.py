"""Kafka streaming benchmark: `python -m bench.kafka [--events N] [--rate R] [--seconds S]`.

Needs the real services (CDP_KAFKA_BOOTSTRAP and CDP_POSTGRES_DSN; started with
scripts/services.sh when unset). Every run uses its own topics and its own PostgreSQL database.

1. throughput: N demo events published to cdp.events, then, on the very same messages,
   * one `cdp worker` process with the PostgreSQL event store, end to end (validate, resolve,
     store), timed from its first stored event to its last;
   * a raw kafka-python consume of the topic (the transport's ceiling);
   * the embedded pipeline in-process on the same events (SQLite, the default, and PostgreSQL);
2. latency: events published at a steady R events/s for S seconds to a running worker, beside a
   running `cdp serve` (which projects the store and publishes cdp.profiles: workers resolve and
   commit only); each event is a new customer, so it is visible when its profile appears on
   cdp.profiles: latency = the profile message's timestamp minus the event's send time (one
   machine, one clock).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Sequence

import orjson

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
SERVICES = REPO / "scripts" / "services.sh"


def services() -> tuple[str, str, list[str]]:
    """The services' addresses, and the services this call started (to be stopped at the end):
    ones that were running already are left as they were."""
    started: list[str] = []
    if not (os.environ.get("CDP_KAFKA_BOOTSTRAP") and os.environ.get("CDP_POSTGRES_DSN")):
        out = subprocess.run([str(SERVICES), "start"], check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            os.environ.setdefault(name, value)
        state = Path(os.environ.get("CDP_SERVICES_DIR", REPO / ".services"))
        last = state / "last-start"
        started = last.read_text().split() if last.exists() else []
    return os.environ["CDP_KAFKA_BOOTSTRAP"], os.environ["CDP_POSTGRES_DSN"], started


def stop_services(started: Sequence[str]) -> None:
    if started:
        print(f"bench.kafka: stopping the services it started: {', '.join(started)}")
        subprocess.run([str(SERVICES), "stop", *started], check=False, capture_output=True)


def fresh_database(dsn: str) -> str:
    from tests.databases import create_database, with_dbname

    name = f"bench_{uuid.uuid4().hex[:10]}"
    create_database(dsn, name)
    return with_dbname(dsn, name)


def drop_database(dsn: str, url: str) -> None:
    from tests.databases import drop_database as drop

    drop(dsn, url.rsplit("/", 1)[1])


def clean_up(bootstrap: str, dsn: str, stores: Sequence[str], prefix: str, started: Sequence[str] = ()) -> None:
    """What a run made on the shared services (its databases, its topics: tests/topics.py says why),
    then the services it started itself."""
    from tests.topics import delete_topics

    for store in stores:
        drop_database(dsn, store)
    delete_topics(bootstrap, prefix)
    stop_services(started)


def demo_events(events: int) -> list[Path]:
    from cdp.demo import DemoSpec, generate

    people = max(100, events * 10 // 123)
    directory = OUT / f"kafka-demo-{people}"
    if not (directory / "done").exists():
        shutil.rmtree(directory, ignore_errors=True)
        generate(directory, DemoSpec(people=people, seed=11))
        (directory / "done").touch()
    return sorted(directory.glob("*.jsonl"))


def env_for(home: Path, bootstrap: str, prefix: str, store: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update(CDP_HOME=str(home), CDP_KAFKA_BOOTSTRAP=bootstrap, CDP_TOPIC_PREFIX=prefix, **extra)
    if store:
        env["CDP_EVENT_STORE"] = store
    return env


def stored(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        if not conn.execute("SELECT to_regclass('cdp_event_keys') IS NOT NULL").fetchone()[0]:
            return 0
        return conn.execute("SELECT count(*) FROM cdp_event_keys").fetchone()[0]


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    worker = subprocess.Popen([sys.executable, "-m", "cdp", "worker"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(log, "wb"), start_new_session=True)
    return worker


def stop(worker: subprocess.Popen) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()


def wait_ready(worker: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "consuming" not in log.read_text():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: the worker did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------ throughput


def publish(bootstrap: str, prefix: str, files: list[Path], home: Path) -> tuple[int, float]:
    from cdp.config import Settings
    from cdp.publishing import publish_files

    cfg = Settings.from_env(env_for(home, bootstrap, prefix, None))
    summary, _ = publish_files(cfg, [str(f) for f in files], None)
    return summary.accepted, summary.seconds


def raw_consume(bootstrap: str, topic: str, expected: int) -> float:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-raw-{uuid.uuid4().hex[:8]}",
                             auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=5000)
    count, started = 0, None
    while count < expected:
        for records in consumer.poll(timeout_ms=1000).values():
            if started is None:
                started = time.perf_counter()
            count += len(records)
    seconds = time.perf_counter() - started
    consumer.close()
    return seconds


def embedded(files: list[Path], home: Path, store: str | None) -> float:
    from cdp.config import Settings
    from cdp.pipeline import Pipeline

    env = {"CDP_HOME": str(home), **({"CDP_EVENT_STORE": store} if store else {})}
    with Pipeline(Settings.from_env(env)) as pipeline:
        return pipeline.ingest([str(f) for f in files]).seconds


def worker_throughput(bootstrap: str, prefix: str, store: str, expected: int, home: Path) -> tuple[float, str]:
    log = home.with_suffix(".log")
    worker = start_worker(env_for(home, bootstrap, prefix, store), log)
    try:
        first = None
        while (count := stored(store)) < expected:
            if first is None and count:
                first = (time.perf_counter(), count)
            if worker.poll() is not None:
                raise SystemExit(f"bench: the worker stopped: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        done = time.perf_counter()
    finally:
        stop(worker)
    started, already = first if first else (done, 0)
    rate = (expected - already) / max(done - started, 1e-9)
    return rate, [l for l in log.read_text().splitlines() if "consumed" in l][-1]


# --------------------------------------------------------------------------------------- latency


def latency_event(i: int, run: str) -> tuple[bytes, bytes]:
    source_id = f"L{run}-{i}"
    event = {
        "specversion": "1.0", "id": f"lat-{run}-{i}", "source": "retail/bench", "type": "cdp.identify",
        "time": "2025-06-01T12:00:00Z", "datacontenttype": "application/json",
        "data": {"business_unit": "retail", "customer": {"source_id": source_id,
                                                          "email": f"lat{i}.{run}@bench.example"}},
    }
    return f"retail:{source_id}".encode(), orjson.dumps(event)


def latency(bootstrap: str, prefix: str, store: str, home: Path, rate: int, seconds: int) -> list[float]:
    from kafka import KafkaConsumer, KafkaProducer

    from identity.resolver import new_customer_id

    from tests.serving import start_server

    log = home.with_suffix(".log")
    worker = start_worker(env_for(home, bootstrap, prefix, store), log)
    server = consumer = None
    run = uuid.uuid4().hex[:6]
    sent: dict[str, float] = {}
    try:
        wait_ready(worker, log)
        server = start_server(env_for(home.with_name(f"{home.name}-serve"), bootstrap, prefix, store),
                              home.with_suffix(".serve.log"))
        consumer = KafkaConsumer(f"{prefix}cdp.profiles", bootstrap_servers=bootstrap, auto_offset_reset="latest",
                                 group_id=f"bench-lat-{run}", enable_auto_commit=False)
        while not consumer.assignment():
            consumer.poll(timeout_ms=200)
        time.sleep(2)  # the worker's group settles
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=1)
        total = rate * seconds
        started = time.perf_counter()
        seen: dict[str, float] = {}
        for i in range(total):
            while time.perf_counter() < started + i / rate:  # steady pace
                for records in consumer.poll(timeout_ms=0).values():
                    for r in records:
                        seen.setdefault(r.key.decode(), r.timestamp / 1000)
            key, value = latency_event(i, run)
            sent[new_customer_id("retail", key.decode().split(":", 1)[1])] = time.time()
            producer.send(f"{prefix}cdp.events", key=key, value=value)
        producer.flush()
        deadline = time.monotonic() + 30
        while len(set(sent) & set(seen)) < len(sent) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    seen.setdefault(r.key.decode(), r.timestamp / 1000)
        producer.close()
    finally:
        if consumer is not None:
            consumer.close()
        if server is not None:
            server.stop()
        stop(worker)
    missing = len(set(sent) - set(seen))
    if missing:
        print(f"  (latency: {missing} of {len(sent)} events not visible within 30 s after the last send)")
    return sorted(seen[c] - sent[c] for c in sent if c in seen)


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def throughput(bootstrap: str, prefix: str, files: list[Path], work: Path, stores: list[str]) -> None:
    sent, publish_seconds = publish(bootstrap, prefix, files, work / "publisher")
    print(f"published {sent:,} events in {publish_seconds:.1f} s ({sent / publish_seconds:,.0f} events/s, "
          "acks=all, idempotent)")
    worker_rate, line = worker_throughput(bootstrap, prefix, stores[0], sent, work / "worker")
    raw_rate = sent / raw_consume(bootstrap, f"{prefix}cdp.events", sent)
    sqlite_rate = sent / embedded(files, work / "embedded-sqlite", None)
    pg_rate = sent / embedded(files, work / "embedded-pg", stores[1])
    print(f"\n== throughput, {sent:,} events (goal: worker with PostgreSQL >= 5,000 events/s)")
    print(f"  worker + PostgreSQL store, end to end          {worker_rate:>10,.0f} events/s")
    print(f"  raw kafka-python consume, same messages        {raw_rate:>10,.0f} events/s  "
          f"worker/raw = {worker_rate / raw_rate:.2f}")
    print(f"  embedded pipeline, SQLite (default)            {sqlite_rate:>10,.0f} events/s  "
          f"worker/embedded = {worker_rate / sqlite_rate:.2f}")
    print(f"  embedded pipeline, PostgreSQL                  {pg_rate:>10,.0f} events/s  "
          f"worker/embedded = {worker_rate / pg_rate:.2f}")
    print(f"  worker's last progress line: {line}")


def report_latency(lat: list[float], rate: int, seconds: int) -> None:
    if lat:
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        print(f"\n== publish-to-visible latency at a steady {rate:,} events/s for {seconds} s "
              f"({len(lat):,} events; goal: p99 < 2 s)")
        print(f"  p50 {p50 * 1000:,.0f} ms   p99 {p99 * 1000:,.0f} ms   max {lat[-1] * 1000:,.0f} ms   "
              f"p99/goal = {p99 / 2:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=60000, help="events for the throughput run")
    parser.add_argument("--rate", type=int, default=1000, help="events/s for the latency run")
    parser.add_argument("--seconds", type=int, default=20, help="length of the latency run")
    parser.add_argument("--part", choices=("all", "throughput", "latency"), default="all")
    args = parser.parse_args(argv)
    bootstrap, dsn, started = services()
    try:
        run(args, bootstrap, dsn)
    finally:
        stop_services(started)


def run(args: argparse.Namespace, bootstrap: str, dsn: str) -> None:
    files = demo_events(args.events)
    prefix = f"bench.{uuid.uuid4().hex[:8]}."
    work = Path(tempfile.mkdtemp(prefix="cdp-bench-kafka-"))
    stores = [fresh_database(dsn) for _ in range(3)]
    print(f"bench.kafka on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    try:
        if args.part in ("all", "throughput"):
            throughput(bootstrap, prefix, files, work, stores)
        if args.part in ("all", "latency"):
            lat = latency(bootstrap, f"{prefix}lat.", stores[2], work / "latency", args.rate, args.seconds)
            report_latency(lat, args.rate, args.seconds)
    finally:
        clean_up(bootstrap, dsn, stores, prefix)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
