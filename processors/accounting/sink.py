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
such (a schema mismatch) stops the sink with the reason instead. A batch is one block (at most
``sink_batch_max_rows``, below ClickHouse's ``min_insert_block_size_rows``), so it lands whole or not at all.

Records are validated and turned into Arrow columns as they are read (`processors.accounting.rows`),
and the next batches are read while the previous ones are inserted: ClickHouse works on its own thread
outside the GIL, so reading and inserting share the machine's cores. One write is in flight at a time,
so each partition's commits stay in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import TypeAlias

import pyarrow as pa
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from throttlex.ingest.tasks import cancel_and_wait
from throttlex.processors import metrics
from throttlex.processors.settings import SinkSettings
from throttlex.processors.tasks import crash_of
from throttlex.processors.topics import ensure_topics
from throttlex.processors.accounting.rows import EVENT_SCHEMA, arrow_stream, event_rows
from throttlex.processors.accounting.store import StoreError, UsageStore

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
_INFLIGHT = "inflight:"
_READ_STEP = 1_000
_REVOKE_WAIT_S = 10.0

Record: TypeAlias = ConsumerRecord[bytes, bytes]


class _Pending:
    """What was read from one partition and is not in a batch yet: every offset read, and the valid
    events among them as rows (in Arrow record batches, one per read)."""

    __slots__ = ("offsets", "row_offsets", "rows")

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.row_offsets: list[int] = []
        self.rows: list[pa.RecordBatch] = []

    def add(self, tp: TopicPartition, records: list[Record]) -> None:
        rows, row_offsets = event_rows(records, tp.partition)
        self.offsets += [record.offset for record in records]
        self.row_offsets += row_offsets
        self.rows.append(rows)

    def take(self, tp: TopicPartition, count: int) -> Batch:
        """The first ``count`` records read, as a batch."""
        first, last = self.offsets[0], self.offsets[count - 1]
        stored = bisect_right(self.row_offsets, last)
        table = pa.Table.from_batches(self.rows, EVENT_SCHEMA)
        self.rows = table.slice(stored).to_batches()
        del self.offsets[:count], self.row_offsets[:stored]
        return Batch(tp, first, last, table.slice(0, stored), skipped=count - stored)


@dataclass(frozen=True)
class Batch:
    """The records of one partition from ``first`` to ``last`` offset, inserted as one block."""

    tp: TopicPartition
    first: int
    last: int
    rows: pa.Table
    skipped: int
    """Records in ``first..last`` that are not valid events: never stored."""

    @property
    def token(self) -> str:
        return f"{self.tp.topic}/{self.tp.partition}/{self.first}-{self.last}"


class UsageSink:
    def __init__(self, settings: SinkSettings, store: UsageStore) -> None:
        self._settings = settings
        self._store = store
        self._consumer = AIOKafkaConsumer(
            **settings.kafka.aiokafka_options(),
            group_id=settings.sink_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._pending: dict[TopicPartition, _Pending] = {}
        self._fences: dict[TopicPartition, int] = {}
        """Partitions whose next batch must end exactly at this offset (an intent left by a crash)."""
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writing: asyncio.Task[bool] | None = None
        """The batches being inserted while the next ones are read (at most one write at a time)."""
        self._assigning = False
        """A rebalance is under way: no batch is cut or committed until the new assignment is loaded."""

    async def start(self) -> None:
        settings = self._settings
        await ensure_topics(
            settings.kafka,
            {settings.events_topic: settings.events_partitions},
            replication_factor=settings.topic_replication_factor,
            exact=[settings.events_topic],
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

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Finish the write in flight while its commits can still land, then forget what was read.

        A write still inserting after `_REVOKE_WAIT_S` (ClickHouse failing) is cancelled: its intents stay
        in Kafka for the next owner to replay, and no late commit of it can land once the partitions are
        someone else's.
        """
        self._assigning = True  # nothing is cut or committed until the next assignment is loaded
        if self._writing is not None and not self._writing.done():
            done, _ = await asyncio.wait([self._writing], timeout=_REVOKE_WAIT_S)
            if not done:
                await cancel_and_wait(self._writing)
        for tp in revoked:  # not committed: the next owner reads them again
            self._pending.pop(tp, None)
            self._fences.pop(tp, None)

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Load the intents left on the assigned partitions (their next batches are fixed) and read every
        partition again from its committed offset: records the consumer returned while this ran are
        read again, after the fences are in place."""
        self._assigning = True  # until the intents are loaded: if that fails, nothing is cut (better than a replay at other bounds)
        admin = AIOKafkaAdminClient(**self._settings.kafka.aiokafka_options())
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(self._settings.sink_group, partitions=list(assigned))
        finally:
            await admin.close()
        fences = {}
        for tp in assigned:
            meta = committed.get(tp)
            # Nothing committed: from the start (an offset retention has deleted resets to the earliest kept).
            self._consumer.seek(tp, meta.offset if meta is not None and meta.offset >= 0 else 0)
            if meta is None:
                continue
            if meta.metadata.startswith(_INFLIGHT):
                fences[tp] = int(meta.metadata.removeprefix(_INFLIGHT))
                log.info("replaying an interrupted batch", extra={"partition": tp.partition, "from": meta.offset, "to": fences[tp]})
        # In the same step as the seeks (no await between): what was read before them is dropped.
        self._pending.clear()
        self._fences = fences
        self._assigning = False

    async def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                await self._collect()
                if not await self._finish_write():
                    return  # stopped while ClickHouse failed: that write's intents must stay for the next start
                batches = [] if self._assigning else self._take_batches()
                if batches and await self._commit_intents(batches):  # before reading on: it is quick while nothing is read
                    self._writing = asyncio.create_task(self._write(batches), name="usage-sink-write")
                self._consumer.resume(*self._consumer.paused())
        finally:
            await self._finish_write()

    async def _finish_write(self) -> bool:
        """Wait for the write in flight; False if it gave up (a stop came while inserts failed)."""
        if self._writing is None:
            return True
        writing, self._writing = self._writing, None
        await asyncio.wait([writing])
        if writing.cancelled():
            return True  # at a revocation: the partitions' next owner replays its intents
        return writing.result()  # raises what stopped it for good (an insert ClickHouse refuses as such)

    async def _collect(self) -> None:
        """Read until enough rows are pending, the flush interval has passed, or a stop is requested.

        A replayed batch must be read to its recorded end whatever its size: while one is incomplete
        and the other partitions have filled their share, those partitions are paused.
        """
        settings = self._settings
        deadline = time.monotonic() + settings.sink_flush_interval_s
        while not self._stopping.is_set():
            unfenced = sum(len(pending.offsets) for tp, pending in self._pending.items() if tp not in self._fences)
            room = settings.sink_batch_max_rows - unfenced
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or (room <= 0 and not self._incomplete_fences()):
                return
            if room <= 0:
                self._consumer.pause(*(tp for tp in self._consumer.assignment() if tp not in self._fences))
            # In steps of a few milliseconds, yielding between them: getmany does not yield while it has records
            # buffered, and the write of the previous batches (its commits, its insert) and, in `throttlex run`,
            # the API's requests must go on meanwhile.
            fetched = await self._consumer.getmany(timeout_ms=min(left_ms, 200), max_records=_READ_STEP)
            if fetched and not any(pending.offsets for pending in self._pending.values()):
                log.debug("reading the next batches", extra={"partitions": len(fetched)})
            for tp, records in fetched.items():
                self._pending.setdefault(tp, _Pending()).add(tp, records)
            await asyncio.sleep(0)

    def _incomplete_fences(self) -> bool:
        return any(
            not (pending := self._pending.get(tp)) or not pending.offsets or pending.offsets[-1] < fence
            for tp, fence in self._fences.items()
        )

    def _take_batches(self) -> list[Batch]:
        """Cut each partition's pending records into its next batch.

        A fenced partition yields its batch only once the fence offset has been read, and the batch
        stops there; every other partition flushes all it has.
        """
        batches = []
        for tp, pending in list(self._pending.items()):
            fence = self._fences.get(tp)
            if fence is None:
                cut = len(pending.offsets)
            elif pending.offsets and pending.offsets[-1] >= fence:
                cut = bisect_right(pending.offsets, fence)
                del self._fences[tp]  # the replayed batch is cut; a failed commit sets the fence again
            else:
                continue
            if cut:
                batches.append(pending.take(tp, cut))
        return batches

    async def _commit_intents(self, batches: list[Batch]) -> bool:
        try:
            await self._consumer.commit({b.tp: OffsetAndMetadata(b.first, f"{_INFLIGHT}{b.last}") for b in batches})
        except (CommitFailedError, KafkaError) as exc:
            self._forget(batches, f"intent commit failed: {exc!r}")
            return False
        return True

    async def _write(self, batches: list[Batch]) -> bool:
        """Insert batches whose intents are committed, then commit their ends; False if a stop came first."""
        for batch in batches:
            if not await self._insert(batch):
                return False  # stopping while ClickHouse fails: nothing committed, the intents stay
        if self._settings.sink_commit_delay_s:
            await asyncio.sleep(self._settings.sink_commit_delay_s)
        try:
            await self._consumer.commit({b.tp: OffsetAndMetadata(b.last + 1, "") for b in batches})
        except (CommitFailedError, KafkaError) as exc:
            # Inserted but not committed: whoever owns the partition next replays the intent, and the
            # deduplication token makes that replay a no-op.
            self._forget(batches, f"commit after insert failed: {exc!r}")
        return True

    async def _insert(self, batch: Batch) -> bool:
        """Insert one batch, retrying with backoff; False if a stop came before it succeeded."""
        metrics.SINK_SKIPPED.inc(batch.skipped)
        rows, backoff_s = batch.rows.num_rows, 0.2
        data = arrow_stream(batch.rows) if rows else b""
        while True:
            started = time.perf_counter()
            try:
                if rows:
                    await self._store.insert_arrow("usage_events", data, EVENT_SCHEMA.names, dedup_token=batch.token)
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
            metrics.SINK_ROWS.inc(rows)
            log.debug("batch inserted", extra={"batch": batch.token, "rows": rows})
            return True

    def _forget(self, batches: list[Batch], reason: str) -> None:
        """Give up batches whose offsets could not be committed.

        Their partitions are read again from the batch's first offset, by whoever owns them next: this
        sink, if they are still its own (a replay fenced at the batch's end, in case its intent landed).
        What was read past them is dropped and read again after them.
        """
        metrics.SINK_ERRORS.labels(kind="commit").inc()
        log.warning("dropping batches after a failed commit; their partitions will be replayed", extra={"reason": reason})
        assigned = self._consumer.assignment()
        for batch in batches:
            self._pending.pop(batch.tp, None)
            self._fences.pop(batch.tp, None)
            if batch.tp in assigned:
                self._consumer.seek(batch.tp, batch.first)
                self._fences[batch.tp] = batch.last


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: UsageSink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._sink.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._sink.partitions_assigned(assigned)
