"""The audit trail's two helpers: the writer a running server records reads with, off the request
path, and the filter `cdp audit` and `GET /v1/audit` share.

Entries are events in the store (the `AuditLog` aggregate, cdp/domain.py), appended by the
application's `record_accesses` command. A profile read must not wait for a store commit, so
`AuditTrail.record` only queues the entry; a thread appends what has queued, one command per
batch, every `interval` seconds. `close` (a clean shutdown, SIGTERM) appends the rest; a process
killed with SIGKILL loses what was queued and not yet appended (at most `interval` seconds of
reads). Erasures, splits and key changes are not queued: their entry commits with the change.
"""
from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Callable, Iterable, Sequence

Entry = tuple[str, str, "str | None", dict]  # actor, action, customer id, detail
FLUSH_SECONDS = 0.5


class AuditTrail:
    def __init__(self, append: Callable[[Sequence[Entry]], None], interval: float = FLUSH_SECONDS,
                 on_error: Callable[[BaseException], None] | None = None):
        """`append(entries)` commits a batch (the application's `record_accesses`)."""
        self.append = append
        self.interval = interval
        self.on_error = on_error
        self._queued: list[Entry] = []
        self._lock = threading.Lock()  # the queue
        self._writing = threading.Lock()  # one append at a time, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdp-audit", daemon=True)
        self._thread.start()

    def record(self, actor: str, action: str, customer_id: str | None = None, **detail: object) -> None:
        with self._lock:
            self._queued.append((actor, action, customer_id, detail))

    def flush(self) -> None:
        """Appends what is queued now (before the trail is read, and at shutdown)."""
        with self._writing:
            with self._lock:
                entries, self._queued = self._queued, []
            if not entries:
                return
            try:
                self.append(entries)
            except BaseException:
                with self._lock:  # kept, in order, for the next attempt
                    self._queued[:0] = entries
                raise

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception as error:  # the store away: retried at the next tick
                if self.on_error is not None:
                    self.on_error(error)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.flush()


def since(text: str) -> datetime:
    """An ISO 8601 date or time (UTC when it names no zone); ValueError otherwise."""
    start = datetime.fromisoformat(text)
    return start if start.tzinfo else start.replace(tzinfo=timezone.utc)


def select(entries: Iterable[dict], customer_ids: set[str] | None = None,
           start: datetime | None = None) -> list[dict]:
    """Entries about one of `customer_ids` (None: all) recorded at or after `start`."""
    return [e for e in entries if (customer_ids is None or e["customer_id"] in customer_ids)
            and (start is None or datetime.fromisoformat(e["at"]) >= start)]
