"""The customer-360 console: server-rendered pages on the same read side, keys and commands as
the API (routes in the README, "The console").

Who may see what is the API's rule, asked of the same gate with the key the person signed in
with: a read key reads (a unit's key only the customers its unit knows, and of them its own
records and events), the review queue and dashboard need a group-wide key, and splits and review
verdicts an admin key. Those two go through the same write commands as `cdp identity split` and
`cdp identity review`; the page is answered once the view shows the result.
"""
from __future__ import annotations

import sys
import threading
import time
from datetime import datetime, timezone
from operator import methodcaller
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

import jinja2
from fastapi import FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from cdp.keys import digest
from cdp.server.access import Denied, actor_of
from cdp.server.console import lookup
from cdp.server.console.sessions import Session, Sessions
from projections import access, identity_views, profiles, report, timeline

HERE = Path(__file__).parent
PAGE_SIZE = 25
REVIEW_PAGE = 20
MONEY = {"lifetime_value", "predicted_value_12m", "avg_order_value"}


class LiveCharts:
    """The report's charts for the dashboard, kept drawn for the view as it is now.

    Drawing them reads the recent purchases (about a second on 1,000,000 customers), too long for
    a page, so a thread of its own redraws them whenever the view has moved on since the last
    drawing (asked by each dashboard request, and every few seconds by an open dashboard's
    script), and the page answers at once with the newest drawing, saying which view position it
    shows; the open page swaps in newer charts when they are ready. An unchanged view is never
    redrawn."""

    def __init__(self, read_side: Callable[[], Any], gate: Any) -> None:
        self._read_side = read_side  # the server's read side of the moment (a rewrite replaces it)
        self.gate = gate  # held while drawing, as a request reading the view holds it (viewgate.py)
        self.drawing: tuple[dict[str, str], int, float] | None = None  # charts, view position, when
        self.ready = threading.Condition()
        self.wanted = threading.Event()
        threading.Thread(target=self._redraw, name="cdp-dashboard", daemon=True).start()

    @property
    def read(self) -> Any:
        return self._read_side()

    def get(self, timeout: float = 60.0) -> tuple[dict[str, str], int, float, int]:
        """(charts, the view position they show, when they were drawn, the view's position now);
        waits only for the very first drawing."""
        position = self.read.position
        with self.ready:
            if self.drawing is None or self.drawing[1] != position:
                self.wanted.set()
            self.ready.wait_for(lambda: self.drawing is not None, timeout)
            if self.drawing is None:
                raise Refused(503, "The dashboard is still being drawn for the first time: reload in a moment.")
            charts, shown, drawn = self.drawing
        return charts, shown, drawn, position

    def _redraw(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            if not self.gate.enter():  # the view's file is being rewritten: drawn at the next ask
                continue
            try:
                con = self.read.cursor()
                con.execute("BEGIN TRANSACTION")  # the position and the charts from one snapshot
                try:
                    position = self.read.position
                    if self.drawing is None or self.drawing[1] != position:
                        drawing = (report.charts(con), position, time.time())
                        with self.ready:
                            self.drawing = drawing
                            self.ready.notify_all()
                finally:
                    con.execute("ROLLBACK")  # it only read; also leaves a failed transaction
            except Exception as problem:  # e.g. the view closing at shutdown: drawn at the next ask
                print(f"cdp serve: the dashboard was not drawn: {problem!r}", file=sys.stderr, flush=True)
            finally:
                self.gate.leave()


class SignIn(Exception):
    """No live session: the person is sent to /login."""


class Refused(Exception):
    """A console page refused (status and a sentence for the person)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["money"] = lambda v: "–" if v is None else f"{v:,.2f}"
    env.filters["percent"] = lambda v: "–" if v is None else f"{v:.0%}"
    env.filters["when"] = lambda v: "–" if v is None else str(v)[:16].replace("T", " ")
    env.globals["link"] = describe = identity_views.describe_link
    env.globals["describe_link"] = describe
    return env


def mount(app: FastAPI, service: Any) -> None:
    """Adds the console's routes, static files and error pages to the API's app."""
    cfg = service.cfg
    sessions = Sessions(cfg.console_sessions_path, cfg.console_key_path, cfg.console_session_hours * 3600)
    templates = _environment()
    live_charts = LiveCharts(lambda: service.read, service.view_gate)
    app.mount("/console/static", StaticFiles(directory=str(HERE / "static")), name="console-static")
    app.state.console_sessions = sessions

    def page(request: Request, name: str, status: int = 200, session: Session | None = None,
             **context: Any) -> HTMLResponse:
        rendering = time.perf_counter()
        html = templates.get_template(name).render(
            request=request, session=session, key=session.key if session else None,
            flash=sessions.take_flash(session) if session else None, **context)
        return HTMLResponse(html, status_code=status, headers={
            "Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
            "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                       "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
            "Server-Timing": _server_timing(request, rendering)})

    def _admitted(session: Session | None) -> Session | None:
        """The session with its key filled in for the page's header, while the key is live."""
        if session is not None and session.key is None:
            session.key = service.gate.known(session.key_digest)
        return session if session is None or session.key is not None else None

    @app.exception_handler(SignIn)
    async def sign_in(request: Request, _: SignIn) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(Refused)
    async def refused(request: Request, problem: Refused) -> HTMLResponse:
        return page(request, "error.html", problem.status, _admitted(sessions.of(request)), message=problem.message)

    def signed_in(request: Request, scope: str = "read", group: bool = False) -> Session:
        """The session, its key admitted again for `scope` by the API's gate (revocation, scope,
        unit, rate limit)."""
        request.state.started = time.perf_counter()
        session = sessions.of(request)
        if session is None:
            raise SignIn()
        try:
            session.key = service.gate.admit_digest(session.key_digest, scope, group)
            request.state.admitted = time.perf_counter()
        except Denied as problem:
            if problem.status == 401:  # the key was revoked since signing in: its sessions end
                sessions.end_for_key(session.key_digest)
                raise SignIn() from None
            raise Refused(problem.status, problem.message) from None
        return session

    def checked(request: Request, csrf: str, scope: str = "read", group: bool = False) -> Session:
        session = signed_in(request, scope, group)
        if not sessions.csrf_ok(session, csrf):
            raise Refused(403, "This form is out of date or was not sent from the console (CSRF check). "
                               "Go back, reload the page and try again.")
        return session

    # -- signing in and out ------------------------------------------------------------------

    def login_page(request: Request, status: int = 200, error: str | None = None) -> HTMLResponse:
        nonce = sessions.new_nonce()
        response = page(request, "login.html", status, csrf=nonce, error=error)
        sessions.set_login_nonce(request, response, nonce)
        return response

    @app.get("/login", include_in_schema=False)
    def login_form(request: Request) -> Response:
        if _admitted(sessions.of(request)) is not None:
            return RedirectResponse("/", status_code=303)
        return login_page(request)

    @app.post("/login", include_in_schema=False)
    def login(request: Request, key: str = Form("", max_length=500), csrf: str = Form("")) -> Response:
        if not sessions.login_nonce_ok(request, csrf):
            raise Refused(403, "The sign-in form expired or was not sent from the console (CSRF check): "
                               "open /login again.")
        try:
            service.gate.admit(key.strip(), "read")
        except Denied as problem:
            return login_page(request, problem.status, "That key is unknown or revoked." if problem.status == 401
                              else f"That key may not sign in here: {problem.message}.")
        response = RedirectResponse("/", status_code=303)
        sessions.start(response, request, digest(key.strip()))
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf: str = Form("")) -> Response:
        checked(request, csrf)
        response = RedirectResponse("/login", status_code=303)
        sessions.end(request, response)
        return response

    # -- search --------------------------------------------------------------------------------

    # where a typed number may have been written: any unit's region (ingest reads each unit's so)
    phone_regions = [cfg.default_phone_region, *sorted(set(cfg.phone_regions.values()) - {cfg.default_phone_region})]

    @app.get("/", include_in_schema=False)
    def home(request: Request, q: str = Query("", max_length=200)) -> Response:
        session = signed_in(request)
        kind, rows = lookup.find(service.read.cursor(), q, session.key.unit,
                                 phone_regions) if q.strip() else ("", [])
        return page(request, "search.html", session=session, q=q, kind=kind, rows=rows)

    @app.get("/console/suggest", include_in_schema=False)
    def suggest(request: Request, q: str = Query("", max_length=200)) -> Response:
        """Type-ahead: up to 8 matches as JSON for the search box."""
        if sessions.of(request) is None:
            return JSONResponse({"code": "unauthorized", "message": "sign in first"}, status_code=401)
        session = signed_in(request)
        rows = lookup.find(service.read.cursor(), q, session.key.unit, phone_regions,
                           limit=8)[1] if len(q.strip()) >= 2 else []
        return JSONResponse([{"customer_id": r["customer_id"],
                              "name": " ".join(p for p in (r["first_name"], r["last_name"]) if p) or "(no name)",
                              "detail": " · ".join(p for p in (r["email"], r["city"]) if p)} for r in rows],
                            headers={"Cache-Control": "no-store"})

    # -- the customer page ---------------------------------------------------------------------

    @app.get("/customers/{customer_id}", include_in_schema=False)
    def customer(request: Request, customer_id: str, type: str | None = Query(None, max_length=64),
                 unit: str | None = Query(None, max_length=64), before: str | None = Query(None, max_length=80),
                 merged_from: str | None = Query(None, max_length=64)) -> Response:
        session = signed_in(request)
        key, con = session.key, service.read.cursor()
        wanted = customer_id.replace("-", "").lower()
        found = profiles.find(con, "customer_id", wanted, key.unit)
        if not found:
            raise Refused(404, f"No customer {customer_id} (or not one your key's business unit knows).")
        if found[0].merged_from:
            return RedirectResponse(f"/customers/{found[0].customer_id}?" + urlencode({"merged_from": wanted}),
                                    status_code=303)
        body = profiles.profile(con, wanted, key.unit)
        service.audit.record(actor_of(key), "read", wanted, via="console")
        try:
            events, after = timeline.page(con, wanted, key.unit or unit or None, type or None, PAGE_SIZE, before)
        except ValueError as problem:
            raise Refused(400, str(problem)) from None
        types = [r[0] for r in con.execute("SELECT DISTINCT type FROM customer_events WHERE customer_id = ? "
                                           "ORDER BY 1", [wanted]).fetchall()]
        records = identity_views.record_values(con, [wanted])
        filters = {k: v for k, v in (("type", type), ("unit", unit)) if v}
        return page(request, "customer.html", session=session, c=body, events=events, types=types,
                    units=body["metrics"]["business_units"] or [], records=records, filters=filters,
                    next_page=(f"?{urlencode({**filters, 'before': after})}" if after is not None else None),
                    rules=service.cfg.survivorship, merged_from=_merged_into(con, merged_from, wanted),
                    admin=key.may("admin") and key.group)

    @app.get("/customers/{customer_id}/split", include_in_schema=False)
    def split_form(request: Request, customer_id: str, record: str = Query(..., max_length=200)) -> Response:
        session = signed_in(request, "admin", group=True)
        body = _customer(service, customer_id)
        if record not in {f"{s['business_unit']}:{s['source_id']}" for s in body["sources"]}:
            raise Refused(404, f"Customer {customer_id} has no source record {record}.")
        return page(request, "split.html", session=session, c=body, record=record)

    @app.post("/customers/{customer_id}/split", include_in_schema=False)
    def split(request: Request, customer_id: str, record: str = Form(...), csrf: str = Form(""),
              reason: str = Form("split in the console", max_length=500)) -> Response:
        session = checked(request, csrf, "admin", group=True)
        body = _customer(service, customer_id)
        try:
            decisions = service.steward(methodcaller("split", body["customer_id"], [record], reason,
                                                     actor_of(session.key)))
        except ValueError as problem:
            raise Refused(409, str(problem)) from None
        moved = ", ".join(f"{', '.join(d.source_keys)} → new customer {d.new_customer_id}" for d in decisions)
        sessions.flash(session, f"Split: {moved}.")
        return RedirectResponse(f"/customers/{body['customer_id']}", status_code=303)

    # -- the person's rights: access and erasure ---------------------------------------------

    @app.get("/customers/{customer_id}/export", include_in_schema=False)
    def export(request: Request, customer_id: str) -> Response:
        """Everything held about the person as a zip, as GET /v1/profiles/{id}/export?format=zip
        answers the same key (a unit's: its own rows), audited as an export from the console."""
        session = signed_in(request)
        key = session.key
        found = profiles.find(service.read.cursor(), "customer_id", customer_id.replace("-", "").lower(), key.unit)
        if not found:
            raise Refused(404, f"No customer {customer_id} (or not one your key's business unit knows).")
        wanted = found[0].customer_id
        parts = service.access_export(wanted, key.unit)
        service.audit.record(actor_of(key), "export", wanted, via="console", format="zip")
        return Response(access.to_zip(access.files(wanted, parts)), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="customer-{wanted}.zip"',
                                 "Cache-Control": "no-store"})

    @app.get("/customers/{customer_id}/erase", include_in_schema=False)
    def erase_form(request: Request, customer_id: str) -> Response:
        session = signed_in(request, "admin", group=True)
        return page(request, "erase.html", session=session, c=_customer(service, customer_id))

    @app.post("/customers/{customer_id}/erase", include_in_schema=False)
    def erase(request: Request, customer_id: str, csrf: str = Form(""),
              suppress: str = Form("", max_length=8)) -> Response:
        """As DELETE /v1/profiles/{id}: the person erased everywhere, by a group-wide admin key."""
        session = checked(request, csrf, "admin", group=True)
        body = _customer(service, customer_id)
        done = service.erase(body["customer_id"], suppress == "yes", actor_of(session.key))
        e = done.erasure
        later = " Their tables' files are rewritten in the background." if service.store_rewrite_pending else ""
        if service.view_rewrite_pending:
            later += " The view's file is rewritten shortly; until then its free blocks may still hold their bytes."
        sessions.flash(session, f"Erased customer {e.customer_id}: {len(e.sources)} source record(s), "
                                f"{len(e.customer_ids)} customer id(s), {done.deadletter_entries} dead-letter "
                                f"entr(ies); identifiers {'suppressed' if suppress == 'yes' else 'not suppressed'}."
                                + later)
        return RedirectResponse("/", status_code=303)

    # -- the review queue ----------------------------------------------------------------------

    @app.get("/review", include_in_schema=False)
    def review(request: Request) -> Response:
        session = signed_in(request, "read", group=True)
        con = service.read.cursor()
        pairs = identity_views.review_queue(con, REVIEW_PAGE)
        records = identity_views.record_values(
            con, sorted({p["customer_id"] for p in pairs} | {p["other_customer_id"] for p in pairs}))
        for pair in pairs:
            pair["evidence"] = _json(pair["evidence"])
        return page(request, "review.html", session=session, pairs=pairs, records=records,
                    fields=profiles.PROFILE_COLUMNS, admin=session.key.may("admin"))

    @app.post("/review/{review_id}", include_in_schema=False)
    def verdict(request: Request, review_id: str, action: str = Form(...), csrf: str = Form("")) -> Response:
        session = checked(request, csrf, "admin", group=True)
        if action not in ("confirm", "reject"):
            raise Refused(400, "The verdict is confirm or reject.")
        pair = identity_views.review_pair(service.read.cursor(), review_id)
        if pair is None:
            raise Refused(404, f"No review {review_id}.")
        try:
            customer_id = service.steward(
                methodcaller("confirm_match" if action == "confirm" else "reject_match", pair[0], pair[1]))
        except ValueError as problem:
            raise Refused(409, str(problem)) from None
        sessions.flash(session, f"Confirmed: {pair[0]} and {pair[1]} are one customer, {customer_id}."
                       if action == "confirm" else f"Rejected: {pair[0]} and {pair[1]} stay apart; the verdict is "
                       "remembered.")
        return RedirectResponse("/review", status_code=303)

    # -- the dashboard -------------------------------------------------------------------------

    @app.get("/dashboard", include_in_schema=False)
    def dashboard(request: Request) -> Response:
        session = signed_in(request, "read", group=True)
        charts, shown, drawn, position = live_charts.get()
        return page(request, "dashboard.html", session=session, charts=charts, shown=shown, position=position,
                    drawn=datetime.fromtimestamp(drawn, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))

    @app.get("/console/dashboard-state", include_in_schema=False)
    def dashboard_state(request: Request) -> Response:
        """For the open dashboard's script: the view position its newest drawing shows (asking
        redraws the charts when the view has moved on)."""
        signed_in(request, "read", group=True)
        _, shown, _, position = live_charts.get()
        return JSONResponse({"shown": shown, "view": position}, headers={"Cache-Control": "no-store"})


