"""What went wrong, in one line an operator can act on: the component, where, and the remedy.

The worker asks `describe(error)` about every failure. A *transient* fault (PostgreSQL or the
broker unreachable) is waited out; any other one stops the process with its line, because waiting
cannot cure a full disk, a folder it may not write or a store written by another schema.
"""
from __future__ import annotations

import errno
import getpass
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cdp.config import Settings

POSTGRES, BROKER, DISK, STORE, VIEW, UNKNOWN = "PostgreSQL", "Kafka broker", "disk", "event store", "view", "unknown"


@dataclass(frozen=True)
class Fault:
    component: str
    line: str        # one line: what, where, what to do
    transient: bool  # waiting for the component can cure it


class StoreMismatch(Exception):
    """The store refuses to be used as it is (identity or schema); the message says what to do."""


def postgres_address(settings: Settings) -> str:
    """host:port/database of the PostgreSQL store, never the password."""
    url = urlparse(settings.event_store or "")
    return f"{url.hostname or '127.0.0.1'}:{url.port or 5432}{url.path or ''}"


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


_PATH = re.compile(r"""["']?(/[^"':]+)["']?""")


def _path_in(error: BaseException, default: Path) -> str:
    """The file an OS or database error names, else `default`."""
    if isinstance(error, OSError) and error.filename:
        return str(error.filename)
    match = _PATH.search(str(error))
    return match.group(1).strip() if match else str(default)


def _is_postgres_connection(error: BaseException) -> bool:
    try:
        import psycopg
        from eventsourcing.persistence import InterfaceError, OperationalError
    except ImportError:  # pragma: no cover - psycopg is an optional dependency
        return False
    return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError, OperationalError, InterfaceError))


_BROKER_ERRORS = {
    "aiokafka.errors": ("KafkaConnectionError", "KafkaTimeoutError", "NodeNotReadyError", "RequestTimedOutError",
                        "CoordinatorNotAvailableError", "NotCoordinatorError", "UnknownTopicOrPartitionError"),
    "kafka.errors": ("NoBrokersAvailable", "KafkaTimeoutError", "KafkaConnectionError", "NodeNotReadyError",
                     "RequestTimedOutError", "CoordinatorNotAvailableError"),
}


def _is_broker(error: BaseException) -> bool:
    import importlib

    for module, names in _BROKER_ERRORS.items():
        errors = importlib.import_module(module)
        found = tuple(filter(None, (getattr(errors, n, None) for n in names)))
        if isinstance(error, found):
            return True
        # what the client itself would retry (coordinator moving or loading, leader elections …)
        if isinstance(error, errors.KafkaError) and getattr(error, "retriable", False):
            return True
    return False


def _is_schema(error: BaseException) -> bool:
    text = str(error)
    try:
        import psycopg.errors

        if isinstance(error, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(error, sqlite3.OperationalError) and ("no such table" in text or "no such column" in text) \
        or ("UndefinedColumn" in type(error).__name__ or "UndefinedTable" in type(error).__name__)


def describe(error: BaseException, settings: Settings) -> Fault:
    """The one line for `error` (or the first cause in its chain that is known)."""
    chain = _chain(error)
    home = settings.home
    for e in chain:
        text = str(e)
        code = getattr(e, "errno", None)
        if isinstance(e, StoreMismatch):
            return Fault(STORE, str(e), False)
        if code == errno.ENOSPC or "No space left on device" in text or "database or disk is full" in text:
            path = _path_in(e, home)
            return Fault(DISK, f"disk full: no space left on the disk holding {path}: free space there "
                               "or point CDP_HOME at a larger disk", False)
        if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text \
                or "Read-only file system" in text or "readonly database" in text:
            path = _path_in(e, home)
            return Fault(DISK, f"permission denied: {path}: make it writable for user {_user()} "
                               "or set CDP_HOME to a folder that user may write", False)
        if _is_schema(e):
            where = postgres_address(settings) if settings.event_store else str(settings.sqlite_path)
            return Fault(STORE, f"store schema too old at {where} ({_first_line(e)}): run one `cdp ingest` "
                                "or `cdp worker` of this version alone to bring it up to date, or point "
                                "CDP_EVENT_STORE at a new database", False)
        if "Could not set lock on file" in text:
            return Fault(VIEW, f"the view {settings.duckdb_path} is open in another process: "
                               "give each worker its own CDP_HOME", False)
    for e in chain:
        if _is_postgres_connection(e):
            text = _first_line(e)
            if "password authentication failed" in text or "does not exist" in text:
                return Fault(POSTGRES, f"PostgreSQL at {postgres_address(settings)} refuses the connection "
                                       f"({text}): fix CDP_EVENT_STORE", False)
            return Fault(POSTGRES, f"PostgreSQL unreachable at {postgres_address(settings)} ({text}): "
                                   "start it or fix CDP_EVENT_STORE", True)
        if _is_broker(e):
            return Fault(BROKER, f"Kafka broker unreachable at {settings.kafka_bootstrap} "
                                 f"({type(e).__name__}): start it or fix CDP_KAFKA_BOOTSTRAP", True)
    return Fault(UNKNOWN, f"unexpected failure: {error!r} (CDP_DEBUG=1 shows the traceback)", False)


def _user() -> str:
    try:
        return f"{getpass.getuser()} (uid {os.getuid()})"
    except Exception:  # no passwd entry for the uid (containers)
        return f"uid {os.getuid()}"
