"""Delivery of audience changes (projections/audiences.py, `audience_changes`) to destinations.

Whoever owns the view delivers (`cdp audiences sync` in the embedded default, `cdp serve`): each
destination has a cursor in `destination_state`; the changes after it, in `change_id` order, are
sent, and the cursor moves past them only once every one of them was answered 2xx or went to the
destination's dead-letter (`destination_deadletter`, replayed by `cdp destinations retry`). A crash
in between sends them again: delivery is at least once, and every send of one change carries the
same `Idempotency-Key`, so a receiver that remembers keys keeps each change exactly once.

A webhook receives `POST` with a JSON body:

    {"audience": …, "action": "entered" | "exited", "customer_id": …, "time": RFC 3339,
     "change_id": …, "profile": {field: value, …}}          # profile on "entered" only

An exited change carries ids only, never personal data, so the exit of an erased person can be
delivered after their data is gone. With a secret, `X-CDP-Signature: sha256=<hex>` is the
HMAC-SHA256 of the exact body bytes under the secret. A 2xx answer is success; 408, 425, 429, 5xx
and network errors are retried with exponential backoff (CDP_DELIVERY_BACKOFF, doubled each time,
never above CDP_DELIVERY_MAX_WAIT), waiting as long as a `Retry-After` asks when it asks; other
4xx answers, or CDP_DELIVERY_ATTEMPTS tries, send the change to the dead-letter.

With CDP_KAFKA_BOOTSTRAP set, every change is also published to `cdp.audiences` (compacted, key
`audience:customer_id`, the same JSON while a member, a tombstone on exit), behind a cursor of its own.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Callable, ContextManager, Iterable, Sequence

import duckdb
import orjson
import pyarrow as pa

from cdp.config import Settings
from cdp.contracts.profile import PROFILE_COLUMNS
from projections.transactions import transaction

WINDOW = 5000                  # changes sent before the cursor moves
KAFKA_CURSOR = "kafka:cdp.audiences"
SIGNATURE_HEADER = "X-CDP-Signature"
RETRIABLE = {408, 425, 429}
_HEADERS = {"Content-Type": "application/json", "User-Agent": "cdp-delivery"}
_KEYS = uuid.UUID("0b6a1f9e-5d1c-4f37-8f55-2a9b1c0d7e42")


@dataclass(frozen=True)
class Destination:
    name: str
    webhook: str
    audiences: list[str]
    fields: list[str]
    sealed_secret: str | None


@dataclass(frozen=True)
class Change:
    change_id: int
    audience: str
    customer_id: str
    action: str
    time: str              # RFC 3339, UTC
    profile: dict[str, Any] | None

    def body(self) -> bytes:
        message: dict[str, Any] = {"audience": self.audience, "action": self.action,
                                   "customer_id": self.customer_id, "time": self.time,
                                   "change_id": self.change_id}
        if self.action == "entered":
            message["profile"] = self.profile or {}
        return orjson.dumps(message, default=str)


@dataclass
class Outcome:
    change: Change
    attempts: int = 0
    error: str | None = None   # None: delivered


@dataclass
class Report:
    delivered: int = 0
    dead_lettered: int = 0
    published: int = 0
    per_destination: dict[str, tuple[int, int]] = field(default_factory=dict)


def idempotency_key(destination: str, change: Change) -> str:
    """The same for every send of one change to one destination: the UUID version 5 of the
    destination and the change (uuid.uuid5's arithmetic, without building a UUID object per change)."""
    name = f"{destination}\n{change.change_id}\n{change.audience}\n{change.customer_id}\n{change.action}"
    digest = bytearray(hashlib.sha1(_KEYS.bytes + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def signature(secret: str, body: bytes) -> str:
    """The X-CDP-Signature value: receivers compute the same and compare in constant time."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _rfc3339(expression: str) -> str:
    """A TIMESTAMPTZ as the text Python's isoformat gives for UTC, made by DuckDB: converting each
    value to a time-zone-aware datetime and back costs more than sending the change."""
    utc = f"({expression} AT TIME ZONE 'UTC')"
    return (f"(CASE WHEN microsecond({utc}) = 0 THEN strftime({utc}, '%Y-%m-%dT%H:%M:%S') "
            f"ELSE strftime({utc}, '%Y-%m-%dT%H:%M:%S.%f') END || '+00:00')")


def _changes(con: duckdb.DuckDBPyConnection, fields: Sequence[str], where: str, params: list) -> list[Change]:
    """Changes (with the current profile fields of entered ones) matching `where` over c."""
    zoned = {row[0] for row in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'customers' "
                                           "AND data_type = 'TIMESTAMP WITH TIME ZONE'").fetchall()}
    columns = ", ".join(_rfc3339(f"p.{_quoted(f)}") if f in zoned else f"p.{_quoted(f)}" for f in fields)
    rows = con.execute(
        f"SELECT c.change_id, c.audience, c.customer_id, c.action, {_rfc3339('c.changed_at')}, "
        f"p.customer_id IS NOT NULL{', ' + columns if columns else ''} FROM audience_changes c "
        f"LEFT JOIN customers p ON p.customer_id = c.customer_id AND c.action = 'entered' "
        f"WHERE {where} ORDER BY c.change_id", params).fetchall()
    return [Change(r[0], r[1], r[2], r[3], r[4], dict(zip(fields, r[6:])) if r[5] else None) for r in rows]


def destinations(con: duckdb.DuckDBPyConnection) -> list[Destination]:
    return [Destination(*row) for row in con.execute(
        "SELECT name, webhook, audiences, fields, sealed_secret FROM destinations WHERE NOT deleted ORDER BY name"
    ).fetchall()]


def _cursor(con: duckdb.DuckDBPyConnection, name: str) -> int:
    rows = con.execute("SELECT delivered_through FROM destination_state WHERE destination = ?", [name]).fetchall()
    return rows[0][0] if rows else 0


def _advance(con: duckdb.DuckDBPyConnection, name: str, through: int, failed: Iterable[Outcome]) -> None:
    """Moves the cursor and dead-letters the failures, together."""
    with transaction(con):
        con.execute("DELETE FROM destination_state WHERE destination = ?", [name])
        con.execute("INSERT INTO destination_state VALUES (?, ?)", [name, through])
        rows = [(name, o.change.change_id, o.attempts, o.error) for o in failed]
        if rows:
            con.executemany("INSERT INTO destination_deadletter VALUES (?, ?, ?, ?, now())", rows)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class Webhook:
    """Sends changes to one destination's URL: one keep-alive session for its whole run (`async
    with`), at most CDP_DELIVERY_CONCURRENCY requests in flight."""

    def __init__(self, destination: Destination, secret: str | None, settings: Settings):
        self.destination, self.secret, self.settings = destination, secret, settings
        self._session: Any = None

    async def __aenter__(self) -> "Webhook":
        import aiohttp

        limit = self.settings.delivery_concurrency
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=30),
                                              timeout=aiohttp.ClientTimeout(total=self.settings.delivery_timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def send(self, changes: Sequence[Change]) -> list[Outcome]:
        """Outcomes in the order of `changes`: CDP_DELIVERY_CONCURRENCY workers take the next
        change as they finish one (no task or semaphore wait per change)."""
        outcomes: list[Outcome] = [None] * len(changes)  # type: ignore[list-item]
        work = iter(enumerate(changes))

        async def worker() -> None:
            for index, change in work:  # one iterator shared by the workers: each change once
                outcomes[index] = await self._deliver(self._session, change)

        await asyncio.gather(*(worker() for _ in range(min(self.settings.delivery_concurrency, len(changes)))))
        return outcomes

    async def _deliver(self, session: Any, change: Change) -> Outcome:
        import aiohttp

        body = change.body()
        headers = {**_HEADERS, "Idempotency-Key": idempotency_key(self.destination.name, change)}
        if self.secret:
            headers[SIGNATURE_HEADER] = signature(self.secret, body)
        outcome = Outcome(change)
        cfg = self.settings
        while True:
            outcome.attempts += 1
            wait = None
            try:
                async with session.post(self.destination.webhook, data=body, headers=headers) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        outcome.error = None
                        return outcome
                    outcome.error = f"HTTP {response.status}"
                    if response.status < 500 and response.status not in RETRIABLE:
                        return outcome  # the receiver refuses this change: retrying will not help
                    wait = _retry_after(response.headers.get("Retry-After"))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                outcome.error = f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]
            if outcome.attempts >= cfg.delivery_attempts:
                return outcome
            if wait is None:  # exponential backoff with a little jitter, so retries do not march together
                wait = cfg.delivery_backoff * 2 ** (outcome.attempts - 1) * (1 + random.random() / 10)
            await asyncio.sleep(min(wait, cfg.delivery_max_wait))


def _secret(settings: Settings, destination: Destination) -> str | None:
    from cdp.secrets import unseal

    return unseal(settings, destination.sealed_secret) if destination.sealed_secret else None


def _fields(destination: Destination) -> list[str]:
    return list(destination.fields) or list(PROFILE_COLUMNS)


def deliver_destination(con: duckdb.DuckDBPyConnection, settings: Settings, destination: Destination) -> tuple[int, int]:
    """Sends everything pending for one destination; returns (delivered, dead-lettered)."""
    return asyncio.run(_deliver_destination(con, settings, destination))


async def _deliver_destination(con: duckdb.DuckDBPyConnection, settings: Settings,
                               destination: Destination) -> tuple[int, int]:
    """Window after window: the next window is read (on a connection of its own, in a thread)
    while this one is sent; the cursor moves once a window is answered."""
    delivered = failed = 0
    reader = con.cursor()

    def window(after: int, through: int) -> list[Change]:
        return _changes(reader, _fields(destination), "c.change_id > ? AND c.change_id <= ? "
                        "AND list_contains(?, c.audience)", [after, through, destination.audiences])

    try:
        async with Webhook(destination, _secret(settings, destination), settings) as webhook:
            while True:
                cursor = _cursor(con, destination.name)
                last = con.execute("SELECT coalesce(max(change_id), 0) FROM audience_changes").fetchall()[0][0]
                if last <= cursor:
                    return delivered, failed
                through = min(last, cursor + WINDOW)
                reading = asyncio.ensure_future(asyncio.to_thread(window, cursor, through))
                while cursor < last:
                    changes = await reading
                    if through < last:
                        reading = asyncio.ensure_future(asyncio.to_thread(window, through, min(last, through + WINDOW)))
                    outcomes = await webhook.send(changes) if changes else []
                    bad = [o for o in outcomes if o.error is not None]
                    _advance(con, destination.name, through, bad)
                    delivered += len(outcomes) - len(bad)
                    failed += len(bad)
                    cursor, through = through, min(last, through + WINDOW)
    finally:
        reader.close()


def publish_pending(con: duckdb.DuckDBPyConnection, settings: Settings) -> int:
    """Publishes every change after the Kafka cursor to cdp.audiences; returns how many."""
    from kafka import KafkaProducer

    from cdp import topics

    last = con.execute("SELECT coalesce(max(change_id), 0) FROM audience_changes").fetchone()[0]
    if last <= _cursor(con, KAFKA_CURSOR):
        return 0
    topics.ensure(settings)
    producer = KafkaProducer(bootstrap_servers=settings.require_kafka(), acks="all", linger_ms=5,
                             client_id="cdp-audiences")
    topic = settings.topic(topics.AUDIENCES)
    published = 0
    try:
        while True:
            cursor = _cursor(con, KAFKA_CURSOR)
            changes = _changes(con, list(PROFILE_COLUMNS), "c.change_id > ? AND c.change_id <= ?",
                               [cursor, cursor + WINDOW])  # change ids have no gaps
            if not changes:
                return published
            futures = [producer.send(topic, key=f"{c.audience}:{c.customer_id}".encode(),
                                     value=c.body() if c.action == "entered" else None) for c in changes]
            producer.flush()
            for future in futures:
                future.get(timeout=30)  # raises if the broker did not take it: the cursor stays
            _advance(con, KAFKA_CURSOR, changes[-1].change_id, [])
            published += len(changes)
    finally:
        producer.close()


def deliver_pending(con: duckdb.DuckDBPyConnection, settings: Settings) -> Report:
    """Everything pending, to every destination (and to cdp.audiences when Kafka is configured)."""
    report = Report()
    for destination in destinations(con):
        delivered, failed = deliver_destination(con, settings, destination)
        report.per_destination[destination.name] = (delivered, failed)
        report.delivered += delivered
        report.dead_lettered += failed
    if settings.kafka_bootstrap:
        report.published = publish_pending(con, settings)
    return report


async def _send_once(webhook: Webhook, changes: Sequence[Change]) -> list[Outcome]:
    async with webhook:
        return await webhook.send(changes)


def retry_dead_letters(con: duckdb.DuckDBPyConnection, settings: Settings, name: str | None = None) -> tuple[int, int]:
    """Sends the dead-lettered changes again (same idempotency keys); the delivered ones leave the
    dead-letter, the others stay with their attempts counted. Returns (delivered, still failing)."""
    delivered = failing = 0
    for destination in destinations(con):
        if name is not None and destination.name != name:
            continue
        changes = _changes(con, _fields(destination), "c.change_id IN (SELECT change_id FROM destination_deadletter "
                           "WHERE destination = ?)", [destination.name])
        if not changes:
            continue
        outcomes = asyncio.run(_send_once(Webhook(destination, _secret(settings, destination), settings), changes))
        con.register("retried", pa.table({
            "change_id": [o.change.change_id for o in outcomes], "attempts": [o.attempts for o in outcomes],
            "error": [o.error for o in outcomes]}))
        try:
            with transaction(con):
                con.execute("UPDATE destination_deadletter SET attempts = destination_deadletter.attempts + r.attempts, "
                            "error = r.error, failed_at = now() FROM retried r WHERE destination = ? "
                            "AND destination_deadletter.change_id = r.change_id AND r.error IS NOT NULL",
                            [destination.name])
                con.execute("DELETE FROM destination_deadletter WHERE destination = ? AND change_id IN "
                            "(SELECT change_id FROM retried WHERE error IS NULL)", [destination.name])
        finally:
            con.unregister("retried")
        delivered += sum(o.error is None for o in outcomes)
        failing += sum(o.error is not None for o in outcomes)
    return delivered, failing


class DeliveryLoop:
    """Delivers continuously beside the view's owner (`cdp serve`): a thread of its own, on its own
    cursor of the view's connection, woken after each projected batch (`wake()`) and every
    `interval` seconds (retries waiting on a slow receiver never hold up the projection)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, settings: Settings, interval: float = 5.0,
                 hold: Callable[[], ContextManager[bool]] | None = None):
        """`hold`: entered around each round, which runs only if it gives True (the server pauses
        the view's writers while it copies the view's file: viewgate.WriterPause)."""
        import threading

        self.settings, self.interval = settings, interval
        self._hold = hold or (lambda: nullcontext(True))
        self.con = con.cursor()
        self.error: BaseException | None = None
        self.last = Report()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._rounds = threading.Condition()
        self._started = self._finished = 0
        self._thread = threading.Thread(target=self._run, name="cdp-delivery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.con.close()

    def deliver_now(self, timeout: float) -> Report:
        """Waits for a round that starts after this call (so it sees every change committed
        before it) and returns its report; its error, if it failed; TimeoutError past `timeout`."""
        with self._rounds:
            wanted = self._started + 1
            self._wake.set()
            if not self._rounds.wait_for(lambda: self._finished >= wanted or self._stop.is_set(), timeout):
                raise TimeoutError(f"no delivery round finished within {timeout:g} s")
            if self.error is not None:
                raise self.error
            return self.last

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._rounds:
                self._started += 1
                this = self._started
            try:
                with self._hold() as allowed:
                    if not allowed:
                        return
                    self.last = deliver_pending(self.con, self.settings)
                self.error = None
            except Exception as error:  # a broker or key away: reported (e.g. on /health), tried again
                self.error = error
            with self._rounds:
                self._finished = this
                self._rounds.notify_all()
            self._wake.wait(self.interval)
            self._wake.clear()
