"""Audiences in the unified view: their definitions, who is a member, and every change of membership.

An audience is a predicate over `customers` plus an optional consent purpose (only customers whose
latest `cdp.consent` for it is granted; never granted is not granted). Membership is kept as facts:

* `audience_members`  one row per stay in an audience (`since` … `until`, NULL while a member);
* `audience_changes`  one row per entered/exited change, numbered (`change_id`) in commit order:
                      the outbox that destinations are delivered from (cdp/delivery.py).

Both are written in the projector's DuckDB transaction, so a change is recorded exactly once with
the batch (or the score refresh) that caused it. A batch re-evaluates the audiences for the
customers it touched (their scores, NULL until the next refresh, are read from before the batch);
a score refresh (new `CDP_AS_OF`, or the view moved on) re-evaluates everyone, so time-relative
scores move people in and out without new events. A customer who disappears from `customers`
(merged away, erased) exits every audience; an exited change carries ids only.

The predicate is user SQL. `check_predicate` lets through one boolean expression over the columns
of `customers` only: DuckDB's parser must see `SELECT * FROM customers WHERE (predicate)` and
nothing else (no set operation, no other table, no table function, no subquery with a FROM, no
CTE), and the stored text is the parser's own rendering of that expression, so nothing the user
typed (comments, parentheses) survives into the SQL it is later spliced into.
"""
from __future__ import annotations

import functools
import re
import threading
from typing import Any, Collection, Iterable, NamedTuple

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from cdp.contracts import audience_events as topics
from projections import metrics
from projections.tables import scope_members
from projections.transactions import transaction

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
PURPOSE_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_PREFIX = "SELECT * FROM customers WHERE "
_DENIED_FUNCTIONS = {"getenv", "current_setting", "query", "query_table", "read_text", "read_blob"}

DDL = (
    "CREATE TABLE IF NOT EXISTS audiences (name VARCHAR NOT NULL, predicate VARCHAR, consent VARCHAR, "
    "defined_at TIMESTAMPTZ, position BIGINT NOT NULL, deleted BOOLEAN NOT NULL, error VARCHAR)",
    "ALTER TABLE audiences ADD COLUMN IF NOT EXISTS error VARCHAR",  # views made before it
    "CREATE TABLE IF NOT EXISTS audience_members (audience VARCHAR NOT NULL, customer_id VARCHAR NOT NULL, "
    "since TIMESTAMPTZ NOT NULL, until TIMESTAMPTZ, since_position BIGINT NOT NULL, until_position BIGINT)",
    "CREATE TABLE IF NOT EXISTS audience_changes (change_id BIGINT NOT NULL, audience VARCHAR NOT NULL, "
    "customer_id VARCHAR NOT NULL, action VARCHAR NOT NULL, changed_at TIMESTAMPTZ NOT NULL, position BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS destinations (name VARCHAR NOT NULL, webhook VARCHAR NOT NULL, "
    "audiences VARCHAR[] NOT NULL, fields VARCHAR[] NOT NULL, sealed_secret VARCHAR, defined_at TIMESTAMPTZ, "
    "position BIGINT NOT NULL, deleted BOOLEAN NOT NULL)",
    # written by whoever delivers (cdp/delivery.py), in the view so that it commits with nothing else
    "CREATE TABLE IF NOT EXISTS destination_state (destination VARCHAR NOT NULL, delivered_through BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS destination_deadletter (destination VARCHAR NOT NULL, change_id BIGINT NOT NULL, "
    "attempts INTEGER NOT NULL, error VARCHAR NOT NULL, failed_at TIMESTAMPTZ NOT NULL)",
)


