"""What the probabilistic matcher knows of one source record: its fields in comparison form.

Names are case- and accent-folded, addresses split into house number, street (street types
spelled out: "Rd" → "road") and postcode, identifiers taken as ingest normalised them. A
`Features` row is small and flat, so a million of them fit in memory, and it round-trips through
JSON for the side table that persists it with the events.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

from ingest.normalise import IDENTIFIER_KINDS, fold

STREET_TYPES = {
    "st": "street", "rd": "road", "ln": "lane", "ave": "avenue", "av": "avenue", "cl": "close",
    "dr": "drive", "gdns": "gardens", "cres": "crescent", "pl": "place", "ter": "terrace",
    "terr": "terrace", "gr": "grove", "gro": "grove", "sq": "square", "ct": "court",
}
_FLAT = re.compile(r"^(flat|apartment|apt|unit)\s+\w+\s*", re.IGNORECASE)
_NUMBER = re.compile(r"^(\d+[a-z]?)\s+(.*)$")


class Features(NamedTuple):
    first: str | None
    last: str | None
    dob: str | None          # YYYY-MM-DD
    number: str | None       # house number
    street: str | None       # street name, types spelled out
    postcode: str | None     # upper case, no spaces
    city: str | None
    phone: str | None        # E.164
    email: str | None
    national_id: str | None
    loyalty_id: str | None
    # (kind, value) of identifiers the record's later events brought: the links they made must
    # survive a re-resolution, which sees the records' features only
    later: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_json(cls, row: list[Any]) -> "Features":
        if len(row) > len(cls._fields) - 1:  # rows written before `later` existed have none
            row = [*row[:-1], tuple((kind, value) for kind, value in row[-1])]
        return cls(*row)

    def identifiers(self) -> list[tuple[str, str]]:
        """Every (kind, value) the record carries: its first event's and its later events'."""
        return [*((kind, getattr(self, kind)) for kind in IDENTIFIER_KINDS if getattr(self, kind) is not None),
                *self.later]

    def learned(self, identifiers: dict[str, str]) -> "Features":
        """With the identifiers of a later event it does not carry yet (self when none are new)."""
        known = set(self.identifiers())
        new = tuple((kind, value) for kind, value in identifiers.items()
                    if kind in IDENTIFIER_KINDS and (kind, value) not in known)
        return self._replace(later=self.later + new) if new else self


def _street(raw: str | None) -> tuple[str | None, str | None]:
    if not raw:
        return None, None
    text = fold(_FLAT.sub("", raw.strip()))
    match = _NUMBER.match(text)
    number, rest = (match.group(1), match.group(2)) if match else (None, text)
    words = rest.split()
    if words and words[-1] in STREET_TYPES:
        words[-1] = STREET_TYPES[words[-1]]
    return number, " ".join(words) or None


def _folded(value: Any) -> str | None:
    return fold(value) or None if value else None


def features(profile: dict[str, Any], identifiers: dict[str, str]) -> Features:
    """Comparison form of what one record says about a person."""
    number, street = _street(profile.get("street"))
    postcode = profile.get("postcode")
    return Features(
        first=_folded(profile.get("first_name")),
        last=_folded(profile.get("last_name")),
        dob=profile.get("date_of_birth"),
        number=number,
        street=street,
        postcode=postcode.replace(" ", "").upper() if postcode else None,
        city=_folded(profile.get("city")),
        phone=identifiers.get("phone"),
        email=identifiers.get("email"),
        national_id=identifiers.get("national_id"),
        loyalty_id=identifiers.get("loyalty_id"),
    )
