"""ClickHouse refusing inserts: the sink backs off and retries without committing offsets, its lag
and failure counter show it, a crash while inserts fail loses nothing, and once inserts succeed
every event is stored exactly once.

The fault is injected at the client boundary: the sink process runs with `UsageStore.insert_formatted_blocking` (the sink's insert) wrapped
to raise a transient `StoreError` while a flag file exists. Everything else — Kafka, the sink, chDB —
is the real thing."""

from __future__ import annotations

import random
import signal
import time
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from throttlex.ingest.clock import wall_clock_ms
from throttlex.processors.accounting.store import UsageStore
from tests.conftest import (EVENTS_PARTITIONS, EventSender, RoleProcess, Sandbox, eventually, free_port, role_metrics,
                            start_role, stop_role)
from tests.factories import make_event

pytestmark = pytest.mark.faults

FAULTY_SINK = """
import os
from pathlib import Path
from throttlex.processors.accounting.store import StoreError, UsageStore

refuse_while = Path(os.environ["THROTTLEX_TEST_REFUSE_INSERTS_WHILE"])
insert = UsageStore.insert_formatted_blocking

def refusing_insert(self, table, data, columns, fmt, *, dedup_token=None):
    if refuse_while.exists() and table == "usage_events":
        raise StoreError("Code: 210. connection reset by peer (injected)", retriable=True)
    insert(self, table, data, columns, fmt, dedup_token=dedup_token)

UsageStore.insert_formatted_blocking = refusing_insert
from throttlex.api.cli import main
main()
"""


async def committed(sandbox: Sandbox) -> dict[int, tuple[int, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=sandbox.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(sandbox.env["THROTTLEX_SINK_GROUP"])
    finally:
        await admin.close()
    return {tp.partition: (meta.offset, meta.metadata) for tp, meta in offsets.items()}


async def test_inserts_failing_then_a_crash_then_recovery_store_every_event_once(
    sandbox: Sandbox, producer: EventSender
) -> None:
    rng = random.Random(6)
    now = wall_clock_ms()
    events = [
        make_event(event_id=uuid.uuid4(), api_key_id=f"{rng.randrange(40):024x}", event_time_ms=now - rng.randrange(600_000),
                   cost=rng.randint(1, 5))
        for _ in range(6_000)
    ]  # fmt: skip
    await producer.send_all(events[:4_000])
    flag = sandbox.root / "refuse-inserts"
    flag.touch()
    port = free_port()
    env = {"THROTTLEX_TEST_REFUSE_INSERTS_WHILE": str(flag), "THROTTLEX_METRICS_PORT": str(port)}
    roles: list[RoleProcess] = []
    try:
        roles.append(start_role(sandbox, ["sink"], env, launch=FAULTY_SINK))

        async def refused_and_retrying(at_least: int) -> bool:
            values = await role_metrics(port)
            return values.get(("throttlex_sink_errors_total", (("kind", "insert"),)), 0) >= at_least

        await eventually(lambda: refused_and_retrying(3), timeout_s=60, what="the sink to retry refused inserts")
        lag_key = ("throttlex_consumer_lag_events", (("group", sandbox.env["THROTTLEX_SINK_GROUP"]),))
        await eventually(lambda: _equals(port, lag_key, 4_000), timeout_s=15, what="the lag gauge to show every event")
        for offset, metadata in (await committed(sandbox)).values():
            assert offset == 0 and metadata.startswith("inflight:"), (offset, metadata)  # intent only, nothing done

        roles[-1].stop(signal.SIGKILL)  # a crash while inserts fail
        await producer.send_all(events[4_000:])
        roles.append(start_role(sandbox, ["sink"], env, launch=FAULTY_SINK))
        await eventually(lambda: refused_and_retrying(2), timeout_s=60, what="the restarted sink to retry")

        flag.unlink()  # ClickHouse takes inserts again
        recovered_at = time.monotonic()
        await eventually(lambda: _equals(port, ("throttlex_sink_rows_total", ()), len(events)), timeout_s=60,
                         what="every event to be inserted")  # fmt: skip
        recovery_s = time.monotonic() - recovered_at

        async def every_end_committed() -> bool:  # by the sink's thread just after the inserts land
            ends = {p: off for p, (off, _) in (await committed(sandbox)).items()}
            return sum(ends.values()) == len(events) and len(ends) == EVENTS_PARTITIONS

        await eventually(every_end_committed, timeout_s=10, what="every batch's end to be committed")
        values = await role_metrics(port)
        retries = values[("throttlex_sink_errors_total", (("kind", "insert"),))]
    finally:
        for role in roles:
            stop_role(role)

    store = UsageStore(sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    await store.open()
    try:
        [(rows, unique, cost)] = await store.query("SELECT count(), uniqExact(event_id), sum(cost) FROM usage_events")
        [(minute_requests,)] = await store.query("SELECT sum(requests) FROM usage_per_minute")
    finally:
        await store.close()
    assert (rows, unique, cost) == (len(events), len(events), sum(e.cost for e in events))
    assert minute_requests == len(events)
    print(f"ClickHouse refusing inserts: {len(events)} produced, {rows} stored once each after a crash and "
          f"{retries:.0f} refused inserts in the last sink; all stored {recovery_s:.1f} s after inserts succeeded again")


async def _equals(port: int, key: tuple[str, tuple[tuple[str, str], ...]], value: float) -> bool:
    return (await role_metrics(port)).get(key) == value
