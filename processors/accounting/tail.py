"""The sink's rollups, followed as they are published, into a `PlanLedger`.

The follower reads every partition of the rollups topic (`rollups`) from given offsets (where the sink's
committed metadata said they stood when the ledger was loaded) and adds each batch past the ledger's split
to the ledger, each chunk once. It runs on a thread of its own with librdkafka (confluent-kafka), which
fetches and decompresses outside the interpreter lock: the API process that hosts it (and, in `throttlex
run`, the sink and the worker) keeps its lock for its own work.

It reads with a consumer group of its own that never commits or joins (librdkafka requires a group
name even to read assigned partitions), so no broker state is left behind. Only its thread calls the
consumer: librdkafka's Python binding serialises calls on one consumer, and a call from another thread
would wait behind the follower's polls.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.kafka_access import KafkaAccess
from throttlex.processors.accounting.ledger import PlanLedger
from throttlex.processors.accounting.rollups import RollupCounter, RollupGap, decode

log = logging.getLogger(__name__)

_BATCH = 1_000
_POLL_S = 0.1
_SETTLE_POLL_S = 0.005


class RollupFollower:
    """Feeds ``ledger`` every batch past ``splits`` (events partition -> first offset not loaded from ClickHouse)
    from the rollups of ``topic``, read from ``starts`` (partition -> rollups offset; None: the earliest kept)."""

    def __init__(
        self, kafka: KafkaAccess | str, topic: str, starts: dict[int, int | None], splits: dict[int, int], ledger: PlanLedger
    ) -> None:
        self.ledger = ledger
        self._counters = {partition: RollupCounter(split) for partition, split in splits.items()}
        self._consumer = Consumer({
            **KafkaAccess.of(kafka).librdkafka_config(), "group.id": f"throttlex-ledger-{uuid.uuid4()}",
            "enable.auto.commit": False, "enable.auto.offset.store": False, "fetch.wait.max.ms": 50,
            "auto.offset.reset": "earliest",  # an offset gone with retention: what is left
        })  # fmt: skip
        self._consumer.assign([
            TopicPartition(topic, partition, OFFSET_BEGINNING if start is None else start) for partition, start in starts.items()
        ])  # fmt: skip
        self._stopping = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="usage-rollups", daemon=True)
        self._thread.start()

    @property
    def partitions(self) -> list[int]:
        return sorted(self._counters)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self._consumer.close)

    async def wait_until_read(self, partition: int, until_offset: int, wait_s: float) -> bool:
        """True once the follower has counted the batches of events ``partition`` up to ``until_offset``; False
        after ``wait_s``."""
        deadline = asyncio.get_running_loop().time() + wait_s
        counter = self._counters.get(partition)
        while counter is None or counter.position < until_offset:
            if asyncio.get_running_loop().time() >= deadline:
                log.warning("the sink's rollups are behind; counting what was read", extra={"partition": partition})
                return False
            await asyncio.sleep(_SETTLE_POLL_S)
        return True

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                for message in self._consumer.consume(_BATCH, _POLL_S):
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("the rollups follower could not read Kafka", extra={"error": str(error)})
                        continue
                    rollup = decode(message.value())  # type: ignore[arg-type]
                    counter = self._counters[message.partition()]  # type: ignore[index]
                    if counter.counts(rollup):
                        self.ledger.add_units(rollup.minutes, rollup.sizes, rollup.keys, rollup.units, wall_clock_ms())
                        counter.counted(rollup)  # after the ledger has them: a settled read sees them
        except RollupGap as exc:  # reads notice (`alive`) and load the ledger again
            self.failure = exc
            log.error("the sink's rollups have a gap; the plan ledger will be loaded again", extra={"error": str(exc)})
        except BaseException as exc:  # a defect: reads notice (`alive`) and start a new follower
            self.failure = exc
            log.exception("the rollups follower stopped")
