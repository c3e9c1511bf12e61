"""Publish-to-visible of `cdp serve`: `python -m bench.visible [--seconds S] [--customers N] [--mode M]`.

Events are posted over HTTP at a steady 1,000 events/s (CloudEvents batches of 10 every 10 ms, from
16 sender threads on a fixed clock, each batch naming 10 new customers) to a server whose view
already holds N customers. For every 10th batch one of its customers is followed from the moment the
request was answered (accepted) until

* its profile is readable through `GET /v1/profiles/shop:…` (polled every 5 ms, then every tenth of
  the time waited: see `SteadyPublisher.probe`), and, with Kafka,
* its profile message arrives on `cdp.profiles` (a consumer reading the topic all along).

Two modes (`--mode embedded|kafka|both`, default both):

* embedded: SQLite store, `cdp serve` runs the pipeline in process (answers after the store commit);
* kafka: `cdp worker` consuming from the real broker into a PostgreSQL store, `cdp serve` answering
  after the broker's ack and following the store, woken by PostgreSQL notifications (needs
  CDP_KAFKA_BOOTSTRAP and CDP_POSTGRES_DSN; `source /work/svc/env.sh` or scripts/services.sh).

The same-run baseline is the accepting request itself (round trip of the POST), and with Kafka the
broker's own produce → consume round trip of a message (kafka-python, acks=all). Figures are
printed, not asserted; the machine may be shared, so compare against the baselines.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson

from bench.serve import percentile, synthetic_view
from tests.serving import new_keys, start_server

TARGET = "p99 under 500 ms"
POLL_MIN, POLL_MAX = 0.005, 0.1  # a probe's pauses between look-ups (see SteadyPublisher.probe)
PROBE = re.compile(r"^v(\d+)@bench\.example$")


def request_batch(n: int) -> list[dict]:
    """The n-th request's CloudEvents: 10 new customers of unit `shop`, the first with an e-mail."""
    return [{"specversion": "1.0", "id": f"v{n}-{i}", "source": "shop/web", "type": "cdp.identify",
             "time": "2026-03-01T10:00:00Z",
             "data": {"business_unit": "shop", "customer": {
                 "source_id": f"P{n}-{i}", **({"email": f"v{n}@bench.example"} if i == 0 else {})}}}
            for i in range(10)]


class SteadyPublisher(threading.Thread):
    """CloudEvents at `rate` events/s in batches of 10 new customers; the first customer of every
    10th batch is probed (over HTTP here, on the topic by `ProfileTopicWatch`)."""

    def __init__(self, url: str, key: str, reader: str, rate: int, seconds: float, warmup: float = 0.0,
                 probes: bool = True):
        super().__init__()
        self.url, self.key, self.reader, self.rate, self.seconds = url, key, reader, rate, seconds
        self.warmup = warmup  # seconds sent first at the same rate, not probed (the server's start-up)
        self.probes = probes  # False: no look-ups over HTTP (the topic watch still measures)
        self.accept: list[float] = []
        self.accepted_at: dict[int, float] = {}  # probed batch -> when its request was answered
        self.visible: list[float] = []
        self.sent = 0

    def run(self) -> None:
        interval = 10 / self.rate
        local = threading.local()
        probes: list[threading.Thread] = []

        def send(n: int, probed: bool) -> None:
            http = getattr(local, "http", None)
            if http is None:
                http = local.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"},
                                                 timeout=30)
            batch = request_batch(n)
            started = time.monotonic()
            answer = http.post("/events", content=orjson.dumps(batch),
                               headers={"Content-Type": "application/cloudevents-batch+json"})
            done = time.monotonic()
            if answer.status_code == 200:
                self.accept.append(done - started)
                self.sent += 10
                if probed and n % 10 == 0:
                    self.accepted_at[n] = done  # also what the topic watch measures from
                if probed and self.probes and n % 10 == 0:
                    probe = threading.Thread(target=self.probe, args=(f"shop:P{n}-0", done))
                    probe.start()
                    probes.append(probe)

        with ThreadPoolExecutor(max_workers=16) as pool:
            next_at = time.monotonic()
            steady = next_at + self.warmup
            end = steady + self.seconds
            n = 0
            while time.monotonic() < end:
                pool.submit(send, n, next_at >= steady)
                n += 1
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
        for probe in probes:
            probe.join()

    def probe(self, ref: str, accepted_at: float) -> None:
        """Polls the profile until it is readable: every 5 ms at first, then every tenth of the time
        waited so far (at most every 100 ms), so a figure is high by at most a tenth. Polling every
        5 ms throughout made the probes a load of their own on the server they measure (seconds of
        visibility meant dozens of probes in flight, hundreds of look-ups a second): in one Kafka
        A/B pair at 100,000 customers, cdp.profiles p50 was 2.1 s without API probes, 6.2 s with."""
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.reader}"}, timeout=30) as http:
            while (waited := time.monotonic() - accepted_at) < 10:
                if http.get(f"/v1/profiles/{ref}").status_code == 200:
                    self.visible.append(time.monotonic() - accepted_at)
                    return
                time.sleep(poll_interval(waited))


