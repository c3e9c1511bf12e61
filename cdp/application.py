"""The command layer: the eventsourcing application whose methods are the only way anything is
committed to the event store. The CLI, the worker and the HTTP layer call these methods and
nothing below them (not the store, the resolver or the recorder).

Every command runs the same sequence, in `CustomerApplication._command`:

    lock → refresh → decide → commit → (retry)

* **lock**: on PostgreSQL, the writers' advisory lock (cdp/writers.py), so one writer at a time
  decides and commits; on SQLite the file has a single writer anyway;
* **refresh**: take in what other writers committed since this one last looked (customers'
  heads, seen event keys, the identity resolver's tables);
* **decide**: the command's own `work(batch)`: asks the resolver, appends domain events to the
  batch (`self.store.append(batch, stored_events.X, customer_id, **fields)`) and side-table rows
  (`batch.writes.append((sql, rows))`), and returns the command's result;
* **commit**: the batch (events, event keys, the resolver's changed rows) in one transaction;
* **retry**: should the commit still meet a uniqueness violation, every in-memory copy is reloaded
  from the store and `work` runs again (COMMIT_ATTEMPTS in all); any other error reloads the
  copies (they may hold the failed batch's changes) and is raised.

How to add a command
--------------------
1. If it records a new fact, add the event class to `Customer` in cdp/domain.py and its topic to
   cdp/contracts/stored_events.py (a test checks they agree); teach projections/ to read it.
2. Add one small public method here that calls `self._command(work)`, where `work(batch)` does
   the deciding. `work` may run more than once (retry): read state only inside it, through
   `self.resolver` and `self.store`, and keep no effects outside the batch.
3. Callers call the method, then bring their view up to date if they have one
   (`Pipeline.catch_up`). Nothing else writes to the store.

Reads the write side needs (confirmed pairs, a customer's age, a customer's survivor) are plain
methods beside the commands; everything else is read from the DuckDB view.
"""
from __future__ import annotations

import base64
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import AbstractSet as Set, Callable, Iterable, Mapping, Sequence, TypeVar
from uuid import UUID

import orjson
from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, Transcoder
from eventsourcing.utils import Environment

from cdp.contracts import audience_events, stored_events as topics
from cdp import shredding, writers
from cdp.config import ConfigError, Settings
from cdp.store import Batch, CompactJSONTranscoder, EventStore, store_environment
from cdp.summary import Summary
from identity import blocking, constraints, index as identity_index, model as identity_model
from identity.blocking import BlockingIndex
from identity.constraints import CannotLink
from identity.features import Features
from identity.guardrails import Guardrails
from identity.index import IdentityIndex
from identity.matching import ProbabilisticMatcher
from identity import reresolution
from identity.reresolution import Retrained
from identity.resolver import Decision, Link, Resolver, SplitDecision, review_id
from identity.training import due, has_pairs, train
from ingest.normalise import linking_phone
from ingest.records import Accepted, Rejected

COMMIT_ATTEMPTS = 5
SUPPRESSED_TABLE = "CREATE TABLE IF NOT EXISTS cdp_suppressed (fingerprint TEXT PRIMARY KEY)"
SELECT_SUPPRESSED = "SELECT fingerprint FROM cdp_suppressed"
INSERT_SUPPRESSED = "INSERT INTO cdp_suppressed (fingerprint) VALUES (?) ON CONFLICT (fingerprint) DO NOTHING"
IDENTITY_TABLES = (*identity_index.TABLES, *blocking.TABLES, *constraints.TABLES, *identity_model.TABLES)
# The tables an erasure deletes rows from that held the person's identifiers or data keys (scrub).
ERASED_FROM = ("identity_keys", "identity_redirects", "identity_records", "identity_cannot_link", "cdp_data_keys")
LAST_MODEL_VERSION = "SELECT COALESCE(MAX(version), 0) FROM identity_model"
T = TypeVar("T")


def record_identifiers(record: Accepted) -> list[tuple[str, str]]:
    """What suppression knows a record by: its source record, and its identifiers."""
    return [("source", f"{record.business_unit}:{record.source_id}"), *record.identifiers.items()]


@dataclass
class Erasure:
    """What an erasure touched: the customer, every id merged into it, its source records
    (`unit:source_id`) and identifiers (kind, value): the caller scrubs copies outside the store
    (view, dead-letter) with them, then forgets them. `features` are the source records' names and
    addresses in match form (identity_records), for copies that carry no identifier."""

    customer_id: str | None  # None: identifiers no customer carries (erase_identifiers)
    customer_ids: list[str]
    sources: list[str]
    identifiers: list[tuple[str, str]]
    fingerprints: list[str]
    features: list[Features] = field(default_factory=list)


