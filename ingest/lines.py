"""Reading newline-delimited input in bounded memory.

An oversize line is never held whole: it is skipped to its end and reported, so one bad line of a
gigabyte cannot exhaust memory or stop the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterator

CHUNK = 1 << 16


@dataclass(slots=True)
class Oversize:
    size: int
    head: bytes


def read_lines(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | Oversize]]:
    """(line number, line without its newline) or (line number, Oversize) for each non-blank line."""
    number = 0
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        number += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            head, size = line[:200], len(line)
            while True:  # drain the rest of the line in chunks
                rest = stream.readline(CHUNK)
                size += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, Oversize(size=size - (1 if rest.endswith(b"\n") else 0), head=head)
            continue
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield number, line
