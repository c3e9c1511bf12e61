"""A plain `pip install .` (no extras) into a fresh virtual environment runs the embedded default,
the way a new user installs it; PostgreSQL then asks for its extra in one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.events import event, write

# the whole `pip install .` runs in the module fixture, inside the first test's timeout: on a loaded
# machine it outlasted pyproject's 600 s (the pip call itself is bounded at 900 s)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "cdp", "ingest", "identity", "projections", "schemas")


def _copy_sources(target: Path) -> Path:
    """The project's sources alone (no .venv, no build leftovers), so the build runs outside the worktree."""
    target.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory) -> Path:
    """bin/ of a fresh venv with `pip install .` and nothing else (pip's cache keeps it quick)."""
    base = tmp_path_factory.mktemp("plain-install")
    sources = _copy_sources(base / "src")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # --no-compile: byte-compiling every module of every dependency (scipy, pyarrow, faust …) is CPU
    # time spent on nothing the test checks; Python compiles what `cdp` imports when it runs
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                             "--no-compile", str(sources)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return venv / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(cwd)),
                   "CDP_HOME": str(cwd / "home"), **(env or {})}
    return subprocess.run([str(bin_dir / "cdp"), *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=300)


def test_plain_install_ingests_and_queries(plain_install: Path, tmp_path: Path):
    missing = subprocess.run([str(plain_install / "python"), "-c", "import psycopg"], capture_output=True)
    assert missing.returncode != 0, "psycopg must not come with a plain install (it is the postgres extra)"
    write(tmp_path / "events.jsonl", [
        event("1", "retail", "R1", customer={"email": "ann@example.org", "first_name": "Ann"}),
        event("2", "bank", "B1", "cdp.purchase", customer={"email": "ANN@example.org"}, amount=12.5),
        event("3", "bank", "B2", customer={"email": "bob@example.org"}),
    ])
    ingested = _run(plain_install, tmp_path, "ingest", str(tmp_path / "events.jsonl"))
    assert ingested.returncode == 0, ingested.stderr
    queried = _run(plain_install, tmp_path, "query", "SELECT count(*) AS customers, "
                   "max(len(business_units)) AS units FROM customers", "--format", "json")
    assert queried.returncode == 0, queried.stderr
    assert json.loads(queried.stdout) == [{"customers": 2, "units": 2}]


def test_plain_install_names_the_postgres_extra_in_one_line(plain_install: Path, tmp_path: Path):
    write(tmp_path / "events.jsonl", [event("1", "retail", "R1")])
    result = _run(plain_install, tmp_path, "ingest", str(tmp_path / "events.jsonl"),
                  env={"CDP_EVENT_STORE": "postgresql://cdp@127.0.0.1:1/cdp"})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cdp: error: "), result.stderr
    assert "cdp[postgres]" in result.stderr and "Traceback" not in result.stderr
