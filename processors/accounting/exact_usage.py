"""Exact live usage of one key: what ClickHouse holds plus what is still on its way there.

The key's events are all in one partition (the producer keys by ``api_key_id`` with Kafka's default
partitioner). Everything below the sink group's committed offset, and below the highest offset
ClickHouse holds for that partition, is stored; call the larger of the two the split. ClickHouse is
asked for the key's units below the split (per-minute rollups, with raw rows only for minutes written
since the split; see `queries.stored_billable_units`) and Kafka is read from the split to its end, so no
event is counted twice or missed, even while the sink inserts in between, and raw retention changes nothing. (Right after a sink crash, until
it has replayed its interrupted batch, part of that batch can be missing from the count.)
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from ingest.events import EventError, decode
from processors.accounting import queries as usage_queries
from processors.accounting.store import UsageStore

_partitioner = DefaultPartitioner()


class ExactUsage:
    """Reads partition tails with one group-less consumer, one request at a time."""

    def __init__(self, bootstrap: str, topic: str, sink_group: str, *, max_read_s: float = 2.0) -> None:
        self._topic = topic
        self._sink_group = sink_group
        self._max_read_s = max_read_s
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._consumer.start()
        await self._admin.start()

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def billable_units(self, store: UsageStore, api_key_id: str, start: datetime, end: datetime) -> int:
        """Billable units of ``api_key_id``'s events with event time in ``[start, end)``, exactly: those
        ClickHouse holds below an offset of the key's partition, plus those on Kafka from that offset."""
        key = api_key_id.encode()
        async with self._lock:
            [description] = await self._admin.describe_topics([self._topic])
            ordered = sorted(p["partition"] for p in description["partitions"])
            if not ordered:  # no such topic: nothing on the way
                return await self._stored_units(store, api_key_id, start, end, partition=0, below_offset=2**63)
            tp = TopicPartition(self._topic, _partitioner(key, ordered, ordered))
            committed = await self._admin.list_consumer_group_offsets(self._sink_group, partitions=[tp])
            stored = await self._stored_end(store, tp.partition)
            begin = max(committed[tp].offset if tp in committed else 0, stored)
            stored_units = await self._stored_units(store, api_key_id, start, end, partition=tp.partition, below_offset=begin)
            end_offset = (await self._consumer.end_offsets([tp]))[tp]
            if begin >= end_offset:
                return stored_units
            self._consumer.assign([tp])
            self._consumer.seek(tp, begin)
            start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
            units = stored_units
            deadline = asyncio.get_running_loop().time() + self._max_read_s  # a sink far behind: stop, undercount
            while await self._consumer.position(tp) < end_offset and asyncio.get_running_loop().time() < deadline:
                batch = (await self._consumer.getmany(tp, timeout_ms=500)).get(tp, [])
                for record in batch:
                    if record.offset >= end_offset:
                        break
                    if record.key != key:
                        continue
                    try:
                        event = decode(record.value or b"")
                    except EventError:
                        continue
                    if not event.edge_blocked and start_ms <= event.event_time_ms < end_ms:
                        units += event.cost
            return units

    _stored_units = staticmethod(usage_queries.stored_billable_units)

    @staticmethod
    async def _stored_end(store: UsageStore, partition: int) -> int:
        [(highest, rows)] = await store.query(
            "SELECT max(top_offset), count() FROM usage_stored_offsets WHERE kafka_partition = {p:UInt16}", {"p": partition}
        )
        return int(highest) + 1 if rows else 0
