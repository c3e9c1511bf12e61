"""A PostgreSQL or Kafka of a test's own, for tests that stop a service mid-stream (the shared ones
serve every engineer and run: never stop them). Started and stopped with scripts/services.sh, its
state in the test's temporary folder, on free ports. And a small disk of its own (a tmpfs)."""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "scripts" / "services.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_to_keep() -> int:
    """A free port below the kernel's ephemeral range, for a service stopped and started again on it.

    A port from `free_port()` is an ephemeral one: while the service is down, the kernel may hand it
    to any outgoing connection or to another test's `free_port()` (the files run in parallel), and
    the restart then finds it taken. Ports below the range are never handed out by the kernel."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(low, 20001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


class PrivateService:
    """`start()` / `stop()` one service (kafka or postgres); the port stays the same across restarts."""

    def __init__(self, name: str, state: Path):
        self.name = name
        self.state = state
        self.env = {**os.environ, "CDP_SERVICES_DIR": str(state)}
        for variable in ("CDP_KAFKA_PORT", "CDP_KAFKA_CONTROLLER_PORT", "CDP_POSTGRES_PORT"):
            self.env[variable] = str(port_to_keep())
        self.address = ""

    def start(self) -> str:
        done = subprocess.run([str(SERVICES), "start", self.name], env=self.env, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        for line in done.stdout.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            if name == ("CDP_KAFKA_BOOTSTRAP" if self.name == "kafka" else "CDP_POSTGRES_DSN"):
                self.address = value
        assert self.address, done.stdout
        return self.address

    def stop(self) -> None:
        subprocess.run([str(SERVICES), "stop", self.name], env=self.env, capture_output=True, timeout=120)

    def remove(self) -> None:
        self.stop()
        datadir = self.state / "postgres" / "datadir"
        if datadir.exists():  # may live outside the state folder (the postgres user must reach it)
            shutil.rmtree(Path(datadir.read_text().strip()).parent, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)


def mount_tmpfs(directory: Path, options: str) -> None:
    """A tmpfs at `directory` (`size=1m`, `size=1m,ro` …); skips the test where mounting is not allowed."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root or CAP_SYS_ADMIN")


def unmount(directory: Path) -> None:
    subprocess.run(["umount", "-l", str(directory)], check=False)
