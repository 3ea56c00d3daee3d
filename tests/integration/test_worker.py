"""Events on real Kafka → a `throttlex worker` process → blocks in real Redis → an edge client's cache."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from redis.asyncio import Redis

from throttlex.ingest import denylist_entries
from throttlex.ingest.denylist_entries import limit_key
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.events import UsageEvent, key_id_for
from throttlex.ingest.settings import ConnectionSettings
from throttlex.processors.core.windows import SlidingWindow
from throttlex.processors.worker import regroup
from tests.conftest import EVENTS_PARTITIONS, EventSender, RoleProcess, Sandbox, eventually
from tests.factories import make_event

pytestmark = pytest.mark.integration

LIMIT, WINDOW_S = 20, 60


def request(key_id: str, t_ms: int) -> UsageEvent:
    return make_event(event_id=uuid.uuid4(), api_key_id=key_id, event_time_ms=t_ms, cost=1)


async def test_over_limit_key_is_blocked_with_exact_ttl_and_reaches_edge_caches(
    sandbox: Sandbox,
    spawn: Callable[..., RoleProcess],
    producer: EventSender,
    redis: Redis,
) -> None:
    settings = sandbox.settings(ConnectionSettings)
    prefix = settings.redis_prefix
    hot = key_id_for("hot-key", settings.key_salt_bytes)
    calm = key_id_for("calm-key", settings.key_salt_bytes)

    early_edge = EdgeDenylist(sandbox.redis_url, prefix)  # follows the channel from before the block
    await early_edge.start()
    assert early_edge.synced

    spawn("worker", "--policy-file", str(sandbox.write_policy(LIMIT, WINDOW_S)))
    # Stamped a moment before they are sent, as a gateway does: within the tolerance of Kafka's append time,
    # each keeps its own time (`timing`), so the unblock time follows from the events alone.
    start_ms = wall_clock_ms() - 1_000
    hot_events = [request(hot, start_ms + 10 * n) for n in range(LIMIT + 10)]
    calm_events = [request(calm, start_ms + 20 * n) for n in range(LIMIT - 5)]
    for event in hot_events + calm_events:
        await producer(event)
    await producer(b"this is not an event", key=hot.encode())

    # The expected unblock time, computed independently from the events sent.
    reference = SlidingWindow(WINDOW_S * 1000, 1000)
    for event in hot_events:
        reference.add(event.event_time_ms, event.cost)
    expected_until = reference.admits_at(LIMIT)
    assert expected_until is not None

    hot_key = denylist_entries.block_key(prefix, limit_key([("api_key", hot)]))
    await eventually(lambda: redis.exists(hot_key), what="the hot key's denylist entry")
    raw = await redis.get(hot_key)
    assert raw is not None
    stored = denylist_entries.decode_block(raw)
    assert stored.until_ms == expected_until
    assert stored.policy == "test-limit"
    ttl_ms = await redis.pttl(hot_key)
    assert expected_until - wall_clock_ms() - 2_000 <= ttl_ms <= expected_until - wall_clock_ms() + 50

    hot_limit_key = limit_key([("api_key", hot)])
    await eventually(lambda: early_edge.blocked(hot_limit_key) is not None, timeout_s=5, what="the pub/sub update")
    late_edge = EdgeDenylist(sandbox.redis_url, prefix)  # learns the block from the snapshot
    await late_edge.start()
    try:
        block = late_edge.blocked(hot_limit_key)
        assert block is not None and block.until_ms == expected_until
        assert early_edge.blocked(limit_key([("api_key", calm)])) is None
        assert late_edge.blocked(limit_key([("api_key", calm)])) is None
    finally:
        await late_edge.stop()
        await early_edge.stop()
    assert not await redis.exists(denylist_entries.block_key(prefix, limit_key([("api_key", calm)])))


async def test_bad_event_goes_to_the_dead_letter_topic_and_processing_continues(
    sandbox: Sandbox,
    spawn: Callable[..., RoleProcess],
    producer: EventSender,
    redis: Redis,
) -> None:
    settings = sandbox.settings(ConnectionSettings)
    key = key_id_for("after-the-bad-one", settings.key_salt_bytes)
    spawn("worker", "--policy-file", str(sandbox.write_policy(limit=3, window_s=60)))
    await producer(b'{"v": 7, "event_id": "x"}', key=key.encode())
    start_ms = wall_clock_ms()
    for n in range(3):
        await producer(request(key, start_ms + n))

    block_key = denylist_entries.block_key(settings.redis_prefix, limit_key([("api_key", key)]))
    await eventually(lambda: redis.exists(block_key), what="the block after the bad event")

    [record] = await dead_letters(sandbox, 1)
    assert record.value == b'{"v": 7, "event_id": "x"}'
    assert record.key == key.encode()
    assert dict(record.headers)["reason"] == b"unknown schema version 7 (this build reads v1)"


async def test_an_event_under_two_regrouped_policies_counts_for_both_on_one_regroup_partition(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    """One event matches a policy on [tenant] and one on [ip]; both limit keys are regrouped to the same
    partition, carrying the same source offset. Each key counts it, so both limits block."""
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(
        "policies:\n"
        "  - name: per-tenant\n    key: [tenant]\n    algorithm: {type: sliding_window, limit: 5, window_s: 60, bucket_s: 1}\n"
        "  - name: per-ip\n    key: [ip]\n    algorithm: {type: sliding_window, limit: 5, window_s: 60, bucket_s: 1}\n"
    )
    tenant = "acme"
    ip = next(f"192.0.2.{n}" for n in range(1, 255)
              if regroup.partition_of(f"ip=192.0.2.{n}", EVENTS_PARTITIONS) == regroup.partition_of(f"tenant={tenant}", EVENTS_PARTITIONS))  # fmt: skip
    spawn("worker", "--policy-file", str(policy_file))
    start_ms = wall_clock_ms() - 1_000
    events = [make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n}", tenant=tenant, client_ip=ip,
                         event_time_ms=start_ms + 100 * n, cost=1) for n in range(5)]  # fmt: skip
    await producer.send_all(events)
    reference = SlidingWindow(60_000, 1_000)
    for event in events:
        reference.add(event.event_time_ms, 1)
    until = reference.admits_at(5)
    for key, policy in ((f"tenant={tenant}", "per-tenant"), (f"ip={ip}", "per-ip")):
        block_key = denylist_entries.block_key(prefix, key)
        await eventually(lambda: redis.exists(block_key), what=f"the {policy} block")
        raw = await redis.get(block_key)
        assert raw is not None
        assert (denylist_entries.decode_block(raw).policy, denylist_entries.decode_block(raw).until_ms) == (policy, until)


async def test_an_event_from_the_future_counts_at_kafkas_time_and_moves_no_window(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    """A gateway whose clock reads a year ahead: its event counts when Kafka received it (see `timing`),
    and the block it helps cause ends one window after that, not a year later. Nothing is dead-lettered."""
    settings = sandbox.settings(ConnectionSettings)
    key = key_id_for("clock-ahead", settings.key_salt_bytes)
    spawn("worker", "--policy-file", str(sandbox.write_policy(limit=3, window_s=60)))
    start_ms = wall_clock_ms()
    await producer(request(key, start_ms + 365 * 86_400_000))
    for n in range(2):
        await producer(request(key, wall_clock_ms()))
    end_ms = wall_clock_ms()

    block_key = denylist_entries.block_key(settings.redis_prefix, limit_key([("api_key", key)]))
    await eventually(lambda: redis.exists(block_key), what="the block from three events, one stamped a year ahead")
    raw = await redis.get(block_key)
    assert raw is not None
    # A sliding window of 60 one-second buckets admits again when the bucket of the first event leaves it.
    assert start_ms // 1000 * 1000 + WINDOW_S * 1000 <= denylist_entries.decode_block(raw).until_ms
    assert denylist_entries.decode_block(raw).until_ms <= end_ms // 1000 * 1000 + (WINDOW_S + 1) * 1000
    consumer = AIOKafkaConsumer(bootstrap_servers=sandbox.kafka_bootstrap)
    await consumer.start()
    try:
        dead_letter_partition = TopicPartition(sandbox.env["THROTTLEX_DEAD_LETTER_TOPIC"], 0)
        assert (await consumer.end_offsets([dead_letter_partition]))[dead_letter_partition] == 0
    finally:
        await consumer.stop()


async def dead_letters(sandbox: Sandbox, count: int) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        sandbox.env["THROTTLEX_DEAD_LETTER_TOPIC"],
        bootstrap_servers=sandbox.kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    try:
        return [await consumer.getone() for _ in range(count)]
    finally:
        await consumer.stop()
