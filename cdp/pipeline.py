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
from typing import Callable, Iterable, Iterator

from cdp.config import Settings
from cdp.domain import Customer
from cdp.store import Batch, EventStore
from identity.index import SELECT_KEYS, SELECT_REDIRECTS, TABLES as IDENTITY_TABLES, IdentityIndex
from identity.resolver import Decision, Resolver
from ingest.deadletter import DeadLetterFile
from ingest.parallel import ParseWorkers
from ingest.records import Accepted, Rejected
from ingest.stage import Ingestor
from ingest.validation import EventValidator
from projections.follower import ViewFollower
from projections.projector import Projector


@dataclass
class Summary:
    """What one run did, for the CLI's closing summary."""

    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    new_customers: int = 0
    linked_sources: int = 0
    merges: int = 0
    stored_events: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def read(self) -> int:
        return self.accepted + self.rejected + self.duplicates

    def add_rejection(self, kind: str) -> None:
        self.rejected += 1
        self.reasons[kind] = self.reasons.get(kind, 0) + 1


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def make_ingestor(settings: Settings) -> Ingestor:
    return Ingestor(EventValidator(settings.schemas_dir), settings.phone_region, settings.max_event_bytes)


class Pipeline:
    def __init__(self, settings: Settings, project: bool = True):
        self.settings = settings
        workers = None
        if settings.parse_processes:
            workers = partial(ParseWorkers, partial(make_ingestor, settings), settings.parse_processes)
        self.ingestor = Ingestor(EventValidator(settings.schemas_dir), settings.phone_region,
                                 settings.max_event_bytes, workers)
        self.store = EventStore(settings, side_tables=IDENTITY_TABLES)
        self.index = IdentityIndex(self.store.query(SELECT_KEYS), self.store.query(SELECT_REDIRECTS))
        self.resolver = Resolver(self.index)
        self.projector = Projector(settings.duckdb_path, settings.as_of) if project else None
        self.deadletter = DeadLetterFile(settings.deadletter_path)

    def process(self, records: Iterable[Accepted | Rejected],
                progress: Callable[[int], None] | None = None) -> Summary:
        summary = Summary()
        started = time.perf_counter()
        pending = 0  # stored events the view has not been told about
        follower = ViewFollower(self.projector, self.store, self.settings.projection_batch) if self.projector else None
        for chunk in batched(records, self.settings.batch_size):
            batch = self.store.begin()
            for record in chunk:
                if isinstance(record, Rejected):
                    self.deadletter.write(record)
                    summary.add_rejection(record.kind)
                elif record.key in self.store.seen:
                    summary.duplicates += 1
                else:
                    self.record(batch, record, self.resolver.resolve(record), summary)
                    self.store.mark_seen(batch, record.key)
            batch.writes.extend(self.index.take_writes())
            self.deadletter.flush()
            self.store.commit(batch)
            summary.stored_events += len(batch)
            pending += len(batch)
            if follower is not None and pending >= self.settings.projection_batch:
                follower.notify()
                pending = 0
            if progress:
                progress(len(chunk))
        if follower is not None:
            follower.finish()
        summary.seconds = time.perf_counter() - started
        return summary

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
