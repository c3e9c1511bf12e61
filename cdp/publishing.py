"""`cdp ingest --kafka`: files in, events on `cdp.events` out (the workers do the rest).

Rejected inputs go to the same local dead-letter file as the embedded run, with the same reasons.
Where this machine holds the store, an erased person's events are not published, and their
rejected inputs are kept as ids alone, as the embedded run and the workers keep them
(`ErasedScreen`): a re-sent old export does not put them back in the raw topic either.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from cdp import topics
from cdp.config import Settings
from cdp.summary import SUPPRESSED, Summary
from ingest.deadletter import DeadLetterFile
from ingest.producer import Publisher
from ingest.ranges import Ranges
from ingest.records import Accepted, Rejected
from ingest.validation import EventValidator


def publish_files(cfg: Settings, paths: list[str], mapping: Path | None) -> tuple[Summary, str | None]:
    """Publishes every accepted event of `paths`; `summary.accepted` counts the events sent. With
    the summary, why the rejects were kept whole although this machine holds the store (it was
    out of reach: ErasedScreen), or None."""
    topics.ensure(cfg)
    summary = Summary()
    started = time.perf_counter()
    publisher = Publisher(cfg.require_kafka(), cfg.topic(topics.EVENTS), EventValidator(cfg.schemas_dir),
                          cfg.phone_region, cfg.max_event_bytes, Ranges(cfg.max_future, cfg.max_amount))
    with publisher, DeadLetterFile(cfg.deadletter_path, cfg.deadletter_retention) as deadletter, ErasedScreen(cfg) as screen:
        for rejected in publisher.publish_records(screen.records(publisher.ingestor.read(paths, mapping))):
            entry = screen(rejected)
            deadletter.write(entry)
            summary.add_dead_letter(entry)
    summary.accepted = publisher.sent
    summary.seconds = time.perf_counter() - started
    return summary, screen.unscreened


class ErasedScreen:
    """An erased person's events are not published but dead-lettered as `suppressed`, their ids
    alone; what the dead-letter keeps of a rejected input is screened likewise (cdp.pipeline.screened):
    as the embedded run and the workers do. That needs the store's keyed hashes of erased
    identifiers and the master key, so it screens where this machine holds the store
    (CDP_EVENT_STORE, or the SQLite file with its master key), opened at the first record; a
    unit's machine that only publishes has neither, and opening the store there would make both."""

    def __init__(self, cfg: Settings):
        self.cfg = cfg
        self.app: Any = None
        self.erased: Callable[[Iterable[tuple[str, str]]], bool] | None = None  # CustomerApplication.erased_screen
        self.unscreened: str | None = None  # why the store could not be opened: nothing screened

    def holds_store(self) -> bool:
        cfg = self.cfg
        return bool(cfg.event_store) or (cfg.sqlite_path.exists() and bool(cfg.master_key or cfg.master_key_path.exists()))

    def opened(self) -> bool:
        """Opens the store at the first record, where this machine holds one; False if it does
        not, or it is out of reach (then publishing goes on unscreened, and says so)."""
        if self.app is None and self.unscreened is None and self.holds_store():
            from cdp import faults
            from cdp.application import CustomerApplication

            app = None
            try:
                app = CustomerApplication(self.cfg)
                self.erased, self.app = app.erased_screen(), app
            except Exception as error:  # noqa: BLE001 - publishing goes on without the store (an outage)
                if app is not None:
                    app.close()
                fault = faults.describe(error, self.cfg)
                if not fault.transient:
                    raise
                self.unscreened = fault.line
        return self.app is not None

    def records(self, records: Iterable[Accepted | Rejected]) -> Iterator[Accepted | Rejected]:
        """The records to publish: an erased person's accepted ones become suppressed rejects."""
        from cdp.application import record_identifiers
        from cdp.pipeline import suppressed_entry

        for record in records:
            if isinstance(record, Accepted) and self.opened() and self.erased(record_identifiers(record)):
                yield suppressed_entry(record.source, record.event_id)
            else:
                yield record

    def __call__(self, rejected: Rejected) -> Rejected:
        if rejected.kind == SUPPRESSED or not self.opened():
            return rejected
        from cdp.pipeline import screened

        return screened(self.app, self.cfg, rejected, self.erased)

    def __enter__(self) -> "ErasedScreen":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.app is not None:
            self.app.close()
