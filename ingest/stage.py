"""The ingest stage: raw input in, `Accepted` or `Rejected` out, never an exception.

Order of checks is the order of cost: size, UTF-8, JSON, schema (one compiled validator call),
then normalisation. Every refusal becomes a `Rejected` carrying the reason and the input.
"""
from __future__ import annotations

import os
import sys
from hashlib import blake2b
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import orjson

from ingest import normalise
from ingest.lines import Oversize, read_lines
from ingest.ranges import OutOfRange, Ranges, TimeWindow, check_event
from ingest.records import Accepted, Rejected
from ingest.tabular import TABULAR_SUFFIXES
from ingest.validation import EventValidator

PARALLEL_MIN_BYTES = 4 << 20  # below this, starting a parsing process costs more than it saves


class InputError(ValueError):
    """An input that cannot be opened at all (missing file, no mapping); one clear line."""


def event_key(source: str, event_id: str) -> str:
    """`source` and `id` as one text that no other pair can produce: the source's length comes
    first, so ("a:b", "c") and ("a", "b:c") stay apart whatever characters they hold."""
    return f"{len(source)}:{source}:{event_id}"


def content_digest(accepted: Accepted) -> str:
    """What an event says, as 16 hex digits: a re-sent id with other content is a conflict, not
    a duplicate. Computed from the normalised event, so spacing and key order do not count."""
    body = (accepted.type, accepted.time, accepted.business_unit, accepted.source_id, accepted.subject,
            accepted.profile, accepted.data)
    return blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


