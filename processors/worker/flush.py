"""Writing the worker's state: each flush writes the keys that changed to their partitions' changelogs and
commits the input offsets they cover, one Kafka transaction per input partition.

The fence. Each input partition has a transactional producer of its own, whose id names the partition
(``<group>.<input topic>.<partition>``). Whichever worker takes a partition over starts that producer before it
reads the changelog back, and Kafka then aborts the previous owner's open transaction and refuses its later
ones (`Fenced`). So a worker that stalled past the session timeout (a GC pause, a frozen VM) and wakes up can
no longer make its older state the last record of a key, which compaction would keep as the only one;
restores read committed records only. aiokafka's transactions carry no consumer-group generation (no
KIP-447), which is why the fence is a producer per input partition rather than one per worker.

Order within a flush: the forwards and dead letters sent before it are acknowledged first; then the regroup
partitions' transactions, then the events partitions'. A regrouped key whose state includes a forward is
thus committed before the offset of the event that made the forward: a crash in between reads the event
again, and the key skips it (`KeyState.sources`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced
from aiokafka.structs import OffsetAndMetadata

from throttlex.ingest.kafka_access import KafkaAccess
from throttlex.processors import metrics
from throttlex.processors.core.state import encode_key_state
from throttlex.processors.worker import changelog
from throttlex.processors.worker.partition import Partition

log = logging.getLogger(__name__)

FLUSH_STEP = 200
"""Keys encoded between two turns of the event loop in a flush: small enough that the consumer's fetches and
the loop's own batches are not held up behind a large flush (about 2 ms of work)."""


class Fenced(RuntimeError):
    """Another worker has taken over a partition this one still wrote for: this worker's state of it is old."""

    def __init__(self, tp: TopicPartition, message: str) -> None:
        super().__init__(message)
        self.tp = tp


