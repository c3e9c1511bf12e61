"""The platform's Kafka topics (ARCHITECTURE.md, public contracts) and their creation.

* `cdp.events`     everything subsidiaries publish, keyed by `business_unit:source_id`, so one
                   unit's record stays in order on one partition;
* `cdp.deadletter` rejected events with the reason (the dead-letter entry format of ingest);
* `cdp.profiles`   compacted changelog of unified profiles keyed by `customer_id`;
* `cdp.audiences`  compacted audience membership keyed by `audience:customer_id`: the entered
                   change's JSON (cdp/delivery.py) while a member, a tombstone once exited.

`ensure(settings)` creates whatever is missing (idempotent; several workers may race on it).
"""
from __future__ import annotations

from dataclasses import dataclass

from cdp.config import ConfigError, Settings

EVENTS, DEADLETTER, PROFILES, AUDIENCES = "cdp.events", "cdp.deadletter", "cdp.profiles", "cdp.audiences"
WEEK_MS = 7 * 24 * 3600 * 1000


class BrokerUnreachable(ConfigError):
    """No broker answered at CDP_KAFKA_BOOTSTRAP."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str]


def specs(settings: Settings) -> list[TopicSpec]:
    n = settings.kafka_partitions
    return [
        TopicSpec(settings.topic(EVENTS), n, {"retention.ms": str(WEEK_MS), "compression.type": "producer"}),
        TopicSpec(settings.topic(DEADLETTER), 1, {"retention.ms": str(4 * WEEK_MS)}),
        # a CRM that starts late still reads every customer's latest profile; a tombstone (null
        # value) for an erased customer is kept a day so that subscribers see it before it goes
        TopicSpec(settings.topic(PROFILES), n, {"cleanup.policy": "compact", "delete.retention.ms": "86400000",
                                               "min.cleanable.dirty.ratio": "0.1", "segment.ms": "3600000"}),
        # likewise: the latest value per key is who is in which audience now
        TopicSpec(settings.topic(AUDIENCES), n, {"cleanup.policy": "compact", "delete.retention.ms": "86400000",
                                                "min.cleanable.dirty.ratio": "0.1", "segment.ms": "3600000"}),
    ]


def ensure(settings: Settings, timeout_ms: int = 30000) -> list[str]:
    """Creates the missing topics; returns the names created."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    bootstrap = settings.require_kafka()
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="cdp-topics",
                                 request_timeout_ms=timeout_ms, bootstrap_timeout_ms=10000)
    except KafkaError as error:  # the cause stays: the worker tells it apart and waits for the broker
        raise BrokerUnreachable(f"CDP_KAFKA_BOOTSTRAP: no Kafka broker answers at {bootstrap} "
                                f"({type(error).__name__})") from error
    try:
        existing = set(admin.list_topics())
        created = []
        for spec in specs(settings):
            if spec.name in existing:
                continue
            try:
                admin.create_topics({spec.name: {"num_partitions": spec.partitions, "replication_factor": 1,
                                                 "configs": spec.configs}},
                                    timeout_ms=timeout_ms, wait_for_metadata=True)
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another process made it in between
        return created
    finally:
        admin.close()
