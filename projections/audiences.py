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
from typing import Any, Iterable

import duckdb
import orjson
import pyarrow as pa

from cdp.contracts import audience_events as topics
from projections import metrics
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

_SCORES = list(metrics.SCORE_COLUMNS)
# `customers` as the predicates see it during a batch: the touched customers' scores are NULL until
# the next refresh, so the ones from before the batch stand in for them until then
_WITH_PRIOR_SCORES = ("(SELECT c.* REPLACE ({}) FROM customers c LEFT JOIN audience_prior_scores p "
                      "ON p.customer_id = c.customer_id)").format(
    ", ".join(f"coalesce(c.{n}, p.{n}) AS {n}" for n in _SCORES))


def begin_batch(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE audiences_redefined (name VARCHAR)")


def _active(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str | None, bool]]:
    """(name, predicate, consent, redefined in this batch) of every audience not deleted."""
    redefined = "name IN (SELECT name FROM audiences_redefined)" if _has_table(con, "audiences_redefined") else "false"
    return con.execute(f"SELECT name, predicate, consent, {redefined} FROM audiences WHERE NOT deleted "
                       "ORDER BY name").fetchall()


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [name]).fetchall()[0][0])


def keep_prior_scores(con: duckdb.DuckDBPyConnection, scope: str) -> None:
    """Before a batch re-derives the customers in `scope`: their scores, for the predicates."""
    columns = ", ".join(_SCORES)
    con.execute(f"CREATE OR REPLACE TEMP TABLE audience_prior_scores AS SELECT customer_id, {columns} "
                f"FROM customers WHERE customer_id IN (SELECT customer_id FROM {scope})")


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


def _evaluate(con: duckdb.DuckDBPyConnection, audiences: list[tuple[str, str]], source: str) -> tuple[pa.Table, set[str]]:
    """(audience, customer_id) of the rows of `source` (in the view) each audience's predicate selects,
    evaluated in the sandbox; and the audiences whose predicate failed (their members stay as they are)."""
    wanted = {c for _, predicate in audiences for c in _referenced_columns(predicate)}
    columns = ", ".join(_quoted(c) for c in _column_order(con) if c in wanted)
    sandbox, failed = _sandbox(), set()
    sandbox.register("customers", con.sql(f"SELECT {columns} FROM {source}").to_arrow_table())
    try:
        try:  # all audiences in one query; only when that fails, one by one to find the culprits
            chosen = sandbox.sql(_union(audiences)).to_arrow_table()
        except duckdb.Error:
            kept = []
            for name, predicate in audiences:
                try:
                    kept.append(sandbox.sql(_union([(name, predicate)])).to_arrow_table())
                except duckdb.Error as error:
                    failed.add(name)
                    con.execute("UPDATE audiences SET error = ? WHERE name = ? AND NOT deleted",
                                [_one_line(error)[:500], name])
            chosen = pa.concat_tables(kept) if kept else _NO_MEMBERS
    finally:
        sandbox.unregister("customers")
    return chosen.cast(_NO_MEMBERS.schema), failed


_NO_MEMBERS = pa.table({"audience": pa.array([], pa.string()), "customer_id": pa.array([], pa.string())})


def _union(audiences: list[tuple[str, str]]) -> str:
    return " UNION ALL ".join(f"SELECT {_literal(name)}::VARCHAR AS audience, customer_id::VARCHAR AS customer_id "
                              f"FROM customers WHERE {predicate}" for name, predicate in audiences)


def _column_order(con: duckdb.DuckDBPyConnection) -> list[str]:
    return _table_columns(con, "customers")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _should(con: duckdb.DuckDBPyConnection, active: list[tuple[str, str, str | None, bool]], everyone: str,
            candidates: str) -> tuple[str, set[str]]:
    """Registers `audience_should` (who should be a member, consent applied) and returns the SQL
    that reads it, with the audiences whose predicate failed."""
    tables, failed = [], set()
    for again, source in ((False, candidates), (True, everyone)):
        chosen = [(name, predicate) for name, predicate, _, redefined in active if redefined == again]
        if chosen:
            table, bad = _evaluate(con, chosen, source)
            tables.append(table)
            failed |= bad
    con.register("audience_should", pa.concat_tables(tables) if tables else _NO_MEMBERS)
    purposes = sorted({consent for _, _, consent, _ in active if consent})
    if not purposes:
        return "SELECT audience, customer_id FROM audience_should", failed
    # consent is ours to check, on the view: the latest cdp.consent per purpose of these customers
    return (f"""SELECT s.audience, s.customer_id FROM audience_should s JOIN audiences a ON a.name = s.audience
        AND NOT a.deleted LEFT JOIN (SELECT customer_id, purpose FROM customer_events WHERE type = 'cdp.consent'
          AND purpose IN ({", ".join(map(_literal, purposes))})
          AND customer_id IN (SELECT customer_id FROM audience_should)
          GROUP BY customer_id, purpose HAVING arg_max(granted, (time, position))) g
        ON g.customer_id = s.customer_id AND g.purpose = a.consent
        WHERE a.consent IS NULL OR g.customer_id IS NOT NULL""", failed)


