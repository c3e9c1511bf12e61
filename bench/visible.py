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
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import httpx
import orjson

from bench.common import KeepAlive
from bench.serve import percentile, synthetic_view
from tests.serving import new_keys, start_server

TARGET = "p99 under 500 ms"
POLL_MIN, POLL_MAX = 0.005, 0.1  # a probe's pauses between look-ups (see SteadyPublisher.probe)
BENCH = "this bench (senders, probes)"  # its CPU is printed too: it shares the machine with the server
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
        self.accepted_wall: dict[int, float] = {}  # the same, seconds since the epoch (the server's stage times)
        self.sent_wall: dict[int, float] = {}  # when a probed batch's request was sent, seconds since the epoch
        self.visible: list[float] = []
        self.seen: dict[int, float] = {}  # probed batch -> accepted → readable
        self.lookups = 0  # profile requests the probes made
        self.lookup_times: list[float] = []  # each one's round trip
        self.sent = 0

    def run(self) -> None:
        interval = 10 / self.rate
        senders = KeepAlive(self.url, {"Authorization": f"Bearer {self.key}",
                                       "Content-Type": "application/cloudevents-batch+json"})
        readers = KeepAlive(self.url, {"Authorization": f"Bearer {self.reader}"})
        # a probe waits on a pool thread (and its kept-alive connection) rather than a new thread
        # each: at most ~10 s each, 10 a second
        probing = ThreadPoolExecutor(max_workers=128, thread_name_prefix="probe")

        def send(n: int, probed: bool) -> None:
            batch = orjson.dumps(request_batch(n))
            started, started_wall = time.monotonic(), time.time()
            status = senders.request("POST", "/events", batch)
            done = time.monotonic()
            if status == 200:
                self.accept.append(done - started)
                self.sent += 10
                if probed and n % 10 == 0:  # also what the topic watch measures from
                    self.accepted_at[n], self.accepted_wall[n] = done, time.time()
                    self.sent_wall[n] = started_wall
                if probed and self.probes and n % 10 == 0:
                    probing.submit(self.probe, readers, n, done)

        with probing, ThreadPoolExecutor(max_workers=16) as pool:
            next_at = time.monotonic()
            steady = next_at + self.warmup
            end = steady + self.seconds
            n = 0
            while time.monotonic() < end:
                pool.submit(send, n, next_at >= steady)
                n += 1
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))

    def probe(self, readers: KeepAlive, n: int, accepted_at: float) -> None:
        """Polls the profile until it is readable: every 5 ms at first, then every tenth of the time
        waited so far (at most every 100 ms), so a figure is high by at most a tenth. Polling every
        5 ms throughout made the probes a load of their own on the server they measure (seconds of
        visibility meant dozens of probes in flight, hundreds of look-ups a second): in one Kafka
        A/B pair at 100,000 customers, cdp.profiles p50 was 2.1 s without API probes, 6.2 s with."""
        while (waited := time.monotonic() - accepted_at) < 10:
            self.lookups += 1
            asked = time.monotonic()
            found = readers.request("GET", f"/v1/profiles/shop:P{n}-0") == 200
            self.lookup_times.append(time.monotonic() - asked)
            if found:
                self.seen[n] = time.monotonic() - accepted_at
                self.visible.append(self.seen[n])
                return
            time.sleep(poll_interval(waited))


def poll_interval(waited: float) -> float:
    """A probe's pause after a miss, `waited` seconds after its request was accepted."""
    return min(POLL_MAX, max(POLL_MIN, waited / 10))


