"""The real services answer: a round trip through the Kafka broker and one through PostgreSQL."""
from __future__ import annotations

import time

import pytest


@pytest.mark.kafka
def test_kafka_round_trip(kafka_bootstrap: str, fresh_topic_prefix: str) -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
    from kafka.admin import NewTopic

    topic = f"{fresh_topic_prefix}roundtrip"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="test-services")
    try:
        admin.create_topics([NewTopic(name=topic, num_partitions=4, replication_factor=1)])
        sent = {f"key-{i:03d}": f"value-{i}" for i in range(100)}

        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", retries=5)
        try:
            futures = [producer.send(topic, key=k.encode(), value=v.encode()) for k, v in sent.items()]
            producer.flush(timeout=30)
            partitions = {f.get(timeout=30).partition for f in futures}
        finally:
            producer.close(timeout=10)
        assert len(partitions) > 1, "100 keys should spread over the topic's 4 partitions"

        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=f"{fresh_topic_prefix}group",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        received: dict[str, str] = {}
        try:
            deadline = time.monotonic() + 60
            while len(received) < len(sent) and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=1000).values():
                    for record in records:
                        received[record.key.decode()] = record.value.decode()
            consumer.commit()
        finally:
            consumer.close()
        assert received == sent
    finally:
        admin.close()  # the topic goes with the fixture's prefix


@pytest.mark.postgres
def test_postgres_round_trip(fresh_postgres_dsn: str) -> None:
    import psycopg

    with psycopg.connect(fresh_postgres_dsn) as conn:
        assert conn.execute("select current_database()").fetchone()[0] != "cdp"
        conn.execute("create table customer (id int primary key, email text not null)")
        conn.cursor().executemany(
            "insert into customer (id, email) values (%s, %s)",
            [(i, f"user{i}@example.com") for i in range(1, 11)],
        )
        conn.commit()
        rows = conn.execute("select id, email from customer order by id").fetchall()
    assert rows == [(i, f"user{i}@example.com") for i in range(1, 11)]
