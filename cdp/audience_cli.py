"""`cdp audiences …` and `cdp destinations …`: segments of the unified view that downstream tools
receive as they change (projections/audiences.py keeps members, cdp/delivery.py delivers).

Definitions are commands of the application (events in the store), checked and stored by
cdp/audience_commands.py. While `cdp serve` owns the view, the commands that change something are
sent to its admin endpoints (`/v1/audiences…`, `/v1/destinations…`) with the server's local key;
otherwise this process catches the view up itself, right after the command.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import click
import duckdb

from cdp import audience_commands as commands
from cdp import console
from cdp.commandline import UserError, ask, finish_erasures, open_view, settings
from cdp.config import Settings
from cdp.server.client import running_server
from projections import audiences as model


@contextmanager
def _view_writer(cfg: Settings) -> Iterator[tuple]:
    """(application, projector) with the view caught up with the store, scores fresh."""
    from cdp.application import CustomerApplication
    from cdp.erasure import rewrite_view_if_pending
    from cdp.viewwriter import make_projector

    finish_erasures(cfg)
    with CustomerApplication(cfg) as app:
        try:
            projector = make_projector(cfg)
        except duckdb.IOException as error:
            raise UserError(commands.view_busy(cfg, error)) from None
        try:
            projector.catch_up(app, cfg.projection_batch)
            yield app, projector
        except commands.DefinitionError as error:
            raise UserError(str(error)) from None
        finally:
            projector.close()
    rewrite_view_if_pending(cfg)  # an erasure the catch-up took in


def _delete(kind: str, name: str) -> None:
    """Deletes the audience or destination `name` (a command) and takes it into the view."""
    from urllib.parse import quote

    cfg = settings()
    server = running_server(cfg)
    if server is not None:
        ask(server, "DELETE", f"/v1/{kind}s/{quote(name, safe='')}")
    else:
        with _view_writer(cfg) as (app, projector):
            commands.check_deletable(projector.con, kind, name)
            app.delete_definition(kind, name)
            projector.catch_up(app, cfg.projection_batch)
    console.out.print(f"{kind} {name} deleted")


def _checked(where: str, consent: str | None) -> str:
    try:
        return commands.checked_predicate(where, consent)
    except commands.DefinitionError as error:
        raise UserError(str(error)) from None


@click.group()
def audiences() -> None:
    """Segments of the unified view (a predicate over customers, optional consent) kept up to date."""


@audiences.command("create")
@click.argument("name")
@click.option("--where", "where", required=True, help="SQL condition over the columns of customers, e.g. \"churn_risk > 0.7\".")
@click.option("--consent", help="Only customers whose latest consent for this purpose is granted.")
def audiences_create(name: str, where: str, consent: str | None) -> None:
    """Define an audience; its members are computed now and kept up to date from then on."""
    cfg = settings()
    _checked(where, consent)  # a bad predicate is refused before anything is opened
    server = running_server(cfg)
    if server is not None:
        size = ask(server, "POST", "/v1/audiences", {"name": name, "where": where, "consent": consent})["size"]
    else:
        with _view_writer(cfg) as (app, projector):
            app.define_audience(name, commands.checked_audience(projector.con, name, where, consent), consent)
            projector.catch_up(app, cfg.projection_batch)
            size = commands.audience_size(projector.con, name)
    console.out.print(f"audience {name} created: {size:,} members (run `cdp audiences sync` to deliver)")


@audiences.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def audiences_list(fmt: str) -> None:
    """Every audience with its definition and current size."""
    cursor = open_view(settings()).execute(model.SELECT_LIST)
    _render(cursor, fmt, "audiences")


@audiences.command("show")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def audiences_show(name: str, fmt: str) -> None:
    """One audience: its definition, size now and the history of its size."""
    con = open_view(settings())
    if name not in commands.names(con, "audiences"):
        raise UserError(f"no audience {name!r} (see `cdp audiences list`)")
    if fmt == "table":
        row = con.execute(f"SELECT * FROM ({model.SELECT_LIST}) WHERE name = ?", [name]).fetchone()
        console.render_rows(["field", "value"], list(zip(("name", "where", "consent", "defined_at", "size"), row)),
                            "table", title=f"audience {name}")
    _render(con.execute(model.SELECT_SIZES, [name]), fmt, f"size of {name} over time")


@audiences.command("preview")
@click.option("--where", "where", required=True, help="SQL condition over the columns of customers.")
@click.option("--consent", help="Only customers whose latest consent for this purpose is granted.")
@click.option("--sample", default=10, show_default=True, type=click.IntRange(0, 1000), help="Customers to show.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def audiences_preview(where: str, consent: str | None, sample: int, fmt: str) -> None:
    """How many customers a definition selects now, and a few of them; nothing is saved."""
    from projections.sandbox import QueryLimits, QueryRejected, run_query

    predicate = _checked(where, consent)
    count_sql, sample_sql = model.preview_sql(predicate, consent, sample)
    cfg = settings()
    open_view(cfg).close()  # scores brought up to CDP_AS_OF first
    limits = QueryLimits(seconds=cfg.query_seconds)
    try:  # user SQL: on the sandbox's connection (no files, read-only, bounded)
        count = run_query(cfg.duckdb_path, count_sql, limits).table.column(0)[0].as_py()
        rows = run_query(cfg.duckdb_path, sample_sql, limits).table
    except QueryRejected as error:
        raise UserError(str(error)) from None
    console.err.print(f"{count:,} customers match")
    text = console.render_rows(rows.column_names, [tuple(r.values()) for r in rows.to_pylist()], fmt,
                               title=f"sample of {min(sample, count)} of {count:,}")
    if text is not None:
        sys.stdout.write(text)


@audiences.command("delete")
@click.argument("name")
def audiences_delete(name: str) -> None:
    """Delete an audience: its members exit (and destinations are told)."""
    _delete("audience", name)


@audiences.command("sync")
def audiences_sync() -> None:
    """Bring the view up to date, deliver every pending change to the destinations, exit (for cron)."""
    from cdp.delivery import Report, deliver_pending

    cfg = settings()
    server = running_server(cfg)
    if server is not None:  # the server delivers continuously: this asks for a round now and waits for it
        answer = ask(server, "POST", "/v1/audiences/sync")
        report = Report(answer["delivered"], answer["dead_lettered"], answer["published"],
                        {name: tuple(pair) for name, pair in answer["destinations"].items()})
    else:
        with _view_writer(cfg) as (_, projector):
            report = deliver_pending(projector.con, cfg)
    for name, (delivered, failed) in report.per_destination.items():
        console.out.print(f"{name}: {delivered:,} delivered, {failed:,} to the dead-letter")
    if cfg.kafka_bootstrap:
        console.out.print(f"{cfg.topic('cdp.audiences')}: {report.published:,} published")
    if report.dead_lettered:
        console.err.print(f"{report.dead_lettered:,} change(s) in the dead-letter: `cdp destinations retry` replays them")


def _render(cursor: duckdb.DuckDBPyConnection, fmt: str, title: str) -> None:
    columns = [d[0] for d in cursor.description]
    text = console.render_rows(columns, cursor.fetchall(), fmt, title=title)
    if text is not None:
        sys.stdout.write(text)


@click.group()
def destinations() -> None:
    """Where audience changes go: webhooks (and the cdp.audiences topic when Kafka is configured)."""


def _list(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


@destinations.command("create")
@click.argument("name")
@click.option("--webhook", required=True, help="URL that receives one POST per change.")
@click.option("--audiences", "audience_names", required=True, help="Audiences whose changes it receives: A,B.")
@click.option("--secret", help="Sign bodies with HMAC-SHA256 under this secret ('-': read it from stdin).")
@click.option("--fields", help="Customer fields sent with an entered change (default: the golden record).")
def destinations_create(name: str, webhook: str, audience_names: str, secret: str | None, fields: str | None) -> None:
    """Send the changes of some audiences to a webhook (from the start of their history)."""
    cfg = settings()
    if secret == "-":
        secret = sys.stdin.readline().rstrip("\r\n")
    wanted, chosen = _list(audience_names), _list(fields)
    server = running_server(cfg)
    if server is not None:
        ask(server, "POST", "/v1/destinations", {"name": name, "webhook": webhook, "audiences": wanted,
                                                   "secret": secret, "fields": chosen})
    else:
        with _view_writer(cfg) as (app, projector):
            checked = commands.checked_destination(cfg, projector.con, name, webhook, wanted, secret, chosen)
            app.define_destination(name, *checked)
            projector.catch_up(app, cfg.projection_batch)
    console.out.print(f"destination {name} created ({'signed' if secret else 'unsigned'}): "
                      "`cdp audiences sync` or `cdp serve` delivers")


@destinations.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def destinations_list(fmt: str) -> None:
    """Every destination, what it receives, how far delivery got (secrets are never shown)."""
    _render(open_view(settings()).execute("""
        SELECT d.name, d.webhook, d.audiences, d.sealed_secret IS NOT NULL AS signed,
               coalesce(s.delivered_through, 0) AS delivered_through,
               (SELECT count(*) FROM audience_changes c WHERE c.change_id > coalesce(s.delivered_through, 0)
                  AND list_contains(d.audiences, c.audience)) AS pending,
               (SELECT count(*) FROM destination_deadletter x WHERE x.destination = d.name) AS dead_letters
        FROM destinations d LEFT JOIN destination_state s ON s.destination = d.name
        WHERE NOT d.deleted ORDER BY d.name"""), fmt, "destinations")


@destinations.command("delete")
@click.argument("name")
def destinations_delete(name: str) -> None:
    """Stop delivering to a destination."""
    _delete("destination", name)


@destinations.command("retry")
@click.argument("name", required=False)
def destinations_retry(name: str | None) -> None:
    """Send the dead-lettered changes again (of one destination, or of all), same idempotency keys."""
    from cdp.delivery import retry_dead_letters

    cfg = settings()
    server = running_server(cfg)
    if server is not None:
        answer = ask(server, "POST", "/v1/destinations/retry", {"name": name})
        delivered, failing = answer["delivered"], answer["failing"]
    else:
        with _view_writer(cfg) as (_, projector):
            if name is not None:
                commands.check_deletable(projector.con, "destination", name)
            delivered, failing = retry_dead_letters(projector.con, cfg, name)
    console.out.print(f"{delivered:,} delivered from the dead-letter, {failing:,} still failing")
    if failing:
        raise SystemExit(1)