class StateWriter:
    """The transactional producers of the partitions a worker owns, and the flush that uses them."""

    def __init__(self, kafka: KafkaAccess, group: str, *, commit_delay_s: float = 0.0) -> None:
        self._kafka = kafka
        self._group = group
        self._commit_delay_s = commit_delay_s
        """A pause between writing a transaction's state and committing it (crash tests kill a worker in it)."""
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}

    async def take(self, partitions: Iterable[TopicPartition]) -> None:
        """Start the producers of the partitions assigned, afresh also for those this worker had: from here on
        any previous owner is fenced, this worker's own unfinished transactions are aborted, and a producer
        another worker fenced meanwhile is replaced."""
        partitions = list(partitions)
        await self.release(partitions)
        new = {tp: self._producer(tp) for tp in partitions}
        try:
            await asyncio.gather(*(producer.start() for producer in new.values()))
        except BaseException:
            await asyncio.gather(*(producer.stop() for producer in new.values()), return_exceptions=True)
            raise
        self._producers.update(new)

    async def release(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop the producers of partitions this worker no longer owns."""
        gone = [self._producers.pop(tp) for tp in partitions if tp in self._producers]
        await asyncio.gather(*(producer.stop() for producer in gone), return_exceptions=True)

    async def close(self) -> None:
        await self.release(list(self._producers))

    async def write_and_commit(
        self, changed: list[tuple[Partition, set[str]]], deliveries: list[asyncio.Future[Any]], covered: dict[Partition, int]
    ) -> None:
        """Write each changed key's state as it is now (it may include events after the covered offsets: its
        version says so) and commit the covered offsets, once every record sent before is acknowledged.

        Whatever is not written and committed is left for the next flush: its keys are marked changed again and
        its offsets stay uncommitted. Raises `Fenced` (after that) if another worker owns one of the partitions."""
        started = time.perf_counter()
        work = [(part, keys) for part, keys in changed if keys or part in covered]
        done: set[Partition] = set()
        try:
            if deliveries:
                await asyncio.gather(*deliveries)
            regrouped = [(part, keys) for part, keys in work if part.regrouped]
            if await self._transactions(regrouped, covered, done):
                # The events' offsets only once the forwards they made are in the regroup partitions' state.
                await self._transactions([(part, keys) for part, keys in work if not part.regrouped], covered, done)
        finally:
            for part, keys in work:
                if part not in done:
                    part.dirty |= keys
        metrics.STATE_FLUSH_SECONDS.observe(time.perf_counter() - started)

    async def _transactions(self, work: list[tuple[Partition, set[str]]], covered: dict[Partition, int], done: set[Partition]) -> bool:
        """One transaction per partition, concurrently; True if all of them committed. Raises `Fenced` once all
        have ended, if one was."""
        outcomes = await asyncio.gather(*(self._transaction(part, keys, covered.get(part)) for part, keys in work),
                                        return_exceptions=True)  # fmt: skip
        for (part, _), outcome in zip(work, outcomes):
            if outcome is True:
                done.add(part)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return all(outcomes)

    async def _transaction(self, part: Partition, keys: set[str], offset: int | None) -> bool:
        """Write ``keys`` and commit ``offset`` in one transaction; False if Kafka refused it (the producer is
        replaced before the partition's next transaction). `Fenced` if another worker owns the partition now."""
        producer = self._producers.get(part.tp)
        try:
            if producer is None:  # the last one failed: a new one, whose start aborts what that left open
                producer = self._producers[part.tp] = self._producer(part.tp)
                await producer.start()
            await self._write(producer, part, keys, offset)
        except (ProducerFenced, InvalidProducerEpoch) as exc:
            metrics.WORKER_ERRORS.labels(kind="fenced").inc()
            raise Fenced(part.tp, f"partition {part.tp.topic}:{part.tp.partition} was taken over by another worker "
                                  f"(this one stalled past the session timeout?): {exc}") from None  # fmt: skip
        except (KafkaError, OSError, AssertionError) as exc:  # AssertionError: aiokafka's, on a transaction state it did not expect
            metrics.WORKER_ERRORS.labels(kind="flush").inc()
            log.warning("state flush failed; written again at the next", extra={"partition": f"{part.tp.topic}:{part.tp.partition}",
                        "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
            await self.release([part.tp])
            return False
        metrics.STATE_RECORDS_WRITTEN.inc(len(keys))
        if offset is not None:
            part.committed = max(part.committed, offset)
        return True

    async def _write(self, producer: AIOKafkaProducer, part: Partition, keys: set[str], offset: int | None) -> None:
        topic = changelog.changelog_topic(self._group, part.tp.topic)
        state = part.engine.state
        async with producer.transaction():
            # Records go into batches built here and handed to the producer whole: a future, a partitioner call
            # and a queue entry per record would cost more than the record.
            sends = []
            batch = producer.create_batch()
            for n, key in enumerate(keys):
                value = encode_key_state(state[key]) if key in state else None
                if batch.append(key=key.encode(), value=value, timestamp=None) is None:  # full
                    sends.append(await producer.send_batch(batch, topic, partition=part.tp.partition))
                    batch = producer.create_batch()
                    batch.append(key=key.encode(), value=value, timestamp=None)
                if n % FLUSH_STEP == FLUSH_STEP - 1:
                    await asyncio.sleep(0)  # let the consumer loop go on between parts of a large flush
            if batch.record_count():
                sends.append(await producer.send_batch(batch, topic, partition=part.tp.partition))
            # A batch that failed fails only its own future: the transaction would commit without it.
            await asyncio.gather(*sends)
            if self._commit_delay_s:
                await asyncio.sleep(self._commit_delay_s)
            if offset is not None:
                await producer.send_offsets_to_transaction({part.tp: OffsetAndMetadata(offset, "")}, self._group)

    def _producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self._kafka.aiokafka_options(),
            transactional_id=f"{self._group}.{tp.topic}.{tp.partition}",
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_batch_size=1024 * 1024,
            max_request_size=4 * 1024 * 1024,
        )


def evict_idle(partitions: Iterable[Partition]) -> tuple[int, int]:
    """Drop idle keys (by each partition's watermark of enforcement time, never the wall clock) whose state a
    commit already covers, so reading the input again can never reach them; the next flush writes their
    tombstones. Returns the keys dropped and the keys left."""
    evicted = tracked = 0
    for part in partitions:
        state = part.engine.state
        for key in part.engine.idle_keys(part.watermark_ms):
            if state[key].version < part.committed:
                del state[key]
                part.dirty.add(key)
                evicted += 1
        tracked += len(state)
    return evicted, tracked
