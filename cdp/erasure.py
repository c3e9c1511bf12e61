"""Erasing a person everywhere the platform keeps them, in one call (CLI and HTTP).

The store's part is the application's `erase` command (data keys destroyed, identity rows deleted,
identifiers kept as keyed hashes for suppression, `Erased` recorded). Then the copies outside the
store: the view follows the store (the person's rows deleted) and is rewritten into a fresh file,
the dead-letter loses the entries that carry the person's identifiers, and SQLite's write-ahead log
is checkpointed and truncated (the store deletes with `secure_delete`, so freed pages hold zeros), or
PostgreSQL's tables that held the person are written into new files (CustomerApplication.scrub).

A stop part-way (a crash, a full disk, a view someone held) does not leave the person behind: the
erasure is marked unfinished before the store commits and the view's file is marked for its rewrite
before the view commits, and the next command that holds the view finishes both
(finish_unfinished). The dead-letter goes first, while the identifiers that find the person's
entries can still be read. The tombstones for `cdp.profiles` wait in a file of their own until a
broker takes them (send_tombstones).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from cdp.application import CustomerApplication, Erasure
from cdp.config import Settings
from cdp.faults import BROKER, describe
from cdp.store import SCRUB_RETRY_PATIENCE_MS
from identity.features import STREET_TYPES
from ingest.deadletter import matching_entries, remove_entries
from ingest.durable import locked
from ingest.normalise import fold
from projections import erasure as view_erasure

MIN_PHONE_DIGITS = 7
PHONE_LIKE = re.compile(rb"[+\d][\d ()./-]{5,}\d")
STREET_TYPE_WORDS = frozenset(STREET_TYPES.values())


@dataclass
class Erased:
    erasure: Erasure
    deadletter_entries: int
    seconds: float
    phases: dict[str, float]  # seconds per part: store, view, view_rewrite, deadletter, store_files
    tables_left: list[str]  # store tables whose files may still hold the deleted rows (CustomerApplication.scrub)
    tombstones_unsent: str | None = None  # why cdp.profiles did not get the tombstones yet (send_tombstones)


def erase_customer(settings: Settings, customer_id: str, suppress: bool = True, actor: str = "local") -> Erased:
    """Erases the customer (and every customer merged into it) from store, view and dead-letter.
    Until it is done, `Settings.unfinished_erasure_path` says so, and the next command finishes the work
    (finish_unfinished): the dead-letter is scrubbed before the store's commit too, since after it
    the identifiers that find the person's entries are gone. It holds the erasure lock throughout:
    a command that finds the marker meanwhile waits for it rather than finishing the work twice."""
    with locked(settings.erasure_lock_path):
        return _erase(settings, customer_id, suppress, actor)


def _erase(settings: Settings, customer_id: str, suppress: bool, actor: str) -> Erased:
    started = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - started - sum(phases.values())

    app = CustomerApplication(settings)
    try:
        before = app.erasure_of(customer_id, suppress)
        view_erasure.mark(settings.unfinished_erasure_path)
        note_tombstones(settings, before.customer_ids)
        removed = scrub_deadletter(settings.deadletter_path, before, surname_shared(app, before.sources))
        lap("deadletter")
        erasure = app.erase(customer_id, suppress, actor)
        note_tombstones(settings, erasure.customer_ids)  # read again under the writers' lock
        lap("store")
        phases.update(finish_view(settings, app))
        # entries written between the first scrub and the commit, while the person was not yet suppressed
        removed += scrub_deadletter(settings.deadletter_path, erasure, surname_shared(app))
        lap("deadletter")
        left = app.scrub()
        note_tables_left(settings, app, left)
        lap("store_files")
    finally:
        app.close()
    settings.unfinished_erasure_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return Erased(erasure, removed, seconds, phases, left, try_send_tombstones(settings))


def erase_identifiers(settings: Settings, identifiers: Sequence[tuple[str, str]], suppress: bool = True,
                      actor: str = "local") -> Erased:
    """Erases a person no customer stands for (CustomerApplication.erase_identifiers): the
    dead-letter entries that carry their identifiers go, before the store's commit and again
    after it (an entry written in between, before they were suppressed), and their identifiers
    are suppressed. The store and the view hold nothing of theirs, so neither is rewritten."""
    started = time.perf_counter()
    with locked(settings.erasure_lock_path), CustomerApplication(settings) as app:
        removed = scrub_deadletter(settings.deadletter_path, app.identifier_erasure(identifiers, suppress))
        erasure = app.erase_identifiers(identifiers, suppress, actor)
        removed += scrub_deadletter(settings.deadletter_path, erasure)
    seconds = time.perf_counter() - started
    return Erased(erasure, removed, seconds, {"deadletter_and_store": seconds}, [])


def finish_view(settings: Settings, app: CustomerApplication) -> dict[str, float]:
    """The view follows the store (an Erased event deletes the person's rows and marks the file,
    projections.erasure.delete_erased), then its file is rewritten if marked; seconds of each."""
    from cdp.viewwriter import make_projector

    started = time.perf_counter()
    if not settings.duckdb_path.exists():
        return {}
    projector = make_projector(settings)
    try:
        projector.catch_up(app, settings.projection_batch, score=False)
    finally:
        projector.close()
    caught = time.perf_counter()
    rewrite_view_if_pending(settings)
    return {"view": caught - started, "view_rewrite": time.perf_counter() - caught}


def note_tombstones(settings: Settings, customer_ids: list[str]) -> None:
    """Adds the ids to those whose tombstones are still to send (before the store commits)."""
    if settings.kafka_bootstrap:
        view_erasure.mark(settings.unsent_tombstones_path, json.dumps(sorted({*unsent_tombstones(settings), *customer_ids})).encode())


def unsent_tombstones(settings: Settings) -> list[str]:
    """The erased customer ids whose tombstones cdp.profiles has not had yet."""
    try:
        return list(json.loads(settings.unsent_tombstones_path.read_bytes()))
    except (FileNotFoundError, ValueError):
        return []


def send_tombstones(settings: Settings) -> None:
    """Sends the tombstones noted and not sent yet (with Kafka): the erasure's own, and those a
    broker out of reach missed before. Read commands do not send them: they would wait for a broker."""
    ids = unsent_tombstones(settings)
    if ids and settings.kafka_bootstrap:
        publish_tombstones(settings, ids)
        settings.unsent_tombstones_path.unlink(missing_ok=True)


def try_send_tombstones(settings: Settings) -> str | None:
    """send_tombstones, a broker out of reach being no failure: None once sent (or none waiting),
    else why not (the ids wait for the next erasure or `cdp ingest --kafka`)."""
    try:
        send_tombstones(settings)
    except Exception as error:  # noqa: BLE001 - a broker out of reach: said by the caller, sent later
        fault = describe(error, settings)
        if fault.component != BROKER:
            raise
        return fault.line
    return None


def finish_unfinished(settings: Settings) -> bool:
    """What an erasure stopped part-way left (unfinished): the view caught up with the store and
    rewritten, the store's files scrubbed; then any rewrite a view's writer left pending, and the
    store's tables an erasure could not rewrite, tried again briefly (retry_left_tables). For a
    command about to hold the view (cdp serve, or the CLI with no server). True if work was left.
    Its tombstones wait for the next erasure (send_tombstones)."""
    hint, tables = settings.unfinished_erasure_path, settings.unscrubbed_tables_path
    if hint.exists() or tables.exists():
        with locked(settings.erasure_lock_path):  # an erasure under way ends first: then it was not stopped
            if hint.exists():
                with CustomerApplication(settings) as app:
                    finish_view(settings, app)
                    note_tables_left(settings, app, app.scrub())
                hint.unlink(missing_ok=True)
                return True
            if tables.exists():
                with CustomerApplication(settings) as app:
                    retry_left_tables(settings, app)
    return rewrite_view_if_pending(settings)


def note_tables_left(settings: Settings, app: CustomerApplication, left: Sequence[str]) -> list[str]:
    """Keeps the store's tables an erasure's scrub left that a later try can rewrite (held by
    another session, or the database out of reach: not those the role may not vacuum, which wait
    for their owner) for retry_left_tables, and returns them; none, no file. Every erasure scrubs
    all the tables an erasure deletes from, so its own list replaces the last one's."""
    retry = app.store.may_rewrite(left) if left else []
    if retry:
        view_erasure.mark(settings.unscrubbed_tables_path, json.dumps(retry).encode())
    else:
        settings.unscrubbed_tables_path.unlink(missing_ok=True)
    return retry


