"""The process entry (cdp/launch.py): long-running commands restart once with glibc's larger
per-thread allocation cache, and `cdp serve` with jemalloc where the system has it; everything
else, and an operator's own setting, is left alone."""
import signal

import pytest

from cdp.launch import TUNABLE, TCACHE_COUNT, jemalloc_library, tuned_environment, uses_glibc
from tests.serving import start_server

TUNED = f"{TUNABLE}={TCACHE_COUNT}"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


@pytest.mark.parametrize("args, environ, expected", [
    (["serve", "--port", "8080"], {"PATH": "/bin"}, {"PATH": "/bin", "GLIBC_TUNABLES": TUNED}),
    (["worker"], {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
     {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNED}"}),
    (["ingest", "events.jsonl"], {"GLIBC_TUNABLES": f"{TUNABLE}=7"}, None),  # the operator's choice
    (["serve"], {"GLIBC_TUNABLES": TUNED}, None),  # restarted already: no second restart
    (["query", "select 1"], {}, None),  # a short command: not worth a restart
    (["--help"], {}, None),
])
def test_which_commands_restart_and_with_what(args, environ, expected):
    assert tuned_environment(args, environ, glibc=True) == expected


def test_nothing_restarts_without_glibc():
    assert tuned_environment(["serve"], {}, glibc=False) is None
    assert tuned_environment(["serve"], {}, glibc=False, jemalloc=JEMALLOC) is None


@pytest.mark.parametrize("args, environ, expected", [
    (["serve"], {}, {"GLIBC_TUNABLES": TUNED, "LD_PRELOAD": JEMALLOC}),
    # the operator's own tcache setting kept; the restart only preloads
    (["serve"], {"GLIBC_TUNABLES": f"{TUNABLE}=7"}, {"GLIBC_TUNABLES": f"{TUNABLE}=7", "LD_PRELOAD": JEMALLOC}),
    # another library the operator preloads stays, first
    (["serve"], {"LD_PRELOAD": "/opt/libtrace.so"},
     {"GLIBC_TUNABLES": TUNED, "LD_PRELOAD": f"/opt/libtrace.so {JEMALLOC}"}),
    # an allocator the operator preloads already is theirs
    (["serve"], {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"},
     {"GLIBC_TUNABLES": TUNED, "LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}),
    (["serve"], {"CDP_ALLOCATOR": "glibc"}, {"CDP_ALLOCATOR": "glibc", "GLIBC_TUNABLES": TUNED}),
    (["serve"], {"GLIBC_TUNABLES": TUNED, "LD_PRELOAD": JEMALLOC}, None),  # restarted already
    (["worker"], {}, {"GLIBC_TUNABLES": TUNED}),  # measured on the server only
    (["query", "select 1"], {}, None),
])
def test_the_server_restarts_with_jemalloc_where_the_system_has_it(args, environ, expected):
    assert tuned_environment(args, environ, glibc=True, jemalloc=JEMALLOC) == expected


def test_jemalloc_is_found_in_the_system_s_library_directories(tmp_path):
    empty, lib = tmp_path / "empty", tmp_path / "lib"
    empty.mkdir(), lib.mkdir()
    assert jemalloc_library([str(empty)]) is None
    (lib / "libjemalloc.so.2").write_bytes(b"")
    assert jemalloc_library([str(empty), str(lib)]) == str(lib / "libjemalloc.so.2")


@pytest.mark.skipif(not uses_glibc(), reason="glibc's tunables exist on glibc only")
def test_a_served_process_runs_tuned_under_the_pid_it_was_started_with(cdp, tmp_path):
    """What a supervisor, `kill -9` and the tests rely on: the restart keeps the process id."""
    env = {k: v for k, v in cdp.env.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "CDP_ALLOCATOR")}
    server = start_server(env, tmp_path / "serve.log")
    try:
        environ = (open(f"/proc/{server.process.pid}/environ", "rb").read().split(b"\0"))
        assert f"GLIBC_TUNABLES={TUNED}".encode() in environ
        jemalloc = jemalloc_library()
        if jemalloc:  # the system has it (Debian: libjemalloc2): the server runs on it
            assert f"LD_PRELOAD={jemalloc}".encode() in environ
            assert jemalloc in open(f"/proc/{server.process.pid}/maps").read()
        assert server.client().get("/health").status_code == 200
    finally:
        server.stop(signal.SIGTERM)
    assert server.process.returncode == 0, (tmp_path / "serve.log").read_text()
