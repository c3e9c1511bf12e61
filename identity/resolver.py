"""Resolving each incoming record to a customer, one record at a time, as it arrives.

The deterministic rules, strongest first:

* the same `business_unit` + `source_id` is the same customer;
* a normalised identifier shared across records (national id, email, phone, loyalty id) links them;
* a record whose identifiers point at two or more customers proves they are one person: they are
  merged into one survivor, and the absorbed ids keep resolving to it.

Probabilistic matching plugs in as a `Matcher`: it is asked only when no deterministic rule
decided, and answers with a customer and the `Link` that explains why.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from identity.index import IdentityIndex
from ingest.records import Accepted

NAMESPACE = uuid.UUID("5c1f6a8e-2f43-4d0e-9a52-6f1b2c9d7e10")
IDENTIFIER_RULES = ("national_id", "email", "phone", "loyalty_id")  # strongest first


@dataclass(frozen=True, slots=True)
class Link:
    """Why two records are the same customer: a rule name and the evidence it saw."""

    rule: str
    evidence: dict[str, Any]


@dataclass(slots=True)
class Decision:
    customer_id: str
    registered: bool = False  # a new customer was created for this source record
    link: Link | None = None  # the source record joined an existing customer, and why
    merges: list[tuple[str, Link]] = field(default_factory=list)  # (absorbed customer, why)


class Matcher(Protocol):
    def match(self, record: Accepted, index: IdentityIndex) -> tuple[str, Link] | None: ...


def source_key(business_unit: str, source_id: str) -> str:
    return f"{business_unit}:{source_id}"


def new_customer_id(business_unit: str, source_id: str) -> str:
    """Deterministic, so replays and concurrent workers name the same new customer the same way."""
    return uuid.uuid5(NAMESPACE, source_key(business_unit, source_id)).hex


class Resolver:
    def __init__(self, index: IdentityIndex, matcher: Matcher | None = None):
        self.index = index
        self.matcher = matcher

    def candidates(self, record: Accepted) -> dict[str, Link]:
        """Every existing customer a deterministic rule points at, strongest rule first."""
        found: dict[str, Link] = {}
        src = source_key(record.business_unit, record.source_id)
        owner = self.index.find("source", src)
        if owner is not None:
            found[owner] = Link("same_source_record", {"source": src})
        for kind in IDENTIFIER_RULES:
            value = record.identifiers.get(kind)
            if value is None:
                continue
            customer = self.index.find(kind, value)
            if customer is not None and customer not in found:
                found[customer] = Link(f"shared_{kind}", {kind: value})
        return found

    def resolve(self, record: Accepted) -> Decision:
        index = self.index
        src = source_key(record.business_unit, record.source_id)
        found = self.candidates(record)
        if not found and self.matcher is not None:
            matched = self.matcher.match(record, index)
            if matched is not None:
                found[matched[0]] = matched[1]
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
        for kind, value in record.identifiers.items():
            if index.find(kind, value) is None:
                index.assign(kind, value, customer)
        return decision
