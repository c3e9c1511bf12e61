"""Issue 11: the cost of privacy.

    python -m bench.privacy [--events 100000] [--rounds 2] [--erase-events 1000000] [--skip-erase]
                             [--skip-encryption] [--postgres] [--rewrite-customers N]

1. Ingest throughput with personal data encrypted (the default) beside the same pipeline on the
   same events with encryption off, in the same run (target: ratio at least 0.8); and a rebuild of
   the view from each store (decrypting every sealed field against reading them in the clear).
2. `cdp erase` of one person on a store of about `--erase-events` events (target: under 1 s),
   beside `cdp customer show` of the same person (a read of the same view) as the baseline; and
   `cdp erase` beside a running `cdp serve` once its /health says the resolver is ready (the
   server erases, then rewrites its view's file at once: CDP_VIEW_REWRITE_DELAY=0; timed until
   /health no longer says `view_rewrite_pending`, with the parts its log gives), while look-ups of
   another customer go on over HTTP: the slowest of them beside their pace before the erase.
3. With `--postgres`: `cdp erase` on a PostgreSQL store of `--erase-events` events, beside the
   same baseline (erase_on_postgres).
4. With `--rewrite-customers N`: the same rewrite by a running `cdp serve` on bench.visible's
   synthetic view of N customers, with look-ups of a customer and a new customer published every
   0.2 s (the time until the view shows them) going on all along: each series from the erase on
   beside itself before it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from bench.common import CACHE, demo_files, report, timer
from cdp.config import Settings
from cdp.pipeline import Pipeline
from projections.projector import rebuild


def ingest_rate(files, home: Path, encrypt: bool) -> tuple[float, float]:
    """(ingest events/s, rebuild events/s) for one store."""
    settings = dataclasses.replace(Settings.from_env({"CDP_HOME": str(home)}), encrypt_personal_data=encrypt)
    with Pipeline(settings) as pipeline:
        with timer() as t:
            summary = pipeline.ingest([str(p) for p in files])
        with timer() as r:
            applied = rebuild(pipeline.app, home / "rebuilt.duckdb", as_of=settings.as_of)
    return summary.read / t["seconds"], applied / r["seconds"]


def encryption_cost(events: int, rounds: int) -> None:
    """Each way `rounds` times, alternating (off, on, off, on …), the best of each: a shared
    machine's noise hits both alike."""
    files = demo_files(events).event_files
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for n in range(rounds):
        for encrypt in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                runs[encrypt].append(ingest_rate(files, Path(tmp) / str(n), encrypt))
    plain, plain_rebuild = (max(r[i] for r in runs[False]) for i in (0, 1))
    sealed, sealed_rebuild = (max(r[i] for r in runs[True]) for i in (0, 1))
    report(f"ingest with personal data encrypted, {events:,} events", [
        ("cdp pipeline, encrypted (default)", sealed, "events/s"),
        ("same pipeline, encryption off", plain, "events/s"),
    ], target="encrypted / off at least 0.8")
    print(f"  ratio encrypted / off: {sealed / plain:.2f}")
    report("rebuild of the view from the store", [
        ("rebuild, decrypting every sealed field", sealed_rebuild, "stored events/s"),
        ("rebuild of the store written without encryption", plain_rebuild, "stored events/s"),
    ])
    print(f"  ratio decrypting / clear: {sealed_rebuild / plain_rebuild:.2f}")


def erase_time(events: int) -> None:
    """Builds (once, cached under bench/out) a store of about `events` events, then erases people
    from a copy of it (_erase_on_a_copy)."""
    files = demo_files(events)
    home = CACHE / f"privacy-store-{events}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    if not (home / "done").exists():
        _ingest(files, {**env, "CDP_HOME": str(home)})
        (home / "done").write_text("")
    print(f"\n== erase one person on a store of {files.events:,} events (target: under 1 s)")
    _erase_on_a_copy(home, env)


