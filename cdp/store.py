"""The event store's fast write path and its reads, on the recorder of the eventsourcing
application (cdp/application.py), which is the only thing that uses it.

Beside the stored events, one transaction also writes the small side tables the platform needs
to stay idempotent and to resume after a restart (the keys of ingested CloudEvents, the identity
resolver's state). The store writes through the library's public surface only: the datastore's
`transaction()`, the recorder's table name, insert statement (SQLite), table-lock statements and
notification channel (PostgreSQL); it neither overrides nor calls the recorders' underscore
methods, so a new library version cannot silently skip a part of the write.

SQLite in CDP_HOME by default; PostgreSQL when CDP_EVENT_STORE is a postgresql:// URL (the driver
is the `postgres` extra and is imported only then).
"""
from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from hashlib import blake2b
from importlib.util import find_spec
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import unquote, urlparse
from uuid import UUID

import orjson
from eventsourcing.persistence import StoredEvent, Transcoder

from cdp import faults, shredding, store_identity, writers
from cdp.config import ConfigError, Settings

EVENT_KEYS_DDL = "CREATE TABLE IF NOT EXISTS cdp_event_keys (key TEXT PRIMARY KEY, digest TEXT)"
# Other sessions of the server holding back what VACUUM FULL may drop, as of the transaction id
# given: a snapshot older than it (backend_xmin), or a transaction begun before it (backend_xid),
# which an idle transaction that has written keeps without a snapshot; in any database of the server
# (tested on PostgreSQL 15: a transaction left open in another database kept a deleted row in the new file)
OLDER_SNAPSHOTS = ("SELECT count(*) FROM pg_stat_activity "
                   "WHERE pid <> pg_backend_pid() AND (age(backend_xmin) > age(%(now)s::xid) "
                   "OR age(backend_xid) > age(%(now)s::xid))")
SCRUB_LOCK_TIMEOUT_MS = 10_000  # PostgreSQL: how long scrub's VACUUM FULL waits for a table another session holds
# … and when it tries again a table an erasure left (cdp/erasure.py, retry_left_tables): long enough
# for a table free of other sessions, short enough that the command or server that tries waits little
SCRUB_RETRY_PATIENCE_MS = 250
# The tables of `names` this role may VACUUM: owned by a role it is a member of, or in a database
# it owns, or any as a superuser (VACUUM skips the others with a warning)
MAY_VACUUM = ("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
              "WHERE c.relname = ANY(%s) AND c.relkind = 'r' AND n.nspname = current_schema() "
              "AND (pg_has_role(c.relowner, 'MEMBER') "
              "OR pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'MEMBER') "
              "OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user))")
UNTHROTTLED_VACUUM = "autovacuum_vacuum_cost_delay=0"  # the events table's option (EventStore._unthrottle_vacuum)
EVENTS_STATISTICS_TARGET = 10  # per column of the events table: ANALYZE samples 300 x this many rows (_light_analyze)
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
    collision-free form (ingest.stage.event_key), splitting at the first separator. Both happen in
    one transaction, so a store that has the column is migrated: its keys are not scanned again
    (a scan of every key cost each command 0.5 s on a store of 1,000,000 events)."""
    from ingest.stage import event_key

    if is_postgres:
        cursor.execute("SELECT count(*) AS n FROM information_schema.columns WHERE table_schema = current_schema() "
                       "AND table_name = 'cdp_event_keys' AND column_name = 'digest'")
        row = cursor.fetchone()
        if (row["n"] if isinstance(row, dict) else row[0]) > 0:
            return
        cursor.execute("ALTER TABLE cdp_event_keys ADD COLUMN IF NOT EXISTS digest TEXT")
        cursor.execute("SELECT key FROM cdp_event_keys WHERE strpos(key, chr(31)) > 0")
    else:
        cursor.execute("PRAGMA table_info(cdp_event_keys)")
        if "digest" in {row[1] for row in cursor.fetchall()}:
            return
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

    # Set by the application (cdp/shredding.py KeyRing.unseal): stored states with their sealed
    # personal fields decrypted, so the library's own reads (repository.get) see them.
    unseal: Any = None

    def decode(self, data: bytes) -> Any:
        if self.unseal is not None:
            data = self.unseal([data])[0]
        state = orjson.loads(data)
        for name, value in state.items():
            if type(value) is dict and len(value) == 2 and "_type_" in value:
                state[name] = self._decoders[value["_type_"]](value["_data_"])
        return state


def _side_writes(cursor: Any, writes: Sequence[tuple[str, list[tuple]]], placeholder: str) -> None:
    """Extra rows written in the events' transaction: `[(sql with ? placeholders, rows), …]`."""
    for sql, rows in writes:
        if not rows:
            continue
        if placeholder == "?":
            cursor.executemany(sql, rows)
        elif (arrays := _as_arrays(sql, rows)) is not None:
            cursor.execute(*arrays)
        else:
            cursor.executemany(sql.replace("?", placeholder), rows)


