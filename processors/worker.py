"""The Faust worker: consumes usage events, runs the policy engine, publishes blocks to Redis.

This is the only module that imports faust. Window state lives in a changelog-backed Faust table, so a
restarted or rebalanced worker recovers its counts from Kafka.

Two agents share the table:
- ``enforce`` reads the events topic, keyed (and so partitioned) by ``api_key_id``: it applies the
  policies keyed on ``api_key`` and forwards each event once per other key a matching policy uses
  (e.g. ``tenant`` or ``ip``) to the regroup topic, keyed by that limit key;
- ``enforce-regrouped`` reads the regroup topic and applies those policies, so every event of such a
  limit key reaches one worker.
Both topics have the table's partition count, so Faust assigns partition ``p`` of each to the same
worker and the table's partition ``p`` holds the state of both.

Kafka delivers at least once: after a crash or rebalance, records processed since the last offset
commit come again. The table keeps, per partition, the offset last applied (for regrouped records,
also per source partition the source offset), so a redelivered record is recognised and skipped and
each event counts once in every window. The same markers reveal records that never reached an agent
(a gap, or a partition that stopped moving while Kafka has more): those are read straight from Kafka
(`MissingRecords`) and applied in order, without moving Faust's consumer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any
from collections.abc import Iterator, MutableMapping

import faust
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP, TableT
from faust.types.tuples import ack_lock

from ingest.blocklist import Block, api_key_of
from ingest.clock import wall_clock_ms
from ingest.events import EventError, UsageEvent, decode
from processors import metrics
from processors.denylist_writer import DenylistWriter
from processors.engine import Outcome, PolicyEngine
from processors.live_usage import LiveUsageWriter
from processors.policy import PolicySet
from processors.redis_client import redis_client
from processors.settings import WorkerSettings
from processors.topics import ensure_topics

log = logging.getLogger(__name__)


class PolicyWorker:
    """One worker process's Faust app. Create and start it inside the running event loop."""

    def __init__(self, settings: WorkerSettings, policies: PolicySet) -> None:
        self._settings = settings
        self._redis = redis_client(settings.redis_url, settings.redis_timeout_s)
        self._writer = DenylistWriter(self._redis, settings.redis_prefix)
        self._live = LiveUsageWriter(self._redis, settings.redis_prefix)
        self._active: dict[str, int] = {}  # limit key -> until_ms of the blocks this worker wrote
        self._marker = f"{settings.redis_prefix}:denylist-writer:{uuid.uuid4().hex}"
        """Set while Redis holds what this worker wrote; gone after Redis restarted empty."""
        self._marked = False
        self.app = faust.App(
            settings.worker_app_id,
            broker=f"kafka://{settings.kafka_bootstrap}",
            store="memory://",
            web_enabled=False,
            topic_partitions=settings.events_partitions,
            topic_replication_factor=settings.topic_replication_factor,
            producer_acks=-1,
            producer_linger=0.005,
            producer_max_batch_size=256 * 1024,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=settings.worker_session_timeout_s,
            broker_heartbeat_interval=2.0,
            key_serializer="raw",
            value_serializer="raw",  # events are decoded by ingest.events; table values are bytes
        )
        self._events = self.app.topic(settings.events_topic, key_type=bytes, value_type=bytes)
        self._regrouped = self.app.topic(settings.regroup_topic, key_type=bytes, value_type=bytes)
        self._dead_letters = self.app.topic(settings.dead_letter_topic, key_type=bytes, value_type=bytes)
        self._table = self.app.Table(
            "windows",
            default=None,
            partitions=settings.events_partitions,
            key_type=str,
            value_type=bytes,
        )
        self._state = WindowState(self._table, settings.events_partitions)
        self.engine = PolicyEngine(policies, self._state)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.timer(settings.state_flush_interval_s)(self._flush_state)
        self.app.agent(self._events, name="enforce")(self._consume)
        self.app.agent(self._regrouped, name="enforce-regrouped")(self._consume)
        self.app.timer(settings.live_flush_interval_s)(self._flush)
        self.app.timer(settings.evict_interval_s)(self._evict)
        self.app.timer(settings.stall_check_interval_s)(self._watch_progress)
        self._missing = MissingRecords(settings.kafka_bootstrap)
        self._progress: dict[TP, int] = {}  # partition -> offset last applied at the previous check

    async def start(self) -> None:
        settings = self._settings
        partitions = settings.events_partitions
        await ensure_topics(
            settings.kafka_bootstrap,
            {settings.events_topic: partitions, settings.regroup_topic: partitions, settings.dead_letter_topic: 1},
            replication_factor=settings.topic_replication_factor,
        )
        await self.app.start()

    async def crashed(self) -> BaseException:
        """Wait until the Faust app crashes (a consumer or agent failed for good); return the reason."""
        while not self.app.crashed:
            await asyncio.sleep(0.5)
        return self.app.crash_reason or RuntimeError("faust app crashed")

    async def stop(self) -> None:
        await self._state.flush()  # before Faust flushes its producer and commits on the way out
        await self.app.stop()
        await self._missing.close()
        await self._flush()
        await self._redis.aclose()

    async def replace_policies(self, policies: PolicySet) -> None:
        """Apply a changed policy set now; blocks of removed or changed policies are recomputed."""
        changes = self.engine.replace_policies(policies)
        now_ms = wall_clock_ms()
        for block in changes:
            if block.until_ms > now_ms:
                await self._publish(block, event_time_ms=None)
            else:
                await self._writer.lift(block)
                self._active.pop(block.limit_key, None)
        log.info("policies replaced", extra={"policies": [p.name for p in policies.policies], "blocks_changed": len(changes)})

    async def _consume(self, stream: faust.StreamT[bytes]) -> None:
        """Both agents: apply each record, after any records before it that never reached them."""
        async for event in stream.events():
            message = event.message
            for record in await self._missing_before(message.tp, message.offset, reason="gap"):
                await self._apply_record(message.tp, record.offset, record.key, record.value)
            await self._apply_record(message.tp, message.offset, event.key, event.value)

    async def _apply_record(self, tp: TP, offset: int, key: bytes | None, value: bytes) -> None:
        if tp.topic == self._settings.regroup_topic:
            await self._apply_regrouped(tp, offset, value)
        else:
            await self._apply(tp, offset, key, value)

    async def _apply(self, tp: TP, offset: int, key: bytes | None, value: bytes) -> None:
        """Apply one events-topic record unless its partition's marker says it was applied already.

        Checking the marker, applying the policies and moving the marker happen without an await in
        between, so a record reaches the windows once even when the agent and `_watch_progress` both
        hold it."""
        if not self._next_for(tp, offset):
            return
        try:
            usage = decode(value)
        except EventError as exc:
            self._state[_marker(tp)] = str(offset).encode()
            await self._dead_letter(key, value, exc)
            return
        metrics.EVENTS_CONSUMED.inc()
        outcome = self.engine.apply(usage)
        regroup = self.engine.regroup(usage)
        self._state[_marker(tp)] = str(offset).encode()
        await self._act(usage, outcome)
        origin = f"{tp.partition}:{offset}".encode()
        for dims, limit_key in regroup.items():
            header = ",".join(dims).encode() + b"\n" + origin + b"\n"
            await self._regrouped.send(key=limit_key.encode(), value=header + value)

    async def _apply_regrouped(self, tp: TP, offset: int, value: bytes) -> None:
        if not self._next_for(tp, offset):
            return
        dims, origin, raw = value.split(b"\n", 2)
        source_partition, _, source_offset = origin.decode().partition(":")
        # A source record processed again after a crash is forwarded again: apply it once.
        source_marker = f"{_marker(tp)}/{source_partition}"
        last = self._state.get(source_marker)
        if last is not None and int(source_offset) <= int(last):
            metrics.EVENTS_REDELIVERED.inc()
            self._state[_marker(tp)] = str(offset).encode()
            return
        usage = decode(raw)  # checked before it was forwarded
        outcome = self.engine.apply(usage, tuple(dims.decode().split(",")))
        self._state[source_marker] = source_offset.encode()
        self._state[_marker(tp)] = str(offset).encode()
        await self._act(usage, outcome)

    def _next_for(self, tp: TP, offset: int) -> bool:
        """Whether the record at ``offset`` is one this worker's state has not applied yet.

        The table keeps, next to the windows, the offset last applied per partition (its changelog
        partition is the record's, so it is restored with the counts it describes). Kafka redelivers
        what was processed but not committed after a crash or rebalance: such records are skipped.
        """
        last = self._last_applied(tp)
        if last is not None and offset <= last:
            metrics.EVENTS_REDELIVERED.inc()
            return False
        return True

    def _last_applied(self, tp: TP) -> int | None:
        last = self._state.get(_marker(tp))
        return None if last is None else int(last)

    async def _missing_before(self, tp: TP, offset: int, *, reason: str) -> list[ConsumerRecord[bytes, bytes]]:
        """The records before ``offset`` this worker's state has not applied, read from Kafka.

        Normally none: the record is the one after the marker. A record further on means records were
        lost on the way to the agents — Faust can drop records fetched while it restores its tables
        (faust-streaming#596), and a crash can lose state flushed after the offsets were committed. A
        partition never applied before (no marker) counts from its first record.
        """
        last = self._last_applied(tp)
        start = 0 if last is None else last + 1
        if offset <= start:
            return []
        records = await self._missing.read(tp, start, offset)
        if not records:  # before the first record the log still holds
            return []
        metrics.RECORDS_READ_AGAIN.labels(reason=reason).inc(len(records))
        log.warning("records missed by the consumer read from Kafka", extra={"topic": tp.topic, "partition": tp.partition,
                    "from": start, "to": offset, "records": len(records), "reason": reason})  # fmt: skip
        return records

    async def _watch_progress(self) -> None:
        """Read and apply the records of a partition that stopped reaching the agents although Kafka
        has more (the ones dropped were the last fetched, so no later record shows the gap)."""
        stalled_before, self._progress = self._progress, {}
        self._drop_repeated_acks()
        for tp in self.app.assignor.assigned_actives():
            if tp.topic not in (self._settings.events_topic, self._settings.regroup_topic):
                continue
            last = self._last_applied(tp)
            highwater = self.app.consumer.highwater(tp)
            if last is None or highwater is None or highwater <= last + 1:
                continue
            if stalled_before.get(tp) == last:
                for record in await self._missing_before(tp, highwater, reason="stalled"):
                    await self._apply_record(tp, record.offset, record.key, record.value)
            self._progress[tp] = last

    def _drop_repeated_acks(self) -> None:
        """Keep Faust's list of acknowledged offsets free of repeats.

        After a restart Faust can deliver some records twice (the recovery races of faust-streaming
        #216/#596) and list their offsets twice; its commit then moves one offset per commit interval
        (it looks for a run of consecutive offsets, and a repeat ends the run), so the group's lag stays
        up long after the records were applied. Removing the repeats changes nothing else: the list
        means "offsets acknowledged", and Faust sorts it before every commit.
        """
        with ack_lock:
            for acked in self.app.consumer._acked.values():  # type: ignore[attr-defined]
                if len(acked) != len(set(acked)):
                    acked[:] = sorted(set(acked))
                    metrics.REPEATED_ACKS_DROPPED.inc()

    async def _act(self, usage: UsageEvent, outcome: Outcome) -> None:
        if outcome.late:
            metrics.EVENTS_LATE.inc(outcome.late)
        for block in outcome.shadow_blocks:
            metrics.DECISIONS.labels(policy=block.policy, outcome="shadow_block").inc()
        for block in outcome.blocks:
            metrics.DECISIONS.labels(policy=block.policy, outcome="block").inc()
            await self._publish(block, usage.event_time_ms)
        self._live.record(outcome.counted)

    async def _publish(self, block: Block, event_time_ms: int | None) -> None:
        if await self._writer.publish(block):
            self._active[block.limit_key] = block.until_ms
            metrics.ACTIVE_BLOCKS.set(len(self._active))
            if event_time_ms is not None:
                metrics.PROCESSING_SECONDS.observe(max(0.0, time.time() - event_time_ms / 1000))
            log.info("blocked", extra={"limit_key": block.limit_key, "policy": block.policy, "until_ms": block.until_ms})

    async def _dead_letter(self, key: bytes | None, value: bytes, error: EventError) -> None:
        """Forward the original bytes with the reason in a ``reason`` header, and carry on."""
        metrics.EVENTS_DEAD_LETTERED.labels(reason=error.kind).inc()
        log.warning("dead-lettered event", extra={"reason": error.reason})
        await self._dead_letters.send(key=key, value=value, headers={"reason": error.reason.encode()})

    async def _flush_state(self) -> None:
        await self._state.flush()

    async def _on_revoked(self, sender: object, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """Partitions are moving: write what changed while they were ours, then forget the cache."""
        await self._state.flush()
        self._state.discard()

    async def _flush(self) -> None:
        await self._writer.retry_pending()
        await self._restore_denylist()
        await self._live.flush()
        now_ms = wall_clock_ms()
        self._active = {key: until for key, until in self._active.items() if until > now_ms}
        metrics.ACTIVE_BLOCKS.set(len(self._active))

    async def _restore_denylist(self) -> None:
        """If Redis lost the denylist (restarted empty), write every block of this worker's
        partitions that is still in force again; edges pick them up through pub/sub."""
        ttl_s = 600
        if await self._writer.still_holds(self._marker, ttl_s):
            return
        owned = {tp.partition for tp in self.app.assignor.assigned_actives()}
        blocks = [b for b in self.engine.blocks_in_force(wall_clock_ms()) if self._state.partition_of(f"d/{b.limit_key}") in owned]
        if not await self._writer.rewrite(blocks, self._marker, ttl_s):
            return
        if self._marked:  # not the first check after start-up: Redis did lose what was written
            metrics.DENYLIST_RESTORES.inc()
            log.warning("Redis had lost the denylist; blocks in force written again", extra={"blocks": len(blocks)})
        self._marked = True

    async def _evict(self) -> None:
        """Drop the state of idle keys of the partitions this worker owns (tombstones in the changelog)."""
        owned = {tp.partition for tp in self.app.assignor.assigned_actives()}
        state = self._state
        evicted = 0
        for key in self.engine.idle_keys(wall_clock_ms()):
            if state.partition_of(key) in owned:
                del state[key]
                evicted += 1
        metrics.TRACKED_KEYS.set(len(state))
        if evicted:
            metrics.KEYS_EVICTED.inc(evicted)
            log.info("evicted idle keys", extra={"evicted": evicted, "tracked": len(state)})


class MissingRecords:
    """Reads a range of one partition straight from Kafka, for records that never reached an agent.

    A plain consumer without a group: it neither joins the worker's group nor commits, so Faust's
    consumer and its offset bookkeeping are left as they are.
    """

    def __init__(self, bootstrap: str, timeout_s: float = 60.0) -> None:
        self._bootstrap = bootstrap
        self._timeout_s = timeout_s
        self._consumer: AIOKafkaConsumer | None = None

    async def read(self, tp: TP, start: int, end: int) -> list[ConsumerRecord[bytes, bytes]]:
        """Records ``start`` to ``end`` (exclusive) that the log still holds, in order."""
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, enable_auto_commit=False)
            await self._consumer.start()
        consumer = self._consumer
        partition = TopicPartition(tp.topic, tp.partition)
        consumer.assign([partition])
        first = (await consumer.beginning_offsets([partition]))[partition]
        consumer.seek(partition, max(start, first))
        records: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(self._timeout_s):
            while await consumer.position(partition) < end:
                batch = await consumer.getmany(partition, timeout_ms=1_000)
                records += [record for record in batch.get(partition, []) if record.offset < end]
        return records

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


