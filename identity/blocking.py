"""Blocking: which earlier records a new record is compared with.

Each record gets a few *blocking keys*, each specific enough that a block stays small however large
the customer base grows (names are phonetic codes combined with a birth year or a postcode; dates
of birth with a postcode or a name code; the house number and postcode or street with a name
code). A candidate is any earlier record sharing at least one key. Blocks larger than a limit are
cut off (only their first records are compared), so the cost per record stays flat.

The blocks live in memory beside each record's `Features`; the features are persisted as rows of
`identity_records`, written in the events' transaction, and the blocks are rebuilt from them at
start.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Iterable, Iterator

from identity.features import Features

TABLES = ("CREATE TABLE IF NOT EXISTS identity_records (source_key TEXT PRIMARY KEY, features TEXT NOT NULL)",)
SELECT_RECORDS = "SELECT source_key, features FROM identity_records"
UPSERT_RECORD = (
    "INSERT INTO identity_records (source_key, features) VALUES (?, ?) "
    "ON CONFLICT (source_key) DO UPDATE SET features = excluded.features"
)

_CODES = {c: d for d, letters in enumerate(("aeiouyhw", "bfpv", "cgjkqsxz", "dt", "l", "mn", "r")) for c in letters}


@lru_cache(maxsize=65536)
def soundex(name: str) -> str:
    """American Soundex of a folded name (letter + three digits); '' when it has no letters."""
    letters = [c for c in name if "a" <= c <= "z"]
    if not letters:
        return ""
    out, last = [letters[0]], _CODES.get(letters[0], 0)
    for c in letters[1:]:
        code = _CODES.get(c, 0)
        if code and code != last:
            out.append(str(code))
        if c not in "hw":
            last = code
    return ("".join(out) + "000")[:4]


def _dob_key(dob: str) -> str:
    """Year plus day and month in either order, so a day/month swap lands in the same block."""
    a, b = dob[5:7], dob[8:10]
    return dob[:4] + (a + b if a <= b else b + a)


def blocking_keys(f: Features) -> list[str]:
    keys = []
    first, last = soundex(f.first or ""), soundex(f.last or "")
    names = "".join(sorted((first, last))) if first and last else ""
    if names and f.dob:
        keys.append(f"ny:{names}{f.dob[:4]}")
    if names and f.postcode:
        keys.append(f"np:{names}{f.postcode}")
    if f.number:  # the same house and one name (the other mistyped beyond its code, no birth date)
        for code in sorted({first, last} - {""}):
            if f.postcode:
                keys.append(f"hp:{code}{f.number} {f.postcode}")
            if f.street:  # … with the postcode mistyped
                keys.append(f"hs:{code}{f.number} {f.street}")
    if f.dob:
        dob = _dob_key(f.dob)
        if f.postcode:
            keys.append(f"dp:{dob}{f.postcode}")
        for code in {first, last} - {""}:
            keys.append(f"dn:{dob}{code}")
    if f.phone:
        keys.append(f"ph:{f.phone}")
    if f.national_id:
        keys.append(f"ni:{f.national_id}")
    for kind, value in f.later:  # identifiers the record's later events brought
        if kind in _IDENTIFIER_BLOCKS:
            keys.append(f"{_IDENTIFIER_BLOCKS[kind]}{value}")
    return keys


_IDENTIFIER_BLOCKS = {"phone": "ph:", "national_id": "ni:"}


class BlockingIndex:
    """Every record's features and the blocks that find them again."""

    def __init__(self, rows: Iterable[tuple[str, str]] = (), max_block: int = 50):
        self.max_block = max_block
        self.records: dict[str, Features] = {}
        self.blocks: dict[str, list[str]] = {}
        self._dirty: dict[str, Features] = {}
        for source_key, text in rows:
            self.load(source_key, text)

    def load(self, source_key: str, text: str) -> Features:
        """Takes in one persisted row (at start, or another writer's)."""
        f = Features.from_json(json.loads(text))
        self._add(source_key, f)
        return f

    def _add(self, source_key: str, f: Features, keys: list[str] | None = None) -> None:
        self.records[source_key] = f
        blocks = self.blocks
        for key in keys if keys is not None else blocking_keys(f):
            block = blocks.get(key)
            if block is None:
                blocks[key] = [source_key]
            elif len(block) < self.max_block:
                block.append(source_key)

    def add(self, source_key: str, f: Features, keys: list[str] | None = None) -> None:
        self._add(source_key, f, keys)
        self._dirty[source_key] = f

    def learn(self, source_key: str, f: Features, persist: bool = True) -> list[tuple[str, str]]:
        """Takes in a known record's features grown by a later event's identifiers (`persist`:
        to be written, unless another writer stored them); returns the identifiers new to it."""
        known = self.records[source_key]
        new = [pair for pair in f.later if pair not in known.later]
        if new:
            old_keys = set(blocking_keys(known))
            self.records[source_key] = f
            if persist:
                self._dirty[source_key] = f
            for key in blocking_keys(f):
                if key not in old_keys:
                    block = self.blocks.setdefault(key, [])
                    if len(block) < self.max_block:
                        block.append(source_key)
        return new

    def candidates(self, f: Features, keys: list[str] | None = None) -> Iterator[str]:
        """Earlier records sharing a blocking key with `f` (its `keys`, when already computed), each once."""
        seen: set[str] = set()
        blocks = self.blocks
        for key in keys if keys is not None else blocking_keys(f):
            for source_key in blocks.get(key, ()):
                if source_key not in seen:
                    seen.add(source_key)
                    yield source_key

    def take_writes(self) -> list[tuple[str, list[tuple]]]:
        rows = [(k, json.dumps(f.to_json(), separators=(",", ":"))) for k, f in self._dirty.items()]
        self._dirty = {}
        return [(UPSERT_RECORD, rows)]

    def __len__(self) -> int:
        return len(self.records)