class Ingestor:
    """Turns inputs into normalised records. `region_for(unit)` gives the default phone region."""

    def __init__(self, validator: EventValidator, region_for: Callable[[str], str], max_event_bytes: int,
                 parse_workers: Callable[[], Any] | None = None, ranges: Ranges = Ranges()):
        self.validator = validator
        self.ranges = ranges
        self.window = TimeWindow(ranges.max_future)
        self.region_for = region_for
        self.max_event_bytes = max_event_bytes
        self._parse_workers = parse_workers  # makes ParseWorkers for large JSONL inputs; None: parse here
        self._workers: Any = None
        self.bytes_read = 0  # for progress bars
        self.keep_raw = False  # Accepted.raw: only a publisher needs the event as sent

    # -- single events ---------------------------------------------------------------------

    def from_line(self, line: bytes | Oversize, origin: str) -> Accepted | Rejected:
        if isinstance(line, Oversize):
            return Rejected(
                reason=f"line of {line.size} bytes exceeds the limit of {self.max_event_bytes} bytes (CDP_MAX_EVENT_BYTES)",
                origin=origin,
                kind="oversize",
                raw=_text(line.head) + "…",
            )
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return Rejected(reason=f"invalid UTF-8 at byte {bad.start}", origin=origin, kind="encoding",
                                raw=_text(line))
            return Rejected(reason=f"malformed JSON: {error}", origin=origin, kind="json", raw=_text(line))
        return self.from_event(event, origin, line)

    def from_message(self, value: bytes | None, origin: str) -> Accepted | Rejected:
        """One message from a broker, checked exactly like one line of a file."""
        value = value or b""
        if len(value) > self.max_event_bytes:
            return self.from_line(Oversize(size=len(value), head=value[:200]), origin)
        return self.from_line(value, origin)

    def from_event(self, event: Any, origin: str, raw: bytes | None = None) -> Accepted | Rejected:
        """Never raises: whatever goes wrong with one event is that event's rejection."""
        try:
            return self._accept(event, origin, raw)
        except Exception as error:  # noqa: BLE001 - one bad record must never cost the others
            return self._reject(f"cannot process event: {type(error).__name__}: {error}", "error", origin, event, raw)

    def _accept(self, event: Any, origin: str, raw: bytes | None) -> Accepted | Rejected:
        problem = self.validator.check(event)
        if problem is not None:
            return self._reject(problem, "schema", origin, event, raw)
        data = event["data"]
        unit = data["business_unit"]
        try:
            check_event(event, self.ranges)
        except OutOfRange as error:
            return self._reject(f"event {event['id']!r}: {error}", "range", origin, event, raw)
        try:
            time = normalise.event_time(event["time"], self.window)
        except normalise.InvalidValue as error:
            return self._reject(f"event {event['id']!r}: {error}", "range", origin, event, raw)
        try:
            profile, identifiers = normalise.customer(data["customer"], self.region_for(unit))
        except normalise.InvalidValue as error:
            return self._reject(f"event {event['id']!r}: {error}", "value", origin, event, raw)
        fields = {k: v for k, v in data.items() if k != "customer" and k != "business_unit"}
        accepted = Accepted(
            key=event_key(event["source"], event["id"]),
            event_id=event["id"],
            source=event["source"],
            type=event["type"],
            time=time,
            business_unit=unit,
            source_id=data["customer"]["source_id"],
            identifiers=identifiers,
            profile=profile,
            data=fields,
            origin=origin,
            subject=event.get("subject"),
            raw=(raw if raw is not None else orjson.dumps(event)) if self.keep_raw else None,
        )
        accepted.digest = content_digest(accepted)
        return accepted

    @staticmethod
    def _reject(reason: str, kind: str, origin: str, event: Any, raw: bytes | None) -> Rejected:
        is_obj = isinstance(event, dict)
        return Rejected(
            reason=reason,
            origin=origin,
            kind=kind,
            raw=_text(raw) if raw is not None else orjson.dumps(event, default=str).decode(),
            event_id=str(event.get("id")) if is_obj and event.get("id") is not None else None,
            source=str(event.get("source")) if is_obj and event.get("source") is not None else None,
        )

    # -- whole inputs ----------------------------------------------------------------------

    def read(self, paths: Iterable[str], mapping: Path | None = None) -> Iterator[Accepted | Rejected]:
        """Every record of every input in order; '-' is standard input (JSONL). Every mapping is
        loaded before the first record is read, so a missing one fails the run before any work; a
        file that breaks while being read costs its own remaining records, not the other files'."""
        paths = list(paths)
        specs = self.mappings(paths, mapping)
        for path in paths:
            if path == "-":
                yield from self.read_jsonl(sys.stdin.buffer, "stdin")
                continue
            file = Path(path)
            try:
                if path in specs:
                    yield from self.read_tabular(file, specs[path])
                elif self._workers is not None and file.stat().st_size >= PARALLEL_MIN_BYTES:
                    with open(file, "rb") as stream:
                        yield from self._workers.records(stream, file.name, self.max_event_bytes, self._count_bytes)
                else:
                    with open(file, "rb") as stream:
                        yield from self.read_jsonl(stream, file.name)
            except OSError as error:
                yield Rejected(reason=f"cannot read {file.name}: {error.strerror or error}; the rest of the file "
                                      "was not read", origin=f"{file.name}:file", kind="file")

    def mappings(self, paths: Iterable[str], mapping: Path | None) -> dict[str, Any]:
        """The loaded mapping of every CSV/Parquet input; all problems reported together."""
        from ingest.tabular import MappingError, load_mapping, mapping_for

        specs, problems = {}, []
        for path in paths:
            if path != "-" and Path(path).suffix.lower() in TABULAR_SUFFIXES:
                try:
                    specs[path] = load_mapping(mapping_for(Path(path), mapping), self.validator)
                except MappingError as error:
                    problems.append(str(error))
        if problems:
            raise InputError("; ".join(problems) + " (nothing was ingested)")
        return specs

    def prepare(self, paths: Iterable[str]) -> None:
        """Starts the parsing processes if an input is large enough to be worth them; call it
        before starting threads, because the processes are forked."""
        if self._parse_workers is None or self._workers is not None:
            return
        if any(p != "-" and Path(p).suffix.lower() not in TABULAR_SUFFIXES
               and Path(p).stat().st_size >= PARALLEL_MIN_BYTES for p in paths):
            self._workers = self._parse_workers()

    def _count_bytes(self, n: int) -> None:
        self.bytes_read += n

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def read_jsonl(self, stream, name: str) -> Iterator[Accepted | Rejected]:
        before = 0
        for number, line in read_lines(stream, self.max_event_bytes):
            yield self.from_line(line, f"{name}:{number}")
            try:
                position = stream.tell()
            except (OSError, ValueError):
                position = before + (len(line) + 1 if isinstance(line, bytes) else line.size + 1)
            self.bytes_read += position - before
            before = position

    def read_tabular(self, file: Path, spec: Any) -> Iterator[Accepted | Rejected]:
        from ingest.tabular import iter_tabular

        for origin, item, row in iter_tabular(file, spec, self.validator):
            if isinstance(item, str):
                yield Rejected(reason=item, origin=origin, kind="mapping", raw=row)
                continue
            record = self.from_event(item, origin)
            if row is not None and type(record) is Rejected:
                record.raw, record.extra = row, {"event": record.raw}  # the row as sent, and what it became
            yield record
        self.bytes_read += file.stat().st_size


def check_inputs(paths: Iterable[str]) -> list[str]:
    """The inputs as given, after checking each exists, so a typo fails before any work starts."""
    checked = []
    for path in paths:
        if path != "-" and not Path(path).is_file():
            raise InputError(f"no such file: {path}")
        if path != "-" and not os.access(path, os.R_OK):
            raise InputError(f"cannot read {path}: permission denied")
        checked.append(path)
    return checked


def total_bytes(paths: Iterable[str]) -> int | None:
    """Size of all inputs for a progress bar; None when one of them is a stream."""
    total = 0
    for path in paths:
        if path == "-":
            return None
        total += Path(path).stat().st_size
    return total
