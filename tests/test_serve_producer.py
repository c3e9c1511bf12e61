"""`cdp serve`'s librdkafka producer (cdp/server/producer.py) on the real broker: a key lands on the
partition kafka-python puts it on (the publisher of `cdp ingest --kafka` and the clients units
use), so one unit's records stay in order on one partition whichever producer sent them; and a
record the broker refuses fails its future and the next flush, never passing for published."""
from __future__ import annotations

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from cdp.server.producer import AckedProducer, DeliveryFailed

pytestmark = pytest.mark.kafka


def test_keys_land_where_kafka_python_puts_them(kafka_bootstrap: str, fresh_topic_prefix: str) -> None:
    topic = f"{fresh_topic_prefix}placement"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])
    admin.close()
    keys = [f"shop:P{i}-{i % 7}".encode() for i in range(60)]
    ours = AckedProducer(kafka_bootstrap, "test-serve")
    theirs = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        acks = [ours.send(topic, key=key, value=b"librdkafka") for key in keys]
        for ack in acks:
            ack.result(timeout=30)
        for key in keys:
            theirs.send(topic, key=key, value=b"kafka-python").get(timeout=30)
    finally:
        ours.close()
        theirs.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=5000)
    placed: dict[bytes, dict[bytes, int]] = {b"librdkafka": {}, b"kafka-python": {}}
    for record in consumer:
        placed[record.value][record.key] = record.partition
    consumer.close()
    assert len(placed[b"librdkafka"]) == len(keys)
    assert placed[b"librdkafka"] == placed[b"kafka-python"]
    assert len(set(placed[b"librdkafka"].values())) > 1  # spread, not all on one partition


def test_a_refused_record_fails_its_future_and_the_flush(kafka_bootstrap: str, fresh_topic_prefix: str) -> None:
    topic = f"{fresh_topic_prefix}refused"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1,
                                  topic_configs={"max.message.bytes": "2000"})])
    admin.close()
    producer = AckedProducer(kafka_bootstrap, "test-serve")
    try:
        assert producer.send(topic, key=b"k", value=b"small").result(timeout=30) == (0, 0)  # (partition, offset)
        refused = producer.send(topic, key=b"k", value=b"x" * 10_000)
        with pytest.raises(DeliveryFailed):
            producer.flush(timeout=30)
        with pytest.raises(DeliveryFailed, match="MSG_SIZE_TOO_LARGE"):
            refused.result(timeout=1)
        assert producer.send(topic, key=b"k", value=b"again").result(timeout=30) == (0, 1)  # the refused one took none
        producer.flush(timeout=30)  # the failure was reported once; nothing fails now
    finally:
        producer.close()
