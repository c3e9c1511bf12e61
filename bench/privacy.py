"""Issue 11: the cost of privacy.

    python -m bench.privacy [--events 100000] [--rounds 2] [--erase-events 1000000] [--skip-erase]

1. Ingest throughput with personal data encrypted (the default) beside the same pipeline on the
   same events with encryption off, in the same run (target: ratio at least 0.8); and a rebuild of
   the view from each store (decrypting every sealed field against reading them in the clear).
2. `cdp erase` of one person on a store of about `--erase-events` events (target: under 1 s),
   beside `cdp customer show` of the same person (a read of the same view) as the baseline.
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
    person from a copy of it."""
    files = demo_files(events)
    home = CACHE / f"privacy-store-{events}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    if not (home / "done").exists():
        subprocess.run([sys.executable, "-m", "cdp", "ingest", *map(str, files.event_files)],
                       env={**env, "CDP_HOME": str(home)}, check=True, stdout=subprocess.DEVNULL)
        (home / "done").write_text("")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        copy = Path(tmp) / "home"
        subprocess.run(["cp", "-r", str(home), str(copy)], check=True)
        run = {**env, "CDP_HOME": str(copy)}
        who = subprocess.run([sys.executable, "-m", "cdp", "query", "SELECT customer_id FROM customers "
                              "WHERE len(business_units) > 1 ORDER BY customer_id LIMIT 1", "--format", "csv"],
                             env=run, check=True, capture_output=True, text=True).stdout.split()[1]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cdp", "customer", "show", who], env=run, check=True,
                       stdout=subprocess.DEVNULL)
        show = time.perf_counter() - started
        out = subprocess.run([sys.executable, "-m", "cdp", "erase", who, "--yes"], env=run, check=True,
                             capture_output=True, text=True).stdout
        seconds = float(re.search(r"\((\d+\.\d+) s", out).group(1))
    print(f"\n== erase one person on a store of {files.events:,} events")
    print(f"  {out.strip()}")
    print(f"  erase (inside the command, store + view + dead-letter): {seconds:.2f} s; "
          f"`cdp customer show` of the same person, whole process: {show:.2f} s")
    print("  target: under 1 s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--erase-events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2, help="runs each way, alternating (best of each)")
    parser.add_argument("--skip-erase", action="store_true")
    args = parser.parse_args(argv)
    encryption_cost(args.events, args.rounds)
    if not args.skip_erase:
        erase_time(args.erase_events)


if __name__ == "__main__":
    main()