def poll_interval(waited: float) -> float:
    """A probe's pause after a miss, `waited` seconds after its request was accepted."""
    return min(POLL_MAX, max(POLL_MIN, waited / 10))


class ProfileTopicWatch(threading.Thread):
    """Reads `cdp.profiles` all along; notes when each probed customer's first profile arrived."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__(daemon=True)
        from kafka import KafkaConsumer

        self.consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                      enable_auto_commit=False, group_id=None, fetch_max_wait_ms=5)
        self.arrived: dict[int, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for records in self.consumer.poll(timeout_ms=50).values():
                now = time.monotonic()
                for record in records:
                    email = orjson.loads(record.value).get("email") if record.value else None
                    match = PROBE.match(email or "")
                    if match:
                        self.arrived.setdefault(int(match.group(1)), now)
        self.consumer.close()

    def latencies(self, accepted_at: dict[int, float]) -> list[float]:
        return [self.arrived[n] - at for n, at in accepted_at.items() if n in self.arrived]


def broker_round_trip(bootstrap: str, topic: str, n: int = 200) -> list[float]:
    """The baseline with Kafka: produce (acks=all) → consume of one small message, kafka-python alone."""
    from kafka import KafkaConsumer, KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, fetch_max_wait_ms=5)
    producer.send(topic, b"warm-up").get(timeout=30)
    while not consumer.poll(timeout_ms=200):
        pass
    times = []
    for i in range(n):
        started = time.monotonic()
        producer.send(topic, str(i).encode()).get(timeout=30)
        while not consumer.poll(timeout_ms=50):
            pass
        times.append(time.monotonic() - started)
        time.sleep(0.01)
    producer.close()
    consumer.close()
    return times


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update(CDP_HOME=str(home), CDP_RATE_LIMIT="100000", CDP_DUCKDB_MEMORY=os.environ.get("CDP_DUCKDB_MEMORY", "2GB"),
               **extra)
    return env


def report(title: str, publisher: SteadyPublisher, topic: list[float] | None, broker: list[float] | None) -> None:
    ms = 1000

    def line(label: str, values: list[float], extra: str = "") -> None:
        print(f"  {label:<40} p50 {percentile(values, .5) * ms:7.1f} ms   p99 {percentile(values, .99) * ms:7.1f} ms"
              f"{extra}")

    print(f"\n== publish-to-visible, {title}: {publisher.sent:,} events accepted, {len(publisher.accepted_at)} probes"
          f" (after {publisher.warmup:g} s of warm-up at the same rate)")
    if publisher.probes:
        line("accepted → profile readable over HTTP", publisher.visible, f"   ({len(publisher.visible)} seen)")
    if topic is not None:
        line("accepted → profile on cdp.profiles", topic, f"   ({len(topic)} seen)")
    line("baseline: the accepting request itself", publisher.accept)
    if broker is not None:
        line("baseline: broker produce → consume", broker)
    print(f"  target: {TARGET}")


def run_embedded(tmp: Path, customers: int, seconds: float, warmup: float) -> None:
    env = clean_env(tmp / "embedded")
    synthetic_view(tmp / "embedded" / "view.duckdb", customers)
    keys = new_keys(env, {"shop": ("publish", "shop"), "read": ("read", None)})
    server = start_server(env, tmp / "embedded.log", timeout=300)
    try:
        publisher = SteadyPublisher(server.url, keys["shop"], keys["read"], 1000, seconds, warmup)
        publisher.run()
    finally:
        server.stop()
    report(f"embedded (SQLite), 1,000 events/s for {seconds:g} s, view of {customers:,} customers",
           publisher, None, None)


def run_kafka(tmp: Path, customers: int, seconds: float, warmup: float, probes: bool = True) -> None:
    from bench.kafka import drop_database, fresh_database, services, start_worker, stop, stop_services, wait_ready

    bootstrap, dsn, started = services()
    store = fresh_database(dsn)
    prefix = f"bench.visible.{uuid.uuid4().hex[:8]}."
    shared = dict(CDP_KAFKA_BOOTSTRAP=bootstrap, CDP_TOPIC_PREFIX=prefix, CDP_EVENT_STORE=store)
    # The view holds N customers but the store starts empty: a default worker would self-train
    # at 1k, 2k, 4k, 8k and 16k records within the run (on a store of N, next at 2N), each time
    # holding its stream still; the figure is for the steady stream of a trained store.
    worker_env = clean_env(tmp / "worker", CDP_TRAIN_MIN_RECORDS=os.environ.get("CDP_TRAIN_MIN_RECORDS", "0"), **shared)
    serve_env = clean_env(tmp / "serve", **shared)
    worker = server = watch = None
    try:
        synthetic_view(tmp / "serve" / "view.duckdb", customers)
        keys = new_keys(serve_env, {"shop": ("publish", "shop"), "read": ("read", None)})
        worker = start_worker(worker_env, tmp / "worker.log")
        wait_ready(worker, tmp / "worker.log")
        server = start_server(serve_env, tmp / "serve.log", timeout=300)
        broker = broker_round_trip(bootstrap, f"{prefix}bench.roundtrip")
        watch = ProfileTopicWatch(bootstrap, f"{prefix}cdp.profiles")
        watch.start()
        publisher = SteadyPublisher(server.url, keys["shop"], keys["read"], 1000, seconds, warmup, probes)
        publisher.run()
        time.sleep(2)  # the last probes' messages
        topic = watch.latencies(publisher.accepted_at)
    finally:
        if watch is not None:
            watch.stopping.set()
            watch.join(timeout=5)
        if server is not None:
            server.stop()
        if worker is not None:
            stop(worker)
        drop_database(dsn, store)
        stop_services(started)
    report(f"Kafka + PostgreSQL (cdp worker, cdp serve), 1,000 events/s for {seconds:g} s, "
           f"view of {customers:,} customers", publisher, topic, broker)


def process_cpu(pid: int) -> float:
    """A process's CPU seconds so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def follow_store(env: dict[str, str], view: Path, size: int, limit: int = 20_000) -> tuple[tuple, tuple, int]:
    """What cdp serve's read side does for the first `limit` stored events, in process, in batches
    of `size`: read back and decrypt (CustomerApplication.raw_notifications), then project onto a
    copy of `view` with the server's look-up indexes. Returns (CPU, wall) of each part and the count."""
    import shutil

    from cdp.application import CustomerApplication
    from cdp.config import Settings
    from cdp.server.readside import LOOKUP_INDEXES
    from projections.projector import Projector

    copy = view.with_name(f"follow-{size}.duckdb")
    shutil.copy(view, copy)
    app = CustomerApplication(Settings.from_env(env))
    projector = Projector(copy, memory_limit=env["CDP_DUCKDB_MEMORY"])
    for statement in LOOKUP_INDEXES:
        projector.con.execute(statement)
    reading, projecting, count, position = [0.0, 0.0], [0.0, 0.0], 0, 0
    try:
        while count < limit:
            cpu, wall = time.process_time(), time.perf_counter()
            batch = app.raw_notifications(position, min(size, limit - count))
            reading[0] += time.process_time() - cpu
            reading[1] += time.perf_counter() - wall
            if not batch:
                break
            cpu, wall = time.process_time(), time.perf_counter()
            projector.apply(batch)
            projecting[0] += time.process_time() - cpu
            projecting[1] += time.perf_counter() - wall
            count, position = count + len(batch), batch[-1][0]
    finally:
        projector.close()
        app.close()
        copy.unlink()
    return tuple(reading), tuple(projecting), count


