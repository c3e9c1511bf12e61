"""Legacy spreadsheets (CSV and Parquet) turned into CloudEvents through a small TOML mapping file.

One mapping file describes one data file; by default it sits beside it as ``<stem>.mapping.toml``
(``legacy.csv`` -> ``legacy.mapping.toml``). Format::

    type = "cdp.purchase"          # required: one event type per file (a schemas/v1 type)
    business_unit = "retail"       # required: data.business_unit of every event
    source = "retail/legacy-pos"   # required: CloudEvents source
    id = "OrderRef"                # optional: column holding a unique row id; default: a stable hash
                                   #   of the event built from the row, so re-ingesting is idempotent
    time = "OrderDate"             # required: column with the event time: RFC 3339, or
                                   #   YYYY-MM-DD[ HH:MM[:SS]] (also with 'T') taken as UTC
    [columns]                      # field path under data = column name
    "customer.source_id" = "CustNo"
    "customer.email" = "E-mail"
    "customer.address.city" = "Town"
    amount = "Total"
    [constants]                    # field path under data = fixed value
    currency = "EUR"

Field paths are the scalar leaf fields of the event type's schema (``EventValidator.field_types``
without the ``data.`` prefix); ``business_unit`` is set by the top-level key, not here. A field may
appear in [columns] or [constants], not both; every scalar field the schema requires must appear in
one of them (``customer.source_id`` always).

Reading (``iter_tabular``) streams: the ``csv`` module row by row, ``ParquetFile.iter_batches`` for
Parquet. It yields ``(origin, event, input)`` with origin like ``"legacy.csv:row 12"`` (rows are
numbered from 1, the header not counted) and event a full CloudEvent dict, or ``(origin, reason,
input)`` (reason a str) when a row does not fit its mapping; input is the row as written. It never
stops on one bad row. Events are NOT schema-validated here: the ingest pipeline validates every
event whatever its origin.

* CSV: UTF-8 with or without BOM; delimiter among ``,`` ``;`` tab found by ``csv.Sniffer`` on the
  header line (fallback ``,``). Cells are stripped; empty cells are omitted from the event. A row
  with fewer cells than the header is rejected (extra cells are tolerated only when empty); a row
  that is not valid UTF-8 is rejected; fully empty rows are skipped. A quoted value may span lines,
  but when a record spanning lines does not parse or has the wrong width, a quote was left open:
  only its first line is rejected and the others are read again (``_Lines``).
* A mapped column missing from the header rejects the whole file: one ``(<file>:header, reason)``.
* Coercion to the schema type: number -> float (``1234.50`` or decimal comma ``1234,50``; no
  thousands separators), integer -> int (``12``, also ``12.0``), boolean -> true/false/yes/no/y/n/1/0
  (any case), string -> as is. A value that cannot be coerced rejects the row.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import hashlib
import json
import math
import re
import tomllib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.validation import EventValidator

__all__ = ["MappingError", "Mapping", "load_mapping", "mapping_for", "iter_tabular"]

CSV_SUFFIXES = frozenset({".csv", ".tsv", ".txt"})
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
TABULAR_SUFFIXES = CSV_SUFFIXES | PARQUET_SUFFIXES  # every other file is CloudEvents JSONL

_TOP_KEYS = {"type", "business_unit", "source", "id", "time", "columns", "constants"}
_BUSINESS_UNIT = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][+-]?\d+)?$")
_INTEGER = re.compile(r"^[+-]?\d+(?:[.,]0*)?$")
_TRUE = frozenset({"true", "yes", "y", "1"})
_FALSE = frozenset({"false", "no", "n", "0"})
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})$")
_LOCAL = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:[ Tt](\d{2}):(\d{2})(?::(\d{2}))?)?$")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # lone surrogates left by errors="surrogateescape"
_BATCH_ROWS = 4096
MAX_CSV_FIELD = 1 << 20  # characters in one cell or header line (the csv module's default is 128 KiB)
csv.field_size_limit(MAX_CSV_FIELD)


class MappingError(ValueError):
    """A mapping file is missing, unreadable or inconsistent; the message is one line naming the file."""


@dataclass(frozen=True)
class Mapping:
    path: Path
    type: str
    business_unit: str
    source: str
    time: str                                   # column holding the event time
    id: str | None = None                       # column holding a unique row id, None: content hash
    columns: tuple[tuple[str, str], ...] = ()   # (field path under data, column name)
    constants: tuple[tuple[str, Any], ...] = () # (field path under data, value)
    field_types: tuple[tuple[str, str], ...] = ()  # (field path under data, JSON type) of mapped fields

    @property
    def needed_columns(self) -> tuple[str, ...]:
        """Every column the mapping reads, in a stable order without duplicates."""
        cols = [self.time, *(self.id and [self.id] or []), *(c for _, c in self.columns)]
        return tuple(dict.fromkeys(cols))


# ---------------------------------------------------------------------------------------- mapping
def mapping_for(data_path: Path, explicit: Path | None) -> Path:
    """The mapping file of ``data_path``: ``explicit`` when given, else ``<stem>.mapping.toml`` beside it."""
    if explicit is not None:
        explicit = Path(explicit)
        if not explicit.is_file():
            raise MappingError(f"{explicit}: mapping file not found")
        return explicit
    data_path = Path(data_path)
    candidate = data_path.with_name(f"{data_path.stem}.mapping.toml")
    if not candidate.is_file():
        raise MappingError(f"{data_path}: no mapping file (expected {candidate.name} beside it, or give one explicitly)")
    return candidate


def load_mapping(path: Path, validator: EventValidator) -> Mapping:
    """Parse and check a TOML mapping file; any problem raises ``MappingError``."""
    path = Path(path)

    def fail(what: str) -> MappingError:
        return MappingError(f"{path}: {what}")

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise fail("mapping file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read mapping: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"invalid TOML: {exc}") from None

    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("type", "business_unit", "source", "time"):
        if key not in raw:
            raise fail(f"required key {key!r} is missing")
    for key in ("type", "business_unit", "source", "time", "id"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise fail(f"{key!r} must be a non-empty string")
    etype = raw["type"]
    if etype not in validator.types:
        raise fail(f"unknown event type {etype!r} (known: {', '.join(sorted(validator.types))})")
    if not _BUSINESS_UNIT.match(raw["business_unit"]):
        raise fail(f"business_unit {raw['business_unit']!r} must match {_BUSINESS_UNIT.pattern}")

    types = {p[len("data."):]: t for p, t in validator.field_types(etype).items()}
    types.pop("business_unit", None)
    columns = raw.get("columns", {})
    constants = raw.get("constants", {})
    for name, table in (("columns", columns), ("constants", constants)):
        if not isinstance(table, dict):
            raise fail(f"[{name}] must be a table")
        for field in table:
            if field == "business_unit":
                raise fail(f"[{name}] business_unit: set it with the top-level key business_unit")
            if field not in types:
                raise fail(f"[{name}] unknown field path {field!r} for {etype} "
                           f"(known: {', '.join(sorted(types))})")
    for field, col in columns.items():
        if not isinstance(col, str) or not col.strip():
            raise fail(f"[columns] {field!r}: column name must be a non-empty string")
    both = sorted(set(columns) & set(constants))
    if both:
        raise fail(f"field(s) {', '.join(map(repr, both))} in both [columns] and [constants]")
    for field, value in constants.items():
        ok, coerced = _coerce_constant(value, types[field])
        if not ok:
            raise fail(f"[constants] {field!r}: {value!r} is not a {types[field]}")
        constants[field] = coerced
    required = {p[len("data."):] for p in validator.required_fields(etype)} - {"business_unit"}
    missing = sorted(required - set(columns) - set(constants))
    if missing:
        raise fail(f"required field(s) of {etype} not mapped: {', '.join(missing)}")

    mapped = {**columns, **constants}
    return Mapping(
        path=path, type=etype, business_unit=raw["business_unit"], source=raw["source"],
        time=raw["time"], id=raw.get("id"),
        columns=tuple(columns.items()), constants=tuple(constants.items()),
        field_types=tuple((f, types[f]) for f in mapped),
    )


def _coerce_constant(value: Any, kind: str) -> tuple[bool, Any]:
    if kind == "string":
        return isinstance(value, str), value
    if kind == "boolean":
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, value
    if kind == "integer":
        return isinstance(value, int), value
    if kind == "number":
        return isinstance(value, (int, float)) and math.isfinite(value), float(value) if isinstance(value, (int, float)) else value
    return False, value


# ---------------------------------------------------------------------------------------- reading
def iter_tabular(path: Path, mapping: Mapping, validator: EventValidator) -> Iterator[tuple[str, dict | str, str | None]]:
    """Yield ``(origin, event or reason, input)`` per row: a CloudEvent dict, or a reason (str) for a row
    that does not fit the mapping; input is the row as read (CSV text always, a Parquet row as JSON
    only when rejected here), None when there is no row."""
    path = Path(path)
    suffix = path.suffix.lower()
    builder = _RowBuilder(mapping, validator)
    if suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(path, builder)
    elif suffix in CSV_SUFFIXES:
        yield from _iter_csv(path, builder)
    else:
        raise ValueError(f"{path}: not a CSV or Parquet file (suffix {path.suffix!r})")


class _RowBuilder:
    """Turns one row (column name -> cell value) into a CloudEvent dict or a reason string."""

    def __init__(self, mapping: Mapping, validator: EventValidator):
        self.m = mapping
        types = dict(mapping.field_types)
        self.cols = [(col, tuple(field.split(".")), types[field]) for field, col in mapping.columns]
        self.consts = [(tuple(field.split(".")), value) for field, value in mapping.constants]

    def missing_columns(self, header: list[str]) -> list[str]:
        present = set(header)
        return [c for c in self.m.needed_columns if c not in present]

    def build(self, row: dict[str, Any]) -> dict | str:
        m = self.m
        time = _coerce_time(row.get(m.time))
        if time is None:
            value = row.get(m.time)
            return f"column {m.time!r} (time) is empty" if _is_empty(value) else \
                f"column {m.time!r} (time): {_show(value)} is not a date-time (RFC 3339 or YYYY-MM-DD[ HH:MM[:SS]])"
        customer: dict[str, Any] = {}
        data: dict[str, Any] = {"business_unit": m.business_unit, "customer": customer}
        for parts, value in self.consts:
            _put(data, parts, value)
        for col, parts, kind in self.cols:
            value = row.get(col)
            if _is_empty(value):
                continue
            ok, coerced = _coerce(value, kind)
            if not ok:
                return f"column {col!r} ({'.'.join(parts)}): {_show(value)} is not a {kind}"
            _put(data, parts, coerced)
        body = {"type": m.type, "source": m.source, "time": time, "data": data}
        if m.id is not None:
            raw_id = row.get(m.id)
            if _is_empty(raw_id):
                return f"column {m.id!r} (id) is empty"
            ok, event_id = _coerce(raw_id, "string")
        else:
            digest = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False,
                                               separators=(",", ":")).encode()).hexdigest()
            event_id = f"row-{digest[:32]}"
        return {"specversion": "1.0", "id": event_id, "source": m.source, "type": m.type,
                "time": time, "datacontenttype": "application/json", "data": data}


class _Lines:
    """The file's physical lines as the csv reader pulls them, remembering which lines made the
    current record, and taking lines back: when a quote never closes, the reader swallows the
    lines after it; they are handed back and read again as rows of their own."""

    def __init__(self, lines: Iterator[str]):
        self._lines = lines
        self._returned: deque[str] = deque()
        self.taken: list[str] = []
        self.number = 0  # physical line number of the last line taken (1 = header)

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        line = self._returned.popleft() if self._returned else next(self._lines)
        self.number += 1
        self.taken.append(line)
        return line

    def start_record(self) -> int:
        """Forget the previous record's lines; returns the line number the next record starts on."""
        self.taken = []
        return self.number + 1

    def give_back(self, lines: list[str]) -> None:
        self._returned.extendleft(reversed(lines))
        self.number -= len(lines)