class ProfileTopicWatch:
    """Reads `cdp.profiles` all along, in a process of its own (in this one, busy with 16 senders
    and the probes, a message waited for the interpreter lock: hundreds of milliseconds at load);
    notes when each probed customer's first profile arrived."""

    def __init__(self, bootstrap: str, topic: str):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.stopping, self.ready = context.Event(), context.Event()
        self._answers, answer = context.Pipe(duplex=False)
        self.process = context.Process(target=watch_topic, args=(bootstrap, topic, answer, self.ready, self.stopping),
                                       daemon=True)
        self.arrived: dict[int, float] = {}  # probed batch -> time.monotonic() (one clock for every process)
        self.arrived_wall: dict[int, float] = {}  # the same, seconds since the epoch (the stage lines' clock)

    def start(self) -> None:
        self.process.start()
        self.ready.wait(60)

    def stop(self) -> None:
        """Stops the watch; what it saw is in `arrived` from now on."""
        self.stopping.set()
        if self._answers.poll(30):
            for n, (now, wall) in self._answers.recv().items():
                self.arrived[n], self.arrived_wall[n] = now, wall
        self.process.join(timeout=5)

    def latencies(self, accepted_at: dict[int, float]) -> list[float]:
        return list(self.seen(accepted_at).values())

    def seen(self, accepted_at: dict[int, float]) -> dict[int, float]:
        """Probed batch -> accepted → its profile on the topic."""
        return {n: self.arrived[n] - at for n, at in accepted_at.items() if n in self.arrived}


def watch_topic(bootstrap: str, topic: str, answer, ready, stopping) -> None:
    """The watch's process: (monotonic, wall) arrival of each probed customer's first profile,
    sent down `answer` once `stopping` is set."""
    from kafka import KafkaConsumer

    # the broker answers a fetch as soon as a record is there (fetch_min_bytes=1): the wait only
    # bounds an empty fetch, and at 5 ms those were ~200 requests a second on the broker measured
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, fetch_min_bytes=1, fetch_max_wait_ms=100)
    arrived: dict[int, tuple[float, float]] = {}
    while not stopping.is_set():
        for records in consumer.poll(timeout_ms=50).values():
            now, wall = time.monotonic(), time.time()
            for record in records:
                email = orjson.loads(record.value).get("email") if record.value else None
                match = PROBE.match(email or "")
                if match:
                    arrived.setdefault(int(match.group(1)), (now, wall))
        ready.set()  # after the first poll: the topic's partitions are assigned
    consumer.close()
    answer.send(arrived)


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


WINDOW = 30.0  # seconds: a run's figures per part of it too, so that one drifting as the run goes on shows


