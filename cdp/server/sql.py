"""User SQL over HTTP: the one function every query path of the server goes through.

Read-only by construction: exactly one read statement, by the sandbox's own allow-list
(projections/sandbox.py `check_statement`); the view's database runs with external access off (no files,
no network, no ATTACH: see ReadSide), so a query sees the view's tables and nothing of the
machine. A row limit and a time limit (the query is interrupted) bound what one request costs.
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from decimal import Decimal

import duckdb
import pyarrow as pa

FORMATS = ("json", "csv", "arrow", "parquet")


class QueryRefused(ValueError):
    """Not a read-only query: the message says why."""


class QueryTimeout(RuntimeError):
    pass


@dataclass
class Result:
    table: pa.Table
    truncated: bool


def run_read_only(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int, seconds: float,
                  params: list | dict | None = None) -> Result:
    from projections.sandbox import QueryRejected, check_statement

    try:
        sql = check_statement(sql)  # the project's one statement allow-list (projections/sandbox.py)
    except QueryRejected as problem:
        raise QueryRefused(str(problem)) from None
    timer = threading.Timer(seconds, con.interrupt)
    timer.start()
    try:
        reader = con.sql(sql, params=params).to_arrow_reader(min(max_rows + 1, 100_000))
        batches, rows = [], 0
        for batch in reader:
            batches.append(batch)
            rows += batch.num_rows
            if rows > max_rows:
                break
        table = pa.Table.from_batches(batches, reader.schema)
    except duckdb.InterruptException:
        raise QueryTimeout(f"the query ran longer than {seconds:g} s (CDP_QUERY_TIMEOUT)") from None
    finally:
        timer.cancel()
    return Result(table.slice(0, max_rows), table.num_rows > max_rows)


def _plain(value: object) -> object:
    """JSON for what orjson does not know: decimals (DuckDB's sums of integers) as numbers."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)


def encode(result: Result, fmt: str) -> tuple[bytes, str]:
    """(body, media type) of a result in one of FORMATS."""
    table = result.table
    if fmt == "arrow":
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue(), "application/vnd.apache.arrow.stream"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue(), "application/vnd.apache.parquet"
    if fmt == "csv":
        import pyarrow.csv as pcsv

        import orjson

        for i, field in enumerate(table.schema):  # CSV has no lists or structs: those cells as JSON
            if pa.types.is_nested(field.type):
                cells = [None if v is None else orjson.dumps(v, default=str).decode() for v in table.column(i).to_pylist()]
                table = table.set_column(i, field.name, pa.array(cells, pa.string()))
        sink = io.BytesIO()
        pcsv.write_csv(table, sink)
        return sink.getvalue(), "text/csv"
    import orjson

    body = orjson.dumps({"columns": table.column_names, "rows": [list(r.values()) for r in table.to_pylist()],
                         "truncated": result.truncated}, default=_plain)
    return body, "application/json"
