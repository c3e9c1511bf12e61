"""The HTTP API of `cdp serve` (FastAPI): collector, profiles, SQL, health and metrics.

Every refusal is JSON `{"code", "message"}` with the right status; an unexpected failure is a
500 with the same shape, never a traceback. Keys: `Authorization: Bearer KEY`, or HTTP Basic with
the key as user name (Segment's SDKs), or Segment's `writeKey` in the body.
"""
from __future__ import annotations

import asyncio
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cdp.application import CustomerCarries
from cdp.erasure import rejected_inputs
from cdp.keys import Key
from cdp.server import telemetry
from cdp.audit import select as select_entries, since as parse_since
from cdp.server.access import Denied, actor_of, token_of
from cdp.server.audience_routes import mount as mount_audiences
from cdp.server.sql import QueryRefused, QueryTimeout, encode, run_read_only
from cdp.server.viewgate import ViewRequests
from ingest import segment
from ingest.normalise import email as normal_email, phone as normal_phone
from ingest.records import Accepted, Rejected
from projections import access, profiles

MAX_EVENTS_BODY = 5 * 1024 * 1024  # a CloudEvents batch
CE_ATTRIBUTES = ("specversion", "id", "source", "type", "time", "subject", "dataschema")


class QueryBody(BaseModel):
    sql: str = Field(description="One SELECT statement against the unified view's tables.")
    params: list[Any] | dict[str, Any] | None = Field(default=None, description="Prepared-statement parameters.")


class Problem(BaseModel):
    """Every refusal and failure: a machine-readable code and a sentence for people."""
    code: str
    message: str


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the refusals a route may answer with."""
    meaning = {400: "Bad request", 401: "No or unknown key", 403: "The key may not do this",
               404: "No such customer", 409: "The reference names several customers", 429: "Rate limited"}
    return {status: {"model": Problem, "description": meaning[status]} for status in statuses}


class MeasureRequests:
    """Request counts and latency by route, as a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware (`@app.middleware`) runs every request through a task and memory streams."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        await self.app(scope, receive, sending)
        name = getattr(scope.get("route"), "path", "unmatched")  # the router notes the route in the scope
        telemetry.requests.labels(name, str(status[0])).inc()
        telemetry.latency.labels(name).observe(time.perf_counter() - started)


