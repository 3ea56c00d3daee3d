"""The usage sink: Kafka events into ClickHouse exactly once, in large batches.

A consumer with manual commits (not a stream framework's agent, which acknowledges events even when the
code handling them raised). Exactly-once comes from three steps per batch, each batch holding one Kafka
partition's offsets ``first..last``:

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

The consumer is librdkafka's (confluent-kafka), on a thread of its own that reads, cuts batches and
commits: librdkafka fetches and decompresses outside the interpreter lock, so the lock is left for
what only Python can do, validating records and turning them into Arrow columns
(`processors.accounting.rows`). Measured on this machine, reading and building rows took 4.3 CPU-µs
of the lock per record with aiokafka and 2.7 with librdkafka. Group changes are handled in
librdkafka's callbacks, on the same thread, inside its reads.

Inserts run on the store's writer thread (ClickHouse works outside the lock) while the next batches are
read. One write is in flight at a time, so each partition's commits stay in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from processors import metrics
from processors.settings import SinkSettings
from processors.topics import ensure_topics
from processors.accounting.rows import EVENT_SCHEMA, arrow_stream, event_rows
from processors.accounting.store import StoreError, UsageStore

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
_INFLIGHT = "inflight:"
_READ_STEP = 1_000
_READ_WAIT_S = 0.2
_REVOKE_WAIT_S = 10.0
_SERVE_GROUP_AFTER_S = 2.0
"""How long a write may take before the consumer is polled (paused) while it goes on."""
_KAFKA_TIMEOUT_S = 30.0


class _Pending:
    """What was read from one partition and is not in a batch yet: every offset read, and the valid
    events among them as rows (in Arrow record batches, one per read)."""

    __slots__ = ("offsets", "row_offsets", "rows")

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.row_offsets: list[int] = []
        self.rows: list[pa.RecordBatch] = []

    def add(self, partition: int, messages: Sequence[Message]) -> None:
        offsets: list[int] = [message.offset() for message in messages]  # type: ignore[misc]
        rows, row_offsets = event_rows([message.value() for message in messages], offsets, partition)
        self.offsets += offsets
        self.row_offsets += row_offsets
        self.rows.append(rows)

    def take(self, topic: str, partition: int, count: int) -> Batch:
        """The first ``count`` records read, as a batch."""
        first, last = self.offsets[0], self.offsets[count - 1]
        stored = bisect_right(self.row_offsets, last)
        table = pa.Table.from_batches(self.rows, EVENT_SCHEMA)
        self.rows = table.slice(stored).to_batches()
        del self.offsets[:count], self.row_offsets[:stored]
        return Batch(topic, partition, first, last, table.slice(0, stored), skipped=count - stored)


@dataclass(frozen=True)
class Batch:
    """The records of one partition from ``first`` to ``last`` offset, inserted as one block."""

    topic: str
    partition: int
    first: int
    last: int
    rows: pa.Table
    skipped: int
    """Records in ``first..last`` that are not valid events: never stored."""

    @property
    def token(self) -> str:
        return f"{self.topic}/{self.partition}/{self.first}-{self.last}"


@dataclass
class _Write:
    """Batches whose intents are committed, being inserted on the store's writer thread (one insert each,
    in order); the sink's thread commits their ends once every insert has landed."""

    batches: list[Batch]
    inserts: list[concurrent.futures.Future[None]]


