"""A PostgreSQL or Kafka of a test's own, for tests that stop a service mid-stream (the shared ones
serve every engineer and run: never stop them). Started and stopped with scripts/services.sh, its
state in the test's temporary folder, on free ports. And a small disk of its own (a tmpfs)."""
from __future__ import annotations

import os
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


class PrivateService:
    """`start()` / `stop()` one service (kafka or postgres); the port stays the same across restarts."""

    def __init__(self, name: str, state: Path):
        self.name = name
        self.state = state
        self.env = {**os.environ, "CDP_SERVICES_DIR": str(state)}
        for variable in ("CDP_KAFKA_PORT", "CDP_KAFKA_CONTROLLER_PORT", "CDP_POSTGRES_PORT"):
            self.env[variable] = str(free_port())
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
