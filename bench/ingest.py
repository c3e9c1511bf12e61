"""Issue 2: embedded ingest throughput and peak memory.

    python -m bench.ingest [--events 200000] [--memory-events 1000000] [--skip-memory]

Pipeline (parse → validate → resolve → store → view) on generated events carrying email/phone
identifiers, beside two baselines on the same events, in the same run:
  A. plain eventsourcing: one aggregate per customer (business_unit:source_id), one event per
     interaction, aggregates saved in batches of 1,000, on SQLite;
  B. the SQLite recorder's own insert_events of ready-made stored events (batches of 1,000).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import StoredEvent

from bench.common import demo_files, peak_rss_children_mib, report, timer
from cdp.config import Settings
from cdp.pipeline import Pipeline


class PlainCustomer(Aggregate):
    """The plain use of the library: an aggregate with a decorated command method per fact."""

    @event("Registered")
    def __init__(self, key: str):
        self.key = key
        self.interactions = 0

    @event("InteractionRecorded")
    def record(self, event_id: str, event_type: str, time: str, data: dict) -> None:
        self.interactions += 1


class PlainApp(Application):
    pass


def load_events(files) -> list[dict]:
    events = []
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                events.append(orjson.loads(line))
    return events


def baseline_plain(events: list[dict], directory: Path) -> float:
    app = PlainApp(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(directory / "plain.sqlite")})
    customers: dict[str, PlainCustomer] = {}
    pending: dict[str, PlainCustomer] = {}
    with timer() as t:
        for e in events:
            data = e["data"]
            key = f"{data['business_unit']}:{data['customer']['source_id']}"
            customer = customers.get(key)
            if customer is None:
                customer = customers[key] = PlainCustomer(key)
            customer.record(e["id"], e["type"], e["time"], {k: v for k, v in data.items() if k != "customer"})
            pending[key] = customer
            if len(pending) >= 1000:
                app.save(*pending.values())
                pending.clear()
        app.save(*pending.values())
    app.close()
    return len(events) / t["seconds"]


def baseline_recorder(events: list[dict], directory: Path) -> float:
    app = PlainApp(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(directory / "raw.sqlite")})
    versions: dict[str, int] = {}
    ids: dict[str, object] = {}
    import uuid

    stored = []
    for e in events:
        data = e["data"]
        key = f"{data['business_unit']}:{data['customer']['source_id']}"
        versions[key] = versions.get(key, 0) + 1
        ids.setdefault(key, uuid.uuid5(uuid.NAMESPACE_URL, key))
        stored.append(StoredEvent(originator_id=ids[key], originator_version=versions[key],
                                  topic="bench:Event", state=orjson.dumps(data)))
    with timer() as t:
        for i in range(0, len(stored), 1000):
            app.recorder.insert_events(stored[i:i + 1000])
    app.close()
    return len(events) / t["seconds"]


def pipeline_rate(files, directory: Path) -> tuple[float, int]:
    settings = Settings.from_env({"CDP_HOME": str(directory / "cdp")})
    with Pipeline(settings) as pipeline:
        with timer() as t:
            summary = pipeline.ingest([str(p) for p in files])
    return summary.read / t["seconds"], summary.read


def peak_memory(events: int) -> tuple[float, int]:
    files = demo_files(events)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CDP_HOME": tmp}
        subprocess.run([sys.executable, "-m", "cdp", "ingest", *map(str, files.event_files)], env=env,
                       check=True, stdout=subprocess.DEVNULL)
    return peak_rss_children_mib(), files.events


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--memory-events", type=int, default=1_000_000)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)

    files = demo_files(args.events)
    events = load_events(files.event_files)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ours, count = pipeline_rate(files.event_files, directory)
        plain = baseline_plain(events, directory)
        raw = baseline_recorder(events, directory)
    report(f"embedded ingest, {count:,} events (parse → validate → resolve → store → view)", [
        ("cdp pipeline, end to end", ours, "events/s"),
        ("baseline A: plain eventsourcing append (batches of 1,000)", plain, "events/s"),
        ("baseline B: SQLite recorder insert_events, ready-made", raw, "events/s"),
    ], target="at least 10,000 events/s end to end")
    if not args.skip_memory:
        rss, n = peak_memory(args.memory_events)
        print(f"\n== peak memory of `cdp ingest` on {n:,} events: {rss:,.0f} MiB (target: under 1 GiB)")


if __name__ == "__main__":
    main()
