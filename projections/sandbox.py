"""User SQL against the unified view, unable to reach anything but the view.

Every path that runs SQL somebody typed (``cdp query`` now, ``POST /v1/query`` next) goes through
``run_query``. The defence is DuckDB's own, not string inspection: the view is opened read-only on
a connection of its own with external access disabled (no file, network, ATTACH, COPY, EXPORT,
INSTALL/LOAD), no extension auto-loading, and the configuration locked so no ``SET``/``PRAGMA`` can
undo any of it. On top, DuckDB's parser must find exactly one read statement (SELECT, WITH, VALUES,
FROM, SUMMARIZE, DESCRIBE, SHOW or EXPLAIN of one of those), and rows, time and memory are bounded.
Setting values travel in DuckDB's ``config`` dictionary, never inside SQL text.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

__all__ = ["QueryRejected", "QueryLimits", "QueryResult", "open_sandbox", "check_statement", "run_query",
           "MEMORY_PATTERN"]

MEMORY_PATTERN = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
"""What a memory limit may look like (DuckDB's units); checked before it is handed to DuckDB."""

_READ_TYPES = {duckdb.StatementType.SELECT}
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?", re.IGNORECASE)
_COMMENTS = re.compile(r"^\s*(?:--[^\n]*(?:\n|$)|/\*.*?\*/)", re.DOTALL)
_BATCH_ROWS = 2048


class QueryRejected(ValueError):
    """The query is not allowed, cannot run, or broke a limit; the message is one line for the user."""


@dataclass(frozen=True)
class QueryLimits:
    rows: int = 100_000          # rows returned at most; more is an error, not a silent cut
    seconds: float = 60.0        # wall time before the query is interrupted
    memory: str = "256MB"        # DuckDB memory_limit of the sandbox connection
    threads: int = 2


@dataclass(frozen=True)
class QueryResult:
    table: pa.Table


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _without_leading_comments(sql: str) -> str:
    while True:
        match = _COMMENTS.match(sql)
        if not match:
            return sql
        sql = sql[match.end():]


def check_statement(sql: str) -> str:
    """The one read statement in `sql`, as DuckDB's parser splits it; anything else is refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryRejected(f"query failed: {_one_line(error)}") from None
    if not statements:
        raise QueryRejected("the query is empty: give one SELECT statement")
    if len(statements) > 1:
        raise QueryRejected(f"one statement at a time, got {len(statements)}")
    statement = statements[0]
    text = statement.query.strip().rstrip(";").strip()
    if statement.type == duckdb.StatementType.EXPLAIN:
        inner = _EXPLAIN.sub("", _without_leading_comments(text), count=1)
        inner_statements = duckdb.extract_statements(inner) if inner else []
        if len(inner_statements) != 1 or inner_statements[0].type not in _READ_TYPES:
            raise QueryRejected("only EXPLAIN of a SELECT is allowed")
        return text
    if statement.type not in _READ_TYPES:
        raise QueryRejected(f"only read-only queries are allowed (SELECT, WITH, SUMMARIZE, DESCRIBE, EXPLAIN), "
                            f"not {statement.type.name}")
    return text


def open_sandbox(path: Path | str, limits: QueryLimits = QueryLimits()) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the view that cannot touch any other file and cannot be reconfigured."""
    if not MEMORY_PATTERN.match(limits.memory):
        raise QueryRejected(f"memory limit {limits.memory!r} is not a size like 256MB")
    config = {
        "enable_external_access": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "memory_limit": limits.memory,
        "threads": int(limits.threads),
    }
    con = duckdb.connect(str(path), read_only=True, config=config)
    try:
        con.execute("SET TimeZone = 'UTC'")  # ICU's setting: only known after start, so not in config
        con.execute("SET enable_progress_bar = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def run_query(path: Path | str, sql: str, limits: QueryLimits = QueryLimits()) -> QueryResult:
    """Runs one read statement of user SQL on the view at `path` and returns its rows as Arrow."""
    text = check_statement(sql)
    con = open_sandbox(path, limits)
    timer = threading.Timer(limits.seconds, con.interrupt)
    timer.daemon = True
    timer.start()
    try:
        reader = con.sql(text).to_arrow_reader(_BATCH_ROWS)
        batches, count = [], 0
        for batch in reader:
            count += batch.num_rows
            if count > limits.rows:
                raise QueryRejected(f"the result has more than {limits.rows:,} rows: add a LIMIT or aggregate")
            batches.append(batch)
        return QueryResult(pa.Table.from_batches(batches, schema=reader.schema))
    except duckdb.InterruptException:
        raise QueryRejected(f"the query ran longer than {limits.seconds:g} s and was stopped") from None
    except duckdb.OutOfMemoryException:
        raise QueryRejected(f"the query needs more memory than its limit ({limits.memory})") from None
    except duckdb.Error as error:
        raise QueryRejected(f"query failed: {_one_line(error)}") from None
    finally:
        timer.cancel()
        con.close()
