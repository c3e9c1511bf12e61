"""How the CLI talks to people: progress bars on stderr, tables and summaries on stdout."""
from __future__ import annotations

import csv
import io
import re
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Iterator, Sequence

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

# markup off: names and values printed are data, never styling ("[red]" in a name stays text)
out = Console(highlight=False, soft_wrap=True, markup=False)
if not out.is_terminal:  # piped: tables as wide as their content needs, not 80 columns
    out = Console(highlight=False, soft_wrap=True, width=240, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

# C0/C1 controls (ANSI escapes start with ESC), zero-width and bidirectional overrides
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """`text` with every control character shown as an escape (\\x1b, \\n …), so what a source
    sent cannot move the cursor, recolour or clear a terminal."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


@contextmanager
def progress_bar(label: str, total: float | None, unit_bytes: bool = False) -> Iterator[Any]:
    """Yields a `Bar`: call it with a step, or `.reach(done)` with a running total. Shows on a
    terminal, stays silent when output is piped."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               MofNCompleteColumn() if not unit_bytes else TextColumn(""), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        yield Bar(progress, progress.add_task(label, total=total))


class Bar:
    def __init__(self, progress: Progress, task: Any):
        self._progress, self._task = progress, task

    def __call__(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def reach(self, done: float) -> None:
        self._progress.update(self._task, completed=done)


def _plain(value: Any) -> Any:
    """A value DuckDB or Arrow returned, as something JSON and CSV can hold without losing it."""
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value) if value == Decimal(repr(float(value))) else str(value)
    if isinstance(value, timedelta):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, int) and not -(2 ** 63) <= value < 2 ** 64:
        return str(value)  # HUGEINT and friends: JSON numbers that big lose digits in most readers
    if type(value).__name__ == "MonthDayNano":  # Arrow's INTERVAL
        months, days, nanoseconds = value
        return f"{months} months {days} days {nanoseconds / 1e9:g} seconds"
    if isinstance(value, (set, frozenset)):
        return list(value)
    return value


def render_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str, title: str | None = None) -> str | None:
    """csv and json as text; table is printed directly (rich) and returns None."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if v is None else _plain(v) for v in row])
        return buffer.getvalue()
    if fmt == "json":
        return orjson.dumps([dict(zip(columns, row)) for row in rows], default=_plain,
                            option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n"
    table = Table(title=escape_controls(title) if title else None, show_lines=False)
    for name in columns:
        table.add_column(escape_controls(name), overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else escape_controls(str(_plain(v))) for v in row))
    out.print(table)
    return None
