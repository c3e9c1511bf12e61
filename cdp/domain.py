"""The system of record's domain model: one `Customer` aggregate per unified customer.

Every fact is an explicit event on the customer it concerns:

* `Registered`     — a source record was first seen and became a new customer;
* `SourceLinked`   — a further source record was resolved to this customer (with the rule that did it);
* `EventRecorded`  — an accepted channel event (purchase, call, e-mail …) with what the unit said of the person;
* `Merged` / `Absorbed` — two customers turned out to be one person; the absorbed id keeps resolving
  to the survivor.
* `Split` / `SplitOff` — a wrong merge undone: source records (and their events) leave this customer
  for a new one, and the resolver remembers they must not be linked again.
* `MatchSuggested` — a grey-zone pair (between the review and match thresholds) for people to judge;
  `MatchConfirmed` / `MatchRejected` — their verdict, honoured from then on.
* `IdentifierIgnored` — a record carried an identifier over its guardrail limit, so it did not link.

Ids inside events are hex strings, not UUID objects, so events serialise without custom types.
"""
from __future__ import annotations

from typing import Any

from eventsourcing.domain import Aggregate


class Customer(Aggregate, created_event_name="Registered"):
    """A real person as the group knows them, across business units."""

    class Registered(Aggregate.Created):
        business_unit: str
        source_id: str

    class SourceLinked(Aggregate.Event):
        business_unit: str
        source_id: str
        rule: str
        evidence: dict[str, Any]

        def apply(self, customer: "Customer") -> None:
            customer.sources.append((self.business_unit, self.source_id))

    class EventRecorded(Aggregate.Event):
        event_id: str
        event_source: str
        event_type: str
        time: str
        business_unit: str
        source_id: str
        profile: dict[str, Any]
        data: dict[str, Any]

        def apply(self, customer: "Customer") -> None:
            customer.events += 1
            customer.profile.update(self.profile)

    class Merged(Aggregate.Event):
        absorbed_id: str
        rule: str
        evidence: dict[str, Any]

        def apply(self, customer: "Customer") -> None:
            customer.absorbed.append(self.absorbed_id)

    class Absorbed(Aggregate.Event):
        survivor_id: str

        def apply(self, customer: "Customer") -> None:
            customer.merged_into = self.survivor_id

    class Split(Aggregate.Event):
        new_customer_id: str
        sources: list[list[str]]  # [business_unit, source_id] moved to the new customer
        reason: str

        def apply(self, customer: "Customer") -> None:
            moved = {tuple(s) for s in self.sources}
            customer.sources = [s for s in customer.sources if s not in moved]

    class SplitOff(Aggregate.Created):
        """The new customer a split creates; business_unit/source_id name its first record."""

        business_unit: str
        source_id: str
        split_from: str
        sources: list[list[str]]

        def apply(self, customer: "Customer") -> None:
            customer.sources = [tuple(s) for s in self.sources]
            customer.split_from = self.split_from

    class MatchSuggested(Aggregate.Event):
        review_id: str
        business_unit: str
        source_id: str
        other_business_unit: str
        other_source_id: str
        probability: float
        evidence: dict[str, Any]

    class MatchConfirmed(Aggregate.Event):
        review_id: str
        business_unit: str
        source_id: str
        other_business_unit: str
        other_source_id: str

    class MatchRejected(MatchConfirmed):
        pass

    class IdentifierIgnored(Aggregate.Event):
        business_unit: str
        source_id: str
        kind: str
        value: str
        records: int
        limit: int

    def __init__(self, business_unit: str, source_id: str):
        self.sources: list[tuple[str, str]] = [(business_unit, source_id)]
        self.split_from: str | None = None
        self.events = 0
        self.profile: dict[str, Any] = {}
        self.absorbed: list[str] = []
        self.merged_into: str | None = None


class Audience(Aggregate, created_event_name="Defined"):
    """A segment of the unified view that downstream tools receive as it changes: a SQL predicate
    over `customers` and an optional consent purpose (projections/audiences.py keeps members).
    Its id is derived from its name (cdp.contracts.audience_events.definition_id)."""

    class Defined(Aggregate.Created):
        name: str
        where: str
        consent: str | None

    class Redefined(Aggregate.Event):
        """The same name defined again after it was deleted."""

        name: str
        where: str
        consent: str | None

    class Deleted(Aggregate.Event):
        name: str

    def __init__(self, name: str, where: str, consent: str | None):
        self.name, self.where, self.consent = name, where, consent


class Destination(Aggregate, created_event_name="Defined"):
    """Where audience changes are delivered: a webhook that receives the changes of some audiences.
    The HMAC secret is kept sealed (cdp/secrets.py), never in plain text."""

    class Defined(Aggregate.Created):
        name: str
        webhook: str
        audiences: list[str]
        fields: list[str]
        sealed_secret: str | None

    class Redefined(Aggregate.Event):
        name: str
        webhook: str
        audiences: list[str]
        fields: list[str]
        sealed_secret: str | None

    class Deleted(Aggregate.Event):
        name: str

    def __init__(self, name: str, webhook: str, audiences: list[str], fields: list[str], sealed_secret: str | None):
        self.name, self.webhook, self.audiences, self.fields = name, webhook, audiences, fields
        self.sealed_secret = sealed_secret