def _marker(tp: TP) -> str:
    """The table key holding the offset last applied from ``tp``."""
    return f"o/{tp.topic}/{tp.partition}"


class WindowState(MutableMapping[str, bytes]):
    """The worker's state: the Faust table behind a write-back cache.

    The engine reads and writes here for every event. Changed entries reach the table and its
    changelog on `flush` (every ``state_flush_interval_s``), each once however often it changed in
    between, and the offset markers after the entries they cover: one producer writes them all, so
    within a partition Kafka keeps that order, and a restored partition is always the state as of its
    marker. A crash loses at most the changes since the last flush; the worker then finds its markers
    behind the first record it is given and reads the records in between from Kafka
    (`PolicyWorker._missing_before`), so those records are applied again, once.

    Written outside an agent, an entry goes to the changelog partition its records arrive on: for a
    window or denylist entry the partition of its key (the API key id for keys on ``api_key``, the
    limit key itself for regrouped keys, hashed by the producers' partitioner), for a marker the
    partition it describes.
    """

    def __init__(self, table: TableT[str, bytes], partitions: int) -> None:
        self._table = table
        self._all = list(range(partitions))
        self._partitioner = DefaultPartitioner()
        self._cache: dict[str, bytes | None] = {}  # None: deleted since the last flush
        self._dirty: set[str] = set()
        self._sending = asyncio.Lock()

    def partition_of(self, state_key: str) -> int:
        if state_key.startswith("o/"):  # o/{topic}/{partition}[/{source partition}]
            return int(state_key.split("/")[2])
        rest = state_key[2:]
        limit_key = rest.partition("/")[2] if state_key.startswith("w/") else rest
        kafka_key = api_key_of(limit_key) or limit_key
        return int(self._partitioner(kafka_key.encode(), self._all, self._all))

    async def flush(self) -> int:
        """Write the entries changed since the last flush to the table's changelog; return how many.

        The records go straight to the app's producer (appended to its batches; Faust flushes the
        producer before every offset commit), not through Faust's per-record send buffer, which makes
        the consumer wait while it drains a large flush one record at a time.
        """
        dirty, self._dirty = sorted(self._dirty, key=lambda key: key.startswith("o/")), set()
        changes = [(key, self._cache.get(key)) for key in dirty]
        self._cache.clear()
        for key, value in changes:  # the table answers reads from here on
            if value is None:
                self._table.data.pop(key, None)
            else:
                self._table.data[key] = value
        topic = self._table.changelog_topic
        name, producer = topic.get_topic_name(), topic.app.producer
        async with self._sending:  # one flush at a time, so the changelog keeps the order of changes
            for key, value in changes:
                raw_key, _ = topic.prepare_key(key, None)  # the table's own key serializer
                await producer.send(name, raw_key, value, self.partition_of(key), None, None)
        return len(changes)

    def discard(self) -> None:
        """Forget unflushed changes (after partitions were taken away; their new owner replays them)."""
        self._cache.clear()
        self._dirty.clear()

    def __getitem__(self, key: str) -> bytes:
        value = self._cache[key] if key in self._cache else self._table.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: bytes) -> None:
        self._cache[key] = value
        self._dirty.add(key)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._cache[key] = None
        self._dirty.add(key)

    def __iter__(self) -> Iterator[str]:
        keys = set(self._table.keys()) | set(self._cache)
        return iter([key for key in keys if self._cache.get(key, b"") is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)
