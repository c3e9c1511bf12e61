"""PostgreSQL databases of one test's (or one bench run's) own on the shared server: made empty,
dropped afterwards."""
from __future__ import annotations

import time

DROP_ATTEMPTS = 40  # 0.25 s apart


def with_dbname(dsn: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    if dsn.startswith(("postgresql://", "postgres://")):
        from urllib.parse import urlsplit, urlunsplit

        return urlunsplit(urlsplit(dsn)._replace(path=f"/{dbname}"))
    from psycopg.conninfo import make_conninfo

    return make_conninfo(dsn, dbname=dbname)


def create_database(dsn: str, name: str, template: str | None = None) -> None:
    """A new database `name` on `dsn`'s server: empty, or a copy of `template` (which nothing may
    be connected to)."""
    import psycopg
    from psycopg import sql

    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as admin:
        admin.execute(statement)


def drop_database(dsn: str, name: str) -> None:
    """Drops database `name` (through `dsn`'s server), closing the connections a test or a run
    forgot (FORCE, PostgreSQL 13+). FORCE refuses while the database has a backend our role may not
    signal ("must be a member of the role whose process is being terminated"; an autovacuum
    worker has no role a non-superuser may signal), and such a backend soon ends: tried again."""
    import psycopg
    from psycopg import errors, sql

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as admin:
        for attempt in range(1, DROP_ATTEMPTS + 1):
            try:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                return
            except errors.InsufficientPrivilege:
                if attempt == DROP_ATTEMPTS:
                    raise
                time.sleep(0.25)
