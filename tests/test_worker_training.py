"""Self-training in Kafka mode, through the real broker and a real PostgreSQL store, CLI as
subprocesses: a `cdp worker` trains a model once enough records arrived, and when another writer
stores a newer model the worker, still running (no restart), scores its next records with it."""
from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from cdp.demo import DemoSpec, generate
from tests.events import event, jsonl
from tests.test_streaming import cdp, kafka_env, start_worker, stop, stored_keys, wait_for  # noqa: F401 (fixture)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def models(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        exists = conn.execute("SELECT to_regclass('identity_model') IS NOT NULL").fetchone()[0]
        return [row[0] for row in conn.execute("SELECT version FROM identity_model ORDER BY version")] if exists else []


def twins(count: int) -> list[dict]:
    """Pairs of records of one person in two units, sharing no identifier: only the model links them."""
    people = [{"first_name": f"Oriel{chr(97 + i)}", "last_name": "Quennell", "date_of_birth": f"1971-03-{i + 1:02d}",
               "address": {"street": f"{i + 3} Tamworth Lane", "city": "Ludlow", "postcode": "SY8 1AA"}}
              for i in range(count)]
    return [event(f"twin-{unit}-{i}", unit, f"twin-{i}", customer=person)
            for i, person in enumerate(people) for unit in ("shop", "web")]


def test_a_worker_trains_itself_and_takes_in_another_writers_model_without_restart(kafka_env, fresh_postgres_dsn: str,
                                                                                  tmp_path: Path) -> None:
    files = generate(tmp_path / "demo", DemoSpec(people=150, seed=12, hard=True, events_per_record=3)).event_files
    demo = tmp_path / "demo.jsonl"
    demo.write_bytes(b"".join(Path(path).read_bytes() for path in files))
    events = sum(1 for line in demo.read_bytes().splitlines() if line.strip())
    twins_file = tmp_path / "twins.jsonl"
    twins_file.write_bytes(jsonl(twins(6)))

    worker = start_worker(kafka_env("worker", CDP_TRAIN_MIN_RECORDS="100", CDP_RETRAIN_GROWTH="100",
                                    CDP_WORKER_BATCH="100"),
                          tmp_path / "worker.log")
    try:
        wait_for(lambda: "consuming" in (tmp_path / "worker.log").read_text(), 60, "the worker", [worker])
        cdp(kafka_env("publisher"), "ingest", "--kafka", str(demo))
        # the worker trains by itself once 100 records are held, and re-resolves them
        wait_for(lambda: models(fresh_postgres_dsn) == [1], 180, "a model trained by the worker", [worker])
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= events, 120, "every event", [worker])
        assert "self-training: model v1" in (tmp_path / "worker.log").read_text()

        # another writer on the store trains a new model; the running worker scores with it
        trained = cdp(kafka_env("operator"), "identity", "train", "--seed", "7").stdout
        assert "re-resolution applied: model v2" in trained, trained
        cdp(kafka_env("publisher"), "ingest", "--kafka", str(twins_file))
        wait_for(lambda: stored_keys(fresh_postgres_dsn) >= events + 12, 120, "the twins", [worker])
    finally:
        stop(worker)
    assert worker.returncode == 0

    reader = kafka_env("reader")
    cdp(reader, "projections", "rebuild")
    rows = json.loads(cdp(reader, "query", "SELECT source_id, linked_by, evidence FROM customer_sources "
                                           "WHERE source_id LIKE 'twin-%'", "--format", "json").stdout)
    linked = [r for r in rows if r["linked_by"] == "probabilistic"]
    assert len(linked) == 6, rows  # each twin's second record joined its first by the model
    assert all(json.loads(r["evidence"])["model_version"] == 2 for r in linked), linked
