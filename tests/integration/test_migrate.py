"""`throttlex migrate` on the real ClickHouse engine (chDB): applies the schema once, then nothing."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from throttlex.ingest.events import encode
from throttlex.processors.accounting.migration_lock import MigrationLockTimeout, migration_lock
from throttlex.processors.accounting.rows import EVENT_SCHEMA, arrow_stream, event_rows
from throttlex.processors.accounting.store import UsageStore
from tests.factories import make_event
from tests.unit.api.test_cli import throttlex

pytestmark = pytest.mark.integration


async def test_migrations_apply_once(tmp_path: Path) -> None:
    env = {"THROTTLEX_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}"}
    first = throttlex("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == ("applied: 0001_usage_events.sql, 0002_exactly_once_and_rollups.sql, 0003_key_plan.sql, "
                                    "0004_units_per_minute.sql, 0005_deduplication_bounds.sql, 0006_event_source.sql, "
                                    "0007_append_time_and_sink_progress.sql, 0008_event_stage.sql")  # fmt: skip
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
    assert "appended_at" in columns and "stage" in columns
    assert sorted(versions) == [(n,) for n in range(1, 9)]

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
            "WHERE database = currentDatabase() AND engine LIKE '%MergeTree' AND name NOT IN ('throttlex_schema_migrations', 'throttlex_migration_lock')"
        )
    finally:
        await store.close()
    assert len(windows) == 6 and all(window == "10000" and seconds == "604800" for _, window, seconds in windows), windows


async def test_two_processes_migrating_at_once_apply_each_migration_once(tmp_path: Path) -> None:
    """Sinks and the API each migrate at start. chDB opens a directory from one process at a time, so the two
    "processes" here are two stores of one process, each with its own connections to the engine."""
    dsn = f"chdb://{tmp_path / 'chdb'}"
    first, second = UsageStore(dsn), UsageStore(dsn)
    await first.open()
    await second.open()
    try:
        applied = await asyncio.gather(first.migrate(), second.migrate())
        versions = await first.query("SELECT version, count() FROM throttlex_schema_migrations GROUP BY version ORDER BY version")
        assert versions == [(n, 1) for n in range(1, 9)]  # each applied once
        assert sorted(applied[0] + applied[1]) == [f"000{n}_{name}.sql" for n, name in enumerate(
            ["usage_events", "exactly_once_and_rollups", "key_plan", "units_per_minute", "deduplication_bounds",
             "event_source", "append_time_and_sink_progress", "event_stage"], start=1)]  # fmt: skip
        assert [] in applied  # one applied them all; the other waited, then found nothing left
        turns = await first.query("SELECT turn, groupArray(state) FROM throttlex_migration_lock GROUP BY turn ORDER BY turn")
        # One turn each at most (the second store may take the lock after the first released it, to find nothing
        # left), every turn released.
        assert [turn for turn, _ in turns] in ([1], [1, 2]) and all(sorted(states) == ["released", "taken"] for _, states in turns)
    finally:
        await second.close()
        await first.close()


async def test_sinks_of_earlier_versions_keep_inserting_after_this_versions_migrations(tmp_path: Path) -> None:
    """0007 and 0008 only expand: an insert without ``appended_at`` and ``stage`` (what a sink of an earlier version
    sends while a newer one has migrated) is stored, ``appended_at`` taking its insert time and ``stage`` 'response';
    a new sink's insert stores Kafka's time and the event's stage."""
    store = UsageStore(f"chdb://{tmp_path / 'chdb'}")
    await store.open()
    try:
        await store.migrate()
        old = make_event(event_id=uuid.uuid4(), api_key_id="old")
        new = make_event(event_id=uuid.uuid4(), api_key_id="new", stage="check")
        rows, _ = event_rows([encode(old)], [0], 0)
        previous = pa.Table.from_batches([rows]).drop_columns(["appended_at", "stage"])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, previous.schema) as writer:
            writer.write_table(previous)
        await store.insert_formatted("usage_events", sink.getvalue().to_pybytes(), previous.schema.names, "ArrowStream")
        rows, _ = event_rows([encode(new)], [1], 0, [1_800_000_000_000])
        await store.insert_arrow("usage_events", arrow_stream(pa.Table.from_batches([rows])), EVENT_SCHEMA.names)
        stored = {key: (lag, stage) for key, lag, stage in await store.query(
            "SELECT api_key_id, toUnixTimestamp64Milli(appended_at) - toUnixTimestamp64Milli(inserted_at), stage "
            "FROM usage_events")}  # fmt: skip
        [(appended,)] = await store.query("SELECT toUnixTimestamp64Milli(appended_at) FROM usage_events WHERE api_key_id = 'new'")
    finally:
        await store.close()
    assert stored["old"] == (0, "response") and stored["new"][1] == "check" and appended == 1_800_000_000_000


async def test_a_migration_waits_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    """The lock contended for certain: one store holds it while the other tries to migrate."""
    dsn = f"chdb://{tmp_path / 'chdb'}"
    holder, waiter = UsageStore(dsn), UsageStore(dsn)
    await holder.open()
    await waiter.open()
    try:
        async with migration_lock(holder, "the-holder"):
            with pytest.raises(MigrationLockTimeout, match="held by the-holder"):
                await waiter.migrate(lock_wait_s=1)
            assert await waiter.query("SELECT count() FROM throttlex_schema_migrations") == [(0,)]  # nothing applied
        assert len(await waiter.migrate()) == 8  # released: all of them now
    finally:
        await waiter.close()
        await holder.close()


async def test_retention_is_altered_only_when_it_changes(tmp_path: Path) -> None:
    """Each start applies the raw retention setting: the same value as before issues no ALTER (counted by the
    engine's own `Query` event: a start that alters runs one statement more than one that does not)."""
    store = UsageStore(f"chdb://{tmp_path / 'chdb'}")
    await store.open()
    try:
        await store.migrate()

        async def statements_of(days: int) -> int:
            query = "SELECT value FROM system.events WHERE event = 'Query'"
            [(before,)] = await store.query(query)
            await store.apply_retention(days)
            [(after,)] = await store.query(query)
            return int(after - before)

        changed = await statements_of(400)
        assert await statements_of(400) == changed - 1
        assert await statements_of(300) == changed
        assert await statements_of(0) == changed
        assert await statements_of(0) == changed - 1
    finally:
        await store.close()
