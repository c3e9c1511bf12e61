"""Starting and stopping `cdp serve` as a subprocess for the tests (tests/test_serve*.py)."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(env: dict[str, str], log: Path, port: int | None = None, timeout: float = 60) -> Server:
    """`cdp serve` on a free port, returned once /health answers."""
    port = port or free_port()
    process = subprocess.Popen([sys.executable, "-m", "cdp", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"cdp serve exited with {process.returncode}: {log.read_text()}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code in (200, 503):
                return Server(process, url, log)
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"cdp serve did not answer: {log.read_text()}"
        time.sleep(0.2)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def new_key(cdp, scope: str, unit: str | None = None) -> str:
    args = ["keys", "create", "--scope", scope] + (["--unit", unit] if unit else [])
    return cdp(*args).stdout.strip().splitlines()[-1]


def new_keys(env: dict[str, str], wanted: dict[str, tuple[str, str | None]]) -> dict[str, str]:
    """Several keys at once, made in this process through the same command `cdp keys create` runs."""
    from cdp import keys
    from cdp.application import CustomerApplication
    from cdp.config import Settings

    app = CustomerApplication(Settings.from_env(env))
    try:
        return {name: keys.create(app, scope, unit)[0] for name, (scope, unit) in wanted.items()}
    finally:
        app.close()


def cloudevent(event_id: str, unit: str, source_id: str, kind: str = "cdp.identify", **data) -> dict:
    customer = data.pop("customer", {})
    return {"specversion": "1.0", "id": event_id, "source": f"{unit}/web", "type": kind,
            "time": "2026-03-01T10:00:00Z", "datacontenttype": "application/json",
            "data": {"business_unit": unit, "customer": {"source_id": source_id, **customer}, **data}}


def deadletter(home: Path) -> list[dict]:
    path = home / "deadletter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []



def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


@contextmanager
def console_session(server: Server, key: str) -> Iterator[httpx.Client]:
    """A browser signed in to the console with `key` (cookies kept), as a person signs in."""
    with httpx.Client(base_url=server.url, timeout=600) as browser:
        signed = browser.post("/login", data={"key": key, "csrf": _csrf(browser.get("/login").text)})
        assert signed.status_code == 303, signed.text
        yield browser


def console_split(browser: httpx.Client, customer_id: str, record: str) -> httpx.Response:
    """A steward splits `record` off a customer in the console: opens the confirmation form, posts
    it with the form's CSRF token; the response is the console's redirect (or its refusal)."""
    form = browser.get(f"/customers/{customer_id}/split", params={"record": record})
    assert form.status_code == 200, form.text
    return browser.post(f"/customers/{customer_id}/split",
                        data={"record": record, "csrf": _csrf(form.text), "reason": "not the same person"})
