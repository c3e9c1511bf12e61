"""Which store this is: an id drawn when the store is created, so that whatever keeps a position
in it elsewhere (the workers' consumer group offsets on the broker, which carry it in their commit
metadata) can tell when it is pointed at another store, e.g. a fresh database after a reset.

`cdp_store` holds one row: the id, the schema version and when it was created; it is written in
the same transaction as the store's tables (cdp/store.py).
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from cdp.faults import StoreMismatch

SCHEMA_VERSION = 1  # bump when the store's tables change in a way older code cannot read
DDL = ("CREATE TABLE IF NOT EXISTS cdp_store (store_id TEXT NOT NULL, schema_version INTEGER NOT NULL, "
       "created_at TEXT NOT NULL)")
METADATA_PREFIX = "cdp-store="


def ensure(cursor: Any, placeholder: str, where: str) -> str:
    """The store's id, created on the first call; refuses a store a newer cdp wrote."""
    cursor.execute(DDL)
    cursor.execute("SELECT store_id, schema_version FROM cdp_store")
    row = cursor.fetchone()
    if row is None:
        store_id = uuid.uuid4().hex
        cursor.execute(f"INSERT INTO cdp_store VALUES ({placeholder}, {placeholder}, {placeholder})",
                       (store_id, SCHEMA_VERSION, datetime.now(timezone.utc).isoformat()))
        return store_id
    store_id, version = row.values() if isinstance(row, dict) else tuple(row)
    if version > SCHEMA_VERSION:
        raise StoreMismatch(f"the event store at {where} has schema version {version}, this cdp knows "
                            f"up to {SCHEMA_VERSION}: upgrade cdp to the version the other writers run")
    if version < SCHEMA_VERSION:  # the idempotent DDL run just before brought the tables up to date
        cursor.execute(f"UPDATE cdp_store SET schema_version = {placeholder}", (SCHEMA_VERSION,))
    return store_id


def metadata(store_id: str) -> str:
    """What the worker writes beside each committed offset."""
    return METADATA_PREFIX + store_id


def owner(metadata_text: str | None) -> str | None:
    """The store id in an offset's commit metadata (None: not written by this version)."""
    if metadata_text and metadata_text.startswith(METADATA_PREFIX):
        return metadata_text[len(METADATA_PREFIX):]
    return None
