"""Issue 9: a steward's decision in the console of `cdp serve`, on a store of realistic size.

    python -m bench.steward [--events 1000000] [--splits 5]

A store of about `--events` events (the demo's people through `cdp ingest`, built once and kept
under bench/out, the same store bench.privacy erases from), served embedded by `cdp serve`. Once
the server has settled (view caught up, scores computed), a steward signed in to the console
splits one source record off each of `--splits` customers known to two units; each split is timed from opening its confirmation form to the console's redirect
(the server answers once its view shows the split). The decision runs on the application the
resolver process keeps, between two of its batches.

Baseline, measured in the same run on the same store while the server runs: what each decision
cost before, when the console opened an application of its own for it — opening the application
and loading the store's identity state (the resolver's tables), the work the kept application
no longer repeats. Figures are printed, not asserted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import CACHE, demo_files
from bench.console import wait_for_view
from bench.serve import percentile
from tests.serving import console_session, console_split, new_keys, start_server

CANDIDATES = """SELECT customer_id, max(business_unit || ':' || source_id) AS record FROM customer_sources
                GROUP BY customer_id HAVING count(DISTINCT business_unit) > 1 ORDER BY customer_id LIMIT ?"""


def stored_home(events: int) -> Path:
    """CDP_HOME of a store of about `events` events, ingested once and kept under bench/out."""
    home = CACHE / f"privacy-store-{events}"
    if not (home / "done").exists():
        files = demo_files(events)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
        subprocess.run([sys.executable, "-m", "cdp", "ingest", *map(str, files.event_files)],
                       env={**env, "CDP_HOME": str(home)}, check=True, stdout=subprocess.DEVNULL)
        (home / "done").write_text("")
    return home


def cold_application(env: dict[str, str]) -> float:
    """Seconds to open an application on the store and load its identity state: what a decision
    paid before the server kept one."""
    from cdp.application import CustomerApplication
    from cdp.config import Settings

    started = time.perf_counter()
    app = CustomerApplication(Settings.from_env(env))
    try:
        app.resolver  # noqa: B018 - loads the resolver's tables, as the first command does
        return time.perf_counter() - started
    finally:
        app.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.steward")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--splits", type=int, default=5)
    args = parser.parse_args(argv)
    home = stored_home(args.events)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        copy = Path(tmp) / "home"
        shutil.copytree(home, copy)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("CDP_")}, "CDP_HOME": str(copy)}
        key = new_keys(env, {"admin": ("admin", None)})["admin"]
        server = start_server(env, Path(tmp) / "serve.log", timeout=1800)
        try:
            admin = server.client(key)
            admin.timeout = httpx.Timeout(600)
            wait_for_view(server.url, key)  # caught up, and the start's rescoring done
            rows = admin.post("/v1/query", json={"sql": CANDIDATES.replace("?", str(args.splits))}).json()["rows"]
            times = []
            with console_session(server, key) as browser:
                for customer_id, record in rows:
                    started = time.perf_counter()
                    answer = console_split(browser, customer_id, record)
                    times.append(time.perf_counter() - started)
                    if answer.status_code != 303:
                        raise SystemExit(f"bench.steward: the split answered {answer.status_code}: {answer.text[:500]}\n"
                                         f"{server.log.read_text()[-3000:]}")
            before = cold_application(env)
        finally:
            server.stop()
    p50 = percentile(times, 0.5)
    print(f"\n== a steward's split in the console of `cdp serve` (embedded), store of {args.events:,} events")
    print(f"  split, form to redirect (view shows it): first {times[0]:.2f} s, p50 {p50:.2f} s, "
          f"max {max(times):.2f} s over {len(times)} ({', '.join(f'{t:.2f}' for t in times)})")
    print(f"  baseline, same run: a fresh application and its identity state on the same store "
          f"(what each split paid before) {before:.2f} s")
    print(f"  ratio split p50 / baseline: {p50 / before:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
