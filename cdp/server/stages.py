"""Where the time from publish to visible goes: per-batch stage times (CDP_TRACE_STAGES).

With the variable set, the writer logs each batch it took in (the embedded resolver from the
intake, `cdp worker` from `cdp.events`) and committed to the store, the read side each batch it
read from the store and committed to the view, and with Kafka the collector each request it
produced and the broker acknowledged, and the `cdp.profiles` publisher each range of positions it
published, as one line on the process's standard error: the store positions the batch covered and
wall clock times (seconds since the epoch, comparable across processes). `bench.visible` reads the
lines back and, knowing each probed event's position and when its request was answered, says which
stage held it: producing, waiting in the intake or on the broker, resolving, waiting for the read
side, projecting, being looked up or published; and when the score refreshes ran beside all that.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

PREFIX = "cdp-stage "
RESOLVED = "resolved"    # taken: records read from the intake; committed: in the store; positions first..last
PROJECTED = "projected"  # woken: the store's notification arrived (None: a poll); noticed: the read side
#                          began reading the store; read; committed: in the view
ACCEPTED = "accepted"    # with Kafka, per request: id of its first event; called: the writer had it;
#                          produced: every record handed to the producer; acked: the broker acknowledged all
PUBLISHED = "published"  # cdp.profiles: positions first..last; handed: the earliest batch's view commit;
#                          began: the publisher took them; built: messages made; acked: the broker acknowledged
SCORED = "scored"        # a refresh of everyone's scores: began, ended; inline: on the projecting thread
#                          (which it held still) rather than beside it; cpu: its thread's; ok: it committed


def log(stage: str, **fields: Any) -> None:
    sys.stderr.write(PREFIX + orjson.dumps({"stage": stage, **fields}).decode() + "\n")
    sys.stderr.flush()


def read(*paths: Path) -> dict[str, list[dict]]:
    """The stage lines of processes' logs, by stage, in the order each process wrote them."""
    stages: dict[str, list[dict]] = {RESOLVED: [], PROJECTED: [], ACCEPTED: [], PUBLISHED: [], SCORED: []}
    for path in paths:
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
