"""`throttlex migrate` on the real ClickHouse engine (chDB): applies the schema once, then nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from throttlex.processors.accounting.store import UsageStore
from tests.unit.api.test_cli import throttlex

pytestmark = pytest.mark.integration


async def test_migrations_apply_once(tmp_path: Path) -> None:
    env = {"THROTTLEX_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}"}
    first = throttlex("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == ("applied: 0001_usage_events.sql, 0002_exactly_once_and_rollups.sql, 0003_key_plan.sql, "
                                    "0004_units_per_minute.sql, 0005_deduplication_bounds.sql, 0006_event_source.sql")  # fmt: skip
    again = throttlex("migrate", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "schema is up to date"

    store = UsageStore(env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        columns = [row[0] for row in await store.query("SELECT name FROM system.columns WHERE table = 'usage_events'")]
        versions = await store.query("SELECT version FROM throttlex_schema_migrations")
    finally:
        await store.close()
    assert "event_time" in columns and "cost" in columns and "edge_blocked" in columns and "source" in columns
    assert sorted(versions) == [(1,), (2,), (3,), (4,), (5,), (6,)]

    with_retention = throttlex("migrate", env={**env, "THROTTLEX_RAW_RETENTION_DAYS": "400"})
    assert with_retention.returncode == 0, with_retention.stderr
    assert "TTL toDateTime(event_time) + toIntervalDay(400)" in await create_query(env["THROTTLEX_CLICKHOUSE_DSN"])
    assert throttlex("migrate", env=env).returncode == 0  # back to 0: keep forever
    assert " TTL " not in await create_query(env["THROTTLEX_CLICKHOUSE_DSN"])


async def create_query(dsn: str) -> str:
    store = UsageStore(dsn)
    await store.open()
    try:
        [(create,)] = await store.query("SELECT create_table_query FROM system.tables WHERE name = 'usage_events'")
        return str(create)
    finally:
        await store.close()


async def test_the_units_rollup_takes_in_what_was_stored_before_it(tmp_path: Path) -> None:
    """Migration 0004 fills the per-minute units from the raw rows already there, exactly once: also when
    it runs again after a backfill killed part-way, or after it had made its view."""
    store = UsageStore(f"chdb://{tmp_path / 'chdb'}")

    async def units_and_raw() -> tuple[dict[str, int], dict[str, int]]:
        units = dict(await store.query(
            "SELECT api_key_id, sum(billable_units) FROM usage_units_per_minute GROUP BY api_key_id"))  # fmt: skip
        raw = dict(await store.query(
            "SELECT api_key_id, sumIf(cost, NOT edge_blocked) FROM usage_events GROUP BY api_key_id"))  # fmt: skip
        return units, raw

    await store.open()
    try:
        await store.migrate()
        await store.command("DROP VIEW usage_units_per_minute_mv")  # as before 0004: raw rows only
        await store.command(
            "INSERT INTO usage_events (event_id, event_time, api_key_id, tenant, route, method, status, latency_ms, "
            "response_bytes, cost, client_ip, edge_blocked, schema_version, kafka_partition, kafka_offset) "
            "SELECT generateUUIDv4(), toDateTime64('2026-03-01 00:00:00', 3, 'UTC') + number * 7, 'key-' || toString(number % 3), "
            "'acme', '/', 'GET', 200, 1, 1, 1 + number % 4, '', number % 5 = 0, 1, 2, 100 + number FROM numbers(1000)"
        )
        await store.command(  # a backfill killed part-way: one key's minutes in, the view not made yet
            "INSERT INTO usage_units_per_minute SELECT api_key_id, toStartOfMinute(event_time), kafka_partition, "
            "sumIf(cost, NOT edge_blocked), max(kafka_offset) FROM usage_events WHERE api_key_id = 'key-0' "
            "GROUP BY api_key_id, toStartOfMinute(event_time), kafka_partition"
        )
        for _ in range(2):  # the second run: one interrupted after making the view, before recording it
            await store.command("DELETE FROM throttlex_schema_migrations WHERE version IN (4, 5)")
            assert await store.migrate() == ["0004_units_per_minute.sql", "0005_deduplication_bounds.sql"]
            units, raw = await units_and_raw()
            assert units == raw and len(units) == 3
        windows = await store.query(
            "SELECT name, extract(create_table_query, 'non_replicated_deduplication_window = (\\d+)'), "
            "extract(create_table_query, 'replicated_deduplication_window_seconds = (\\d+)') FROM system.tables "
            "WHERE database = currentDatabase() AND engine LIKE '%MergeTree' AND name != 'throttlex_schema_migrations'"
        )
    finally:
        await store.close()
    assert len(windows) == 5 and all(window == "10000" and seconds == "604800" for _, window, seconds in windows), windows
