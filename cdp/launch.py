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

`cdp serve`, the process that owns the view, also restarts with jemalloc preloaded (LD_PRELOAD)
where the system has it (Debian and Ubuntu: the `libjemalloc2` package). With the tuned glibc,
every DuckDB statement of a long run still grew slower, in the server's view and in an independent
in-memory database of the same process alike (a fixed aggregate: ~16 -> ~20 ms of CPU over five
minutes), while pure Python work stayed flat: the allocator, not the data. `bench.visible` (Kafka +
PostgreSQL, 600 s, the server on jemalloc): the read side's CPU per batch p50 39.3 ms against
65.3 ms on the tuned glibc, its projecting stage p50 per 30 s 59.0 -> 80.1 ms against 79.4 ->
147.0 ms, publish-to-visible p99 over HTTP 382.8 ms against 548.7 ms (a second run on jemalloc:
464.5 ms). CDP_ALLOCATOR=glibc keeps glibc; an allocator the operator preloads already is kept.

Both settings are read only when a process starts, hence the restart: the same process id,
arguments and environment. An operator's own `glibc.malloc.tcache_count` is kept. Elsewhere
(macOS, musl) nothing changes.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

LONG_RUNNING = frozenset({"serve", "worker", "ingest", "demo"})
TUNABLE = "glibc.malloc.tcache_count"
TCACHE_COUNT = 65535  # glibc's largest
JEMALLOC_COMMANDS = frozenset({"serve"})  # where it was measured (the process owning the view)
JEMALLOC = "libjemalloc.so.2"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib")
ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")  # one of these preloaded: the operator chose


def jemalloc_library(dirs: Sequence[str] = LIBRARY_DIRS) -> str | None:
    """The system's jemalloc, if installed (a path for LD_PRELOAD)."""
    return next((path for path in (os.path.join(d, JEMALLOC) for d in dirs) if os.path.isfile(path)), None)


def uses_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def tuned_environment(args: Sequence[str], environ: Mapping[str, str], glibc: bool,
                      jemalloc: str | None = None) -> dict[str, str] | None:
    """The environment a long-running command restarts with; None: run as it is (another command,
    not glibc, or set already, by the operator or by the restart itself). `jemalloc`: the library's
    path where the system has one."""
    command = next((a for a in args if not a.startswith("-")), None)
    if not glibc or command not in LONG_RUNNING:
        return None
    current, preloaded = environ.get("GLIBC_TUNABLES", ""), environ.get("LD_PRELOAD", "")
    preload = (jemalloc if jemalloc and command in JEMALLOC_COMMANDS and environ.get("CDP_ALLOCATOR") != "glibc"
               and not any(name in preloaded for name in ALLOCATORS) else None)
    if TUNABLE in current and preload is None:
        return None
    tuned = dict(environ)
    if TUNABLE not in current:
        tuned["GLIBC_TUNABLES"] = ":".join(filter(None, (current, f"{TUNABLE}={TCACHE_COUNT}")))
    if preload is not None:
        tuned["LD_PRELOAD"] = " ".join(filter(None, (preloaded, preload)))
    return tuned


def main() -> int | None:
    tuned = tuned_environment(sys.argv[1:], os.environ, uses_glibc(), jemalloc_library())
    if tuned is not None and sys.executable and getattr(sys, "orig_argv", None):
        try:
            os.execve(sys.executable, sys.orig_argv, tuned)
        except OSError:
            pass  # cannot restart (e.g. a frozen executable): run untuned
    from cdp.cli import main as run

    return run()
