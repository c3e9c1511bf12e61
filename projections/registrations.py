"""Which customers a batch of notifications registered: the one rule the projector's re-derive and
the audiences' upkeep share.

A customer's registration is the first event of its stream, so a customer the batch registered had
nothing in the view before it: no event, no row in `customers`, no score, no audience stay. Both
readers skip looking such customers up in whole tables (on 1,000,000 customers each look-up scans
the table, whatever the batch's size).
"""
from __future__ import annotations

from typing import Sequence

import orjson

from cdp.contracts import stored_events

# each cuts the batch into segments (projector.segments), and the batch's own rows of events
# (tables.BATCH_EVENTS) then hold the last segment's only
_CUTTING = frozenset((stored_events.SPLIT, stored_events.ERASED))


def registered_customers(notifications: Sequence[tuple]) -> frozenset[str]:
    """The customers this batch of (position, customer_id, topic, state) registered that still are
    themselves at its end, every event of theirs among its own rows: those of its Registered
    notifications less every customer its merges name (an absorbed one now belongs to the survivor,
    a survivor takes the absorbed one's history). None when the batch splits or erases (cut into
    segments), or holds no event at all (the batch's rows of events are then an earlier batch's)."""
    topics = {n[2] for n in notifications}
    if stored_events.EVENT_RECORDED not in topics or not _CUTTING.isdisjoint(topics):
        return frozenset()
    registered = {n[1] for n in notifications if n[2] == stored_events.REGISTERED}
    for _, survivor, topic, state in notifications:
        if topic == stored_events.MERGED:
            registered.discard(survivor)
            registered.discard(orjson.loads(state)["absorbed_id"])
    return frozenset(registered)
