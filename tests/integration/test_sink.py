"""Events on real Kafka → a `throttlex sink` process → rows in ClickHouse (chDB), counted exactly."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import encode
from throttlex.processors.accounting.rows import EVENT_SCHEMA, arrow_stream, event_rows
from throttlex.processors.accounting.sink import UsageSink
from throttlex.processors.accounting.store import UsageStore
from throttlex.processors.settings import SinkSettings
from tests.conftest import EventSender, EVENTS_PARTITIONS, RoleProcess, Sandbox, eventually
from tests.factories import make_event

pytestmark = pytest.mark.integration

N = 2_500


async def end_offsets(sandbox: Sandbox) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=sandbox.kafka_bootstrap)
    await consumer.start()
    try:
        topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
        partitions = [TopicPartition(topic, p) for p in range(EVENTS_PARTITIONS)]
        offsets: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return offsets
    finally:
        await consumer.stop()


async def committed_offsets(sandbox: Sandbox, group: str | None = None) -> dict[TopicPartition, int]:
    """The offsets ``group`` (by default the sink's) has committed."""
    admin = AIOKafkaAdminClient(bootstrap_servers=sandbox.kafka_bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group or sandbox.env["THROTTLEX_SINK_GROUP"])
        return {tp: meta.offset for tp, meta in committed.items()}
    finally:
        await admin.close()


async def wait_until_all_committed(sandbox: Sandbox, expected: dict[TopicPartition, int], timeout_s: float) -> None:
    async def all_committed() -> bool:
        committed = await committed_offsets(sandbox)
        return all(committed.get(tp, -1) == offset for tp, offset in expected.items())

    await eventually(all_committed, timeout_s=timeout_s, what="the sink to commit every offset")


async def test_every_event_lands_in_clickhouse_once(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender
) -> None:
    sink = spawn("sink")
    start_ms = wall_clock_ms()
    events = [
        make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % 7}", event_time_ms=start_ms + n, cost=1 + n % 3)
        for n in range(N)
    ]
    await producer.send_all(events)
    await producer(b"\x00 not json", key=b"key-0")  # skipped by the sink, never stored

    expected = await end_offsets(sandbox)
    assert sum(expected.values()) == N + 1

    await wait_until_all_committed(sandbox, expected, timeout_s=60)
    assert sink.stop() == 0, sink.log()

    store = UsageStore(sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        [(rows, unique_ids, cost, keys)] = await store.query(
            "SELECT count(), uniqExact(event_id), sum(cost), uniqExact(api_key_id) FROM usage_events"
        )
        per_key = dict(await store.query("SELECT api_key_id, count() FROM usage_events GROUP BY api_key_id"))
    finally:
        await store.close()
    assert rows == N
    assert unique_ids == N
    assert cost == sum(event.cost for event in events)
    assert keys == 7
    assert per_key == {f"key-{k}": sum(1 for n in range(N) if n % 7 == k) for k in range(7)}


async def test_a_sink_joining_mid_stream_takes_partitions_over_and_nothing_counts_twice(
    sandbox: Sandbox, producer: EventSender, caplog: pytest.LogCaptureFixture
) -> None:
    """A second sink joins the group while the first has writes in flight (each holds its commit back),
    so the first's partitions are revoked mid-stream and shared out: the first finishes its write before
    they move, the second starts from what was committed, and every event is stored once, in the raw
    table and in the rollups. Both sinks run in this process, on one chDB store."""
    caplog.set_level(logging.INFO, logger="throttlex.processors.accounting.sink")
    env = sandbox.env
    store = UsageStore(env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    await store.migrate()

    def sink(commit_delay_s: float) -> UsageSink:
        settings = SinkSettings(kafka_bootstrap=sandbox.kafka_bootstrap, events_topic=env["THROTTLEX_EVENTS_TOPIC"],
                                sink_group=env["THROTTLEX_SINK_GROUP"], clickhouse_dsn=env["THROTTLEX_CLICKHOUSE_DSN"],
                                sink_batch_max_rows=300, sink_commit_delay_s=commit_delay_s)  # fmt: skip
        return UsageSink(settings, store)

    start_ms = wall_clock_ms()
    events = [make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % 31}", event_time_ms=start_ms + n, cost=1 + n % 4)
              for n in range(8_000)]  # fmt: skip
    # The first sink's writes hold their commits back a second each: it is still writing when it notices the
    # rebalance (at its next heartbeat, within 3 s), so the revocation finds a write in flight.
    first, second = sink(commit_delay_s=1.0), sink(commit_delay_s=0.0)
    try:
        try:
            await first.start()
            await producer.send_all(events[:4_000])

            async def stored() -> int:
                [(rows,)] = await store.query("SELECT count() FROM usage_events")
                return int(rows)

            await eventually(lambda: stored(), timeout_s=60, what="the first sink to insert")
            assert await stored() < 4_000  # the second joins mid-stream
            await second.start()
            await producer.send_all(events[4_000:])
            await eventually(lambda: first.partitions and second.partitions, timeout_s=60, what="the partitions to be shared")
            assert sorted(first.partitions + second.partitions) == list(range(EVENTS_PARTITIONS))
            await wait_until_all_committed(sandbox, await end_offsets(sandbox), timeout_s=60)
        finally:
            await second.stop()
            await first.stop()
        [(rows, ids, cost)] = await store.query("SELECT count(), uniqExact(event_id), sum(cost) FROM usage_events")
        [(requests, cost_units)] = await store.query("SELECT sum(requests), sum(cost_units) FROM usage_per_hour")
    finally:
        await store.close()
    revocations = [getattr(record, "write", "") for record in caplog.records if record.getMessage() == "partitions revoked"]
    assert "the write in flight finished" in revocations  # the case this test is about happened
    total_cost = sum(e.cost for e in events)
    assert (rows, ids, cost) == (len(events), len(events), total_cost)
    assert (requests, cost_units) == (len(events), total_cost)


async def test_rows_keep_every_field_exactly(tmp_path: Path) -> None:
    """The sink's rows, read by ClickHouse itself from the Arrow stream, hold each event's values unchanged;
    records that are not valid events are left out."""
    events = [
        make_event(event_id=uuid.uuid4(), event_time_ms=1_790_000_000_123, latency_ms=0.5, edge_blocked=True, plan="pro",
                   source="ingest:eu-gateways"),
        make_event(event_id=uuid.uuid4(), event_time_ms=4_102_444_799_999, route='/v1/"quoted"/ünïcode\\path', tenant="globex",
                   method="POST", status=429, response_bytes=2**63 - 1, cost=1_000_000, client_ip="2001:db8::1"),  # fmt: skip
        make_event(event_id=uuid.UUID(int=0), event_time_ms=946_684_800_000, latency_ms=0.0, response_bytes=0, cost=0),
    ]
    values = [encode(events[0]), b"\x00 not json", encode(events[1]), None, encode(events[2])]
    rows, offsets = event_rows(values, range(70, 70 + len(values)), 3)
    assert offsets == [70, 72, 74]
    store = UsageStore(f"chdb://{tmp_path / 'chdb'}")
    await store.open()
    try:
        await store.migrate()
        stream = arrow_stream(pa.Table.from_batches([rows]))
        await store.insert_arrow("usage_events", stream, EVENT_SCHEMA.names, dedup_token="events/3/70-74")
        stored = await store.query(
            "SELECT event_id, toUnixTimestamp64Milli(event_time), api_key_id, tenant, route, method, status, latency_ms, "
            "response_bytes, cost, client_ip, edge_blocked, plan, source, schema_version, kafka_partition, kafka_offset "
            "FROM usage_events ORDER BY kafka_offset"
        )
    finally:
        await store.close()
    expected = [
        (e.event_id, e.event_time_ms, e.api_key_id, e.tenant, e.route, e.method, e.status, e.latency_ms, e.response_bytes,
         e.cost, e.client_ip, e.edge_blocked, e.plan, e.source, e.schema_version, 3, offset)
        for e, offset in zip(events, offsets)
    ]  # fmt: skip
    assert [tuple(row) for row in stored] == expected


async def test_a_batch_rebuilt_from_other_reads_is_dropped_as_a_duplicate(tmp_path: Path) -> None:
    """After a crash the batch is read again in other steps; inserted under its token it must be a
    duplicate of the first insert, in the raw table and the rollups, however its reads were split."""
    values = [encode(make_event(event_id=uuid.uuid4(), event_time_ms=1_790_000_000_000 + n, cost=1 + n % 3)) for n in range(10)]
    def read(first: int, end: int) -> pa.RecordBatch:
        return event_rows(values[first:end], range(first, end), 0)[0]

    first_reads = pa.Table.from_batches([read(0, 4), read(4, 10)])
    replay_reads = pa.Table.from_batches([read(0, 2), read(2, 7), read(7, 10)])
    store = UsageStore(f"chdb://{tmp_path / 'chdb'}")
    await store.open()
    try:
        await store.migrate()
        for table in (first_reads, replay_reads):
            await store.insert_arrow("usage_events", arrow_stream(table), EVENT_SCHEMA.names, dedup_token="events/0/0-9")
        [(rows, cost)] = await store.query("SELECT count(), sum(cost) FROM usage_events")
        [(requests,)] = await store.query("SELECT sum(requests) FROM usage_per_minute")
    finally:
        await store.close()
    assert (rows, requests, cost) == (10, 10, sum(1 + n % 3 for n in range(10)))


async def test_a_batch_spanning_many_months_is_stored_once(tmp_path: Path) -> None:
    """Events of 150 different months in one batch (a month is a partition; ClickHouse refuses more than 100 in
    one insert by default, and the sink would retry that for ever), inserted twice under one token: stored once,
    in the raw table and the rollups."""
    events = [make_event(event_id=uuid.uuid4(), event_time_ms=int(datetime(2000 + m // 12, m % 12 + 1, 3, tzinfo=UTC).timestamp() * 1000))
              for m in range(150)]  # fmt: skip
    rows, _ = event_rows([encode(event) for event in events], range(len(events)), 0)
    stream = arrow_stream(pa.Table.from_batches([rows]))
    store = UsageStore(f"chdb://{tmp_path / 'chdb'}")
    await store.open()
    try:
        await store.migrate()
        for _ in range(2):  # the second time as a replay after a crash
            await store.insert_arrow("usage_events", stream, EVENT_SCHEMA.names, dedup_token="events/0/0-149")
        [(stored, months)] = await store.query("SELECT count(), uniqExact(toYYYYMM(event_time)) FROM usage_events")
        [(per_day,)] = await store.query("SELECT sum(requests) FROM usage_per_day")
    finally:
        await store.close()
    assert (stored, months, per_day) == (150, 150, 150)
