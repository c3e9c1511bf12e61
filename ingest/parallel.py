"""Parsing, validation and normalisation in a helper process.

On a two-core machine the pipeline's own process is busy with identity and storage; handing the
per-line work (JSON, schema, normalisation) to another process lets both cores work. Lines go out
and records come back in chunks, as plain tuples (cheap to pickle), in input order, with a bounded
number of chunks in flight so memory stays flat however large the input.
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from dataclasses import fields
from typing import Any, BinaryIO, Callable, Iterator

from ingest.lines import Oversize, read_lines
from ingest.records import Accepted, Rejected

CHUNK_LINES = 2000
IN_FLIGHT = 6

_ACCEPTED = tuple(f.name for f in fields(Accepted))
_REJECTED = tuple(f.name for f in fields(Rejected))
_ingestor: Any = None


def pack(record: Accepted | Rejected) -> tuple:
    names = _ACCEPTED if type(record) is Accepted else _REJECTED
    return (type(record) is Accepted, *(getattr(record, n) for n in names))


def unpack(item: tuple) -> Accepted | Rejected:
    return Accepted(*item[1:]) if item[0] else Rejected(*item[1:])


def _start(factory: Callable[[], Any]) -> None:
    global _ingestor
    _ingestor = factory()


def _parse(chunk: list[tuple[str, bytes | Oversize]]) -> list[tuple]:
    return [pack(_ingestor.from_line(line, origin)) for origin, line in chunk]


class ParseWorkers:
    """A pool of parsing processes built from `factory` (a picklable callable returning an Ingestor)."""

    def __init__(self, factory: Callable[[], Any], processes: int):
        # Forked, so children start at once with the modules already loaded; the caller creates the
        # pool before it starts any thread of its own (see Ingestor.prepare).
        context = multiprocessing.get_context("fork")
        self._pool = context.Pool(processes, initializer=_start, initargs=(factory,))

    def records(self, stream: BinaryIO, name: str, max_bytes: int,
                on_bytes: Callable[[int], None]) -> Iterator[Accepted | Rejected]:
        pending: deque = deque()
        for chunk in self._chunks(stream, name, max_bytes, on_bytes):
            pending.append(self._pool.apply_async(_parse, (chunk,)))
            if len(pending) >= IN_FLIGHT:
                yield from map(unpack, pending.popleft().get())
        while pending:
            yield from map(unpack, pending.popleft().get())

    @staticmethod
    def _chunks(stream: BinaryIO, name: str, max_bytes: int, on_bytes: Callable[[int], None]):
        chunk: list = []
        size = 0
        for number, line in read_lines(stream, max_bytes):
            chunk.append((f"{name}:{number}", line))
            size += (len(line) if isinstance(line, bytes) else line.size) + 1
            if len(chunk) >= CHUNK_LINES:
                yield chunk
                on_bytes(size)
                chunk, size = [], 0
        if chunk:
            yield chunk
            on_bytes(size)

    def close(self) -> None:
        self._pool.close()
        self._pool.join()
