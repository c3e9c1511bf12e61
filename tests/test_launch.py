"""The process entry (cdp/launch.py): long-running commands restart once with glibc's larger
per-thread allocation cache; everything else, and an operator's own setting, is left alone."""
import signal

import pytest

from cdp.launch import TUNABLE, TCACHE_COUNT, tuned_environment, uses_glibc
from tests.serving import start_server

TUNED = f"{TUNABLE}={TCACHE_COUNT}"


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


@pytest.mark.skipif(not uses_glibc(), reason="glibc's tunables exist on glibc only")
def test_a_served_process_runs_tuned_under_the_pid_it_was_started_with(cdp, tmp_path):
    """What a supervisor, `kill -9` and the tests rely on: the restart keeps the process id."""
    env = {k: v for k, v in cdp.env.items() if k != "GLIBC_TUNABLES"}
    server = start_server(env, tmp_path / "serve.log")
    try:
        environ = (open(f"/proc/{server.process.pid}/environ", "rb").read().split(b"\0"))
        assert f"GLIBC_TUNABLES={TUNED}".encode() in environ
        assert server.client().get("/health").status_code == 200
    finally:
        server.stop(signal.SIGTERM)
    assert server.process.returncode == 0, (tmp_path / "serve.log").read_text()
