"""Self-training and re-resolution, written down.

A model is trained from the records the store holds (identity/training.py), the records are
resolved again with it (identity/reresolution.py), and the resulting merges and splits are
appended as ordinary identity events — in one store transaction with the model's row and the
resolver state they change — then projected. `cdp identity train` runs this on demand (with
`--dry-run`, only the plan); the pipeline runs it by itself once enough new records have arrived
(CDP_TRAIN_MIN_RECORDS, CDP_RETRAIN_GROWTH).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from uuid import UUID

from eventsourcing.utils import get_topic

from cdp.domain import Customer
from cdp.pipeline import Pipeline, take_in_changes
from cdp.stewardship import append_merge, append_split, commit
from cdp.store import EventStore
from identity import model as identity_model
from identity.matching import ProbabilisticMatcher
from identity.model import Model
from identity.reresolution import Plan, apply, plan
from identity.resolver import Resolver
from identity.training import due, train


@dataclass
class Outcome:
    model: Model
    new_model: bool  # False: retraining gave the latest model again
    plan: Plan


def confirmed_pairs(store: EventStore) -> list[tuple[str, str]]:
    """The pairs people confirmed in review (few: read from their events)."""
    table = store.recorder.events_table_name
    rows = store.query(f"SELECT state FROM {table} WHERE topic = ?", (get_topic(Customer.MatchConfirmed),))
    pairs = []
    for (state,) in rows:
        e = store.transcoder.decode(bytes(state))
        pairs.append((f"{e['business_unit']}:{e['source_id']}", f"{e['other_business_unit']}:{e['other_source_id']}"))
    return pairs


def oldest_in(store: EventStore) -> Callable[[list[str]], str]:
    """Picks, of several customer ids, the one whose first event the store recorded first."""
    table = store.recorder.events_table_name

    def oldest(ids: list[str]) -> str:
        if store.is_postgres:
            rows = store.query(f"SELECT replace(originator_id::text, '-', ''), notification_id FROM {table} "
                               "WHERE originator_version = 1 AND originator_id = ANY(?)", ([UUID(i) for i in ids],))
        else:
            marks = ",".join("?" * len(ids))
            rows = store.query(f"SELECT originator_id, rowid FROM {table} "
                               f"WHERE originator_version = 1 AND originator_id IN ({marks})", ids)
        position = dict(rows)
        return min(ids, key=lambda i: (position.get(i, float("inf")), i))
    return oldest


def retrain(pipeline: Pipeline, seed: int = 1, dry_run: bool = False,
            progress: Callable[[int], None] | None = None) -> Outcome:
    """Trains a model on the records held and re-resolves them with it; writes nothing when
    `dry_run`. Runs under the writers' lock, after taking in what other writers committed."""
    store, settings = pipeline.store, pipeline.settings
    with store.exclusive():
        take_in_changes(pipeline.resolver, store.changed)
        resolver = pipeline.resolver
        records = resolver.blocks.records  # in source-key order: the same model whatever the arrival order
        trained = train([records[k] for k in sorted(records)], seed=seed, max_block=settings.max_block)
        latest = resolver.matcher.model
        new_model = not (latest.version and trained.same_estimate(latest))
        if new_model:
            trained.version = store.query(identity_model.SELECT_LATEST_VERSION)[0][0] + 1
        model = trained if new_model else latest
        matcher = ProbabilisticMatcher(model, resolver.blocks, settings.match_threshold, settings.review_threshold)
        candidate = Resolver(resolver.index, matcher, resolver.blocks, resolver.guardrails, resolver.cannot_link)
        changes = plan(candidate, confirmed_pairs(store), oldest_in(store), progress)
        if dry_run:
            return Outcome(model, new_model, changes)
        try:
            batch = store.begin()
            if new_model:
                batch.writes.append((identity_model.INSERT_MODEL, [(model.version, model.to_json())]))
            apply(candidate, changes)
            for s in changes.splits:
                append_split(store, batch, s.customer_id, s.new_customer_id, s.source_keys, s.reason)
            for m in changes.merges:
                append_merge(store, batch, m.survivor, m.absorbed, m.link)
            resolver.matcher = matcher
            commit(pipeline, batch)
        except Exception:
            pipeline.reload()
            raise
    return Outcome(model, new_model, changes)


def retrain_if_due(pipeline: Pipeline) -> Outcome | None:
    """Self-training: retrains when enough records arrived since the latest model."""
    settings, resolver = pipeline.settings, pipeline.resolver
    if resolver.matcher is None or not due(len(resolver.blocks), resolver.matcher.model,
                                           settings.train_min_records, settings.retrain_growth):
        return None
    try:
        return retrain(pipeline)
    except ValueError:  # too few candidate pairs to learn from: keep the model until more arrive
        return None


def describe(outcome: Outcome) -> str:
    p = outcome.plan
    model = f"model v{outcome.model.version}" + ("" if outcome.new_model else " (unchanged)")
    return (f"{model}: {len(p.merges):,} merges, {len(p.splits):,} splits, "
            f"customers {p.customers_before:,} → {p.customers_after:,}")

