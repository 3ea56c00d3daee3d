"""The events on their way to ClickHouse, followed as they are written, into a `PlanLedger`.

The follower reads every partition of the events topic from given offsets (the sink group's committed
ones when the ledger was loaded) and adds each event to the ledger. It runs on a thread of its own with
librdkafka (confluent-kafka), which fetches and decompresses outside the interpreter lock: the API
process that hosts it (and, in `throttlex run`, the sink and the worker) keeps its lock for its own
work. Measured beside a sink storing 50,000 rows/s in the same process, an asyncio follower (aiokafka)
could not keep up, as its parsing competed for the lock with the sink's.

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

from confluent_kafka import Consumer, KafkaError, TopicPartition

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.kafka_access import KafkaAccess
from throttlex.processors.accounting.ledger import PlanLedger

log = logging.getLogger(__name__)

_BATCH = 1_000
_POLL_S = 0.1
_SETTLE_POLL_S = 0.005


class TailFollower:
    """Feeds ``ledger`` every event of ``topic`` from ``offsets`` (partition -> first offset) on."""

    def __init__(self, kafka: KafkaAccess | str, topic: str, offsets: dict[int, int], ledger: PlanLedger) -> None:
        self.ledger = ledger
        self._topic = topic
        self._positions = dict(offsets)  # partition -> next offset to read; read by other threads
        self._consumer = Consumer({
            **KafkaAccess.of(kafka).librdkafka_config(), "group.id": f"throttlex-ledger-{uuid.uuid4()}",
            "enable.auto.commit": False, "enable.auto.offset.store": False, "fetch.wait.max.ms": 50,
            "auto.offset.reset": "earliest",  # an offset gone with retention: what is left, as the sink reads it
        })  # fmt: skip
        self._consumer.assign([TopicPartition(topic, partition, offset) for partition, offset in offsets.items()])
        self._stopping = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="usage-tail", daemon=True)
        self._thread.start()

    @property
    def partitions(self) -> list[int]:
        return sorted(self._positions)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self._consumer.close)

    async def wait_until_read(self, partition: int, until_offset: int, wait_s: float) -> bool:
        """True once the follower has read ``partition`` up to ``until_offset``; False after ``wait_s``."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while self._positions.get(partition, -1) < until_offset:
            if asyncio.get_running_loop().time() >= deadline:
                log.warning("the usage tail is behind; counting what it has read", extra={"partition": partition})
                return False
            await asyncio.sleep(_SETTLE_POLL_S)
        return True

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                messages = self._consumer.consume(_BATCH, _POLL_S)
                if not messages:
                    continue
                values: list[bytes | None] = []
                last: dict[int | None, int | None] = {}
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("the usage tail could not read Kafka", extra={"error": str(error)})
                        continue
                    values.append(message.value())
                    last[message.partition()] = message.offset()
                self.ledger.add(values, wall_clock_ms())
                for partition, offset in last.items():  # after the ledger has them: a settled read sees them
                    if partition is not None and offset is not None:
                        self._positions[partition] = offset + 1
        except BaseException as exc:  # a defect: reads notice (`alive`) and start a new follower
            self.failure = exc
            log.exception("the usage tail stopped")
