"""The identity index: which customer each identifier currently belongs to.

Keys are (kind, value): ("source", "retail:R0001"), ("email", "ann@example.org"), ("phone", "+447700900123") …
A merge does not rewrite keys; it adds a redirect from the absorbed customer to the survivor, and
lookups follow redirects (with path compression), so a merge costs the same however many keys the
absorbed customer had. Changes are handed to the event store as rows written in the same
transaction as the events that caused them, so index and events can never disagree after a crash.
"""
from __future__ import annotations

from typing import Iterable

TABLES = (
    "CREATE TABLE IF NOT EXISTS identity_keys ("
    "kind TEXT NOT NULL, value TEXT NOT NULL, customer_id TEXT NOT NULL, PRIMARY KEY (kind, value))",
    "CREATE TABLE IF NOT EXISTS identity_redirects ("
    "absorbed_id TEXT PRIMARY KEY, survivor_id TEXT NOT NULL)",
)
SELECT_KEYS = "SELECT kind, value, customer_id FROM identity_keys"
SELECT_REDIRECTS = "SELECT absorbed_id, survivor_id FROM identity_redirects"
UPSERT_KEY = (
    "INSERT INTO identity_keys (kind, value, customer_id) VALUES (?, ?, ?) "
    "ON CONFLICT (kind, value) DO UPDATE SET customer_id = excluded.customer_id"
)
UPSERT_REDIRECT = (
    "INSERT INTO identity_redirects (absorbed_id, survivor_id) VALUES (?, ?) "
    "ON CONFLICT (absorbed_id) DO UPDATE SET survivor_id = excluded.survivor_id"
)


class IdentityIndex:
    def __init__(self, keys: Iterable[tuple[str, str, str]] = (), redirects: Iterable[tuple[str, str]] = ()):
        self._keys: dict[tuple[str, str], str] = {(kind, value): cid for kind, value, cid in keys}
        self._redirects: dict[str, str] = dict(redirects)
        self._dirty_keys: dict[tuple[str, str], str] = {}
        self._dirty_redirects: dict[str, str] = {}

    def load(self, keys: Iterable[tuple[str, str, str]], redirects: Iterable[tuple[str, str]]) -> None:
        """Takes in rows another writer committed (they win over what this copy remembers)."""
        self._keys.update(((kind, value), cid) for kind, value, cid in keys)
        self._redirects.update(redirects)

    def survivor(self, customer_id: str) -> str:
        """The customer an id resolves to today (itself unless it was merged away)."""
        redirects = self._redirects
        root = customer_id
        while root in redirects:
            root = redirects[root]
        while customer_id != root:  # compress the path in memory; persisted rows stay as written
            following = redirects[customer_id]
            redirects[customer_id] = root
            customer_id = following
        return root

    def find(self, kind: str, value: str) -> str | None:
        owner = self._keys.get((kind, value))
        return None if owner is None else self.survivor(owner)

    def assign(self, kind: str, value: str, customer_id: str) -> None:
        self._keys[(kind, value)] = customer_id
        self._dirty_keys[(kind, value)] = customer_id

    def redirect(self, absorbed_id: str, survivor_id: str) -> None:
        self._redirects[absorbed_id] = survivor_id
        self._dirty_redirects[absorbed_id] = survivor_id

    def keys_of_kind(self, kind: str) -> list[str]:
        """Every value of one kind of key (a scan: for people's decisions, not the hot path)."""
        return [value for k, value in self._keys if k == kind]

    def is_merged(self, customer_id: str) -> bool:
        return customer_id in self._redirects

    def take_writes(self) -> list[tuple[str, list[tuple]]]:
        """Rows changed since the last call, as (sql, rows) for the store's transaction."""
        writes = [
            (UPSERT_KEY, [(k, v, c) for (k, v), c in self._dirty_keys.items()]),
            (UPSERT_REDIRECT, list(self._dirty_redirects.items())),
        ]
        self._dirty_keys = {}
        self._dirty_redirects = {}
        return writes

    def __len__(self) -> int:
        return len(self._keys)