def _server_timing(request: Request, rendering: float) -> str:
    """Where a page's time went (the Server-Timing header; bench/console.py prints it): the
    session and key check, the reads from the view, and the template."""
    started = getattr(request.state, "started", None)
    admitted = getattr(request.state, "admitted", None)
    stages = [("render", rendering, time.perf_counter())]
    if started is not None and admitted is not None:
        stages = [("session", started, admitted), ("read", admitted, rendering)] + stages
    return ", ".join(f"{name};dur={(end - start) * 1e3:.2f}" for name, start, end in stages)


def _customer(service: Any, customer_id: str) -> dict[str, Any]:
    con = service.read.cursor()
    wanted = customer_id.replace("-", "").lower()
    if not profiles.knows(con, wanted, None):
        raise Refused(404, f"No customer {customer_id}.")
    return profiles.profile(con, wanted, None)


def _merged_into(con: Any, absorbed: str | None, survivor: str) -> str | None:
    """`absorbed` when it really was merged into `survivor` (the notice is not the link's to make)."""
    if not absorbed:
        return None
    found = profiles.find(con, "customer_id", absorbed.replace("-", "").lower(), None)
    return absorbed if found and found[0].merged_from and found[0].customer_id == survivor else None


def _json(text: Any) -> Any:
    import orjson

    return orjson.loads(text) if isinstance(text, str) else text