class ProfileReads:
    """`GET /v1/profiles/{ref}` answered ahead of FastAPI's routing, as a plain ASGI middleware (the
    route stays declared, for OpenAPI and as the same answer). A CRM's look-up is the server's
    hottest read: FastAPI's per-request work (dependency solving, its request/response wrappers,
    anyio's thread-pool hand-off) cost the event loop more than the look-up's own Python, and
    every millisecond the loop holds the GIL delays the look-up threads and the collector alike.
    The DuckDB part runs on a small pool of threads of its own, each with its own cursor."""

    PREFIX = "/v1/profiles/"
    THREADS = 4

    def __init__(self, app: Any, service: Any, route: Any, answer: Callable[[str, Request], dict[str, Any]]):
        self.app, self.service, self.route, self.answer = app, service, route, answer
        self.pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="cdp-lookup")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        ref = path[len(self.PREFIX):]
        if scope["type"] != "http" or scope["method"] != "GET" or not path.startswith(self.PREFIX) \
                or not ref or "/" in ref:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # MeasureRequests labels it as FastAPI's router would
        request = Request(scope, receive)
        try:
            body = await asyncio.get_running_loop().run_in_executor(self.pool, self.answer, ref, request)
            response: Response = Response(orjson.dumps(body, default=str), media_type="application/json")
        except Denied as problem:
            response = error(problem.status, problem.code, problem.message, problem.headers)
        except Exception as problem:  # noqa: BLE001 - the same answer as the app's handler of the unexpected
            self.service.log(f"internal error: {problem!r}")
            response = error(500, "internal", "the server failed to answer; the request was not accepted")
        await response(scope, receive, send)


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, **extra}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, gunzipped when sent so, refused past `limit` bytes (before and after inflating)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Denied(400, "too_large", f"the body exceeds {limit:,} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if request.headers.get("content-encoding", "").lower() == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as problem:
            raise Denied(400, "malformed", f"the body is not valid gzip: {problem}") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise Denied(400, "too_large", f"the inflated body exceeds {limit:,} bytes")
    return body


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as problem:
        raise Denied(400, "malformed", f"the body is not valid JSON: {problem}") from None


def build_app(service: Any) -> FastAPI:
    """`service` (cdp/server/service.py) holds the read side, the writer, the gate and the settings."""
    app = FastAPI(title="cdp", version="1", docs_url=None, redoc_url=None,
                  description="Customer-data platform: collector (Segment, CloudEvents), profiles, SQL.")
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="swagger-assets")

    @app.exception_handler(Denied)
    async def denied(_: Request, problem: Denied) -> JSONResponse:
        return error(problem.status, problem.code, problem.message, problem.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, problem: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(problem.status_code, "http_error")
        return error(problem.status_code, code, str(problem.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, problem: RequestValidationError) -> JSONResponse:
        first = problem.errors()[0] if problem.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(400, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, problem: Exception) -> JSONResponse:
        service.log(f"internal error: {problem!r}")
        return error(500, "internal", "the server failed to answer; the request was not accepted")

    def admit(request: Request, scope: str, group: bool = False, token: str | None = None) -> Key:
        return service.gate.admit(token or token_of(request), scope, group)

    # -- documentation, health, metrics ------------------------------------------------------

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="cdp API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    @app.get("/health", summary="Liveness and how far the view is behind the store")
    async def health() -> JSONResponse:
        if not service.view_gate.enter():  # the view's file is being rewritten (viewgate.py)
            return JSONResponse({"status": "degraded", "mode": service.mode, "intake_pending": service.pending,
                                 "view_rewrite_pending": service.view_rewrite_pending,
                                 "problem": "the view's file is being rewritten after an erasure: reads of the "
                                            "view wait for it (503 past a few seconds)"}, status_code=503)
        try:
            read = service.read
            head, position = await run_in_threadpool(lambda: (read.head(), read.position))
        finally:
            service.view_gate.leave()
        ok = read.error is None
        body = {"status": "ok" if ok else "degraded", "mode": service.mode, "view_position": position,
                "store_head": head, "behind": max(head - position, 0), "intake_pending": service.pending,
                "view_rewrite_pending": service.view_rewrite_pending,
                "store_rewrite_pending": service.store_rewrite_pending}
        if (resolver := service.resolver_state) is not None:
            body["resolver"] = resolver
        if not ok:
            body["problem"] = str(read.error).splitlines()[0]
        if getattr(service.writer, "error", None):  # the intake's resolver retries; say why it waits
            body["intake_problem"] = service.writer.error
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics (a read or admin key)")
    async def metrics(request: Request) -> Response:
        admit(request, "read")
        read = service.read
        head, position = await run_in_threadpool(lambda: (read.head(), read.position))
        telemetry.view_position.set(position)
        telemetry.store_head.set(head)
        telemetry.profiles_published.set(read.published)
        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    # -- collector ---------------------------------------------------------------------------

    async def collect(key: Key, events: list[tuple[Any, str | None]], api: str) -> JSONResponse:
        """`events` are (CloudEvent or a reason it could not be made, the unit the message named).
        Answers once every record is committed to the intake (embedded) or acknowledged (Kafka)."""
        telemetry.events_in.labels(api).inc(len(events))
        records: list[Accepted | Rejected] = []
        forbidden, failed = [], []
        for index, (event, named) in enumerate(events):
            origin = f"http:{api}:key {key.key_id[:8]}"
            if isinstance(event, str):
                record: Accepted | Rejected = Rejected(reason=event, origin=origin, kind="mapping",
                                                      raw=orjson.dumps(named or {}).decode())
            elif key.unit is not None and named not in (None, key.unit):
                record = Rejected(reason=f"a key of business unit {key.unit!r} may not publish for {named!r}",
                                  origin=origin, kind="forbidden", raw=orjson.dumps(event, default=str).decode(),
                                  event_id=str(event.get("id")), source=str(event.get("source")))
                forbidden.append({"index": index, "id": event.get("id"), "reason": record.reason})
            else:
                record = service.ingestor.from_event(event, origin)
            if isinstance(record, Rejected) and record.kind != "forbidden":
                failed.append({"index": index, "id": record.event_id, "reason": record.reason})
            records.append(record)
        if forbidden:  # the whole request is refused; only the offending messages are dead-lettered
            offending = [r for r in records if isinstance(r, Rejected) and r.kind == "forbidden"]
            await service.write(offending)
            telemetry.events_dead.labels("forbidden").inc(len(offending))
            return error(403, "forbidden", forbidden[0]["reason"], failed=forbidden)
        await service.write(records)
        accepted = sum(isinstance(r, Accepted) for r in records)
        telemetry.events_accepted.inc(accepted)
        for r in records:
            if isinstance(r, Rejected):
                telemetry.events_dead.labels(r.kind).inc()
        if failed:
            return error(400, "invalid_messages", f"{len(failed)} of {len(records)} message(s) rejected "
                         f"(dead-lettered); the others were accepted: first: {failed[0]['reason']}",
                         accepted=accepted, failed=failed)
        return JSONResponse({"success": True, "accepted": accepted})

    async def segment_call(request: Request, call: str | None) -> JSONResponse:
        limit = segment.MAX_BATCH_BYTES if call is None else segment.MAX_MESSAGE_BYTES
        raw = await read_body(request, limit)
        body = parse_json(raw)
        small = len(raw) <= segment.MAX_MESSAGE_BYTES  # then no message in it can be too large
        if not isinstance(body, dict):
            raise Denied(400, "malformed", "the body must be a JSON object")
        key = admit(request, "publish", token=token_of(request) or body.get("writeKey"))
        messages = body.get("batch") if call is None else [body]
        if not isinstance(messages, list) or not messages:
            raise Denied(400, "malformed", "a batch needs a non-empty `batch` array")
        events: list[tuple[Any, str | None]] = []
        for index, message in enumerate(messages):
            if not small and len(orjson.dumps(message)) > segment.MAX_MESSAGE_BYTES:
                raise Denied(400, "too_large", f"message {index} exceeds {segment.MAX_MESSAGE_BYTES:,} bytes")
            named = segment.named_unit(message) if isinstance(message, dict) else None
            unit = key.unit or named
            if unit is None:
                events.append(("a group-wide key must name the unit in context.business_unit", message))
                continue
            try:
                events.append((segment.to_cloudevent(message, unit, call), named))
            except segment.NotMappable as problem:
                events.append((f"message {index}: {problem}", message))
        return await collect(key, events, "segment")

    @app.post("/v1/batch", summary="Segment batch (up to 500 KB, 32 KB a message)")
    async def segment_batch(request: Request) -> JSONResponse:
        return await segment_call(request, None)

    def segment_route(call: str) -> Callable:
        async def endpoint(request: Request) -> JSONResponse:
            return await segment_call(request, call)
        return endpoint

    for call in segment.CALLS:
        app.add_api_route(f"/v1/{call}", segment_route(call), methods=["POST"], summary=f"Segment {call} (32 KB)")

    @app.post("/events", summary="CloudEvents HTTP binding: structured, batched or binary mode")
    async def cloudevents(request: Request) -> JSONResponse:
        key = admit(request, "publish")
        body = await read_body(request, MAX_EVENTS_BODY)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if "ce-specversion" in request.headers:  # binary mode: attributes in headers, the body is data
            event: dict[str, Any] = {name: request.headers[f"ce-{name}"] for name in CE_ATTRIBUTES
                                     if f"ce-{name}" in request.headers}
            event["datacontenttype"] = media or "application/json"
            event["data"] = parse_json(body)
            batch = [event]
        elif media == "application/cloudevents-batch+json":
            batch = parse_json(body)
            if not isinstance(batch, list):
                raise Denied(400, "malformed", "a CloudEvents batch is a JSON array")
        elif media in ("application/cloudevents+json", "application/json"):
            batch = [parse_json(body)]
        else:
            raise Denied(415, "unsupported_media_type", "send application/cloudevents+json, "
                         "application/cloudevents-batch+json, or binary mode with ce-* headers")
        events = []
        for item in batch:
            data = item.get("data") if isinstance(item, dict) else None
            named = data.get("business_unit") if isinstance(data, dict) else None
            if len(orjson.dumps(item)) > service.cfg.max_event_bytes:
                events.append((f"event exceeds {service.cfg.max_event_bytes:,} bytes (CDP_MAX_EVENT_BYTES)", item))
            else:
                events.append((item, named) if isinstance(item, dict) else ("an event must be a JSON object", item))
        return await collect(key, events, "cloudevents")

    # -- profiles ----------------------------------------------------------------------------

    def reference(ref: str) -> tuple[str, str]:
        """(id_type, value) of a profile reference, the value normalised as the view keeps it."""
        id_type, sep, value = ref.partition(":")
        if not sep or not value:
            raise Denied(400, "invalid_id", "expected {id_type}:{value}, id_type one of "
                         f"{', '.join(profiles.ID_TYPES)} or a business unit")
        if id_type == "email":
            value = normal_email(value) or value.strip().lower()
        elif id_type == "phone":
            value = normal_phone(value, service.cfg.default_phone_region) or value
        elif id_type == "customer_id":
            value = value.replace("-", "").lower()
        return id_type, value

    def resolve(ref: str, key: Key) -> profiles.Found:
        id_type, value = reference(ref)
        found = profiles.find(service.read.cursor(), id_type, value, key.unit)
        if not found:
            raise Denied(404, "not_found", f"no customer with {id_type} {value!r}")
        return one_of(found, id_type, value)

    def unheld_identifier(id_type: str, value: str) -> tuple[str, str]:
        """The identifier a reference no customer carries names, for a person the dead-letter
        alone may hold (an e-mail, a readable phone, a source record); else the 404."""
        if id_type in ("customer_id", "anonymous_id") or (id_type == "phone" and not value.startswith("+")):
            raise Denied(404, "not_found", f"no customer with {id_type} {value!r}")
        return (id_type, value) if id_type in ("email", "phone") else ("source", f"{id_type}:{value}")

    def exported(customer_id: str | None, parts: dict[str, Any], format: str) -> Response:
        if format == "zip":
            return Response(access.to_zip(access.files(customer_id, parts)), media_type="application/zip",
                            headers={"Content-Disposition": f'attachment; filename="customer-{customer_id}.zip"'})
        return Response(access.to_json(access.document(customer_id, parts)), media_type="application/json")

    def one_of(found: list[profiles.Found], id_type: str, value: str) -> profiles.Found:
        if len(found) > 1:
            raise Denied(409, "ambiguous", f"{len(found)} customers have {id_type} {value!r}: "
                         "ask by customer_id or unit:source_id")
        return found[0]

    def read_profile(ref: str, request: Request) -> dict[str, Any]:
        key = admit(request, "read")
        found = resolve(ref, key)
        service.audit.record(actor_of(key, request), "read", found.customer_id, via="api")
        body = profiles.profile(service.read.cursor(), found.customer_id, key.unit)
        if found.merged_from:
            body["merged_from"] = found.merged_from
            body["note"] = f"customer {found.merged_from} was merged into {found.customer_id}"
        return body

    @app.get("/v1/profiles/{ref}", responses=problems(400, 401, 403, 404, 409, 429),
             summary="One customer: golden record, identifiers, sources, metrics, consent")
    async def profile(ref: str, request: Request) -> Response:
        """Answered by ProfileReads ahead of the router; declared here for the API's description."""
        body = await run_in_threadpool(read_profile, ref, request)
        return Response(orjson.dumps(body, default=str), media_type="application/json")

    @app.get("/v1/profiles/{ref}/events", summary="A customer's timeline, newest first, in pages")
    async def profile_events(ref: str, request: Request, type: str | None = None,
                             limit: int = Query(50, ge=1, le=1000), cursor: int | None = None) -> Response:
        key = admit(request, "read")

        def answer() -> dict[str, Any]:
            found = resolve(ref, key)
            service.audit.record(actor_of(key, request), "read", found.customer_id, via="api", part="events")
            page, after = profiles.events(service.read.cursor(), found.customer_id, key.unit, type, limit, cursor)
            return {"customer_id": found.customer_id, "events": page, "next_cursor": after}

        return Response(orjson.dumps(await run_in_threadpool(answer), default=str), media_type="application/json")

    @app.get("/v1/profiles/{ref}/export", responses=problems(400, 401, 403, 404, 409, 429),
             summary="Everything held about a person (right of access): JSON, or a zip of JSON and CSVs")
    async def profile_export(ref: str, request: Request, format: Literal["json", "zip"] = "json") -> Response:
        """Golden record with scores, source records, every event, identity decisions, merged
        customers, consents and, for a group-wide key, the inputs of theirs the dead-letter file
        holds (`rejected_inputs`: what an erasure of theirs would remove). A business unit's key
        gets the golden record and its own unit's rows only, as `GET /v1/profiles/{ref}` shows them.
        A group-wide admin key asking by an e-mail, phone or source record no customer carries
        gets the rejected inputs that carry it (`customer_id` null): a person the dead-letter alone
        holds, as `cdp customer export` answers them."""
        key = admit(request, "read")

        def answer() -> Response:
            id_type, value = reference(ref)
            found = profiles.find(service.read.cursor(), id_type, value, key.unit)
            if not found and key.may("admin") and key.unit is None:
                identifier = unheld_identifier(id_type, value)
                parts = {"rejected_inputs": rejected_inputs(service.cfg.deadletter_path, service.app, None, [identifier])}
                service.audit.record(actor_of(key, request), "export", None, via="api", format=format,
                                     identifiers=[identifier[0]], entries=len(parts["rejected_inputs"][1]))
                return exported(None, parts, format)
            if not found:
                raise Denied(404, "not_found", f"no customer with {id_type} {value!r}")
            customer_id = one_of(found, id_type, value).customer_id
            parts = service.access_export(customer_id, key.unit)
            service.audit.record(actor_of(key, request), "export", customer_id, via="api", format=format)
            return exported(customer_id, parts, format)

        return await run_in_threadpool(answer)

    @app.delete("/v1/profiles/{ref}", responses=problems(400, 401, 403, 404, 409, 429),
                summary="Erase a person everywhere (group-wide admin key)")
    async def erase_profile(ref: str, request: Request, suppress: bool = True) -> JSONResponse:
        """As `cdp erase`: the person's data keys are destroyed, `Erased` is recorded, the view drops
        them, identity rows and dead-letter entries carrying their identifiers go, a tombstone is
        published on `cdp.profiles` (Kafka). `suppress=false` lets the person come back later.
        `view_rewrite_pending`: the view's file is still to be rewritten (CDP_VIEW_REWRITE_DELAY
        later, or when the server stops); until then its free blocks may still hold the person's
        bytes. `store_rewrite_pending`: the PostgreSQL tables the person was deleted from are still
        to be rewritten (in the background, at once, and again while another session holds one:
        GET /health says when it is done); until then their files may still hold the deleted rows.
        `store_tables_left`: tables the store's role may not vacuum, whose files keep the deleted
        rows until their owner runs VACUUM FULL on them."""
        key = admit(request, "admin", group=True)

        def answer() -> dict[str, Any]:
            id_type, value = reference(ref)
            found = profiles.find(service.read.cursor(), id_type, value, key.unit)
            if found:
                done = service.erase(one_of(found, id_type, value).customer_id, suppress, actor_of(key, request))
            else:  # an identifier no customer carries: its dead-letter entries go, it is suppressed
                identifier = unheld_identifier(id_type, value)
                try:
                    done = service.erase_identifiers([identifier], suppress, actor_of(key, request))
                except CustomerCarries as error:
                    raise Denied(409, "conflict", str(error)) from None
            e = done.erasure
            return {"customer_id": e.customer_id, "customer_ids": e.customer_ids, "sources": len(e.sources),
                    "identifiers": len(e.identifiers),
                    "suppressed": suppress if e.customer_id else bool(e.fingerprints),
                    "deadletter_entries": done.deadletter_entries,
                    "seconds": round(done.seconds, 3), "phases": {k: round(v, 3) for k, v in done.phases.items()},
                    "view_rewrite_pending": service.view_rewrite_pending, "store_tables_left": done.tables_left,
                    "store_rewrite_pending": service.store_rewrite_pending}

        return JSONResponse(await run_in_threadpool(answer))

    @app.get("/v1/audit", responses=problems(400, 401, 403, 429),
             summary="The audit trail: reads, exports, erasures, splits, keys (group-wide admin key)")
    async def audit(request: Request, customer: str | None = Query(None, max_length=200),
                    since: str | None = Query(None, max_length=64),
                    limit: int = Query(1000, ge=1, le=100_000)) -> Response:
        """Entries oldest first (the latest `limit`): `at`, `actor` (`key:<key id>` or a local
        user), `action`, `customer_id`, `detail`. `customer` is a customer id (an erased one
        too) or a profile reference (`email:…`, `unit:source_id`); `since` an ISO 8601 time."""
        key = admit(request, "admin", group=True)
        try:
            start = parse_since(since) if since else None
        except ValueError:
            raise Denied(400, "invalid_request", f"since: expected an ISO 8601 date or time, got {since!r}") from None

        def answer() -> list[dict]:
            ids = None
            if customer:
                ids = {resolve(customer, key).customer_id} if ":" in customer else {customer.replace("-", "").lower()}
            return select_entries(service.audit_entries(), ids, start)[-limit:]

        entries = await run_in_threadpool(answer)
        return Response(orjson.dumps({"entries": entries}), media_type="application/json")

    # -- SQL ---------------------------------------------------------------------------------

    @app.post("/v1/query", summary="Read-only SQL over the view (group-wide read key)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": QueryBody.model_json_schema()}}}})
    async def query(request: Request, format: Literal["json", "csv", "arrow", "parquet"] = "json") -> Response:
        key = admit(request, "read", group=True)
        try:
            body = QueryBody.model_validate(parse_json(await read_body(request, MAX_EVENTS_BODY)))
        except ValidationError as problem:
            first = problem.errors()[0]
            raise Denied(400, "invalid_request", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        cfg = service.cfg
        local = key is service.gate.local
        rows, seconds = (10**12, 3600.0) if local else (cfg.query_rows, cfg.query_seconds)

        def answer() -> tuple[bytes, str]:
            con = service.read.cursor().cursor()  # its own connection, so interrupt hits only this query
            try:
                return encode(run_read_only(con, body.sql, rows, seconds, body.params), format)
            finally:
                con.close()

        try:
            content, media = await run_in_threadpool(answer)
        except QueryRefused as problem:
            raise Denied(400, "read_only", str(problem)) from None
        except QueryTimeout as problem:
            raise Denied(408, "timeout", str(problem)) from None
        except Exception as problem:
            import duckdb

            if isinstance(problem, duckdb.Error):
                raise Denied(400, "query_failed", " ".join(str(problem).split())[:500]) from None
            raise
        return Response(content, media_type=media)

    mount_audiences(app, service, admit)  # /v1/audiences…, /v1/destinations… (admin)
    looked_up = next(r for r in app.routes if getattr(r, "endpoint", None) is profile)
    app.add_middleware(ProfileReads, service=service, route=looked_up, answer=read_profile)
    app.add_middleware(ViewRequests, gate=service.view_gate, decisions=service.decision_gate)  # outside the look-ups: they read the view too
    app.add_middleware(MeasureRequests)  # added last: the outermost, so it measures the look-ups too
    return app
