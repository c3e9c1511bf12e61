"""Is the worker alive, is it ready, what is it waiting for: the state behind `--health-port`, the
progress line and the metrics, and `wait_out`, which turns an outage into waiting.

HTTP (plain `http.server`, one daemon thread; nothing secret is served, and it binds 127.0.0.1
unless told otherwise):

* `GET /health`  liveness: 200 while the event loop turns (503 when it has been stuck 60 s);
* `GET /ready`   readiness: 200 when the store and the broker answered and nothing is waited
                 for, else 503; the JSON body says which and gives the consumer lag;
* `GET /metrics` Prometheus text (cdp/metrics.py).
"""
from __future__ import annotations

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, TypeVar

import orjson

from cdp import faults, metrics
from cdp.config import Settings

STUCK_SECONDS = 60.0
BACKOFF = (0.5, 1.0, 2.0, 4.0, 5.0)
REPORT_EVERY = 10.0  # while waiting, the fault's line is repeated this often at most

T = TypeVar("T")


class Abandoned(Exception):
    """Stopping was asked for while waiting for a dependency: the work in hand is given up."""


class Health:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.lock = threading.Lock()
        self.waiting: dict[str, tuple[str, float]] = {}  # component -> (address, since)
        self.beat: float | None = None
        self.started = False  # consuming
        self.lag: int | None = None
        self.broker_ok = False
        self.stopping = threading.Event()

    def address(self, component: str) -> str:
        if component == faults.POSTGRES:
            return faults.postgres_address(self.settings)
        if component == faults.BROKER:
            return str(self.settings.kafka_bootstrap)
        return ""

    def wait_started(self, component: str) -> bool:
        """True when this starts a new wait (not a repeated failure of the same one)."""
        with self.lock:
            if component in self.waiting:
                return False
            self.waiting[component] = (self.address(component), time.monotonic())
        metrics.DEPENDENCY_UP.labels(component).set(0)
        return True

    def wait_ended(self, component: str) -> float | None:
        """Seconds waited, or None when nothing was waited for."""
        with self.lock:
            entry = self.waiting.pop(component, None)
        metrics.DEPENDENCY_UP.labels(component).set(1)
        if entry is None:
            return None
        metrics.RECONNECTS.labels(component).inc()
        metrics.WAITING_SECONDS.labels(component).set(0)
        return time.monotonic() - entry[1]

    def back(self, component: str) -> None:
        """`component` answered: ends a wait for it (saying how long it was), if there was one."""
        seconds = self.wait_ended(component)
        if seconds is not None:
            say(f"{component} at {self.address(component)} is back after {seconds:,.0f} s")

    def waiting_line(self) -> str | None:
        """`waiting for PostgreSQL at host:port/db (12 s)`, or None."""
        with self.lock:
            items = list(self.waiting.items())
        if not items:
            return None
        now = time.monotonic()
        parts = []
        for component, (address, since) in items:
            metrics.WAITING_SECONDS.labels(component).set(now - since)
            parts.append(f"waiting for {component} at {address} ({now - since:,.0f} s)")
        return "; ".join(parts)

    def alive(self) -> bool:
        return self.beat is None or time.monotonic() - self.beat < STUCK_SECONDS

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        with self.lock:
            waiting = {c: round(time.monotonic() - since, 1) for c, (_, since) in self.waiting.items()}
        store_ok = faults.POSTGRES not in waiting and faults.DISK not in waiting and self.started
        broker_ok = faults.BROKER not in waiting and self.broker_ok
        ready = store_ok and broker_ok and not self.stopping.is_set()
        return ready, {"status": "ready" if ready else "not ready", "store": "up" if store_ok else "down",
                       "broker": "up" if broker_ok else "down", "consumer_lag": self.lag,
                       "waiting_for": waiting}


def wait_out(action: Callable[[], T], health: Health, say: Callable[[str], None],
             recover: Callable[[], None] | None = None) -> T:
    """`action()`, repeated with backoff for as long as it fails on an unreachable dependency
    (each attempt after the first preceded by `recover()`, which may fail the same way). A fault
    waiting cannot cure is raised; so is `Abandoned` when stopping is asked for meanwhile."""
    attempt, waited_for, said = 0, None, 0.0
    while True:
        try:
            if attempt and recover is not None:
                recover()
            result = action()
        except Abandoned:
            raise
        except Exception as error:
            fault = faults.describe(error, health.settings)
            if not fault.transient:
                raise
            if health.wait_started(fault.component) or time.monotonic() - said >= REPORT_EVERY:
                say(f"{fault.line}; waiting")
                said = time.monotonic()
            waited_for = fault.component
            if health.stopping.wait(BACKOFF[min(attempt, len(BACKOFF) - 1)]):
                raise Abandoned(fault.line) from None
            attempt += 1
            continue
        if waited_for is not None:
            health.back(waited_for)
        return result


class _Handler(BaseHTTPRequestHandler):
    health: Health

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/health":
            alive = self.health.alive()
            self._send(200 if alive else 503, orjson.dumps({"status": "alive" if alive else "stuck"}),
                       "application/json")
        elif path == "/ready":
            ready, body = self.health.readiness()
            self._send(200 if ready else 503, orjson.dumps(body), "application/json")
        elif path == "/metrics":
            self.health.waiting_line()  # brings the waiting gauges up to date
            self._send(200, *metrics.exposition())
        else:
            self._send(404, orjson.dumps({"code": "not_found", "message": f"no {path} here: /health, "
                                          "/ready, /metrics"}), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no access log
        return


def serve(health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """Starts the health endpoint on a daemon thread; an address in use is a one-line error."""
    handler = type("HealthHandler", (_Handler,), {"health": health})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as error:
        raise OSError(f"--health-port: cannot listen on {host}:{port} ({error.strerror})") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="cdp-health", daemon=True).start()
    return server


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
