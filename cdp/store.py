"""The system of record: an `eventsourcing` application whose recorder also keeps, in the same
transaction as the stored events, the small side tables the pipeline needs to stay idempotent and
to resume after a restart (the keys of ingested CloudEvents, the identity index).

SQLite in CDP_HOME by default; PostgreSQL when CDP_EVENT_STORE is a postgresql:// URL. The
recorder subclasses use the library's own hook for writing more in the same transaction
(`_insert_events(cursor, stored_events, **kwargs)`, as its process recorder does for tracking).
"""
from __future__ import annotations

import re
import sqlite3
from hashlib import blake2b
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import unquote, urlparse
from uuid import UUID

import orjson
from eventsourcing.application import Application
from eventsourcing.persistence import StoredEvent, Transcoder
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import get_topic
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

from cdp import writers
from cdp.config import Settings
from cdp.domain import Customer

EVENT_KEYS_DDL = "CREATE TABLE IF NOT EXISTS cdp_event_keys (key TEXT PRIMARY KEY, digest TEXT)"
SQLITE_CACHE_PAGES = -32768  # 32 MiB page cache for the writer: index pages of a large store stay hot
INSERT_EVENT_KEY = "INSERT INTO cdp_event_keys (key, digest) VALUES (?, ?)"
SELECT_EVENT_KEYS = "SELECT key, digest FROM cdp_event_keys"
LEGACY_KEY_SEPARATOR = "\x1f"  # keys before issue 14: source + \x1f + id, which could collide


class SeenKeys:
    """The keys of every ingested CloudEvent with the digest of what it said, in memory as a
    16-byte digest of the key -> 8-byte content digest (a third of the memory of the keys
    themselves for a million events); the store's table keeps the keys."""

    __slots__ = ("_digests",)

    def __init__(self, rows: Iterable[tuple[str, str | None]] = ()):
        self._digests: dict[bytes, bytes | None] = {}
        self.update(rows)

    @staticmethod
    def _digest(key: str) -> bytes:
        return blake2b(key.encode(), digest_size=16).digest()

    def __contains__(self, key: str) -> bool:
        return self._digest(key) in self._digests

    def content(self, key: str) -> str | None:
        """The content digest first stored under `key` (None: unknown, stored before digests)."""
        found = self._digests.get(self._digest(key))
        return found.hex() if found else None

    def add(self, key: str, digest: str | None = None) -> None:
        self._digests[self._digest(key)] = bytes.fromhex(digest) if digest else None

    def update(self, rows: Iterable[tuple[str, str | None]]) -> None:
        for key, digest in rows:
            self.add(key, digest)

    def __len__(self) -> int:
        return len(self._digests)


def migrate_event_keys(cursor: Any, is_postgres: bool) -> None:
    """Stores from before issue 14: adds the digest column and rewrites `source\x1fid` keys in the
    collision-free form (ingest.stage.event_key), splitting at the first separator."""
    from ingest.stage import event_key

    if is_postgres:
        cursor.execute("ALTER TABLE cdp_event_keys ADD COLUMN IF NOT EXISTS digest TEXT")
        cursor.execute("SELECT key FROM cdp_event_keys WHERE strpos(key, chr(31)) > 0")
    else:
        cursor.execute("PRAGMA table_info(cdp_event_keys)")
        if "digest" not in {row[1] for row in cursor.fetchall()}:
            cursor.execute("ALTER TABLE cdp_event_keys ADD COLUMN digest TEXT")
        cursor.execute("SELECT key FROM cdp_event_keys WHERE instr(key, char(31)) > 0")
    legacy = [row[0] if isinstance(row, (tuple, list)) else row["key"] for row in cursor.fetchall()]
    update = "UPDATE cdp_event_keys SET key = %s WHERE key = %s" if is_postgres else \
        "UPDATE cdp_event_keys SET key = ? WHERE key = ?"
    for old in legacy:
        source, _, event_id = old.partition(LEGACY_KEY_SEPARATOR)
        cursor.execute(update, (event_key(source, event_id), old))


