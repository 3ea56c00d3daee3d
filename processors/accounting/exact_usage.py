"""A key's plan usage, exact and live: what ClickHouse holds plus what is still on its way there.

A key's plan month is read from the `PlanLedger`, which holds every key's units per month of the plan's
time zone. It is loaded at the sink group's committed offsets (below them every table holds every
event; see `ledger`) and a `RollupFollower` feeds it the sums the sink publishes for every batch from
those offsets on (`rollups`). So no event is counted twice or missed, even while the sink inserts, and
raw retention changes nothing; and a read is a dictionary lookup, whatever the history. Events count
once the sink has cut their batch (within ``sink_flush_interval_s``, 1 s by default), whether it has
stored them yet or not.

A partition added to the topic after the ledger was loaded is not followed until the process restarts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from throttlex.ingest.kafka_access import KafkaAccess
from throttlex.processors.topics import ensure_topics

from throttlex.processors.accounting.ledger import HOUR_MS, MINUTE_MS, PlanLedger, month_around
from throttlex.processors.accounting import rollups
from throttlex.processors.accounting.rollups import read_metadata
from throttlex.processors.accounting.store import UsageStore
from throttlex.processors.accounting.tail import RollupFollower

log = logging.getLogger(__name__)

_partitioner = DefaultPartitioner()


@dataclass(frozen=True)
class PlanUsage:
    month_start: datetime
    month_end: datetime
    month_units: int
    last_hour_units: int


class ExactUsage:
    """Answers any number of reads at once, from one ledger and one follower (started by the first read,
    or by `prepare`)."""

    def __init__(self, kafka: KafkaAccess | str, topic: str, sink_group: str, *, replication_factor: int = 1) -> None:
        self._kafka = KafkaAccess.of(kafka)
        self._topic = topic
        self._sink_group = sink_group
        self._rollups_topic = rollups.topic_of(topic)
        self._replication_factor = replication_factor
        self._admin = AIOKafkaAdminClient(**self._kafka.aiokafka_options())
        self._offsets = AIOKafkaConsumer(**self._kafka.aiokafka_options(), enable_auto_commit=False)  # end offsets only
        self._follower: RollupFollower | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        await self._admin.start()
        await self._offsets.start()

    async def stop(self) -> None:
        async with self._starting:  # a load under way finishes first, so its follower is stopped too
            follower, self._follower = self._follower, None
        if follower is not None:
            await follower.stop()
        await self._offsets.stop()
        await self._admin.close()

    async def prepare(self, store: UsageStore, zone: ZoneInfo, now: datetime | None = None) -> PlanLedger:
        """The ledger of ``zone``'s months, loaded now if it is not yet (the first read waits for it),
        holding the months from the one before ``now``'s. Another zone's ledger is replaced."""
        if (ready := self._ready(zone)) is not None:
            return ready
        async with self._starting:  # reads arriving meanwhile wait for this one load
            if (ready := self._ready(zone)) is not None:
                return ready
            if self._follower is not None:
                if not self._follower.alive:
                    log.error("the usage follower stopped; loading the plan ledger again", extra={"error": repr(self._follower.failure)})
                old, self._follower = self._follower, None
                await old.stop()
            [events] = await self._admin.describe_topics([self._topic])  # no partitions if not made yet
            tps = [TopicPartition(self._topic, p["partition"]) for p in events["partitions"]]
            if tps:  # made here if no sink of this release has made it yet, so the ledger follows it from the start
                await ensure_topics(self._kafka, {self._rollups_topic: len(tps)}, replication_factor=self._replication_factor,
                                    exact=[self._rollups_topic], configs={self._rollups_topic: rollups.RETENTION})  # fmt: skip
            committed = await self._admin.list_consumer_group_offsets(self._sink_group, partitions=tps) if tps else {}
            committed = {tp: meta for tp, meta in committed.items() if meta.offset >= 0}
            stored = await store.stored_ends() if len(committed) < len(tps) else {}
            # Below the committed offset, or with none (offsets expired) the stored end, ClickHouse holds every event.
            splits = {tp.partition: committed[tp].offset if tp in committed else stored.get(tp.partition, 0) for tp in tps}
            starts = {tp.partition: read_metadata(committed[tp].metadata)[1] if tp in committed else None for tp in tps}
            ledger = PlanLedger(zone, now or datetime.now(UTC))
            await ledger.load(store, splits)
            if not splits:  # no events topic yet, so nothing stored or on its way: a ledger for this read only
                return ledger
            self._follower = RollupFollower(self._kafka, self._rollups_topic, starts, splits, ledger)
            return ledger

    def _ready(self, zone: ZoneInfo) -> PlanLedger | None:
        """The ledger of ``zone``, if one is loaded and its follower is running."""
        follower = self._follower
        return follower.ledger if follower is not None and follower.ledger.zone == zone and follower.alive else None

    async def plan_usage(
        self, store: UsageStore, api_key_id: str, zone: ZoneInfo, now: datetime, *, settle_s: float = 0.0
    ) -> PlanUsage:
        """``api_key_id``'s billable units in the month of ``zone`` holding ``now``, and in the hour before
        ``now`` (whole minutes): every event of the batches the follower has read counted once, whether
        stored yet or not. The sink cuts a batch within ``sink_flush_interval_s`` while it keeps up;
        ``settle_s`` first waits (at most that long) until the batches up to the key's partition's end
        offset are read, so that everything sent before the call is counted."""
        month_start, month_end = month_around(now, zone)
        ledger = await self.prepare(store, zone, now)
        follower = self._follower
        if settle_s > 0 and follower is not None:
            partition = _partitioner(api_key_id.encode(), follower.partitions, follower.partitions)
            tp = TopicPartition(self._topic, partition)
            await follower.wait_until_read(partition, (await self._offsets.end_offsets([tp]))[tp], settle_s)
        now_ms = int(now.timestamp() * 1000)
        last_hour = ledger.units_between(api_key_id, now_ms - HOUR_MS, now_ms + MINUTE_MS)
        return PlanUsage(month_start, month_end, ledger.month_units(api_key_id, month_start), last_hour)
