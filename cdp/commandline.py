"""What every `cdp` command shares (cdp/cli.py, cdp/identity_cli.py): the settings, read once
from the environment here and passed down; the read-only view; the one-line user error; the local
user named in the audit trail."""
from __future__ import annotations

from typing import Any

import click
import duckdb

from cdp import console
from cdp.config import Settings


class UserError(click.ClickException):
    """A failure the user can fix; printed as one line."""


def settings() -> Settings:
    return Settings.from_env()


def refresh_view(cfg: Settings) -> None:
    """Brings the view's scores up to CDP_AS_OF if they are not (after what an erasure stopped
    part-way left); a missing or damaged view is one line."""
    from projections.projector import refresh_view as refresh

    require_view(cfg)
    finish_erasures(cfg)
    try:
        refresh(cfg.duckdb_path, cfg.as_of)
    except duckdb.Error as error:
        raise view_error(cfg, error) from None


def require_view(cfg: Settings) -> None:
    if not cfg.duckdb_path.exists():
        raise UserError(f"no unified view at {cfg.duckdb_path}: run `cdp ingest` or `cdp demo` first")


def view_error(cfg: Settings, error: Exception) -> UserError:
    """A view DuckDB cannot use: which file, and the way out."""
    return UserError(f"cannot use the view {cfg.duckdb_path} ({first_line(error)}): if it is damaged, "
                     "`cdp projections rebuild` recreates it from the event store")


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return console.escape_controls(lines[0] if lines else type(error).__name__)


def open_view(cfg: Settings, scores: bool = True) -> duckdb.DuckDBPyConnection:
    """The view, read-only, with its scores brought up to CDP_AS_OF first if they are not (unless
    `scores` is False: a command that only finds a customer, such as an erasure, does not wait for
    them); when `cdp serve` owns it, a stand-in that sends every query to the server."""
    from cdp.server.client import RemoteView, running_server
    from projections.projector import connect

    server = running_server(cfg)
    if server is not None:
        return RemoteView(*server)
    if scores:
        refresh_view(cfg)
    else:
        require_view(cfg)
        finish_erasures(cfg)
    try:
        return connect(cfg.duckdb_path, read_only=True)
    except duckdb.Error as error:
        raise view_error(cfg, error) from None


def finish_erasures(cfg: Settings) -> None:
    """Finishes what an erasure stopped part-way left (cdp.erasure.finish_unfinished) before a
    command reads the view, and removes the dead-letter entries past their retention: three file
    checks and a look at the dead-letter's first entry when there is nothing to do."""
    from ingest.deadletter import expire_entries
    from projections.erasure import pending_marker

    expire_entries(cfg.deadletter_path, cfg.deadletter_retention)

    if cfg.unfinished_erasure_path.exists() or pending_marker(cfg.duckdb_path).exists() \
            or cfg.unscrubbed_tables_path.exists():
        from cdp.erasure import finish_unfinished

        try:
            finish_unfinished(cfg)
        except (OSError, duckdb.Error) as error:
            raise UserError(f"cannot finish an erasure stopped part-way ({first_line(error)}): "
                            "the next command tries again") from None


def ask(server: tuple[str, str], method: str, path: str, body: Any = None, actor: str | None = None,
        failed: str = "") -> Any:
    """`cdp.server.client.call` for a CLI command beside a running server: the server's refusal, or
    its silence, becomes the command's one-line `cdp: error: …` (after `failed`, e.g. "erase
    failed") instead of a traceback."""
    from cdp.server.client import ServerError, call

    prefix = f"{failed}: " if failed else ""
    try:
        return call(server, method, path, body, actor)
    except ServerError as error:
        raise UserError(prefix + " ".join(str(error).split())) from None
    except OSError as error:  # gone between the health check and this request, or timed out
        raise UserError(f"{prefix}the server at {server[0]} did not answer: {error}") from None


def local_user() -> str:
    """Who runs a command locally, for the audit trail."""
    import getpass

    try:
        return "local:" + getpass.getuser()
    except (KeyError, OSError):
        return "local"
