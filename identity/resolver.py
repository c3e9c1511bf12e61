"""Resolving each incoming record to a customer, one record at a time, as it arrives.

The deterministic rules, strongest first:

* the same `business_unit` + `source_id` is the same customer;
* a normalised identifier shared across records (national id, email, loyalty id) links them —
  unless the value is carried by more records than its kind's guardrail allows;
* a shared phone number links a new record to an earlier record carrying it only when their first
  names and dates of birth do not disagree (families share phones; identity/comparisons.py);
* a record whose evidence points at two or more customers proves they are one person: they are
  merged into one survivor, and the absorbed ids keep resolving to it.

Beside them, for a record whose source key is new, the `Matcher` (identity/matching.py) scores the
earlier records its blocking keys find: every one at or above the match threshold is a link too
(so all their customers merge: clusters are the transitive closure of match pairs, whatever the
arrival order), and those between the review and match thresholds become review suggestions.

Remembered "do not link" pairs (from splits and rejected reviews) veto any link or merge they
forbid. `split`, `confirm` and `reject` are the decisions people make; each returns what the
pipeline records as events.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from identity.blocking import BlockingIndex, blocking_keys
from identity.comparisons import compatible
from identity.constraints import CannotLink
from identity.features import Features, features
from identity.guardrails import Guardrails
from identity.index import IdentityIndex
from ingest.normalise import IDENTIFIER_KINDS
from ingest.records import Accepted

NAMESPACE = uuid.UUID("5c1f6a8e-2f43-4d0e-9a52-6f1b2c9d7e10")
IDENTIFIER_RULES = ("national_id", "email", "loyalty_id")  # strongest first


@dataclass(frozen=True, slots=True)
class Link:
    """Why two records are the same customer: a rule name and the evidence it saw."""

    rule: str
    evidence: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Suggestion:
    """A grey-zone pair for the review queue: the new record and an earlier one."""

    source_key: str
    other_source_key: str
    probability: float
    evidence: dict[str, Any]

    @property
    def review_id(self) -> str:
        return review_id(self.source_key, self.other_source_key)


@dataclass(slots=True)
class Decision:
    customer_id: str
    registered: bool = False  # a new customer was created for this source record
    link: Link | None = None  # the source record joined an existing customer, and why
    merges: list[tuple[str, Link]] = field(default_factory=list)  # (absorbed customer, why)
    suggestions: Sequence[Suggestion] = ()
    ignored: Sequence[tuple[str, str, int, int]] = ()  # guardrail: kind, value, count, limit
    vetoed: Sequence[str] = ()  # customers a do-not-link pair kept apart


@dataclass(slots=True)
class SplitDecision:
    customer_id: str
    new_customer_id: str
    source_keys: list[str]


class Matcher(Protocol):
    match_threshold: float

    def compare(self, f: Features, keys: list[str] | None = None) -> list: ...

    def evidence(self, scored: Any) -> dict: ...


def source_key(business_unit: str, source_id: str) -> str:
    return f"{business_unit}:{source_id}"


def new_customer_id(business_unit: str, source_id: str) -> str:
    """Deterministic, so replays and concurrent workers name the same new customer the same way."""
    return uuid.uuid5(NAMESPACE, source_key(business_unit, source_id)).hex


def split_id(customer_id: str, group: Sequence[str], taken: Callable[[str], bool], kind: str = "split") -> str:
    """A fresh customer id for records moved out of `customer_id`, the same on every replay."""
    n = 0
    while True:
        new_id = uuid.uuid5(NAMESPACE, f"{kind}:{customer_id}:{','.join(group)}:{n}").hex
        if not taken(new_id):
            return new_id
        n += 1


def review_id(a: str, b: str) -> str:
    """A short stable name for a pair of source records, whichever way round."""
    return hashlib.blake2b("|".join(sorted((a, b))).encode(), digest_size=6).hexdigest()


class Resolver:
    def __init__(self, index: IdentityIndex, matcher: Matcher | None = None,
                 blocks: BlockingIndex | None = None, guardrails: Guardrails | None = None,
                 cannot_link: CannotLink | None = None):
        self.index = index
        self.matcher = matcher
        self.blocks = blocks if blocks is not None else BlockingIndex()
        self.guardrails = guardrails if guardrails is not None else Guardrails(records=self.blocks.records.values())
        self.cannot_link = cannot_link if cannot_link is not None else CannotLink()
        if matcher is not None and getattr(matcher, "frequencies", False) is None:
            matcher.frequencies = self.guardrails  # term frequencies from the records held

    def cluster_of(self, src: str) -> str | None:
        return self.index.find("source", src)

    def resolve(self, record: Accepted) -> Decision:
        index = self.index
        src = source_key(record.business_unit, record.source_id)
        owner = index.find("source", src)
        if owner is not None and record.identifiers:
            self._learn(src, record.identifiers)
        if owner is not None and all(index.find(kind, value) == owner for kind, value in record.identifiers.items()):
            return Decision(customer_id=owner)  # a further event of a known record, nothing new: the hot path
        f = None
        if owner is None:
            f = features(record.profile, record.identifiers)
            self.guardrails.count(f)
        found: dict[str, Link] = {}
        if owner is not None:
            found[owner] = Link("same_source_record", {"source": src})
        ignored = self.guardrails.over_limit(record.identifiers) if f is not None else []
        allows = self.guardrails.allows
        for kind in IDENTIFIER_RULES:
            value = record.identifiers.get(kind)
            if value is None or not allows(kind, value):
                continue
            customer = index.find(kind, value)
            if customer is not None and customer not in found:
                found[customer] = Link(f"shared_{kind}", {kind: value})
        phone = record.identifiers.get("phone")
        if f is not None and phone is not None and allows("phone", phone):
            self._shared_phone(f, phone, found)
        suggestions: list[Suggestion] = []
        keys = blocking_keys(f) if f is not None else None
        if f is not None and self.matcher is not None:
            screened = self.guardrails.screen(f)
            found, suggestions = self._match(src, screened, keys if screened is f else None, found)
        vetoed: list[str] = []
        if self.cannot_link.pairs:
            kept, vetoed = self.cannot_link.compatible([owner if owner else src], list(found), self._cluster_or_self(src))
            found = {c: found[c] for c in kept}
        if not found:
            customer = new_customer_id(record.business_unit, record.source_id)
            decision = Decision(customer_id=customer, registered=True)
            index.assign("source", src, customer)
        else:
            customer, why = next(iter(found.items()))
            decision = Decision(customer_id=customer)
            for absorbed, link in list(found.items())[1:]:
                index.redirect(absorbed, customer)
                decision.merges.append((absorbed, link))
            if why.rule != "same_source_record":
                decision.link = why
                index.assign("source", src, customer)
        decision.suggestions = [s for s in suggestions if self.cluster_of(s.other_source_key) != customer]
        decision.ignored = ignored
        decision.vetoed = vetoed
        for kind, value in record.identifiers.items():
            if index.find(kind, value) is None:
                index.assign(kind, value, customer)
        if f is not None:
            self.blocks.add(src, f, keys)
        return decision

    def _learn(self, src: str, identifiers: dict[str, str]) -> None:
        """A known record's later event may carry identifiers its first did not: the record's
        features keep them, so a re-resolution sees the links they make."""
        known = self.blocks.records.get(src)
        if known is not None:
            grown = known.learned(identifiers)
            if grown is not known:
                self.guardrails.count_later(self.blocks.learn(src, grown))

    def _shared_phone(self, f: Features, phone: str, found: dict[str, Link]) -> None:
        records = self.blocks.records
        for holder in self.blocks.blocks.get(f"ph:{phone}", ()):
            customer = self.cluster_of(holder)
            if customer is not None and customer not in found and compatible(f, records[holder]):
                found[customer] = Link("shared_phone", {"phone": phone, "matched": holder})

    def _match(self, src: str, f: Features, keys: list[str] | None,
               found: dict[str, Link]) -> tuple[dict[str, Link], list[Suggestion]]:
        matcher, threshold = self.matcher, self.matcher.match_threshold
        suggestions: dict[str, Suggestion] = {}
        for scored in matcher.compare(f, keys):
            customer = self.cluster_of(scored.source_key)
            if customer is None:
                continue
            if scored.probability >= threshold:
                if customer not in found:
                    found[customer] = Link("probabilistic", matcher.evidence(scored))
            elif customer not in found and customer not in suggestions:
                suggestions[customer] = Suggestion(src, scored.source_key, scored.probability,
                                                   matcher.evidence(scored))
        return found, [s for c, s in suggestions.items() if c not in found]

    def _cluster_or_self(self, src: str):
        def cluster(key: str) -> str:
            return self.cluster_of(key) or key
        return cluster

    # -- people's decisions ------------------------------------------------------------------

    def members(self, customer_id: str) -> list[str]:
        """Source keys that resolve to the customer today."""
        survivor = self.index.survivor(customer_id)
        return sorted(src for src in self.index.keys_of_kind("source") if self.cluster_of(src) == survivor)

    def split(self, customer_id: str, sources: list[str] | None = None) -> list[SplitDecision]:
        """Moves `sources` (all but the first record, when None) out of the customer — together
        into one new customer, or each into its own — and remembers that they must not rejoin."""
        customer = self.index.survivor(customer_id)
        members = self.members(customer)
        if not members:
            raise ValueError(f"no customer {customer_id}")
        if sources:
            stray = sorted(set(sources) - set(members))
            if stray:
                raise ValueError(f"{', '.join(stray)} is not a source record of customer {customer}")
            if set(sources) == set(members):
                raise ValueError("cannot split every source record off: leave at least one")
            groups = [sorted(set(sources))]
        else:
            if len(members) < 2:
                raise ValueError(f"customer {customer} has only one source record: nothing to split")
            groups = [[m] for m in members[1:]]
        remaining = [m for m in members if not any(m in g for g in groups)]
        decisions = []
        for group in groups:
            new_id = split_id(customer, group, self.index.is_merged)  # fresh, even for a split made twice
            for src in group:
                self.index.assign("source", src, new_id)
            self.move_identifiers(customer, new_id, group, remaining)
            decisions.append(SplitDecision(customer, new_id, group))
        for i, group in enumerate(groups):
            for src in group:
                for other in remaining + [o for g in groups[i + 1:] for o in g]:
                    self.cannot_link.add(src, other)
        return decisions

    def move_identifiers(self, customer: str, new_id: str, moved: list[str], remaining: list[str]) -> None:
        records = self.blocks.records
        kept = {(kind, getattr(records[s], kind)) for s in remaining if s in records for kind in IDENTIFIER_KINDS}
        for src in moved:
            f = records.get(src)
            for kind in IDENTIFIER_KINDS:
                value = getattr(f, kind) if f else None
                if value is not None and (kind, value) not in kept and self.index.find(kind, value) == customer:
                    self.index.assign(kind, value, new_id)

    def confirm(self, a: str, b: str) -> tuple[str, str | None, Link]:
        """A person says records a and b are one person: (survivor, absorbed or None, why)."""
        self.cannot_link.remove(a, b)
        ca, cb = self._known(a), self._known(b)
        link = Link("review_confirmed", {"pair": [a, b], "review_id": review_id(a, b)})
        if ca == cb:
            return ca, None, link
        kept, _ = self.cannot_link.compatible([ca], [cb], self._cluster_or_self(a))
        if not kept:
            raise ValueError("a remembered split keeps these customers apart: split decisions win over confirmations")
        self.index.redirect(cb, ca)
        return ca, cb, link

    def link_ahead(self, known: str, unseen: str) -> str | None:
        """Links a source record not seen yet to the customer of a known one (a visitor's id named
        by an identify before the visitor's own events arrived), so its events land there; returns
        that customer, or None when `unseen` is known after all or a remembered split forbids it."""
        customer = self.cluster_of(known)
        if customer is None or self.cluster_of(unseen) is not None or \
                not self.cannot_link.compatible([customer], [unseen], self._cluster_or_self(known))[0]:
            return None
        self.index.assign("source", unseen, customer)
        return customer

    def reject(self, a: str, b: str) -> tuple[str, str]:
        """A person says records a and b are different people: remembered from now on."""
        ca, cb = self._known(a), self._known(b)
        if ca == cb:
            raise ValueError(f"{a} and {b} are already one customer ({ca}): use `cdp identity split`")
        self.cannot_link.add(a, b)
        return ca, cb

    def _known(self, src: str) -> str:
        customer = self.cluster_of(src)
        if customer is None:
            raise ValueError(f"unknown source record {src}")
        return customer

    def take_in(self, records: list[tuple[str, str]], pairs: list[tuple[str, str]]) -> None:
        """Records and do-not-link pairs another writer on the same store committed."""
        for source_key, text in records:
            if source_key not in self.blocks.records:
                f = self.blocks.load(source_key, text)
                self.guardrails.count(f)
            else:  # a record another writer saw a later event of
                grown = Features.from_json(json.loads(text))
                self.guardrails.count_later(self.blocks.learn(source_key, grown, persist=False))
        for a, b in pairs:
            self.cannot_link.pairs.add((a, b) if a <= b else (b, a))

    def take_writes(self) -> list[tuple[str, list[tuple]]]:
        return [*self.index.take_writes(), *self.blocks.take_writes(), *self.cannot_link.take_writes()]
