"""Plan quota and billing, compared with a computation over the events sent: with part of them still on
Kafka, with everything stored, after raw retention deleted the month's early rows, and for days and a
month of the policy's time zone (Europe/Berlin, whose midnights are not UTC's)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from throttlex.ingest.events import UsageEvent
from throttlex.processors.accounting import queries
from throttlex.processors.accounting.exact_usage import ExactUsage
from throttlex.processors.accounting.ledger import PlanLedger
from throttlex.processors.accounting.sink import UsageSink
from throttlex.processors.accounting.store import UsageStore
from throttlex.processors.settings import SinkSettings
from tests.conftest import EventSender, Sandbox, eventually
from tests.factories import make_event
from tests.integration.test_sink import committed_offsets

pytestmark = pytest.mark.integration

ZONE = ZoneInfo("Europe/Berlin")
KEY = "key-quota"


def berlin_midnight(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=ZONE).astimezone(UTC)


def events_around(moments: list[datetime], key: str, seed: int) -> list[UsageEvent]:
    """Events every 7 minutes and some seconds from 90 minutes before to 90 minutes after each moment."""
    events: list[UsageEvent] = []
    for moment in moments:
        for step in range(-13, 14):
            at = moment + timedelta(minutes=7 * step, seconds=(step * seed) % 60, milliseconds=step % 1000)
            n = len(events)
            events.append(make_event(event_id=uuid.uuid4(), api_key_id=key, event_time_ms=int(at.timestamp() * 1000),
                                     cost=1 + (n + seed) % 4, edge_blocked=(n + seed) % 7 == 0))  # fmt: skip
    return events


def billable(events: list[UsageEvent], start: datetime, end: datetime, key: str = KEY) -> int:
    start_ms, end_ms = start.timestamp() * 1000, end.timestamp() * 1000
    return sum(e.cost for e in events if e.api_key_id == key and not e.edge_blocked and start_ms <= e.event_time_ms < end_ms)


async def test_plan_quota_and_billing_equal_the_events_sent(sandbox: Sandbox, producer: EventSender) -> None:
    env = sandbox.env
    now = datetime.now(UTC)
    # The Berlin month holding the day 45 days ago: wholly past, and old enough for retention to reach into.
    local = (now - timedelta(days=45)).astimezone(ZONE)
    month_start = berlin_midnight(local.year, local.month, 1)
    month_end = berlin_midnight(local.year + local.month // 12, local.month % 12 + 1, 1)
    mid_day = berlin_midnight(local.year, local.month, 15)
    moments = [month_start, mid_day, month_end] + [month_start + timedelta(hours=31 * h) for h in range(1, 23)]

    first = events_around(moments, KEY, seed=3) + events_around(moments[:3], "key-other", seed=5)
    # Sent after the first sink run stops: still on Kafka at the first check, some of them late for minutes
    # already stored.
    second = events_around(moments[:3], KEY, seed=11)
    everything = first + second

    store = UsageStore(env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    await store.migrate()
    exact = ExactUsage(sandbox.kafka_bootstrap, env["THROTTLEX_EVENTS_TOPIC"], env["THROTTLEX_SINK_GROUP"])
    await exact.start()
    settings = SinkSettings(kafka_bootstrap=sandbox.kafka_bootstrap, events_topic=env["THROTTLEX_EVENTS_TOPIC"],
                            sink_group=env["THROTTLEX_SINK_GROUP"], clickhouse_dsn=env["THROTTLEX_CLICKHOUSE_DSN"])  # fmt: skip

    async def store_all(count: int, meanwhile: Callable[[], Awaitable[None]] | None = None) -> None:
        sink = UsageSink(settings, store)
        await sink.start()
        try:
            if meanwhile is not None:
                await meanwhile()

            async def stored() -> bool:
                return sum(o for o in (await committed_offsets(sandbox)).values() if o > 0) == count

            await eventually(stored, what=f"the sink to store {count} events")
        finally:
            await sink.stop()

    async def check(what: str) -> None:
        # The plan month from a ledger loaded now, and from the one following since before the second events.
        fresh = ExactUsage(sandbox.kafka_bootstrap, env["THROTTLEX_EVENTS_TOPIC"], env["THROTTLEX_SINK_GROUP"])
        await fresh.start()
        try:
            for name, reader in (("loaded now", fresh), ("following", exact)):
                usage = await reader.plan_usage(store, KEY, ZONE, mid_day, settle_s=10)
                assert (usage.month_start, usage.month_end) == (month_start, month_end)
                assert usage.month_units == billable(everything, month_start, month_end), f"{what}: ledger {name}"
        finally:
            await fresh.stop()

    try:
        await producer.send_all(first)
        await store_all(len(first))
        # Loaded with the first events stored: the ledger counts the second as its follower reads them.
        assert (await exact.plan_usage(store, KEY, ZONE, mid_day, settle_s=10)).month_units == billable(first, month_start, month_end)
        await producer.send_all(second)
        await store_all(len(everything), lambda: check("while the sink stores the rest"))
        await check("everything stored")

        # Split at an offset in the middle of the key's partition: minutes holding events on both sides
        # are summed from the raw rows below it, so the ledger holds exactly those rows.
        rows = await store.query(
            "SELECT kafka_partition, kafka_offset, toUnixTimestamp64Milli(event_time), cost, edge_blocked FROM usage_events "
            "WHERE api_key_id = {k:String} ORDER BY kafka_offset", {"k": KEY},
        )  # fmt: skip
        partition, split = rows[0][0], rows[len(rows) // 2][1]
        month_ms = (month_start.timestamp() * 1000, month_end.timestamp() * 1000)
        below = sum(cost for _, offset, at_ms, cost, blocked in rows
                    if offset < split and not blocked and month_ms[0] <= at_ms < month_ms[1])  # fmt: skip
        assert 0 < below < billable(everything, month_start, month_end)
        ledger = PlanLedger(ZONE, mid_day)
        await ledger.load(store, {partition: split})
        assert ledger.month_units(KEY, month_start) == below

        # Raw retention: keep the raw rows of the last days only, cutting the month in two.
        cutoff = month_start + timedelta(days=12)
        await store.apply_retention(math.ceil((now - cutoff) / timedelta(days=1)))
        await store.command("OPTIMIZE TABLE usage_events FINAL")  # applies the TTL now rather than at a merge
        [(early, left)] = await store.query(
            "SELECT countIf(event_time < {cutoff:DateTime64(3, 'UTC')}), count() FROM usage_events "
            "WHERE api_key_id = {k:String}", {"cutoff": month_start + timedelta(days=2), "k": KEY},
        )  # fmt: skip
        assert early == 0 and 0 < left < sum(1 for e in everything if e.api_key_id == KEY)
        await check("after raw retention")
        utc_days = (month_start.replace(hour=0), month_end.replace(hour=0) + timedelta(days=1))
        [bill] = await queries.billing(store, *utc_days, KEY)
        assert bill["billable_units"] == billable(everything, *utc_days)
    finally:
        await exact.stop()
        await store.close()
