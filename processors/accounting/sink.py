"""The usage sink: Kafka events into ClickHouse exactly once, in large batches.

A plain aiokafka consumer with manual commits (not a stream framework's agent, which acknowledges events
even when the code handling them raised). Exactly-once comes from three steps per batch, each batch
holding one Kafka partition's offsets ``first..last``:

1. **Intent.** Commit the partition's current position with metadata ``inflight:<last>``: the batch's
   boundaries are now durable in Kafka.
2. **Insert** the rows with ``insert_deduplication_token = "<topic>/<partition>/<first>-<last>"``.
   ClickHouse remembers the tokens of recent inserts (``non_replicated_deduplication_window``) and
   drops a repeated block, in ``usage_events`` and in every rollup fed by a materialized view.
3. **Commit** ``last + 1`` with empty metadata.

After a crash anywhere in between, the partition's next owner reads the intent, rebuilds exactly the
same batch (it waits for offset ``last`` and goes no further) and inserts it with the same token: a
batch that had landed is dropped as a duplicate, one that had not lands now. Inserts that fail are
retried with backoff and nothing is committed meanwhile, so no event is lost; an insert ClickHouse refuses as
such (a schema mismatch) stops the sink with the reason instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
import uuid
from typing import TypeAlias

import msgspec

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from ingest.events import EventError, decode
from processors import metrics
from processors.settings import SinkSettings
from processors.tasks import crash_of
from processors.topics import ensure_topics
from processors.accounting.store import EVENT_COLUMNS, StoreError, UsageStore

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
_INFLIGHT = "inflight:"

Record: TypeAlias = ConsumerRecord[bytes, bytes]


class EventRow(msgspec.Struct):
    """A ``usage_events`` row as ClickHouse reads it in ``JSONEachRow`` (fields in `EVENT_COLUMNS` order)."""

    event_id: uuid.UUID
    event_time: float  # seconds; encoded in the shortest exact decimal, so the milliseconds stay exact
    api_key_id: str
    tenant: str
    route: str
    method: str
    status: int
    latency_ms: float
    response_bytes: int
    cost: int
    client_ip: str
    edge_blocked: bool
    plan: str
    schema_version: int
    kafka_partition: int
    kafka_offset: int


_encode_row = msgspec.json.Encoder().encode


def event_row(record: Record) -> bytes | None:
    """The ``usage_events`` row (JSON) for one Kafka record, or None if it is not a valid event."""
    try:
        event = decode(record.value or b"")
    except EventError:
        return None
    return _encode_row(EventRow(
        event.event_id, event.event_time_ms / 1000, event.api_key_id, event.tenant, event.route, event.method,
        event.status, event.latency_ms, event.response_bytes, event.cost, event.client_ip, event.edge_blocked,
        event.plan, event.schema_version, record.partition, record.offset,
    ))  # fmt: skip


@dataclass(frozen=True)
class Batch:
    """The records of one partition from ``first`` to ``last`` offset, inserted as one block."""

    tp: TopicPartition
    records: list[Record]

    @property
    def first(self) -> int:
        return int(self.records[0].offset)

    @property
    def last(self) -> int:
        return int(self.records[-1].offset)

    @property
    def token(self) -> str:
        return f"{self.tp.topic}/{self.tp.partition}/{self.first}-{self.last}"


class UsageSink:
    def __init__(self, settings: SinkSettings, store: UsageStore) -> None:
        self._settings = settings
        self._store = store
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.sink_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._pending: dict[TopicPartition, list[Record]] = {}
        self._fences: dict[TopicPartition, int] = {}
        """Partitions whose next batch must end exactly at this offset (an intent left by a crash)."""
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self._settings
        await ensure_topics(
            settings.kafka_bootstrap,
            {settings.events_topic: settings.events_partitions},
            replication_factor=settings.topic_replication_factor,
        )
        self._consumer.subscribe([settings.events_topic], listener=_Rebalance(self))
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="usage-sink")

    async def crashed(self) -> BaseException:
        """Wait until the sink loop fails for good (it retries ClickHouse errors itself); return why."""
        assert self._task is not None
        return await crash_of(self._task)

    async def stop(self) -> None:
        """Insert and commit what has been read, then leave the consumer group."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        await self._consumer.stop()

    def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:  # not committed: the next owner reads them again
            self._pending.pop(tp, None)
            self._fences.pop(tp, None)

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Load the intents left on newly assigned partitions: their next batches are fixed."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self._settings.kafka_bootstrap)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(self._settings.sink_group, partitions=list(assigned))
        finally:
            await admin.close()
        for tp, meta in committed.items():
            if meta.metadata.startswith(_INFLIGHT):
                self._fences[tp] = int(meta.metadata.removeprefix(_INFLIGHT))
                log.info(
                    "replaying an interrupted batch",
                    extra={"partition": tp.partition, "from": meta.offset, "to": self._fences[tp]},
                )

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._collect()
            batches = self._take_batches()
            if batches:
                await self._write(batches)
            self._consumer.resume(*self._consumer.paused())

    async def _collect(self) -> None:
        """Read until enough rows are pending, the flush interval has passed, or a stop is requested.

        A replayed batch must be read to its recorded end whatever its size: while one is incomplete
        and the other partitions have filled their share, those partitions are paused.
        """
        settings = self._settings
        deadline = time.monotonic() + settings.sink_flush_interval_s
        while not self._stopping.is_set():
            unfenced = sum(len(records) for tp, records in self._pending.items() if tp not in self._fences)
            room = settings.sink_batch_max_rows - unfenced
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or (room <= 0 and not self._incomplete_fences()):
                return
            if room <= 0:
                self._consumer.pause(*(tp for tp in self._consumer.assignment() if tp not in self._fences))
            fetched = await self._consumer.getmany(timeout_ms=min(left_ms, 200), max_records=max(room, 1_000))
            for tp, records in fetched.items():
                self._pending.setdefault(tp, []).extend(records)

    def _incomplete_fences(self) -> bool:
        return any(
            not (records := self._pending.get(tp)) or records[-1].offset < fence for tp, fence in self._fences.items()
        )

    def _take_batches(self) -> list[Batch]:
        """Cut each partition's pending records into its next batch.

        A fenced partition yields its batch only once the fence offset has been read, and the batch
        stops there; every other partition flushes all it has.
        """
        batches = []
        for tp, records in list(self._pending.items()):
            fence = self._fences.get(tp)
            if fence is None:
                cut = len(records)
            elif records and records[-1].offset >= fence:
                cut = next(i for i, record in enumerate(records) if record.offset >= fence) + 1
            else:
                continue
            if cut:
                batches.append(Batch(tp, records[:cut]))
                self._pending[tp] = records[cut:]
        return batches

    async def _write(self, batches: list[Batch]) -> None:
        try:
            await self._consumer.commit({b.tp: OffsetAndMetadata(b.first, f"{_INFLIGHT}{b.last}") for b in batches})
        except (CommitFailedError, KafkaError) as exc:
            self._forget(batches, f"intent commit failed: {exc!r}")
            return
        for batch in batches:
            if not await self._insert(batch):
                return  # stopping while ClickHouse fails: nothing committed, the intents stay
        if self._settings.sink_commit_delay_s:
            await asyncio.sleep(self._settings.sink_commit_delay_s)
        try:
            await self._consumer.commit({b.tp: OffsetAndMetadata(b.last + 1, "") for b in batches})
        except (CommitFailedError, KafkaError) as exc:
            # Inserted but not committed: the partition's next owner replays the intent, and the
            # deduplication token makes that replay a no-op.
            self._forget(batches, f"commit after insert failed: {exc!r}")
            return
        for batch in batches:
            self._fences.pop(batch.tp, None)

    async def _insert(self, batch: Batch) -> bool:
        """Insert one batch, retrying with backoff; False if a stop came before it succeeded."""
        rows = [row for row in map(event_row, batch.records) if row is not None]
        metrics.SINK_SKIPPED.inc(len(batch.records) - len(rows))
        backoff_s = 0.2
        while True:
            started = time.perf_counter()
            try:
                if rows:
                    await self._store.insert_json("usage_events", rows, EVENT_COLUMNS, dedup_token=batch.token)
            except StoreError as exc:
                metrics.SINK_ERRORS.labels(kind="insert").inc()
                if not exc.retriable:
                    raise  # e.g. a schema that does not match: stop the sink and say why
                log.warning(
                    "insert failed; retrying",
                    extra={"batch": batch.token, "error": str(exc), "retry_in_s": backoff_s},
                )
                try:
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                    return False
                except TimeoutError:
                    backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
                    continue
            metrics.SINK_INSERT_SECONDS.observe(time.perf_counter() - started)
            metrics.SINK_ROWS.inc(len(rows))
            log.debug("batch inserted", extra={"batch": batch.token, "rows": len(rows)})
            return True

    def _forget(self, batches: list[Batch], reason: str) -> None:
        """Drop batches this sink may no longer commit (their partitions moved to another owner)."""
        metrics.SINK_ERRORS.labels(kind="commit").inc()
        log.warning("dropping batches after a failed commit; their partitions will be replayed", extra={"reason": reason})
        for batch in batches:
            self._pending.pop(batch.tp, None)
            self._fences.pop(batch.tp, None)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: UsageSink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._sink.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._sink.partitions_assigned(assigned)