class PredicateError(ValueError):
    """The predicate is not one expression over `customers`; the message is one line."""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _walk(node: Any) -> Iterable[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _schema_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory database with the view's empty tables, no access to files, settings locked."""
    from projections.tables import DDL as VIEW_DDL

    con = duckdb.connect(config={"enable_external_access": False, "autoload_known_extensions": False,
                                 "autoinstall_known_extensions": False})
    for statement in VIEW_DDL:
        con.execute(statement)
    con.execute("SET lock_configuration = true")
    return con


def check_predicate(predicate: str) -> str:
    """The predicate as DuckDB renders it, when it is one expression over the columns of
    `customers`; PredicateError (one line) otherwise."""
    if not predicate or not predicate.strip():
        raise PredicateError("the predicate is empty: give a condition such as \"churn_risk > 0.7\"")
    con = _schema_connection()
    try:
        parsed = orjson.loads(con.execute("SELECT json_serialize_sql(?)", [f"{_PREFIX}({predicate}\n)"]).fetchall()[0][0])
        if parsed.get("error"):
            raise PredicateError(f"not a valid predicate: {' '.join(parsed.get('error_message', '').split())}")
        statements = parsed["statements"]
        node = statements[0]["node"] if len(statements) == 1 else {}
        root_ok = (node.get("type") == "SELECT_NODE" and not node.get("modifiers") and not node["cte_map"]["map"]
                   and not node.get("group_expressions") and node.get("having") is None
                   and node.get("qualify") is None and node.get("sample") is None
                   and [s.get("class") for s in node.get("select_list", [])] == ["STAR"]
                   and node.get("from_table", {}).get("type") == "BASE_TABLE"
                   and node["from_table"].get("table_name") == "customers")
        if not root_ok:
            raise PredicateError("the predicate must be one condition over customers' columns, not a statement")
        where = node["where_clause"]
        for inner in _walk(where):
            if "from_table" in inner and inner["from_table"].get("type") != "EMPTY":
                raise PredicateError("the predicate may read customers' columns only (no tables or table functions)")
            if inner.get("cte_map", {}).get("map") or inner.get("type") == "SET_OPERATION_NODE":
                raise PredicateError("the predicate must be one condition, not a query")
            if inner.get("class") == "FUNCTION" and str(inner.get("function_name", "")).lower() in _DENIED_FUNCTIONS:
                raise PredicateError(f"function {inner['function_name']} is not allowed in a predicate")
        rendered = con.execute("SELECT json_deserialize_sql(?::JSON)", [orjson.dumps(parsed).decode()]).fetchall()[0][0]
        if not rendered.startswith(_PREFIX):
            raise PredicateError("the predicate must be one condition over customers' columns")
        canonical = rendered[len(_PREFIX):]
        try:  # the columns exist and the result is a truth value
            con.execute(f"SELECT count(*) FROM customers WHERE {canonical}").fetchall()
        except duckdb.Error as error:
            raise PredicateError(f"not a valid predicate: {_one_line(error)}") from None
        return canonical
    except duckdb.Error as error:
        raise PredicateError(f"not a valid predicate: {_one_line(error)}") from None
    finally:
        con.close()


def check_fields(fields: list[str]) -> list[str]:
    """Columns of `customers` a destination may ask for; ValueError names the first unknown."""
    con = _schema_connection()
    try:
        columns = [row[0] for row in con.execute("DESCRIBE customers").fetchall()]
    finally:
        con.close()
    for name in fields:
        if name not in columns:
            raise ValueError(f"unknown customer field {name!r} (fields are the columns of customers)")
    return fields


# -- definitions, from the store's events -----------------------------------------------------

_DEFINITION_STATE = ('{"name": "VARCHAR", "where": "VARCHAR", "consent": "VARCHAR", "webhook": "VARCHAR", '
                     '"audiences": "VARCHAR[]", "fields": "VARCHAR[]", "sealed_secret": "VARCHAR", '
                     '"timestamp": {"_data_": "VARCHAR"}}')
_LATEST_DEFINITIONS = f"""
SELECT DISTINCT ON (s.name) topic, position, s.*
FROM (SELECT topic, position, from_json(decode(state), '{_DEFINITION_STATE}') AS s FROM batch WHERE topic IN (TOPICS))
ORDER BY s.name, position DESC
"""


def apply_definitions(con: duckdb.DuckDBPyConnection) -> None:
    """Takes the audience and destination events of the registered `batch` into `audiences` and
    `destinations`; audiences (re)defined or deleted here are noted in `audiences_redefined`."""
    audience_topics = ", ".join(map(_literal, (topics.AUDIENCE_DEFINED, topics.AUDIENCE_REDEFINED,
                                               topics.AUDIENCE_DELETED)))
    destination_topics = ", ".join(map(_literal, (topics.DESTINATION_DEFINED, topics.DESTINATION_REDEFINED,
                                                  topics.DESTINATION_DELETED)))
    con.execute(f"CREATE OR REPLACE TEMP TABLE latest_definitions AS {_LATEST_DEFINITIONS.replace('TOPICS', audience_topics)}")
    if con.execute("SELECT count(*) FROM latest_definitions").fetchall()[0][0]:
        con.execute("DELETE FROM audiences WHERE name IN (SELECT name FROM latest_definitions)")
        con.execute(f"INSERT INTO audiences SELECT name, \"where\", consent, timestamp._data_::TIMESTAMPTZ, position, "
                    f"topic = {_literal(topics.AUDIENCE_DELETED)}, NULL FROM latest_definitions")
        con.execute("INSERT INTO audiences_redefined SELECT name FROM latest_definitions")
    con.execute(f"CREATE OR REPLACE TEMP TABLE latest_definitions AS "
                f"{_LATEST_DEFINITIONS.replace('TOPICS', destination_topics)}")
    if con.execute("SELECT count(*) FROM latest_definitions").fetchall()[0][0]:
        con.execute("DELETE FROM destinations WHERE name IN (SELECT name FROM latest_definitions)")
        con.execute(f"INSERT INTO destinations SELECT name, coalesce(webhook, ''), coalesce(audiences, []), "
                    f"coalesce(fields, []), sealed_secret, timestamp._data_::TIMESTAMPTZ, position, "
                    f"topic = {_literal(topics.DESTINATION_DELETED)} FROM latest_definitions")


# -- membership --------------------------------------------------------------------------------

_SCORES = frozenset(metrics.SCORE_COLUMNS)
# purposes whose latest consent `customers` keeps already (consent_<purpose>, projections/metrics.py)
_KEPT_PURPOSES = frozenset(metrics.CONSENT_PURPOSES)
_LISTED = 2000  # a batch's customers read through a constant id list up to this many (tables.scope_members)


class _Audience(NamedTuple):
    name: str
    predicate: str
    consent: str | None
    again: bool  # evaluated over everyone: (re)defined by this batch, or a score refresh
    error: str | None  # from its last evaluation


def begin_batch(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE audiences_redefined (name VARCHAR)")


def _active(con: duckdb.DuckDBPyConnection, batch: bool) -> list[_Audience]:
    """Every audience not deleted; in a batch only those it (re)defined are evaluated over everyone."""
    return _definitions(con, batch)[0]


def _definitions(con: duckdb.DuckDBPyConnection, batch: bool) -> tuple[list[_Audience], list[str]]:
    """The active audiences (_active) and, in a batch, the names it (re)defined or deleted."""
    again = "name IN (SELECT name FROM audiences_redefined)" if batch else "true"
    rows = con.execute(f"SELECT name, predicate, consent, {again}, error, deleted FROM audiences "
                       f"WHERE NOT deleted{f' OR {again}' if batch else ''} ORDER BY name").fetchall()
    return [_Audience(*row[:5]) for row in rows if not row[5]], [row[0] for row in rows if batch and row[3]]


def _named(audiences: Iterable[_Audience]) -> set[str]:
    return {column for a in audiences for column in _referenced_columns(a.predicate)}


def _in_scope(con: duckdb.DuckDBPyConnection, table: str) -> str | None:
    """The customers in `table` (ids may repeat) as the right side of IN: a constant list when few,
    which DuckDB pushes into the scan, else the table; None when there are none."""
    ids = [row[0] for row in con.execute(f"SELECT DISTINCT customer_id FROM {table} WHERE customer_id IS NOT NULL "
                                         f"LIMIT {_LISTED + 1}").fetchall()]
    return scope_members(ids if len(ids) <= _LISTED else table) if ids else None


class BatchUpkeep(NamedTuple):
    """What keep_prior_scores noted before a batch re-derived its customers, for update_for_batch."""
    in_scope: str  # the batch's customers, as the right side of IN
    active: list[_Audience]
    redefined: list[str]  # audiences the batch (re)defined or deleted
    known: str | None  # those of its customers it did not register (right side of IN); None: none
    theirs: int  # how many of those had a row in `customers` (audience_prior_scores)
    rows_before: int  # rows of `customers` before the batch
    last_rowid: int  # and the highest row id among them


def keep_prior_scores(con: duckdb.DuckDBPyConnection, scope: str | list[str],
                      registered: Collection[str] = ()) -> BatchUpkeep | None:
    """Before a batch re-derives the customers in `scope` (their ids, or a table of them; scores
    NULL until the next refresh): the scores the predicates name, of those of them in `customers`,
    from before; and how many rows `customers` has, up to which row id (see _rederived). The
    customers the batch `registered` (registrations.registered_customers) are not looked for: they
    have no row yet. None when no audience is kept or was (re)defined or deleted by the batch."""
    active, redefined = _definitions(con, batch=True)
    if not active and not redefined:
        return None
    if isinstance(scope, list):
        unregistered = [customer for customer in scope if customer not in registered]
        known = scope_members(unregistered) if unregistered else None
    else:
        known = _known(con, scope, registered)
    theirs = 0
    if known:
        named = sorted(_named(active) & _SCORES)
        theirs = con.execute(f"CREATE OR REPLACE TEMP TABLE audience_prior_scores AS SELECT "
                             f"{', '.join(['customer_id', *named])} FROM customers WHERE customer_id IN {known}"
                             ).fetchall()[0][0]
    before, last = con.execute("SELECT count(*), coalesce(max(rowid), -1) FROM customers").fetchall()[0]
    return BatchUpkeep(scope_members(scope), active, redefined, known, theirs, before, last)


def _known(con: duckdb.DuckDBPyConnection, table: str, registered: Collection[str]) -> str | None:
    """The customers in `table` the batch did not register, as the right side of IN; None: none.
    Those it registered are among them (it touched them): none is left when they are as many."""
    if not registered:
        return _in_scope(con, table)
    customers = f"SELECT customer_id FROM {table} WHERE customer_id IS NOT NULL"
    if con.execute(f"SELECT count(DISTINCT customer_id) FROM ({customers})").fetchall()[0][0] == len(registered):
        return None
    con.register("audience_registered", pa.table({"customer_id": pa.array(list(registered), pa.string())}))
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE audience_known AS "
                    f"FROM ({customers}) ANTI JOIN audience_registered USING (customer_id)")
    finally:
        con.unregister("audience_registered")
    return _in_scope(con, "audience_known")


def _rederived(con: duckdb.DuckDBPyConnection, noted: BatchUpkeep) -> str | None:
    """The condition that finds the batch's customers in `customers` after the batch re-derived them,
    when the counts prove what keep_prior_scores noted; None otherwise. The re-derive deletes the
    rows of the customers in scope and writes theirs anew, with higher row ids (found without
    reading the rest of the table); the counts prove that the rows it deleted are those of
    `audience_prior_scores` (rows now = rows before - theirs before + those written), so that no
    customer it registered had one."""
    recent = f"rowid > {int(noted.last_rowid)}"
    written, now = con.execute(f"SELECT (SELECT count(*) FROM customers WHERE {recent}), "
                               "(SELECT count(*) FROM customers)").fetchall()[0]
    return recent if written == now - noted.rows_before + noted.theirs else None


# -- predicates run in a sandbox of their own --------------------------------------------------

_SANDBOX = threading.local()


def _sandbox() -> duckdb.DuckDBPyConnection:
    """This thread's predicate sandbox: an in-memory DuckDB that holds nothing, reaches no file or
    network (COPY, ATTACH, read_csv … refused by DuckDB itself) and cannot be reconfigured; the
    rows a predicate reads are handed to it as Arrow for the one query and taken away after."""
    con = getattr(_SANDBOX, "con", None)
    if con is None:
        con = _SANDBOX.con = duckdb.connect(config={
            "enable_external_access": False, "autoload_known_extensions": False,
            "autoinstall_known_extensions": False, "threads": 2, "memory_limit": "1GB"})
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET lock_configuration = true")
    return con


@functools.lru_cache(maxsize=256)
def _referenced_columns(predicate: str) -> tuple[str, ...]:
    """The columns of `customers` a (checked) predicate names: all that is copied to the sandbox."""
    con = _schema_connection()
    try:
        columns = [row[0] for row in con.execute("DESCRIBE customers").fetchall()]
        parsed = orjson.loads(con.execute("SELECT json_serialize_sql(?)", [f"{_PREFIX}({predicate}\n)"]).fetchall()[0][0])
    finally:
        con.close()
    named = {name for node in _walk(parsed) if node.get("class") == "COLUMN_REF" for name in node["column_names"]}
    return tuple(c for c in columns if c in named or c == "customer_id")


def _consent_flag(purpose: str) -> str:
    return _quoted(f"__consent__{purpose}")


def _rows_sql(con: duckdb.DuckDBPyConnection, audiences: list[_Audience], scope: str | None, prior: bool,
             rows: str | None = None) -> str:
    """The rows `audiences` are evaluated over: the customers in `scope` (None: everyone; `rows`:
    the condition that finds them in `customers`) with only the columns their predicates name, with
    `prior` the scores from before the batch where it left them NULL (audience_prior_scores), and
    one flag per consent purpose (the latest consent for it is granted)."""
    named = _named(audiences)
    columns = sorted(named)  # columns of `customers` (_referenced_columns)
    purposes = sorted({a.consent for a in audiences if a.consent})
    inner = [*map(_quoted, columns), *(f"consent_{p}" for p in purposes if p in _KEPT_PURPOSES)]
    prior_columns = named & _SCORES if prior else set()  # those audience_prior_scores holds
    select = [f"coalesce(c.{_quoted(n)}, p.{_quoted(n)}) AS {_quoted(n)}" if n in prior_columns else f"c.{_quoted(n)}"
              for n in columns]
    for purpose in purposes:
        if purpose in _KEPT_PURPOSES:
            granted = f"c.consent_{purpose} IS TRUE"
        else:  # a purpose `customers` does not keep: the latest consent of these customers' events
            granted = (f"c.customer_id IN (SELECT customer_id FROM customer_events WHERE type = 'cdp.consent' "
                       f"AND purpose = {_literal(purpose)}{f' AND customer_id IN {scope}' if scope else ''} "
                       "GROUP BY customer_id HAVING arg_max(granted, (time, position)))")
        select.append(f"{granted} AS {_consent_flag(purpose)}")
    join = " LEFT JOIN audience_prior_scores p ON p.customer_id = c.customer_id" if prior_columns else ""
    where = f" WHERE {rows or f'customer_id IN {scope}'}" if scope else ""
    return f"SELECT {', '.join(select)} FROM (SELECT {', '.join(inner)} FROM customers{where}) c{join}"


def _evaluate(con: duckdb.DuckDBPyConnection, audiences: list[_Audience], scope: str | None, prior: bool,
              rows: str | None = None) -> tuple[pa.Table, set[str]]:
    """(audience, customer_id) of the customers in `scope` (None: everyone) each audience selects
    (its predicate, evaluated in the sandbox, and its consent), in one pass over those rows; and the
    audiences whose predicate failed (recorded in `audiences.error`; their members stay as they are)."""
    sandbox, failed = _sandbox(), set()
    sandbox.register("customers", con.sql(_rows_sql(con, audiences, scope, prior, rows)).to_arrow_table())
    try:
        try:  # all audiences at once; only when that fails, one by one to find the culprits
            chosen = _chosen(sandbox.sql(_one_pass(audiences)).to_arrow_table(), audiences)
        except duckdb.Error:
            kept = []
            for audience in audiences:
                try:
                    kept.append(_chosen(sandbox.sql(_one_pass([audience])).to_arrow_table(), [audience]))
                except duckdb.Error as error:
                    failed.add(audience.name)
                    con.execute("UPDATE audiences SET error = ? WHERE name = ? AND NOT deleted",
                                [_one_line(error)[:500], audience.name])
            chosen = pa.concat_tables(kept) if kept else _NO_MEMBERS
    finally:
        sandbox.unregister("customers")
    return chosen, failed


_NO_MEMBERS = pa.table({"audience": pa.array([], pa.string()), "customer_id": pa.array([], pa.string())})


def _one_pass(audiences: list[_Audience]) -> str:
    """Every audience's predicate over each row once: a row's customer_id, then whether it is in
    each audience (one truth value per audience, in their order)."""
    def chooses(a: _Audience) -> str:
        chosen = f"CASE WHEN ({a.predicate}) THEN true ELSE false END"
        return f"CASE WHEN {_consent_flag(a.consent)} THEN {chosen} ELSE false END" if a.consent else chosen
    return (f"SELECT customer_id::VARCHAR AS customer_id, "
            f"{', '.join(f'{chooses(a)} AS _{n}' for n, a in enumerate(audiences))} FROM customers")


def _chosen(flags: pa.Table, audiences: list[_Audience]) -> pa.Table:
    """The (audience, customer_id) pairs of `_one_pass`'s truth values: an audience's members are
    the ids its column selects (columnar, no row-by-row work)."""
    ids = flags.column(0)
    members = [ids.filter(flags.column(n + 1)) for n in range(len(audiences))]
    return pa.table({"audience": pa.chunked_array([pa.repeat(a.name, len(m)) for a, m in zip(audiences, members)],
                                                  pa.string()),
                     "customer_id": pa.chunked_array([c for m in members for c in m.chunks], pa.string())})


def _columns(con: duckdb.DuckDBPyConnection, table: str = "customers") -> list[str]:
    """The columns of `table` (of the view's own database, not an attached one), in order."""
    return [column[0] for column in con.execute(f"SELECT * FROM {table} LIMIT 0").description]


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _should(con: duckdb.DuckDBPyConnection, active: list[_Audience], scope: str | None,
            prior: bool, rows: str | None = None) -> tuple[pa.Table, set[str], set[str]]:
    """Who should be a member, once each: of the customers in `scope` (None: everyone) and of
    everyone for the audiences evaluated again. Returns them (less the audiences whose predicate
    failed), the audiences whose predicate failed and those evaluated over everyone."""
    tables, failed = [], set()
    first = [a for a in active if not a.again]
    if first:
        table, failed = _evaluate(con, first, scope, prior, rows)
        tables.append(table)
    # working again after an error: its members may be stale anywhere, so everyone is evaluated
    again = [a for a in active if a.again or (a.error and a.name not in failed)]
    if again:
        table, bad = _evaluate(con, again, None, prior)
        tables = [_without(t, {a.name for a in again}) for t in tables] + [table]
        failed |= bad
    mended = [a.name for a in active if a.error and a.name not in failed]
    if mended:
        con.execute(f"UPDATE audiences SET error = NULL WHERE name IN ({', '.join(map(_literal, mended))})")
    should = pa.concat_tables(tables) if tables else _NO_MEMBERS
    return _without(should, failed), failed, {a.name for a in again}


def _without(members: pa.Table, audiences: set[str]) -> pa.Table:
    if not audiences:
        return members
    return members.filter(pc.invert(pc.is_in(members["audience"], pa.array(sorted(audiences), pa.string()))))


def _members_sql(name: str, predicate: str, consent: str | None, source: str) -> str:
    """Who of `source` (customers, or a table/subquery of some of them) is in the audience (preview)."""
    conditions = [f"({predicate})"]
    if consent:
        conditions.append(
            "customer_id IN (SELECT customer_id FROM customer_events WHERE type = 'cdp.consent' "
            f"AND purpose = {_literal(consent)} AND customer_id IN (SELECT customer_id FROM {source}) "
            "GROUP BY customer_id HAVING arg_max(granted, (time, position)))")
    return f"SELECT {_literal(name)} AS audience, customer_id FROM {source} AS customers WHERE " + " AND ".join(conditions)


def update_for_batch(con: duckdb.DuckDBPyConnection, noted: BatchUpkeep, position: int) -> int:
    """After a batch re-derived the customers noted by keep_prior_scores: their memberships, and
    everyone's in the audiences (re)defined or deleted by the batch. Returns the changes recorded.
    Reads only the batch's customers, so its cost follows the batch, not the view."""
    if not noted.active and not noted.redefined:
        return 0
    rows = _rederived(con, noted)
    should, failed, everyone = _should(con, noted.active, noted.in_scope, bool(noted.theirs), rows)
    # a stay is held only by a customer in `customers` (one who leaves it exits every audience; an
    # audience whose predicate failed keeps its stays and is evaluated over everyone once it works
    # again): proven, those of the batch are among the customers it did not register
    held = noted.known if rows else noted.in_scope
    whose = [*([f"customer_id IN {held}"] if held else []),
             *([f"audience IN ({', '.join(map(_literal, sorted(everyone | set(noted.redefined))))})"]
               if everyone or noted.redefined else [])]
    current = (f"SELECT audience, customer_id FROM audience_members WHERE until IS NULL AND ({' OR '.join(whose)})"
               if whose else None)
    return _record(con, should, current, position, failed)


def update_all(con: duckdb.DuckDBPyConnection, position: int) -> int:
    """Everyone's membership in every audience (after the scores were refreshed); returns the changes."""
    should, failed, _ = _should(con, _active(con, batch=False), None, prior=False)
    return _record(con, should, "SELECT audience, customer_id FROM audience_members WHERE until IS NULL",
                   position, failed)


def _record(con: duckdb.DuckDBPyConnection, should: pa.Table, current: str | None, position: int,
            failed: set[str]) -> int:
    """Records the difference between who should be a member (`should`) and who is (`current`;
    None: nobody), as changes and stays (the members of an audience whose predicate failed stay as
    they are)."""
    if current is None:
        return _record_entries(con, should, position)
    kept = f" WHERE audience NOT IN ({', '.join(map(_literal, sorted(failed)))})" if failed else ""
    con.register("audience_should", should)
    try:
        return _record_delta(con, "SELECT audience, customer_id FROM audience_should",
                             f"SELECT * FROM ({current}){kept}", position)
    finally:
        con.unregister("audience_should")


def _record_entries(con: duckdb.DuckDBPyConnection, entries: pa.Table, position: int) -> int:
    """Everyone in `entries` (none of them a member) enters: the changes numbered on from the last in
    the order _record_delta gives entries, and the stays they open. Sorted and numbered in Arrow:
    DuckDB's sort costs more than the two inserts together for a batch's ~15,000 entries."""
    if not entries.num_rows:
        return 0
    numbered = entries.sort_by([("audience", "ascending"), ("customer_id", "ascending")]).append_column(
        "n", pa.array(np.arange(1, entries.num_rows + 1, dtype=np.int64)))
    con.register("audience_entries", numbered)
    try:
        con.execute("""
            INSERT INTO audience_changes
            SELECT (SELECT coalesce(max(change_id), 0) FROM audience_changes) + n,
                   audience, customer_id, 'entered', now(), $position
            FROM audience_entries""", {"position": position})
        con.execute("INSERT INTO audience_members SELECT audience, customer_id, now(), NULL, $position, NULL "
                    "FROM audience_entries", {"position": position})
    finally:
        con.unregister("audience_entries")
    return entries.num_rows


def _record_delta(con: duckdb.DuckDBPyConnection, should: str, current: str, position: int) -> int:
    """Changes from `current` to `should` members (each side holds a pair once: a customer enters
    only when not a member), numbered on from the last change in a fixed order (exits first, then by
    audience and customer), and the stays they open and close. One outer join finds both: on
    1,000,000 customers it costs ~40% of the two EXCEPTs it replaced."""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE audience_delta AS
        SELECT coalesce(s.audience, n.audience) AS audience, coalesce(s.customer_id, n.customer_id) AS customer_id,
               CASE WHEN n.audience IS NULL THEN 'entered' ELSE 'exited' END AS action
        FROM ({should}) s FULL OUTER JOIN ({current}) n ON s.audience = n.audience AND s.customer_id = n.customer_id
        WHERE s.audience IS NULL OR n.audience IS NULL""")
    entered, exited = con.execute("SELECT count(*) FILTER (WHERE action = 'entered'), "
                                  "count(*) FILTER (WHERE action = 'exited') FROM audience_delta").fetchall()[0]
    if not entered + exited:
        return 0
    con.execute("""
        INSERT INTO audience_changes
        SELECT (SELECT coalesce(max(change_id), 0) FROM audience_changes)
                 + row_number() OVER (ORDER BY action DESC, audience, customer_id),
               audience, customer_id, action, now(), $position
        FROM audience_delta""", {"position": position})
    if exited:
        con.execute("""
            UPDATE audience_members SET until = now(), until_position = $position FROM audience_delta d
            WHERE d.action = 'exited' AND audience_members.until IS NULL
              AND audience_members.audience = d.audience AND audience_members.customer_id = d.customer_id""",
                    {"position": position})
    if entered:
        con.execute("""
            INSERT INTO audience_members
            SELECT audience, customer_id, now(), NULL, $position, NULL FROM audience_delta WHERE action = 'entered'""",
                    {"position": position})
    return entered + exited


_DELIVERY_HISTORY = ("audience_members", "audience_changes", "destination_state", "destination_deadletter")


def carry_delivery_history(con: duckdb.DuckDBPyConnection, old_view: str, position: int) -> str:
    """A rebuilt view (`con`) takes the change history and delivery progress of the view it replaces,
    then records as new changes only where rebuilt membership differs from the old view's: a change
    keeps its id, so its idempotency key, and destinations are sent nothing they were sent already.
    Returns one line for the person who rebuilt."""
    try:
        con.execute(f"ATTACH {_literal(old_view)} AS replaced_view (READ_ONLY)")
    except duckdb.Error as error:
        return (f"the replaced view could not be read ({_one_line(error)[:200]}): change history starts "
                "again, destinations receive the current members as entered")
    try:
        kept = {row[0] for row in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'replaced_view'").fetchall()}
        if not set(_DELIVERY_HISTORY) <= kept:
            return "the replaced view had no audiences: change history starts here"
        with transaction(con):
            con.execute("CREATE OR REPLACE TEMP TABLE rebuilt_members AS "
                        "SELECT audience, customer_id FROM audience_members WHERE until IS NULL")
            for table in _DELIVERY_HISTORY:
                columns = ", ".join(_quoted(c) for c in _columns(con, table))
                con.execute(f"DELETE FROM {table}")
                con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM replaced_view.{table}")
            changes = _record_delta(con, "SELECT audience, customer_id FROM rebuilt_members",
                                    "SELECT audience, customer_id FROM audience_members WHERE until IS NULL", position)
        return f"change history and delivery progress kept; {changes:,} membership change(s) found by the rebuild"
    finally:
        con.execute("DETACH replaced_view")


# -- reads for the CLI -------------------------------------------------------------------------

SELECT_LIST = """
SELECT a.name, a.predicate, a.consent, a.defined_at,
       (SELECT count(*) FROM audience_members m WHERE m.audience = a.name AND m.until IS NULL) AS size
FROM audiences a WHERE NOT a.deleted ORDER BY a.name
"""
SELECT_SIZES = """
SELECT changed_at, sum(sum(CASE action WHEN 'entered' THEN 1 ELSE -1 END)) OVER (ORDER BY changed_at) AS size,
       count(*) FILTER (WHERE action = 'entered') AS entered, count(*) FILTER (WHERE action = 'exited') AS exited
FROM audience_changes WHERE audience = ? GROUP BY changed_at ORDER BY changed_at
"""


def preview_sql(predicate: str, consent: str | None, sample: int) -> tuple[str, str]:
    """(count, sample) queries of who a checked predicate would select now."""
    members = _members_sql("preview", predicate, consent, "customers")
    columns = "customer_id, email, first_name, last_name, business_units, lifetime_value, churn_risk"
    return (f"SELECT count(*) FROM ({members})",
            f"SELECT {columns} FROM customers WHERE customer_id IN (SELECT customer_id FROM ({members})) "
            f"ORDER BY customer_id LIMIT {int(sample)}")
