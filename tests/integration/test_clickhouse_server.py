"""The schema and the sink's exactly-once insert on a real ClickHouse server, for the deployments chDB does not
cover: a server, and a cluster of them. Nothing here can run on these machines (no ClickHouse server installs
from their registries): give THROTTLEX_TEST_CLICKHOUSE_URL (http://user:password@host:8123/database, an empty
database of the test's own) and, for a cluster, THROTTLEX_TEST_CLICKHOUSE_CLUSTER; without them these tests
are reported as skipped, with this reason."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pyarrow as pa
import pytest

from throttlex.ingest.events import encode
from throttlex.processors.accounting.rows import EVENT_SCHEMA, arrow_stream, event_rows
from throttlex.processors.accounting.store import UsageStore
from tests.factories import make_event

URL = os.environ.get("THROTTLEX_TEST_CLICKHOUSE_URL", "")
CLUSTER = os.environ.get("THROTTLEX_TEST_CLICKHOUSE_CLUSTER", "")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL, reason="no ClickHouse server named (THROTTLEX_TEST_CLICKHOUSE_URL): chDB runs the rest"),
]


@pytest.fixture
async def server() -> AsyncIterator[UsageStore]:
    store = UsageStore(URL, cluster=CLUSTER)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_two_processes_migrating_together_apply_each_schema_file_once(server: UsageStore) -> None:
    other = UsageStore(URL, cluster=CLUSTER)
    await other.open()
    try:
        applied = await asyncio.gather(server.migrate(), other.migrate())
    finally:
        await other.close()
    names = [name for each in applied for name in each]
    assert len(names) == len(set(names))
    assert await server.migrate() == []
    rows = await server.query("SELECT version, count() FROM throttlex_schema_migrations GROUP BY version HAVING count() > 1")
    assert rows == []


async def test_a_batch_inserted_twice_with_its_token_is_stored_once(server: UsageStore) -> None:
    await server.migrate()
    events = [make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % 13}", event_time_ms=1_790_000_000_000 + n) for n in range(500)]
    rows, _ = event_rows([encode(e) for e in events], range(10_000, 10_500), 0)
    stream = arrow_stream(pa.Table.from_batches([rows]))
    token = f"server-test/{uuid.uuid4().hex}/0-499"
    for _ in range(2):  # a retry, perhaps through another replica: dropped on every shard that has the block
        await server.insert_arrow("usage_events", stream, EVENT_SCHEMA.names, dedup_token=token)
    ids = [str(e.event_id) for e in events]
    [(rows, unique)] = await server.query(
        "SELECT count(), uniqExact(event_id) FROM usage_events WHERE toString(event_id) IN {ids:Array(String)}", {"ids": ids}
    )
    assert (rows, unique) == (500, 500)