class CompactJSONTranscoder(Transcoder):
    """orjson with the library's `{"_type_": …, "_data_": …}` convention for datetimes and UUIDs,
    so stored events stay readable by eventsourcing's own JSONTranscoder."""

    _decoders = {
        "datetime_iso": datetime.fromisoformat,
        "uuid_hex": UUID,
    }

    @staticmethod
    def _default(obj: Any) -> Any:
        if isinstance(obj, datetime):
            return {"_type_": "datetime_iso", "_data_": obj.isoformat()}
        if isinstance(obj, UUID):
            return {"_type_": "uuid_hex", "_data_": obj.hex}
        raise TypeError(f"cannot encode {type(obj).__name__}")

    def encode(self, obj: Any) -> bytes:
        return orjson.dumps(obj, default=self._default, option=orjson.OPT_PASSTHROUGH_DATETIME)

    def decode(self, data: bytes) -> Any:
        state = orjson.loads(data)
        for name, value in state.items():
            if type(value) is dict and len(value) == 2 and "_type_" in value:
                state[name] = self._decoders[value["_type_"]](value["_data_"])
        return state


def _side_writes(cursor: Any, kwargs: dict[str, Any], placeholder: str) -> None:
    """The pipeline's extra rows, written in the events' transaction: `writes=[(sql, rows), …]`."""
    for sql, rows in kwargs.get("writes", ()):
        if not rows:
            continue
        if placeholder == "?":
            cursor.executemany(sql, rows)
        elif (arrays := _as_arrays(sql, rows)) is not None:
            cursor.execute(*arrays)
        else:
            cursor.executemany(sql.replace("?", placeholder), rows)


_VALUES = re.compile(r"VALUES\s*\((\s*\?\s*(?:,\s*\?\s*)*)\)")
_ARRAY_TYPES = {str: "text", int: "bigint", float: "float8", bool: "boolean"}


def _as_arrays(sql: str, rows: list[tuple]) -> tuple[str, list[list]] | None:
    """PostgreSQL: `INSERT … VALUES (?, ?)` for many rows as one `INSERT … SELECT FROM unnest(arrays)`,
    one round trip and C-speed parameter dumping instead of a statement per row (None: not possible)."""
    types = [_ARRAY_TYPES.get(type(value)) for value in rows[0]]
    match = _VALUES.search(sql)
    if match is None or None in types or match.group(1).count("?") != len(types):
        return None
    unnest = "SELECT * FROM unnest(" + ", ".join(f"%b::{t}[]" for t in types) + ")"
    return sql[:match.start()] + unnest + sql[match.end():], [list(column) for column in zip(*rows)]


