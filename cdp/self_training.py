"""A worker's self-training, in a process of its own beside the stream.

Training (the estimate, then scoring every candidate pair) takes seconds on thousands of records
and far longer on millions. Run on the worker's store thread, as it was, it held the worker's
stream still for that long: at 1,000 events/s on a fresh store a worker trained at 1k, 2k, 4k, 8k
and 16k records, and each time the events behind it waited (bench.visible, Kafka mode).

Here a child process opens an application of its own on the store and trains and re-resolves as
`cdp identity train` does: the estimate and scoring outside the writers' lock, its model, merges
and splits committed under it like any writer's. The worker takes them in at its next batch, as it
takes in every other writer's (cdp/store.py `exclusive`). The child runs at lower priority, so the
stream's CPU comes first. It is not started while the worker's own blocking index shows no
candidate pairs to learn from (`can_learn`), and a child that ends with nothing to learn from is
tried again once the records held grew by a tenth; a child that fails says why in one line.

Run as `python -m cdp.self_training` with the worker's environment (its settings).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

TRAIN_NICE = 10  # niceness added to the training process: the stream first
RETRY_GROWTH = 0.1  # after a training without a new model, wait for this much growth


class Trainer:
    """Starts the training process when self-training is due and none runs (`poll` after each batch)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.retry_at = 0  # records held before the next start

    def poll(self, app: Any) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                return
            # ended: its model (if any) is taken in by the next batch's refresh, then `due` says
            self.process = None
            return
        held = app.records_held()
        if held < self.retry_at or not app.training_due():
            return
        self.retry_at = int(held * (1 + RETRY_GROWTH)) + 1
        if not app.can_learn():  # the process would load every record to find no pair to learn from
            return
        self.process = subprocess.Popen([sys.executable, "-m", "cdp.self_training"], stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """The worker stops: so does a training under way (its commit is one transaction: all or nothing)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


def main() -> int:
    from cdp import faults, logs
    from cdp.application import CustomerApplication
    from cdp.config import Settings
    from cdp.health import say

    os.nice(TRAIN_NICE)
    logs.plain()
    cfg = Settings.from_env()
    worker = f"[worker {os.getppid()}]"
    try:
        with CustomerApplication(cfg) as app:
            outcome = app.retrain_if_due()
    except Exception as error:  # noqa: BLE001 - one line; the worker starts it again later
        say(f"{worker} self-training failed: {faults.describe(error, cfg).line}; it is tried again later")
        return 1
    if outcome is not None:
        say(f"{worker} self-training: {outcome.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