def retry_left_tables(settings: Settings, app: CustomerApplication,
                      patience_ms: int | None = SCRUB_RETRY_PATIENCE_MS) -> list[str]:
    """Tries once more to rewrite the store's tables an erasure left (note_tables_left), waiting
    `patience_ms` at most for a session that holds one (by default briefly, so the command or the
    server that tries is hardly held up; None: as long as an erasure waits); returns those still
    left. The caller holds the erasure lock."""
    try:
        tables = list(json.loads(settings.unscrubbed_tables_path.read_bytes()))
    except (FileNotFoundError, ValueError):
        return []
    left = app.scrub(tables, patience_ms)
    note_tables_left(settings, app, left)
    return left


def pending_view_rewrite(settings: Settings) -> Path:
    """Marks that the view's file still needs its rewrite (an erasure beside `cdp serve`)."""
    return view_erasure.pending_marker(settings.duckdb_path)


def mark_view_rewrite(settings: Settings) -> None:
    view_erasure.mark(pending_view_rewrite(settings))


def rewrite_view_if_pending(settings: Settings) -> bool:
    """Rewrites the view's file when an erasure left that to be done (while nothing holds it)."""
    marker = pending_view_rewrite(settings)
    if not marker.exists():
        return False
    if settings.duckdb_path.exists():
        view_erasure.rewrite(settings.duckdb_path)
    marker.unlink(missing_ok=True)
    return True