def _iter_csv(path: Path, builder: _RowBuilder) -> Iterator[tuple[str, dict | str, str | None]]:
    name = path.name
    # surrogateescape: a bad byte never raises; rows containing one are rejected below.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        lines = _Lines(iter(f))
        first = f.readline(MAX_CSV_FIELD + 1)
        if len(first) > MAX_CSV_FIELD:
            yield f"{name}:header", f"header line is longer than {MAX_CSV_FIELD:,} characters; no rows read", None
            return
        if not first.strip():
            yield f"{name}:header", "file is empty or has no header line", None
            return
        try:
            dialect = csv.Sniffer().sniff(first, delimiters=",;\t")
            delimiter = dialect.delimiter
        except csv.Error:
            delimiter = ","
        try:
            header = [h.strip() for h in next(csv.reader([first], delimiter=delimiter))]
        except csv.Error as exc:
            yield f"{name}:header", f"unreadable header line: {exc}; no rows read", _show_raw(first)
            return
        lines.number = 1
        if _NOT_UTF8.search("".join(header)):
            yield f"{name}:header", "header line is not valid UTF-8; no rows read", _show_raw(first)
            return
        missing = builder.missing_columns(header)
        if missing:
            yield f"{name}:header", (f"mapped column(s) {', '.join(map(repr, missing))} not in the header "
                                     f"(delimiter {delimiter!r}); no rows read"), _show_raw(first)
            return
        dupes = sorted({h for h in header if header.count(h) > 1} & set(builder.m.needed_columns))
        if dupes:
            yield f"{name}:header", f"mapped column(s) {', '.join(map(repr, dupes))} appear more than once; no rows read", \
                _show_raw(first)
            return
        reader = csv.reader(lines, delimiter=delimiter)
        width = len(header)
        n = 0
        while True:
            line = lines.start_record()
            try:
                cells = next(reader)
                problem = None
            except StopIteration:
                return
            except csv.Error as exc:
                cells, problem = None, f"unreadable CSV row on line {line}: {exc}"
            if cells is not None and not any(c.strip() for c in cells):
                continue  # blank line
            if cells is not None and len(cells) != width and \
                    not (len(cells) > width and not any(c.strip() for c in cells[width:])):
                problem = f"expected {width} cells like the header, found {len(cells)} (line {line})"
            taken = lines.taken
            if problem is not None and len(taken) > 1:
                # a quote left open swallowed the lines after it: only its own line is rejected
                lines.give_back(taken[1:])
                reader = csv.reader(lines, delimiter=delimiter)
                problem, taken = f"unreadable CSV row on line {line}: a quoted value is not closed on its line", taken[:1]
            raw = _show_raw(taken[0] if len(taken) == 1 else "".join(taken))
            n += 1
            origin = f"{name}:row {n}"
            if problem is not None:
                yield origin, problem, raw
                continue
            if _NOT_UTF8.search("".join(cells)):
                yield origin, "row is not valid UTF-8", raw
                continue
            yield origin, builder.build({h: c.strip() for h, c in zip(header, cells)}), raw


