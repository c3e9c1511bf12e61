"""Catch-up work yields the CPU to answering.

What `cdp serve` owes a caller now (an accepted request, a profile look-up) and what may wait (the
resolver working through the durable intake, the read side projecting the store into the view)
share two cores. The catch-up work can run at a higher niceness (CDP_CATCH_UP_NICE, default 0):
when the cores are busy the answering threads go first, and catch-up takes whatever they leave.
Catching up is also what makes a published event visible, so the default leaves it level. Linux keeps niceness per thread, so a thread of the HTTP process
(the read side's projecting thread, DuckDB's worker threads) can be lowered on its own.
"""
from __future__ import annotations

import os
import threading
from typing import Iterable


def thread_ids() -> set[int]:
    """This process's threads (Linux: /proc/self/task; elsewhere none, and nothing is lowered)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def lower(increment: int, threads: Iterable[int] | None = None) -> None:
    """Raises the niceness of `threads` (default: the calling thread) by `increment`, up to 19;
    lowering it again would need privileges. A thread already gone is skipped."""
    if not increment or not hasattr(os, "setpriority"):
        return
    for tid in [threading.get_native_id()] if threads is None else threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        except OSError:
            pass