class CustomerCarries(ValueError):
    """An identifier given to erase as no customer's is a customer's by the time the store is
    locked (its events arrived meanwhile): that customer is what to erase. Its message alone
    (it crosses from the server's resolver process as a pickle)."""


def split_key(key: str) -> tuple[str, str]:
    """'business_unit:source_id' -> (business_unit, source_id); units never contain ':'."""
    unit, _, source_id = key.partition(":")
    return unit, source_id


def load_resolver(store: EventStore, settings: Settings) -> Resolver:
    """The resolver with its state as the store last committed it."""
    index = IdentityIndex(store.query(identity_index.SELECT_KEYS), store.query(identity_index.SELECT_REDIRECTS))
    blocks = BlockingIndex(store.query(blocking.SELECT_RECORDS), settings.max_block)
    matcher = None
    if settings.matching == "probabilistic":
        model = identity_model.load(store.query(identity_model.SELECT_LATEST))
        matcher = ProbabilisticMatcher(model, blocks, settings.match_threshold, settings.review_threshold)
    return Resolver(index, matcher, blocks, Guardrails(settings.identifier_limits, blocks.records.values()),
                    CannotLink(store.query(constraints.SELECT_PAIRS)))


def take_in_changes(resolver: Resolver, changed: Callable[[str], list[tuple]]) -> None:
    """What other writers on the same store committed since our last look (cdp/writers.py),
    a model another writer trained included: every writer scores with the latest model, no restart."""
    resolver.index.load(changed(identity_index.SELECT_KEYS), changed(identity_index.SELECT_REDIRECTS))
    resolver.take_in(changed(blocking.SELECT_RECORDS), changed(constraints.SELECT_PAIRS))
    models = changed(identity_model.SELECT_MODELS)
    if models and resolver.matcher is not None:
        text, version = max(models, key=lambda row: int(row[1]))
        if int(version) > resolver.matcher.model.version:
            resolver.matcher.model = identity_model.Model.from_json(text, int(version))