def _show_raw(text: str) -> str:
    """A row as read, for the dead-letter: line end dropped, undecodable bytes as U+FFFD."""
    return _NOT_UTF8.sub("\ufffd", text.rstrip("\r\n"))


def _iter_parquet(path: Path, builder: _RowBuilder) -> Iterator[tuple[str, dict | str]]:
    import pyarrow.parquet as pq

    name = path.name
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - corrupt or not Parquet at all
        yield f"{name}:header", f"not a readable Parquet file: {exc}", None
        return
    header = list(pf.schema_arrow.names)
    missing = builder.missing_columns(header)
    if missing:
        yield f"{name}:header", (f"mapped column(s) {', '.join(map(repr, missing))} not in the file's columns; "
                                 "no rows read"), None
        return
    n = 0
    batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=list(builder.m.needed_columns))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - a corrupt row group ends the file
            yield f"{name}:row {n + 1}", f"unreadable Parquet data from here on: {exc}", None
            return
        first = n + 1
        for row in _batch_rows(batch):
            n += 1
            if isinstance(row, str):  # a value Python cannot hold (a timestamp past year 9999, say)
                yield f"{name}:row {n}", row, _row_text(batch, n - first)
                continue
            try:
                event = builder.build(row)
            except Exception as exc:  # noqa: BLE001 - an odd value type must not stop the file
                event = f"cannot convert row: {exc}"
            yield f"{name}:row {n}", event, _row_json(row) if isinstance(event, str) else None


