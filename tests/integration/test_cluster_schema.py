"""The schema's cluster form (`cluster_schema`): the statements a migration runs with THROTTLEX_CLICKHOUSE_CLUSTER
are the reviewed text in golden/clickhouse_cluster_schema.sql, and ClickHouse's own parser (the chDB engine's
formatQuery) reads every one, cluster clauses and Replicated engines included. No ClickHouse server or
Keeper runs here; `test_clickhouse_server.py` runs them on one when THROTTLEX_TEST_CLICKHOUSE_URL names it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from throttlex.processors.accounting.cluster_schema import NoClusterForm, for_cluster
from throttlex.processors.accounting.store import StoreError, UsageStore

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).parent / "golden" / "clickhouse_cluster_schema.sql"
REGENERATE = (
    "THROTTLEX_ALLOW_DEV_SECRETS=1 THROTTLEX_CLICKHOUSE_DSN=http://clickhouse:8123/throttlex "
    "THROTTLEX_CLICKHOUSE_CLUSTER=throttlex throttlex migrate --print > tests/integration/golden/clickhouse_cluster_schema.sql"
)


def cluster_schema() -> list[str]:
    return UsageStore("http://clickhouse:8123/throttlex", cluster="throttlex").schema()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[UsageStore]:
    store = UsageStore(f"chdb://{tmp_path / 'chdb'}")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def parsed(engine: UsageStore, statement: str) -> str:
    [(formatted,)] = await engine.query("SELECT formatQuery({statement:String})", {"statement": statement})
    return str(formatted)


def test_the_cluster_schema_is_the_reviewed_text() -> None:
    text = "".join(f"{statement};\n\n" for statement in cluster_schema())
    assert text == GOLDEN.read_text(), f"the cluster schema changed: review it, then regenerate the golden file with\n{REGENERATE}"


async def test_clickhouse_parses_every_statement_of_both_forms(engine: UsageStore) -> None:
    single = UsageStore("http://clickhouse:8123/throttlex").schema()
    for statement in single:
        await parsed(engine, statement)
    for statement in cluster_schema():
        formatted = await parsed(engine, statement)
        if not statement.startswith("INSERT"):
            assert "ON CLUSTER throttlex" in formatted, formatted
        if "MergeTree(" in statement:
            assert "ENGINE = Replicated" in formatted and "'{replica}'" in formatted, formatted
    with pytest.raises(StoreError):  # the parser does refuse what is not ClickHouse SQL
        await parsed(engine, "CREATE TABLE t ON CLUSTER c (x UInt8) ENGINE = Distributed(")


def test_every_sharded_table_has_a_local_replicated_table_and_a_distributed_one() -> None:
    statements = cluster_schema()
    created = [s.split()[5] for s in statements if s.startswith("CREATE TABLE")]
    for table in ("usage_events", "usage_per_minute", "usage_per_hour", "usage_per_day", "usage_units_per_minute", "sink_progress"):
        assert f"{table}_local" in created and table in created, table
        [distributed] = [s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS {table} ON CLUSTER")]
        assert f"Distributed(throttlex, currentDatabase(), {table}_local, " in distributed
    views = [s for s in statements if s.startswith("CREATE MATERIALIZED VIEW")]
    assert views and all("FROM usage_events_local" in s and " TO " in s and "_local AS" in s for s in views)
    for table in ("throttlex_schema_migrations", "throttlex_migration_lock"):  # one copy on every server
        [create] = [s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS {table} ")]
        assert f"'/clickhouse/tables/all/{{database}}/{table}'" in create


def test_a_statement_without_a_cluster_form_is_refused() -> None:
    with pytest.raises(NoClusterForm):
        for_cluster("CREATE VIEW recent AS SELECT * FROM usage_events", "throttlex")
    with pytest.raises(NoClusterForm):
        for_cluster("CREATE TABLE IF NOT EXISTS new_table (x UInt8) ENGINE = MergeTree ORDER BY x", "throttlex")