def run_ceiling(tmp: Path, customers: int, events: int) -> None:
    """How fast the Kafka path can go, stage by stage, on this machine: `events` bench events are
    published first; then one `cdp worker` stores them all into PostgreSQL (events/s, its CPU per
    event), beside a raw kafka-python consume of the same topic; then what `cdp serve`'s read side
    does with the filled store, in process (`follow_store`: read back and decrypt, project onto a
    view of N customers; stored events/s and CPU per stored event, in live-sized batches of 200
    and in catch-up batches of 5,000), beside a raw read of the same rows from PostgreSQL.
    Self-training is off (CDP_TRAIN_MIN_RECORDS=0) unless set: it runs in a process of its own."""
    from bench.kafka import (drop_database, fresh_database, publish, raw_consume, services, start_worker, stop,
                             stop_services, stored)

    bootstrap, dsn, started = services()
    store = fresh_database(dsn)
    prefix = f"bench.ceiling.{uuid.uuid4().hex[:8]}."
    shared = dict(CDP_KAFKA_BOOTSTRAP=bootstrap, CDP_TOPIC_PREFIX=prefix, CDP_EVENT_STORE=store)
    lines = tmp / "events.jsonl"
    lines.write_bytes(b"".join(orjson.dumps(e) + b"\n" for n in range(events // 10) for e in request_batch(n)))
    worker = None
    try:
        sent, _ = publish(bootstrap, prefix, [lines], tmp / "publisher")
        raw = raw_consume(bootstrap, f"{prefix}cdp.events", sent)
        worker = start_worker(clean_env(tmp / "worker", CDP_TRAIN_MIN_RECORDS=os.environ.get(
            "CDP_TRAIN_MIN_RECORDS", "0"), **shared), tmp / "worker.log")
        while not (first := stored(store)):
            time.sleep(0.02)
        began, cpu = time.monotonic(), process_cpu(worker.pid)
        while stored(store) < sent:
            if worker.poll() is not None:
                raise SystemExit(f"bench: the worker stopped: {(tmp / 'worker.log').read_text()[-2000:]}")
            time.sleep(0.05)
        stored_s, stored_cpu = time.monotonic() - began, process_cpu(worker.pid) - cpu
        stop(worker)
        worker = None

        import psycopg

        with psycopg.connect(store) as conn:
            began = time.perf_counter()
            rows = len(conn.execute("SELECT notification_id, originator_id, topic, state FROM cdp_events "
                                    "ORDER BY notification_id").fetchall())
            read_s = time.perf_counter() - began
        synthetic_view(tmp / "view.duckdb", customers)
        reader = clean_env(tmp / "worker", **shared)  # the worker's home: its master key
        follow = {size: follow_store(reader, tmp / "view.duckdb", size) for size in (200, 5000)}
    finally:
        if worker is not None:
            stop(worker)
        drop_database(dsn, store)
        stop_services(started)
    print(f"\n== Kafka path's ceiling: {sent:,} events ({rows:,} stored events), one worker, view of {customers:,} customers")
    print(f"  cdp worker → PostgreSQL                 {(sent - first) / stored_s:9,.0f} events/s   "
          f"CPU {stored_cpu / (sent - first) * 1e6:6.0f} µs/event (after its first batch)")
    print(f"  baseline: raw consume of cdp.events     {sent / raw:9,.0f} events/s   "
          f"(ratio {raw / sent * (sent - first) / stored_s:.2f})")
    for size, (reading, projecting, count) in follow.items():
        print(f"  cdp serve's read side, batches of {size:>6,}  {count / (reading[1] + projecting[1]):9,.0f} stored events/s   "
              f"CPU {(reading[0] + projecting[0]) / count * 1e6:6.0f} µs/stored event: read back + decrypt "
              f"{reading[0] / count * 1e6:.0f}, project {projecting[0] / count * 1e6:.0f}")
    print(f"  baseline: raw read of the rows from PostgreSQL {rows / read_s:9,.0f} stored events/s")
    print(f"  needed for 1,000 events/s: 1,000 events/s stored, {rows / sent * 1000:,.0f} stored events/s followed")


def run_batches(tmp: Path, customers: int, batches: int = 60) -> None:
    """The read side's share, in process and in CPU time (what a loaded machine does not skew):
    the stored events of `batches` requests as the server projects them, one live batch per
    request, on the view of N customers with the server's look-up indexes. Baseline: DuckDB
    inserting the same notifications into a table and committing, on the same connection."""
    import statistics

    import pyarrow as pa

    from cdp.application import CustomerApplication
    from cdp.config import Settings
    from cdp.server.readside import LOOKUP_INDEXES
    from projections.projector import Projector
    from projections.transactions import transaction

    store_env = clean_env(tmp / "store")
    (tmp / "store").mkdir(parents=True)
    events = tmp / "events.jsonl"
    events.write_bytes(b"".join(orjson.dumps(e) + b"\n" for n in range(batches) for e in request_batch(n)))
    subprocess.run([sys.executable, "-m", "cdp", "ingest", str(events)], env=store_env, check=True,
                   stdout=subprocess.DEVNULL)
    app = CustomerApplication(Settings.from_env(store_env))
    rows = app.raw_notifications(0, 1_000_000)
    app.close()
    per_request = len(rows) // batches
    synthetic_view(tmp / "batches.duckdb", customers)
    projector = Projector(tmp / "batches.duckdb", memory_limit=clean_env(tmp)["CDP_DUCKDB_MEMORY"])
    con = projector.con
    for statement in LOOKUP_INDEXES:
        con.execute(statement)
    con.execute("CREATE TEMP TABLE baseline (position BIGINT, customer_id VARCHAR, topic VARCHAR, state BLOB)")

    def cpu(work) -> tuple[float, float]:
        wall, used = time.perf_counter(), time.process_time()
        work()
        return time.process_time() - used, time.perf_counter() - wall

    def baseline(batch: list[tuple]) -> None:
        positions, ids, topics, states = zip(*batch)
        con.register("notifications", pa.table({
            "position": pa.array(positions, pa.int64()), "customer_id": pa.array(ids, pa.string()),
            "topic": pa.array(topics, pa.string()), "state": pa.array(states, pa.binary())}))
        with transaction(con):
            con.execute("INSERT INTO baseline SELECT * FROM notifications")
        con.unregister("notifications")

    applied, raw = [], []
    for start in range(0, per_request * batches, per_request):
        batch = rows[start:start + per_request]
        applied.append(cpu(lambda: projector.apply(batch)))
        raw.append(cpu(lambda: baseline(batch)))
    projector.close()
    warm = slice(5, None)  # the first batches load the view's blocks
    ms = 1000

    def line(label: str, values: list[tuple[float, float]]) -> None:
        cpus, walls = [v[0] for v in values[warm]], [v[1] for v in values[warm]]
        print(f"  {label:<48} CPU p50 {statistics.median(cpus) * ms:6.1f} ms  p99 {percentile(cpus, .99) * ms:6.1f} ms"
              f"   (wall p50 {statistics.median(walls) * ms:6.1f} ms)")

    print(f"\n== the read side's live batch, in process: {len(applied) - 5} batches of {per_request} notifications "
          f"(one request of 10 new customers), view of {customers:,} customers")
    line("projector.apply (events, sources, customers, units)", applied)
    line("baseline: DuckDB inserts the notifications, commits", raw)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.visible", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each measurement")
    parser.add_argument("--customers", type=int, default=1_000_000, help="customers already in the view")
    parser.add_argument("--mode", choices=("embedded", "kafka", "both", "batches", "ceiling"), default="both",
                        help="batches: the read side's CPU per live batch in process; ceiling: the Kafka "
                             "path's sustained rates, stage by stage (neither part of both)")
    parser.add_argument("--events", type=int, default=50_000, help="ceiling: events published first")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds sent at the same rate before probing starts (a just-started server's "
                             "resolver and view warm up: the figure is for a steady stream)")
    parser.add_argument("--no-probes", dest="probes", action="store_false",
                        help="kafka: measure cdp.profiles only, without look-ups over HTTP (which load the "
                             "server measured)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cdp-bench-visible-") as tmp:
        if args.mode == "batches":
            run_batches(Path(tmp), args.customers)
        if args.mode == "ceiling":
            run_ceiling(Path(tmp), args.customers, args.events)
        if args.mode in ("embedded", "both"):
            run_embedded(Path(tmp), args.customers, args.seconds, args.warmup)
        if args.mode in ("kafka", "both"):
            run_kafka(Path(tmp), args.customers, args.seconds, args.warmup, args.probes)


if __name__ == "__main__":
    main(sys.argv[1:])