_VALUES = re.compile(r"VALUES\s*\((\s*\?\s*(?:,\s*\?\s*)*)\)")
_ARRAY_TYPES = {str: "text", int: "bigint", float: "float8", bool: "boolean", bytes: "bytea"}


def _as_arrays(sql: str, rows: list[tuple]) -> tuple[str, list[list]] | None:
    """PostgreSQL: `INSERT … VALUES (?, ?)` for many rows as one `INSERT … SELECT FROM unnest(arrays)`,
    one round trip and C-speed parameter dumping instead of a statement per row (None: not possible)."""
    types = [_ARRAY_TYPES.get(type(value)) for value in rows[0]]
    match = _VALUES.search(sql)
    if match is None or None in types or match.group(1).count("?") != len(types):
        return None
    unnest = "SELECT * FROM unnest(" + ", ".join(f"%b::{t}[]" for t in types) + ")"
    return sql[:match.start()] + unnest + sql[match.end():], [list(column) for column in zip(*rows)]


def store_environment(settings: Settings) -> dict[str, str]:
    """eventsourcing's own configuration keys, derived from the platform's settings (the library
    reads nothing else: see CustomerApplication.construct_env)."""
    if settings.event_store:
        require_postgres_driver()
        url = urlparse(settings.event_store)
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": url.path.lstrip("/") or "cdp",
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": unquote(url.username or "cdp"),
            "POSTGRES_PASSWORD": unquote(url.password or ""),
            "POSTGRES_POOL_SIZE": "4",
            "POSTGRES_CONNECT_TIMEOUT": "5",  # an unreachable server fails fast; the worker waits it out
            # EventStore.commit writes the rows itself, never through the library's stored
            # functions; said explicitly so that no other setting turns them on
            "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
            "CREATE_TABLE": "y",
        }
    settings.home.mkdir(parents=True, exist_ok=True)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": str(settings.sqlite_path),
        "SQLITE_LOCK_TIMEOUT": "30",
        "CREATE_TABLE": "y",
    }


def require_postgres_driver() -> None:
    """PostgreSQL support is the `postgres` extra: a plain install runs the embedded default."""
    if find_spec("psycopg") is None or find_spec("psycopg_pool") is None:
        raise ConfigError("CDP_EVENT_STORE is a postgresql:// URL but the PostgreSQL driver is not installed: "
                          "pip install 'cdp[postgres]'")


@dataclass
class Batch:
    """Stored events and side rows that commit together or not at all."""

    events: list[StoredEvent] = field(default_factory=list)
    keys: list[tuple[str, str]] = field(default_factory=list)
    data_keys: list[tuple[str, bytes]] = field(default_factory=list)  # new wrapped data keys (cdp/shredding.py)
    writes: list[tuple[str, list[tuple]]] = field(default_factory=list)
    audited: bool = False  # the audit log's head was read for this batch

    def __len__(self) -> int:
        return len(self.events)


