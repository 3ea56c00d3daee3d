"""Consumer lag of one consumer group on one topic, exported as a gauge.

Lag is the sum over partitions of the end offset minus the group's committed offset: events the
group has not finished yet. Read from the broker every few seconds with the admin API, so it means the
same for the worker and the sink.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from throttlex.ingest.kafka_access import KafkaAccess

from throttlex.processors import metrics

log = logging.getLogger(__name__)


async def watch_lag(kafka: KafkaAccess | str, group: str, topic: str, *, interval_s: float = 5.0) -> None:
    """Update ``throttlex_consumer_lag_events{group=...}`` until cancelled."""
    options = KafkaAccess.of(kafka).aiokafka_options()
    admin = AIOKafkaAdminClient(**options)
    offsets = AIOKafkaConsumer(**options)  # no group: reads end offsets only
    await admin.start()
    await offsets.start()
    try:
        while True:
            try:
                [description] = await admin.describe_topics([topic])
                partitions = [TopicPartition(topic, p["partition"]) for p in description["partitions"]]
                ends = await offsets.end_offsets(partitions)
                committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
                lag = sum(end - max(0, committed[tp].offset if tp in committed else 0) for tp, end in ends.items())
                metrics.CONSUMER_LAG.labels(group=group).set(lag)
            except (KafkaError, OSError, KeyError, ValueError) as exc:
                log.warning("could not read consumer lag", extra={"group": group, "error": str(exc)})
            await asyncio.sleep(interval_s)
    finally:
        await offsets.stop()
        await admin.close()
