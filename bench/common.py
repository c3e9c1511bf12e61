"""Shared pieces of the benchmarks: cached generated data, timing, and printing figures as ratios."""
from __future__ import annotations

import http.client
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from cdp.demo import DemoFiles, DemoSpec, generate

CACHE = Path(__file__).resolve().parent / "out"
PEOPLE_PER_EVENT = 1 / 12.3  # the generator makes ≈12.3 valid events per person


def demo_files(events: int, seed: int = 11, hard: bool = False) -> DemoFiles:
    """Generated JSONL files with about `events` events, generated once and kept under bench/out."""
    people = max(100, round(events * PEOPLE_PER_EVENT))
    directory = CACHE / f"demo-{people}-{seed}{'-hard' if hard else ''}"
    spec = DemoSpec(people=people, seed=seed, hard=hard)
    marker = directory / "done"
    if marker.exists():
        return generate_listing(directory, spec)
    files = generate(directory, spec)
    marker.write_text(str(files.events))
    return files


def generate_listing(directory: Path, spec: DemoSpec) -> DemoFiles:
    files = sorted(p for p in directory.glob("*.jsonl"))
    events = int((directory / "done").read_text())
    return DemoFiles(event_files=files, truth_file=directory / "truth.csv", events=events, invalid=0,
                     source_records=0, people=spec.people)


@contextmanager
def timer() -> Iterator[dict]:
    box: dict = {}
    started = time.perf_counter()
    yield box
    box["seconds"] = time.perf_counter() - started


def peak_rss_children_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def report(title: str, rows: list[tuple[str, float, str]], target: str | None = None) -> None:
    """Prints `name  value unit  (ratio to the first row)`: the first row is the figure measured."""
    print(f"\n== {title}")
    base = rows[0][1]
    for name, value, unit in rows:
        ratio = f"  x{base / value:.2f} (ours / this)" if value and name != rows[0][0] else ""
        print(f"  {name:<55} {value:>12,.0f} {unit}{ratio}")
    if target:
        print(f"  target: {target}")


class KeepAlive:
    """A keep-alive HTTP/1.1 connection per thread (http.client) for load generators that share the
    machine with the server they measure: httpx took ~0.4 ms of CPU per request against 0.1 ms here,
    and ~20 ms to make a client, CPU taken from the server on a 2-core machine."""

    def __init__(self, url: str, headers: dict[str, str]):
        parts = urlsplit(url)
        self.host, self.port, self.headers = parts.hostname, parts.port, headers
        self._local = threading.local()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> int:
        """The answer's status. A connection the server closed while idle is opened again once
        (the request had not reached the server: sending it again changes nothing)."""
        headers = {**self.headers, **(headers or {})}
        try:
            return self._send(method, path, body, headers)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self._local.connection.close()
            self._local.connection = None
            return self._send(method, path, body, headers)

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> int:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        answer.read()
        return answer.status
