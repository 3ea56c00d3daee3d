"""The stream worker: usage events in batches per partition → policy decisions → the Redis denylist.

One `StreamWorker` per process, in a Kafka consumer group over two topics of equal partition count:

- the **events topic**, partitioned by API key: the policies keyed on ``api_key`` are applied where
  the events arrive, and each event is forwarded once per other limit key a matching policy uses
  (``tenant``, ``ip``…): applied at once when this worker owns that key's regroup partition, else
  packed per batch into the regroup topic (`regroup`);
- the **regroup topic**, partitioned by those limit keys: the policies keyed on them are applied.

This module is the loop that applies and forwards. Its parts, one concern each: reading and aligning
partitions (`fetch`), the instant each event counts at (`timing`), writing state and committing offsets
in one fenced transaction per input partition (`flush`), taking partitions over (`assignment`), reading
a partition's state back (`changelog`), and Redis (`publisher`).

Records are decoded with msgspec and applied to live `KeyState` objects kept per input partition.
Blocks and live usage go to a `RedisPublisher` whose own task writes them, so Redis never holds up
consumption. Every ``state_flush_interval_s`` the keys that changed are written and the offsets they
cover committed. On assignment a partition's state is read back from its changelog; on revocation it
is flushed and put aside. Because each stored key says which input it includes, an event is counted
exactly once per key after any crash, restart or rebalance (see `changelog`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import operator
import time
import uuid
from collections import Counter
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from throttlex.ingest.clock import Clock, wall_clock_ms
from throttlex.ingest.denylist_entries import Block
from throttlex.ingest.events import EventError, decode, decode_valid
from throttlex.processors import metrics
from throttlex.processors.core.engine import Forward, Outcome, PolicyEngine
from throttlex.processors.core.policy import PolicySet
from throttlex.processors.redis_client import redis_client
from throttlex.processors.settings import WorkerSettings
from throttlex.processors.tasks import crash_of
from throttlex.processors.topics import APPEND_TIME, ensure_topic_configs, ensure_topics
from throttlex.processors.worker import changelog, regroup
from throttlex.processors.worker.assignment import Rebalance, committed_offsets, with_retries
from throttlex.processors.worker.fetch import Fetcher, Record
from throttlex.processors.worker.flush import Fenced, StateWriter, evict_idle
from throttlex.processors.worker.partition import Partition
from throttlex.processors.worker.publisher import RedisPublisher
from throttlex.processors.worker.timing import LOG_APPEND_TIME, SourceClocks, enforcement_time

log = logging.getLogger(__name__)

REGROUP_PARTITIONS_REMEMBERED = 100_000

class StreamWorker:
    """Create and start inside the running event loop; `stop` flushes, commits and leaves the group."""

    def __init__(self, settings: WorkerSettings, policies: PolicySet, *, clock: Clock = wall_clock_ms) -> None:
        self._settings = settings
        self._policies = policies
        self._clock = clock
        self._tolerance_ms = round(settings.event_time_tolerance_s * 1000)
        self._source_clocks = SourceClocks()
        self._group = settings.worker_group
        self._consumer = AIOKafkaConsumer(
            **settings.kafka.aiokafka_options(),
            group_id=self._group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # At most 1 MB per partition and fetch: with the even share per partition in `_fetch`, the
            # partitions of one batch stay close in event time.
            max_partition_fetch_bytes=1024 * 1024,
            # A fetch for partitions with nothing new (the regroup topic, often) is held by the broker
            # this long, and the partitions that do have records wait behind it: keep it short.
            fetch_max_wait_ms=20,
            session_timeout_ms=round(settings.worker_session_timeout_s * 1000),
            heartbeat_interval_ms=2_000,
        )
        self._fetcher = Fetcher(self._consumer, settings.events_topic, settings.worker_batch_max_records)
        self._producer = AIOKafkaProducer(
            **settings.kafka.aiokafka_options(),
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_batch_size=1024 * 1024,
            max_request_size=4 * 1024 * 1024,
        )
        self._state = StateWriter(settings.kafka, self._group, commit_delay_s=settings.state_commit_delay_s)
        self._redis = redis_client(settings.redis_url, settings.redis_timeout_s)
        self._publisher = RedisPublisher(
            self._redis,
            settings.redis_prefix,
            marker=f"{settings.redis_prefix}:denylist-writer:{uuid.uuid4().hex}",
            blocks_in_force=self._blocks_in_force,
            holds=self._holds,
            live_flush_interval_s=settings.live_flush_interval_s,
            max_pending_keys=settings.live_usage_max_pending_keys,
        )
        self._partitions: dict[TopicPartition, Partition] = {}
        self._parked: dict[TopicPartition, Partition] = {}
        """Partitions revoked in a rebalance still under way: kept if they come straight back."""
        self._deliveries: list[asyncio.Future[Any]] = []
        """Forwards and dead letters sent since the last flush, not yet known to be acknowledged."""
        self._regroup_tps: list[TopicPartition] = []
        self._sent: dict[int, asyncio.Future[Any]] = {}
        """Per regroup partition, the delivery of the last regroup record this worker sent to it."""
        self._regroup_partitions: dict[str, int] = {}
        """Limit key -> its regroup partition, for the keys seen lately (a hash per forward costs more)."""
        self._generation = 0
        """Counts rebalances. Records fetched before one are never applied after it: the consumer reads
        on from the committed offsets, and a key's state must see its partition's records in offset
        order with no gap (a key skips every offset up to its ``version``)."""
        self._lock = asyncio.Lock()
        """Held while records are applied or state is flushed, so a rebalance finds a consistent state."""
        self._stopping = asyncio.Event()
        self._failure: BaseException | None = None
        """Why the worker cannot go on (set by a rebalance callback, which aiokafka would not let raise)."""
        self._task: asyncio.Task[None] | None = None
        self._committing: asyncio.Task[None] | None = None
        """The last flush (its writes and its commit), under way or done."""

    async def start(self) -> None:
        settings = self._settings
        inputs = [settings.events_topic, settings.regroup_topic]
        await ensure_topics(
            settings.kafka,
            {settings.events_topic: settings.events_partitions, settings.regroup_topic: settings.events_partitions,
             settings.dead_letter_topic: 1},
            replication_factor=settings.topic_replication_factor, exact=inputs,
            configs={settings.events_topic: APPEND_TIME},
        )  # fmt: skip
        if await ensure_topic_configs(settings.kafka, {settings.events_topic: APPEND_TIME}):
            log.warning("the events topic now stamps records with Kafka's append time; records before the change "
                        "are judged against this worker's clock", extra={"topic": settings.events_topic})  # fmt: skip
        await self._producer.start()
        counts = {topic: len(await self._producer.partitions_for(topic)) for topic in inputs}
        self._regroup_tps = [TopicPartition(settings.regroup_topic, p) for p in range(counts[settings.regroup_topic])]
        await ensure_topics(
            settings.kafka,
            {changelog.changelog_topic(self._group, topic): count for topic, count in counts.items()},
            replication_factor=settings.topic_replication_factor,
            configs={changelog.changelog_topic(self._group, topic): changelog.TOPIC_CONFIG for topic in inputs},
        )
        self._consumer.subscribe(inputs, listener=Rebalance(self._revoked, self._assigned))
        await self._consumer.start()
        self._publisher.start()
        self._task = asyncio.create_task(self._run(), name="stream-worker")

    async def crashed(self) -> BaseException:
        """Wait until the consumer loop fails for good; return why (never returns after `stop`)."""
        assert self._task is not None
        return await crash_of(self._task)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        try:
            async with self._lock:
                await self._flush(list(self._partitions.values()))
        except (KafkaError, Fenced) as exc:
            log.warning("final flush failed; the next owner reads the rest again", extra={"error": str(exc)})
        await self._consumer.stop()
        await self._state.close()
        await self._producer.stop()
        await self._publisher.stop(timeout_s=5.0)
        await self._redis.aclose()

    async def replace_policies(self, policies: PolicySet) -> None:
        """Apply a changed policy set now; blocks of removed or changed policies are recomputed."""
        async with self._lock:
            self._policies = policies
            now_ms = self._clock()
            changed = 0
            for part in self._partitions.values():
                changes = part.engine.replace_policies(policies)
                part.dirty.update(part.engine.state)
                for block in changes:
                    lift = block if block.until_ms > now_ms else msgspec.structs.replace(block, until_ms=0)
                    self._publisher.block(lift, None)
                changed += len(changes)
        log.info("policies replaced", extra={"policies": [p.name for p in policies.policies], "blocks_changed": changed})

    # The consumer loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        settings = self._settings
        next_flush = next_evict = time.monotonic()
        while not self._stopping.is_set():
            fetched = await self._fetcher.next_batch()  # consistent with the assignment as it is now (aiokafka sees to it)
            if self._failure is not None:
                raise self._failure
            generation = self._generation
            async with self._lock:
                if generation != self._generation:
                    continue  # a rebalance came meanwhile: these records are read again from the commits
                forwards = []
                for tp, records in fetched.items():
                    part = self._partitions.get(tp)
                    if part is None or not records:
                        continue  # revoked meanwhile: its next owner reads them
                    if part.regrouped:
                        await self._apply_forwards(part, records)
                    else:
                        forwards.append(await self._apply_events(part, records))
                await self._forward(forwards)
                now = time.monotonic()
                if now >= next_flush and (self._committing is None or self._committing.done()):
                    # A flush still writing (a changelog leader or the transaction coordinator failing over)
                    # is not waited for: decisions and blocks go on, and the next flush takes what changed.
                    await self._start_flush(list(self._partitions.values()))
                    next_flush = now + settings.state_flush_interval_s
                if now >= next_evict:
                    self._evict()
                    next_evict = now + settings.evict_interval_s

    async def _forward(self, forwards: list[list[Forward]]) -> None:
        """Hand a batch's forwards (one list per events partition, in offset order) to the owners of
        their limit keys, merged by event time so that each regrouped key receives its events nearly
        in order. A key whose regroup partition this worker owns gets its forward at once; the others
        go through the regroup topic. Either way a key counts a forward once (`KeyState.sources`), so
        whichever worker owns the partition after a crash or rebalance, nothing counts twice."""
        forwards = [items for items in forwards if items]
        merged = list(heapq.merge(*forwards, key=_event_time)) if len(forwards) > 1 else [f for fs in forwards for f in fs]
        remote: list[Forward] = []
        local: dict[TopicPartition, Outcome] = {}
        partition_of = self._regroup_partition_of
        targets = self._local_targets()
        for forward in merged:
            part = targets[partition_of(forward.limit_key)]
            if part is None:
                remote.append(forward)
                continue
            outcome = local.get(part.tp)
            if outcome is None:
                outcome = local[part.tp] = Outcome()
            part.engine.apply_forwarded(forward, into=outcome)
            if forward.event_time_ms > part.watermark_ms:
                part.watermark_ms = forward.event_time_ms
        for tp, outcome in local.items():
            self._conclude(self._partitions[tp], outcome)
        for target, value in regroup.pack(remote, len(self._regroup_tps)):
            delivery = await self._producer.send(self._settings.regroup_topic, value, partition=target)
            self._deliveries.append(delivery)
            self._sent[target] = delivery
        metrics.FORWARDS.labels(route="local").inc(len(merged) - len(remote))
        metrics.FORWARDS.labels(route="kafka").inc(len(remote))

    def _local_targets(self) -> list[Partition | None]:
        """Per regroup partition, this worker's `Partition` if forwards to it may be applied at once,
        else None (they go through Kafka).

        A key takes a forward only if it is newer than the last one it took from the same events
        partition, so a forward applied at once must never overtake an older one still in the regroup
        topic: one sent by this worker before it owned the partition (or while catching up), or by the
        events partition's previous owner before a rebalance. So forwards are applied at once only
        once the partition's records up to its end offset at assignment are applied, and every regroup
        record this worker sent to it has been read back."""
        targets: list[Partition | None] = []
        for tp in self._regroup_tps:
            part = self._partitions.get(tp)
            if part is not None and part.next_offset < part.catch_up_to:
                part = None
            sent = self._sent.get(tp.partition)
            if part is not None and sent is not None:
                if sent.done() and sent.exception() is None and sent.result().offset < part.next_offset:
                    del self._sent[tp.partition]
                else:
                    part = None
            targets.append(part)
        return targets

    def _regroup_partition_of(self, limit_key: str) -> int:
        partition = self._regroup_partitions.get(limit_key)
        if partition is None:
            if len(self._regroup_partitions) >= REGROUP_PARTITIONS_REMEMBERED:
                self._regroup_partitions.clear()
            partition = self._regroup_partitions[limit_key] = regroup.partition_of(limit_key, len(self._regroup_tps))
        return partition

    async def _apply_events(self, part: Partition, records: list[Record]) -> list[Forward]:
        """Apply a batch of one events partition, each event at its enforcement time (`timing`)."""
        tolerance_ms = self._tolerance_ms
        now_ms = self._clock()
        outcome = Outcome()
        engine, partition = part.engine, part.tp.partition
        watermark = part.watermark_ms
        offsets: dict[str, int] = {}
        applied = 0
        for record in records:
            try:
                event = decode_valid(record.value)
            except (msgspec.DecodeError, TypeError):  # not an event: `decode` says why
                try:
                    decode(record.value or b"")
                except EventError as exc:
                    await self._dead_letter(record, exc.kind, exc.reason)
                continue
            t = event.event_time_ms
            appended = record.timestamp if record.timestamp_type == LOG_APPEND_TIME else min(record.timestamp, now_ms)
            offsets[event.source] = t - appended
            at = enforcement_time(t, appended, tolerance_ms)
            if at > watermark:
                watermark = at
            engine.apply(event, (partition, record.offset), outcome, at_ms=at)
            applied += 1
        part.watermark_ms = watermark
        part.next_offset = records[-1].offset + 1
        metrics.EVENTS_CONSUMED.inc(applied)
        self._source_clocks.report(offsets)
        self._conclude(part, outcome)
        return outcome.forwards

    async def _apply_forwards(self, part: Partition, records: list[Record]) -> None:
        outcome = Outcome()
        engine = part.engine
        watermark = part.watermark_ms
        applied = 0
        for record in records:
            try:
                forwards = regroup.unpack(record.value or b"")
            except msgspec.DecodeError as exc:
                await self._dead_letter(record, "malformed", f"not a regroup record: {exc}")
                continue
            for forward in forwards:
                engine.apply_forwarded(forward, record.offset, outcome)
                if forward.event_time_ms > watermark:
                    watermark = forward.event_time_ms
            applied += len(forwards)
        part.watermark_ms = watermark
        part.next_offset = records[-1].offset + 1
        metrics.FORWARDS_RECEIVED.inc(applied)
        self._conclude(part, outcome)

    def _conclude(self, part: Partition, outcome: Outcome) -> None:
        """Hand a batch's results on: changed keys to the next flush and to live usage, blocks to Redis."""
        part.dirty.update(outcome.touched)
        self._publisher.usage(outcome.touched)
        for block in outcome.blocks:
            self._publisher.block(block, outcome.breaches.get(block.limit_key))
        # A key over its limit takes a decision on every event: count them per policy, once a batch.
        for kind, blocks in (("block", outcome.blocks), ("shadow_block", outcome.shadow_blocks)):
            for policy, decisions in Counter(block.policy for block in blocks).items():
                metrics.DECISIONS.labels(policy=policy, outcome=kind).inc(decisions)
        if outcome.late:
            metrics.EVENTS_LATE.inc(outcome.late)
        if outcome.repeated:
            metrics.EVENTS_REDELIVERED.inc(outcome.repeated)

    async def _dead_letter(self, record: Record, kind: str, reason: str) -> None:
        """Forward the original bytes with the reason in a ``reason`` header, and carry on."""
        metrics.EVENTS_DEAD_LETTERED.labels(reason=kind).inc()
        log.warning("dead-lettered event", extra={"reason": reason, "partition": record.partition, "offset": record.offset})
        delivery = await self._producer.send(
            self._settings.dead_letter_topic, record.value, key=record.key, headers=[("reason", reason.encode())]
        )
        self._deliveries.append(delivery)

    # State: flush, eviction, rebalancing ------------------------------------------------------------

    async def _flush(self, partitions: list[Partition]) -> None:
        """Write the changed keys of ``partitions`` and commit the offsets they cover; return when done."""
        await self._start_flush(partitions)
        assert self._committing is not None
        await self._committing

    async def _start_flush(self, partitions: list[Partition]) -> None:
        """Take the changed keys of ``partitions`` and the offsets they cover, and write and commit them
        in the background while consumption goes on. One flush at a time: this waits for the one before
        (and raises what stopped it, so a flush Kafka refused stops the worker, whose restart reads on
        from its last commit)."""
        if self._committing is not None:
            await self._committing
        changed = []
        for part in partitions:
            changed.append((part, part.dirty))
            part.dirty = set()
        deliveries, self._deliveries = self._deliveries, []
        covered = {part: part.next_offset for part in partitions if part.next_offset > part.committed}
        self._committing = asyncio.create_task(self._state.write_and_commit(changed, deliveries, covered), name="flush")

    def _evict(self) -> None:
        evicted, tracked = evict_idle(self._partitions.values())
        metrics.TRACKED_KEYS.set(tracked)
        if evicted:
            metrics.KEYS_EVICTED.inc(evicted)
            log.info("evicted idle keys", extra={"evicted": evicted, "tracked": tracked})

    def _holds(self, limit_key: str) -> bool:
        """Whether this worker keeps the state of ``limit_key`` (so it decides its blocks)."""
        return any(limit_key in part.engine.state for part in self._partitions.values())

    def _blocks_in_force(self) -> list[Block]:
        now_ms = self._clock()
        return [block for part in self._partitions.values() for block in part.engine.blocks_in_force(now_ms)]

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        """Flush everything (the forwards of every partition must be durable before any commit), then
        put the revoked partitions aside until the assignment says whether they come back."""
        async with self._lock:
            try:
                await self._flush(list(self._partitions.values()))
            except (KafkaError, Fenced) as exc:
                # What this worker holds may be older than the changelog (another worker took a partition over
                # while it stalled) or not all written: every partition is read back from the changelog, where
                # state and committed offsets always agree, if it is assigned again.
                log.warning("flush before a rebalance failed; the partitions will be read back", extra={"error": str(exc)})
                self._committing = None
                await self._state.release(list(self._partitions))
                self._partitions.clear()
            self._generation += 1
            for tp in revoked:
                self._fetcher.forget(tp)
                part = self._partitions.pop(tp, None)
                if part is not None:
                    self._parked[tp] = part
            metrics.ASSIGNED_PARTITIONS.set(len(self._partitions))

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        """Take over ``assigned``, retrying with backoff what fails (a broker away, a changelog that cannot
        be read). If it cannot, the worker fails (`crashed` says why) so its orchestrator restarts it: a
        worker that kept its group membership without its partitions' state would consume nothing."""
        async with self._lock:
            parked, self._parked = self._parked, {}
            await self._state.release([tp for tp in parked if tp not in assigned])
            failure = await with_retries(lambda: self._take_over(assigned, parked))
            if failure is not None:
                self._failure = failure

    async def _take_over(self, assigned: set[TopicPartition], parked: dict[TopicPartition, Partition]) -> None:
        """A partition given back with no commit by another worker keeps its state in memory, every other
        one is read from its changelog; nothing is installed unless all of them are ready. Blocks in
        force are queued for Redis again (the previous owner may have decided them without writing them),
        checked against the policies now in force."""
        started = time.perf_counter()
        await self._state.take(assigned)  # first: it fences the previous owners before their state is read
        committed = await committed_offsets(self._settings.kafka, self._group, assigned)
        kept, restore = {}, []
        for tp in assigned:
            part = parked.get(tp)
            if part is not None and part.committed == committed.get(tp, -1):
                # Nobody committed on it since this worker did, so its state here holds everything
                # the changelog could add; records after the commit come again and are skipped by
                # every key that has them (a broker restart ends this way, without a restore).
                kept[tp] = part
            else:
                restore.append(tp)
        regrouped = [tp for tp in assigned if tp.topic == self._settings.regroup_topic]
        ends = await self._consumer.end_offsets(regrouped) if regrouped else {}
        changelogs = [TopicPartition(changelog.changelog_topic(self._group, tp.topic), tp.partition) for tp in restore]
        states = await changelog.restore(self._settings.kafka, changelogs, self._policies)
        self._partitions.update(kept)
        now_ms = self._clock()
        keys = 0
        for tp, source in zip(restore, changelogs):
            engine = PolicyEngine(self._policies, states[source])
            part = self._partitions[tp] = Partition(tp, engine, regrouped=tp.topic == self._settings.regroup_topic)
            for block in engine.settle_restored_blocks(now_ms):  # a policy may have changed while stopped
                self._publisher.block(block, None)
                part.dirty.add(block.limit_key)
            keys += len(engine.state)
        for tp in regrouped:  # records sent before this assignment are applied before any forward at once
            self._partitions[tp].catch_up_to = ends[tp] if ends[tp] > max(0, committed.get(tp, -1)) else 0
        metrics.ASSIGNED_PARTITIONS.set(len(self._partitions))
        metrics.TRACKED_KEYS.set(sum(len(part.engine.state) for part in self._partitions.values()))
        log.info("partitions assigned", extra={"partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
                 "restored": len(restore), "keys_restored": keys, "seconds": round(time.perf_counter() - started, 3)})  # fmt: skip

_event_time = operator.attrgetter("event_time_ms")
