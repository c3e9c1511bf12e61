"""Self-training and re-resolution as a user meets them: `cdp ingest` trains by itself, `cdp identity
train [--dry-run]` re-resolves the records held, as identity events that people's decisions outrank."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.test_identity_cli import Cdp

SMALL = {"CDP_TRAIN_MIN_RECORDS": "100"}  # a first import of a few hundred records trains itself


pytestmark = pytest.mark.slow  # every test trains a model on the demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from cdp.demo import DemoSpec, generate

    return generate(tmp_path_factory.mktemp("demo"), DemoSpec(people=150, seed=12, hard=True))


def partition(cdp: Cdp) -> set[frozenset]:
    groups: dict[str, set] = {}
    for row in cdp.query("SELECT business_unit, source_id, customer_id FROM customer_sources"):
        groups.setdefault(row["customer_id"], set()).add((row["business_unit"], row["source_id"]))
    return {frozenset(g) for g in groups.values()}


def store_rows(cdp: Cdp) -> tuple:
    with sqlite3.connect(cdp.home / "events.sqlite") as db:
        return (db.execute("SELECT count(*) FROM stored_events").fetchone()[0],
                db.execute("SELECT count(*) FROM identity_model").fetchone()[0],
                sorted(db.execute("SELECT kind, value, customer_id FROM identity_keys").fetchall()),
                sorted(db.execute("SELECT * FROM identity_redirects").fetchall()))


def test_a_first_import_trains_itself_and_ends_the_same_whatever_the_order(demo, tmp_path: Path):
    files = [str(p) for p in demo.event_files]
    forward, backward = Cdp(tmp_path / "forward", SMALL), Cdp(tmp_path / "backward", SMALL)
    out = forward("ingest", *files).stdout
    backward("ingest", *reversed(files))
    assert "self-training" in out and "model v1" in out  # no command needed
    assert store_rows(forward)[1] == 1
    assert partition(forward) == partition(backward)
    untrained = Cdp(tmp_path / "untrained", {"CDP_TRAIN_MIN_RECORDS": "0"})
    assert "self-training" not in untrained("ingest", *files).stdout
    assert store_rows(untrained)[1] == 0


def test_retraining_is_previewed_applied_once_explained_and_keeps_ids_and_peoples_splits(demo, tmp_path: Path):
    # resolved strictly at first (few probabilistic links), then retrained at the default threshold
    cdp = Cdp(tmp_path / "home", {"CDP_TRAIN_MIN_RECORDS": "0"})
    cdp("ingest", *map(str, demo.event_files), env={"CDP_MATCH_THRESHOLD": "0.999999999"})
    before_store, before = store_rows(cdp), partition(cdp)
    ids_before = {r["customer_id"] for r in cdp.query("SELECT customer_id FROM customers")}

    preview = cdp("identity", "train", "--dry-run").stdout
    assert "would change (dry run, nothing written)" in preview and " merges" in preview
    merges = int(preview.split("would change (dry run, nothing written): ")[1].split("model v1: ")[1].split(" merges")[0])
    assert merges > 0
    assert store_rows(cdp) == before_store and partition(cdp) == before  # nothing written

    applied = cdp("identity", "train").stdout
    assert f"re-resolution applied: model v1: {merges:,} merges" in applied
    after = partition(cdp)
    assert len(after) == len(before) - merges
    assert all(any(old <= new for new in after) for old in before)  # only merges here: nobody torn apart

    # ids stay stable: every survivor is a customer that existed before; absorbed ids keep resolving
    ids_after = {r["customer_id"] for r in cdp.query("SELECT customer_id FROM customers")}
    assert ids_after <= ids_before
    for absorbed in sorted(ids_before - ids_after)[:3]:
        shown = json.loads(cdp("customer", "show", absorbed, "--format", "json").stdout)
        assert shown["customer_id"] in ids_after
    # each merge is explained, naming the model version that made it
    redirects = cdp.query("SELECT survivor_id, evidence FROM customer_redirects")
    remerged = [r for r in redirects if r["evidence"] and json.loads(r["evidence"]).get("re_resolution")]
    assert len(remerged) == merges
    survivor = remerged[0]["survivor_id"]
    explained = json.loads(cdp("identity", "explain", survivor, "--format", "json").stdout)
    assert any(m["evidence"].get("model_version") == 1 for m in explained["merges"])

    # a second apply changes nothing
    again = cdp("identity", "train").stdout
    assert "0 merges, 0 splits" in again and partition(cdp) == after

    # a person's split survives a retrain with another model
    members = next(g for g in after if len(g) >= 2)
    customer = cdp.customer_of(*sorted(members)[0])
    cdp("identity", "split", customer)
    split = partition(cdp)
    retrained = cdp("identity", "train", "--seed", "7").stdout
    assert "re-resolution applied" in retrained
    final = partition(cdp)
    for a in members:
        for b in members:
            if a != b:
                assert not any(a in g and b in g for g in final), "a person's split was undone"
    assert len(final) <= len(split)


def test_retraining_splits_what_the_new_threshold_no_longer_links(demo, tmp_path: Path):
    cdp = Cdp(tmp_path / "home", {"CDP_TRAIN_MIN_RECORDS": "0"})
    loose = {"CDP_MATCH_THRESHOLD": "0.5", "CDP_REVIEW_THRESHOLD": "0.5"}
    cdp("ingest", *map(str, demo.event_files), env=loose)
    before = partition(cdp)
    out = cdp("identity", "train", env={"CDP_MATCH_THRESHOLD": "0.9999"}).stdout
    splits = int(out.split("merges, ")[1].split(" splits")[0].replace(",", ""))
    assert splits > 0
    reasons = [json.loads(r["evidence"])["reason"] for r in
               cdp.query("SELECT evidence FROM identity_decisions WHERE kind = 'split'")]
    assert len(reasons) >= splits and all("re-resolution with model v1" in r for r in reasons)
    after = partition(cdp)
    assert after != before and len(after) > len(before)
    assert "0 merges, 0 splits" in cdp("identity", "train", env={"CDP_MATCH_THRESHOLD": "0.9999"}).stdout
    cdp("projections", "rebuild")
    assert partition(cdp) == after  # the view rebuilt from the events says the same


@pytest.mark.postgres
def test_retraining_on_postgresql(demo, tmp_path: Path, fresh_postgres_dsn: str):
    cdp = Cdp(tmp_path / "home", {"CDP_TRAIN_MIN_RECORDS": "0", "CDP_EVENT_STORE": fresh_postgres_dsn})
    cdp("ingest", *map(str, demo.event_files), env={"CDP_MATCH_THRESHOLD": "0.999999999"})
    before = partition(cdp)
    out = cdp("identity", "train").stdout
    merges = int(out.split("model v1: ")[-1].split(" merges")[0].replace(",", ""))
    assert merges > 0 and len(partition(cdp)) == len(before) - merges
    assert "0 merges, 0 splits" in cdp("identity", "train").stdout


def test_a_link_made_by_a_records_later_event_survives_retraining(demo, tmp_path: Path):
    from tests.test_identity_cli import event

    cdp = Cdp(tmp_path / "home", {"CDP_TRAIN_MIN_RECORDS": "0"})
    cdp("ingest", *map(str, demo.event_files))
    cdp.ingest(event("shop", "later-a", first_name="Ysolde", last_name="Brack", email="ysolde@example.org"),
               event("web", "later-b", first_name="Quill", last_name="Marrow", date_of_birth="1960-01-02"))
    assert cdp.customer_of("shop", "later-a") != cdp.customer_of("web", "later-b")
    # the web record's second event brings the shop record's e-mail: one person
    cdp.ingest(event("web", "later-b", time="2025-02-01T10:00:00Z", email="ysolde@example.org"))
    customer = cdp.customer_of("shop", "later-a")
    assert cdp.customer_of("web", "later-b") == customer
    out = cdp("identity", "train", "--seed", "3").stdout
    assert "re-resolution applied" in out
    assert cdp.customer_of("web", "later-b") == cdp.customer_of("shop", "later-a")


def test_a_worker_starts_no_training_while_its_records_share_no_block(demo, tmp_path: Path, monkeypatch):
    """A worker polls its trainer after each batch. Records that share no name, birth date or
    address give a training nothing to learn from, so no training process starts (one used to start
    each time the records grew by a tenth, only to find so); once records that share blocks
    arrive, one does, and it trains."""
    from cdp.application import CustomerApplication
    from cdp.config import Settings
    from cdp.self_training import Trainer
    from tests.events import event

    cdp = Cdp(tmp_path / "home", SMALL)
    cdp.ingest(*(event(f"lone-{i}", "web", f"W-{i}", customer={"email": f"lone{i}@example.org"}) for i in range(150)))
    for name, value in {**SMALL, "CDP_HOME": str(cdp.home)}.items():
        monkeypatch.setenv(name, value)  # the training process reads the worker's environment
    trainer = Trainer()
    with CustomerApplication(Settings.from_env()) as app:
        assert app.training_due() and not app.can_learn()
        trainer.poll(app)
        assert trainer.process is None and trainer.retry_at > app.records_held() >= 150
    cdp("ingest", *map(str, demo.event_files), env={"CDP_TRAIN_MIN_RECORDS": "0"})  # no training of its own
    assert store_rows(cdp)[1] == 0
    trainer.retry_at = 0
    with CustomerApplication(Settings.from_env()) as app:
        assert app.training_due() and app.can_learn()
        trainer.poll(app)
        assert trainer.process is not None and trainer.process.wait(timeout=120) == 0
    assert store_rows(cdp)[1] == 1  # the process trained a model
