"""Exact live usage of one key: what ClickHouse holds plus what is still on its way there.

The key's events are all in one partition (the producer keys by ``api_key_id`` with Kafka's default
partitioner). Everything below the sink group's committed offset is stored, in every table (the sink
commits after its insert has returned); call it the split. ClickHouse is asked for the key's units
below the split (per-minute rollups, with raw rows for minutes that also hold events stored above
it; see `queries.stored_billable_units`), and the records from the split to the partition's end
offset, stored or not, are looked up in the `TailFollower`, which reads the topic as it grows. So no
event is counted twice or missed, even while the sink inserts in between, and raw retention changes
nothing. The split is read before the end offset, so whatever arrives meanwhile lies past the end.

A partition added to the topic after the first read is not seen until the process restarts.
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
_ATTEMPTS = 3


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
        start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
        for _ in range(_ATTEMPTS):
            committed = await self._admin.list_consumer_group_offsets(self._sink_group, partitions=[tp])
            split = max(committed[tp].offset, 0) if tp in committed else 0
            end_offset = await self._tail.end_offset(partition)
            units = await self._stored_units(store, api_key_id, start, end, partition=partition, below_offset=split)
            if split >= end_offset:
                return units
            tail = await self._tail.billable_units(partition, key, split, end_offset, start_ms, end_ms, wait_s=self._max_read_s)
            if tail is not None:
                return units + tail
            # This read took so long that the follower has dropped records it needed (stored since): again.
        raise TailMovedError(f"the usage tail moved past {_ATTEMPTS} reads of {api_key_id}'s usage in a row")

    _stored_units = staticmethod(usage_queries.stored_billable_units)


class TailMovedError(RuntimeError):
    """Reads kept taking longer than the follower keeps what they need (a ClickHouse far too slow)."""