def publish_tombstones(settings: Settings, customer_ids: list[str]) -> None:
    """Tombstones on `cdp.profiles` for the erased ids, so CRMs following the changelog drop the
    person and compaction removes their last profile."""
    from kafka import KafkaProducer

    from cdp import topics
    from projections.changelog import tombstones

    topics.ensure(settings)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        for key, value in tombstones(customer_ids):
            producer.send(settings.topic(topics.PROFILES), key=key, value=value)
        producer.flush()
    finally:
        producer.close()


def _carries_marks(text: str, marks: list[tuple[str, ...]]) -> bool:
    return any(all(f" {phrase} " in text for phrase in group) for group in marks)


def _needles(erasure: Erasure) -> tuple[list[bytes], list[bytes], list[tuple[bytes, bytes]]]:
    """What marks a dead-letter line as the person's: identifiers (lower-cased), phone digits and
    their source records (unit and source id)."""
    texts, digits, records = [], [], []
    for kind, value in erasure.identifiers:
        if kind == "phone":
            number = re.sub(r"\D", "", value)
            digits.append(number[-10:].encode())  # national digits, however the unit wrote them
        texts.append(value.lower().encode())
    for source in erasure.sources:
        unit, _, source_id = source.partition(":")
        records.append((f'"business_unit":"{unit}"'.encode(), f'"source_id":"{source_id}"'.encode()))
    return [t for t in texts if t], [d for d in digits if len(d) >= MIN_PHONE_DIGITS], records


def _street_name(street: str | None) -> str | None:
    """The street's name without its type (spelled out in match form, abbreviated in the input)."""
    words = (street or "").split()
    if len(words) > 1 and words[-1] in STREET_TYPE_WORDS:
        words = words[:-1]
    return " ".join(words) or None


def name_marks(erasure: Erasure) -> list[tuple[str, ...]]:
    """Groups of phrases (match form) that mark an entry as the person's when every phrase of a
    group is in it, for entries that carry no identifier: the full name, the surname with the
    street, or the house number with the street. A first name or a street alone is many people's."""
    marks: set[tuple[str, ...]] = set()
    for f in erasure.features:
        street = _street_name(f.street)
        if f.last and f.first:
            marks.add((f.last, f.first))
        if f.last and street:
            marks.add((f.last, street))
        if f.number and street:
            marks.add((f"{f.number} {street}",))
    return sorted(marks)


