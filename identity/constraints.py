"""Remembered "do not link" pairs of source records, from splits and rejected reviews.

The resolver never puts two records of a pair into one customer again, whatever evidence arrives
later; only a confirmed review lifts a pair. Pairs are few (people decide them), so checking a
candidate merge walks them all. Persisted as rows of `identity_cannot_link`, written with the
events that record the decision.
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, Sequence

TABLES = ("CREATE TABLE IF NOT EXISTS identity_cannot_link (a TEXT NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a, b))",)
SELECT_PAIRS = "SELECT a, b FROM identity_cannot_link"
INSERT_PAIR = "INSERT INTO identity_cannot_link (a, b) VALUES (?, ?) ON CONFLICT (a, b) DO NOTHING"
DELETE_PAIR = "DELETE FROM identity_cannot_link WHERE a = ? AND b = ?"


def _ordered(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


class CannotLink:
    def __init__(self, rows: Iterable[tuple[str, str]] = ()):
        self.pairs: set[tuple[str, str]] = {_ordered(a, b) for a, b in rows}
        self._added: list[tuple[str, str]] = []
        self._removed: list[tuple[str, str]] = []

    def add(self, a: str, b: str) -> None:
        pair = _ordered(a, b)
        if pair not in self.pairs:
            self.pairs.add(pair)
            self._added.append(pair)

    def remove(self, a: str, b: str) -> None:
        pair = _ordered(a, b)
        if pair in self.pairs:
            self.pairs.discard(pair)
            self._removed.append(pair)

    def compatible(self, group: Sequence[Hashable], candidates: Sequence[Hashable],
                   cluster_of: Callable[[str], Hashable]) -> tuple[list, list]:
        """Splits `candidates` (strongest first) into those that may join `group` and those a pair
        forbids; each accepted candidate joins the group before the next is checked."""
        if not self.pairs:
            return list(candidates), []
        resolved = [(cluster_of(a), cluster_of(b)) for a, b in self.pairs]
        members, kept, dropped = set(group), [], []
        for candidate in candidates:
            if any((x in members and y == candidate) or (y in members and x == candidate) for x, y in resolved):
                dropped.append(candidate)
            else:
                kept.append(candidate)
                members.add(candidate)
        return kept, dropped

    def take_writes(self) -> list[tuple[str, list[tuple]]]:
        writes = [(INSERT_PAIR, self._added), (DELETE_PAIR, self._removed)]
        self._added, self._removed = [], []
        return writes
