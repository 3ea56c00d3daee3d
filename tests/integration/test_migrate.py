"""`throttlex migrate` on the real ClickHouse engine (chDB): applies the schema once, then nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.accounting.store import UsageStore
from tests.unit.api.test_cli import throttlex

pytestmark = pytest.mark.integration


async def test_migrations_apply_once(tmp_path: Path) -> None:
    env = {"THROTTLEX_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}"}
    first = throttlex("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "applied: 0001_usage_events.sql, 0002_exactly_once_and_rollups.sql, 0003_key_plan.sql"
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
    assert "event_time" in columns and "cost" in columns and "edge_blocked" in columns
    assert sorted(versions) == [(1,), (2,), (3,)]

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