def _match_form(line: bytes) -> str:
    """The entry's text as names are compared: JSON escapes undone, then folded (case, accents,
    punctuation), padded so phrases match as whole words."""
    try:
        text = json.dumps(json.loads(line), ensure_ascii=False)
    except ValueError:
        text = line.decode("utf-8", "replace")
    return f" {fold(text)} "


def _names_the_person(text: str, marks: list[tuple[str, ...]], names_alone: Callable[[str], bool]) -> bool:
    return _carries_marks(text, marks) or names_alone(text)


def surname_shared(app: CustomerApplication, own: Sequence[str] = ()) -> Callable[[str], bool]:
    """Whether any source record the store holds carries a surname (match form), but the person's
    `own` records (before the erasure deletes them). One scan of identity_records per surname
    asked (~80 ms on 125,000 records), so it is asked only for an entry that holds the surname."""
    others = f" AND source_key NOT IN ({', '.join('?' * len(own))})" if own else ""

    def shared(last: str) -> bool:
        pattern = "%" + re.sub(r"([!%_])", r"!\1", json.dumps(last)) + "%"  # as blocking.py writes features
        return bool(app.store.query(f"SELECT 1 FROM identity_records WHERE features LIKE ? ESCAPE '!'{others} LIMIT 1",
                                    [pattern, *own]))
    return shared


def scrub_deadletter(path: Path, erasure: Erasure, surname_shared: Callable[[str], bool] | None = None) -> int:
    """Rewrites the dead-letter without the person's entries (carries_the_person); returns how
    many went."""
    return remove_entries(path, carries_the_person(erasure, surname_shared))


REJECTED_INPUT_COLUMNS = ["rejected_at", "reason", "rejected_as", "origin", "event_id", "source", "input"]


def rejected_inputs(path: Path, app: CustomerApplication, customer_id: str | None,
                    identifiers: Sequence[tuple[str, str]] = ()) -> tuple[list[str], list[tuple]]:
    """The access export's section of a person's rejected inputs: the dead-letter entries an
    erasure of theirs would remove (carries_the_person), as columns and rows; of the customer, or
    (None) of the person no customer stands for whose `identifiers` these are (erase_identifiers).
    What the erasure treats as the person's, the person is shown."""
    if customer_id is None:
        carries = carries_the_person(app.identifier_erasure(identifiers, suppress=False))
    else:
        erasure = app.erasure_of(customer_id, suppress=False)
        carries = carries_the_person(erasure, surname_shared(app, erasure.sources))
    entries = matching_entries(path, carries)
    return REJECTED_INPUT_COLUMNS, [tuple(e.get(c) for c in REJECTED_INPUT_COLUMNS) for e in entries]


def carries_the_person(erasure: Erasure, surname_shared: Callable[[str], bool] | None = None) -> Callable[[bytes], bool]:
    """Whether a dead-letter entry (its line) is the person's: it carries their identifiers,
    source records, or their name or street (name_marks). With `surname_shared`, an entry holding
    only the person's surname is theirs too when no other record carries that surname: then it
    names them alone (a shared surname is many people's and marks no entry by itself)."""
    texts, digits, records = _needles(erasure)
    marks = name_marks(erasure)
    surnames = sorted({f.last for f in erasure.features if f.last}) if surname_shared else []
    lone: dict[str, bool] = {}  # surname -> no other record carries it, asked once

    def names_alone(text: str) -> bool:
        for last in surnames:
            if f" {last} " in text:
                if last not in lone:
                    lone[last] = not surname_shared(last)
                if lone[last]:
                    return True
        return False

    def carries(line: bytes) -> bool:
        lower = line.lower().replace(b'\\"', b'"').replace(b'": "', b'":"')
        numbers = [re.sub(rb"\D", b"", m) for m in PHONE_LIKE.findall(line)] if digits else []
        return bool(any(t in lower for t in texts) or any(d in n for d in digits for n in numbers)
                    or any(u.lower() in lower and s.lower() in lower for u, s in records)
                    or ((marks or surnames) and _names_the_person(_match_form(line), marks, names_alone)))

    return carries
