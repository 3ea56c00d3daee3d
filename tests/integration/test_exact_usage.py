"""A key's plan usage = ClickHouse below the split + the sink's rollups of every batch from the split on: the
same total after the sink has stored everything and while a batch is stored but its offsets not yet
committed (the split is the batch's first offset and its rollup was published before the ledger loaded),
for a ledger loaded at each of those moments and for one following since the start. Batches published
again after a crash: `test_sink_crash`."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import UsageEvent
from throttlex.processors.accounting.exact_usage import ExactUsage
from throttlex.processors.accounting.ledger import month_around
from throttlex.processors.accounting.sink import UsageSink
from throttlex.processors.accounting.store import UsageStore
from throttlex.processors.settings import SinkSettings
from tests.conftest import EventSender, Sandbox, eventually
from tests.factories import make_event
from tests.integration.test_sink import committed_offsets

pytestmark = pytest.mark.integration

UTC_ZONE = ZoneInfo("UTC")


async def test_plan_usage_counts_each_event_once_wherever_it_is(sandbox: Sandbox, producer: EventSender) -> None:
    env = sandbox.env
    store = UsageStore(env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    await store.migrate()

    def reader() -> ExactUsage:
        return ExactUsage(sandbox.kafka_bootstrap, env["THROTTLEX_EVENTS_TOPIC"], env["THROTTLEX_SINK_GROUP"])

    following = reader()
    await following.start()

    def sink(**settings: float) -> UsageSink:
        return UsageSink(
            SinkSettings(kafka_bootstrap=sandbox.kafka_bootstrap, events_topic=env["THROTTLEX_EVENTS_TOPIC"],
                         sink_group=env["THROTTLEX_SINK_GROUP"], clickhouse_dsn=env["THROTTLEX_CLICKHOUSE_DSN"],
                         **settings),  # type: ignore[arg-type]
            store,
        )  # fmt: skip

    now_ms = wall_clock_ms()
    now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    start_ms, end_ms = (int(t.timestamp() * 1000) for t in month_around(now, UTC_ZONE))

    def burst(n: int) -> list[UsageEvent]:
        return [make_event(event_id=uuid.uuid4(), api_key_id=f"key-{i % 4}", event_time_ms=now_ms - i, cost=1 + i % 3,
                           edge_blocked=i % 10 == 0) for i in range(n)]  # fmt: skip

    def expected(events: list[UsageEvent], since_ms: int = start_ms) -> int:
        """key-1's units from ``since_ms`` (the month's start: its month) to the month's end."""
        return sum(e.cost for e in events
                   if e.api_key_id == "key-1" and not e.edge_blocked and since_ms <= e.event_time_ms < end_ms)  # fmt: skip

    def last_hour(events: list[UsageEvent]) -> int:  # all sent in the last second, so all in the last hour
        return expected(events, since_ms=0)

    async def check(events: list[UsageEvent], what: str) -> None:
        fresh = reader()  # loads its ledger now
        await fresh.start()
        try:
            for name, usage in (("loaded now", fresh), ("following", following)):
                plan = await usage.plan_usage(store, "key-1", UTC_ZONE, now, settle_s=10)
                assert plan.month_units == expected(events), f"{what}, ledger {name}"
                assert plan.last_hour_units == last_hour(events), f"{what}, ledger {name}: the last hour"
        finally:
            await fresh.stop()

    async def committed_total() -> int:
        return sum(o for o in (await committed_offsets(sandbox)).values() if o > 0)

    def committed(count: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return await committed_total() == count

        return check

    def stored(count: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            [(rows,)] = await store.query("SELECT count() FROM usage_events")
            return bool(rows == count)

        return check

    first, second = burst(400), burst(300)
    running = sink()
    try:
        await following.plan_usage(store, "key-1", UTC_ZONE, now)  # loads with nothing stored or sent
        await producer.send_all(first)
        await running.start()
        await eventually(committed(len(first)), what="the sink to store the first burst")
        await check(first, "all in ClickHouse")
        await running.stop()

        # Stored, intents committed, the offsets after them not yet: a ledger loaded now splits at the batches'
        # first offsets and reads their rollups, published before the intents' ends.
        running = sink(sink_commit_delay_s=8.0)
        await running.start()
        await producer.send_all(second)
        await eventually(stored(len(first + second)), what="the sink to store the second burst")
        assert await committed_total() < len(first + second)
        await check(first + second, "stored, not committed")
        await running.stop()

    finally:
        await running.stop()
        await following.stop()
        await store.close()
