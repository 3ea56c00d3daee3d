"""The gateway's producer on the real broker: every event delivered exactly once, and each key's
events in the partition every other ThrottleX producer (aiokafka's default partitioner, Kafka's
Java-compatible murmur2) puts them in — the worker needs all of a key's events in one partition."""

import asyncio
import uuid
from collections import Counter, defaultdict

from aiokafka import AIOKafkaConsumer

from throttlex.ingest.events import decode
from throttlex.ingest.producer import EventProducer
from tests.conftest import EventSender, Sandbox, eventually
from tests.factories import make_event

KEYS = [f"partitioned-{n}" for n in range(300)]


async def test_gateway_events_land_once_in_the_partition_of_their_key(sandbox: Sandbox, producer: EventSender) -> None:
    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    gateway = EventProducer(sandbox.kafka_bootstrap, topic)
    await gateway.start()
    sent = [make_event(event_id=uuid.uuid4(), api_key_id=key) for key in KEYS]
    try:
        for event in sent:
            gateway.emit(event)
        await eventually(lambda: gateway.undelivered == 0, timeout_s=30, what="the gateway's events to be delivered")
    finally:
        await gateway.stop()
    await producer.send_all([make_event(event_id=uuid.uuid4(), api_key_id=key) for key in KEYS])  # as the tests send

    partitions: defaultdict[str, set[int]] = defaultdict(set)
    ids: Counter[uuid.UUID] = Counter()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=sandbox.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            while sum(ids.values()) < 2 * len(KEYS):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        event = decode(record.value or b"")
                        partitions[event.api_key_id].add(record.partition)
                        ids[event.event_id] += 1
    finally:
        await consumer.stop()
    assert all(ids[event.event_id] == 1 for event in sent)  # each gateway event exactly once
    assert {key: len(p) for key, p in partitions.items()} == {key: 1 for key in KEYS}
    assert len(set().union(*partitions.values())) > 1  # the keys do spread over the partitions
