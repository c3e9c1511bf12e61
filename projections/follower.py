"""A projector that follows the event store from a background thread.

Ingest is CPU-bound Python on one core; the projection is mostly DuckDB (and SQLite reads), which
release the GIL, so following from a thread puts the view's work on the machine's other core.
Exactly-once is unchanged: every catch-up commits rows and position together.
"""
from __future__ import annotations

import threading
from typing import Any

from projections.projector import Projector


class ViewFollower:
    def __init__(self, projector: Projector, store: Any, batch_size: int):
        self.projector = projector
        self.store = store
        self.batch_size = batch_size
        self.error: BaseException | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="view-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                stopping = self._stopping
                # scores (a model fit over everyone) once, when the run is over
                self.projector.catch_up(self.store, self.batch_size, score=stopping)
                if stopping:
                    return
        except BaseException as error:  # handed to the caller's thread by check()
            self.error = error

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def notify(self) -> None:
        """New events are committed: catch up when free."""
        self.check()
        self._wake.set()

    def finish(self) -> None:
        """Waits until the view has caught up with everything committed so far, then stops."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self.check()
