"""The `cdp` command line. Every user error is one clear line on stderr and a non-zero exit."""
from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

import click
import duckdb
import orjson

from cdp import console
from cdp.commandline import (UserError, ask, finish_erasures, first_line, local_user, open_view, refresh_view, settings,
                             view_error)
from cdp.config import ConfigError, Settings
from cdp.audience_cli import audiences, destinations
from cdp.identity_cli import identity

EXIT_USAGE = 2
EXIT_FAILURE = 1


def print_summary(summary, title: str) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rate = summary.read / summary.seconds if summary.seconds else 0.0
    rows = [
        ("events read", f"{summary.read:,}"),
        ("accepted", f"{summary.accepted:,}"),
        ("rejected (dead-letter)", f"{summary.rejected:,}" + (
            "  (" + ", ".join(f"{k}: {v}" for k, v in sorted(summary.reasons.items())) + ")" if summary.reasons else "")),
        ("duplicates ignored", f"{summary.duplicates:,}"),
        ("suppressed (erased people)", f"{summary.suppressed:,}"),
        ("new customers", f"{summary.new_customers:,}"),
        ("source records linked", f"{summary.linked_sources:,}"),
        ("merges", f"{summary.merges:,}"),
        ("stored events", f"{summary.stored_events:,}"),
        *([("self-training", summary.retrained)] if summary.retrained else []),
        ("time", f"{summary.seconds:.1f} s ({rate:,.0f} events/s)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.out.print(table)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Customer-data platform: channel events in, one unified customer view out.

    Configuration comes from the environment: CDP_HOME (data folder, default ./.cdp),
    CDP_EVENT_STORE (a postgresql:// URL; unset: SQLite in CDP_HOME), CDP_KAFKA_BOOTSTRAP,
    CDP_AS_OF (YYYY-MM-DD, default today: the date recency, lifecycle and churn risk are computed at).
    """


def run_ingest(cfg: Settings, paths: list[str], mapping: Path | None):
    from cdp.pipeline import Pipeline
    from ingest.stage import check_inputs, total_bytes

    paths = check_inputs(paths)
    total = total_bytes(paths)
    with Pipeline(cfg) as pipeline, console.progress_bar("ingest", total, unit_bytes=True) as bar:
        summary = pipeline.ingest(paths, mapping, lambda _: bar.reach(pipeline.ingestor.bytes_read))
    return summary


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--mapping", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML mapping for CSV/Parquet inputs (default: <file>.mapping.toml beside each file).")
@click.option("--kafka", "to_kafka", is_flag=True,
              help="Publish the events to the cdp.events topic (CDP_KAFKA_BOOTSTRAP) for `cdp worker`.")
def ingest(paths: tuple[str, ...], mapping: Path | None, to_kafka: bool) -> None:
    """Ingest CloudEvents JSONL files (or - for stdin), or CSV/Parquet through a mapping file."""
    cfg = settings()
    if to_kafka:
        publish(cfg, list(paths), mapping)
        return
    summary = run_ingest(cfg, list(paths), mapping)
    print_summary(summary, "ingest")
    if summary.rejected:
        console.err.print(f"{summary.rejected:,} rejected event(s) written to {cfg.deadletter_path}")


def publish(cfg: Settings, paths: list[str], mapping: Path | None) -> None:
    from cdp.publishing import publish_files
    from ingest.stage import check_inputs

    cfg.require_kafka()
    summary, unscreened = publish_files(cfg, check_inputs(paths), mapping)
    rate = summary.accepted / summary.seconds if summary.seconds else 0.0
    console.out.print(f"published {summary.accepted:,} events to {cfg.topic('cdp.events')} in "
                      f"{summary.seconds:.1f} s ({rate:,.0f} events/s)")
    if summary.rejected:
        console.err.print(f"{summary.rejected:,} rejected event(s) written to {cfg.deadletter_path}")
    if summary.suppressed:
        console.err.print(f"{summary.suppressed:,} event(s) of erased people suppressed: not published, their ids "
                          f"alone written to {cfg.deadletter_path}")
    if unscreened:
        console.err.print(f"the events were not checked for erased people's identifiers ({unscreened}): all valid "
                          "ones were published, and rejected inputs are kept whole")
    send_missed_tombstones(cfg)


def send_missed_tombstones(cfg: Settings) -> None:
    """Sends the tombstones an earlier `cdp erase` noted when the broker was out of reach, now
    that a command has reached it: without a server, they waited for the next erasure. A broker
    lost again meanwhile is said, and they wait for the next command that publishes."""
    from cdp.erasure import try_send_tombstones, unsent_tombstones

    waiting = unsent_tombstones(cfg)
    if not waiting:
        return
    unsent = try_send_tombstones(cfg)
    if unsent:
        console.err.print(f"the {len(waiting)} tombstone(s) an earlier erasure could not send are still to send "
                          f"({unsent})")
    else:
        console.err.print(f"sent the {len(waiting)} tombstone(s) an earlier erasure could not send to cdp.profiles")


@cli.command()
@click.option("--health-port", type=click.IntRange(0, 65535), default=None,
              help="Serve /health (liveness), /ready (readiness) and /metrics (Prometheus) on this port.")
@click.option("--health-host", default="127.0.0.1", show_default=True,
              help="Address the health port listens on (0.0.0.0 in a container, for the probes).")
@click.option("--reset-group", is_flag=True,
              help="Forget the consumer group's offsets first, so cdp.events is read from the start "
                   "(after the store was replaced; stop the group's other workers first).")
def worker(health_port: int | None, health_host: str, reset_group: bool) -> None:
    """Consume cdp.events: validate, resolve, store (the view and cdp.profiles belong to `cdp serve`)."""
    from cdp.worker import run

    run(settings(), health_host, health_port, reset_group)


@cli.command()
@click.option("--people", default=2000, show_default=True, type=click.IntRange(10, 5_000_000),
              help="How many real people to simulate.")
@click.option("--seed", default=7, show_default=True, type=int, help="Random seed (same seed, same data).")
@click.option("--hard", is_flag=True, help="Harder identity data: more typos, shared household phones, fewer identifiers.")
def demo(people: int, seed: int, hard: bool) -> None:
    """Generate data for three business units, run the pipeline, show what came out."""
    from cdp.demo import DemoSpec, generate
    from identity.evaluation import pairwise_scores, read_truth

    cfg = settings()
    directory = cfg.home / "demo-input"
    spec = DemoSpec(people=people, seed=seed, hard=hard, invalid_rate=0.005)
    console.err.print(f"Generating demo data for {people:,} people in {directory} …")
    with console.progress_bar("generate", people * 12.4) as bar:
        files = generate(directory, spec, bar.reach, csv_unit="telecom")
    summary = run_ingest(cfg, [str(p) for p in files.event_files], None)
    print_summary(summary, f"demo: {files.people:,} people, {files.source_records:,} source records in 3 business units")
    con = open_view(cfg)
    predicted = {(u, s): c for u, s, c in con.execute(
        "SELECT business_unit, source_id, customer_id FROM customer_sources").fetchall()}
    customers, units = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE len(business_units) > 1) FROM customers").fetchall()[0]
    scores = pairwise_scores(predicted, read_truth(files.truth_file))
    from rich.table import Table

    table = Table(title="unified view", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("source records", f"{len(predicted):,}")
    table.add_row("unified customers", f"{customers:,} (real people: {files.people:,})")
    table.add_row("customers in 2+ business units", f"{units:,}")
    table.add_row("identity precision (pairwise)", f"{scores.precision:.3f}")
    table.add_row("identity recall (pairwise)", f"{scores.recall:.3f}")
    table.add_row("identity F1", f"{scores.f1:.3f}")
    console.out.print(table)
    console.out.print(f"Try: cdp query \"SELECT * FROM customers ORDER BY lifetime_value DESC LIMIT 5\"  (CDP_HOME={cfg.home})")


@cli.command()
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def query(sql: str, fmt: str) -> None:
    """Run one read-only SQL statement against the unified view (no files, no settings, bounded)."""
    from cdp.server.client import RemoteView, ServerError, running_server
    from projections.sandbox import QueryLimits, QueryRejected, check_statement, run_query

    cfg = settings()
    server = running_server(cfg)
    if server is not None:  # `cdp serve` owns the view: it runs the query (in its own sandbox)
        try:
            table = RemoteView(*server).execute(sql).table
        except ServerError as error:
            raise UserError(f"query failed: {' '.join(str(error).split())}") from None
        text = console.render_rows(table.column_names, list(zip(*(c.to_pylist() for c in table.columns))), fmt)
        if text is not None:
            sys.stdout.write(text)
        return
    try:
        check_statement(sql)  # an empty or writing statement fails before the view is touched
        refresh_view(cfg)  # user SQL then runs in the sandbox, on a connection of its own
        result = run_query(cfg.duckdb_path, sql, QueryLimits(rows=cfg.query_rows, seconds=cfg.query_seconds,
                                                             memory=cfg.duckdb_memory))
    except QueryRejected as error:
        raise UserError(str(error)) from None
    table = result.table
    text = console.render_rows(table.column_names, list(zip(*(c.to_pylist() for c in table.columns))), fmt)
    if text is not None:
        sys.stdout.write(text)


@cli.group()
def customer() -> None:
    """Look at one unified customer."""


def what_who_is(cfg: Settings, who: str) -> tuple[str, str]:
    """(kind, value) of WHO: 'customer_id', 'email', 'phone' (normalised as the store keeps them)
    or 'source' (unit:source_id)."""
    from ingest import normalise
    from projections.queries import LookupError_, classify

    try:
        kind, value = classify(who)
    except LookupError_ as error:
        raise UserError(str(error)) from None
    if kind == "email":
        value = normalise.email(value) or value.strip().lower()
    elif kind == "phone":
        value = normalise.phone(value, cfg.default_phone_region) or value
    return kind, value


def find_who(cfg: Settings, con: duckdb.DuckDBPyConnection, who: str) -> list[str]:
    """The customer ids WHO names (a customer id, an e-mail, a phone or unit:source_id)."""
    from projections.queries import find_customers

    kind, value = what_who_is(cfg, who)
    ids = find_customers(con, kind, value)
    if not ids:
        raise UserError(f"no customer found for {kind} {value!r}")
    return ids


@customer.command("show")
@click.argument("who")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000), help="Timeline events to show.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def customer_show(who: str, limit: int, fmt: str) -> None:
    """Golden record, source records and timeline, by customer id, email, phone or business_unit:source_id."""
    from projections.queries import customer_picture

    cfg = settings()
    con = open_view(cfg)
    ids = find_who(cfg, con, who)
    pictures = [customer_picture(con, cid, limit) for cid in ids]
    record_access(cfg, "read", ids, via="cli")
    if fmt == "json":
        sys.stdout.write(orjson.dumps(pictures if len(pictures) > 1 else pictures[0], default=console._plain,
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for picture in pictures:
        golden = picture["golden_record"]
        console.render_rows(["field", "value"], [(k, v) for k, v in golden.items() if v not in (None, [])],
                            "table", title=f"customer {picture['customer_id']}")
        if picture["sources"]:
            cols = list(picture["sources"][0])
            console.render_rows(cols, [tuple(s.values()) for s in picture["sources"]], "table", title="source records")
        if picture["timeline"]:
            cols = list(picture["timeline"][0])
            console.render_rows(cols, [tuple(t.values()) for t in picture["timeline"]], "table",
                                title=f"timeline (latest {len(picture['timeline'])} of {golden.get('events', 0)})")


@customer.command("export")
@click.argument("who")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def customer_export(who: str, directory: Path) -> None:
    """Write everything held about a person (golden record, sources, events, decisions, consents,
    scores, rejected inputs) as JSON and CSV into DIRECTORY."""
    from cdp.application import CustomerApplication
    from cdp.erasure import rejected_inputs
    from projections.access import export_customer, files, write_files
    from projections.queries import find_customers

    cfg = settings()
    kind, value = what_who_is(cfg, who)
    con = open_view(cfg)
    ids = find_customers(con, kind, value)
    if not ids and kind != "customer_id":  # a person the dead-letter alone may hold (cf. erase_identifier)
        identifiers = [(kind, value)]
        with CustomerApplication(cfg) as app:
            rejected = rejected_inputs(cfg.deadletter_path, app, None, identifiers)
            app.record_access(local_user(), "export", None, via="cli", identifiers=[kind], entries=len(rejected[1]))
        paths = write_files(directory, files(None, {"rejected_inputs": rejected}))
        console.out.print(f"no customer carries {kind} {value!r}: wrote {len(paths)} files with the "
                          f"{len(rejected[1])} rejected input(s) that carry it to {directory}")
        return
    if not ids:
        raise UserError(f"no customer found for {kind} {value!r}")
    with CustomerApplication(cfg) as app:  # once: the rejected inputs and the audit entries of every customer
        for customer_id in ids:
            rejected = rejected_inputs(cfg.deadletter_path, app, customer_id)
            paths = export_customer(con, customer_id, directory / customer_id if len(ids) > 1 else directory,
                                    more={"rejected_inputs": rejected})
            app.record_access(local_user(), "export", customer_id, via="cli", files=len(paths))
            console.out.print(f"wrote {len(paths)} files for customer {customer_id} to {paths[0].parent}")


@cli.command("erase")
@click.argument("who")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--keep-suppression", type=click.Choice(["yes", "no"]), default="yes", show_default=True,
              help="Keep the person's identifiers as keyed hashes so later events carrying them are dropped.")
def erase(who: str, yes: bool, keep_suppression: str) -> None:
    """Erase a person everywhere: store (keys destroyed), view, identity index, dead-letter."""
    from cdp.erasure import erase_customer
    from cdp.server.client import running_server
    from projections.queries import find_customers

    cfg = settings()
    kind, value = what_who_is(cfg, who)
    con = open_view(cfg, scores=False)  # the person's scores go with them: not brought up to date first
    try:
        ids = find_customers(con, kind, value)
    finally:
        con.close()
    if not ids and kind == "customer_id":
        raise UserError(f"no customer found for customer_id {value!r}")
    if not ids:
        erase_identifier(cfg, kind, value, yes, keep_suppression == "yes")
        return
    if len(ids) > 1:
        raise UserError(f"{who!r} names {len(ids)} customers ({', '.join(ids)}): erase them one by one by customer id")
    if not yes and not click.confirm(f"Erase customer {ids[0]} and everything held about them?", err=True):
        raise UserError("not erased")
    server = running_server(cfg)
    if server is not None:  # `cdp serve` holds the view: it erases (as DELETE /v1/profiles/{id} does)
        done = ask(server, "DELETE", f"/v1/profiles/customer_id:{ids[0]}?suppress={keep_suppression == 'yes'}",
                   actor=local_user(), failed="erase failed")
        sources, customer_ids, entries = done["sources"], done["customer_ids"], done["deadletter_entries"]
        seconds, phases, left = done["seconds"], done["phases"], done.get("store_tables_left", [])
    else:
        try:
            erased = erase_customer(cfg, ids[0], suppress=keep_suppression == "yes", actor=local_user())
        except (OSError, duckdb.Error) as error:
            if not cfg.unfinished_erasure_path.exists():
                raise
            raise UserError(f"erase stopped part-way ({first_line(error)}): once that is fixed, the next command "
                            "that opens the view finishes what the store committed (if the person is still found, "
                            "nothing was: erase again)") from None
        sources, customer_ids, entries = len(erased.erasure.sources), erased.erasure.customer_ids, erased.deadletter_entries
        seconds, phases, left = erased.seconds, erased.phases, erased.tables_left
    console.out.print(f"erased customer {ids[0]}: {sources} source record(s), "
                      f"{len(customer_ids)} customer id(s), {entries} dead-letter entr(ies); "
                      f"identifiers {'suppressed' if keep_suppression == 'yes' else 'not suppressed'} "
                      f"({seconds:.2f} s: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) + ")")
    if server is None and erased.tombstones_unsent:
        console.err.print(f"the tombstones were not sent to cdp.profiles ({erased.tombstones_unsent}); "
                          "the next `cdp erase` or `cdp ingest --kafka` sends them")
    if left:
        tables = ", ".join(left)
        console.err.print(f"the store's tables {tables} could not be rewritten (held by another session, not this "
                          f"role's to vacuum, or the database out of reach): their files keep the deleted rows until "
                          f"they are. The next command that opens the view (or a running `cdp serve`) tries again; "
                          f"a table this role may not vacuum needs `VACUUM FULL {tables}` run by its owner")
    if server is not None and done.get("store_rewrite_pending"):
        console.err.print("`cdp serve` rewrites the store's tables the person was deleted from in the background "
                          "(GET /health says store_rewrite_pending until it is done): until then their files may "
                          "still hold the deleted rows")
    if server is not None and done.get("view_rewrite_pending"):
        console.err.print("`cdp serve` rewrites the view's file CDP_VIEW_REWRITE_DELAY after the erasure (default "
                          "60 s) or when it stops: until then its free blocks may still hold the person's bytes")


def erase_identifier(cfg: Settings, kind: str, value: str, yes: bool, suppress: bool) -> None:
    """`cdp erase` of an e-mail, a phone or a source record no customer carries: a person the
    dead-letter alone holds (every input of theirs rejected), or who asks before any unit sent
    them. Their dead-letter entries go and, unless told otherwise, their identifier is suppressed."""
    from urllib.parse import quote

    from cdp.application import CustomerCarries
    from cdp.erasure import erase_identifiers
    from cdp.server.client import running_server

    if kind == "phone" and not value.startswith("+"):  # not read as a number (E.164): no event would carry it
        raise UserError(f"no customer found for phone {value!r}, and it is not a phone number in "
                        f"{cfg.default_phone_region}: give it with its country code (+44 …)")
    what = f"{kind} {value!r}" if kind != "source" else f"source record {value!r}"
    if not yes and not click.confirm(f"No customer carries {what}. Remove the dead-letter entries that carry it"
                                     + (" and suppress it?" if suppress else "?"), err=True):
        raise UserError("not erased")
    server = running_server(cfg)
    if server is not None:  # as DELETE /v1/profiles/{ref} of an identifier no customer carries
        ref = quote(value if kind == "source" else f"{kind}:{value}", safe="@:")
        done = ask(server, "DELETE", f"/v1/profiles/{ref}?suppress={suppress}", actor=local_user(),
                   failed="erase failed")
        entries, seconds, suppressed = done["deadletter_entries"], done["seconds"], done["suppressed"]
    else:
        try:
            erased = erase_identifiers(cfg, [(kind, value)], suppress, actor=local_user())
        except CustomerCarries as error:
            raise UserError(str(error)) from None
        entries, seconds, suppressed = erased.deadletter_entries, erased.seconds, bool(erased.erasure.fingerprints)
    if suppressed:
        state = "identifier suppressed"
    else:
        state = "identifier not suppressed" + ("" if not suppress else " (not a number one person answers: no "
                                               "event is known by it)")
    console.out.print(f"erased {what}: no customer carried it; {entries} dead-letter entr(ies); {state} "
                      f"({seconds:.2f} s)")


def record_access(cfg: Settings, action: str, customer_ids: list[str], **detail: object) -> None:
    """An audit-trail entry per customer read or exported by the local user."""
    from cdp.application import CustomerApplication

    with CustomerApplication(cfg) as app:
        for customer_id in customer_ids:
            app.record_access(local_user(), action, customer_id, **detail)


@cli.command("audit")
@click.option("--customer", "who", help="Only entries about this customer (id, e-mail, phone or unit:source_id).")
@click.option("--since", help="Only entries recorded at or after this date or time (ISO 8601, UTC if no zone).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def audit(who: str | None, since: str | None, fmt: str) -> None:
    """List the audit trail: who read, exported, erased or split which customer, and when."""
    from cdp.application import CustomerApplication
    from cdp.audit import select, since as parse_since
    from cdp.server.client import running_server
    from projections.queries import classify

    cfg = settings()
    try:
        start = parse_since(since) if since else None
    except ValueError:
        raise UserError(f"--since: expected an ISO 8601 date or time, got {since!r}") from None
    ids = None
    if who:  # an erased customer is no longer in the view: their id is taken as given
        kind, value = classify(who) if who.strip() else ("", "")
        ids = {value} if kind == "customer_id" else set(find_who(cfg, open_view(cfg, scores=False), who))
    server = running_server(cfg)
    if server is not None:  # the server's queued reads are appended first
        entries = ask(server, "GET", "/v1/audit?limit=100000", failed="audit failed")["entries"]
    else:
        with CustomerApplication(cfg) as app:
            entries = app.audit_entries()
    entries = select(entries, ids, start)
    if fmt == "json":
        sys.stdout.write(orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    columns = ["entry", "at", "actor", "action", "customer_id", "detail"]
    rows = [tuple(orjson.dumps(e[c]).decode() if c == "detail" else e[c] for c in columns) for e in entries]
    text = console.render_rows(columns, rows, fmt, title="audit trail")
    if text is not None:
        sys.stdout.write(text)


@cli.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def export_view(directory: Path) -> None:
    """Write every table of the view as Parquet into DIRECTORY, with a data dictionary."""
    from projections.export import export_view as export, total_rows

    con = open_view(settings())
    with console.progress_bar("export", total_rows(con)) as advance:
        paths = export(con, directory, progress=advance)
    console.out.print(f"wrote {len(paths)} files to {directory} (data dictionary: {directory / 'data_dictionary.md'})")


@cli.command("report")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def report(directory: Path) -> None:
    """Write an HTML report with charts (segments, lifecycle, overlap, cohorts) into DIRECTORY."""
    from projections.report import write_report

    path = write_report(open_view(settings()), directory)
    console.out.print(f"wrote {path}")


@cli.group()
def projections() -> None:
    """Maintain the DuckDB unified view."""


@projections.command("rebuild")
def projections_rebuild() -> None:
    """Recreate the unified view from the event store (the result equals the incremental view)."""
    from cdp.application import CustomerApplication
    from projections.projector import rebuild

    cfg = settings()
    notes: list[str] = []
    with CustomerApplication(cfg) as app:
        total = app.max_position()
        started = time.perf_counter()
        with console.progress_bar("rebuild", total) as advance:
            applied = rebuild(app, cfg.duckdb_path, progress=advance, as_of=cfg.as_of,
                              memory_limit=cfg.duckdb_memory, survivorship=cfg.survivorship,
                              note=lambda said: notes.append(f"audiences: {said}"))
        seconds = time.perf_counter() - started
    finish_erasures(cfg)  # the store's files, if an erasure stopped part-way (the view is new)
    console.out.print(f"rebuilt {cfg.duckdb_path} from {applied:,} stored events in {seconds:.1f} s")
    for said in notes:
        console.out.print(said)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
def serve(host: str, port: int) -> None:
    """Run the live service: owns the view, follows the store, publishes cdp.profiles, answers HTTP."""
    from cdp.server.service import run

    run(settings(), host, port)


@cli.group()
def keys() -> None:
    """API keys for `cdp serve`: who may publish for which unit, read or administer."""


def _key_store(cfg: Settings):
    from cdp.application import CustomerApplication

    return CustomerApplication(cfg)


@keys.command("create")
@click.option("--unit", default=None, help="The business unit the key acts for (default: the whole group).")
@click.option("--scope", required=True, type=click.Choice(["publish", "read", "admin"]), help="What the key may do.")
def keys_create(unit: str | None, scope: str) -> None:
    """Make a key; it is printed once, alone on the last line (only its digest is stored)."""
    from cdp import keys as api_keys

    store = _key_store(settings())
    try:
        token, key = api_keys.create(store, scope, unit)
        store.record_access(local_user(), "key_create", None, key_id=key.key_id, scope=scope, unit=unit)
    finally:
        store.close()
    console.err.print(f"key {key.key_id} ({scope}, {unit or 'group-wide'}); keep it now, it cannot be shown again")
    sys.stdout.write(token + "\n")


@keys.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def keys_list(fmt: str) -> None:
    """Keys made so far (ids, scopes, units, state), never the keys themselves."""
    from cdp import keys as api_keys

    store = _key_store(settings())
    try:
        ring = api_keys.load(store)
    finally:
        store.close()
    rows = [(k.key_id, k.prefix, k.scope, k.unit or "(group)", k.created[:19], "revoked" if k.revoked else "active")
            for k in ring.all()]
    text = console.render_rows(["key_id", "key", "scope", "unit", "created", "state"], rows, fmt,
                               title="API keys" if fmt == "table" else None)
    if text is not None:
        sys.stdout.write(text)


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (or a unique start of it), at once and for good."""
    from cdp import keys as api_keys

    store = _key_store(settings())
    try:
        key = api_keys.revoke(store, key_id)
        store.record_access(local_user(), "key_revoke", None, key_id=key.key_id, scope=key.scope, unit=key.unit)
    finally:
        store.close()
    console.out.print(f"revoked key {key.key_id} ({key.scope}, {key.unit or 'group-wide'})")


cli.add_command(identity)  # `cdp identity …`
cli.add_command(audiences)  # `cdp audiences …`
cli.add_command(destinations)  # `cdp destinations …`


def error_line(error: Exception) -> str:
    """What went wrong, in one line, naming the file and the way out when one of ours is damaged.

    A fault cdp/faults.py knows (full disk, permission denied, store or broker unreachable …) is
    named first: a full disk also surfaces as an SQLite error, and the remedy differs."""
    from cdp.faults import UNKNOWN, describe

    try:
        cfg = Settings.from_env()
    except ConfigError:
        cfg = None
    if cfg is not None and (fault := describe(error, cfg)).component != UNKNOWN:
        return console.escape_controls(fault.line)
    if isinstance(error, sqlite3.DatabaseError):
        return (f"the event store {store_location()} cannot be read ({first_line(error)}): restore it from a "
                "backup; the view can then be rebuilt with `cdp projections rebuild`")
    if isinstance(error, duckdb.Error):
        if cfg is None:
            return f"the view cannot be used: {first_line(error)}"
        return view_error(cfg, error).format_message()
    if isinstance(error, (ConfigError, ValueError, OSError)):
        return console.escape_controls(" ".join(str(error).split()))
    return f"unexpected {type(error).__name__}: {first_line(error)} (CDP_DEBUG=1 shows the traceback)"


def store_location() -> str:
    try:
        cfg = Settings.from_env()
    except ConfigError:
        return "(CDP_EVENT_STORE)"
    return "in PostgreSQL (CDP_EVENT_STORE)" if cfg.event_store else str(cfg.sqlite_path)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="cdp", standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        console.err.print("cdp: aborted")
        return EXIT_FAILURE
    except click.exceptions.NoArgsIsHelpError as error:
        console.err.print(error.ctx.get_help() if error.ctx else str(error))
        return EXIT_USAGE
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx else "cdp"
        console.err.print(f"{command}: error: {error.format_message()} (see '{command} --help')")
        return EXIT_USAGE
    except click.ClickException as error:
        console.err.print(f"cdp: error: {console.escape_controls(error.format_message())}")
        return EXIT_FAILURE
    except Exception as error:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if os.environ.get("CDP_DEBUG"):
            raise
        console.err.print(f"cdp: error: {error_line(error)}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        console.err.print("cdp: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
