"""The crash suite: SIGKILL the sink at different points; ClickHouse still holds every event exactly once,
in the raw table and in every rollup, without FINAL or a merge."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as ConfluentPartition
from confluent_kafka.admin import AdminClient

from throttlex.processors.accounting import rollups
from throttlex.processors.accounting.exact_usage import ExactUsage
from throttlex.processors.accounting.rollups import RollupCounter
from throttlex.processors.accounting.store import UsageStore
from tests.conftest import EVENTS_PARTITIONS, EventSender, RoleProcess, Sandbox, eventually
from tests.factories import make_event
from tests.integration.test_sink import committed_offsets, end_offsets, wait_until_all_committed

pytestmark = pytest.mark.integration

N = 30_000
KEYS = 40
# An hour of traffic across a month boundary: inserts span two table partitions, hours and days.
START_MS = int(datetime(2026, 11, 30, 23, 30, tzinfo=UTC).timestamp() * 1000)


def inserted(role: RoleProcess) -> int:
    return role.log().count('"message": "batch inserted"')


async def ledger_matches_store(sandbox: Sandbox) -> None:
    """A plan ledger loaded now (as an API replica starting would) counts, per key, the units ClickHouse holds."""
    env = sandbox.env
    store = UsageStore(env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    exact = ExactUsage(sandbox.kafka_bootstrap, env["THROTTLEX_EVENTS_TOPIC"], env["THROTTLEX_SINK_GROUP"])
    await exact.start()
    try:
        stored = dict(await store.query("SELECT api_key_id, sum(cost) FROM usage_events GROUP BY api_key_id"))
        assert stored, "the first sink stored a batch"
        ledger = await exact.prepare(store, ZoneInfo("UTC"))
        months = [datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)]

        def ledger_units() -> dict[str, int]:
            units = {f"key-{k}": sum(ledger.month_units(f"key-{k}", month) for month in months) for k in range(KEYS)}
            return {key: count for key, count in units.items() if count}

        await eventually(lambda: ledger_units() == stored, timeout_s=20, what="the ledger to hold what ClickHouse holds")
    finally:
        await exact.stop()
        await store.close()


async def rollup_units(sandbox: Sandbox) -> Counter[str]:
    """Units per key in every rollup the sinks published, each chunk of each batch counted once, as a plan
    ledger reads them (`RollupCounter`)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=sandbox.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        topic = rollups.topic_of(sandbox.env["THROTTLEX_EVENTS_TOPIC"])
        partitions = [TopicPartition(topic, p) for p in range(EVENTS_PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends, units = await consumer.end_offsets(partitions), Counter[str]()
        counters = {tp: RollupCounter(split=0) for tp in partitions}
        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        while await behind():
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    rollup = rollups.decode(record.value)
                    if counters[tp].counts(rollup):
                        counters[tp].counted(rollup)
                        for key, count in zip(rollup.keys, rollup.units, strict=True):
                            units[key] += count
        return units
    finally:
        await consumer.stop()


async def test_sigkill_at_any_point_neither_loses_nor_duplicates(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender
) -> None:
    rng = random.Random(7)
    events = [
        make_event(
            event_id=uuid.uuid4(),
            api_key_id=f"key-{rng.randrange(KEYS)}",
            event_time_ms=START_MS + rng.randrange(3_600_000),
            cost=rng.randint(1, 5),
            status=rng.choice([200, 200, 200, 404, 500]),
        )
        for _ in range(N)
    ]
    await producer.send_all(events)
    debug = {"THROTTLEX_LOG_LEVEL": "DEBUG"}

    # 1. After an insert, before its commit: the commit is held back so the kill lands there.
    sink = spawn("sink", extra_env={**debug, "THROTTLEX_SINK_COMMIT_DELAY_S": "30", "THROTTLEX_SINK_BATCH_MAX_ROWS": "4000"})
    await eventually(lambda: inserted(sink) >= 1, timeout_s=60, what="a first insert")
    sink.stop(signal.SIGKILL)

    # A ledger loaded now, with the killed sink's intent outstanding (its batch stored, its rollups published),
    # holds what ClickHouse holds, key by key.
    await ledger_matches_store(sandbox)

    # 2. Anywhere in a stream of small batches: collecting, inserting or committing.
    sink = spawn("sink", extra_env={**debug, "THROTTLEX_SINK_BATCH_MAX_ROWS": "1000", "THROTTLEX_SINK_FLUSH_INTERVAL_S": "0.2"})
    await eventually(lambda: inserted(sink) >= 4, timeout_s=60, what="a few inserts")
    assert "replaying an interrupted batch" in sink.log()
    sink.stop(signal.SIGKILL)

    # 3. Mid-batch: records read, nothing inserted yet.
    sink = spawn("sink", extra_env={**debug, "THROTTLEX_SINK_FLUSH_INTERVAL_S": "30", "THROTTLEX_SINK_BATCH_MAX_ROWS": "100000"})
    await eventually(lambda: "reading the next batches" in sink.log(), timeout_s=60, what="the sink to read records")
    assert inserted(sink) == 0
    sink.stop(signal.SIGKILL)

    # 4. Run to the end and stop cleanly.
    sink = spawn("sink")
    await wait_until_all_committed(sandbox, await end_offsets(sandbox), timeout_s=120)
    assert sink.stop() == 0, sink.log()

    store = UsageStore(sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        [(rows, ids, cost)] = await store.query("SELECT count(), uniqExact(event_id), sum(cost) FROM usage_events")
        assert (rows, ids, cost) == (N, N, sum(e.cost for e in events))
        per_key = dict(await store.query("SELECT api_key_id, count() FROM usage_events GROUP BY api_key_id"))
        assert per_key == Counter(e.api_key_id for e in events)
        cost_per_key: Counter[str] = Counter()
        for e in events:
            cost_per_key[e.api_key_id] += e.cost
        assert await rollup_units(sandbox) == cost_per_key, "the rollups the plan ledgers read"

        for table, bucket_s in (("usage_per_minute", 60), ("usage_per_hour", 3600), ("usage_per_day", 86400)):
            expected_requests: Counter[tuple[int, str]] = Counter()
            expected_cost: Counter[tuple[int, str]] = Counter()
            expected_errors: Counter[tuple[int, str]] = Counter()
            for e in events:
                bucket = (e.event_time_ms // 1000) // bucket_s * bucket_s
                expected_requests[(bucket, e.api_key_id)] += 1
                expected_cost[(bucket, e.api_key_id)] += e.cost
                expected_errors[(bucket, e.api_key_id)] += e.status >= 500
            stored = await store.query(
                f"SELECT toUnixTimestamp(bucket), api_key_id, sum(requests), sum(cost_units), sum(errors) "
                f"FROM {table} GROUP BY bucket, api_key_id"
            )
            assert {(b, k): r for b, k, r, _, _ in stored} == expected_requests, table
            assert {(b, k): c for b, k, _, c, _ in stored} == expected_cost, table
            assert {(b, k): x for b, k, _, _, x in stored if x} == +expected_errors, table
    finally:
        await store.close()


async def test_a_sink_whose_offsets_expired_stores_nothing_twice(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender
) -> None:
    """The sink group's committed offsets are gone (Kafka expires a group's offsets once it has been empty
    longer than offsets.retention.minutes: deleting the group does the same) while the topic still holds
    every event, more batches than ClickHouse's deduplication window remembers. The sink resumes after what
    is stored, not from the start: every event once."""
    first = [make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % KEYS}", event_time_ms=START_MS + n) for n in range(3_000)]
    await producer.send_all(first)
    sink = spawn("sink", extra_env={"THROTTLEX_SINK_BATCH_MAX_ROWS": "100", "THROTTLEX_SINK_FLUSH_INTERVAL_S": "0.2"})
    await wait_until_all_committed(sandbox, await end_offsets(sandbox), timeout_s=120)
    assert sink.stop() == 0

    window = 5  # inserts each table remembers: far fewer than the 30 batches stored
    store = UsageStore(sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        for table in ("usage_events", "usage_per_minute", "usage_per_hour", "usage_per_day", "usage_units_per_minute"):
            await store.command(f"ALTER TABLE {table} MODIFY SETTING non_replicated_deduplication_window = {window}")
    finally:
        await store.close()
    admin = AdminClient({"bootstrap.servers": sandbox.kafka_bootstrap})
    [deleted] = admin.delete_consumer_groups([sandbox.env["THROTTLEX_SINK_GROUP"]]).values()
    await asyncio.wrap_future(deleted)
    assert await committed_offsets(sandbox) == {}

    later = [make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % KEYS}", event_time_ms=START_MS + n) for n in range(500)]
    await producer.send_all(later)
    sink = spawn("sink", extra_env={"THROTTLEX_SINK_BATCH_MAX_ROWS": "70", "THROTTLEX_SINK_FLUSH_INTERVAL_S": "0.2"})
    await wait_until_all_committed(sandbox, await end_offsets(sandbox), timeout_s=120)
    assert sink.stop() == 0
    assert "resuming after the last event stored in ClickHouse" in sink.log()

    store = UsageStore(sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        [(rows, ids)] = await store.query("SELECT count(), uniqExact(event_id) FROM usage_events")
        [(minute_events,)] = await store.query("SELECT sum(requests) FROM usage_per_minute")
    finally:
        await store.close()
    assert (rows, ids, minute_events) == (3_500, 3_500, 3_500)


async def test_a_replayed_batch_dropped_as_a_duplicate_stores_the_rows_it_lacks(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender
) -> None:
    """ClickHouse records an insert's token apart from keeping its part: a kill between the two (seen once in a
    few runs of the test above, for one of a batch's two month partitions) leaves a token it remembers without
    the rows. Here that state is made on purpose: a partition's last batch is stored, its November rows are
    deleted (the token stays), and its intent is put back. The replay is dropped as a duplicate; the sink
    notices the rows it lacks and stores them, once. Only the raw table is compared: the deletion leaves the
    rollup tables as they were (still counting those rows), which a kill does not; the SIGKILL test above
    compares them."""
    rng = random.Random(11)
    events = [
        make_event(event_id=uuid.uuid4(), api_key_id=f"key-{rng.randrange(KEYS)}", event_time_ms=START_MS + rng.randrange(3_600_000))
        for _ in range(3_000)
    ]  # fmt: skip
    await producer.send_all(events)
    sink = spawn("sink", extra_env={"THROTTLEX_LOG_LEVEL": "DEBUG", "THROTTLEX_SINK_BATCH_MAX_ROWS": "400"})
    ends = await end_offsets(sandbox)
    await wait_until_all_committed(sandbox, ends, timeout_s=120)
    assert sink.stop() == 0, sink.log()

    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    tokens = re.findall(rf'"batch": "({re.escape(topic)}/(\d+)/(\d+)-(\d+))"', sink.log())
    last_batches = {p: max((t for t in tokens if t[1] == p), key=lambda t: int(t[3])) for _, p, _, _ in tokens}
    _, partition, first, last = max(last_batches.values(), key=lambda t: int(t[3]) - int(t[2]))
    partition, first, last = int(partition), int(first), int(last)
    assert last + 1 == ends[TopicPartition(topic, partition)], "the batch chosen is its partition's last"
    december = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
    store = UsageStore(sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        where = f"kafka_partition = {partition} AND kafka_offset BETWEEN {first} AND {last} AND event_time < {december}"
        [(november,)] = await store.query(f"SELECT count() FROM usage_events WHERE {where}")
        assert november > 0, "the batch spans both months"
        await store.command(f"ALTER TABLE usage_events DELETE WHERE {where} SETTINGS mutations_sync = 1")
        [(rows,)] = await store.query("SELECT count() FROM usage_events")
        assert rows == len(events) - november
    finally:
        await store.close()
    intent = Consumer({"bootstrap.servers": sandbox.kafka_bootstrap, "group.id": sandbox.env["THROTTLEX_SINK_GROUP"]})
    try:
        intent.commit(offsets=[ConfluentPartition(topic, partition, first, f"inflight:{last}")], asynchronous=False)
    finally:
        intent.close()

    sink = spawn("sink", extra_env={"THROTTLEX_LOG_LEVEL": "DEBUG"})
    await wait_until_all_committed(sandbox, ends, timeout_s=120)
    assert sink.stop() == 0, sink.log()

    store = UsageStore(sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        [(rows, ids)] = await store.query("SELECT count(), uniqExact(event_id) FROM usage_events")
    finally:
        await store.close()
    assert (rows, ids) == (len(events), len(events))
    assert "rows of it are missing" in sink.log()
