"""Several writers on one PostgreSQL event store without races (cdp worker ×N, cdp ingest).

Every writer keeps in memory what it needs to resolve a batch (identity index, customers' heads,
seen event keys). Two rules keep those copies honest:

* **one writer at a time**: a batch is resolved and committed while holding a PostgreSQL advisory
  lock (`pg_advisory_lock` on a connection of its own, so a killed process releases it with its
  connection);
* **refresh before resolving**: right after taking the lock, the writer reads what the others
  committed since its last look. Side tables carry a `cdp_seq` column filled from one sequence by
  a trigger on every insert and update; since sequence values are drawn under the lock, the rows
  with `cdp_seq` above the last value seen are exactly the other writers' changes. Heads come from
  stored events after the last notification id seen.

SQLite has a single writer per file anyway: there the lock is a no-op and nothing is refreshed.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

LOCK_KEY = 0x0CD9_0001  # the advisory lock all writers of one database agree on
SEQUENCE = "cdp_change_seq"
CONNECT_TIMEOUT = 5  # seconds: an unreachable server fails fast (its outage is waited out elsewhere)
FUNCTION = f"""
CREATE OR REPLACE FUNCTION cdp_stamp_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.cdp_seq := nextval('{SEQUENCE}'); RETURN NEW; END $$
"""


def tracking_ddl(table: str) -> list[str]:
    """Statements that make `table`'s changes readable as `cdp_seq > last seen` (idempotent)."""
    return [
        f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS cdp_seq BIGINT",
        f"CREATE INDEX IF NOT EXISTS {table}_cdp_seq ON {table} (cdp_seq)",
        f"CREATE OR REPLACE TRIGGER {table}_cdp_seq BEFORE INSERT OR UPDATE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION cdp_stamp_change()",
    ]


# Per side table: whether tracking_ddl's column, index and trigger are there, read from the catalog.
INSTALLED = """
SELECT c.relname AS name,
       EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'cdp_seq'
               AND NOT a.attisdropped) AS has_column,
       EXISTS (SELECT FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
               WHERE i.indrelid = c.oid AND x.relname = c.relname || '_cdp_seq') AS has_index,
       EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = c.relname || '_cdp_seq'
               AND NOT t.tgisinternal) AS has_trigger
FROM pg_class c WHERE c.relname = ANY(%s) AND c.relkind = 'r' AND pg_table_is_visible(c.oid)
"""


def install(cursor: Any, tables: Sequence[str]) -> None:
    """Run under the writers' lock (CustomerApplication does), as concurrent DDL races in PostgreSQL.
    Only what the catalog says is missing: ALTER TABLE and CREATE TRIGGER on an existing table wait
    for every session reading it (a pg_dump for its whole run, an open transaction in psql) and,
    queued, hold back every later reader of it, so every command's start stalled behind a backup."""
    cursor.execute(f"CREATE SEQUENCE IF NOT EXISTS {SEQUENCE}")
    cursor.execute(FUNCTION)
    cursor.execute(INSTALLED, [list(tables)])
    present = {row["name"]: (row["has_column"], row["has_index"], row["has_trigger"]) for row in cursor.fetchall()}
    for table in tables:
        for statement, there in zip(tracking_ddl(table), present.get(table, (False, False, False))):
            if not there:
                cursor.execute(statement)


def table_name(ddl: str) -> str:
    """`CREATE TABLE IF NOT EXISTS name (…` → name."""
    return ddl.split("(", 1)[0].split()[-1]


class WriterLock:
    """The writers' advisory lock, on a dedicated autocommit connection. A connection lost with the
    server (restart, network) is opened again on the next use; the server released the lock with
    the old session, so nothing is left held."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.conn = self.connect()
        self.reconnects = 0

    def connect(self) -> Any:
        """A new autocommit connection of its own to the store's database (also for work that may
        not run in a transaction, such as the store's VACUUM FULL)."""
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)

    def _connection(self) -> Any:
        if self.conn.closed or self.conn.broken:
            self.conn.close()
            self.conn = self.connect()
            self.reconnects += 1
        return self.conn

    @contextmanager
    def held(self) -> Iterator[None]:
        conn = self._connection()
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            yield
        finally:
            if not conn.broken:  # a broken session took the lock with it
                conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))

    def last_change(self) -> int:
        """The highest `cdp_seq` handed out so far (0 before the first)."""
        row = self._connection().execute(f"SELECT last_value, is_called FROM {SEQUENCE}").fetchone()
        return row[0] if row[1] else 0

    def close(self) -> None:
        self.conn.close()
