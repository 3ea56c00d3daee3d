"""Exact usage = ClickHouse below the split + Kafka from the split: the same total before the sink has
stored anything, after it has stored everything, and in between."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ingest.clock import wall_clock_ms
from ingest.events import UsageEvent
from processors.accounting.exact_usage import ExactUsage
from processors.settings import SinkSettings
from processors.accounting.sink import UsageSink
from processors.accounting.store import UsageStore
from tests.conftest import EventSender, Sandbox, eventually
from tests.factories import make_event
from tests.integration.test_sink import committed_offsets

pytestmark = pytest.mark.integration


async def test_exact_usage_counts_each_event_once_wherever_it_is(sandbox: Sandbox, producer: EventSender) -> None:
    env = sandbox.env
    store = UsageStore(env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    await store.migrate()
    exact = ExactUsage(sandbox.kafka_bootstrap, env["THROTTLEX_EVENTS_TOPIC"], env["THROTTLEX_SINK_GROUP"])
    await exact.start()
    sink = UsageSink(
        SinkSettings(kafka_bootstrap=sandbox.kafka_bootstrap, events_topic=env["THROTTLEX_EVENTS_TOPIC"],
                     sink_group=env["THROTTLEX_SINK_GROUP"], clickhouse_dsn=env["THROTTLEX_CLICKHOUSE_DSN"]),
        store,
    )  # fmt: skip
    now = wall_clock_ms()
    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(hours=1)

    def burst(n: int) -> list[UsageEvent]:
        return [make_event(event_id=uuid.uuid4(), api_key_id=f"key-{i % 4}", event_time_ms=now - i, cost=1 + i % 3,
                           edge_blocked=i % 10 == 0) for i in range(n)]  # fmt: skip

    def expected(events: list[UsageEvent]) -> int:
        return sum(e.cost for e in events if e.api_key_id == "key-1" and not e.edge_blocked)

    try:
        first = burst(400)
        await producer.send_all(first)
        assert await exact.billable_units(store, "key-1", start, end) == expected(first)  # all still on Kafka

        await sink.start()

        async def all_stored() -> bool:
            return sum(o for o in (await committed_offsets(sandbox)).values() if o > 0) == len(first)

        await eventually(all_stored, what="the sink to store the first burst")
        assert await exact.billable_units(store, "key-1", start, end) == expected(first)  # all in ClickHouse

        second = burst(300)
        await producer.send_all(second)
        assert await exact.billable_units(store, "key-1", start, end) == expected(first) + expected(second)
    finally:
        await sink.stop()
        await exact.stop()
        await store.close()
