"""Kafka topics of one test or one bench run, deleted when it ends."""
from __future__ import annotations

DELETE_CHUNK = 50  # topics per DeleteTopics request


def delete_topics(bootstrap: str, prefix: str) -> int:
    """Deletes the topics named with `prefix` (a test's or a bench run's own); returns how many.
    A broker outlives the runs that use it (scripts/services.sh keeps its data, a developer's
    CDP_KAFKA_BOOTSTRAP too): kept, the topics had grown to 6,400 partitions and 16 GB on one.
    Best effort: a broker a test stopped on purpose, or one gone away, keeps them."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    except KafkaError:
        return 0
    try:
        names = [name for name in admin.list_topics() if name.startswith(prefix)]
        for start in range(0, len(names), DELETE_CHUNK):
            admin.delete_topics(names[start:start + DELETE_CHUNK], timeout_ms=30_000)
        return len(names)
    except KafkaError:
        return 0
    finally:
        admin.close()
