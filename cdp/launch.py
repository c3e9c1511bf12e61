"""The `cdp` process entry: the commands that run for long restart themselves once, before anything
else is imported, with a larger per-thread cache in glibc's allocator; then the command line runs.

Why: DuckDB binds and plans every statement anew (a prepared one too), allocating thousands of
small objects each time. With glibc's default cache (7 chunks per size), the freed chunks go back
to the arena's bins, which fragment as the view's data comes and goes, and each allocation then
searches longer. A server's batches grew slower the longer it ran:
- in process, the binding and planning of a live batch's derivation took 9.3 ms of CPU at first,
  11.0 ms after 2,000 batches of writes and 11.3 ms after 3,000 with the default; with the cache at
  65,535, 8.5 ms, 8.9 ms after 2,000 and 9.0 ms after 4,000, at the same peak memory (551 against
  552 MB after 2,000);
- `bench.visible` (Kafka + PostgreSQL, 300 s, the setting given to every process of the run): the
  read side's fixed CPU per batch went 38.5 -> 61.9 ms with glibc's default (7) and 33.9 -> 40.5 ms
  with 65,535; publish-to-visible p99 over HTTP 414.3 against 378.5 ms, p50 211.4 against 162.7 ms.
Some growth remains (docs/serve.md, "Staying fast for hours").

glibc reads the setting (GLIBC_TUNABLES) only when a process starts, hence the restart: the same
process id, arguments and environment. An operator's own `glibc.malloc.tcache_count` is kept.
Elsewhere (macOS, musl) nothing changes.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

LONG_RUNNING = frozenset({"serve", "worker", "ingest", "demo"})
TUNABLE = "glibc.malloc.tcache_count"
TCACHE_COUNT = 65535  # glibc's largest


def uses_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def tuned_environment(args: Sequence[str], environ: Mapping[str, str], glibc: bool) -> dict[str, str] | None:
    """The environment a long-running command restarts with; None: run as it is (another command,
    not glibc, or the tunable set already, by the operator or by the restart itself)."""
    command = next((a for a in args if not a.startswith("-")), None)
    if not glibc or command not in LONG_RUNNING:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (current, f"{TUNABLE}={TCACHE_COUNT}")))}


def main() -> int | None:
    tuned = tuned_environment(sys.argv[1:], os.environ, uses_glibc())
    if tuned is not None and sys.executable and getattr(sys, "orig_argv", None):
        try:
            os.execve(sys.executable, sys.orig_argv, tuned)
        except OSError:
            pass  # cannot restart (e.g. a frozen executable): run untuned
    from cdp.cli import main as run

    return run()
