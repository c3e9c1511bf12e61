"""The workers' consumer group as the broker sees it: committed offsets (and whose store they
belong to), the lag behind the end of `cdp.events`, and resetting the group.

The lag is the group's, from the offsets committed on the broker, not this process's own counts:
it is what an operator's `kafka-consumer-groups --describe` shows, and it is right after a restart.
"""
from __future__ import annotations

from typing import Any

from cdp import store_identity, topics
from cdp.config import Settings
from cdp.faults import StoreMismatch

TIMEOUT_MS = 5000


class ConsumerGroup:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bootstrap = settings.require_kafka()
        self.group = settings.topic(settings.worker_group)
        self.topic = settings.topic(topics.EVENTS)
        self._admin: Any = None
        self._consumer: Any = None

    def _clients(self) -> tuple[Any, Any]:
        from kafka import KafkaAdminClient, KafkaConsumer

        if self._admin is None:
            self._admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="cdp-group",
                                           request_timeout_ms=TIMEOUT_MS, bootstrap_timeout_ms=TIMEOUT_MS)
        if self._consumer is None:  # no group: only asks for end offsets
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, client_id="cdp-group",
                                           request_timeout_ms=TIMEOUT_MS + 1000, enable_auto_commit=False,
                                           bootstrap_timeout_ms=TIMEOUT_MS)
        return self._admin, self._consumer

    def committed(self) -> dict[Any, Any]:
        """TopicPartition -> OffsetAndMetadata of the group on cdp.events (only committed ones)."""
        admin, _ = self._clients()
        if hasattr(admin, "list_group_offsets"):  # kafka-python 3
            offsets = admin.list_group_offsets({self.group: None}).get(self.group, {})
        else:
            offsets = admin.list_consumer_group_offsets(self.group)
        return {tp: om for tp, om in offsets.items() if tp.topic == self.topic and om.offset >= 0}

    def lag(self) -> int:
        """Messages on cdp.events after the group's committed offsets, over every partition."""
        from kafka import TopicPartition

        admin, consumer = self._clients()
        partitions = [TopicPartition(self.topic, p) for p in sorted(consumer.partitions_for_topic(self.topic) or ())]
        if not partitions:
            return 0
        ends = consumer.end_offsets(partitions)
        starts = consumer.beginning_offsets(partitions)
        committed = self.committed()
        return sum(max(ends[tp] - (committed[tp].offset if tp in committed else starts[tp]), 0) for tp in partitions)

    def check_owner(self, store_id: str, store_where: str, store_is_empty: bool) -> None:
        """Refuses a group whose offsets were committed for another store: starting there would
        skip every event before them. Offsets without a store id (older workers) are accepted
        unless the store is empty, which then means the store was replaced."""
        committed = self.committed()
        if not committed:
            return
        owners = {store_identity.owner(om.metadata) for om in committed.values()}
        foreign = {o for o in owners if o is not None and o != store_id}
        if foreign or (owners == {None} and store_is_empty):
            other = f"store {sorted(foreign)[0]}" if foreign else "a store it did not record"
            raise StoreMismatch(
                f"consumer group {self.group} has offsets on {self.topic} committed for {other}, not for the "
                f"event store at {store_where} (store {store_id}): the events before those offsets are not in "
                f"this store. Stop every worker of the group, then reset it: `cdp worker --reset-group` or "
                f"`kafka-consumer-groups.sh --bootstrap-server {self.bootstrap} --group {self.group} "
                f"--topic {self.topic} --reset-offsets --to-earliest --execute`")

    def reset(self) -> None:
        """Forgets the group's offsets (the next worker reads cdp.events from the start); the group
        must have no running member."""
        admin, _ = self._clients()
        if hasattr(admin, "delete_groups"):
            result = admin.delete_groups([self.group])
        else:
            result = admin.delete_consumer_groups([self.group])
        for item in (result.items() if isinstance(result, dict) else result or ()):
            error = item[1]
            if error is not None and getattr(error, "errno", 0) not in (0, 69):  # 69: the group does not exist
                raise StoreMismatch(f"cannot reset consumer group {self.group} ({getattr(error, 'message', error)}): "
                                    "stop every worker of the group first")

    def close(self) -> None:
        for client in (self._admin, self._consumer):
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing after an outage
                    pass
        self._admin = self._consumer = None