def erase_on_postgres(events: int) -> None:
    """As erase_time on a PostgreSQL store of about `events` events: built once into a database kept
    for later runs, then copied by CREATE DATABASE … TEMPLATE, as the erase changes it. The erase's
    `store` part is the command and `store_files` the rewrite of the tables it deleted from (VACUUM
    FULL). CDP_POSTGRES_DSN, or the services scripts/services.sh starts."""
    from bench.kafka import services, stop_services
    from tests.databases import create_database, drop_database, with_dbname

    _, dsn, started = services()
    files = demo_files(events)
    kept, copy = f"bench_privacy_{files.events}", f"bench_privacy_erase_{os.getpid()}"
    home = CACHE / f"privacy-postgres-{files.events}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    try:
        if not (home / "done").exists() or (home / "done").read_text() != dsn:
            subprocess.run(["rm", "-rf", str(home)], check=True)
            drop_database(dsn, kept)
            create_database(dsn, kept)
            _ingest(files, {**env, "CDP_HOME": str(home), "CDP_EVENT_STORE": with_dbname(dsn, kept)})
            (home / "done").write_text(dsn)
        print(f"\n== erase one person on a PostgreSQL store of {files.events:,} events (target: under 1 s)")
        create_database(dsn, copy, template=kept)
        _erase_on_a_copy(home, {**env, "CDP_EVENT_STORE": with_dbname(dsn, copy)})
    finally:
        drop_database(dsn, copy)
        stop_services(started)


def _ingest(files, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "cdp", "ingest", *map(str, files.event_files)], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def _erase_on_a_copy(home: Path, env: dict) -> None:
    """Erases one person from a copy of CDP_HOME `home` with `cdp erase`, beside `cdp customer show`
    of them (the baseline), and another beside a running `cdp serve` (which erases, then rewrites
    the view's file); `env`: the commands' environment but CDP_HOME."""
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        copy = Path(tmp) / "home"
        subprocess.run(["cp", "-r", str(home), str(copy)], check=True)
        # a store at rest: otherwise the erase's own fsyncs flush the gigabyte the copy just wrote
        # (SQLite's checkpoint 0.45 s of the erase's 3.91 s, 0.00 s after a sync)
        os.sync()
        run = {**env, "CDP_HOME": str(copy)}
        who = _people(run, 3)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cdp", "customer", "show", who[0]], env=run, check=True,
                       stdout=subprocess.DEVNULL)
        show = time.perf_counter() - started
        out = _erase(run, who[0])
        print(f"  cdp erase: {out}")
        print(f"  baseline: `cdp customer show` of the same person, whole process: {show:.2f} s")
        served = _erase_beside_server(run, who[1], who[2], Path(tmp) / "serve.log")
        print(f"  cdp erase beside a running cdp serve: {served}")


def _people(run: dict, count: int) -> list[str]:
    """Customers known to several units (several source records to erase)."""
    return subprocess.run([sys.executable, "-m", "cdp", "query", "SELECT customer_id FROM customers "
                           f"WHERE len(business_units) > 1 ORDER BY customer_id LIMIT {count}", "--format", "csv"],
                          env=run, check=True, capture_output=True, text=True).stdout.split()[1:]


def _erase(run: dict, who: str) -> str:
    """`cdp erase`'s own line: its time inside the command and the time of each part."""
    out = subprocess.run([sys.executable, "-m", "cdp", "erase", who, "--yes"], env=run, check=True,
                         capture_output=True, text=True).stdout
    return out.strip().split(": ", 1)[1]


