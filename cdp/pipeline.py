"""The embedded pipeline: ingest → identity → event store → projections, in one process.

The Kafka worker runs the same `Pipeline.process` on records it reads from the broker, so the two
modes share every stage after the transport. Work is done in batches: each batch of resolved
records is one store transaction (events, seen keys and identity index together), then the
projector catches up from the store.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

from eventsourcing.persistence import IntegrityError

from cdp.config import Settings
from cdp.domain import Customer
from cdp.store import Batch, EventStore
from identity import blocking, constraints, index as identity_index, model as identity_model
from identity.blocking import BlockingIndex
from identity.constraints import CannotLink
from identity.guardrails import Guardrails
from identity.index import IdentityIndex
from identity.matching import ProbabilisticMatcher
from identity.resolver import Decision, Resolver
from ingest.deadletter import DeadLetterFile
from ingest.parallel import ParseWorkers
from ingest.ranges import Ranges
from ingest.records import Accepted, Rejected
from ingest.stage import Ingestor
from ingest.validation import EventValidator
from projections.follower import ViewFollower
from projections.projector import Projector

COMMIT_ATTEMPTS = 5


@dataclass
class Summary:
    """What one run did, for the CLI's closing summary."""

    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    new_customers: int = 0
    linked_sources: int = 0
    merges: int = 0
    suggestions: int = 0  # grey-zone pairs queued for review
    stored_events: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def read(self) -> int:
        return self.accepted + self.rejected + self.duplicates

    def add_rejection(self, kind: str) -> None:
        self.rejected += 1
        self.reasons[kind] = self.reasons.get(kind, 0) + 1

    def add(self, other: "Summary") -> None:
        for name in ("accepted", "rejected", "duplicates", "new_customers", "linked_sources", "merges",
                     "stored_events"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for kind, count in other.reasons.items():
            self.reasons[kind] = self.reasons.get(kind, 0) + count


IDENTITY_TABLES = (*identity_index.TABLES, *blocking.TABLES, *constraints.TABLES, *identity_model.TABLES)


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
    """What other writers on the same store committed since our last look (cdp/writers.py)."""
    resolver.index.load(changed(identity_index.SELECT_KEYS), changed(identity_index.SELECT_REDIRECTS))
    resolver.take_in(changed(blocking.SELECT_RECORDS), changed(constraints.SELECT_PAIRS))


def conflict(record: Accepted, first: str) -> Rejected:
    """A re-sent `source` + `id` whose content differs from what was stored first: the first
    version stays, the sender learns their correction was not taken."""
    return Rejected(reason=f"event {record.event_id!r} from {record.source!r} was already stored with other "
                           f"content (stored digest {first}, this one {record.digest}); the first version is kept",
                    origin=record.origin, kind="conflict", raw=record.as_sent(),
                    event_id=record.event_id, source=record.source,
                    extra={"stored_digest": first, "digest": record.digest})


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def make_ingestor(settings: Settings, parse_workers: Callable[[], ParseWorkers] | None = None) -> Ingestor:
    return Ingestor(EventValidator(settings.schemas_dir), settings.phone_region, settings.max_event_bytes,
                    parse_workers, Ranges(settings.max_future, settings.max_amount))


class Pipeline:
    """`deadletter` is where rejected records go (default: the JSONL file in CDP_HOME); anything
    with `write(Rejected)`, `flush()` and `close()` will do, e.g. the worker's Kafka topic."""

    def __init__(self, settings: Settings, project: bool = True, deadletter: Any = None):
        self.settings = settings
        workers = None
        if settings.parse_processes:
            workers = partial(ParseWorkers, partial(make_ingestor, settings), settings.parse_processes)
        self.ingestor = make_ingestor(settings, workers)
        self.store = EventStore(settings, side_tables=IDENTITY_TABLES)
        self.resolver = load_resolver(self.store, settings)
        self.index = self.resolver.index
        self.projector = Projector(settings.duckdb_path, settings.as_of, settings.duckdb_memory) if project else None
        self.deadletter = deadletter if deadletter is not None else DeadLetterFile(settings.deadletter_path)
        self.conflicts: list[Rejected] = []  # of the batch being resolved

    def process(self, records: Iterable[Accepted | Rejected],
                progress: Callable[[int], None] | None = None) -> Summary:
        summary = Summary()
        started = time.perf_counter()
        pending = 0  # stored events the view has not been told about
        follower = ViewFollower(self.projector, self.store, self.settings.projection_batch) if self.projector else None
        try:
            for chunk in batched(records, self.settings.batch_size):
                pending += self.process_batch(chunk, summary)
                if follower is not None and pending >= self.settings.projection_batch:
                    follower.notify()
                    pending = 0
                if progress:
                    progress(len(chunk))
        except BaseException:
            if follower is not None:  # the view still takes in what was committed, and the thread ends
                try:
                    follower.finish()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
            raise
        if follower is not None:
            follower.finish()
        summary.seconds = time.perf_counter() - started
        return summary

    def process_batch(self, chunk: Sequence[Accepted | Rejected], summary: Summary,
                      committed: Callable[[Batch], None] | None = None) -> int:
        """Resolves and stores one chunk in one store transaction; returns the stored events.

        With several writers on one store (cdp/writers.py) this runs under their lock, after
        taking in what the others committed; `committed(batch)` runs after the commit, still under
        the lock. Should the commit still hit a uniqueness violation, every in-memory copy is
        reloaded from the store and the chunk resolved again, so nothing is lost or doubled."""
        accepted = []
        for record in chunk:
            if isinstance(record, Rejected):
                self.deadletter.write(record)
                summary.add_rejection(record.kind)
            else:
                accepted.append(record)
        self.deadletter.flush()
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            part = Summary()
            try:
                with self.store.exclusive():
                    take_in_changes(self.resolver, self.store.changed)
                    batch = self.resolve(accepted, part)
                    self.store.commit(batch)
                    if committed is not None:
                        committed(batch)
                break
            except Exception as error:
                self.reload()  # the copies may hold the failed batch's changes
                if not isinstance(error, IntegrityError) or attempt == COMMIT_ATTEMPTS:
                    raise
        summary.add(part)
        summary.stored_events += len(batch)
        for rejected in self.conflicts:  # after the commit: a retried batch must not write them twice
            self.deadletter.write(rejected)
            summary.add_rejection(rejected.kind)
        self.deadletter.flush()
        return len(batch)

    def resolve(self, records: Iterable[Accepted], summary: Summary) -> Batch:
        batch = self.store.begin()
        self.conflicts = []
        for record in records:
            if record.key in self.store.seen:
                first = self.store.seen.content(record.key)
                if first is not None and record.digest and first != record.digest:
                    self.conflicts.append(conflict(record, first))
                else:
                    summary.duplicates += 1
            else:
                self.record(batch, record, self.resolver.resolve(record), summary)
                self.store.mark_seen(batch, record.key, record.digest)
        batch.writes.extend(self.resolver.take_writes())
        return batch

    def reload(self) -> None:
        """Drops the in-memory copies and reads them again from the store."""
        self.store.load()
        self.resolver = load_resolver(self.store, self.settings)
        self.index = self.resolver.index

    def record(self, batch: Batch, record: Accepted, decision: Decision, summary: Summary) -> None:
        """The domain events one resolved record stands for."""
        store, customer = self.store, decision.customer_id
        summary.accepted += 1
        if decision.registered:
            store.append(batch, Customer.Registered, customer,
                         business_unit=record.business_unit, source_id=record.source_id)
            summary.new_customers += 1
        for absorbed, link in decision.merges:
            store.append(batch, Customer.Merged, customer, absorbed_id=absorbed, rule=link.rule,
                         evidence=link.evidence)
            store.append(batch, Customer.Absorbed, absorbed, survivor_id=customer)
            summary.merges += 1
        if decision.link is not None:
            store.append(batch, Customer.SourceLinked, customer, business_unit=record.business_unit,
                         source_id=record.source_id, rule=decision.link.rule, evidence=decision.link.evidence)
            summary.linked_sources += 1
        for suggestion in decision.suggestions:
            unit, source_id = split_key(suggestion.other_source_key)
            store.append(batch, Customer.MatchSuggested, customer, review_id=suggestion.review_id,
                         business_unit=record.business_unit, source_id=record.source_id,
                         other_business_unit=unit, other_source_id=source_id,
                         probability=suggestion.probability, evidence=suggestion.evidence)
            summary.suggestions += 1
        for kind, value, records, limit in decision.ignored:
            store.append(batch, Customer.IdentifierIgnored, customer, business_unit=record.business_unit,
                         source_id=record.source_id, kind=kind, value=value, records=records, limit=limit)
        store.append(batch, Customer.EventRecorded, customer,
                     event_id=record.event_id, event_source=record.source, event_type=record.type,
                     time=record.time, business_unit=record.business_unit, source_id=record.source_id,
                     profile=record.profile, data=record.data)

    def ingest(self, paths: Iterable[str], mapping=None, progress: Callable[[int], None] | None = None) -> Summary:
        paths = list(paths)
        self.ingestor.prepare(paths)
        return self.process(self.ingestor.read(paths, mapping), progress)

    def close(self) -> None:
        self.ingestor.close()
        self.deadletter.close()
        if self.projector is not None:
            self.projector.close()
        self.store.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
