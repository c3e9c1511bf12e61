"""`cdp ingest --kafka`: files in, events on `cdp.events` out (the workers do the rest).

Rejected inputs go to the same local dead-letter file as the embedded run, with the same reasons.
"""
from __future__ import annotations

import time
from pathlib import Path

from cdp import topics
from cdp.config import Settings
from cdp.summary import Summary
from ingest.deadletter import DeadLetterFile
from ingest.producer import Publisher
from ingest.ranges import Ranges
from ingest.validation import EventValidator


def publish_files(cfg: Settings, paths: list[str], mapping: Path | None) -> Summary:
    """Publishes every accepted event of `paths`; `summary.accepted` counts the events sent."""
    topics.ensure(cfg)
    summary = Summary()
    started = time.perf_counter()
    publisher = Publisher(cfg.require_kafka(), cfg.topic(topics.EVENTS), EventValidator(cfg.schemas_dir),
                          cfg.phone_region, cfg.max_event_bytes, Ranges(cfg.max_future, cfg.max_amount))
    with publisher, DeadLetterFile(cfg.deadletter_path) as deadletter:
        for rejected in publisher.publish_records(publisher.ingestor.read(paths, mapping)):
            deadletter.write(rejected)
            summary.add_rejection(rejected.kind)
    summary.accepted = publisher.sent
    summary.seconds = time.perf_counter() - started
    return summary
