"""Benchmarks of `cdp serve`: `python -m bench.serve [--seconds S] [--customers N] [--clients C]`.

1. Collector: Segment `track` messages in batches of 100 posted to `/v1/batch` by C client threads
   (default 4) for S seconds, beside a bare ASGI app (Starlette under the same uvicorn) that only
   parses the same JSON; events/s and the ratio. Embedded (answered after the commit to the
   intake, resolved right after), and with Kafka when CDP_KAFKA_BOOTSTRAP is set (answered after
   the broker acknowledged; a private topic prefix, no worker).
2. Publish-to-visible: events posted at a steady 1,000 events/s (batches of 10 every 10 ms); for
   every 10th batch the time from the accepted answer until its new customer's profile is readable
   through `GET /v1/profiles`; p50/p99 beside the p99 of the acceptance round trip itself (the
   publisher of bench/visible.py, which measures this alone, and with Kafka + PostgreSQL).
3. Profile look-up while ingest runs: a view of N customers (synthetic rows in the real tables,
   3 events each), `GET /v1/profiles/email:…` for random customers while events are posted at a
   steady 1,000 events/s (the publisher of 2. without its probes, which poll the same API every
   5 ms, in a process of its own as a business unit's publisher would be); p50/p99 beside the same
   look-ups' SQL run on DuckDB in process, idle. Before the ingest, the same look-ups over HTTP
   with nothing else running, with the server's CPU time per look-up beside the in-process
   baseline's (CPU time is what a loaded machine does not distort).

`--parts lookup` runs only 3 (`collector`, `visible`, `lookup`, comma-separated; default all).
The view of 3. (with the server's look-up indexes) is built once into bench/out/ and copied for
each run: on 1,000,000 customers the build takes minutes.

Figures are printed, not asserted; the machine is shared, so the ratios are what to compare.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson

from bench.common import CACHE
from tests.serving import free_port, new_keys, start_server

PARTS = ("collector", "visible", "lookup")
TARGETS = {"collector": "at least 10,000 events/s", "visible": "p99 under 500 ms", "lookup": "p99 under 20 ms"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def segment_batch(start: int, size: int = 100) -> bytes:
    return orjson.dumps({"batch": [
        {"type": "track", "userId": f"u{(start + i) % 50_000}", "event": "Product Viewed", "messageId": f"m{start + i}",
         "timestamp": "2026-03-01T10:00:00Z", "properties": {"sku": f"S{i}", "price": 9.99, "list": "search"}}
        for i in range(size)]})


def blast(url: str, key: str, seconds: float, threads: int = 4) -> float:
    """Events/s accepted by `url`/v1/batch from `threads` clients posting batches of 100."""
    counter = iter(range(10**9))
    accepted = [0] * threads
    stop_at = time.monotonic() + seconds

    def client(n: int) -> None:
        with httpx.Client(base_url=url, auth=(key, ""), timeout=60) as http:
            while time.monotonic() < stop_at:
                body = segment_batch(next(counter) * 100)
                if http.post("/v1/batch", content=body, headers={"Content-Type": "application/json"}).status_code == 200:
                    accepted[n] += 100

    started = time.monotonic()
    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(accepted) / (time.monotonic() - started)


BARE_APP = '''
import orjson
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def batch(request):
    body = orjson.loads(await request.body())
    return JSONResponse({"success": True, "accepted": len(body["batch"])})

app = Starlette(routes=[Route("/v1/batch", batch, methods=["POST"])])
'''


def bare_server(directory: Path) -> tuple[subprocess.Popen, str]:
    (directory / "bare_app.py").write_text(BARE_APP)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port),
                                "--log-level", "warning", "--no-access-log"], cwd=directory,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.post(url + "/v1/batch", content=b'{"batch": []}')
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    return process, url


def collector_rate(env: dict[str, str], home: Path, keys: dict[str, str], seconds: float, clients: int) -> float:
    """Events/s `cdp serve` (embedded, or Kafka when `env` names a broker) accepts on /v1/batch."""
    server = start_server({**env, "CDP_HOME": str(home)}, home.parent / f"{home.name}.log")
    try:
        return blast(server.url, keys["retail"], seconds, clients)
    finally:
        server.stop()


def synthetic_view(path: Path, customers: int) -> None:
    """`customers` customers with 3 events each and one source record, in the real tables."""
    from projections.projector import Projector

    projector = Projector(path)
    con = projector.con
    con.execute(f"""
        INSERT INTO customer_sources SELECT 'shop', 'S' || i, md5(i::VARCHAR), 'new_customer', NULL, i
        FROM range({customers}) t(i)""")
    con.execute(f"""
        INSERT INTO customer_events (event_id, event_source, customer_id, business_unit, source_id, type, time,
                                     position, email, first_name)
        SELECT 'e' || i || '-' || k, 'shop/web', md5(i::VARCHAR), 'shop', 'S' || i, 'cdp.identify',
               TIMESTAMPTZ '2026-01-01' + INTERVAL (k) DAY, i * 3 + k, 'p' || i || '@example.org', 'Name' || i
        FROM range({customers}) t(i), range(3) u(k)""")
    projector.recompute_all()
    con.execute("CHECKPOINT")
    projector.close()


def cached_view(customers: int) -> tuple[Path, float]:
    """The synthetic view of `customers` with the server's look-up indexes, built once into
    bench/out/ (copy it, never serve it: a server appends to its view; delete it after a change to
    the view's tables); and the seconds the build took now (0: it was there)."""
    from cdp.server.readside import LOOKUP_INDEXES
    from projections.projector import connect

    path = CACHE / f"serve-view-{customers}" / "view.duckdb"
    if path.exists():
        return path, 0.0
    started = time.monotonic()
    building = path.with_name("building.duckdb")
    building.unlink(missing_ok=True)
    synthetic_view(building, customers)
    con = connect(building, memory_limit="2GB")  # the server's CDP_SERVE_MEMORY
    for statement in LOOKUP_INDEXES:
        con.execute(statement)
    con.execute("CHECKPOINT")
    con.close()
    building.replace(path)
    return path, time.monotonic() - started


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lookups_in_process(path: Path, customers: int, n: int) -> tuple[list[float], float]:
    """The same SQL the profile endpoint runs, on DuckDB directly (with the look-up indexes the
    server made, at the server's memory limit), nothing else running: the baseline; and its CPU
    seconds per look-up."""
    from projections import profiles
    from projections.projector import connect

    con = connect(path, read_only=True, memory_limit="2GB")
    times = []
    cpu = time.process_time()
    for _ in range(n):
        i = random.randrange(customers)
        started = time.perf_counter()
        found = profiles.find(con, "email", f"p{i}@example.org", None)
        profiles.profile(con, found[0].customer_id, None)
        times.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu) / n
    con.close()
    return times, cpu


