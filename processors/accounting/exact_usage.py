"""Exact live usage of one key: what ClickHouse holds plus what is still on its way there.

The key's events are all in one partition (the producer keys by ``api_key_id`` with Kafka's default
partitioner). Everything below the sink group's committed offset, and below the highest offset
ClickHouse holds for that partition, is stored; call the larger of the two the split. ClickHouse is
asked for the key's units below the split (per-minute rollups, with raw rows only for minutes written
since the split; see `queries.stored_billable_units`), and the records from the split to the
partition's end offset are looked up in the `TailFollower`, which reads the topic as it grows; so no
event is counted twice or missed, even while the sink inserts in between, and raw retention changes
nothing. (Right after a sink crash, until it has replayed its interrupted batch, part of that batch
can be missing from the count.)
"""

from __future__ import annotations

from datetime import datetime

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from processors.accounting import queries as usage_queries
from processors.accounting.store import UsageStore
from processors.accounting.tail import TailFollower

_partitioner = DefaultPartitioner()


class ExactUsage:
    """Answers any number of reads at once; the tail is read once for all of them."""

    def __init__(self, bootstrap: str, topic: str, sink_group: str, *, max_read_s: float = 2.0) -> None:
        self._topic = topic
        self._sink_group = sink_group
        self._max_read_s = max_read_s
        self._tail = TailFollower(bootstrap, topic, sink_group)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)

    async def start(self) -> None:
        await self._admin.start()
        await self._tail.start()

    async def stop(self) -> None:
        await self._tail.stop()
        await self._admin.close()

    async def billable_units(self, store: UsageStore, api_key_id: str, start: datetime, end: datetime) -> int:
        """Billable units of ``api_key_id``'s events with event time in ``[start, end)``, exactly: those
        ClickHouse holds below an offset of the key's partition, plus those on Kafka from that offset."""
        key = api_key_id.encode()
        if not self._tail.partitions:
            await self._tail.follow()  # the topic may have been made since
        partitions = self._tail.partitions
        if not partitions:  # no such topic yet: nothing on the way
            return await self._stored_units(store, api_key_id, start, end, partition=0, below_offset=2**63)
        partition = _partitioner(key, partitions, partitions)
        tp = TopicPartition(self._topic, partition)
        end_offset = await self._tail.end_offset(partition)  # before the split: whatever is stored meanwhile is below it
        committed = await self._admin.list_consumer_group_offsets(self._sink_group, partitions=[tp])
        stored = await self._stored_end(store, partition)
        begin = max(committed[tp].offset if tp in committed else 0, stored)
        units = await self._stored_units(store, api_key_id, start, end, partition=partition, below_offset=begin)
        if begin < end_offset:
            start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
            units += await self._tail.billable_units(
                partition, key, begin, end_offset, start_ms, end_ms, wait_s=self._max_read_s
            )
        return units

    _stored_units = staticmethod(usage_queries.stored_billable_units)

    @staticmethod
    async def _stored_end(store: UsageStore, partition: int) -> int:
        [(highest, rows)] = await store.query(
            "SELECT max(top_offset), count() FROM usage_stored_offsets WHERE kafka_partition = {p:UInt16}", {"p": partition}
        )
        return int(highest) + 1 if rows else 0
