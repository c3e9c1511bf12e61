"""Crypto-shredding: the personal data in stored events is encrypted with a data key per source
record, so erasing a person (destroying their records' keys) makes an append-only log forget them.

Why per source record and not per customer: merges and splits move source records between
customers; a record's events always stay together, so a customer's data is exactly the data of its
records, whatever the identity decisions were.

* Data keys are 256-bit AES-GCM keys in the `cdp_data_keys` table of the store, beside (not in) the
  event log, wrapped by the master key and named by a keyed hash of the record (`key_id`), so the
  table holds no identifier in the clear.
* The master key comes from CDP_MASTER_KEY (64 hex digits or base64 of 32 bytes) or from the key
  file `CDP_HOME/master.key`, created on first use with 0600 permissions.
* A stored event's personal fields (SEALED_FIELDS) are taken out of its state and stored as one
  last field `"sealed":"<key_id>.<base64 nonce+ciphertext>"`; `unseal` splices them back (bytes
  work, no JSON parse), or leaves them out when the key was destroyed.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cdp.config import ConfigError
from cdp.keyfiles import read_or_create
from cdp.contracts import stored_events as topics

KEY_TABLE = "CREATE TABLE IF NOT EXISTS cdp_data_keys (key_id TEXT PRIMARY KEY, wrapped BLOB NOT NULL)"
KEY_TABLE_POSTGRES = KEY_TABLE.replace("BLOB", "BYTEA")
INSERT_KEY = "INSERT INTO cdp_data_keys (key_id, wrapped) VALUES (?, ?)"
DELETE_KEY = "DELETE FROM cdp_data_keys WHERE key_id = ?"
SELECT_KEYS = "SELECT key_id, wrapped FROM cdp_data_keys"
SELECT_KEY_IDS = "SELECT key_id FROM cdp_data_keys"

# The personal fields of each stored event type (top-level fields of its state).
SEALED_FIELDS: dict[str, tuple[str, ...]] = {
    topics.EVENT_RECORDED: ("profile", "data"),
    topics.SOURCE_LINKED: ("evidence",),
    topics.MERGED: ("evidence",),
    topics.MATCH_SUGGESTED: ("evidence",),
    topics.IDENTIFIER_IGNORED: ("value",),
}
MARK = b',"sealed":"'
NONCE = 12


# The store's own master-key rows: `check` (a keyed hash that tells a wrong CDP_MASTER_KEY from the
# right one) and, for a PostgreSQL store without CDP_MASTER_KEY, `key` (the one master key of all
# the writers, whose CDP_HOMEs differ; README: set CDP_MASTER_KEY so it is not beside the data).
MASTER_TABLE = "CREATE TABLE IF NOT EXISTS cdp_master (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
INSERT_MASTER = "INSERT INTO cdp_master (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
SELECT_MASTER = "SELECT value FROM cdp_master WHERE name = ?"


def new_master_text() -> str:
    return base64.b64encode(AESGCM.generate_key(256)).decode()


def check_value(master: bytes) -> str:
    return hashlib.blake2b(b"cdp master key check", key=master, digest_size=16).hexdigest()


def customer_key(customer_id: str) -> str:
    """The key name of data about a customer rather than one record (a merge's evidence)."""
    return f"customer:{customer_id}"


def load_master_key(env_value: str | None, key_file: Path) -> bytes:
    """The 32-byte master key: CDP_MASTER_KEY if set, else the key file (created 0600 if missing)."""
    if env_value:
        text = env_value.strip()
        try:
            key = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError("CDP_MASTER_KEY: expected 32 bytes as 64 hex digits or base64")
        return key
    key = base64.b64decode(read_or_create(key_file, lambda key: base64.b64encode(key).decode()))
    if len(key) != 32:
        raise ConfigError(f"{key_file}: not a master key (expected base64 of 32 bytes)")
    return key


class KeyRing:
    """Data keys of source records: created when a record is first seen (their wrapped form
    commits with the events that use them), looked up by `key_id`, destroyed on erasure.

    `fetch(ids)` returns the stored (key_id, wrapped) rows among `ids`."""

    def __init__(self, master: bytes, fetch: Callable[[Sequence[str]], list[tuple]]):
        self._master = AESGCM(master)
        self._hash_key = hmac.new(master, b"cdp key ids", hashlib.sha256).digest()
        self._suppress_key = hmac.new(master, b"cdp suppression", hashlib.sha256).digest()
        self._fetch = fetch
        self._keys: dict[str, AESGCM | None] = {}
        self._stored: set[bytes] | None = None  # ids of the stored keys (16 bytes each), when known
        self._by_source: dict[str, tuple[str, AESGCM]] = {}  # source record -> its key, once used here
        self._nonces, self._next_nonce = b"", 0

    # -- names ---------------------------------------------------------------------------------

    def key_id(self, source_key: str) -> str:
        """The keyed hash naming a source record's data key (no identifier in the clear); keyed
        BLAKE2b, a MAC in one call (several times cheaper than HMAC on the ingest path)."""
        return hashlib.blake2b(source_key.encode(), key=self._hash_key, digest_size=16).hexdigest()

    def fingerprint(self, kind: str, value: str) -> str:
        """The keyed hash an erased identifier is suppressed by."""
        return hashlib.blake2b(f"{kind}\x1f{value}".encode(), key=self._suppress_key, digest_size=32).hexdigest()

    # -- keys ----------------------------------------------------------------------------------

    def forget(self, stored_ids: Iterable[str] | None = None) -> None:
        """Drops the cached keys (after a failed commit or an erasure); `stored_ids`, when given,
        are the ids of every stored key, so a writer asks the store only for keys that exist."""
        self._keys.clear()
        self._by_source.clear()
        self._stored = None if stored_ids is None else {bytes.fromhex(k) for k in stored_ids}

    def take_in(self, stored_ids: Iterable[str]) -> None:
        """Ids of keys other writers stored since our last look (they exist: read them when needed)."""
        if self._stored is not None:
            for key_id in stored_ids:
                self._stored.add(bytes.fromhex(key_id))
                if self._keys.get(key_id, 0) is None:
                    del self._keys[key_id]

    def prepare(self, source_keys: Iterable[str]) -> None:
        """Caches the keys a batch of records will seal with, in one read of the store."""
        wanted = {self.key_id(s) for s in source_keys}
        self.load(k for k in wanted if k not in self._keys)

    def _unwrap(self, key_id: str, wrapped: bytes) -> AESGCM:
        return AESGCM(self._master.decrypt(bytes(wrapped[:NONCE]), bytes(wrapped[NONCE:]), key_id.encode()))

    def load(self, key_ids: Iterable[str], writing: bool = True) -> None:
        """Makes sure the keys among `key_ids` are cached (None: no such key, e.g. destroyed).
        Writing, the ids of the stored keys (taken in under the writers' lock) spare reads of keys
        that do not exist; reading (the view), a key not held may have been stored by another
        writer since, so it is asked for again."""
        keys = self._keys
        missing = [k for k in set(key_ids) if (k not in keys if writing else keys.get(k) is None)]
        if writing and self._stored is not None:  # keys that do not exist need no read
            for key_id in missing:
                if bytes.fromhex(key_id) not in self._stored:
                    self._keys[key_id] = None
            missing = [k for k in missing if self._keys.get(k, 0) is not None]
        if not missing:
            return
        found = {key_id: wrapped for key_id, wrapped in self._fetch(missing)}
        for key_id in missing:
            wrapped = found.get(key_id)
            self._keys[key_id] = None if wrapped is None else self._unwrap(key_id, wrapped)

    def _nonce(self) -> bytes:
        """A fresh random nonce, cut from a block read from the OS now and then (one read per
        thousands of events instead of one per event)."""
        at = self._next_nonce
        if at + NONCE > len(self._nonces):
            self._nonces, at = os.urandom(NONCE * 4096), 0
        self._next_nonce = at + NONCE
        return self._nonces[at:at + NONCE]

    def key_for(self, source_key: str, new_rows: list[tuple]) -> tuple[str, AESGCM]:
        """The record's key, created (its wrapped row added to `new_rows`) when it has none."""
        known = self._by_source.get(source_key)
        if known is not None:
            return known
        key_id = self.key_id(source_key)
        if key_id not in self._keys:
            self.load([key_id])
        aead = self._keys[key_id]
        if aead is None:
            raw = AESGCM.generate_key(256)
            nonce = os.urandom(NONCE)
            new_rows.append((key_id, nonce + self._master.encrypt(nonce, raw, key_id.encode())))
            aead = self._keys[key_id] = AESGCM(raw)
            if self._stored is not None:
                self._stored.add(bytes.fromhex(key_id))
        self._by_source[source_key] = (key_id, aead)
        return key_id, aead

    # -- sealing -------------------------------------------------------------------------------

    def seal(self, topic: str, source_key: str, fields: dict[str, Any], new_rows: list[tuple]) -> dict[str, Any]:
        """`fields` with the topic's personal fields replaced by one last `sealed` field."""
        names = SEALED_FIELDS.get(topic)
        if not names:
            return fields
        personal = {name: fields.pop(name) for name in names if name in fields}
        key_id, aead = self.key_for(source_key, new_rows)
        nonce = self._nonce()
        box = aead.encrypt(nonce, orjson.dumps(personal), key_id.encode())
        fields["sealed"] = key_id + "." + base64.b64encode(nonce + box).decode()
        return fields

    def unseal(self, states: Sequence[bytes]) -> list[bytes]:
        """Stored states with their sealed fields spliced back in (left out where the key is gone)."""
        cuts = [state.rfind(MARK) if state[-2:] == b'"}' else -1 for state in states]
        self.load((state[cut + len(MARK):cut + len(MARK) + 32].decode()
                   for state, cut in zip(states, cuts) if cut >= 0), writing=False)
        keys, out = self._keys, []
        for state, cut in zip(states, cuts):
            if cut < 0:
                out.append(state)
                continue
            start = cut + len(MARK)
            key_id = state[start:start + 32].decode()
            aead = keys.get(key_id)
            if aead is None:
                out.append(state[:cut] + b"}")
                continue
            blob = base64.b64decode(state[start + 33:-2])
            try:
                personal = aead.decrypt(blob[:NONCE], blob[NONCE:], key_id.encode())
            except InvalidTag:  # sealed by a destroyed key; the record came back with a new one
                out.append(state[:cut] + b"}")
                continue
            out.append(state[:cut] + b"," + personal[1:] if len(personal) > 2 else state[:cut] + b"}")
        return out
