"""Guardrails: an identifier value carried by too many source records stops acting as evidence.

A family phone, a shop's e-mail address, `test@example.com`: values like these would otherwise
join unrelated people. Each identifier kind has a limit (CDP_IDENTIFIER_LIMITS); once more source
records than that carry a value, the value no longer links records — neither as a deterministic
key nor, for phones, as a field in probabilistic scoring (an e-mail or national id still counts
there, weighed down by how many records share it: term frequency) — and every further record
carrying it gets an explanation saying so. Links made before the limit was reached stay; `cdp identity split` undoes
them if they were wrong.

The counts are derived from the persisted features of each record (identity_records), so they
need no table of their own.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from identity.features import Features
from ingest.normalise import IDENTIFIER_KINDS as KINDS

FREQUENCY_FIELDS = ("last", "postcode")  # counted for term-frequency adjustment only
SCREENED = ("phone",)  # over their limit, blanked for scoring (households share phones); others weigh by frequency
DEFAULT_LIMITS = {"email": 8, "phone": 8, "national_id": 4, "loyalty_id": 4}


class Guardrails:
    def __init__(self, limits: Mapping[str, int] | None = None, records: Iterable[Features] = ()):
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.counts: dict[tuple[str, str], int] = {}
        self.records = 0
        for f in records:
            self.count(f)

    def count(self, f: Features) -> None:
        """Counts a new source record's identifier values (and surname and postcode)."""
        counts = self.counts
        self.records += 1
        for kind in KINDS + FREQUENCY_FIELDS:
            value = getattr(f, kind)
            if value is not None:
                counts[(kind, value)] = counts.get((kind, value), 0) + 1
        self.count_later(f.later)

    def count_later(self, identifiers: Iterable[tuple[str, str]]) -> None:
        """Counts identifiers a known record's later event brought."""
        counts = self.counts
        for pair in identifiers:
            counts[pair] = counts.get(pair, 0) + 1

    def occurrences(self, kind: str, value: str) -> tuple[int, int]:
        """(records carrying `value`, records held): its term frequency."""
        return self.counts.get((kind, value), 0), self.records

    def allows(self, kind: str, value: str) -> bool:  # on every event's identifiers: kept cheap
        return self.counts.get((kind, value), 0) <= self.limits[kind]

    def over_limit(self, identifiers: Mapping[str, str]) -> list[tuple[str, str, int, int]]:
        """(kind, value, records carrying it, limit) for every value of `identifiers` over its limit."""
        return [(kind, value, self.counts.get((kind, value), 0), self.limits[kind])
                for kind, value in identifiers.items()
                if kind in self.limits and not self.allows(kind, value)]

    def screen(self, f: Features) -> Features:
        """`f` without the phone numbers over their limit, for scoring. Other identifiers over
        their limit still count there, weighed by how many records share them (term frequency)."""
        blanked = {kind: None for kind in SCREENED if getattr(f, kind) is not None
                   and not self.allows(kind, getattr(f, kind))}
        return f._replace(**blanked) if blanked else f
