"""Reconciliation on real Kafka, Redis and chDB: zero drift when the pipeline agrees, and drift seen
when a live window disagrees with ClickHouse."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import encode
from throttlex.processors.accounting.reconcile import Reconciler
from throttlex.processors.accounting.rows import EVENT_SCHEMA, arrow_stream, event_rows
from throttlex.processors.accounting.store import UsageStore
from throttlex.processors.core.engine import PolicyEngine
from throttlex.processors.core.policy import parse_policies
from throttlex.processors.worker.live_usage import encode_live_usage, usage_key
from throttlex.processors.core.windows import SlidingWindow
from tests.conftest import EventSender, RoleProcess, Sandbox, eventually, free_port
from tests.factories import make_event

pytestmark = pytest.mark.integration


async def metric(api: httpx.AsyncClient, name: str) -> float:
    text = (await api.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return -1.0


async def metric_at_least(api: httpx.AsyncClient, name: str, value: float) -> bool:
    return await metric(api, name) >= value


async def test_drift_is_zero_when_live_counts_match_and_shows_when_they_do_not(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    port = free_port()
    spawn(
        "run", "--policy-file", str(sandbox.write_policy(limit=1_000, window_s=60)), "--api-port", str(port),
        extra_env={"THROTTLEX_RECONCILE_INTERVAL_S": "0.5", "THROTTLEX_RECONCILE_SETTLE_S": "2"},
    )  # fmt: skip
    now = wall_clock_ms()
    await producer.send_all(
        [make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % 3}", event_time_ms=now - 20_000 + n * 100, cost=1 + n % 2)
         for n in range(150)]
    )  # fmt: skip
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as api:

        async def agreed() -> bool:
            # Until the sink has stored the burst just sent, a round may see drift; then it must be 0.
            try:
                windows = await metric(api, "throttlex_reconciliation_windows_total")
                return windows >= 6 and await metric(api, "throttlex_reconciliation_drift_units") == 0
            except httpx.TransportError:
                return False

        await eventually(agreed, timeout_s=60, what="a reconciliation round over the three keys with no drift")
        settled_mismatches = await metric(api, "throttlex_reconciliation_mismatches_total")
        windows = await metric(api, "throttlex_reconciliation_windows_total")
        await eventually(
            lambda: metric_at_least(api, "throttlex_reconciliation_windows_total", windows + 6), what="two more rounds"
        )
        assert await metric(api, "throttlex_reconciliation_mismatches_total") == settled_mismatches

        # A live window claiming 7 units for a key ClickHouse has never seen.
        ghost = SlidingWindow(60_000, 1_000)
        ghost.add(now - 30_000, 7)
        prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
        await redis.set(usage_key(prefix, "api_key=ghost"), encode_live_usage({"test-limit": ghost}))

        async def drift_seen() -> bool:
            return await metric(api, "throttlex_reconciliation_drift_units") == 7

        await eventually(drift_seen, timeout_s=30, what="the drift of the ghost window")
        assert await metric(api, "throttlex_reconciliation_mismatches_total") >= 1


POLICIES = """
plans: {free: {monthly_units: 1000000}, pro: {monthly_units: 5000000}}
default_plan: free
policies:
  - name: pro-acme-api
    match: {routes: ["/v1/*"], tenants: [acme], plans: [pro]}
    key: [api_key]
    algorithm: {type: sliding_window, limit: 1000000, window_s: 60, bucket_s: 1}
    route_costs: {"/v1/export*": 10, "/v1/*": 2}
"""


async def test_a_round_compares_what_the_policies_in_force_count(sandbox: Sandbox, redis: Redis, tmp_path: Path) -> None:
    """Route costs, tenants and plans count as the engine counts them, and a policy set replaced while the
    reconciler runs is the one it compares (the start-up one has no such policy)."""
    in_force = parse_policies(POLICIES, "test")
    now = wall_clock_ms()
    events = [
        make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % 2}", event_time_ms=now - 40_000 + n * 100,
                   route=["/v1/export/{id}", "/v1/items/{id}", "/v2/items"][n % 3], tenant=["acme", "globex"][n % 5 == 0],
                   plan=["pro", "", "free"][n % 4 % 3], cost=1 + n % 3)
        for n in range(240)
    ]  # fmt: skip
    engine = PolicyEngine(in_force)
    for event in events:
        engine.apply(event)
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    for limit_key, state in engine.state.items():  # what the worker mirrors to Redis
        await redis.set(usage_key(prefix, limit_key), encode_live_usage(state.windows))
    assert sum(sum(w.counts) for s in engine.state.values() for w in s.windows.values() if isinstance(w, SlidingWindow)) > 0

    store = UsageStore(f"chdb://{tmp_path / 'chdb'}")
    await store.open()
    try:
        await store.migrate()
        rows, _ = event_rows([encode(event) for event in events], range(len(events)), 0)
        await store.insert_arrow("usage_events", arrow_stream(pa.Table.from_batches([rows])), EVENT_SCHEMA.names, dedup_token="t/0/0")
        reconciler = Reconciler(redis, prefix, parse_policies(STARTUP_POLICIES, "start-up"), store, settle_s=2, max_keys=100)
        before = await reconciler.run_once()
        reconciler.policies = in_force  # as the runner does when the file or the registry changes them
        after = await reconciler.run_once()
    finally:
        await store.close()
    assert before.windows == 0  # the start-up policies have no window by that name
    assert (after.windows, after.mismatched, after.drift_units) == (2, 0, 0)


STARTUP_POLICIES = """
policies:
  - name: something-else
    key: [api_key]
    algorithm: {type: sliding_window, limit: 10, window_s: 60}
"""