class EventStore:
    """Appends customer events fast, without rebuilding aggregates: the application knows each
    customer's current version (`heads`) and writes the next events directly, one stored event
    per fact, in one transaction per batch.

    `recorder` and `transcoder` are the application's; `lock` is the writers' lock (PostgreSQL)
    or None. Run the constructor under that lock: it creates the side tables."""

    def __init__(self, recorder: Any, transcoder: Transcoder, settings: Settings,
                 lock: "writers.WriterLock | None", side_tables: Sequence[str] = ()):
        self.settings = settings
        self.where = faults.postgres_address(settings) if settings.event_store else str(settings.sqlite_path)
        self.recorder = recorder
        self.transcoder = transcoder
        self._lock = lock
        self.is_postgres = settings.event_store is not None
        keys_ddl = EVENT_KEYS_DDL if self.is_postgres else EVENT_KEYS_DDL + " WITHOUT ROWID"
        tables = (keys_ddl, *side_tables)
        with self.recorder.datastore.transaction(commit=True) as cursor:
            for ddl in tables:  # tables of the stages whose state commits with the events
                cursor.execute(ddl)
            migrate_event_keys(cursor, self.is_postgres)
            if self.is_postgres:
                writers.install(cursor, list(map(writers.table_name, tables)))
                self._unthrottle_vacuum(cursor)
                self._light_analyze(cursor)
            self.store_id = store_identity.ensure(cursor, "%s" if self.is_postgres else "?", self.where)
        if self.is_postgres:
            self._insert_events_sql, self._notify_sql = self._postgres_statements()
        else:
            self._insert_events_sql = recorder.insert_events_statement
        self._window = (0, 0)  # cdp_seq range of the other writers' rows read by the last refresh
        self._mark = self._position = 0
        self._loaded = False  # whether heads and seen keys were read (load): a command that needs neither skips them
        self.heads: dict[str, int] = {}
        self.seen = SeenKeys()
        self._stamp: dict[str, str] = {}
        self._id = UUID if self.is_postgres else str  # SQLite stores hex text: skip building UUIDs
        self._reader: sqlite3.Connection | None = None

    def _unthrottle_vacuum(self, cursor: Any) -> None:
        """PostgreSQL's autovacuum takes an insert-only events table about once a minute while events
        stream in, and holds a lock that the EXCLUSIVE table lock of every insert (_insert_postgres)
        waits for. Throttled as autovacuum is by default, it ran until that wait reached
        deadlock_timeout (1 s) and was cancelled: a one-second stall of the stream every minute,
        and a vacuum that never finished (bench.visible, 300 s: the p99 spikes came once a minute,
        PostgreSQL's log naming the wait). Unthrottled, it finishes within the wait. A table option,
        so the owner of the table (the role in CDP_EVENT_STORE, which created it) sets it, once."""
        schema, table = self.recorder.datastore.schema, self.recorder.events_table_name
        cursor.execute("SELECT coalesce(reloptions, '{}') AS options FROM pg_class c JOIN pg_namespace n "
                       "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s", [schema, table])
        row = cursor.fetchone()  # the library's connections give rows as dicts
        if row is not None and UNTHROTTLED_VACUUM not in row["options"]:
            from psycopg.sql import SQL, Identifier

            cursor.execute(SQL("ALTER TABLE {}.{} SET ({})").format(Identifier(schema), Identifier(table),
                                                                    SQL(UNTHROTTLED_VACUUM)))

    def _light_analyze(self, cursor: Any) -> None:
        """The automatic ANALYZE of the events table, which runs once a minute or so while events
        stream in, holds the same lock as a vacuum, and every insert waits for it. With the default
        statistics target it samples 30,000 rows: 0.36-0.43 s in PostgreSQL's log in a 600 s
        bench.visible run, matched by the worker's commits that took 0.37-0.45 s at those times.
        The store reads that table by its keys alone (notification id ranges, an aggregate's
        events by id), which no column statistics steer; a target of 10 per column samples 3,000
        rows (an 800,000-event table: 0.12 -> 0.01 s). Set once, by the owner, like the option above."""
        schema, table = self.recorder.datastore.schema, self.recorder.events_table_name
        cursor.execute("SELECT a.attname AS name FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                       "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
                       "AND a.attnum > 0 AND NOT a.attisdropped AND a.attstattarget IS DISTINCT FROM %s",
                       [schema, table, EVENTS_STATISTICS_TARGET])
        columns = [row["name"] for row in cursor.fetchall()]
        if columns:
            from psycopg.sql import SQL, Identifier, Literal

            target = Literal(EVENTS_STATISTICS_TARGET)
            cursor.execute(SQL("ALTER TABLE {}.{} ").format(Identifier(schema), Identifier(table)) + SQL(", ").join(
                SQL("ALTER COLUMN {} SET STATISTICS {}").format(Identifier(column), target) for column in columns))

    def _postgres_statements(self) -> tuple[Any, Any]:
        """The INSERT of a batch of stored events and the NOTIFY of the recorder's channel. The
        library sends one composite value per event, dumped in Python; four arrays dump in C."""
        from psycopg.sql import SQL, Identifier

        notify = SQL("NOTIFY {}").format(Identifier(self.recorder.channel_name))
        return SQL("INSERT INTO {}.{} (originator_id, originator_version, topic, state) "
                   "SELECT * FROM unnest(%b::{}[], %b::bigint[], %b::text[], %b::bytea[])").format(
            Identifier(self.recorder.datastore.schema), Identifier(self.recorder.events_table_name),
            Identifier(self.recorder.datastore.originator_id_type)), notify

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
        self._loaded = True

    @property
    def position(self) -> int:
        """PostgreSQL: the store position as of the last load or refresh (0 on SQLite)."""
        return self._position

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Resolve and commit inside this block: on PostgreSQL it holds the writers' lock and first
        reads what other writers committed (then `changed()` returns their side-table rows). Heads
        and seen keys are brought up to date only once loaded: before, this read all of them, for a
        command that needs neither (an erasure on PostgreSQL: 2.3 of its 2.4 s on a million events)."""
        if self._lock is None:
            self._window = (0, 0)
            yield
            return
        with self._lock.held():
            mark, position = self._lock.last_change(), self.max_position()
            self._window = (self._mark, mark)
            if self._loaded and mark > self._mark:
                self.seen.update(self.changed(SELECT_EVENT_KEYS))
            if self._loaded and position > self._position:
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
                from psycopg.rows import tuple_row

                cursor.row_factory = tuple_row  # the library's cursors make a dict per row
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        return [tuple(row) for row in rows]

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

    def head(self, customer_id: str) -> int:
        """One customer's current version, read from the store (a command that needs no other head)."""
        table = self.recorder.events_table_name
        return self.query(f"SELECT COALESCE(MAX(originator_version), 0) FROM {table} WHERE originator_id = ?",
                          (self._id(customer_id),))[0][0]

    def stream(self, originator_id: str) -> list[tuple[int, bytes]]:
        """(version, state) of one aggregate's events, in order (read by its primary key)."""
        table = self.recorder.events_table_name
        return self.query(f"SELECT originator_version, state FROM {table} WHERE originator_id = ? "
                          "ORDER BY originator_version", (self._id(originator_id),))

    def scrub(self, tables: Sequence[str] = (), patience_ms: int | None = None) -> list[str]:
        """Leaves the rows deleted from `tables` nowhere in the store's files; returns the tables
        it could not rewrite.

        SQLite deletes with `secure_delete` (freed pages hold zeros): the write-ahead log, which
        still holds the rows, is moved into the file and truncated. PostgreSQL keeps deleted rows
        in dead tuples until their space is reused, and a plain VACUUM only marks it reusable:
        `VACUUM FULL` writes each table and its indexes into new files and drops the old ones.
        That holds the table exclusively (the five an erasure deletes from: 0.9 s on 1,005,500
        events), so it runs under the writers' lock, between their batches, once no session reads
        as of a snapshot that still sees the deleted rows; a table held longer than
        `patience_ms` (SCRUB_LOCK_TIMEOUT_MS unless said: a long read), or that the role may not
        vacuum, is left (all of them while such a snapshot lasts longer)."""
        if self.is_postgres:
            return self._rewrite_tables(tables, SCRUB_LOCK_TIMEOUT_MS if patience_ms is None else patience_ms)
        with sqlite3.connect(self.settings.sqlite_path, timeout=30) as con:
            for _ in range(50):
                busy, *_ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if not busy:
                    break
                time.sleep(0.05)
        return []

    def may_rewrite(self, tables: Sequence[str]) -> list[str]:
        """The tables of `tables` that scrub can rewrite once no session holds them: the others
        (not this role's to vacuum, or gone) stay as they are whatever is tried again."""
        if not self.is_postgres or not tables:
            return list(tables)
        try:
            with self._lock.connect() as conn:
                allowed = {name for (name,) in conn.execute(MAY_VACUUM, (list(tables),)).fetchall()}
        except Exception:  # noqa: BLE001 - the database out of reach: it may well be the role's
            return list(tables)
        return [table for table in tables if table in allowed]

    def _rewrite_tables(self, tables: Sequence[str], patience_ms: int) -> list[str]:
        """VACUUM FULL of each table (scrub), on a connection of its own like the writers' lock's (a
        pooled one may be stale, and keeps no setting of this one); returns the tables not
        rewritten. Nothing here fails the erasure, which stands once committed: a table that errs,
        or the database gone meanwhile, is said to be left, as one that is busy or not the role's is."""
        import psycopg
        from psycopg.sql import SQL, Identifier

        done: list[str] = []
        warnings: list[Any] = []  # PostgreSQL skips a table the role may not vacuum with a warning, not an error
        try:
            with self._lock.held(), self._lock.connect() as conn:  # PostgreSQL: the application always gives one
                conn.add_notice_handler(warnings.append)
                if not self._snapshots_past(conn, patience_ms):
                    return list(tables)
                conn.execute(SQL("SET lock_timeout = {}").format(patience_ms))
                for table in tables:
                    before = len(warnings)
                    try:
                        conn.execute(SQL("VACUUM FULL {}").format(Identifier(table)))
                    except psycopg.DatabaseError:  # busy past lock_timeout, or no such table
                        if conn.broken:
                            raise
                        continue
                    if len(warnings) == before:
                        done.append(table)
        except psycopg.Error:
            pass  # the database went away: what was not rewritten is left, and said
        return [table for table in tables if table not in done]

    @staticmethod
    def _snapshots_past(conn: Any, patience_ms: int) -> bool:
        """Waits, up to `patience_ms`, until no other session of the server reads as of a
        snapshot taken before now (before the erasure committed), nor runs a transaction begun
        before it: VACUUM FULL copies the deleted rows such a session may still see into the new
        files (a read of the server's, an automatic ANALYZE, a transaction left open). False when
        one still does."""
        now = conn.execute("SELECT (pg_current_xact_id()::text::bigint % 4294967296)::text").fetchone()[0]
        deadline = time.monotonic() + patience_ms / 1000
        while conn.execute(OLDER_SNAPSHOTS, {"now": now}).fetchone()[0]:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # -- writing ---------------------------------------------------------------------------

    def begin(self) -> Batch:
        # One recording time per batch, already in the transcoder's datetime form.
        self._stamp = {"_type_": "datetime_iso", "_data_": datetime.now(timezone.utc).isoformat()}
        return Batch()

    def append(self, batch: Batch, topic: str, aggregate_id: str, /, **fields: Any) -> None:
        """Adds the aggregate's next event (`topic`: one of cdp.contracts.stored_events or
        .audience_events; `aggregate_id`: a customer's id, or another aggregate's) to the batch and
        advances its head."""
        version = self.heads.get(aggregate_id, 0) + 1
        self.heads[aggregate_id] = version
        state: dict[str, Any] = {"timestamp": self._stamp}
        if version == 1:
            state["originator_topic"] = topic.rsplit(".", 1)[0]  # the event class's aggregate
        state.update(fields)  # in the given order: a sealed field stays last (cdp/shredding.py)
        batch.events.append(
            StoredEvent(
                originator_id=self._id(aggregate_id),
                originator_version=version,
                topic=topic,
                state=self.transcoder.encode(state),
            )
        )

    def mark_seen(self, batch: Batch, key: str, digest: str | None = None) -> None:
        self.seen.add(key, digest)
        batch.keys.append((key, digest or ""))  # text, never NULL: PostgreSQL inserts by unnest

    def commit(self, batch: Batch) -> None:
        """Writes the batch in one transaction: side rows first, then the stored events."""
        writes = [(INSERT_EVENT_KEY, batch.keys), (shredding.INSERT_KEY, batch.data_keys), *batch.writes]
        if not batch.events and not any(rows for _, rows in writes):
            return
        with self.recorder.datastore.transaction(commit=True) as cursor:
            if self.is_postgres:
                _side_writes(cursor, writes, "%s")
                if batch.events:
                    self._insert_postgres(cursor, batch.events)
            else:
                cursor.execute(f"PRAGMA cache_size = {SQLITE_CACHE_PAGES}")
                cursor.execute("PRAGMA secure_delete = ON")  # deleted or overwritten rows leave zeros (erasure)
                _side_writes(cursor, writes, "?")
                # notification ids are not needed, and SQLite's single writer keeps rowids in commit order
                cursor.executemany(self._insert_events_sql, [
                    (e.originator_id if type(e.originator_id) is str else e.originator_id.hex,
                     e.originator_version, e.topic, e.state) for e in batch.events])

    def _insert_postgres(self, cursor: Any, events: Sequence[StoredEvent]) -> None:
        # As the library does: the table lock makes commit order equal notification id order (so
        # readers never pass a gap filled later), and listeners on the channel are notified.
        for statement in self.recorder.lock_table_statements:
            cursor.execute(statement)
        cursor.execute(self._notify_sql)
        cursor.execute(self._insert_events_sql, [
            [e.originator_id for e in events], [e.originator_version for e in events],
            [e.topic for e in events], [e.state for e in events]])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
