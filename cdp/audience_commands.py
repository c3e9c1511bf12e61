"""Defining and deleting audiences and destinations: the checks and the application's command,
shared by the CLI (`cdp audiences|destinations …`, when it owns the view) and `cdp serve`'s
admin endpoints (when the server owns it), so both refuse and store exactly the same things.

`names(con, table)` reads what the view holds; the caller makes the view take the command in
afterwards (the CLI catches its projector up, the server waits for its read side).
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import duckdb

from cdp.config import Settings
from projections import audiences as model


class DefinitionError(ValueError):
    """The definition is refused; the message is one line for the person who asked."""


def names(con: Any, table: str) -> set[str]:
    """Names of the audiences or destinations (`table`) defined and not deleted in the view."""
    return {row[0] for row in con.execute(f"SELECT name FROM {table} WHERE NOT deleted").fetchall()}


def audience_size(con: Any, name: str) -> int:
    return con.execute("SELECT count(*) FROM audience_members WHERE audience = ? AND until IS NULL",
                       [name]).fetchall()[0][0]


def checked_name(kind: str, name: str) -> str:
    if not model.NAME_PATTERN.match(name or ""):
        raise DefinitionError(f"{kind} name {name!r}: use letters, digits, '_', '.', '-' (at most 64, no ':')")
    return name


def checked_predicate(where: str, consent: str | None) -> str:
    """The predicate as it will be stored (DuckDB's rendering), or DefinitionError."""
    if consent is not None and not model.PURPOSE_PATTERN.match(consent):
        raise DefinitionError(f"consent purpose {consent!r}: use letters, digits, '_', '.', '-'")
    try:
        return model.check_predicate(where)
    except model.PredicateError as error:
        raise DefinitionError(str(error)) from None


def checked_audience(con: Any, name: str, where: str, consent: str | None) -> str:
    """The predicate to store (`app.define_audience(name, predicate, consent)`) when the audience
    may be defined in the view behind `con`; DefinitionError otherwise."""
    predicate = checked_predicate(where, consent)
    if checked_name("audience", name) in names(con, "audiences"):
        raise DefinitionError(f"audience {name!r} exists: delete it first to define it again")
    return predicate


def checked_destination(cfg: Settings, con: Any, name: str, webhook: str, audiences: list[str],
                        secret: str | None, fields: list[str]) -> tuple[str, list[str], list[str], str | None]:
    """(url, audiences, fields, sealed secret) of a destination that may be defined
    (`app.define_destination(name, *checked)`), or DefinitionError."""
    from cdp.secrets import seal

    checked_name("destination", name)
    parts = urlsplit(webhook or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DefinitionError(f"--webhook {webhook!r}: expected an http:// or https:// URL")
    try:
        chosen = model.check_fields(list(fields))
    except ValueError as error:
        raise DefinitionError(str(error)) from None
    if secret is not None and not secret:
        raise DefinitionError("--secret is empty")
    unknown = [a for a in audiences if a not in names(con, "audiences")]
    if not audiences or unknown:
        raise DefinitionError(f"--audiences: no audience {unknown[0] if unknown else ''!r} (see `cdp audiences list`)")
    if name in names(con, "destinations"):
        raise DefinitionError(f"destination {name!r} exists: delete it first to define it again")
    return webhook, list(audiences), chosen, seal(cfg, secret) if secret else None


def check_deletable(con: Any, kind: str, name: str) -> None:
    if name not in names(con, f"{kind}s"):
        raise DefinitionError(f"no {kind} {name!r} (see `cdp {kind}s list`)")


def view_busy(cfg: Settings, error: duckdb.Error) -> str:
    return (f"cannot open the view {cfg.duckdb_path} for writing (is `cdp serve` running? it takes "
            f"changes in itself): {str(error).splitlines()[0]}")
