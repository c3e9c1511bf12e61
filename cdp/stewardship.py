"""People's identity decisions — split a customer, confirm or reject a suggested match — recorded
as events in one store transaction with the resolver state they change, then projected.

The resolver (identity/) decides what each verdict means; this module only writes it down.
"""
from __future__ import annotations

from cdp.domain import Customer
from cdp.pipeline import Pipeline, split_key
from identity.resolver import review_id, source_key


def commit(pipeline: Pipeline, batch) -> None:
    """Commits the batch with the resolver state it changed, then projects it."""
    batch.writes.extend(pipeline.resolver.take_writes())
    pipeline.store.commit(batch)
    if pipeline.projector is not None:
        pipeline.projector.catch_up(pipeline.store, pipeline.settings.projection_batch)


def append_split(store, batch, customer_id: str, new_customer_id: str, source_keys: list[str], reason: str) -> None:
    moved = [list(split_key(s)) for s in source_keys]
    store.append(batch, Customer.Split, customer_id, new_customer_id=new_customer_id, sources=moved, reason=reason)
    store.append(batch, Customer.SplitOff, new_customer_id, business_unit=moved[0][0], source_id=moved[0][1],
                 split_from=customer_id, sources=moved)


def append_merge(store, batch, survivor: str, absorbed: str, link) -> None:
    store.append(batch, Customer.Merged, survivor, absorbed_id=absorbed, rule=link.rule, evidence=link.evidence)
    store.append(batch, Customer.Absorbed, absorbed, survivor_id=survivor)


def split(pipeline: Pipeline, customer_id: str, sources: list[str] | None, reason: str) -> list:
    """Moves source records out of a customer (all but one when `sources` is None)."""
    decisions = pipeline.resolver.split(customer_id, sources)
    batch = pipeline.store.begin()
    for d in decisions:
        append_split(pipeline.store, batch, d.customer_id, d.new_customer_id, d.source_keys, reason)
    commit(pipeline, batch)
    return decisions


def decide(pipeline: Pipeline, a: str, b: str, confirmed: bool) -> str:
    """Records a verdict on the pair of source records a, b; returns the customer it concerns."""
    resolver, store = pipeline.resolver, pipeline.store
    batch = store.begin()
    (unit, source_id), (other_unit, other_source_id) = split_key(a), split_key(b)
    pair = dict(review_id=review_id(a, b), business_unit=unit, source_id=source_id,
                other_business_unit=other_unit, other_source_id=other_source_id)
    if confirmed:
        survivor, absorbed, link = resolver.confirm(a, b)
        if absorbed is not None:
            append_merge(store, batch, survivor, absorbed, link)
        store.append(batch, Customer.MatchConfirmed, survivor, **pair)
        customer = survivor
    else:
        customer, _ = resolver.reject(a, b)
        store.append(batch, Customer.MatchRejected, customer, **pair)
    commit(pipeline, batch)
    return customer


__all__ = ["split", "decide", "source_key"]