def publish_elsewhere(url: str, key: str, reader: str, seconds: float) -> subprocess.Popen:
    """1,000 events/s published from a process of its own, as the units publish from theirs: the
    look-up client then times the server, not a wait for the publisher's interpreter lock. Prints
    the events accepted as its last line."""
    code = ("import sys; from bench.visible import SteadyPublisher; "
            "p = SteadyPublisher(sys.argv[1], sys.argv[2], sys.argv[3], 1000, float(sys.argv[4]), probes=False); "
            "p.start(); p.join(); print(p.sent)")
    return subprocess.Popen([sys.executable, "-c", code, url, key, reader, str(seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parent.parent)


def lookups_over_http(url: str, key: str, customers: int, seconds: float) -> list[float]:
    times = []
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        while time.monotonic() < end:
            i = random.randrange(customers)
            started = time.perf_counter()
            assert http.get(f"/v1/profiles/email:p{i}@example.org").status_code == 200
            times.append(time.perf_counter() - started)
    return times


def measure_collectors(env: dict[str, str], tmp_path: Path, seconds: float, clients: int) -> None:
    keys_for_segment = new_keys(env, {"retail": ("publish", "retail")})
    collectors = {"embedded": collector_rate(env, tmp_path / "embedded", keys_for_segment, seconds, clients)}
    if os.environ.get("CDP_KAFKA_BOOTSTRAP"):
        kafka_env = {**env, "CDP_HOME": str(tmp_path / "kafka"), "CDP_KAFKA_BOOTSTRAP": os.environ["CDP_KAFKA_BOOTSTRAP"],
                     "CDP_TOPIC_PREFIX": f"bench-serve-{os.getpid()}-{int(time.time())}."}
        kafka_keys = new_keys(kafka_env, {"retail": ("publish", "retail")})
        try:
            collectors["kafka"] = collector_rate(kafka_env, tmp_path / "kafka", kafka_keys, seconds, clients)
        finally:
            from tests.topics import delete_topics

            delete_topics(kafka_env["CDP_KAFKA_BOOTSTRAP"], kafka_env["CDP_TOPIC_PREFIX"])
    bare, bare_url = bare_server(tmp_path)
    try:
        baseline = blast(bare_url, "none", seconds, clients)
    finally:
        bare.terminate()
        bare.wait()
    print(f"\n== collector: Segment batches of 100, {clients} client threads, {seconds:g} s each")
    answered = {"embedded": "validated, committed to the intake", "kafka": "validated, acked by the broker"}
    for mode, ours in collectors.items():
        print(f"  cdp serve /v1/batch, {mode:<8} ({answered[mode]:<34}) {ours:>10,.0f} events/s  "
              f"(ours / bare: {ours / baseline:.2f})")
    if "kafka" not in collectors:
        print("  (Kafka mode: set CDP_KAFKA_BOOTSTRAP to measure it too)")
    print(f"  bare ASGI handler parsing the same JSON {'':<34} {baseline:>10,.0f} events/s")
    print(f"  target: {TARGETS['collector']}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each measurement")
    parser.add_argument("--customers", type=int, default=1_000_000, help="customers in the look-up view")
    parser.add_argument("--clients", type=int, default=4, help="collector client threads")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which to run, of {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts or parts - set(PARTS):
        parser.error(f"--parts: choose among {', '.join(PARTS)}")
    with tempfile.TemporaryDirectory(prefix="cdp-bench-serve-") as tmp:
        tmp_path = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
        # the server's own defaults (CDP_SERVE_MEMORY for its view); CDP_SERVE_* of the caller pass
        env.update({k: v for k, v in os.environ.items() if k.startswith("CDP_SERVE_")})
        env.update(CDP_HOME=str(tmp_path / "embedded"), CDP_RATE_LIMIT="100000", CDP_SCORE_INTERVAL="3600")
        if "collector" in parts:
            measure_collectors(env, tmp_path, args.seconds, args.clients)
        if parts.isdisjoint(("visible", "lookup")):
            return

        # a fresh home for latency and look-ups: a copy of the large view, then the server on it
        env["CDP_HOME"] = str(tmp_path / "large")
        cached, built = cached_view(args.customers)
        view = tmp_path / "large" / "view.duckdb"
        view.parent.mkdir(parents=True)
        shutil.copyfile(cached, view)
        keys = new_keys(env, {"shop": ("publish", "shop"), "read": ("read", None)})
        from bench.visible import SteadyPublisher  # (bench.visible imports this module)

        server = start_server(env, tmp_path / "large.log", timeout=300)
        try:
            if "visible" in parts:
                publisher = SteadyPublisher(server.url, keys["shop"], keys["read"], 1000, args.seconds)
                publisher.start()
                publisher.join()
            if "lookup" in parts:
                lookups_over_http(server.url, keys["read"], args.customers, 1.0)  # the look-up threads' cursors
                cpu = process_cpu(server.process.pid)
                idle_times = lookups_over_http(server.url, keys["read"], args.customers, args.seconds / 2)
                idle_cpu = (process_cpu(server.process.pid) - cpu) / len(idle_times)
                ingest = publish_elsewhere(server.url, keys["shop"], keys["read"], args.seconds)
                http_times = lookups_over_http(server.url, keys["read"], args.customers, args.seconds)
                ingested = int(ingest.communicate(timeout=60)[0].split()[-1])
        finally:
            server.stop()
        ms = 1000
        if "visible" in parts:
            print(f"\n== publish-to-visible, 1,000 events/s offered for {args.seconds:g} s (embedded; "
                  f"{publisher.sent:,} events accepted, {len(publisher.visible)} probes)")
            print(f"  accepted → profile readable over HTTP   p50 {percentile(publisher.visible, .5) * ms:7.1f} ms   "
                  f"p99 {percentile(publisher.visible, .99) * ms:7.1f} ms")
            print(f"  baseline: the accepting request itself  p50 {percentile(publisher.accept, .5) * ms:7.1f} ms   "
                  f"p99 {percentile(publisher.accept, .99) * ms:7.1f} ms")
            print(f"  target: {TARGETS['visible']}")
        if "lookup" in parts:
            baseline_times, baseline_cpu = lookups_in_process(view, args.customers, 300)
            made = f"built in {built:.0f} s" if built else f"copied from {cached.parent.name}"
            print(f"\n== profile look-up by e-mail, view of {args.customers:,} customers ({made}), "
                  f"while 1,000 events/s are published ({ingested:,} accepted)")
            print(f"  GET /v1/profiles/email:…               p50 {percentile(http_times, .5) * ms:7.1f} ms   "
                  f"p99 {percentile(http_times, .99) * ms:7.1f} ms   ({len(http_times)} look-ups)")
            print(f"  same SQL in process, indexed, idle     p50 {percentile(baseline_times, .5) * ms:7.1f} ms   "
                  f"p99 {percentile(baseline_times, .99) * ms:7.1f} ms")
            print(f"  target: {TARGETS['lookup']}")
            print(f"  idle, over HTTP: p50 {percentile(idle_times, .5) * ms:.1f} ms, p99 "
                  f"{percentile(idle_times, .99) * ms:.1f} ms ({len(idle_times)} look-ups); CPU per look-up: "
                  f"server {idle_cpu * ms:.2f} ms (whole process), in process {baseline_cpu * ms:.2f} ms "
                  f"(ratio {idle_cpu / baseline_cpu:.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
