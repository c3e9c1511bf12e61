"""Profile documents: the lists of a customer's profile kept in one row of `profile_documents`,
so the profile API reads two rows by key (the customer's and its document) instead of assembling
the lists from four tables per request.

Assembling took five index look-ups and ~6-10 ms of DuckDB CPU per profile on 1,000,000 customers
(most of a look-up's cost, and twice that while the view projects beside it); the two keyed rows
cost ~2 ms. A document holds the source records, identifiers and consent changes (each tagged with
its business unit, so a unit's view is a filter of the same row) and the merges into the
customer. The projector re-derives the documents of the customers a batch touched, in the batch's
own transaction (a merge, split or erasure touches every customer it changes), so a look-up never
sees a document older than the view. The golden record, facts and scores stay on `customers` and
are read beside the document by key: the score refresh, which rewrites every customer's scores
at once, leaves documents alone, and no personal value of the golden record is copied here.

The build reads the `customers` relation, whatever it is made of (one place to change if it
moves), and runs set-based: for a batch's listed customers, or for everyone at a rebuild.
"""
from __future__ import annotations

from typing import Any, Collection

import duckdb

from projections.tables import SCOPED_EVENTS, scope_members

TABLE = "profile_documents"
IDENTIFIER_COLUMNS = ("email", "phone", "national_id", "loyalty_id")
# the document's own columns beside the customer row (the row has a `sources` count already)
PARTS = ("doc_sources", "doc_identifiers", "doc_consent", "doc_merges")

_KINDS = ", ".join(f"CASE WHEN {c} IS NOT NULL THEN struct_pack(business_unit, kind := '{c}', value := {c}) END"
                   for c in IDENTIFIER_COLUMNS)


def select_sql(where: str, events: str = "customer_events", merges: bool = True) -> str:
    """The documents of the customers `where` picks (a condition on `customer_id`, '' for all);
    `events`: a table holding (at least) those customers' events; not `merges`: none of them has
    absorbed anyone (customers new in a batch that merged nobody)."""
    def scoped(column: str = "customer_id") -> str:
        return f"WHERE {column} {where}" if where else ""

    # every customer has a source record (the one it was registered by), and one merged away or
    # erased has none left: the source records say whose documents there are
    return f"""
    WITH src AS (SELECT customer_id, list(struct_pack(business_unit, source_id, rule := linked_by,
                                                 evidence := evidence::VARCHAR, position) ORDER BY position) AS doc_sources
            FROM customer_sources {scoped()} GROUP BY customer_id),
    ev AS (SELECT customer_id, list_sort(list_distinct(flatten(list([{_KINDS}])))) AS doc_identifiers,
                  list(struct_pack(business_unit, purpose, granted, time) ORDER BY position)
                      FILTER (WHERE type = 'cdp.consent') AS doc_consent
           FROM {events} {scoped()} GROUP BY customer_id),
    mer AS (SELECT survivor_id AS customer_id, list(struct_pack(absorbed_id, rule, evidence := evidence::VARCHAR,
                                                                position) ORDER BY position) AS doc_merges
            FROM customer_redirects {scoped("survivor_id") if merges else "WHERE false"} GROUP BY survivor_id)
    SELECT src.customer_id, src.doc_sources, ev.doc_identifiers, ev.doc_consent, mer.doc_merges
    FROM src LEFT JOIN ev USING (customer_id) LEFT JOIN mer USING (customer_id)"""


DDL = (f"CREATE TABLE IF NOT EXISTS {TABLE} AS {select_sql('')} LIMIT 0",)
INDEX = f"CREATE INDEX IF NOT EXISTS lookup_documents ON {TABLE} (customer_id)"


def ensure(con: duckdb.DuckDBPyConnection) -> None:
    """Creates the table; a view made before documents existed gets every customer's now."""
    present = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND NOT temporary",
                          [TABLE]).fetchall()[0][0]
    for statement in DDL:
        con.execute(statement)
    if not present:
        for statement in rebuild_sql():
            con.execute(statement)


def rebuild_sql() -> list[str]:
    """Every customer's document, from scratch (a rebuild, or a view made before documents)."""
    return [f"DELETE FROM {TABLE}", f"INSERT INTO {TABLE} BY NAME {select_sql('')}"]


def update_sql(scope: str | list[str], fresh: Collection[str] = ()) -> list[str]:
    """The documents of the customers in `scope` (a table of their ids, or the ids) derived again,
    after tables.recompute_customers_sql derived their rows; those merged away or erased lose
    theirs. A list's events are the ones that recompute copied out (SCOPED_EVENTS holds exactly
    theirs), a table's are read from customer_events. `fresh`: ids of the list first seen in this
    batch, which have no document to delete (a live batch of new customers: no DELETE at all)."""
    events = SCOPED_EVENTS if isinstance(scope, list) else "customer_events"
    known = [cid for cid in scope if cid not in fresh] if isinstance(scope, list) else scope
    return [*([f"DELETE FROM {TABLE} WHERE customer_id IN {scope_members(known)}"] if known else []),
            f"INSERT INTO {TABLE} BY NAME {select_sql(f'IN {scope_members(scope)}', events, merges=bool(known))}"]


READ_SQL = (f"SELECT c.*, {', '.join(f'd.{part}' for part in PARTS)} "
            f"FROM customers c, {TABLE} d WHERE c.customer_id = $id AND d.customer_id = $id")


def read(con: duckdb.DuckDBPyConnection, customer_id: str) -> dict[str, Any] | None:
    """The customer's row with its document's lists (None: no such customer)."""
    cursor = con.execute(READ_SQL, {"id": customer_id})
    rows = cursor.fetchall()  # all: a result left unread keeps its transaction open (a CHECKPOINT waits)
    return dict(zip([d[0] for d in cursor.description], rows[0])) if rows else None
