"""The embedded pipeline: ingest → identity → event store → projections, in one process.

It wires the stages and adds no write of its own: records are parsed by the ingestor, rejected
ones go to the dead-letter, accepted ones go to the application's `ingest` command in batches
(one store transaction each, cdp/application.py), and the projector follows the store into the
DuckDB view. The Kafka worker runs the same `process_batch` on records it reads from the broker,
so the two modes share every stage after the transport.
"""
from __future__ import annotations

import time
from functools import partial
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

from cdp.application import CustomerApplication
from cdp.config import Settings
from cdp.erasure import finish_unfinished, rewrite_view_if_pending
from cdp.viewwriter import make_projector
from cdp.store import Batch
from cdp.summary import SUPPRESSED, Summary
from identity.resolver import source_key
from ingest.deadletter import DeadLetterFile
from ingest.identifiers import identifiers_in
from ingest.parallel import ParseWorkers
from ingest.ranges import Ranges
from ingest.records import Accepted, Rejected
from ingest.segment import anonymous_source
from ingest.stage import Ingestor
from ingest.validation import EventValidator
from projections.follower import ViewFollower


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def visitor_links(record: Accepted) -> list[tuple[str, list[str]]]:
    """(user, [visitor …]) source keys an event says are one person: an identify naming the
    visitor's `properties.anonymous_id`, an alias naming its `previous_id` (an anonymous id or an
    older userId: both are candidates). Carried in the event itself, so the embedded server and
    the Kafka workers stitch alike."""
    properties = record.data.get("properties")
    if record.type not in ("cdp.identify", "cdp.alias") or not isinstance(properties, dict):
        return []
    earlier = properties.get("anonymous_id" if record.type == "cdp.identify" else "previous_id")
    if not earlier:
        return []
    candidates = [anonymous_source(earlier)] + ([str(earlier)] if record.type == "cdp.alias" else [])
    visitors = [source_key(record.business_unit, c) for c in candidates if c != record.source_id]
    return [(source_key(record.business_unit, record.source_id), visitors)] if visitors else []


def suppressed_entry(source: str | None, event_id: str | None, origin: str = "erasure", **extra: str) -> Rejected:
    """The dead-letter's entry for an erased person's event: which one, never what it held."""
    return Rejected(reason=SUPPRESSED, origin=origin, kind=SUPPRESSED, event_id=event_id, source=source,
                    extra=extra)


def screened(app: CustomerApplication, settings: Settings, rejected: Rejected,
             carries_erased: Callable[[Iterable[tuple[str, str]]], bool] | None = None) -> Rejected:
    """What the dead-letter keeps of a rejected input: the input itself, unless it carries an
    erased person's identifier (anywhere in it, even malformed); that one is suppressed like the
    person's valid events, its id kept and never what it held, which would put them back on disk.
    `carries_erased`: the check to use (CustomerApplication.erased_screen), else the application's."""
    found = identifiers_in(rejected.raw, settings.phone_region,
                           {settings.default_phone_region, *settings.phone_regions.values()})
    if (carries_erased or app.carries_erased)(found):
        return suppressed_entry(rejected.source, rejected.event_id, rejected.origin, rejected_as=rejected.kind)
    return rejected


def make_ingestor(settings: Settings, parse_workers: Callable[[], ParseWorkers] | None = None) -> Ingestor:
    return Ingestor(EventValidator(settings.schemas_dir), settings.phone_region, settings.max_event_bytes,
                    parse_workers, Ranges(settings.max_future, settings.max_amount))


class Pipeline:
    """`deadletter` is where rejected records go (default: the JSONL file in CDP_HOME); anything
    with `write(Rejected)`, `flush()` and `close()` will do, e.g. the worker's Kafka topic.
    `app` is the command layer: callers commit through its methods only."""

    def __init__(self, settings: Settings, project: bool = True, deadletter: Any = None):
        self.settings = settings
        workers = None
        if settings.parse_processes:
            workers = partial(ParseWorkers, partial(make_ingestor, settings), settings.parse_processes)
        self.ingestor = make_ingestor(settings, workers)
        if project:  # the view this pipeline projects into: first what an erasure stopped part-way left
            finish_unfinished(settings)
        self.app = CustomerApplication(settings)
        self.projector = make_projector(settings) if project else None
        self.deadletter = deadletter if deadletter is not None else DeadLetterFile(settings.deadletter_path, settings.deadletter_retention)

    def process(self, records: Iterable[Accepted | Rejected],
                progress: Callable[[int], None] | None = None) -> Summary:
        summary = Summary()
        started = time.perf_counter()
        pending = 0  # stored events the view has not been told about
        follower = ViewFollower(self.projector, self.app, self.settings.projection_batch) if self.projector else None
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
        outcome = self.app.retrain_if_due()
        if outcome is not None:
            summary.retrained = outcome.describe()
            self.catch_up()
        summary.seconds = time.perf_counter() - started
        return summary

    def process_batch(self, chunk: Sequence[Accepted | Rejected], summary: Summary,
                      committed: Callable[[Batch], None] | None = None) -> int:
        """Hands the accepted records to the `ingest` command (one store transaction) and
        dead-letters the rejected ones; returns the stored events. `committed(batch)` runs after
        the commit, under the writers' lock. The rejected are written after the commit, which
        brought this process's suppressed identifiers up to date (`_dead_letter`)."""
        accepted = [record for record in chunk if not isinstance(record, Rejected)]
        part = self.app.ingest(accepted, committed)
        for user, visitors in (link for record in accepted for link in visitor_links(record)):
            self.app.merge_visitor(user, visitors)  # after the batch: the visitor's events may be in it
        for record in chunk:
            if isinstance(record, Rejected):
                self._dead_letter(record, summary)
        for source, event_id in part.suppressed_events:  # an erased person's: the id, never the input
            self.deadletter.write(suppressed_entry(source, event_id))
        summary.add(part)
        for rejected in part.conflicts:  # refused by the command: a re-sent id with other content
            self.deadletter.write(rejected)
            summary.add_rejection(rejected.kind)
        self.deadletter.flush()
        return part.stored_events

    def _dead_letter(self, rejected: Rejected, summary: Summary) -> None:
        entry = screened(self.app, self.settings, rejected)
        self.deadletter.write(entry)
        summary.add_dead_letter(entry)

    def catch_up(self, score: bool = True) -> int:
        """Brings the view up to what the store holds (after a command); returns the events applied."""
        if self.projector is None:
            return 0
        return self.projector.catch_up(self.app, self.settings.projection_batch, score=score)

    def ingest(self, paths: Iterable[str], mapping=None, progress: Callable[[int], None] | None = None) -> Summary:
        paths = list(paths)
        self.ingestor.prepare(paths)
        return self.process(self.ingestor.read(paths, mapping), progress)

    def close(self) -> None:
        self.ingestor.close()
        self.deadletter.close()
        if self.projector is not None:
            self.projector.close()
            rewrite_view_if_pending(self.settings)  # an erasure the view took in (e.g. another machine's)
        self.app.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