class CustomerApplication(Application):
    """The platform's system of record and its commands (see the module's docstring)."""

    name = "cdp"

    def __init__(self, settings: Settings):
        self.settings = settings
        env = store_environment(settings)  # first: it names the extra when PostgreSQL's driver is missing
        self._writers = writers.WriterLock(settings.event_store) if settings.event_store else None
        # PostgreSQL: `CREATE … IF NOT EXISTS` races when several writers start at once, so the
        # schema is created under the writers' lock
        with self._writers.held() if self._writers else nullcontext():
            super().__init__(env=env)
            key_table = shredding.KEY_TABLE_POSTGRES if settings.event_store else shredding.KEY_TABLE
            self.store = EventStore(self.recorder, self.mapper.transcoder, settings, self._writers,
                                    side_tables=(*IDENTITY_TABLES, key_table, SUPPRESSED_TABLE,
                                                 shredding.MASTER_TABLE))
            master = self._master_key()
        self.keys = shredding.KeyRing(master, self._stored_keys)
        self.mapper.transcoder.unseal = self.keys.unseal
        self._resolver: Resolver | None = None  # loaded by the first command: readers never need it
        self._suppressed: set[str] | None = None  # fingerprints of erased identifiers, loaded with the resolver
        self._erasures_seen = 0  # store position up to which other processes' erasures were taken in

    def _master_key(self) -> bytes:
        """CDP_MASTER_KEY, else the key file in CDP_HOME (SQLite) or the store's own key
        (PostgreSQL: several writers, each with its own CDP_HOME, must share one); checked against
        the store, so a wrong key is one clear error instead of unreadable data."""
        settings, store = self.settings, self.store

        def settle(name: str, value: str) -> str:
            batch = store.begin()
            batch.writes.append((shredding.INSERT_MASTER, [(name, value)]))
            store.commit(batch)
            return store.query(shredding.SELECT_MASTER, (name,))[0][0]

        if settings.master_key or not settings.event_store:
            master = shredding.load_master_key(settings.master_key, settings.master_key_path)
        else:
            master = base64.b64decode(settle("key", shredding.new_master_text()))
        if settle("check", shredding.check_value(master)) != shredding.check_value(master):
            raise ConfigError("the master key (CDP_MASTER_KEY or CDP_HOME/master.key) is not the one this "
                              "event store was written with")
        return master

    def construct_env(self, name: str, env: Mapping[str, str] | None = None) -> Environment:
        """Only the settings derived from ours (store_environment): the library's other variables
        in the process environment (POSTGRES_ENABLE_DB_FUNCTIONS, CDP_PERSISTENCE_MODULE …) must not
        change how the store is written behind the platform's back."""
        return Environment(name, dict(env or {}))

    def construct_transcoder(self) -> Transcoder:
        return CompactJSONTranscoder()

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self.reload()
        return self._resolver

    def reload(self) -> None:
        """Drops the in-memory copies and reads them again from the store."""
        self.store.load()  # first: during an outage it fails fast (the writers' lock's connection)
        # PostgreSQL: the position load() marked before reading; SQLite: one local file, read now
        self._erasures_seen = self.store.position or self.store.max_position()
        self.keys.forget(row[0] for row in self.store.query(shredding.SELECT_KEY_IDS))
        self._resolver = load_resolver(self.store, self.settings)
        self._suppressed = {row[0] for row in self.store.query(SELECT_SUPPRESSED)}

    def _erased_elsewhere(self) -> bool:
        """Whether another process erased someone since this one last looked: its copies (identity
        keys, suppressed identifiers) must then be read again, as the erasure changed the store's
        (a long-running worker or server drops the person without a restart)."""
        high = self.store.max_position()
        if high <= self._erasures_seen:
            return False
        table = self.store.recorder.events_table_name
        position = "notification_id" if self.store.is_postgres else "rowid"
        found = self.store.query(f"SELECT 1 FROM {table} WHERE {position} > ? AND {position} <= ? AND topic = ? "
                                 "LIMIT 1", (self._erasures_seen, high, topics.ERASED))
        self._erasures_seen = high
        return bool(found)

    def _stored_keys(self, key_ids: Sequence[str]) -> list[tuple]:
        rows: list[tuple] = []
        for start in range(0, len(key_ids), 500):
            chunk = key_ids[start:start + 500]
            rows += self.store.query(shredding.SELECT_KEYS + " WHERE key_id IN (" + ", ".join("?" * len(chunk)) + ")",
                                     chunk)
        return rows

    def _append(self, batch: Batch, topic: str, customer_id: str, source_key: str, **fields: object) -> None:
        """Appends an event whose personal fields are sealed with the source record's data key."""
        if self.settings.encrypt_personal_data:
            fields = self.keys.seal(topic, source_key, fields, batch.data_keys)
        self.store.append(batch, topic, customer_id, **fields)

    def _command(self, work: Callable[[Batch], T], committed: Callable[[Batch], None] | None = None,
                 needs_resolver: bool = True) -> T:
        """lock → refresh → work(batch) → commit → retry; `committed(batch)` runs after the
        commit, still under the lock (the worker publishes profiles there, in commit order).
        A command that works on the store's tables alone (`needs_resolver=False`, e.g. erase) does
        not load the resolver's copies when this process has none yet."""
        # loads the copies on first use, before the lock's refresh
        resolver = self.resolver if needs_resolver or self._resolver is not None else None
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                with self.store.exclusive():
                    if resolver is not None and self._erased_elsewhere():
                        self.reload()
                        resolver = self._resolver
                    if resolver is not None:
                        take_in_changes(resolver, self.store.changed)
                        self._suppressed.update(row[0] for row in self.store.changed(SELECT_SUPPRESSED))
                        self.keys.take_in(row[0] for row in self.store.changed(shredding.SELECT_KEY_IDS))
                    batch = self.store.begin()
                    result = work(batch)
                    if resolver is not None:
                        batch.writes.extend(resolver.take_writes())
                    self.store.commit(batch)
                    if committed is not None:
                        committed(batch)
                return result
            except Exception as error:
                self.reload()  # the copies may hold the failed batch's changes
                resolver = self._resolver
                if not isinstance(error, IntegrityError) or attempt == COMMIT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    # -- commands ------------------------------------------------------------------------------

    def ingest(self, records: Sequence[Accepted], committed: Callable[[Batch], None] | None = None) -> Summary:
        """Resolves accepted records and stores their events (duplicates by event key are counted
        and dropped; the same key with other content is refused as a conflict, in
        `summary.conflicts` for the caller's dead-letter); returns what this batch did."""
        def work(batch: Batch) -> Summary:
            summary = Summary()
            if self.settings.encrypt_personal_data:
                self.keys.prepare(f"{r.business_unit}:{r.source_id}" for r in records)
            for record in records:
                seen = record.key in self.store.seen
                first = self.store.seen.content(record.key) if seen else None
                changed = first is not None and record.digest and first != record.digest
                if seen and not changed:
                    summary.duplicates += 1
                elif self._suppressed and self._is_suppressed(record):
                    # before a conflict: an erased person's re-sent event goes without its input
                    summary.suppressed += 1
                    summary.suppressed_events.append((record.source, record.event_id))
                elif changed:
                    summary.conflicts.append(conflict(record, first))
                else:
                    self._append_decision(batch, record, self.resolver.resolve(record), summary)
                    self.store.mark_seen(batch, record.key, record.digest)
            summary.stored_events = len(batch)
            return summary

        return self._command(work, committed)

    def split(self, customer_id: str, sources: list[str] | None, reason: str,
              actor: str = "local") -> list[SplitDecision]:
        """Moves source records out of a customer (all but one when `sources` is None); the
        resolver remembers they must not be linked again."""
        def work(batch: Batch) -> list[SplitDecision]:
            decisions = self.resolver.split(customer_id, sources)
            if decisions:
                self._audit(batch, actor, "split", customer_id,
                            {"new_customer_ids": [d.new_customer_id for d in decisions], "reason": reason})
            for d in decisions:
                self._append_split(batch, d.customer_id, d.new_customer_id, d.source_keys, reason)
            return decisions

        return self._command(work)

    def confirm_match(self, a: str, b: str) -> str:
        """A person says source records a and b are one person: merges their customers; returns
        the survivor."""
        def work(batch: Batch) -> str:
            survivor, absorbed, link = self.resolver.confirm(a, b)
            if absorbed is not None:
                self._append_merge(batch, survivor, absorbed, link)
            self.store.append(batch, topics.MATCH_CONFIRMED, survivor, **_pair(a, b))
            return survivor

        return self._command(work)

    def merge_visitor(self, user: str, visitors: Sequence[str]) -> str | None:
        """An anonymous visitor turned out to be a known user (a Segment identify or alias naming
        the visitor's earlier ids, `visitors`): rule `anonymous_id`. A visitor already seen is
        merged in (its customer into the user's); when none of them was seen yet (the identify
        overtook the visitor's events, e.g. from another partition), each is linked to the user's
        customer ahead of its events, which then land there. Returns the user's customer, or None
        when nothing changed: the user unknown, one customer already, or a person's "not the
        same" or a split keeps them apart."""
        known = self.resolver.cluster_of(user)
        if known is not None and known in {self.resolver.cluster_of(v) for v in visitors}:
            return None  # one customer already (a site identifies on every visit): no lock, no transaction

        def work(batch: Batch) -> str | None:
            resolver = self.resolver
            ours = resolver.cluster_of(user)
            seen = [v for v in visitors if resolver.cluster_of(v) is not None]
            if ours is None or ours in {resolver.cluster_of(v) for v in seen}:
                return None
            evidence = lambda visitor: {"user": user, "anonymous": visitor}  # noqa: E731
            if not seen:
                linked = [v for v in visitors if resolver.link_ahead(user, v) is not None]
                for visitor in linked:
                    unit, source_id = split_key(visitor)
                    self._append(batch, topics.SOURCE_LINKED, ours, visitor, business_unit=unit,
                                 source_id=source_id, rule="anonymous_id", evidence=evidence(visitor))
                return ours if linked else None
            survivor = None
            for visitor in seen:
                pair = (user, visitor) if user <= visitor else (visitor, user)
                if pair in resolver.cannot_link.pairs or resolver.cluster_of(visitor) == resolver.cluster_of(user):
                    continue
                try:
                    survivor, absorbed, _ = resolver.confirm(user, visitor)
                except ValueError:  # a remembered split keeps them apart
                    continue
                self.store.append(batch, topics.MERGED, survivor, absorbed_id=absorbed, rule="anonymous_id",
                                  evidence=evidence(visitor))
                self.store.append(batch, topics.ABSORBED, absorbed, survivor_id=survivor)
            return survivor

        return self._command(work)

    def reject_match(self, a: str, b: str) -> str:
        """A person says source records a and b are different people: they stay apart from now
        on; returns the customer of a."""
        def work(batch: Batch) -> str:
            customer, _ = self.resolver.reject(a, b)
            self.store.append(batch, topics.MATCH_REJECTED, customer, **_pair(a, b))
            return customer

        return self._command(work)

    def erase(self, customer_id: str, suppress: bool = True, actor: str = "local") -> Erasure:
        """Erases a person: destroys the data keys of every source record of the customer (and of
        the customers merged into it), deletes their identity rows (keys, redirects, matching
        records, cannot-link pairs), keeps their identifiers as keyed hashes when `suppress` (later
        events carrying them are dropped) and records `Erased`, which carries no personal data."""
        def work(batch: Batch) -> Erasure:
            erasure = self.erasure_of(customer_id, suppress)
            self.store.heads[erasure.customer_id] = self.store.head(erasure.customer_id)
            ids, sources = [(c,) for c in erasure.customer_ids], [(s,) for s in erasure.sources]
            batch.writes += [
                (shredding.DELETE_KEY, [(self.keys.key_id(s),) for s in
                                        [*erasure.sources, *map(shredding.customer_key, erasure.customer_ids)]]),
                ("DELETE FROM identity_keys WHERE customer_id = ?", ids),
                ("DELETE FROM identity_redirects WHERE absorbed_id = ?", ids),
                ("DELETE FROM identity_records WHERE source_key = ?", sources),
                ("DELETE FROM identity_cannot_link WHERE a = ?", sources),
                ("DELETE FROM identity_cannot_link WHERE b = ?", sources),
                (INSERT_SUPPRESSED, [(f,) for f in erasure.fingerprints] if suppress else []),
            ]
            self.store.append(batch, topics.ERASED, erasure.customer_id, customer_ids=erasure.customer_ids,
                              sources=len(erasure.sources), suppressed=suppress, actor=actor)
            self._audit(batch, actor, "erase", erasure.customer_id,
                        {"customer_ids": erasure.customer_ids, "sources": len(erasure.sources), "suppressed": suppress})
            return erasure

        erasure = self._command(work, needs_resolver=False)
        self.keys.forget()
        # The copies in memory still hold the person's identifiers: dropped now, read again by the
        # next command that needs them. Reading them here held the erasure (and the server's
        # answer) for the whole identity state: seconds on a store of a million events.
        self._resolver = None
        return erasure

    def erase_identifiers(self, identifiers: Sequence[tuple[str, str]], suppress: bool = True,
                          actor: str = "local") -> Erasure:
        """Erases a person no customer stands for, known by `identifiers` (kind, normalised value;
        a source record as ("source", "unit:source_id")): someone whose every input was rejected,
        so the dead-letter alone holds them, or who asks before any unit has sent them. The store
        holds nothing of theirs to destroy: their identifiers are kept as keyed hashes when
        `suppress` (later events carrying them are dropped, as an erased customer's), and the
        erasure is audited by the kinds of identifier alone. Raises CustomerCarries when a
        customer carries one by the time the store is locked."""
        def work(batch: Batch) -> Erasure:
            for kind, value in identifiers:
                owners = sorted({row[0] for row in self.store.query(
                    "SELECT customer_id FROM identity_keys WHERE kind = ? AND value = ?", (kind, value))})
                if owners:
                    raise CustomerCarries(f"customer {', '.join(owners)} carries the {kind} now: erase the customer")
            erasure = self.identifier_erasure(identifiers, suppress)
            batch.writes.append((INSERT_SUPPRESSED, [(f,) for f in erasure.fingerprints]))
            self._audit(batch, actor, "erase", None, {"customer_ids": [], "sources": len(erasure.sources),
                                                      "identifiers": sorted({kind for kind, _ in identifiers}),
                                                      "suppressed": bool(erasure.fingerprints)})
            return erasure

        erasure = self._command(work, needs_resolver=False)
        if self._suppressed is not None:  # this process's next batch drops them too
            self._suppressed.update(erasure.fingerprints)
        return erasure

    def identifier_erasure(self, identifiers: Sequence[tuple[str, str]], suppress: bool = True) -> Erasure:
        """What erasing identifiers no customer carries touches (erase_identifiers), for the
        copies outside the store: their source records and other identifiers, their keyed hashes."""
        sources = sorted(value for kind, value in identifiers if kind == "source")
        others = sorted((kind, value) for kind, value in identifiers if kind != "source")
        # a phone no record is known by (not a number one person answers) would suppress nothing
        known = [(kind, value) for kind, value in identifiers if kind != "phone" or linking_phone(value, "ZZ")]
        fingerprints = sorted({self.keys.fingerprint(kind, value) for kind, value in known}) if suppress else []
        return Erasure(None, [], sources, others, fingerprints)

    def scrub(self, tables: Sequence[str] = ERASED_FROM, patience_ms: int | None = None) -> list[str]:
        """After an erasure: no deleted row left in the store's files (EventStore.scrub); returns
        the tables that could not be rewritten (PostgreSQL: busy, not this role's to vacuum, or the
        database out of reach)."""
        return self.store.scrub(tables, patience_ms)

    def erasure_of(self, customer_id: str, suppress: bool = True) -> Erasure:
        """What erasing a customer touches, read from the store's identity tables (`erase` reads it
        again under the writers' lock; read before, it lets copies outside the store be scrubbed
        while the identifiers that find them are still at hand)."""
        query = self.store.query
        survivor, seen = customer_id, {customer_id}
        while (row := query("SELECT survivor_id FROM identity_redirects WHERE absorbed_id = ?", (survivor,))) \
                and row[0][0] not in seen:
            survivor = row[0][0]
            seen.add(survivor)
        ids, frontier = {survivor}, [survivor]
        while frontier:
            marks = ", ".join("?" * len(frontier))
            frontier = [a for (a,) in query(f"SELECT absorbed_id FROM identity_redirects WHERE survivor_id IN ({marks})",
                                             frontier) if a not in ids]
            ids.update(frontier)
        ordered = sorted(ids)
        keys = query(f"SELECT kind, value FROM identity_keys WHERE customer_id IN ({', '.join('?' * len(ordered))})",
                     ordered)
        sources = sorted(value for kind, value in keys if kind == "source")
        fingerprints = sorted({self.keys.fingerprint(kind, value) for kind, value in keys}) if suppress else []
        records = query(f"SELECT features FROM identity_records WHERE source_key IN ({', '.join('?' * len(sources))})",
                        sources) if sources else []
        return Erasure(survivor, ordered, sources, [tuple(k) for k in keys if k[0] != "source"], fingerprints,
                       [Features.from_json(orjson.loads(text)) for (text,) in records])

    def _is_suppressed(self, record: Accepted) -> bool:
        return self.carries_erased(record_identifiers(record))

    def carries_erased(self, identifiers: Iterable[tuple[str, str]], suppressed: Set[str] | None = None) -> bool:
        """Whether any (kind, normalised value) is an erased person's, kept as a keyed hash for
        suppression: as of `suppressed` (erased_screen), else of this process's last command, or
        read now when it has run none (and there is something to look for)."""
        fingerprints = {self.keys.fingerprint(kind, value) for kind, value in identifiers}
        if not fingerprints:
            return False
        if suppressed is None:
            suppressed = self._suppressed
        if suppressed is None:
            suppressed = {row[0] for row in self.store.query(SELECT_SUPPRESSED)}
        return not fingerprints.isdisjoint(suppressed)

    def erased_screen(self) -> Callable[[Iterable[tuple[str, str]]], bool]:
        """carries_erased as the store holds the erased identifiers now, read once: for a process
        that screens many inputs and commits none (`cdp ingest --kafka` before it publishes, the
        Kafka collector of `cdp serve`). A record's identifiers: record_identifiers."""
        suppressed = frozenset(row[0] for row in self.store.query(SELECT_SUPPRESSED))
        return lambda identifiers: bool(suppressed) and self.carries_erased(identifiers, suppressed)

    def record_access(self, actor: str, action: str, customer_id: str | None = None, **detail: object) -> None:
        """Adds an entry to the audit trail (a profile read, an export, a key created or revoked …)."""
        self.record_accesses([(actor, action, customer_id, detail)])

    def record_accesses(self, entries: Sequence[tuple[str, str, str | None, dict]]) -> None:
        """Adds entries (actor, action, customer id, detail) to the audit trail in one commit
        (a server's reads, batched: cdp/audit.py)."""
        def work(batch: Batch) -> None:
            for actor, action, customer_id, detail in entries:
                self._audit(batch, actor, action, customer_id, detail)

        self._command(work, needs_resolver=False)

    def _audit(self, batch: Batch, actor: str, action: str, customer_id: str | None, detail: dict) -> None:
        if not batch.audited:  # the audit log's head is read once per batch, under the lock
            self.store.heads[topics.AUDIT_LOG_ID] = self.store.head(topics.AUDIT_LOG_ID)
            batch.audited = True
        self.store.append(batch, topics.AUDIT_ENTRY, topics.AUDIT_LOG_ID,
                          actor=actor, action=action, customer_id=customer_id, detail=detail)

    def audit_entries(self) -> list[dict]:
        """Every audit entry, oldest first: `at` (when it was recorded), actor, action, customer_id, detail."""
        entries = []
        for version, state in self.store.stream(topics.AUDIT_LOG_ID):
            entry = orjson.loads(state)
            entries.append({"entry": version, "at": entry["timestamp"]["_data_"], "actor": entry["actor"],
                            "action": entry["action"], "customer_id": entry["customer_id"], "detail": entry["detail"]})
        return entries

    def retrain(self, seed: int = 1, dry_run: bool = False,
                progress: Callable[[int], None] | None = None) -> Retrained | None:
        """Trains a model on the records held and re-resolves them with it (identity/reresolution.py):
        the model row, the merges and the splits commit together; `dry_run` decides and writes nothing.

        The estimate and the scoring of every candidate pair — the long part — run on a snapshot of
        the records outside the writers' lock, so other writers go on meanwhile; under the lock only
        the records that arrived since are scored, and the merges and splits are decided and
        committed as one command. None when another writer stored a model meanwhile (its model,
        taken in by the refresh, stands)."""
        if self.resolver.matcher is None:
            raise ValueError("CDP_MATCHING is deterministic: there is no model to train")
        settings = self.settings
        self._command(lambda batch: None)  # take in what other writers committed: train on all records held
        resolver = self.resolver
        latest, records = resolver.matcher.model, resolver.blocks.records
        snapshot = sorted(records)  # in source-key order: the same model whatever the arrival order
        trained = train([records[k] for k in snapshot], seed=seed, max_block=settings.max_block)
        new_model = not (latest.version and trained.same_estimate(latest))
        model = trained if new_model else latest
        scores = reresolution.score(self._with_model(resolver, model), snapshot, progress)

        def work(batch: Batch) -> Retrained | None:
            if self.resolver.matcher.model.version != latest.version:
                return None  # another writer trained meanwhile
            if new_model:
                model.version = self.store.query(LAST_MODEL_VERSION)[0][0] + 1
            candidate = self._with_model(self.resolver, model)
            changes = reresolution.plan(candidate, self._confirmed_pairs(), self._oldest, progress, scores)
            if dry_run:
                return Retrained(model, new_model, changes)
            if new_model:
                batch.writes.append((identity_model.INSERT_MODEL, [(model.version, model.to_json())]))
            reresolution.apply(candidate, changes)
            for s in changes.splits:
                self._append_split(batch, s.customer_id, s.new_customer_id, s.source_keys, s.reason)
            for m in changes.merges:
                self._append_merge(batch, m.survivor, m.absorbed, m.link)
            self.resolver.matcher = candidate.matcher
            return Retrained(model, new_model, changes)

        return self._command(work)

    def _with_model(self, resolver: Resolver, model: identity_model.Model) -> Resolver:
        """The resolver's state seen through another model (for scoring and planning)."""
        settings = self.settings
        matcher = ProbabilisticMatcher(model, resolver.blocks, settings.match_threshold, settings.review_threshold)
        return Resolver(resolver.index, matcher, resolver.blocks, resolver.guardrails, resolver.cannot_link)

    def records_held(self) -> int:
        """Source records the resolver holds (every writer's, as of the last refresh)."""
        return len(self.resolver.blocks)

    def training_due(self) -> bool:
        """Whether enough records arrived since the latest model to train again (CDP_TRAIN_MIN_RECORDS,
        CDP_RETRAIN_GROWTH; never with deterministic matching)."""
        settings, resolver = self.settings, self.resolver
        return resolver.matcher is not None and due(len(resolver.blocks), resolver.matcher.model,
                                                    settings.train_min_records, settings.retrain_growth)

    def can_learn(self) -> bool:
        """Whether the records held give a training candidate pairs to learn from (identity.training
        .has_pairs on the blocking index): one scan of the blocks, asked once training is due."""
        return has_pairs(self.resolver.blocks.blocks)

    def retrain_if_due(self) -> Retrained | None:
        """Self-training: `retrain` when `training_due`; None when not due or nothing to learn from."""
        if not self.training_due() or not self.can_learn():
            return None
        try:
            return self.retrain()
        except ValueError:  # too few candidate pairs to learn from: keep the model until more arrive
            return None

    def define_audience(self, name: str, where: str, consent: str | None) -> None:
        """Stores an audience's definition (checked by the caller: projections.audiences); the
        same name after a delete is defined again."""
        self._define("audience", name, dict(name=name, where=where, consent=consent))

    def define_destination(self, name: str, webhook: str, audiences: list[str], fields: list[str],
                           sealed_secret: str | None) -> None:
        """Stores where the changes of `audiences` go; the secret arrives sealed (cdp/secrets.py)."""
        self._define("destination", name, dict(name=name, webhook=webhook, audiences=audiences, fields=fields,
                                               sealed_secret=sealed_secret))

    def delete_definition(self, kind: str, name: str) -> None:
        """Deletes the audience or destination called `name` (kind: 'audience' | 'destination')."""
        topic = {"audience": audience_events.AUDIENCE_DELETED, "destination": audience_events.DESTINATION_DELETED}[kind]
        self._command(lambda batch: self.store.append(batch, topic, audience_events.definition_id(kind, name),
                                                      name=name))

    def _define(self, kind: str, name: str, fields: dict) -> None:
        first, again = {"audience": (audience_events.AUDIENCE_DEFINED, audience_events.AUDIENCE_REDEFINED),
                        "destination": (audience_events.DESTINATION_DEFINED,
                                        audience_events.DESTINATION_REDEFINED)}[kind]
        aggregate = audience_events.definition_id(kind, name)

        def work(batch: Batch) -> None:
            self.store.append(batch, again if aggregate in self.store.heads else first, aggregate, **fields)

        self._command(work)

    # -- reads the write side needs ------------------------------------------------------------

    def _confirmed_pairs(self) -> list[tuple[str, str]]:
        """The pairs people confirmed in review (few: read from their events)."""
        rows = self.store.query(f"SELECT state FROM {self.recorder.events_table_name} WHERE topic = ?",
                                (topics.MATCH_CONFIRMED,))
        pairs = []
        for (state,) in rows:
            e = self.store.transcoder.decode(bytes(state))
            pairs.append((f"{e['business_unit']}:{e['source_id']}", f"{e['other_business_unit']}:{e['other_source_id']}"))
        return pairs

    def _oldest(self, ids: list[str]) -> str:
        """Of several customer ids, the one whose first event the store recorded first."""
        table = self.recorder.events_table_name
        if self.store.is_postgres:
            rows = self.store.query(f"SELECT replace(originator_id::text, '-', ''), notification_id FROM {table} "
                                    "WHERE originator_version = 1 AND originator_id = ANY(?)", ([UUID(i) for i in ids],))
        else:
            marks = ",".join("?" * len(ids))
            rows = self.store.query(f"SELECT originator_id, rowid FROM {table} "
                                    f"WHERE originator_version = 1 AND originator_id IN ({marks})", ids)
        position = dict(rows)
        return min(ids, key=lambda i: (position.get(i, float("inf")), i))

    def survivor(self, customer_id: str) -> str:
        """The customer an id resolves to now (itself unless merged away)."""
        return self.resolver.index.survivor(customer_id)

    def raw_notifications(self, after: int, limit: int) -> list[tuple[int, str, str, bytes]]:
        """The stored events after a position, for the read side (projections), personal fields
        decrypted (absent where the person was erased)."""
        rows = self.store.raw_notifications(after, limit)
        states = self.keys.unseal([row[3] for row in rows])
        return [(position, customer, topic, state) for (position, customer, topic, _), state in zip(rows, states)]

    def max_position(self) -> int:
        return self.store.max_position()

    # -- domain events ---------------------------------------------------------------------------

    def _append_split(self, batch: Batch, customer_id: str, new_customer_id: str, source_keys: list[str],
                      reason: str) -> None:
        moved = [list(split_key(s)) for s in source_keys]
        self.store.append(batch, topics.SPLIT, customer_id, new_customer_id=new_customer_id, sources=moved,
                          reason=reason)
        self.store.append(batch, topics.SPLIT_OFF, new_customer_id, business_unit=moved[0][0],
                          source_id=moved[0][1], split_from=customer_id, sources=moved)

    def _append_merge(self, batch: Batch, survivor: str, absorbed: str, link: Link) -> None:
        # the evidence (e.g. a shared phone) is sealed under the absorbed customer's own key
        self._append(batch, topics.MERGED, survivor, shredding.customer_key(absorbed), absorbed_id=absorbed,
                     rule=link.rule, evidence=link.evidence)
        self.store.append(batch, topics.ABSORBED, absorbed, survivor_id=survivor)


    def _append_decision(self, batch: Batch, record: Accepted, decision: Decision, summary: Summary) -> None:
        store, customer = self.store, decision.customer_id
        unit, source_id = record.business_unit, record.source_id
        src = f"{unit}:{source_id}"
        summary.accepted += 1
        if decision.registered:
            store.append(batch, topics.REGISTERED, customer, business_unit=unit, source_id=source_id)
            summary.new_customers += 1
        for absorbed, link in decision.merges:
            self._append_merge(batch, customer, absorbed, link)
            summary.merges += 1
        if decision.link is not None:
            self._append(batch, topics.SOURCE_LINKED, customer, src, business_unit=unit, source_id=source_id,
                         rule=decision.link.rule, evidence=decision.link.evidence)
            summary.linked_sources += 1
        for suggestion in decision.suggestions:
            other_unit, other_source_id = split_key(suggestion.other_source_key)
            self._append(batch, topics.MATCH_SUGGESTED, customer, src, review_id=suggestion.review_id,
                         business_unit=unit, source_id=source_id, other_business_unit=other_unit,
                         other_source_id=other_source_id, probability=suggestion.probability,
                         evidence=suggestion.evidence)
        for kind, value, records, limit in decision.ignored:
            self._append(batch, topics.IDENTIFIER_IGNORED, customer, src, business_unit=unit, source_id=source_id,
                         kind=kind, value=value, records=records, limit=limit)
        self._append(batch, topics.EVENT_RECORDED, customer, src,
                     event_id=record.event_id, event_source=record.source, event_type=record.type,
                     time=record.time, business_unit=unit, source_id=source_id,
                     profile=record.profile, data=record.data)

    def __enter__(self) -> "CustomerApplication":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()
        if self._writers is not None:
            self._writers.close()
        super().close()


def conflict(record: Accepted, first: str) -> Rejected:
    """A re-sent `source` + `id` whose content differs from what was stored first: the first
    version stays, the sender learns their correction was not taken."""
    return Rejected(reason=f"event {record.event_id!r} from {record.source!r} was already stored with other "
                           f"content (stored digest {first}, this one {record.digest}); the first version is kept",
                    origin=record.origin, kind="conflict", raw=record.as_sent(),
                    event_id=record.event_id, source=record.source,
                    extra={"stored_digest": first, "digest": record.digest})


def _pair(a: str, b: str) -> dict[str, str]:
    """The fields naming a reviewed pair of source records."""
    (unit, source_id), (other_unit, other_source_id) = split_key(a), split_key(b)
    return dict(review_id=review_id(a, b), business_unit=unit, source_id=source_id,
                other_business_unit=other_unit, other_source_id=other_source_id)
