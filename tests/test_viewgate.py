"""The view's gates (cdp/server/viewgate.py) while the server rewrites the view's file after an
erasure: a request that reads the view waits for the swap, then is told to come back; the
collector passes; the rewrite waits for those inside. The view's writers pause for the copy and
leave once their read side is replaced; people's decisions wait for the rewrite to end, outside
the readers' gate, and are refused after a while, and a command beside the server waits that
refusal out."""
from __future__ import annotations

import threading
import time

import orjson
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cdp.server import viewgate
from cdp.server.viewgate import ViewGate, ViewRequests, WriterPause


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


def test_a_decision_waits_for_the_whole_rewrite_outside_the_readers_gate(monkeypatch):
    """A person's decision (here an erasure's DELETE) that comes while the view is rewritten waits
    for the rewrite to end rather than being refused, and waits outside the readers' gate: the
    swap can still close that gate, which a decision inside would hold. Reads, the read-only
    POST of SQL among them, pass meanwhile; a decision still waiting after DECISION_WAIT_SECONDS
    is told to come back."""
    async def answer(request):
        return PlainTextResponse("decided" if request.method == "DELETE" else "read")

    app = Starlette(routes=[Route("/v1/profiles/{ref}", answer, methods=["GET", "DELETE"]),
                            Route("/v1/query", answer, methods=["POST"])])
    gate, decisions = ViewGate(), ViewGate()
    http = TestClient(ViewRequests(app, gate, decisions))
    assert decisions.close(timeout=1)  # a rewrite begins: Service.rewrite_view
    answers: list = []
    waiting = threading.Thread(target=lambda: answers.append(http.delete("/v1/profiles/email:a@b.c")))
    waiting.start()
    time.sleep(0.3)
    assert answers == []
    assert gate.close(timeout=0.5)  # the swap: no request inside the readers' gate
    gate.open()
    assert http.get("/v1/profiles/email:a@b.c").text == "read"
    assert http.post("/v1/query", content=b"SELECT 1").text == "read"
    decisions.open()  # the rewrite ends
    waiting.join(5)
    assert [(a.status_code, a.text) for a in answers] == [(200, "decided")]

    monkeypatch.setattr(viewgate, "DECISION_WAIT_SECONDS", 0.3)
    assert decisions.close(timeout=1)
    started = time.monotonic()
    refused = http.delete("/v1/profiles/email:a@b.c")
    assert refused.status_code == 503 and refused.json()["code"] == "view_rewriting"
    assert time.monotonic() - started >= 0.3


def test_the_rewrite_waits_for_requests_inside_and_gives_up_in_time():
    gate = ViewGate()
    assert gate.enter()
    assert not gate.close(timeout=0.1) and not gate.closed  # one still inside: open again
    threading.Timer(0.1, gate.leave).start()
    assert gate.close(timeout=5) and gate.closed and not gate.enter()


def writer(pause: WriterPause, wrote: list[bool]) -> threading.Thread:
    """A writer on a thread of its own: appends whether it was allowed to write."""
    def write() -> None:
        with pause.writing() as allowed:
            wrote.append(allowed)

    return threading.Thread(target=write)


def test_paused_writers_wait_and_go_on_when_resumed():
    pause = WriterPause()
    wrote: list[bool] = []
    assert pause.pause(timeout=1)
    thread = writer(pause, wrote)
    thread.start()
    time.sleep(0.2)
    assert wrote == []  # held back while paused
    pause.resume()
    thread.join(5)
    assert wrote == [True]


def test_a_pause_waits_for_a_writer_inside_and_gives_up_in_time():
    pause = WriterPause()
    inside, leave = threading.Event(), threading.Event()

    def write_slowly() -> None:
        with pause.writing():
            inside.set()
            leave.wait(5)

    thread = threading.Thread(target=write_slowly)
    thread.start()
    inside.wait(5)
    assert not pause.pause(timeout=0.1)  # still writing: not paused, and others may write
    with pause.writing() as allowed:
        assert allowed
    threading.Timer(0.1, leave.set).start()
    assert pause.pause(timeout=5)
    thread.join(5)


def test_ended_writers_leave_without_writing():
    pause = WriterPause()
    assert pause.pause(timeout=1)
    wrote: list[bool] = []
    thread = writer(pause, wrote)
    thread.start()
    time.sleep(0.1)
    pause.end()  # the read side is being replaced
    thread.join(5)
    assert wrote == [False]
    with pause.writing() as allowed:
        assert not allowed


