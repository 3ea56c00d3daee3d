"""The usage sink: Kafka events into ClickHouse exactly once, in large batches.

A librdkafka consumer (confluent-kafka) with manual commits, not a stream framework's agent, which
acknowledges events even when the code handling them raised. Exactly-once comes from three steps per
batch, each batch holding one Kafka partition's offsets ``first..last``:

1. **Intent.** Commit the partition's current position with metadata ``inflight:<last>``: the batch's
   boundaries are now durable in Kafka.
2. **Insert** the rows with ``insert_deduplication_token = "<topic>/<partition>/<first>-<last>"``.
   ClickHouse remembers the tokens of recent inserts (``non_replicated_deduplication_window``) and
   drops a repeated block, in ``usage_events`` and in every rollup fed by a materialized view.
3. **Commit** ``last + 1`` with empty metadata.

After a crash anywhere in between, the partition's next owner reads the intent, rebuilds exactly the
same batch (it waits for offset ``last`` and goes no further) and inserts it with the same token: a
batch that had landed is dropped as a duplicate, one that had not lands now. A replay then asks which of
the batch's offsets ClickHouse holds, and inserts the rows it lacks under a token of their own: embedded
ClickHouse killed at the wrong moment can remember a token whose part it did not keep.

ClickHouse also keeps, per partition, the offset after the highest one stored (``sink_progress``, fed by a
materialized view of every insert). A sink taking a partition with no intent on it resumes from there when
Kafka's committed offset is missing (the group's offsets expired while it was idle) or behind it: what is
stored, not the deduplication window's reach, decides, so no event is stored twice however long the sink
was away. An intent is always replayed (its batch is recent, within the window): on a cluster a batch may
have landed on some shards and not others. Inserts that fail are
retried with backoff and nothing is committed meanwhile, so no event is lost; an insert ClickHouse refuses as
such (a schema mismatch) stops the sink with the reason instead. A batch is one block (at most
``sink_batch_max_rows``, below ClickHouse's ``min_insert_block_size_rows``), so it lands whole or not at all.

Two threads of its own, so the event loop that starts the sink never waits for it:

- **usage-sink** reads, validates records into Arrow columns as they arrive (`processors.accounting.rows`),
  cuts batches and makes every consumer call, commits and rebalances included. librdkafka fetches and
  decompresses on threads of its own, outside the interpreter lock, and hands over records it built in C:
  half the interpreter time a record cost with aiokafka (`BENCHMARKS.md`).
- **usage-sink-insert** inserts one write (the batches cut at once) at a time while the next batches
  are read; ClickHouse works outside the interpreter lock, so reading and inserting share the cores.
  The reading thread commits a write's ends once its inserts are done, so each partition's commits
  stay in order.

Rebalances run inside the reading thread's ``consume`` (librdkafka's rebalance callbacks), which the
reading thread keeps calling while it waits for a write (it pauses the partitions instead of blocking).
A revocation first finishes the write in flight while its commits can still land; a write still
inserting after `_REVOKE_WAIT_S` (ClickHouse failing) is abandoned: its intents stay in Kafka for the
next owner to replay, and nothing commits it once the partitions are someone else's. Partitions lost
without a revocation (this sink missed its session) commit nothing at all: they may be someone else's
already.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from bisect import bisect_right
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from throttlex.processors import metrics
from throttlex.processors.settings import SinkSettings
from throttlex.processors.tasks import crash_of
from throttlex.processors.topics import APPEND_TIME, ensure_topics
from throttlex.processors.accounting import rollups
from throttlex.processors.accounting.rows import EVENT_SCHEMA, arrow_stream, event_rows
from throttlex.processors.accounting.store import StoreError, UsageStore

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
_READ_STEP = 2_000
"""Records one ``consume`` call returns at most."""
_POLL_S = 0.1
"""Longest wait in one ``consume`` call: how soon the reading thread notices a stop or a finished write."""
_REVOKE_WAIT_S = 10.0
_KAFKA_TIMEOUT_S = 10.0


class _Pending:
    """What was read from one partition and is not in a batch yet: every offset read, and the valid
    events among them as rows (in Arrow record batches, one per read)."""

    __slots__ = ("offsets", "row_offsets", "rows", "since")

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.row_offsets: list[int] = []
        self.rows: list[pa.RecordBatch] = []
        self.since = 0.0
        """When the oldest record not in a batch yet was read (`time.monotonic`)."""

    def add(self, partition: int, messages: list[Message]) -> None:
        offsets: list[int] = list(map(Message.offset, messages))  # type: ignore[arg-type]
        if self.offsets and offsets[0] <= self.offsets[-1]:  # librdkafka drops what a seek or rebalance outdated
            raise RuntimeError(f"partition {partition} read offset {offsets[0]} after {self.offsets[-1]}")
        appended = [message.timestamp()[1] for message in messages]
        rows, row_offsets = event_rows(list(map(Message.value, messages)), offsets, partition, appended)
        if not self.offsets:
            self.since = time.monotonic()
        self.offsets += offsets
        self.row_offsets += row_offsets
        self.rows.append(rows)

    def take(self, topic: str, partition: int, count: int, *, replayed: bool) -> Batch:
        """The first ``count`` records read, as a batch."""
        first, last = self.offsets[0], self.offsets[count - 1]
        stored = bisect_right(self.row_offsets, last)
        table = pa.Table.from_batches(self.rows, EVENT_SCHEMA)
        self.rows = table.slice(stored).to_batches()
        del self.offsets[:count], self.row_offsets[:stored]  # what is left was read after `since`: it keeps it
        return Batch(topic, partition, first, last, table.slice(0, stored), skipped=count - stored, replayed=replayed)


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
    replayed: bool = False
    """An interrupted batch inserted again (its intent was left in Kafka)."""

    @property
    def token(self) -> str:
        return f"{self.topic}/{self.partition}/{self.first}-{self.last}"

    def at(self, offset: int, metadata: str = "") -> TopicPartition:
        """The batch's partition at ``offset`` (to commit, with ``metadata``, or to seek to)."""
        return TopicPartition(self.topic, self.partition, offset, metadata)