class UsageSink:
    def __init__(self, settings: SinkSettings, store: UsageStore) -> None:
        self._settings = settings
        self._store = store
        self._topic = settings.events_topic
        self._consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.sink_group,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",  # nothing committed, or an offset retention deleted: the earliest kept
            "max.partition.fetch.bytes": 4 * 1024 * 1024,
            "session.timeout.ms": 10_000,  # a killed sink's partitions move on within seconds
            # Eager rebalancing, which the callbacks assume: every partition revoked, then all assigned.
            "group.protocol": "classic", "partition.assignment.strategy": "range,roundrobin",
        })  # fmt: skip
        self._pending: dict[int, _Pending] = {}
        self._fences: dict[int, int] = {}
        """Partitions whose next batch must end exactly at this offset (an intent left by a crash)."""
        self._paused: list[TopicPartition] = []
        """Partitions this sink paused in librdkafka: resumed before they are forgotten (a pause outlives an assignment)."""
        self._writing: _Write | None = None
        self._assigning = False
        """A rebalance is under way: no batch is cut and no intent committed until the new assignment is loaded."""
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._outcome: asyncio.Future[None] | None = None

    async def start(self) -> None:
        settings = self._settings
        await ensure_topics(
            settings.kafka_bootstrap,
            {settings.events_topic: settings.events_partitions},
            replication_factor=settings.topic_replication_factor,
            exact=[settings.events_topic],
        )
        self._loop = asyncio.get_running_loop()
        self._outcome = self._loop.create_future()
        self._consumer.subscribe(
            [self._topic], on_assign=self._partitions_assigned, on_revoke=self._partitions_revoked, on_lost=self._partitions_lost
        )
        self._thread = threading.Thread(target=self._main, name="usage-sink", daemon=True)
        self._thread.start()

    async def crashed(self) -> BaseException:
        """Wait until the sink fails for good (it retries ClickHouse errors itself); return why. A sink
        stopped on request never counts as a crash, so this then waits for ever (the runner cancels it)."""
        assert self._outcome is not None
        await asyncio.wait([self._outcome])
        error = self._outcome.exception()
        if error is None:
            await asyncio.Event().wait()
        assert error is not None
        return error

    async def stop(self) -> None:
        """Insert and commit what has been read, then leave the consumer group."""
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _main(self) -> None:
        error: BaseException | None = None
        try:
            self._run()
            self._finish_write()  # the last write: what was read before the stop
        except BaseException as exc:
            error = exc
            log.exception("the usage sink stopped")
            self._abandon_write()  # its intents stay: the next owner replays them
        finally:
            try:
                self._consumer.close()  # leaves the group
            except BaseException as exc:
                error = error or exc
                log.exception("the usage sink could not leave its group")
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._settle, error)

    def _settle(self, error: BaseException | None) -> None:
        assert self._outcome is not None
        if error is None:
            self._outcome.set_result(None)
        else:
            self._outcome.set_exception(error)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._collect()
            if not self._finish_write():
                return  # stopped while ClickHouse failed: that write's intents must stay for the next start
            batches = [] if self._assigning else self._take_batches()
            if batches and self._commit_intents(batches):  # before reading on: it is quick while nothing is read
                self._writing = self._start_write(batches)
            self._resume_paused()

    def _resume_paused(self) -> None:
        if self._paused:
            self._consumer.resume(self._paused)
            self._paused = []

    def _finish_write(self) -> bool:
        """Wait for the write in flight, inserting failed batches again with backoff, and commit its ends.

        Returns False if a stop came while inserts failed (nothing of the write is committed: its intents
        stay); raises what ClickHouse refuses for good (a schema mismatch). While inserts fail or take long,
        the consumer is polled with every partition paused, so a rebalance finds this sink answering (its
        revocation callback abandons the write to the next owner's replay).
        """
        backoff_s = 0.2
        while (write := self._writing) is not None:
            _, running = concurrent.futures.wait(write.inserts, timeout=_SERVE_GROUP_AFTER_S)
            if running:
                self._serve_group(_READ_WAIT_S)
                continue
            failed = [n for n, insert in enumerate(write.inserts) if insert.exception() is not None]
            if not failed:
                self._writing = None
                self._commit_ends(write.batches)
                return True
            for n in failed:
                error = write.inserts[n].exception()
                metrics.SINK_ERRORS.labels(kind="insert").inc()
                if not isinstance(error, StoreError) or not error.retriable:
                    self._abandon_write()
                    raise error  # type: ignore[misc]
                log.warning("insert failed; retrying", extra={"batch": write.batches[n].token, "error": str(error), "retry_in_s": backoff_s})
            retry_at = time.monotonic() + backoff_s
            while self._writing is write and not self._stopping.is_set() and (left_s := retry_at - time.monotonic()) > 0:
                self._serve_group(min(left_s, _READ_WAIT_S))
            if self._stopping.is_set():
                self._abandon_write()
                return False
            if self._writing is write:  # not abandoned by a revocation meanwhile
                for n in failed:
                    write.inserts[n] = self._submit(write.batches[n])
            backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
        return True

    def _abandon_write(self) -> None:
        """Give up the write in flight without committing anything of it (its intents stay in Kafka)."""
        if self._writing is not None:
            for insert in self._writing.inserts:
                insert.cancel()  # those not started yet; one under way finishes, and a replay of it is a duplicate
            self._writing = None

    def _serve_group(self, seconds: float) -> None:
        """Wait ``seconds`` in the consumer, so that group changes are answered (in its callbacks), with
        every partition paused; records a fetch had already brought are kept as read."""
        paused = {tp.partition for tp in self._paused}
        unpaused = [tp for tp in self._consumer.assignment() if tp.partition not in paused]
        if unpaused:
            self._consumer.pause(unpaused)
            self._paused += unpaused
        self._add(self._consumer.consume(_READ_STEP, seconds))

    def _commit_landed_write(self) -> None:
        """Commit the write in flight's ends as soon as every insert of it has landed, instead of after
        this read: the committed offsets (consumer lag, the next owner's start) follow the inserts."""
        write = self._writing
        if write is not None and all(insert.done() and insert.exception() is None for insert in write.inserts):
            self._writing = None
            self._commit_ends(write.batches)

    def _partitions_revoked(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        """Finish the write in flight while its commits can still land, then forget what was read.

        A write still inserting after `_REVOKE_WAIT_S` (ClickHouse failing) is abandoned: its intents stay
        in Kafka for the next owner to replay (an insert of it landing late is a duplicate then), and no
        late commit of it can land once the partitions are someone else's.
        """
        self._assigning = True  # no batch is cut and no intent committed until the next assignment is loaded
        write = self._writing
        if write is not None:
            done, running = concurrent.futures.wait(write.inserts, timeout=_REVOKE_WAIT_S)
            if not running and all(insert.exception() is None for insert in done):
                self._writing = None
                self._commit_ends(write.batches)
            else:
                self._abandon_write()
        self._forget_partitions(revoked)

    def _partitions_lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        """Partitions already someone else's: nothing of them may be committed any more."""
        self._assigning = True
        self._abandon_write()
        self._forget_partitions(lost)

    def _forget_partitions(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:  # not committed: the next owner reads them again
            self._pending.pop(tp.partition, None)
            self._fences.pop(tp.partition, None)
        try:  # a pause outlives the assignment in librdkafka: a partition assigned again would stay paused
            self._resume_paused()
        except KafkaException as exc:  # the next assignment resumes what it gets anyway
            log.warning("could not resume paused partitions", extra={"error": str(exc)})
            self._paused = []

    def _partitions_assigned(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        """Load the intents left on the assigned partitions (their next batches are fixed) and read every
        partition from its committed offset. A failure to read them raises out of the read, and stops the
        sink: better than cutting batches at other bounds than an interrupted one's."""
        self._assigning = True
        committed = consumer.committed(assigned, timeout=_KAFKA_TIMEOUT_S)
        fences = {}
        for tp in committed:
            if tp.error is not None:
                raise KafkaException(tp.error)
            # confluent-kafka stores metadata with a trailing NUL (other clients read "inflight:<last>\0").
            metadata = (tp.metadata or "").rstrip("\x00")
            if metadata.startswith(_INFLIGHT):
                fences[tp.partition] = int(metadata.removeprefix(_INFLIGHT))
                log.info("replaying an interrupted batch", extra={"partition": tp.partition, "from": tp.offset, "to": fences[tp.partition]})
        consumer.assign(committed)  # from each committed offset (OFFSET_INVALID, none: the earliest kept)
        consumer.resume(committed)  # whatever an earlier assignment left paused
        self._pending.clear()
        self._fences = fences
        self._paused = []
        self._assigning = False

    def _collect(self) -> None:
        """Read until enough rows are pending, the flush interval has passed, or a stop is requested.

        A replayed batch must be read to its recorded end whatever its size: while one is incomplete
        and the other partitions have filled their share, those partitions are paused.
        """
        settings = self._settings
        deadline = time.monotonic() + settings.sink_flush_interval_s
        while not self._stopping.is_set():
            unfenced = sum(len(pending.offsets) for partition, pending in self._pending.items() if partition not in self._fences)
            room = settings.sink_batch_max_rows - unfenced
            left_s = deadline - time.monotonic()
            if left_s <= 0 or (room <= 0 and not self._incomplete_fences()):
                return
            if room <= 0 and not self._paused:
                self._paused = [tp for tp in self._consumer.assignment() if tp.partition not in self._fences]
                self._consumer.pause(self._paused)
            self._commit_landed_write()
            self._add(self._consumer.consume(_READ_STEP, min(left_s, _READ_WAIT_S)))  # group changes run in here

    def _add(self, messages: list[Message]) -> None:
        for partition, run in itertools.groupby(messages, Message.partition):
            records = list(run)
            good = [message for message in records if message.error() is None]
            if len(good) < len(records):
                self._read_errors(records)
            if good:
                self._pending.setdefault(partition, _Pending()).add(partition, good)  # type: ignore[arg-type]

    @staticmethod
    def _read_errors(messages: list[Message]) -> None:
        for message in messages:
            error = message.error()
            if error is None:
                continue
            if error.fatal():
                raise KafkaException(error)
            log.warning("could not read the events topic", extra={"error": str(error)})

    def _incomplete_fences(self) -> bool:
        return any(
            not (pending := self._pending.get(partition)) or not pending.offsets or pending.offsets[-1] < fence
            for partition, fence in self._fences.items()
        )

    def _take_batches(self) -> list[Batch]:
        """Cut each partition's pending records into its next batch.

        A fenced partition yields its batch only once the fence offset has been read, and the batch
        stops there; every other partition flushes all it has.
        """
        batches = []
        for partition, pending in list(self._pending.items()):
            fence = self._fences.get(partition)
            if fence is None:
                cut = min(len(pending.offsets), self._settings.sink_batch_max_rows)  # one block, whatever was read
            elif pending.offsets and pending.offsets[-1] >= fence:
                cut = bisect_right(pending.offsets, fence)
                del self._fences[partition]  # the replayed batch is cut; a failed commit sets the fence again
            else:
                continue
            if cut:
                batches.append(pending.take(self._topic, partition, cut))
        return batches

    def _commit_intents(self, batches: list[Batch]) -> bool:
        try:
            self._commit([TopicPartition(b.topic, b.partition, b.first, metadata=f"{_INFLIGHT}{b.last}") for b in batches])
        except KafkaException as exc:
            self._forget(batches, f"intent commit failed: {exc}")
            return False
        return True

    def _commit_ends(self, batches: list[Batch]) -> None:
        if self._settings.sink_commit_delay_s:
            time.sleep(self._settings.sink_commit_delay_s)
        try:
            self._commit([TopicPartition(b.topic, b.partition, b.last + 1, metadata="") for b in batches])
        except KafkaException as exc:
            # Inserted but not committed: whoever owns the partition next replays the intent, and the
            # deduplication token makes that replay a no-op.
            self._forget(batches, f"commit after insert failed: {exc}")

    def _commit(self, offsets: list[TopicPartition]) -> None:
        committed: Any = self._consumer.commit(offsets=offsets, asynchronous=False)
        for tp in committed or []:
            if tp.error is not None:
                raise KafkaException(tp.error)

    def _start_write(self, batches: list[Batch]) -> _Write:
        """Queue the inserts of ``batches`` (their intents committed) on the store's writer thread."""
        for batch in batches:
            metrics.SINK_SKIPPED.inc(batch.skipped)
        return _Write(batches, [self._submit(batch) for batch in batches])

    def _submit(self, batch: Batch) -> concurrent.futures.Future[None]:
        rows = batch.rows.num_rows
        if not rows:  # every record of the batch was refused: only its offsets are committed
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.set_result(None)
            return done
        started = []

        def stream() -> bytes:  # on the writer thread, as the insert starts
            started.append(time.perf_counter())
            return arrow_stream(batch.rows)

        def count(insert: concurrent.futures.Future[None]) -> None:
            if not insert.cancelled() and insert.exception() is None:
                metrics.SINK_INSERT_SECONDS.observe(time.perf_counter() - started[0])
                metrics.SINK_ROWS.inc(rows)
                log.debug("batch inserted", extra={"batch": batch.token, "rows": rows})

        insert = self._store.submit_arrow_insert("usage_events", stream, EVENT_SCHEMA.names, dedup_token=batch.token)
        insert.add_done_callback(count)
        return insert

    def _forget(self, batches: list[Batch], reason: str) -> None:
        """Give up batches whose offsets could not be committed.

        Their partitions are read again from the batch's first offset, by whoever owns them next: this
        sink, if they are still its own (a replay fenced at the batch's end, in case its intent landed).
        What was read past them is dropped and read again after them.
        """
        metrics.SINK_ERRORS.labels(kind="commit").inc()
        log.warning("dropping batches after a failed commit; their partitions will be replayed", extra={"reason": reason})
        assigned = {tp.partition for tp in self._consumer.assignment()}
        for batch in batches:
            self._pending.pop(batch.partition, None)
            self._fences.pop(batch.partition, None)
            if batch.partition in assigned:
                self._consumer.seek(TopicPartition(batch.topic, batch.partition, batch.first))
                self._fences[batch.partition] = batch.last
        self._resume_paused()  # a replay read at once, not after the flush interval
