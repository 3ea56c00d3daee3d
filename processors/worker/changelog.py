"""The worker's durable state: one compacted changelog topic per input topic, one partition per input
partition, one record per limit key (`encode_key_state`; a tombstone when the key is dropped).

Why a restored partition and its resume position always agree: a worker commits an input offset in the
same Kafka transaction as the state records that cover it (`flush`), so the committed offset never passes
what the changelog holds. Each record carries the input offset it includes (`KeyState.version`), so state
written past the committed offset (a flush that was cut short by a crash, in any part) is still exact
for its key: the records up to that offset are skipped for that key when the input is read again, and
counted for every key whose newer state never reached Kafka.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from throttlex.ingest.kafka_access import KafkaAccess

from throttlex.processors.core.policy import PolicySet
from throttlex.processors.core.state import KeyState, decode_key_state

log = logging.getLogger(__name__)

TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": str(10 * 60 * 1000),  # roll often, so that restoring reads compacted segments
    "min.cleanable.dirty.ratio": "0.1",
}


def changelog_topic(group: str, input_topic: str) -> str:
    return f"{group}.state.{input_topic}"


async def restore(
    kafka: KafkaAccess | str, partitions: list[TopicPartition], policies: PolicySet, timeout_s: float = 120.0
) -> dict[TopicPartition, dict[str, KeyState]]:
    """Read changelog partitions from their start to their end; the last state of each key, or, if a
    worker that had lost the partition wrote after its new owner, the one that includes more input."""
    states: dict[TopicPartition, dict[str, KeyState]] = {tp: {} for tp in partitions}
    if not partitions:
        return states
    # "earliest" also for the position a fresh assignment starts from: with "latest", that reset could
    # land after the seek below and the partition would look read to its end.
    # Committed records only: a worker that lost the partition may have begun a transaction its successor's
    # start aborted (see `flush`).
    consumer = AIOKafkaConsumer(**KafkaAccess.of(kafka).aiokafka_options(), enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024,
                                isolation_level="read_committed")  # fmt: skip
    await consumer.start()
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await consumer.seek_to_beginning(*partitions)
        left = {tp for tp in partitions if await consumer.position(tp) < ends[tp]}
        async with asyncio.timeout(timeout_s):
            while left:
                batch = await consumer.getmany(*left, timeout_ms=500, max_records=10_000)
                for tp, records in batch.items():
                    keys = states[tp]
                    for record in records:
                        if record.offset >= ends[tp] or record.key is None:
                            continue
                        key = record.key.decode()
                        if record.value is None:
                            keys.pop(key, None)
                            continue
                        state = decode_key_state(record.value, policies)
                        current = keys.get(key)
                        if current is None or state.version >= current.version:
                            keys[key] = state
                for tp in list(left):
                    if await consumer.position(tp) >= ends[tp]:
                        left.discard(tp)
    finally:
        await consumer.stop()
    return states
