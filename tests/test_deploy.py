"""The deployment files say what the code does: docker-compose.yml, the Dockerfile and
deploy/kubernetes.yaml are parsed, and the worker's container command line runs here, outside
Docker, against the real broker and PostgreSQL, with the container's own health checks and the
Kubernetes probes asked of it."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.private_services import free_port
from tests.test_streaming import cdp, stored_keys, wait_for
from tests.events import event, write

REPO = Path(__file__).resolve().parent.parent


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def instruction(name: str) -> list[str]:
    return [args for inst, args in dockerfile() if inst == name]


def as_list(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instruction("ENV"):
        for part in shlex.split(args):
            name, _, value = part.partition("=")
            env[name] = value
    return env


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def kubernetes() -> list[dict]:
    return list(yaml.safe_load_all((REPO / "deploy" / "kubernetes.yaml").read_text()))


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_files_agree_with_each_other() -> None:
    for args in instruction("COPY"):
        for source in as_list(args)[:-1]:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    cmd = as_list(instruction("CMD")[-1])
    worker = compose()["services"]["worker"]
    assert worker["command"] == cmd, "compose runs the image's own command"
    port = option(cmd, "--health-port")
    assert f"{port}:{port}" in worker["ports"]
    assert f"127.0.0.1:{port}/" in " ".join(worker["healthcheck"]["test"])
    assert instruction("EXPOSE") == [port]
    deployments = {d["metadata"]["name"]: d for d in kubernetes() if d["kind"] == "Deployment"}
    assert set(deployments) == {"cdp-worker", "cdp-serve"}
    for name, flag in (("cdp-worker", "--health-port"), ("cdp-serve", "--port")):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert str(ports[get["port"]]) == option(container["command"], flag), (name, probe)
    worker_container = deployments["cdp-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker_container["command"] == cmd


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_the_container_command_runs_and_answers_its_probes(kafka_bootstrap: str, fresh_postgres_dsn: str,
                                                           fresh_topic_prefix: str, tmp_path: Path) -> None:
    worker = compose()["services"]["worker"]
    port = free_port()
    image_port = option(worker["command"], "--health-port")
    workdir = instruction("WORKDIR")[-1]

    def here(value: str) -> str:  # container paths and addresses → this machine's
        return (value.replace(f"{workdir}/", f"{REPO}/").replace("/data", str(tmp_path / "data"))
                .replace("kafka:19092", kafka_bootstrap)
                .replace("postgresql://cdp:cdp@postgres:5432/cdp", fresh_postgres_dsn)
                .replace(f":{image_port}", f":{port}"))

    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update({k: here(str(v)) for k, v in image_env().items()})
    env.update({k: here(str(v)) for k, v in worker["environment"].items()})
    env["CDP_TOPIC_PREFIX"] = fresh_topic_prefix
    assert env["CDP_KAFKA_BOOTSTRAP"] == kafka_bootstrap and env["CDP_EVENT_STORE"] == fresh_postgres_dsn
    command = [here(part) for part in worker["command"]]
    command[command.index("--health-port") + 1] = str(port)  # 8081 may be taken on this machine
    assert command[0] == "cdp"
    log = tmp_path / "worker.log"
    process = subprocess.Popen([sys.executable, "-m", "cdp", *command[1:]], env=env, stdout=subprocess.DEVNULL,
                               stderr=open(log, "wb"), start_new_session=True)

    def check(test: list[str]) -> bool:
        kind, *argv = test
        assert kind == "CMD" and argv[0] == "python"
        return subprocess.run([sys.executable, *map(here, argv[1:])], capture_output=True).returncode == 0

    try:
        wait_for(lambda: check(worker["healthcheck"]["test"]), 90, "compose's health check (/ready)", [process])
        assert check(["CMD", *as_list(instruction("HEALTHCHECK")[-1].split("CMD", 1)[1].strip())])
        container = next(d for d in kubernetes() if d["metadata"]["name"] == "cdp-worker")
        spec = container["spec"]["template"]["spec"]["containers"][0]
        for probe in ("livenessProbe", "readinessProbe"):
            url = f"http://127.0.0.1:{port}{spec[probe]['httpGet']['path']}"
            assert urllib.request.urlopen(url, timeout=5).status == 200, url
        events = tmp_path / "events.jsonl"
        write(events, [event(f"d{i}", "retail", f"R{i}", customer={"email": f"d{i}@example.org"}) for i in range(3)])
        cdp({**env, "CDP_HOME": str(tmp_path / "publisher")}, "ingest", "--kafka", str(events))
        wait_for(lambda: stored_keys(fresh_postgres_dsn) == 3, 60, "three events stored", [process])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode == 0, log.read_text()[-3000:]