def _erase_beside_server(run: dict, who: str, reader: str, log: Path) -> str:
    """The erase's own line, the rewrite's time, and how reads of the view fared meanwhile:
    look-ups of another customer (`reader`) one after another over HTTP, from before the erase
    until the rewrite ended; their slowest beside their p50 while nothing was being rewritten."""
    import signal

    port = 18000 + os.getpid() % 1000
    key = subprocess.run([sys.executable, "-m", "cdp", "keys", "create", "--scope", "read"], env=run, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    server = subprocess.Popen([sys.executable, "-m", "cdp", "serve", "--port", str(port)],
                              env={**run, "CDP_VIEW_REWRITE_DELAY": "0", "CDP_RATE_LIMIT": "1000000"},
                              stdout=subprocess.DEVNULL,
                              stderr=open(log, "ab"))
    try:
        deadline = time.monotonic() + 900
        while True:
            health = _health(port)
            # caught up, and the resolver's identity state loaded: the erase measured, not the start
            if b'"behind":0' in health and b'"resolver":"ready"' in health:
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cdp serve did not come up: {log.read_text()[-2000:]}")
            time.sleep(1)
        with LookUps(f"http://127.0.0.1:{port}", key, reader) as lookups:
            time.sleep(3)  # the look-ups' pace while nothing is rewritten
            erased_at = time.time()
            out = _erase(run, who)
            started = time.perf_counter()
            while b'"view_rewrite_pending":false' not in _health(port):
                if server.poll() is not None or time.perf_counter() - started > 900:
                    raise RuntimeError(f"cdp serve did not rewrite its view: {log.read_text()[-2000:]}")
                time.sleep(0.05)
            rewritten = time.perf_counter() - started
            time.sleep(1)
    finally:
        started = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=900)
        stopped = time.perf_counter() - started
    said = re.search(r"rewritten after an erasure in (.*)", log.read_text())
    return (f"{out}; then the view's file rewritten by the running server {rewritten:.2f} s after the erase "
            f"({said.group(1) if said else '?'}, its log says); its stop: {stopped:.2f} s\n"
            + _beside_before("look-ups of another customer", lookups, erased_at))


class Repeated:
    """`step()` again and again on a thread of its own until the block ends, `gap` seconds apart;
    each step appends (when it began, seconds it took, what it answered) to `results`."""

    def __init__(self, gap: float = 0.0) -> None:
        import threading

        self.gap = gap
        self.results: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Repeated":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        while not self._stop.is_set():
            began, started = time.time(), time.perf_counter()
            answered = self.step()
            self.results.append((began, time.perf_counter() - started, answered))
            self._stop.wait(self.gap)

    def step(self) -> int:
        raise NotImplementedError


def _beside_before(name: str, series: Repeated, erased_at: float) -> str:
    """A series' steps from the erase on (how many, the slowest, what they answered) beside the
    same steps before it (p50, the slowest): one report line."""
    before = sorted(seconds for began, seconds, _ in series.results if began < erased_at)
    during = [(seconds, status) for began, seconds, status in series.results if began >= erased_at]
    return (f"  {name} from the erase on: {len(during)}, the slowest {max(s for s, _ in during) * 1000:,.0f} ms, "
            f"answered {dict(Counter(status for _, status in during))}; baseline, before the erase: "
            f"p50 {before[len(before) // 2] * 1000:.1f} ms, the slowest {before[-1] * 1000:.1f} ms ({len(before)})")


def _get(url: str, key: str, data: bytes | None = None, content_type: str = "") -> int:
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {key}", **({"Content-Type": content_type} if content_type else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=120) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as refused:
        return refused.code


class LookUps(Repeated):
    """GET /v1/profiles/customer_id:{id}, one after another."""

    def __init__(self, url: str, key: str, customer_id: str):
        super().__init__()
        self.url, self.key = f"{url}/v1/profiles/customer_id:{customer_id}", key

    def step(self) -> int:
        return _get(self.url, self.key)


class Visibility(Repeated):
    """A new customer published (CloudEvents), then looked up until the view shows them: each
    step's time is that publish-to-visible time; the next `gap` seconds later."""

    def __init__(self, url: str, publish_key: str, read_key: str, gap: float = 0.2):
        super().__init__(gap)
        self.url, self.publish_key, self.read_key = url, publish_key, read_key

    def step(self) -> int:
        import uuid

        email = f"seen.{uuid.uuid4().hex[:12]}@example.org"
        status = _get(f"{self.url}/events", self.publish_key, orjson.dumps(_new_customer(email)),
                      "application/cloudevents+json")
        while status == 200 and _get(f"{self.url}/v1/profiles/email:{email}", self.read_key) != 200:
            if self._stop.wait(0.05):
                break
        return status


