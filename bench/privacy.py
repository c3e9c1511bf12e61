"""Issue 11: the cost of privacy.

    python -m bench.privacy [--events 100000] [--rounds 2] [--erase-events 1000000] [--skip-erase]
                             [--skip-encryption]

1. Ingest throughput with personal data encrypted (the default) beside the same pipeline on the
   same events with encryption off, in the same run (target: ratio at least 0.8); and a rebuild of
   the view from each store (decrypting every sealed field against reading them in the clear).
2. `cdp erase` of one person on a store of about `--erase-events` events (target: under 1 s),
   beside `cdp customer show` of the same person (a read of the same view) as the baseline; and
   `cdp erase` beside a running `cdp serve` once its /health says the resolver is ready (the
   server erases, then rewrites its view's file at once: CDP_VIEW_REWRITE_DELAY=0; timed until
   /health no longer says `view_rewrite_pending`, with the parts its log gives), while look-ups of
   another customer go on over HTTP: the slowest of them beside their pace before the erase.
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
    """Builds (once, cached under bench/out) a store of about `events` events, then erases one
    person from a copy of it with `cdp erase`, and another from a second copy beside a running
    `cdp serve` (which erases, and rewrites the view's file as it stops)."""
    files = demo_files(events)
    home = CACHE / f"privacy-store-{events}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    if not (home / "done").exists():
        subprocess.run([sys.executable, "-m", "cdp", "ingest", *map(str, files.event_files)],
                       env={**env, "CDP_HOME": str(home)}, check=True, stdout=subprocess.DEVNULL)
        (home / "done").write_text("")
    print(f"\n== erase one person on a store of {files.events:,} events (target: under 1 s)")
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
        with LookUps(port, key, reader) as lookups:
            time.sleep(3)  # the look-ups' pace while nothing is rewritten
            idle = lookups.mark()
            out = _erase(run, who)
            started = time.perf_counter()
            while b'"view_rewrite_pending":false' not in _health(port):
                if server.poll() is not None or time.perf_counter() - started > 900:
                    raise RuntimeError(f"cdp serve did not rewrite its view: {log.read_text()[-2000:]}")
                time.sleep(0.05)
            rewritten = time.perf_counter() - started
            time.sleep(1)
        during = lookups.results[idle:]
    finally:
        started = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=900)
        stopped = time.perf_counter() - started
    said = re.search(r"rewritten after an erasure in (.*)", log.read_text())
    before = sorted(seconds for seconds, _ in lookups.results[:idle])
    slowest = max(seconds for seconds, _ in during)
    statuses = Counter(status for _, status in during)
    return (f"{out}; then the view's file rewritten by the running server {rewritten:.2f} s after the erase "
            f"({said.group(1) if said else '?'}, its log says); its stop: {stopped:.2f} s\n"
            f"  look-ups of another customer meanwhile: {len(during)}, the slowest {slowest * 1000:.0f} ms, "
            f"answered {dict(statuses)}; baseline, the same look-ups before the erase: "
            f"p50 {before[len(before) // 2] * 1000:.1f} ms, slowest {before[-1] * 1000:.1f} ms ({len(before)})")


class LookUps:
    """GET /v1/profiles/{id} one after another on a thread: (seconds, status) per look-up."""

    def __init__(self, port: int, key: str, customer_id: str):
        import threading

        self.url, self.key = f"http://127.0.0.1:{port}/v1/profiles/customer_id:{customer_id}", key
        self.results: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LookUps":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def mark(self) -> int:
        return len(self.results)

    def _run(self) -> None:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {self.key}"})
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    answer.read()
                    status = answer.status
            except urllib.error.HTTPError as refused:
                status = refused.code
            self.results.append((time.perf_counter() - started, status))


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
    args = parser.parse_args(argv)
    if not args.skip_encryption:
        encryption_cost(args.events, args.rounds)
    if not args.skip_erase:
        erase_time(args.erase_events)


if __name__ == "__main__":
    main()
