"""Gateways whose clocks are wrong: +3 s, -10 s, +60 s and -60 s, beside one on time, feed one `[api_key]`
and one `[tenant]` sliding window longer than the test, with the shipped settings. Every key counts every
event and is blocked as with perfect clocks; its block ends when the window admits again by Kafka's clock,
not the gateway's; every event is stored with the gateway's time and Kafka's append time beside it; and the
worker's skew metric names the skewed sources."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.processors.core.policy import parse_policies
from tests.conftest import (EventSender, RoleProcess, Sandbox, eventually, free_port, role_metrics,
                            stored_events_where, wait_until_sink_committed,
                            wait_until_worker_committed, window_counts, worker_state)  # fmt: skip
from tests.factories import make_event
from tests.integration.test_policies import stored_block

pytestmark = pytest.mark.faults

PER_KEY, PER_TENANT, WINDOW_S = 10, 40, 3600
POLICIES = f"""
policies:
  - name: per-key
    key: [api_key]
    algorithm: {{type: sliding_window, limit: {PER_KEY}, window_s: {WINDOW_S}, bucket_s: 1}}
  - name: per-tenant
    key: [tenant]
    algorithm: {{type: sliding_window, limit: {PER_TENANT}, window_s: {WINDOW_S}, bucket_s: 1}}
"""
SKEWS_MS = {"on-time": 0, "ahead-3s": 3_000, "behind-10s": -10_000, "ahead-60s": 60_000, "behind-60s": -60_000}
EACH = 15
TOLERANCE_MS = 2_000
"""How far before Kafka's append time an event may be stamped and keep its own time (the shipped default)."""


async def test_skewed_gateways_are_enforced_by_kafkas_clock_and_billed_by_their_own(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(POLICIES)
    port = free_port()
    spawn("worker", "--policy-file", str(policy_file), extra_env={"THROTTLEX_METRICS_PORT": str(port)})
    sink = spawn("sink")
    await eventually(lambda: role_metrics(port), what="the worker's metrics")

    started_ms = wall_clock_ms()
    for _ in range(EACH):  # the gateways take turns, as concurrent ones would
        now_ms = wall_clock_ms()
        await producer.send_all([
            make_event(event_id=uuid.uuid4(), api_key_id=f"key-{name}", tenant="shared", event_time_ms=now_ms + skew,
                       cost=1, source=f"gateway:{name}")
            for name, skew in SKEWS_MS.items()
        ])  # fmt: skip
    ended_ms = wall_clock_ms()
    await wait_until_worker_committed(sandbox)

    # Every event counts for its key and for the shared tenant: blocked at the same count as perfect clocks.
    states = await worker_state(sandbox, parse_policies(POLICIES, "test"))
    per_key = window_counts(states, "per-key", ended_ms)
    assert per_key == {f"api_key=key-{name}": EACH for name in SKEWS_MS}
    assert window_counts(states, "per-tenant", ended_ms) == {"tenant=shared": EACH * len(SKEWS_MS)}

    # Each block ends one window after the events reached Kafka, whatever the gateway's clock said.
    for limit_key in [*per_key, "tenant=shared"]:
        block = await stored_block(redis, prefix, limit_key)
        assert block is not None, f"{limit_key} was never blocked"
        earliest = started_ms - TOLERANCE_MS - 1_000 + WINDOW_S * 1000
        assert earliest <= block.until_ms <= ended_ms + 1_000 + WINDOW_S * 1000, limit_key

    # The skew metric names every skewed source with its offset from Kafka's clock.
    samples = await role_metrics(port)
    offsets = {dict(labels)["source"]: value for (name, labels), value in samples.items()
               if name == "throttlex_worker_source_clock_offset_seconds"}  # fmt: skip
    for name, skew in SKEWS_MS.items():
        assert offsets[f"gateway:{name}"] == pytest.approx(skew / 1000, abs=1.0), name

    # Billing keeps the gateway's time, with Kafka's append time beside it.
    await wait_until_sink_committed(sandbox)
    sink.stop()
    rows = await stored_events_where(
        sandbox,
        "SELECT source, count(), round(avg(toUnixTimestamp64Milli(event_time) - toUnixTimestamp64Milli(appended_at)) / 1000)"
        " FROM usage_events GROUP BY source",
    )
    assert {source: (count, offset_s) for source, count, offset_s in rows} == {
        f"gateway:{name}": (EACH, skew // 1000) for name, skew in SKEWS_MS.items()
    }