def _row_text(batch: Any, index: int) -> str | None:
    """One row as JSON with every value as Arrow prints it, for rows Python cannot convert."""
    import pyarrow as pa

    try:
        return json.dumps({name: column.slice(index, 1).cast(pa.string())[0].as_py()
                           for name, column in zip(batch.schema.names, batch.columns)}, ensure_ascii=False)
    except Exception:  # noqa: BLE001 - then the reason alone must do
        return None


def _batch_rows(batch: Any) -> list[dict[str, Any] | str]:
    """The batch's rows as dicts in one conversion; when a value cannot be converted, row by row, so
    only the rows holding such a value are lost (as a reason string)."""
    try:
        return batch.to_pylist()
    except Exception:  # noqa: BLE001 - Arrow raises ValueError/OverflowError/ArrowException
        rows: list[dict[str, Any] | str] = []
        for i in range(batch.num_rows):
            try:
                rows.append(batch.slice(i, 1).to_pylist()[0])
            except Exception as exc:  # noqa: BLE001
                rows.append(f"cannot convert row: {exc}")
        return rows


# ---------------------------------------------------------------------------------------- values
def _row_json(row: dict[str, Any]) -> str:
    """A Parquet row as JSON text for the dead-letter (values JSON cannot hold as text)."""
    return json.dumps(row, default=str, ensure_ascii=False)


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or \
        (isinstance(value, float) and math.isnan(value))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _put(data: dict, parts: tuple[str, ...], value: Any) -> None:
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _coerce(value: Any, kind: str) -> tuple[bool, Any]:
    """(ok, value as the schema's JSON type). Strings come from CSV; Parquet gives typed values."""
    if isinstance(value, str):
        s = value.strip()
        if kind == "string":
            return True, s
        if kind == "number":
            if not _NUMBER.match(s):
                return False, value
            return True, float(s.replace(",", "."))
        if kind == "integer":
            if not _INTEGER.match(s):
                return False, value
            return True, int(float(s.replace(",", ".")))
        if kind == "boolean":
            low = s.lower()
            if low in _TRUE:
                return True, True
            if low in _FALSE:
                return True, False
            return False, value
        return False, value
    if kind == "string":
        if isinstance(value, bool):
            return True, "true" if value else "false"
        if isinstance(value, float) and value.is_integer():
            return True, str(int(value))
        if isinstance(value, (dt.date, dt.time)):
            return True, value.isoformat()
        if isinstance(value, (int, float, decimal.Decimal)):
            return True, str(value)
        if isinstance(value, bytes):
            try:
                return True, value.decode("utf-8").strip()
            except UnicodeDecodeError:
                return False, value
        return False, value
    if isinstance(value, bool):
        return (True, value) if kind == "boolean" else (False, value)
    if kind == "boolean":
        if isinstance(value, int) and value in (0, 1):
            return True, bool(value)
        return False, value
    if isinstance(value, (int, float, decimal.Decimal)):
        f = float(value)
        if not math.isfinite(f):
            return False, value
        if kind == "number":
            return True, f
        if kind == "integer" and f.is_integer():
            return True, int(value)
    return False, value


def _coerce_time(value: Any) -> str | None:
    """RFC 3339 string for the event time, or None when missing / not understood."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return _iso(value)
    if isinstance(value, dt.date):
        return f"{value.isoformat()}T00:00:00Z"
    if not isinstance(value, str):
        return None
    s = value.strip()
    if _RFC3339.match(s):
        try:
            dt.datetime.fromisoformat(s.upper().replace("Z", "+00:00"))
        except ValueError:
            return None
        return s
    local = _LOCAL.match(s)
    if local:
        try:
            parsed = dt.datetime.fromisoformat(local.group(1)).replace(
                hour=int(local.group(2) or 0), minute=int(local.group(3) or 0), second=int(local.group(4) or 0),
                tzinfo=dt.timezone.utc)
        except ValueError:
            return None
        return _iso(parsed)
    return None


def _iso(value: dt.datetime) -> str:
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text