def _new_customer(email: str) -> dict:
    """An identify event of the `shop` unit for a person known by `email` alone."""
    import uuid

    from tests.serving import cloudevent

    return cloudevent(str(uuid.uuid4()), "shop", f"S-{email}", customer={"email": email})


def rewrite_at_scale(customers: int) -> None:
    """`cdp serve` on bench.visible's synthetic view of `customers` customers: a person published
    and erased over HTTP; meanwhile look-ups of another customer one after another, and a new
    customer published every 0.2 s with the time until the view shows them. The erase's answer,
    the rewrite's parts (its log), and both series before the erase beside from the erase on."""
    import duckdb

    from bench.visible import clean_env, view_of
    from tests.serving import new_keys, start_server

    print(f"\n== the running server's rewrite after an erasure, view of {customers:,} customers")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        home = Path(tmp) / "home"
        view_of(home / "view.duckdb", customers)
        with duckdb.connect(str(home / "view.duckdb"), read_only=True) as con:
            reader = con.execute("SELECT customer_id FROM customers LIMIT 1 OFFSET 4242").fetchall()[0][0]
        env = clean_env(home, CDP_VIEW_REWRITE_DELAY="0")
        keys = new_keys(env, {"shop": ("publish", "shop"), "read": ("read", None), "admin": ("admin", None)})
        log = Path(tmp) / "serve.log"
        server = start_server(env, log, timeout=900)
        try:
            assert _get(f"{server.url}/events", keys["shop"], orjson.dumps(_new_customer("gone@example.org")),
                        "application/cloudevents+json") == 200
            while _get(f"{server.url}/v1/profiles/email:gone@example.org", keys["read"]) != 200:
                time.sleep(0.1)
            with LookUps(server.url, keys["read"], reader) as lookups, \
                    Visibility(server.url, keys["shop"], keys["read"]) as seen:
                time.sleep(5)
                erased_at = time.time()
                import urllib.request

                request = urllib.request.Request(f"{server.url}/v1/profiles/email:gone@example.org", method="DELETE",
                                                 headers={"Authorization": f"Bearer {keys['admin']}"})
                with timer() as answered, urllib.request.urlopen(request, timeout=300) as answer:
                    answer.read()
                deadline = time.monotonic() + 900
                while "rewritten after an erasure" not in log.read_text():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cdp serve did not rewrite its view: {log.read_text()[-2000:]}")
                    time.sleep(0.2)
                time.sleep(3)
        finally:
            server.stop()
        said = re.search(r"rewritten after an erasure in (.*)", log.read_text())
        print(f"  DELETE /v1/profiles answered in {answered['seconds']:.2f} s; the rewrite: "
              f"{said.group(1) if said else '?'} (its log)")
        for name, series in (("look-ups of another customer", lookups), ("publish-to-visible", seen)):
            print(_beside_before(name, series, erased_at))


def _health(port: int) -> bytes:
    """/health's body, whatever its status (503 while the view's file is rewritten)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return answer.read()
    except urllib.error.HTTPError as refused:
        return refused.read()
    except OSError:
        return b""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--erase-events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2, help="runs each way, alternating (best of each)")
    parser.add_argument("--skip-erase", action="store_true")
    parser.add_argument("--skip-encryption", action="store_true")
    parser.add_argument("--postgres", action="store_true",
                        help="also: cdp erase on a PostgreSQL store of --erase-events events")
    parser.add_argument("--rewrite-customers", type=int, default=0, metavar="N",
                        help="also: the running server's rewrite on bench.visible's view of N customers")
    args = parser.parse_args(argv)
    if not args.skip_encryption:
        encryption_cost(args.events, args.rounds)
    if not args.skip_erase:
        erase_time(args.erase_events)
    if args.postgres:
        erase_on_postgres(args.erase_events)
    if args.rewrite_customers:
        rewrite_at_scale(args.rewrite_customers)


if __name__ == "__main__":
    main()
