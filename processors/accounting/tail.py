"""The events on their way to ClickHouse, followed as they are written.

A plan-quota read needs the key's units that the sink has not stored yet: the records of the key's
partition from the split offset to the end. Reading them from Kafka on every call costs a read of every
key's records in that range (tens of milliseconds at tens of thousands of events a second); the
follower reads the topic once, as it grows, and keeps each key's records of the unstored tail in
memory, so a read looks up its key. Records are decoded only when their key is asked for.

The follower starts at the sink group's committed offsets (never past what is stored) and drops what
lies below the split as the sink stores it. It holds at most ``max_records``; past that it drops the
oldest, and a read reaching below what it holds comes out short by those (as a read of a very long
tail did before).
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ingest.events import EventError, decode

log = logging.getLogger(__name__)

_TRIM_EVERY_S = 5.0
_RETRY_S = 1.0


class KeyTail:
    """One partition's records from some offset on, by key: offsets and the encoded events, in order."""

    def __init__(self) -> None:
        self._by_key: dict[bytes, tuple[list[int], list[bytes]]] = {}
        self.records = 0
        self.lowest = 0
        """No record below this offset is held (dropped, or before the follower started)."""

    def add(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        for record in records:
            if record.key is None or record.value is None:
                continue  # not an event a gateway sent
            offsets, values = self._by_key.setdefault(record.key, ([], []))
            offsets.append(record.offset)
            values.append(record.value)
            self.records += 1

    def billable_units(self, key: bytes, from_offset: int, start_ms: int, end_ms: int) -> int:
        """Units of ``key``'s billable events at ``from_offset`` or later, with event time in ``[start_ms, end_ms)``."""
        held = self._by_key.get(key)
        if held is None:
            return 0
        offsets, values = held
        units = 0
        for value in values[bisect_left(offsets, from_offset) :]:
            try:
                event = decode(value)
            except EventError:
                continue  # not stored by the sink either
            if not event.edge_blocked and start_ms <= event.event_time_ms < end_ms:
                units += event.cost
        return units

    def drop_below(self, offset: int) -> None:
        """Forget the records below ``offset`` (stored by now)."""
        if offset <= self.lowest:
            return
        self.lowest = offset
        for key, (offsets, values) in list(self._by_key.items()):
            cut = bisect_left(offsets, offset)
            if cut == len(offsets):
                del self._by_key[key]
            elif cut:
                del offsets[:cut], values[:cut]
            self.records -= cut


class TailFollower:
    """Follows every partition of the events topic from the sink's committed offsets."""

    def __init__(self, bootstrap: str, topic: str, sink_group: str, *, max_records: int = 2_000_000) -> None:
        self._topic = topic
        self._sink_group = sink_group
        self._max_records = max_records
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._tails: dict[int, KeyTail] = {}
        self._positions: dict[int, int] = {}
        self._advanced = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()

    @property
    def partitions(self) -> list[int]:
        return sorted(self._tails)

    async def start(self) -> None:
        """Connect; following starts with `follow` (the first read), so a process that never reads pays nothing."""
        await self._consumer.start()
        await self._admin.start()

    async def follow(self) -> None:
        """Start following the topic's partitions, if it has any yet (a no-op once following)."""
        async with self._starting:  # two first reads at once start one follower
            if self._task is not None:
                return
            [description] = await self._admin.describe_topics([self._topic])  # no partitions if not made yet
            tps = [TopicPartition(self._topic, p["partition"]) for p in description["partitions"]]
            if not tps:
                return
            self._consumer.assign(tps)
            committed = await self._admin.list_consumer_group_offsets(self._sink_group, partitions=tps)
            for tp in tps:
                offset = committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0
                self._consumer.seek(tp, offset)
                self._tails[tp.partition] = KeyTail()
                self._tails[tp.partition].lowest = offset
                self._positions[tp.partition] = offset
            self._task = asyncio.create_task(self._follow(), name="tail-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()
        await self._admin.close()

    async def end_offset(self, partition: int) -> int:
        tp = TopicPartition(self._topic, partition)
        return int((await self._consumer.end_offsets([tp]))[tp])

    async def billable_units(
        self, partition: int, key: bytes, from_offset: int, until_offset: int, start_ms: int, end_ms: int, *, wait_s: float
    ) -> int | None:
        """Units of ``key``'s events in ``[from_offset, until_offset)``, once the follower has read that far
        (at most ``wait_s``: then what it has read); None if it no longer holds ``from_offset`` (dropped
        as stored since: read the split again)."""
        async with self._advanced:
            try:
                await asyncio.wait_for(self._advanced.wait_for(lambda: self._positions[partition] >= until_offset), wait_s)
            except TimeoutError:
                log.warning("the usage tail is behind; counting what it has read", extra={"partition": partition})
        tail = self._tails[partition]
        if from_offset < tail.lowest:
            return None
        return tail.billable_units(key, from_offset, start_ms, end_ms)

    async def _follow(self) -> None:
        tps = [TopicPartition(self._topic, p) for p in self._tails]
        per_partition = max(self._max_records // len(tps), 1)
        stored: dict[int, int] = {}
        next_trim = asyncio.get_running_loop().time() + _TRIM_EVERY_S
        while True:
            try:
                fetched = await self._consumer.getmany(timeout_ms=200, max_records=1_000)  # a few ms of the loop at a time
                for tp, records in fetched.items():
                    tail = self._tails[tp.partition]
                    tail.add(records)
                    self._positions[tp.partition] = await self._consumer.position(tp)
                    if tail.records > per_partition:
                        log.warning("the usage tail is too long; dropping its oldest records", extra={"partition": tp.partition})
                        tail.drop_below(records[-1].offset - per_partition // 2)
                if fetched:
                    async with self._advanced:
                        self._advanced.notify_all()
                if asyncio.get_running_loop().time() >= next_trim:
                    # Drop what the sink had committed at the previous round: a read since has a split at least as
                    # high, and one that began before and is still running reads its split again.
                    for partition, offset in stored.items():
                        self._tails[partition].drop_below(offset)
                    committed = await self._admin.list_consumer_group_offsets(self._sink_group, partitions=tps)
                    stored = {tp.partition: meta.offset for tp, meta in committed.items() if meta.offset >= 0}
                    next_trim = asyncio.get_running_loop().time() + _TRIM_EVERY_S
            except KafkaError as exc:  # the clients reconnect by themselves; keep following
                log.warning("the usage tail could not read Kafka; trying again", extra={"error": repr(exc)})
                await asyncio.sleep(_RETRY_S)
