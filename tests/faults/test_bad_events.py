"""Bad events on the events topic: each goes to the dead-letter topic with its reason and its original
bytes, is counted by kind, is never stored by the sink, and the events after it are processed."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

from throttlex.ingest import denylist_entries
from throttlex.ingest.denylist_entries import limit_key
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import encode
from throttlex.processors.core.windows import SlidingWindow
from tests.conftest import EventSender, RoleProcess, Sandbox, eventually, free_port, role_metrics, stored_events
from tests.factories import make_event

pytestmark = pytest.mark.faults

LIMIT, WINDOW_S = 10, 60
KEY_ID = "b" * 24


def good_fields(**changes: object) -> dict[str, object]:
    event = make_event(event_id=uuid.uuid4(), api_key_id=KEY_ID, event_time_ms=wall_clock_ms() - 2_000, cost=1)
    fields: dict[str, object] = msgspec.json.decode(encode(event))
    return {**fields, **changes}


def bad_events() -> dict[str, tuple[bytes, str, str]]:
    """name → (bytes on the topic, the metric's kind, a fragment of the reason)."""
    missing = good_fields()
    del missing["api_key_id"]
    return {
        "malformed bytes": (b"\x00\xffnot json at all", "malformed", "malformed JSON"),
        "empty record": (b"", "malformed", "malformed JSON"),
        "missing field": (msgspec.json.encode(missing), "invalid", "api_key_id"),
        "unknown version": (msgspec.json.encode(good_fields(v=99)), "unknown_version", "unknown schema version 99"),
        "negative cost": (msgspec.json.encode(good_fields(cost=-5)), "invalid", "$.cost"),
        "time in 1970": (msgspec.json.encode(good_fields(event_time_ms=86_400_000)), "invalid", "$.event_time_ms"),
        "time in 2200": (msgspec.json.encode(good_fields(event_time_ms=7_258_118_400_000)), "invalid", "$.event_time_ms"),
        "900 KB route": (msgspec.json.encode(good_fields(route="/" + "x" * 900_000)), "invalid", "$.route"),
    }


async def test_bad_events_are_dead_lettered_counted_and_skipped_and_processing_goes_on(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    worker_port, sink_port = free_port(), free_port()
    spawn("worker", "--policy-file", str(sandbox.write_policy(LIMIT, WINDOW_S)), extra_env={"THROTTLEX_METRICS_PORT": str(worker_port)})
    bad = bad_events()
    start_ms = wall_clock_ms() - 1_000  # within the tolerance of Kafka's time: each keeps its own
    good = [make_event(event_id=uuid.uuid4(), api_key_id=KEY_ID, event_time_ms=start_ms + 10 * n, cost=1) for n in range(LIMIT + 5)]
    # interleaved: a bad event before and after good ones, all on the key's partition
    sequence: list[bytes] = []
    for n, event in enumerate(good):
        sequence.append(encode(event))
        if n < len(bad):
            sequence.append(list(bad.values())[n][0])
    for raw in sequence:
        await producer(raw, key=KEY_ID.encode())

    reference = SlidingWindow(WINDOW_S * 1000, 1000)
    for event in good:  # all of them count: the block moves on as each arrives
        reference.add(event.event_time_ms, event.cost)
    expected_until = reference.admits_at(LIMIT)
    block_key = denylist_entries.block_key(sandbox.env["THROTTLEX_REDIS_PREFIX"], limit_key([("api_key", KEY_ID)]))

    async def blocked_after_every_good_event() -> bool:
        raw = await redis.get(block_key)
        return raw is not None and denylist_entries.decode_block(raw).until_ms == expected_until

    await eventually(blocked_after_every_good_event, what="the block from every good event between the bad ones")

    consumer = AIOKafkaConsumer(
        sandbox.env["THROTTLEX_DEAD_LETTER_TOPIC"], bootstrap_servers=sandbox.kafka_bootstrap,
        auto_offset_reset="earliest", group_id=None, max_partition_fetch_bytes=2 * 1024 * 1024,
    )  # fmt: skip
    await consumer.start()
    try:
        dead = [await consumer.getone() for _ in bad]
    finally:
        await consumer.stop()
    assert [record.value for record in dead] == [raw for raw, _, _ in bad.values()]  # originals, in order
    for record, (name, (_, _, fragment)) in zip(dead, bad.items(), strict=True):
        reason = dict(record.headers)["reason"].decode()
        assert fragment in reason and "\n" not in reason, (name, reason)
        assert record.key == KEY_ID.encode()

    samples = await role_metrics(worker_port)
    kinds: dict[str, int] = {}
    for _, kind, _ in bad.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    for kind, count in kinds.items():
        assert samples[("throttlex_worker_dead_letters_total", (("reason", kind),))] == count
    assert samples[("throttlex_worker_events_total", ())] == len(good)

    sink = spawn("sink", extra_env={"THROTTLEX_METRICS_PORT": str(sink_port)})

    async def sink_done() -> bool:  # no answer yet: no samples, not done
        values = await role_metrics(sink_port)
        return values.get(("throttlex_sink_rows_total", ()), 0) + values.get(("throttlex_sink_skipped_total", ()), 0) == len(sequence)

    await eventually(sink_done, timeout_s=60, what="the sink to pass over every record")
    values = await role_metrics(sink_port)
    assert values[("throttlex_sink_rows_total", ())] == len(good)
    assert values[("throttlex_sink_skipped_total", ())] == len(bad)
    sink.stop()
    assert await stored_events(sandbox) == (len(good), len(good))
    print(f"bad events: {len(bad)} dead-lettered by kind {kinds}; good events: {len(good)} decided and stored")
