"""Parquet export of the unified view: one file per table, written by DuckDB itself (`COPY … TO`,
in bounded memory), and a data dictionary (data_dictionary.json and .md) naming every column, its
type and its meaning."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import duckdb

from projections.dictionary import TABLES, describe


def total_rows(con: duckdb.DuckDBPyConnection) -> int:
    return sum(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0] for table in TABLES)


def _dictionary(con: duckdb.DuckDBPyConnection, rows: dict[str, int]) -> list[dict]:
    tables = []
    for table, meaning in TABLES.items():
        columns = [{"name": name, "type": kind, "description": describe(table, name)}
                   for name, kind, *_ in con.execute(f"DESCRIBE {table}").fetchall()]
        tables.append({"table": table, "file": f"{table}.parquet", "rows": rows[table], "description": meaning,
                       "columns": columns})
    return tables


def _markdown(tables: list[dict], as_of: object) -> str:
    lines = ["# Data dictionary of the unified customer view", "",
             f"Scores as of {as_of}. Exact metric definitions: docs/metrics.md in the project.", ""]
    for table in tables:
        lines += [f"## {table['table']} ({table['rows']:,} rows, `{table['file']}`)", "", table["description"], "",
                  "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{c['name']}` | {c['type']} | {c['description']} |" for c in table["columns"]]
        lines.append("")
    return "\n".join(lines)


def export_view(con: duckdb.DuckDBPyConnection, directory: Path,
                progress: Callable[[int], None] | None = None) -> list[Path]:
    """Writes <table>.parquet for every table of the view plus the data dictionary; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written, rows = [], {}
    for table in TABLES:
        path = directory / f"{table}.parquet"
        target = str(path).replace("'", "''")
        rows[table] = con.execute(f"COPY {table} TO '{target}' (FORMAT parquet, COMPRESSION zstd)").fetchall()[0][0]
        if progress:
            progress(rows[table])
        written.append(path)
    tables = _dictionary(con, rows)
    as_of = (con.execute("SELECT max(as_of) FROM metric_state").fetchall()[0][0])
    (directory / "data_dictionary.json").write_text(
        json.dumps({"as_of": str(as_of), "tables": tables}, indent=2), encoding="utf-8")
    (directory / "data_dictionary.md").write_text(_markdown(tables, as_of), encoding="utf-8")
    return [*written, directory / "data_dictionary.json", directory / "data_dictionary.md"]