def by_window(times: dict[int, float]) -> dict[int, list[int]]:
    """The probes (batch -> when accepted, on any one clock) by WINDOW of the run, in order."""
    start, parts = min(times.values()), {}
    for n, at in times.items():
        parts.setdefault(int((at - start) // WINDOW), []).append(n)
    return dict(sorted(parts.items()))


def window_label(part: int) -> str:
    return f"{part * WINDOW:5.0f}-{(part + 1) * WINDOW:<5.0f} s"


def report_windows(publisher: SteadyPublisher, topic: dict[int, float] | None) -> None:
    """p50 and p99 of the probes accepted in each WINDOW of the run: a queue that grows over
    minutes looks like a high p99 over the whole run, and so do a few spikes; this tells them apart."""
    if not publisher.accepted_at:
        return
    ms = 1000
    print(f"  per {WINDOW:g} s of the run (probes accepted then)        HTTP p50 / p99 ms      cdp.profiles p50 / p99 ms")
    for part, ids in by_window(publisher.accepted_at).items():
        cells = []
        for seen in (publisher.seen if publisher.probes else None, topic):
            values = [seen[n] for n in ids if n in seen] if seen is not None else []
            cells.append(f"{percentile(values, .5) * ms:7.1f} / {percentile(values, .99) * ms:7.1f}" if values
                         else f"{'-':>17}")
        print(f"    {window_label(part)}  ({len(ids):4} probes)            "
              f"{cells[0]}      {cells[1]}")


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
    if publisher.probes:
        line("(a probe's look-up, found or not)", publisher.lookup_times)
    if broker is not None:
        line("baseline: broker produce → consume", broker)
    print(f"  target: {TARGET}")


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU (user + system) a process and its living children used so far, by name (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for each in [pid, *(int(c) for c in (children.read_text().split() if children.exists() else []))]:
        try:
            stat = Path(f"/proc/{each}/stat").read_text()
        except OSError:
            continue
        name = "server" if each == pid else "resolver process"
        fields = stat[stat.rindex(")") + 2:].split()
        used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return used


def probe_positions(url: str, reader: str, probed: list[int]) -> dict[int, int]:
    """The store position of each probed customer's event (as the view holds it)."""
    ids = ", ".join(f"'v{n}-0'" for n in probed)
    answer = httpx.post(f"{url}/v1/query", headers={"Authorization": f"Bearer {reader}"}, timeout=60,
                        json={"sql": f"SELECT event_id, position FROM customer_events WHERE event_id IN ({ids})"})
    answer.raise_for_status()
    return {int(event_id[1:].split("-")[0]): position for event_id, position in answer.json()["rows"]}


def stage_breakdown(publisher: SteadyPublisher, positions: dict[int, int], log: Path) -> None:
    """Where each probed event spent its time, from the server's stage lines (CDP_TRACE_STAGES):
    accepted → taken from the intake by the resolver → committed to the store → noticed by the read
    side → committed to the view → seen by the probe; then the batches themselves."""
    from cdp.server import stages

    logged = stages.read(log)
    resolved, projected = logged[stages.RESOLVED], logged[stages.PROJECTED]
    names = ("accepted → resolver took it", "resolving, committing to the store", "store → read side noticed",
             "read side: reading the store (decrypting)", "read side: projecting, committing", "view commit → probe saw it")
    rows: list[tuple[float, list[float]]] = []
    for n, position in positions.items():
        took, batch = stages.holding(resolved, position), stages.holding(projected, position)
        if took is None or batch is None or n not in publisher.seen:
            continue
        accepted = publisher.accepted_wall[n]
        marks = [accepted, took["taken"], took["committed"], batch["noticed"], batch["read"], batch["committed"],
                 accepted + publisher.seen[n]]
        rows.append((publisher.seen[n], [b - a for a, b in zip(marks, marks[1:])]))
    if not print_stages(names, rows, "server's"):
        return
    ms = 1000
    start = min(publisher.accepted_wall.values())
    live = [b for b in projected if b["noticed"] >= start]
    taken = [b for b in resolved if b["taken"] >= start]

    def spread(label: str, values: list[float], unit: str = "ms", scale: float = ms) -> None:
        print(f"    {label:<40} {percentile(values, .5) * scale:7.1f}  {percentile(values, .99) * scale:7.1f}  {unit}")

    print(f"  batches while probing: {len(taken)} resolved, {len(live)} projected        p50      p99")
    spread("resolver: records per batch", [b["records"] for b in taken], "records", 1)
    spread("resolver: taken → committed", [b["committed"] - b["taken"] for b in taken])
    spread("read side: events per batch", [b["events"] for b in live], "events", 1)
    spread("read side: noticed → committed", [b["committed"] - b["noticed"] for b in live])
    spread("read side: CPU of the projecting thread", [b["cpu"] for b in live])
    print("  slowest read-side batches: events, idle before (ms), reading, projecting + committing, thread CPU")
    previous = {id(b): a for a, b in zip(projected, projected[1:])}
    for batch in sorted(live, key=lambda b: b["committed"] - b["noticed"])[-3:]:
        before = previous.get(id(batch))
        idle = (batch["noticed"] - before["committed"]) * ms if before else float("nan")
        print(f"    {batch['events']:>8,} {idle:9.1f} {(batch['read'] - batch['noticed']) * ms:9.1f} "
              f"{(batch['committed'] - batch['read']) * ms:9.1f} {batch['cpu'] * ms:9.1f}")


def print_stages(names: Sequence[str], rows: list[tuple[float, list[float | None]]], whose: str) -> bool:
    """The table of stages: each stage's p50 and p99 over the probes, and its mean over the slowest
    5% of them (by `rows[i][0]`, the figure the probes measure). A stage a probe has no time for
    (None) is left out of that stage's figures. False: no probe to show."""
    if not rows:
        print("  (no stage lines matched the probes)")
        return False
    rows = sorted(rows, key=lambda r: r[0])
    tail = rows[-max(1, len(rows) // 20):]  # the slowest 5%
    ms = 1000
    print(f"  stages of {len(rows)} probes ({whose} CDP_TRACE_STAGES lines){'':<8}p50 ms   p99 ms   mean of slowest 5%")
    for i, name in enumerate(names):
        values = [r[1][i] for r in rows if r[1][i] is not None]
        slow = [r[1][i] for r in tail if r[1][i] is not None]
        seen = "" if len(values) == len(rows) else f"   ({len(values)} probes)"
        print(f"    {name:<44} {percentile(values, .5) * ms:7.1f}  {percentile(values, .99) * ms:7.1f}"
              f"   {(sum(slow) / len(slow) if slow else float('nan')) * ms:7.1f}{seen}")
    return True


def kafka_stage_breakdown(publisher: SteadyPublisher, watch: "ProfileTopicWatch", positions: dict[int, int],
                          logs: Sequence[Path]) -> None:
    """Where each probed event spent its time on the Kafka path, from the stage lines of `cdp serve`
    (the collector's produce and ack, the read side, the cdp.profiles publisher) and `cdp worker`
    (consumed, stored): first the accepting request itself, then accepted → readable over HTTP
    and accepted → on cdp.profiles, each a chain of stages that adds up to the figure."""
    from cdp.server import stages

    logged = stages.read(*logs)
    produced = {entry["id"]: entry for entry in logged[stages.ACCEPTED]}
    resolved, projected, published = logged[stages.RESOLVED], logged[stages.PROJECTED], logged[stages.PUBLISHED]
    request, readable, on_topic = [], [], []
    paths: dict[int, list[float | None]] = {}  # each probe's path to the view, for the per-window table
    for n, position in positions.items():
        acc, stored = produced.get(f"v{n}-0"), stages.holding(resolved, position)
        batch, sent = stages.holding(projected, position), stages.holding(published, position)
        accepted = publisher.accepted_wall[n]
        if acc is not None:
            request.append((accepted - publisher.sent_wall[n], [
                acc["called"] - publisher.sent_wall[n], acc["produced"] - acc["called"], acc["acked"] - acc["produced"],
                accepted - acc["acked"]]))
        if stored is None or batch is None:
            continue
        woken = batch.get("woken") if (batch.get("woken") or 0) >= stored["committed"] else None
        path = [stored["fetched"] - accepted, stored["taken"] - stored["fetched"], stored["committed"] - stored["taken"],
                None if woken is None else woken - stored["committed"], batch["noticed"] - (woken or stored["committed"]),
                batch["read"] - batch["noticed"], batch["committed"] - batch["read"]]
        if n in publisher.seen:
            readable.append((publisher.seen[n], path + [accepted + publisher.seen[n] - batch["committed"]]))
            paths[n] = path
        if sent is not None and n in watch.arrived_wall:
            on_topic.append((watch.arrived_wall[n] - accepted, path + [
                sent["began"] - batch["committed"], sent["built"] - sent["began"], sent["acked"] - sent["built"],
                watch.arrived_wall[n] - sent["acked"]]))
    print_stages(("client sent → the collector's writer had it", "handing the records to the producer",
                  "produced → the broker acknowledged all", "acked → the client had the answer"), request,
                 "the accepting request: cdp serve's")
    shared = ("accepted → worker fetched it (may be < 0)", "fetched → worker began storing (parse, queue)",
              "worker: resolving, committing to PostgreSQL", "store commit → read side woken (NOTIFY)",
              "woken (or commit, if polled) → began reading", "read side: reading the store (decrypting)",
              "read side: projecting, committing")
    if publisher.probes:
        print_stages((*shared, "view commit → probe saw it"), readable, "→ readable over HTTP: cdp worker's, cdp serve's")
    print_stages((*shared, "view commit → publisher took it", "publisher: building the profile messages",
                  "publisher: produced → broker acknowledged", "acked → the topic watch had it"), on_topic,
                 "→ on cdp.profiles: cdp worker's, cdp serve's")
    windows = {part: [n for n in ids if n in paths] for part, ids in by_window(publisher.accepted_wall).items()}
    windows = {part: ids for part, ids in windows.items() if ids}
    if len(windows) > 1:  # which stage a figure that drifts over the run drifts in
        print(f"  p50 ms of each stage to the view, per {WINDOW:g} s of the run: " + " | ".join(
            f"{k + 1} {name}" for k, name in enumerate(shared)))
        for part, ids in windows.items():
            cells = [percentile([paths[n][i] for n in ids if paths[n][i] is not None], .5) * 1000
                     for i in range(len(shared))]
            print(f"    {window_label(part)}  " + "  ".join(f"{c:7.1f}" for c in cells))
    start = min(publisher.accepted_wall.values())
    taken = [b for b in resolved if b["taken"] >= start]
    live = [b for b in projected if b["noticed"] >= start]
    ranges = [b for b in published if b["began"] >= start]
    ms = 1000

    def spread(label: str, values: list[float], unit: str = "ms", scale: float = ms) -> None:
        print(f"    {label:<44} {percentile(values, .5) * scale:7.1f}  {percentile(values, .99) * scale:7.1f}  {unit}")

    print(f"  batches while probing: {len(taken)} stored, {len(live)} projected "
          f"({sum(b.get('woken') is None for b in live)} found by polling), {len(ranges)} published   p50      p99")
    spread("worker: records per batch", [b["records"] for b in taken], "records", 1)
    spread("worker: fetched → committed", [b["committed"] - b["fetched"] for b in taken])
    spread("read side: events per batch", [b["events"] for b in live], "events", 1)
    spread("read side: noticed → committed", [b["committed"] - b["noticed"] for b in live])
    spread("read side: CPU of the projecting thread", [b["cpu"] for b in live])
    spread("publisher: positions per range", [b["last"] - b["first"] + 1 for b in ranges], "positions", 1)
    spread("publisher: took → acknowledged", [b["acked"] - b["began"] for b in ranges])
    spread("publisher: CPU of its thread", [b["cpu"] for b in ranges])
    refreshes = [r for r in logged[stages.SCORED] if r["began"] >= start]
    if refreshes:
        print("  score refreshes while probing (s after probing began: took, CPU of its thread)")
        print("    " + ", ".join(f"{r['began'] - start:.0f}: {r['ended'] - r['began']:.2f} s, {r['cpu']:.2f} s"
                                 + (" inline" if r["inline"] else "") + ("" if r["ok"] else " FAILED")
                                 for r in refreshes))


def view_of(path: Path, customers: int) -> None:
    """bench.serve's synthetic view of N customers at `path`, with the server's look-up indexes
    (kept in the file; the server would build them at start): built once per version of the code
    that shapes it and kept under bench/out, copied from there."""
    import hashlib
    import shutil

    from bench.common import CACHE

    root = Path(__file__).resolve().parent.parent
    from cdp.server.readside import LOOKUP_INDEXES

    shaping = ["bench/serve.py", "projections/tables.py", "projections/identity_tables.py",
               "projections/audiences.py", "projections/metrics.py"]
    digest = hashlib.sha256(b"".join((root / name).read_bytes() for name in shaping)
                            + repr(LOOKUP_INDEXES).encode()).hexdigest()[:12]
    kept = CACHE / f"visible-view-{customers}-{digest}.duckdb"
    if not kept.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        building = kept.with_suffix(".building")
        building.unlink(missing_ok=True)
        synthetic_view(building, customers)
        from projections.projector import connect

        con = connect(building, memory_limit="2GB")
        for statement in LOOKUP_INDEXES:
            con.execute(statement)
        con.close()
        building.replace(kept)
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{path}.wal").unlink(missing_ok=True)
    shutil.copyfile(kept, path)


def run_embedded(tmp: Path, customers: int, seconds: float, warmup: float, server_env: dict[str, str]) -> None:
    env = clean_env(tmp / "embedded", CDP_TRACE_STAGES="1", **server_env)
    view_of(tmp / "embedded" / "view.duckdb", customers)
    keys = new_keys(env, {"shop": ("publish", "shop"), "read": ("read", None)})
    log = tmp / "embedded.log"
    server = start_server(env, log, timeout=300)
    try:
        before = {**cpu_seconds(server.process.pid), BENCH: process_cpu(os.getpid())}
        publisher = SteadyPublisher(server.url, keys["shop"], keys["read"], 1000, seconds, warmup)
        publisher.run()
        after = {**cpu_seconds(server.process.pid), BENCH: process_cpu(os.getpid())}
        used = {name: spent - before.get(name, 0.0) for name, spent in after.items()}
        positions = probe_positions(server.url, keys["read"], list(publisher.accepted_at))
    finally:
        server.stop()
    report(f"embedded (SQLite), 1,000 events/s for {seconds:g} s, view of {customers:,} customers",
           publisher, None, None)
    print(f"  CPU while publishing ({publisher.sent:,} events, {publisher.lookups:,} probe look-ups): "
          + ", ".join(f"{name} {spent:.1f} s" for name, spent in used.items()))
    report_windows(publisher, None)
    stage_breakdown(publisher, positions, log)


def run_kafka(tmp: Path, customers: int, seconds: float, warmup: float, probes: bool = True,
              server_env: dict[str, str] | None = None) -> None:
    from bench.kafka import clean_up, fresh_database, services, start_worker, stop, wait_ready

    bootstrap, dsn, started = services()
    store = fresh_database(dsn)
    prefix = f"bench.visible.{uuid.uuid4().hex[:8]}."
    shared = dict(CDP_KAFKA_BOOTSTRAP=bootstrap, CDP_TOPIC_PREFIX=prefix, CDP_EVENT_STORE=store)
    # The view holds N customers but the store starts empty: a default worker would self-train
    # at 1k, 2k, 4k, 8k and 16k records within the run (on a store of N, next at 2N), each time
    # holding its stream still; the figure is for the steady stream of a trained store.
    worker_env = clean_env(tmp / "worker", CDP_TRAIN_MIN_RECORDS=os.environ.get("CDP_TRAIN_MIN_RECORDS", "0"),
                           CDP_TRACE_STAGES="1", **shared)
    serve_env = clean_env(tmp / "serve", CDP_TRACE_STAGES="1", **shared, **(server_env or {}))
    worker = server = watch = None
    logs = (tmp / "serve.log", tmp / "worker.log")
    try:
        view_of(tmp / "serve" / "view.duckdb", customers)
        keys = new_keys(serve_env, {"shop": ("publish", "shop"), "read": ("read", None)})
        worker = start_worker(worker_env, logs[1])
        wait_ready(worker, logs[1])
        server = start_server(serve_env, logs[0], timeout=300)
        broker = broker_round_trip(bootstrap, f"{prefix}bench.roundtrip")
        watch = ProfileTopicWatch(bootstrap, f"{prefix}cdp.profiles")
        watch.start()
        publisher = SteadyPublisher(server.url, keys["shop"], keys["read"], 1000, seconds, warmup, probes)
        measured = {"cdp serve": server.process.pid, "cdp worker": worker.pid, "the topic watch": watch.process.pid,
                    BENCH: os.getpid()}
        before = {name: process_cpu(pid) for name, pid in measured.items()}
        publisher.run()
        used = {name: process_cpu(pid) for name, pid in measured.items()}
        time.sleep(2)  # the last probes' messages
        watch.stop()
        topic = watch.latencies(publisher.accepted_at)
        positions = probe_positions(server.url, keys["read"], list(publisher.accepted_at))
    finally:
        if watch is not None and watch.process.is_alive():
            watch.stop()
        if server is not None:
            server.stop()
        if worker is not None:
            stop(worker)
        clean_up(bootstrap, dsn, [store], prefix, started)
    report(f"Kafka + PostgreSQL (cdp worker, cdp serve), 1,000 events/s for {seconds:g} s, "
           f"view of {customers:,} customers", publisher, topic, broker)
    print(f"  CPU while publishing ({publisher.sent:,} events, {publisher.lookups:,} probe look-ups): "
          + ", ".join(f"{name} {used[name] - before[name]:.1f} s" for name in used))
    report_windows(publisher, watch.seen(publisher.accepted_at))
    kafka_stage_breakdown(publisher, watch, positions, logs)


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
    from bench.kafka import clean_up, fresh_database, publish, raw_consume, services, start_worker, stop, stored

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
        clean_up(bootstrap, dsn, [store], prefix, started)
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


def known_orders(n: int, back: int) -> list[dict]:
    """An order by each of the 10 customers request n - `back` registered: customers the view knows."""
    return [{"specversion": "1.0", "id": f"o{n}-{i}", "source": "shop/web", "type": "cdp.purchase",
             "time": "2026-03-02T10:00:00Z",
             "data": {"business_unit": "shop", "customer": {"source_id": f"P{n - back}-{i}"},
                      "order_id": f"O{n}-{i}", "amount": 10.5 + i, "currency": "EUR", "channel": "web"}}
            for i in range(10)]


def stored_rows(tmp: Path, requests: int, known_every: int) -> list[tuple]:
    """The store's notifications after `requests` requests of 10 new customers (request_batch), every
    `known_every`-th of them (0: none) followed by orders of customers registered ~3 batches before."""
    from cdp.application import CustomerApplication
    from cdp.config import Settings

    env = clean_env(tmp / "store")
    (tmp / "store").mkdir(parents=True)
    events = tmp / "events.jsonl"
    events.write_bytes(b"".join(
        orjson.dumps(e) + b"\n" for n in range(requests)
        for e in (*request_batch(n), *(known_orders(n, 40) if known_every and n >= 40 and n % known_every == 0 else ()))))
    subprocess.run([sys.executable, "-m", "cdp", "ingest", str(events)], env=env, check=True, stdout=subprocess.DEVNULL)
    with CustomerApplication(Settings.from_env(env)) as app:
        return app.raw_notifications(0, 10_000_000)


def run_batches(tmp: Path, customers: int, requests: int, against: Path | None, batches: int = 40) -> None:
    """The read side's share, in process and in CPU time (what a loaded machine does not skew): the
    stored events of `requests` requests per live batch as the server projects them, on the view of
    N customers with the server's look-up indexes, `batches` times; first a stream of new customers
    only (what the end-to-end run sends), then one where every other request also brings orders of
    customers the view knows. Baseline: DuckDB inserting the same notifications into a table and
    committing, on the same connection. `against`: another code tree (e.g. a checkout of main)
    whose projector runs on a copy of the same view, interleaved batch by batch with this tree's;
    the two views are then compared table by table (EXCEPT ALL both ways)."""
    import pickle
    import statistics

    import duckdb

    root = Path(__file__).resolve().parent.parent
    trees = {"this tree": root, **({f"against {against}": against.resolve()} if against else {})}
    warm = slice(5, None)  # the first batches load the view's blocks
    ms = 1000
    print(f"\n== the read side's live batch, in process, view of {customers:,} customers: {batches} batches of "
          f"{requests} requests each (10 new customers a request), the first 5 not counted")
    for title, known_every in (("new customers only (the stream of the end-to-end run)", 0),
                               ("new customers, and orders of known customers every other request", 2)):
        work = tmp / f"stream-{known_every}"
        rows = stored_rows(work, requests * batches, known_every)
        size = len(rows) // batches
        (work / "rows.pickle").write_bytes(pickle.dumps(rows))
        sides = {}
        for name, tree in trees.items():
            view = work / f"view-{len(sides)}.duckdb"
            view_of(view, customers)
            process = subprocess.Popen(
                [sys.executable, str(root / "bench" / "projector_worker.py"), str(view), str(work / "rows.pickle"),
                 str(work / f"dump-{len(sides)}")], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if process.stdout.readline().strip() != "ready":
                raise SystemExit(f"bench: the projector of {tree} did not start")
            sides[name] = (process, [])
        for i in range(batches):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for name in order:
                process, timings = sides[name]
                process.stdin.write(f"{i * size} {(i + 1) * size if i < batches - 1 else len(rows)}\n")
                process.stdin.flush()
                timings.append(tuple(map(float, process.stdout.readline().split())))
        for process, _ in sides.values():
            process.stdin.write("\n")
            process.stdin.flush()
            process.stdout.readline()
            process.wait()
        print(f"  {title}: {size:,} notifications a batch")

        def line(label: str, values: list[tuple[float, ...]], first: int) -> float:
            cpus, walls = [v[first] for v in values[warm]], [v[first + 1] for v in values[warm]]
            print(f"    {label:<52} CPU p50 {statistics.median(cpus) * ms:6.1f} ms  p99 "
                  f"{percentile(cpus, .99) * ms:6.1f} ms   (wall p50 {statistics.median(walls) * ms:6.1f} ms)")
            return statistics.median(cpus)

        medians = [line(f"projector.apply, {name}", timings, 0) for name, (_, timings) in sides.items()]
        line("baseline: DuckDB inserts the notifications, commits", next(iter(sides.values()))[1], 2)
        if len(medians) == 2:
            print(f"    ratio this tree / against: {medians[0] / medians[1]:.2f}")
            con = duckdb.connect()
            differing = []
            for table in ("customers", "customer_business_units", "customer_events", "customer_sources",
                          "customer_redirects", "projection_state"):
                a, b = (f"'{work}/dump-{k}-{table}.parquet'" for k in (0, 1))
                if con.execute(f"SELECT (SELECT count(*) FROM (FROM {a} EXCEPT ALL FROM {b})) + "
                               f"(SELECT count(*) FROM (FROM {b} EXCEPT ALL FROM {a}))").fetchall()[0][0]:
                    differing.append(table)
            con.close()
            print("    the two views after the run: " + (f"DIFFER in {', '.join(differing)}" if differing else
                                                         "identical (EXCEPT ALL both ways, every table)"))
        import shutil

        shutil.rmtree(work)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.visible", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=70.0,
                        help="length of each measurement; the default spans a refresh of everyone's scores "
                             "(every CDP_SCORE_INTERVAL, 60 s), which 15 s runs left out")
    parser.add_argument("--customers", type=int, default=1_000_000, help="customers already in the view")
    parser.add_argument("--mode", choices=("embedded", "kafka", "both", "batches", "ceiling"), default="both",
                        help="batches: the read side's CPU per live batch in process; ceiling: the Kafka "
                             "path's sustained rates, stage by stage (neither part of both)")
    parser.add_argument("--events", type=int, default=50_000, help="ceiling: events published first")
    parser.add_argument("--batch-requests", type=int, default=13,
                        help="batches: requests per live batch (13 requests, 260 stored events: the read side's "
                             "batch at p50 on a quiet machine)")
    parser.add_argument("--against", type=Path, metavar="TREE",
                        help="batches: also run the projector of another code tree (e.g. a checkout of main), "
                             "interleaved, and compare the two views")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds sent at the same rate before probing starts (a just-started server's "
                             "resolver and view warm up: the figure is for a steady stream)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a CDP_ variable for cdp serve (e.g. CDP_CATCH_UP_NICE=0), repeatable")
    parser.add_argument("--no-probes", dest="probes", action="store_false",
                        help="kafka: measure cdp.profiles only, without look-ups over HTTP (which load the "
                             "server measured)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="run in DIR and keep it afterwards (the servers' logs with their stage lines, "
                             "their views) rather than in a temporary directory")
    args = parser.parse_args(argv)
    server_env = dict(item.split("=", 1) for item in args.set)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="cdp-bench-visible-") as tmp:
        if args.mode == "batches":
            run_batches(Path(tmp), args.customers, args.batch_requests, args.against)
        if args.mode == "ceiling":
            run_ceiling(Path(tmp), args.customers, args.events)
        if args.mode in ("embedded", "both"):
            run_embedded(Path(tmp), args.customers, args.seconds, args.warmup, server_env)
        if args.mode in ("kafka", "both"):
            run_kafka(Path(tmp), args.customers, args.seconds, args.warmup, args.probes, server_env)


if __name__ == "__main__":
    main(sys.argv[1:])