@dataclass
class _Write:
    """Batches whose intents are committed, being inserted on the insert thread."""

    batches: list[Batch]
    done: Future[bool] = field(default_factory=Future)
    """True once every batch is inserted; False if it gave up (stopping or abandoned while inserts failed)."""
    abandoned: threading.Event = field(default_factory=threading.Event)
    """Set when its partitions moved before it was done: it inserts nothing more, and nothing commits it."""
    rollup_ends: dict[int, int] = field(default_factory=dict)
    """Partition -> the rollups offset after its batch's rollup records, once published."""


class UsageSink:
    def __init__(self, settings: SinkSettings, store: UsageStore) -> None:
        self._settings = settings
        self._store = store
        self._topic = settings.events_topic
        self._consumer = Consumer({
            **settings.kafka.librdkafka_config(), "group.id": settings.sink_group,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",  # nothing committed, or an offset retention deleted: what is left
            "session.timeout.ms": 10_000,  # a sink that died gives its partitions up this soon (librdkafka's default: 45 s)
            # Fetch far ahead: with librdkafka's defaults (100,000 records, 1 MiB a partition) the fetches, not
            # the sink, set the pace (~290,000 records/s read and dropped here, 700,000 with these; the queue
            # stays within queued.max.messages.kbytes, 64 MiB).
            "queued.min.messages": 500_000, "max.partition.fetch.bytes": 8 * 1024 * 1024, "fetch.wait.max.ms": 100,
            "error_cb": _kafka_error, "logger": log,
        })  # fmt: skip
        self._rollups_topic = rollups.topic_of(settings.events_topic)
        self._producer = Producer({**rollups.producer_config(settings.kafka), "error_cb": _kafka_error, "logger": log})
        self._rollup_ends: dict[int, int] = {}
        """Partition -> the rollups offset after the last batch committed, where this sink knows it."""
        self._assigned: set[int] = set()
        self._pending: dict[int, _Pending] = {}
        self._fences: dict[int, int] = {}
        """Partitions whose next batch must end exactly at this offset (an intent left by a crash)."""
        self._assigning = False
        """A rebalance is under way: no batch is cut until the new assignment is loaded."""
        self._writing: _Write | None = None
        """The batches being inserted while the next ones are read (at most one write at a time)."""
        self._paused = False
        """Reading is paused until the write in flight is done: a partition holds two batches' worth."""
        self._gave_up = False
        """A write gave up at a stop while ClickHouse failed: its intents must stay for the next start."""
        self._inserts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-sink-insert")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished: asyncio.Future[None] | None = None
        """Done when the reading thread ends: with what stopped it, if it failed."""

    async def start(self) -> None:
        settings = self._settings
        await ensure_topics(
            settings.kafka,
            {settings.events_topic: settings.events_partitions, self._rollups_topic: settings.events_partitions},
            replication_factor=settings.topic_replication_factor,
            exact=[settings.events_topic, self._rollups_topic],
            configs={settings.events_topic: APPEND_TIME, self._rollups_topic: rollups.RETENTION},
        )
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        self._consumer.subscribe(
            [self._topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._thread = threading.Thread(target=self._main, args=(loop,), name="usage-sink", daemon=True)
        self._thread.start()

    @property
    def partitions(self) -> list[int]:
        """The partitions of the events topic this sink owns now."""
        return sorted(self._assigned)

    async def crashed(self) -> BaseException:
        """Wait until the sink fails for good (it retries ClickHouse errors itself); return why."""
        assert self._finished is not None
        return await crash_of(self._finished)

    async def stop(self) -> None:
        """Insert and commit a batch of what each partition has read (up to the batch size; the rest, and a
        replayed batch not read to its end yet, are read again at the next start), then leave the group."""
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        else:
            await asyncio.to_thread(self._consumer.close)
        self._inserts.shutdown(wait=True)

    def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        error: BaseException | None = None
        try:
            self._run()
        except BaseException as exc:  # the runner reports it (`crashed`)
            error = exc
        finally:
            try:
                self._consumer.close()  # leaves the group (a last revocation, with nothing in flight)
            except Exception as exc:  # noqa: BLE001 - reported with the first failure, if any
                log.warning("closing the sink's consumer failed", extra={"error": repr(exc)})
            try:
                loop.call_soon_threadsafe(_resolve, self._finished, error)
            except RuntimeError:  # the loop that started the sink is closed: nobody waits for it
                pass

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._collect()
                self._settle_write(wait=True)
                if self._gave_up:
                    return  # stopped while ClickHouse failed: that write's intents must stay for the next start
                batches = [] if self._assigning else self._take_batches()
                if batches and self._commit_intents(batches):
                    self._writing = _Write(batches)
                    self._inserts.submit(self._insert_all, self._writing)
        finally:
            self._settle_write(wait=True)

    def _collect(self) -> None:
        """Read until a batch can be cut or a stop is requested; commit the ends of the write in flight as
        soon as its inserts are done.

        A batch can be cut once one is due (`_cut_size`) and no write is in flight. While one is, reading goes
        on until a partition holds two batches' worth of records; then the partitions are paused until the
        write is done (a ClickHouse that stalls stops the reading instead of filling memory), and ``consume``
        goes on serving rebalances meanwhile.
        """
        settings = self._settings
        while not self._stopping.is_set():
            self._settle_write(wait=False)
            if self._writing is None and self._paused:
                self._consumer.resume(self._consumer.assignment())
                self._paused = False
            now = time.monotonic()
            due = not self._assigning and any(self._cut_size(p, pending, now) for p, pending in self._pending.items())
            if self._writing is None and due:
                return
            if self._writing is not None and not self._paused and any(
                len(pending.offsets) >= 2 * settings.sink_batch_max_rows for pending in self._pending.values()
            ):
                self._consumer.pause(self._consumer.assignment())
                self._paused = True
            aging = [pending.since for p, pending in self._pending.items() if pending.offsets and p not in self._fences]
            wait_s = _POLL_S if due or not aging else min(min(aging) + settings.sink_flush_interval_s - now, _POLL_S)
            self._add(self._consumer.consume(_READ_STEP, max(wait_s, 0.001)))

    def _add(self, messages: list[Message]) -> None:
        if not messages:
            return
        if not any(pending.offsets for pending in self._pending.values()):
            log.debug("reading the next batches", extra={"records": len(messages)})
        by_partition: dict[int, list[Message]] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                _kafka_error(error)
                continue
            by_partition.setdefault(message.partition(), []).append(message)  # type: ignore[arg-type]
        for partition, read in by_partition.items():
            if partition not in self._assigned:
                continue
            pending = self._pending.setdefault(partition, _Pending())
            pending.add(partition, read)
            fence = self._fences.get(partition)
            if fence is not None and pending.offsets[0] > fence:  # Kafka's retention deleted the batch's records
                log.warning("an interrupted batch's records are gone; reading on", extra={"partition": partition, "to": fence})
                del self._fences[partition]

    def _cut_size(self, partition: int, pending: _Pending, now: float) -> int:
        """How many of a partition's pending records make its batch now (0: none yet).

        A partition's batch is cut once it holds ``sink_batch_max_rows`` records, once its oldest record has
        waited ``sink_flush_interval_s``, or at a stop. Each batch is one insert, and an insert costs
        ClickHouse a fixed share on top of its rows (into this schema, about 50 ms: 10,000-row inserts cost
        6.5-8 CPU-µs a row, 200,000-row ones 1.1-1.8), so batches are cut full and per partition, not
        shared among the partitions. A replayed batch (a fenced partition) is cut exactly at its recorded
        end, once that has been read, whatever its size.
        """
        if not pending.offsets:
            return 0
        fence = self._fences.get(partition)
        if fence is not None:
            return bisect_right(pending.offsets, fence) if pending.offsets[-1] >= fence else 0
        settings = self._settings
        if (
            len(pending.offsets) >= settings.sink_batch_max_rows
            or now - pending.since >= settings.sink_flush_interval_s
            or self._stopping.is_set()
        ):
            return min(len(pending.offsets), settings.sink_batch_max_rows)
        return 0

    def _take_batches(self) -> list[Batch]:
        """Cut every partition's batch that is due."""
        batches, now = [], time.monotonic()
        for partition, pending in list(self._pending.items()):
            if cut := self._cut_size(partition, pending, now):
                # a replayed batch is cut; a failed commit sets the fence again
                replayed = self._fences.pop(partition, None) is not None
                batches.append(pending.take(self._topic, partition, cut, replayed=replayed))
        return batches

    def _commit_intents(self, batches: list[Batch]) -> bool:
        failed = self._commit([
            b.at(b.first, rollups.commit_metadata(inflight=b.last, rollups=self._rollup_ends.get(b.partition))) for b in batches
        ])
        if failed:
            self._forget(batches, failed)  # all of them: the write is not started
        return not failed

    def _settle_write(self, *, wait: bool) -> None:
        """Commit the ends of the write in flight once its inserts are done (waiting for them if ``wait``)."""
        write = self._writing
        if write is None or not (wait or write.done.done()):
            return
        self._writing = None
        if not write.done.result():  # raises what stopped it for good (an insert ClickHouse refuses as such)
            self._gave_up = True
            return
        failed = self._commit([b.at(b.last + 1, rollups.commit_metadata(rollups=write.rollup_ends[b.partition]))
                               for b in write.batches])  # fmt: skip
        self._rollup_ends |= {b.partition: write.rollup_ends[b.partition] for b in write.batches if b.partition not in failed}
        if failed:
            # Inserted but not committed: whoever owns the partition next replays the intent, and the
            # deduplication token makes that replay a no-op.
            self._forget([b for b in write.batches if b.partition in failed], failed)

    def _commit(self, positions: list[TopicPartition]) -> dict[int, str]:
        """Commit ``positions``; what went wrong, by partition (empty: all committed)."""
        try:
            committed = self._consumer.commit(offsets=positions, asynchronous=False)
        except KafkaException as exc:
            return {tp.partition: str(exc.args[0]) for tp in positions}
        return {tp.partition: str(tp.error) for tp in committed or [] if tp.error is not None}

    def _insert_all(self, write: _Write) -> None:
        """On the insert thread: insert the write's batches in order, then resolve ``write.done``."""
        try:
            inserted = all(not write.abandoned.is_set() and self._insert(batch, write) for batch in write.batches)
            if inserted and self._settings.sink_commit_delay_s:
                time.sleep(self._settings.sink_commit_delay_s)
        except BaseException as exc:
            write.done.set_exception(exc)
        else:
            write.done.set_result(inserted)

    def _insert(self, batch: Batch, write: _Write) -> bool:
        """Insert one batch, retrying with backoff; False if a stop or a revocation came before it succeeded."""
        metrics.SINK_SKIPPED.inc(batch.skipped)
        if not self._publish_rollups(batch, write):
            return False
        if not batch.rows.num_rows:
            return True
        if not self._insert_rows(batch.rows, batch.token, write):
            return False
        if batch.replayed and not self._store.clustered and (missing := self._missing_rows(batch)).num_rows:
            # ClickHouse dropped the replay as a duplicate although some of its rows are not stored: a kill between
            # recording an insert's token and keeping its part (seen with embedded chDB, for one of two
            # month partitions of a batch). Those rows go in again under a token of their own. Not on a cluster:
            # there a replica may not have fetched a part yet, and its tokens are kept with the parts (Keeper).
            first = missing.column("kafka_offset")[0].as_py()
            log.error("a replayed batch was dropped as a duplicate but rows of it are missing; inserting them",
                      extra={"batch": batch.token, "missing": missing.num_rows})  # fmt: skip
            metrics.SINK_ERRORS.labels(kind="missing").inc()
            return self._insert_rows(missing, f"{batch.token}/missing/{first}+{missing.num_rows}", write)
        return True

    def _publish_rollups(self, batch: Batch, write: _Write) -> bool:
        """Publish the batch's rollup records (`rollups`), before its rows are stored, retrying what was not
        delivered with backoff; False if a stop or a revocation came first. A record sent twice (a delivery that
        timed out, then landed) is counted once by readers."""
        records = list(rollups.rollup_records(batch.rows, batch.first, batch.last))
        delivered: dict[int, int] = {}  # record -> its offset, whichever attempt delivered it
        errors: list[str] = []

        def report(index: int) -> Callable[[KafkaError | None, Message], None]:
            def delivery(error: KafkaError | None, message: Message) -> None:
                if error is None:
                    delivered[index] = message.offset()  # type: ignore[assignment]
                else:
                    errors.append(str(error))

            return delivery

        def attempt() -> str | None:
            try:
                for index, (key, value) in enumerate(records):
                    if index not in delivered:
                        self._producer.produce(self._rollups_topic, value, key, partition=batch.partition, on_delivery=report(index))
            except (BufferError, KafkaException) as exc:  # the queue full, or the record refused as such
                errors.append(repr(exc))
            self._producer.flush(_KAFKA_TIMEOUT_S)
            if len(delivered) == len(records):
                return None
            failure = "; ".join(errors[-3:]) or "timed out"
            errors.clear()
            return failure

        if not self._with_backoff(attempt, write, "publishing a batch's rollups", batch.token, "rollup"):
            return False
        write.rollup_ends[batch.partition] = max(delivered.values()) + 1
        return True

    def _missing_rows(self, batch: Batch) -> pa.Table:
        """The rows of ``batch`` whose offsets ClickHouse does not hold."""
        stored = self._store.stored_offsets_blocking(batch.partition, batch.first, batch.last)
        offsets = batch.rows.column("kafka_offset")
        return batch.rows.filter(pc.invert(pc.is_in(offsets, value_set=pa.array(stored, pa.uint64()))))

    def _insert_rows(self, rows: pa.Table, token: str, write: _Write) -> bool:
        """Insert ``rows`` as one block under ``token``, retrying with backoff; False if a stop or a revocation
        came before it succeeded."""
        data = arrow_stream(rows)

        def attempt() -> str | None:
            started = time.perf_counter()
            try:
                self._store.insert_formatted_blocking(
                    "usage_events", data, EVENT_SCHEMA.names, "ArrowStream", dedup_token=token
                )
            except StoreError as exc:
                if not exc.retriable:
                    metrics.SINK_ERRORS.labels(kind="insert").inc()
                    raise  # e.g. a schema that does not match: stop the sink and say why
                return str(exc)
            metrics.SINK_INSERT_SECONDS.observe(time.perf_counter() - started)
            return None

        if not self._with_backoff(attempt, write, "insert", token, "insert"):
            return False
        metrics.SINK_ROWS.inc(rows.num_rows)
        log.debug("batch inserted", extra={"batch": token, "rows": rows.num_rows})
        return True

    def _with_backoff(self, attempt: Callable[[], str | None], write: _Write, what: str, batch: str, kind: str) -> bool:
        """Call ``attempt`` (None: done, else why it failed) until it succeeds, waiting longer each time (up to
        `_MAX_BACKOFF_S`); False if a stop or a revocation comes first. Each failure is counted as ``kind``."""
        backoff_s = 0.2
        while (error := attempt()) is not None:
            metrics.SINK_ERRORS.labels(kind=kind).inc()
            log.warning(f"{what} failed; retrying", extra={"batch": batch, "error": error, "retry_in_s": backoff_s})
            if self._stopping.wait(backoff_s) or write.abandoned.is_set():
                return False
            backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
        return True

    def _forget(self, batches: list[Batch], failed: dict[int, str]) -> None:
        """Give up batches whose offsets could not be committed.

        Their partitions are read again from the batch's first offset, by whoever owns them next: this
        sink, if they are still its own (a replay fenced at the batch's end, in case its intent landed).
        What was read past them is dropped and read again after them.
        """
        metrics.SINK_ERRORS.labels(kind="commit").inc()
        log.warning("dropping batches after a failed commit; their partitions will be replayed", extra={"failed": failed})
        for batch in batches:
            self._pending.pop(batch.partition, None)
            self._fences.pop(batch.partition, None)
            if batch.partition in self._assigned:
                self._consumer.seek(batch.at(batch.first))
                self._fences[batch.partition] = batch.last

    # Rebalance callbacks: librdkafka calls them on the reading thread, inside `consume`.

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        """Finish the write in flight while its commits can still land, then forget what was read."""
        self._drop(revoked)  # first: a commit failing below seeks none of them
        write, outcome = self._writing, "nothing in flight"
        if write is not None:
            wait_for_futures([write.done], timeout=_REVOKE_WAIT_S)
            if write.done.done():
                self._settle_write(wait=True)
                outcome = "the write in flight finished"
            else:  # ClickHouse failing: the partitions' next owner replays its intents
                write.abandoned.set()
                self._writing = None
                outcome = "the write in flight abandoned, its intents left to replay"
        log.info("partitions revoked", extra={"partitions": sorted(tp.partition for tp in revoked), "write": outcome})

    def _on_lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        """Partitions taken away without a revocation (this sink missed its session): they may be another
        sink's already, so nothing of the write in flight is committed; the next owner replays its intents."""
        self._drop(lost)
        if self._writing is not None:
            self._writing.abandoned.set()
            self._writing = None
        log.warning("partitions lost", extra={"partitions": sorted(tp.partition for tp in lost)})

    def _drop(self, partitions: list[TopicPartition]) -> None:
        """Forget what was read of ``partitions``, no longer this sink's (not committed: their next owner reads
        it again); nothing is cut until the next assignment is loaded."""
        self._assigning = True
        for tp in partitions:
            self._assigned.discard(tp.partition)
            self._pending.pop(tp.partition, None)
            self._fences.pop(tp.partition, None)

    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        """Load the intents left on the assigned partitions (their next batches are fixed) and read every
        partition from its committed offset."""
        self._assigning = True  # until the intents are loaded: if that fails, nothing is cut (better than a replay at other bounds)
        committed = self._committed(assigned)
        stored = self._stored_ends()
        if committed is None or stored is None:
            return  # stopping: nothing more is cut or committed
        fences = {}
        self._rollup_ends = {}
        for tp in committed:
            fence, rollup_end = rollups.read_metadata(tp.metadata)
            if rollup_end is not None:
                self._rollup_ends[tp.partition] = rollup_end
            resume = self._resume_from(tp, stored.get(tp.partition, 0)) if fence is None else 0
            if resume > max(tp.offset, 0):
                log.warning("resuming after the last event stored in ClickHouse: Kafka's committed offset is "
                            + ("missing (expired?)" if tp.offset < 0 else "behind it"),
                            extra={"partition": tp.partition, "committed": tp.offset, "from": resume})  # fmt: skip
                tp.offset = resume
            elif tp.offset < 0:  # nothing committed, nothing stored: from the start
                tp.offset = OFFSET_BEGINNING
            elif fence is not None:  # replayed even if stored: on a cluster a batch may be stored on some shards only
                fences[tp.partition] = fence
                log.info("replaying an interrupted batch", extra={"partition": tp.partition, "from": tp.offset, "to": fence})
        consumer.assign(committed)
        consumer.resume(committed)  # librdkafka keeps a partition paused across a revocation and a new assignment
        self._paused = False
        self._pending.clear()
        self._fences = fences
        self._assigned = {tp.partition for tp in committed}
        self._assigning = False
        log.info("partitions assigned", extra={"partitions": self.partitions})

    def _committed(self, partitions: list[TopicPartition]) -> list[TopicPartition] | None:
        """The group's committed offsets and metadata of ``partitions``, asked until the coordinator answers;
        None if a stop comes first."""
        while not self._stopping.is_set():
            try:
                committed = list(self._consumer.committed(partitions, timeout=_KAFKA_TIMEOUT_S))
            except KafkaException as exc:
                error = str(exc.args[0])
            else:  # a partition whose offset could not be read must not be read from the start instead
                error = "; ".join(f"partition {tp.partition}: {tp.error}" for tp in committed if tp.error is not None)
                if not error:
                    return committed
            log.warning("could not read the sink's committed offsets; retrying", extra={"error": error})
            self._stopping.wait(1.0)
        return None


    def _stored_ends(self) -> dict[int, int] | None:
        """`UsageStore.stored_ends_blocking`, asked until ClickHouse answers; None if a stop comes first. An error
        ClickHouse will repeat (no ``sink_progress`` table: a schema older than this sink) stops the sink."""
        while not self._stopping.is_set():
            try:
                return self._store.stored_ends_blocking()
            except StoreError as exc:
                if not exc.retriable:
                    raise
                log.warning("could not read where the stored events end; retrying", extra={"error": str(exc)})
                self._stopping.wait(1.0)
        return None

    def _resume_from(self, tp: TopicPartition, stored_end: int) -> int:
        """``stored_end`` if the partition reaches that far; 0 (Kafka's committed offset decides) if ClickHouse holds
        offsets past the partition's end: they are another topic's (a recreated one), not this one's."""
        if not stored_end:
            return 0
        try:
            _, high = self._consumer.get_watermark_offsets(tp, timeout=_KAFKA_TIMEOUT_S)
        except KafkaException as exc:
            raise RuntimeError(f"could not read the end of partition {tp.partition}: {exc}") from exc
        if stored_end > high:
            log.error("ClickHouse holds offsets past this partition's end: sink_progress belongs to another events topic "
                      "(recreated?); resuming from Kafka's committed offset. Clear it: TRUNCATE TABLE sink_progress",
                      extra={"partition": tp.partition, "stored_end": stored_end, "end": high})  # fmt: skip
            return 0
        return stored_end


def _kafka_error(error: KafkaError) -> None:
    """librdkafka retries what passes (a broker restarting); say what it met."""
    log.warning("kafka error in the sink", extra={"error": str(error)})


def _resolve(finished: asyncio.Future[None] | None, error: BaseException | None) -> None:
    if finished is None or finished.done():
        return
    if error is None:
        finished.set_result(None)
    else:
        finished.set_exception(error)
