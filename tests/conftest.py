"""Shared pytest fixtures.

Real services: `make test` (scripts/test.sh) starts Apache Kafka and PostgreSQL with
scripts/services.sh and exports their addresses as CDP_KAFKA_BOOTSTRAP and CDP_POSTGRES_DSN.
Tests that need them take the fixtures below. Without the variables those tests skip, except in
CI (CI=true), where a missing service is an error rather than a silent skip.

Add new fixtures in their own section; keep the service fixtures together.

scripts/test.sh runs the files in parallel (pytest-xdist, `--dist loadfile`: each file in one worker,
so its module fixtures are built once). Every test already gets its own CDP_HOME (tmp_path), topic
prefix, database and free ports; the services are started once, before pytest, by scripts/test.sh.
Files with a test marked `slow` are handed out first, so the long ones do not end the run alone.
"""
from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from typing import NoReturn

import pytest

from tests.databases import create_database, drop_database, with_dbname

# ------------------------------------------------------------------------------ real services


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _service_address(variable: str, service: str) -> str:
    value = os.environ.get(variable, "").strip()
    if value:
        return value
    _missing(f"{variable} not set ({service} address): run `make test` or `make services`", service)


def _missing(message: str, service: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{message}; CI=true, so a missing {service} is an error, not a skip", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """`host:port` of a real Kafka broker (CDP_KAFKA_BOOTSTRAP)."""
    return _service_address("CDP_KAFKA_BOOTSTRAP", "Kafka")


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """`postgresql://` URL of a real PostgreSQL database (CDP_POSTGRES_DSN); shared by all tests."""
    return _service_address("CDP_POSTGRES_DSN", "PostgreSQL")


@pytest.fixture(scope="session")
def postgres_superuser(postgres_dsn: str) -> str:
    """A superuser's URL on the test server, for tests that read the database's own files through
    it (pg_read_binary_file): CDP_POSTGRES_ADMIN_DSN, else the `postgres` role on the same host and
    port without a password, as scripts/services.sh's server trusts it on 127.0.0.1."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is needed: pip install -e '.[test]'")
    dsn = os.environ.get("CDP_POSTGRES_ADMIN_DSN", "").strip()
    if not dsn:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        server = {k: v for k, v in conninfo_to_dict(postgres_dsn).items() if k in ("host", "port")}
        dsn = make_conninfo(**server, user="postgres", dbname="postgres")
    try:
        with psycopg.connect(dsn, connect_timeout=5) as con:
            if not con.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
                _missing(f"{dsn} is not a superuser's: set CDP_POSTGRES_ADMIN_DSN to one", "PostgreSQL superuser")
    except psycopg.OperationalError as error:
        _missing(f"no PostgreSQL superuser at {dsn} ({str(error).strip()}): set CDP_POSTGRES_ADMIN_DSN",
                 "PostgreSQL superuser")
    return dsn


@pytest.fixture
def fresh_postgres_dsn(postgres_dsn: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty database on the test server for one test; dropped afterwards."""
    pytest.importorskip("psycopg", reason="psycopg 3 is needed: pip install -e '.[test]'")
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:30]
    dbname = f"t_{slug}_{uuid.uuid4().hex[:10]}"
    create_database(postgres_dsn, dbname)
    try:
        yield with_dbname(postgres_dsn, dbname)
    finally:
        drop_database(postgres_dsn, dbname)


@pytest.fixture
def fresh_topic_prefix(request: pytest.FixtureRequest, kafka_bootstrap: str) -> Iterator[str]:
    """A unique prefix for Kafka topic names, e.g. `test.roundtrip.1a2b3c4d5e.`; the broker is
    shared by all tests and runs, so every test names its topics with its own prefix. Its topics
    are deleted afterwards, as a test's database is dropped."""
    from tests.topics import delete_topics

    slug = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name).strip("-")[:60]
    prefix = f"test.{slug}.{uuid.uuid4().hex[:10]}."
    yield prefix
    delete_topics(kafka_bootstrap, prefix)


# ------------------------------------------------------------------------------ the cdp command

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CdpRunner:
    """Runs `cdp` as a user does: a subprocess with CDP_HOME set, output captured as text."""

    home: Path
    env: dict

    def __call__(self, *args: str, input: str | bytes | None = None, check: bool = True,
                 extra_env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**self.env, **(extra_env or {})}
        result = subprocess.run(
            [sys.executable, "-m", "cdp", *args], env=env, input=input, capture_output=True,
            text=not isinstance(input, bytes), timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"cdp {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def query(self, sql: str) -> list[dict]:
        import json

        return json.loads(self("query", sql, "--format", "json").stdout)


@pytest.fixture
def cdp(tmp_path: Path) -> CdpRunner:
    """The `cdp` command with a fresh CDP_HOME (embedded mode: no Kafka, SQLite store)."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CDP_KAFKA_BOOTSTRAP", "CDP_EVENT_STORE") and not k.startswith("CDP_")}
    env["CDP_HOME"] = str(home)
    return CdpRunner(home=home, env=env)


# ------------------------------------------------------------------------------ unified view metrics

DEMO_AS_OF = "2026-11-01"


def _cdp_at(home: Path, as_of: str = DEMO_AS_OF, **extra_env: str) -> CdpRunner:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    return CdpRunner(home=home, env={**env, "CDP_HOME": str(home), "CDP_AS_OF": as_of, **extra_env})


@pytest.fixture(scope="session")
def cdp_at():
    """`cdp_at(home, as_of, **CDP_vars)`: the `cdp` command on CDP_HOME=home with a fixed CDP_AS_OF."""
    return _cdp_at


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory):
    """Demo CloudEvents for 400 people (three JSONL files, no CSV), generated once per session."""
    from cdp.demo import DemoSpec, generate

    return generate(tmp_path_factory.mktemp("demo-input"), DemoSpec(people=400, seed=5))


@pytest.fixture(scope="session")
def demo_view(tmp_path_factory, demo_files) -> CdpRunner:
    """A view built incrementally from the demo: two `cdp ingest` runs with small projection batches
    (so the projector catches up many times), CDP_AS_OF fixed."""
    cdp = _cdp_at(tmp_path_factory.mktemp("demo-view"), CDP_PROJECTION_BATCH="700", CDP_BATCH_SIZE="500")
    files = [str(p) for p in demo_files.event_files]
    cdp("ingest", *files[:2])
    cdp("ingest", *files[2:])
    return cdp


# ------------------------------------------------------------------------------ running in parallel


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding a `slow` test first (in their usual order), then the rest.

    Under `--dist loadfile` a worker takes the next file as it finishes one, so the longest files
    must start early or the run ends with one worker busy and the others idle. The order is the
    same in every worker (xdist requires it) and changes nothing in what each test does."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort keeps the order within a file
