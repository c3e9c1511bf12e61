"""Where the time from publish to visible goes: per-batch stage times of `cdp serve` (CDP_TRACE_STAGES).

With the variable set, the resolver process logs each batch it took out of the intake and
committed to the store, and the read side each batch it read from the store and committed to the
view, as one line on the server's standard error: the store positions the batch covered and wall
clock times (seconds since the epoch, comparable across the two processes). `bench.visible` reads
the lines back and, knowing each probed event's position and when its request was answered, says
which stage held it: waiting in the intake, resolving, waiting for the read side, projecting, or
being looked up.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

PREFIX = "cdp-stage "
RESOLVED = "resolved"    # taken: records read from the intake; committed: in the store; positions first..last
PROJECTED = "projected"  # noticed: the read side began reading the store; read; committed: in the view


def log(stage: str, **fields: Any) -> None:
    sys.stderr.write(PREFIX + orjson.dumps({"stage": stage, **fields}).decode() + "\n")
    sys.stderr.flush()


def read(path: Path) -> dict[str, list[dict]]:
    """The stage lines of a server's log, by stage, in the order they were written."""
    stages: dict[str, list[dict]] = {RESOLVED: [], PROJECTED: []}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(PREFIX):
            entry = orjson.loads(line[len(PREFIX):])
            stages.setdefault(entry["stage"], []).append(entry)
    return stages


def holding(batches: list[dict], position: int) -> dict | None:
    """The batch whose positions include `position`."""
    for batch in batches:
        if batch["first"] <= position <= batch["last"]:
            return batch
    return None
