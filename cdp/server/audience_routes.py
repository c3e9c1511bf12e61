"""Admin endpoints for audiences and destinations while `cdp serve` owns the view: what
`cdp audiences create|delete|sync` and `cdp destinations create|delete|retry` send to a running
server (with its local key), and what any admin key may call. The checks and the commands are
the CLI's own (cdp/audience_commands.py); a definition is answered once the view shows it.
"""
from __future__ import annotations

from operator import methodcaller
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from cdp import audience_commands as commands
from cdp.server.access import Denied

SYNC_SECONDS = 600.0  # a sync waits at most this long for the delivery round it asked for


class AudienceBody(BaseModel):
    name: str = Field(description="Letters, digits, '_', '.', '-' (at most 64).")
    where: str = Field(description="SQL condition over the columns of customers, e.g. \"churn_risk > 0.7\".")
    consent: str | None = Field(default=None, description="Only customers whose latest consent for it is granted.")


class DestinationBody(BaseModel):
    name: str
    webhook: str = Field(description="http(s) URL that receives one POST per change.")
    audiences: list[str] = Field(description="Audiences whose changes it receives.")
    secret: str | None = Field(default=None, description="Bodies signed with HMAC-SHA256 under it (stored sealed).")
    fields: list[str] = Field(default_factory=list, description="Customer fields of an entered change "
                                                                "(default: the golden record).")


class RetryBody(BaseModel):
    name: str | None = Field(default=None, description="One destination; all when absent.")


def mount(app: FastAPI, service: Any, admit: Callable[..., Any]) -> None:
    """Adds the endpoints to `app`; `service` is cdp/server/service.py's, `admit` the app's key check."""

    def refused(error: commands.DefinitionError) -> Denied:
        return Denied(400, "invalid_definition", str(error))

    async def define(request: Request, check: Callable[[Any], Callable[[Any], None]]) -> None:
        """`check(view)` refuses (DefinitionError) or returns the command to run on the application."""
        admit(request, "admin")

        def run() -> None:
            command = check(service.read.cursor())
            service.steward(command)

        try:
            await run_in_threadpool(run)
        except commands.DefinitionError as error:
            raise refused(error) from None

    @app.post("/v1/audiences", status_code=201, summary="Define an audience (admin key)")
    async def create_audience(body: AudienceBody, request: Request) -> JSONResponse:
        def check(con: Any) -> Callable[[Any], None]:
            predicate = commands.checked_audience(con, body.name, body.where, body.consent)
            return methodcaller("define_audience", body.name, predicate, body.consent)

        await define(request, check)
        size = commands.audience_size(service.read.cursor(), body.name)
        return JSONResponse({"name": body.name, "size": size}, status_code=201)

    @app.delete("/v1/audiences/{name}", summary="Delete an audience: its members exit (admin key)")
    async def delete_audience(name: str, request: Request) -> JSONResponse:
        await define(request, lambda con: _deleting(con, "audience", name))
        return JSONResponse({"name": name, "deleted": True})

    @app.post("/v1/destinations", status_code=201, summary="Define a webhook destination (admin key)")
    async def create_destination(body: DestinationBody, request: Request) -> JSONResponse:
        def check(con: Any) -> Callable[[Any], None]:
            checked = commands.checked_destination(service.cfg, con, body.name, body.webhook, body.audiences,
                                                   body.secret, body.fields)
            return methodcaller("define_destination", body.name, *checked)

        await define(request, check)
        return JSONResponse({"name": body.name, "signed": body.secret is not None}, status_code=201)

    @app.delete("/v1/destinations/{name}", summary="Stop delivering to a destination (admin key)")
    async def delete_destination(name: str, request: Request) -> JSONResponse:
        await define(request, lambda con: _deleting(con, "destination", name))
        return JSONResponse({"name": name, "deleted": True})

    @app.post("/v1/audiences/sync", summary="Deliver every pending audience change now and report (admin key)")
    async def sync(request: Request) -> JSONResponse:
        admit(request, "admin")

        def run() -> Any:
            service.read.wait_for(service.read.head(), SYNC_SECONDS)  # what the store has, in the view first
            return service.read.delivery.deliver_now(SYNC_SECONDS)

        try:
            report = await run_in_threadpool(run)
        except Exception as error:  # the broker or a key away, or no round in time: said in one line
            raise Denied(503, "delivery_failed", " ".join(str(error).split())[:300] or type(error).__name__) from None
        return JSONResponse({"delivered": report.delivered, "dead_lettered": report.dead_lettered,
                             "published": report.published,
                             "destinations": {k: list(v) for k, v in report.per_destination.items()}})

    @app.post("/v1/destinations/retry", summary="Send dead-lettered changes again, same keys (admin key)")
    async def retry(body: RetryBody, request: Request) -> JSONResponse:
        admit(request, "admin")
        from cdp.delivery import retry_dead_letters

        def run() -> tuple[int, int]:
            con = service.read.projector.con.cursor()
            try:
                if body.name is not None:
                    commands.check_deletable(con, "destination", body.name)
                return retry_dead_letters(con, service.cfg, body.name)
            finally:
                con.close()

        try:
            delivered, failing = await run_in_threadpool(run)
        except commands.DefinitionError as error:
            raise refused(error) from None
        return JSONResponse({"delivered": delivered, "failing": failing})


def _deleting(con: Any, kind: str, name: str) -> Callable[[Any], None]:
    commands.check_deletable(con, kind, name)
    return methodcaller("delete_definition", kind, name)