def _members_sql(name: str, predicate: str, consent: str | None, source: str) -> str:
    """Who of `source` (customers, or a table/subquery of some of them) is in the audience (preview)."""
    conditions = [f"({predicate})"]
    if consent:
        conditions.append(
            "customer_id IN (SELECT customer_id FROM customer_events WHERE type = 'cdp.consent' "
            f"AND purpose = {_literal(consent)} AND customer_id IN (SELECT customer_id FROM {source}) "
            "GROUP BY customer_id HAVING arg_max(granted, (time, position)))")
    return f"SELECT {_literal(name)} AS audience, customer_id FROM {source} AS customers WHERE " + " AND ".join(conditions)


def update_for_batch(con: duckdb.DuckDBPyConnection, scope: str, position: int) -> int:
    """After a batch re-derived the customers in `scope`: their memberships, and everyone's in the
    audiences (re)defined or deleted by the batch. Returns the changes recorded."""
    active = _active(con)
    redefined_all = con.execute("SELECT DISTINCT name FROM audiences_redefined").fetchall()
    if not active and not redefined_all:
        return 0
    candidates = (f"{_WITH_PRIOR_SCORES} AS customers WHERE customer_id IN (SELECT customer_id FROM {scope})")
    should, failed = _should(con, active, f"{_WITH_PRIOR_SCORES} AS customers", candidates)
    current = (f"SELECT audience, customer_id FROM audience_members WHERE until IS NULL AND "
               f"(audience IN (SELECT name FROM audiences_redefined) OR customer_id IN (SELECT customer_id FROM {scope}))")
    return _record(con, should, current, position, failed)


def update_all(con: duckdb.DuckDBPyConnection, position: int) -> int:
    """Everyone's membership in every audience (after the scores were refreshed); returns the changes."""
    active = [(name, predicate, consent, True) for name, predicate, consent, _ in _active(con)]
    should, failed = _should(con, active, "customers", "customers")
    current = "SELECT audience, customer_id FROM audience_members WHERE until IS NULL"
    return _record(con, should, current, position, failed)


def _record(con: duckdb.DuckDBPyConnection, should: str, current: str, position: int,
            failed: set[str] = frozenset()) -> int:
    """Records the difference between who should be a member and who is, as changes and stays
    (the members of an audience whose predicate failed stay as they are)."""
    if failed:
        current = f"SELECT * FROM ({current}) WHERE audience NOT IN ({', '.join(map(_literal, sorted(failed)))})"
    try:
        changes = _record_delta(con, should, current, position)
    finally:
        con.unregister("audience_should")
    return changes


def _record_delta(con: duckdb.DuckDBPyConnection, should: str, current: str, position: int) -> int:
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE audience_delta AS
        WITH should AS ({should}), now_in AS ({current})
        SELECT audience, customer_id, 'entered' AS action FROM (FROM should EXCEPT FROM now_in)
        UNION ALL
        SELECT audience, customer_id, 'exited' AS action FROM (FROM now_in EXCEPT FROM should)""")
    changes = con.execute("SELECT count(*) FROM audience_delta").fetchall()[0][0]
    if not changes:
        return 0
    con.execute("""
        INSERT INTO audience_changes
        SELECT (SELECT coalesce(max(change_id), 0) FROM audience_changes)
                 + row_number() OVER (ORDER BY action DESC, audience, customer_id),
               audience, customer_id, action, now(), $position
        FROM audience_delta""", {"position": position})
    con.execute("""
        UPDATE audience_members SET until = now(), until_position = $position FROM audience_delta d
        WHERE d.action = 'exited' AND audience_members.until IS NULL
          AND audience_members.audience = d.audience AND audience_members.customer_id = d.customer_id""",
                {"position": position})
    con.execute("""
        INSERT INTO audience_members
        SELECT audience, customer_id, now(), NULL, $position, NULL FROM audience_delta WHERE action = 'entered'""",
                {"position": position})
    return changes


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
                columns = ", ".join(_quoted(c) for c in _table_columns(con, table))
                con.execute(f"DELETE FROM {table}")
                con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM replaced_view.{table}")
            changes = _record_delta(con, "SELECT audience, customer_id FROM rebuilt_members",
                                    "SELECT audience, customer_id FROM audience_members WHERE until IS NULL", position)
        return f"change history and delivery progress kept; {changes:,} membership change(s) found by the rebuild"
    finally:
        con.execute("DETACH replaced_view")


def _table_columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    return [row[0] for row in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = ? "
                                          "AND database_name = current_database() ORDER BY column_index",
                                          [table]).fetchall()]


def has_audiences(con: duckdb.DuckDBPyConnection) -> bool:
    """Any audience defined or deleted so far (members may need to exit even when none is left)."""
    return bool(con.execute("SELECT count(*) FROM audiences").fetchall()[0][0])


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
