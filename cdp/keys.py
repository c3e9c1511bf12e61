"""API keys: who may publish for which business unit, read what, or administer.

A key is an `ApiKey` aggregate in the event store (created, revoked: facts like any other), saved
through the `eventsourcing` application. The store keeps only the key's SHA-256 digest: keys are
long random tokens, so a plain digest cannot be reversed and needs no salt; the token itself is
shown once, when it is made. `cdp serve` holds a `KeyRing` fed from the store's notifications,
so a key made or revoked by `cdp keys` takes effect there within a poll.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Sequence
from uuid import UUID

import orjson
from eventsourcing.domain import Aggregate, event
from eventsourcing.utils import get_topic

SCOPES = ("publish", "read", "admin")
_UNIT = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class ApiKey(Aggregate, created_event_name="Created"):
    """One API key: a digest, the business unit it acts for (None: the whole group) and a scope."""

    def __init__(self, digest: str, prefix: str, scope: str, unit: str | None):
        self.digest = digest
        self.prefix = prefix
        self.scope = scope
        self.unit = unit
        self.revoked = False

    @event("Revoked")
    def revoke(self) -> None:
        self.revoked = True


TOPIC_CREATED = get_topic(ApiKey.Created)
TOPIC_REVOKED = get_topic(ApiKey.Revoked)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(scope: str, unit: str | None) -> str:
    """`cdp_<scope>_<unit or group>_<32 random url-safe chars>`: readable in a config file, unguessable."""
    return f"cdp_{scope}_{unit or 'group'}_{secrets.token_urlsafe(24)}"


def check(scope: str, unit: str | None) -> None:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r} (one of {', '.join(SCOPES)})")
    if unit is not None and not _UNIT.match(unit):
        raise ValueError(f"business unit {unit!r}: expected lower-case letters, digits, '_' or '-'")


@dataclass(frozen=True)
class Key:
    key_id: str
    prefix: str
    scope: str
    unit: str | None
    created: str
    revoked: bool = False

    @property
    def group(self) -> bool:
        return self.unit is None

    def may(self, scope: str) -> bool:
        """admin may do everything; publish and read only themselves."""
        return self.scope == "admin" or self.scope == scope


class KeyRing:
    """Key digests → keys, from the store's ApiKey events (in store order)."""

    def __init__(self) -> None:
        self.by_digest: dict[str, Key] = {}
        self.by_id: dict[str, Key] = {}

    def take(self, notifications: Iterable[Sequence[Any]]) -> None:
        """Applies (position, originator id, topic, state) rows; other topics are ignored."""
        for _, originator, topic, state in notifications:
            if topic == TOPIC_CREATED:
                fields = orjson.loads(state)
                key_id = str(originator).replace("-", "")
                stamp = fields.get("timestamp")
                created = stamp.get("_data_") if isinstance(stamp, dict) else str(stamp)
                key = Key(key_id, fields["prefix"], fields["scope"], fields.get("unit"), created)
                self.by_id[key_id] = key
                self.by_digest[fields["digest"]] = key
            elif topic == TOPIC_REVOKED:
                key_id = str(originator).replace("-", "")
                old = self.by_id.get(key_id)
                if old is not None:
                    self.by_id[key_id] = Key(**{**old.__dict__, "revoked": True})
                    for d, k in list(self.by_digest.items()):
                        if k.key_id == key_id:
                            del self.by_digest[d]

    def authenticate(self, token: str | None) -> Key | None:
        if not token:
            return None
        wanted = digest(token)
        key = self.by_digest.get(wanted)
        # the dict lookup already matched; compare again in constant time for good measure
        return key if key is not None and hmac.compare_digest(wanted, digest(token)) else None

    def all(self) -> list[Key]:
        return sorted(self.by_id.values(), key=lambda k: k.created)


def load(app: Any) -> KeyRing:
    """Every key event in the store (one pass filtered by topic); `app` is the CustomerApplication."""
    ring = KeyRing()
    store = app.store
    table = store.recorder.events_table_name
    position, originator = ("notification_id", "originator_id::text") if store.is_postgres else ("rowid", "originator_id")
    ring.take(store.query(f"SELECT {position}, {originator}, topic, state FROM {table} "
                          f"WHERE topic IN (?, ?) ORDER BY {position}", (TOPIC_CREATED, TOPIC_REVOKED)))
    return ring


def create(app: Any, scope: str, unit: str | None) -> tuple[str, Key]:
    """A new key saved through the application (`Application.save`, the library's own command
    path for a new aggregate); returns the token (shown once) and the key."""
    check(scope, unit)
    token = new_token(scope, unit)
    aggregate = ApiKey(digest(token), token[:len(token) - 28] + "…", scope, unit)
    app.save(aggregate)
    key = Key(aggregate.id.hex, aggregate.prefix, scope, unit, aggregate.created_on.isoformat())
    return token, key


def revoke(app: Any, key_id: str) -> Key:
    ring = load(app)
    matches = [k for k in ring.all() if k.key_id.startswith(key_id.replace("-", "").lower())] if key_id else []
    if len(matches) != 1:
        raise ValueError(f"no key {key_id!r}" if not matches else f"key id {key_id!r} is ambiguous")
    key = matches[0]
    if key.revoked:
        raise ValueError(f"key {key.key_id} is already revoked")
    # ids as the recorder keeps them: uuid in PostgreSQL, hex text in SQLite (cdp/store.py)
    aggregate = app.repository.get(UUID(key.key_id) if app.store.is_postgres else key.key_id)
    aggregate.revoke()
    app.save(aggregate)
    return key
