"""The view's gate (cdp/server/viewgate.py): while the view's file is rewritten, a request that reads
the view waits, then is told to come back; the collector passes; the rewrite waits for those inside."""
from __future__ import annotations

import threading
import time

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cdp.server import viewgate
from cdp.server.viewgate import ViewGate, ViewRequests


def client(gate: ViewGate) -> TestClient:
    async def answer(request):
        return PlainTextResponse("read")

    app = Starlette(routes=[Route("/v1/profiles/{ref}", answer), Route("/v1/batch", answer, methods=["POST"])])
    return TestClient(ViewRequests(app, gate))


def test_a_request_waits_for_the_rewrite_then_is_told_to_come_back(monkeypatch):
    monkeypatch.setattr(viewgate, "WAIT_SECONDS", 0.3)
    gate = ViewGate()
    http = client(gate)
    assert http.get("/v1/profiles/email:a@b.c").text == "read"
    assert gate.close(timeout=1)
    started = time.monotonic()
    refused = http.get("/v1/profiles/email:a@b.c")
    assert refused.status_code == 503 and time.monotonic() - started >= 0.3
    assert refused.json()["code"] == "view_rewriting" and refused.headers["retry-after"] == "5"
    assert http.post("/v1/batch", content=b"{}").text == "read"  # the collector never reads the view
    threading.Timer(0.1, gate.open).start()
    assert http.get("/v1/profiles/email:a@b.c").text == "read"  # the rewrite ended while it waited


def test_the_rewrite_waits_for_requests_inside_and_gives_up_in_time():
    gate = ViewGate()
    assert gate.enter()
    assert not gate.close(timeout=0.1) and not gate.closed  # one still inside: open again
    threading.Timer(0.1, gate.leave).start()
    assert gate.close(timeout=5) and gate.closed and not gate.enter()
