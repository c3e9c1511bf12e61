"""What every `cdp` command shares (cdp/cli.py, cdp/identity_cli.py): the settings, read once
from the environment here and passed down; the read-only view; the one-line user error; the local
user named in the audit trail."""
from __future__ import annotations

import click
import duckdb

from cdp.config import Settings


class UserError(click.ClickException):
    """A failure the user can fix; printed as one line."""


def settings() -> Settings:
    return Settings.from_env()


def open_view(cfg: Settings) -> duckdb.DuckDBPyConnection:
    """The view, read-only, with its scores brought up to CDP_AS_OF first if they are not."""
    from projections.projector import connect, refresh_view

    if not cfg.duckdb_path.exists():
        raise UserError(f"no unified view at {cfg.duckdb_path}: run `cdp ingest` or `cdp demo` first")
    try:
        refresh_view(cfg.duckdb_path, cfg.as_of)
        return connect(cfg.duckdb_path, read_only=True)
    except duckdb.IOException as error:
        raise UserError(f"cannot open the view {cfg.duckdb_path}: {str(error).splitlines()[0]}") from None


def local_user() -> str:
    """Who runs a command locally, for the audit trail."""
    import getpass

    try:
        return "local:" + getpass.getuser()
    except (KeyError, OSError):
        return "local"