def test_a_persons_decision_is_refused_while_the_view_is_rewritten_and_a_rewrite_waits_for_one(tmp_path, monkeypatch):
    """Service.steward and Service.rewrite_view share the decision gate: a decision during a rewrite
    is told to come back (it would wait for a view whose writers are paused), and a rewrite waits
    for a decision under way, then gives up for now (it is tried again later)."""
    from cdp.config import Settings
    from cdp.erasure import mark_view_rewrite
    from cdp.server import service as service_module
    from cdp.server.access import Denied
    from cdp.server.service import Service

    service = Service.__new__(Service)  # the two methods' own state, without a server around them
    service.cfg = Settings.from_env({"CDP_HOME": str(tmp_path)})
    service.decision_gate, service._rewriting, service._closing = ViewGate(), threading.Lock(), False
    logged: list[str] = []
    service.log = logged.append

    assert service.decision_gate.close(timeout=1)  # as rewrite_view does first
    worked: list[str] = []
    try:
        service.steward(lambda app: worked.append("decided"))
    except Denied as refused:
        assert (refused.status, refused.code, refused.headers) == (503, "view_rewriting", {"Retry-After": "5"})
    else:
        raise AssertionError("a decision ran while the view was rewritten")
    assert worked == []
    service.decision_gate.open()

    mark_view_rewrite(service.cfg)
    monkeypatch.setattr(service_module, "DECISIONS_WAIT_SECONDS", 0.2)
    assert service.decision_gate.enter()  # a decision under way
    assert service.rewrite_view() is False and "a person's decision did not finish" in logged[-1]
    assert service.view_rewrite_pending and service.decision_gate.enter()  # open again: decisions go on


def test_an_erasure_refused_during_the_views_rewrite_touches_nothing(tmp_path):
    """An erasure the server refuses while it rewrites the view (503, come back) must not have
    scrubbed the dead-letter or marked itself unfinished already: its first steps run inside
    the decision gate (Service.steward's `first`)."""
    from cdp.config import Settings
    from cdp.server.access import Denied
    from cdp.server.service import Service

    service = Service.__new__(Service)
    service.cfg = Settings.from_env({"CDP_HOME": str(tmp_path)})
    service.decision_gate, service.mode = ViewGate(), "embedded"
    service.app = None  # reading the person's identifiers would fail: it must not be reached
    entry = b'{"reason": "schema", "event_id": "bad1", "input": "{\\"email\\": \\"ann@example.org\\"}"}\n'
    service.cfg.deadletter_path.write_bytes(entry)
    assert service.decision_gate.close(timeout=1)  # as the view's rewrite does
    try:
        service.erase("c-ann", True, "admin")
    except Denied as refused:
        assert (refused.status, refused.code) == (503, "view_rewriting")
    else:
        raise AssertionError("an erasure ran while the view was rewritten")
    assert service.cfg.deadletter_path.read_bytes() == entry
    assert not service.cfg.unfinished_erasure_path.exists()


def test_a_command_beside_the_server_waits_out_a_rewrite_then_gets_its_answer(capsys):
    """cdp.server.client (cdp erase, cdp audit, the audience commands beside `cdp serve`): a 503
    `view_rewriting` with Retry-After is waited out and asked again, said once on stderr; any other
    refusal is the server's message at once."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cdp.server.client import ServerError, call

    asked: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_DELETE(self) -> None:  # noqa: N802 - the standard library's name
            asked.append(time.monotonic())
            if self.path.startswith("/rewriting") and len(asked) < 3:
                status, body = 503, {"code": "view_rewriting", "message": "rewriting"}
            elif self.path.startswith("/refused"):
                status, body = 403, {"code": "forbidden", "message": "no such right"}
            else:
                status, body = 200, {"erased": True}
            data = orjson.dumps(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", "0.2")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert call((url, "key"), "DELETE", "/rewriting") == {"erased": True}
        assert len(asked) == 3 and asked[2] - asked[0] >= 0.4  # twice told to come back after 0.2 s
        assert capsys.readouterr().err.count("rewriting the view's file") == 1
        asked.clear()
        try:
            call((url, "key"), "DELETE", "/refused")
        except ServerError as refused:
            assert "no such right" in str(refused) and len(asked) == 1
        else:
            raise AssertionError("a refusal was not raised")
    finally:
        server.shutdown()
