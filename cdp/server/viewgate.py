"""Who may use the view's database while the server rewrites its file after an erasure.

The rewrite (Service.rewrite_view) pauses the view's writers (`WriterPause`: the read side's
upkeep, which scores, publishes and delivers, for the copy; its projecting thread for the copy's
last catch-up) and copies the tables into a fresh file while requests go on reading; then, for the
swap alone, it closes the readers' gate (`ViewGate`), waits for the requests in flight, closes the
old database, puts the fresh file in its place and opens a new read side on it. A request that
comes meanwhile waits up to WAIT_SECONDS for the swap, then is answered 503 with `Retry-After`.
Requests that never touch the view (the collector, the documentation, the console's static files)
pass. People's decisions are held back for the whole rewrite, copy included (`decision_gate`):
one that comes meanwhile waits outside the readers' gate, up to DECISION_WAIT_SECONDS.
"""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import orjson

WAIT_SECONDS = 5  # how long a request waits for a rewrite to end before it is refused
# … and a person's decision, which waits outside the readers' gate (DECISIONS): a rewrite refuses
# decisions from its start, copy included (3-11 s on a million events or customers: bench.privacy)
DECISION_WAIT_SECONDS = 30
RETRY_AFTER_SECONDS = 5
# the collector answers from the intake or the broker, the rest from files of the package
VIEW_FREE = ("/v1/batch", "/v1/identify", "/v1/track", "/v1/page", "/v1/screen", "/v1/group", "/v1/alias",
             "/events", "/health", "/docs", "/openapi.json", "/console/static")
# Requests that may be a person's decision (Service.steward: an erasure, a split, a review, an
# audience's definition): every one that changes something, but the read-only POSTs
READS = ("GET", "HEAD", "OPTIONS")
READ_ONLY_POSTS = ("/v1/query", "/login", "/logout")


class ViewGate:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._inside = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def enter(self) -> bool:
        """False while the view is being rewritten (then do not touch it); else `leave()` after."""
        with self._changed:
            if self._closed:
                return False
            self._inside += 1
            return True

    def leave(self) -> None:
        with self._changed:
            self._inside -= 1
            self._changed.notify_all()

    def close(self, timeout: float) -> bool:
        """Refuses new entries and waits for those inside; False (and open again) if they did not
        all leave within `timeout` seconds."""
        with self._changed:
            self._closed = True
            if self._changed.wait_for(lambda: self._inside == 0, timeout):
                return True
            self._closed = False
            return False

    def open(self) -> None:
        with self._changed:
            self._closed = False


class WriterPause:
    """The view's writers hold it while they write: `with pause.writing() as allowed`, and write
    only if allowed. `pause` holds new writers back and waits for those writing, so the tables
    stand still while they are copied; `resume` lets them on, `end` sends them away for good (the
    read side they belong to is being replaced: what they would write goes to the new one)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._writing = 0
        self._paused = self._ended = False

    @contextmanager
    def writing(self) -> Iterator[bool]:
        with self._changed:
            self._changed.wait_for(lambda: not self._paused or self._ended)
            allowed = not self._ended
            self._writing += allowed
        try:
            yield allowed
        finally:
            if allowed:
                with self._changed:
                    self._writing -= 1
                    self._changed.notify_all()

    def pause(self, timeout: float) -> bool:
        """Holds new writers back and waits for those writing; False (and resumed) if they did
        not all finish within `timeout` seconds."""
        with self._changed:
            self._paused = True
            if self._changed.wait_for(lambda: self._writing == 0, timeout):
                return True
            self._paused = False
            self._changed.notify_all()
            return False

    def resume(self) -> None:
        with self._changed:
            self._paused = False
            self._changed.notify_all()

    def end(self) -> None:
        with self._changed:
            self._ended = True
            self._changed.notify_all()


REWRITING = "view_rewriting"
REWRITING_MESSAGE = f"the view's file is being rewritten after an erasure; try again in {RETRY_AFTER_SECONDS} s"


def rewriting_answer() -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = orjson.dumps({"code": REWRITING, "message": REWRITING_MESSAGE})
    return body, [(b"content-type", b"application/json"), (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
                  (b"content-length", str(len(body)).encode())]


class ViewRequests:
    """ASGI middleware: a request that may read the view holds the gate while it runs. One that
    may be a person's decision first waits for the `decisions` gate to open, outside the readers'
    gate: the rewrite refuses decisions from its start, and one waiting inside would hold its swap
    back (Service.rewrite_view)."""

    def __init__(self, app: Any, gate: ViewGate, decisions: ViewGate | None = None):
        self.app, self.gate, self.decisions = app, gate, decisions

    async def entered(self) -> bool:
        """Enters the gate, waiting (without holding the event loop) up to WAIT_SECONDS for a rewrite."""
        return await _waited(lambda: self.gate.enter(), WAIT_SECONDS)

    async def decisions_open(self, scope: dict) -> bool:
        """Whether a person's decision may go on: not one, or no rewrite under way, or it ended
        within DECISION_WAIT_SECONDS."""
        if self.decisions is None or scope.get("method") in READS or scope.get("path", "").startswith(READ_ONLY_POSTS):
            return True
        return await _waited(lambda: not self.decisions.closed, DECISION_WAIT_SECONDS)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(VIEW_FREE):
            await self.app(scope, receive, send)
            return
        if not (await self.decisions_open(scope) and await self.entered()):
            body, headers = rewriting_answer()
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.leave()


async def _waited(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition()` held within `seconds`, asked every 50 ms without holding the event loop."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True