class SQLiteCustomerRecorder(SQLiteApplicationRecorder):
    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), EVENT_KEYS_DDL + " WITHOUT ROWID"]

    def _insert_events(self, c: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        # One executemany instead of the library's row-by-row loop: notification ids are not
        # needed here and SQLite's single writer keeps rowids in commit order.
        c.execute(f"PRAGMA cache_size = {SQLITE_CACHE_PAGES}")
        _side_writes(c, kwargs, "?")
        c.executemany(
            self.insert_events_statement,
            [(e.originator_id if type(e.originator_id) is str else e.originator_id.hex,
              e.originator_version, e.topic, e.state) for e in stored_events],
        )
        return None


class PostgresCustomerRecorder(PostgresApplicationRecorder):
    # The PostgreSQL recorders keep their DDL in `sql_create_statements` (there is no
    # `construct_create_table_statements` to override as for SQLite).
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.sql_create_statements.append(SQL(EVENT_KEYS_DDL))

    def _insert_events(self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        _side_writes(curs, kwargs, "%s")

    def _insert_stored_events(self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        # The library sends one composite value per event, dumped in Python; four arrays dump in C.
        # Same table lock and notification as the library (commit order = notification id order).
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(SQL(
            "INSERT INTO {}.{} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%b::{}[], %b::bigint[], %b::text[], %b::bytea[])").format(
                Identifier(self.datastore.schema), Identifier(self.events_table_name),
                Identifier(self.datastore.originator_id_type)),
            [[e.originator_id for e in stored_events], [e.originator_version for e in stored_events],
             [e.topic for e in stored_events], [e.state for e in stored_events]])

    def _fetch_ids_after_insert_events(self, curs: Any, stored_events: Sequence[StoredEvent],
                                       **kwargs: Any) -> None:
        return None  # the pipeline does not use the new notification ids


class CustomerApplication(Application):
    """The eventsourcing application that is the platform's system of record."""

    name = "cdp"

    def construct_transcoder(self) -> Transcoder:
        return CompactJSONTranscoder()


def store_environment(settings: Settings) -> dict[str, str]:
    """eventsourcing's own configuration keys, derived from the platform's settings."""
    if settings.event_store:
        url = urlparse(settings.event_store)
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "APPLICATION_RECORDER_TOPIC": get_topic(PostgresCustomerRecorder),
            "POSTGRES_DBNAME": url.path.lstrip("/") or "cdp",
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": unquote(url.username or "cdp"),
            "POSTGRES_PASSWORD": unquote(url.password or ""),
            "POSTGRES_POOL_SIZE": "4",
            "CREATE_TABLE": "y",
        }
    settings.home.mkdir(parents=True, exist_ok=True)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "APPLICATION_RECORDER_TOPIC": get_topic(SQLiteCustomerRecorder),
        "SQLITE_DBNAME": str(settings.sqlite_path),
        "SQLITE_LOCK_TIMEOUT": "30",
        "CREATE_TABLE": "y",
    }


@dataclass
class Batch:
    """Stored events and side rows that commit together or not at all."""

    events: list[StoredEvent] = field(default_factory=list)
    keys: list[tuple[str, str]] = field(default_factory=list)
    writes: list[tuple[str, list[tuple]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)


class EventStore:
    """Appends customer events fast, without rebuilding aggregates: the pipeline knows each
    customer's current version (`heads`) and writes the next events directly, one stored event
    per fact, in one transaction per batch."""

    def __init__(self, settings: Settings, side_tables: Sequence[str] = ()):
        self.settings = settings
        # PostgreSQL: `CREATE … IF NOT EXISTS` races when several workers start at once, so the
        # schema is created under the writers' lock
        self._lock = writers.WriterLock(settings.event_store) if settings.event_store else None
        with self._lock.held() if self._lock else nullcontext():
            self.app = CustomerApplication(env=store_environment(settings))
            self.recorder = self.app.recorder
            self.transcoder = self.app.mapper.transcoder
            self.is_postgres = isinstance(self.recorder, PostgresCustomerRecorder)
            with self.recorder.datastore.transaction(commit=True) as cursor:
                for ddl in side_tables:  # tables of the stages whose state commits with the events
                    cursor.execute(ddl)
                migrate_event_keys(cursor, self.is_postgres)
                if self.is_postgres:
                    writers.install(cursor, ["cdp_event_keys", *map(writers.table_name, side_tables)])
        self._window = (0, 0)  # cdp_seq range of the other writers' rows read by the last refresh
        self.load()
        self._topics = {cls: get_topic(cls) for cls in (
            Customer.Registered, Customer.SourceLinked, Customer.EventRecorded, Customer.Merged, Customer.Absorbed,
            Customer.Split, Customer.SplitOff, Customer.MatchSuggested, Customer.MatchConfirmed,
            Customer.MatchRejected, Customer.IdentifierIgnored)}
        self._customer_topic = get_topic(Customer)
        self._stamp: dict[str, str] = {}
        self._id = UUID if self.is_postgres else str  # SQLite stores hex text: skip building UUIDs
        self._reader: sqlite3.Connection | None = None

    def _heads_sql(self, after: int = 0) -> str:
        table = self.recorder.events_table_name
        if not self.is_postgres:
            return f"SELECT originator_id, MAX(originator_version) FROM {table} GROUP BY originator_id"
        # PostgreSQL keeps ids as uuid: read them back as the hex strings the pipeline uses
        return (f"SELECT replace(originator_id::text, '-', ''), MAX(originator_version) FROM {table} "
                f"WHERE notification_id > {int(after)} GROUP BY originator_id")

    # -- several writers (see cdp/writers.py) ------------------------------------------------

    def load(self) -> None:
        """(Re)reads heads and seen keys in full; marks taken first, so nothing falls in between."""
        self._mark = self._lock.last_change() if self._lock else 0
        self._position = self.max_position() if self._lock else 0
        self.heads: dict[str, int] = dict(self.query(self._heads_sql()))
        self.seen = SeenKeys(self.query(SELECT_EVENT_KEYS))

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Resolve and commit inside this block: on PostgreSQL it holds the writers' lock and first
        reads what other writers committed (then `changed()` returns their side-table rows)."""
        if self._lock is None:
            self._window = (0, 0)
            yield
            return
        with self._lock.held():
            mark, position = self._lock.last_change(), self.max_position()
            self._window = (self._mark, mark)
            if mark > self._mark:
                self.seen.update(self.changed(SELECT_EVENT_KEYS))
            if position > self._position:
                self.heads.update(self.query(self._heads_sql(self._position)))
            yield
            # our own commit is already in memory: skip it at the next refresh
            self._mark, self._position = self._lock.last_change(), self.max_position()

    def changed(self, select: str) -> list[tuple]:
        """Rows of `select` (one side table, no WHERE) other writers changed, as of the last refresh."""
        low, high = self._window
        if high <= low:
            return []
        return self.query(f"{select} WHERE cdp_seq > ? AND cdp_seq <= ?", (low, high))

    # -- reading ---------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Rows of a read-only query against the store's database (side tables, heads)."""
        if self.is_postgres:
            sql = sql.replace("?", "%s")
        with self.recorder.datastore.transaction(commit=False) as cursor:
            if self.is_postgres:
                cursor.row_factory = tuple_row  # the library's cursors make a dict per row
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        return [tuple(row) for row in rows]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """One write outside a batch, in its own transaction (a trained model, say)."""
        if self.is_postgres:
            sql = sql.replace("?", "%s")
        with self.recorder.datastore.transaction(commit=True) as cursor:
            cursor.execute(sql, params)

    def raw_notifications(self, after: int, limit: int) -> list[tuple[int, str, str, bytes]]:
        """(position, customer id hex, topic, state) after `after`, in order: the projector's input,
        read without building domain objects because the view parses the state in bulk."""
        table = self.recorder.events_table_name
        if self.is_postgres:
            sql = (f"SELECT notification_id, replace(originator_id::text, '-', ''), topic, state FROM {table} "
                   "WHERE notification_id > ? ORDER BY notification_id LIMIT ?")
            return self.query(sql, (after, limit))
        if self._reader is None:  # plain tuples, no Row objects: this read is the projector's hot path
            self._reader = sqlite3.connect(f"file:{self.settings.sqlite_path}?mode=ro", uri=True,
                                           check_same_thread=False)
        sql = f"SELECT rowid, originator_id, topic, state FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?"
        return self._reader.execute(sql, (after, limit)).fetchall()

    def max_position(self) -> int:
        return self.recorder.max_notification_id() or 0

    # -- writing ---------------------------------------------------------------------------

    def begin(self) -> Batch:
        # One recording time per batch, already in the transcoder's datetime form.
        self._stamp = {"_type_": "datetime_iso", "_data_": datetime.now(timezone.utc).isoformat()}
        return Batch()

    def append(self, batch: Batch, event_class: type, customer_id: str, **fields: Any) -> None:
        """Adds the customer's next event to the batch (and advances its head)."""
        version = self.heads.get(customer_id, 0) + 1
        self.heads[customer_id] = version
        state: dict[str, Any] = {"timestamp": self._stamp, **fields}
        if version == 1:
            state["originator_topic"] = self._customer_topic
        batch.events.append(
            StoredEvent(
                originator_id=self._id(customer_id),
                originator_version=version,
                topic=self._topics[event_class],
                state=self.transcoder.encode(state),
            )
        )

    def mark_seen(self, batch: Batch, key: str, digest: str | None = None) -> None:
        self.seen.add(key, digest)
        batch.keys.append((key, digest or ""))  # text, never NULL: PostgreSQL inserts by unnest

    def commit(self, batch: Batch) -> None:
        if not batch.events and not batch.keys:
            return
        writes = [(INSERT_EVENT_KEY, batch.keys), *batch.writes]
        self.recorder.insert_events(batch.events, writes=writes)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
        if self._reader is not None:
            self._reader.close()
        self.app.close()
