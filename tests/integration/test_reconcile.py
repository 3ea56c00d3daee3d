"""Reconciliation on real Kafka, Redis and chDB: zero drift when the pipeline agrees, and drift seen
when a live window disagrees with ClickHouse."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from ingest.clock import wall_clock_ms
from processors.worker.live_usage import encode_live_usage, usage_key
from processors.core.windows import SlidingWindow
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
