"""Policies changed while no worker ran: one removed, one whose limit was raised. The blocks they caused are
in Redis and in every edge's cache, and in the state the next worker reads back; that worker checks each
block it restores against the policies now in force, so within 5 s of its start neither Redis nor an edge
holds a stale block."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist_entries import block_key
from tests.conftest import EventSender, RoleProcess, Sandbox, eventually
from tests.factories import make_event
from tests.integration.test_policies import edge

pytestmark = pytest.mark.faults

BEFORE = """
policies:
  - name: hourly-a
    match: {routes: ["/a/*"]}
    key: [api_key]
    algorithm: {type: fixed_window, limit: 10, window_s: 3600}
  - name: sliding-b
    match: {routes: ["/b/*"]}
    key: [api_key]
    algorithm: {type: sliding_window, limit: 10, window_s: 3600, bucket_s: 1}
"""
AFTER = """
policies:
  - name: sliding-b
    match: {routes: ["/b/*"]}
    key: [api_key]
    algorithm: {type: sliding_window, limit: 100, window_s: 3600, bucket_s: 1}
"""
LIFTED_WITHIN_S = 5.0


async def test_blocks_of_policies_removed_or_relaxed_while_stopped_are_lifted_at_start(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(BEFORE)
    worker = spawn("worker", "--policy-file", str(policy_file))
    await producer.send_all([
        make_event(event_id=uuid.uuid4(), api_key_id=key, route=route, event_time_ms=wall_clock_ms(), cost=1)
        for key, route in (("ka", "/a/x"), ("kb", "/b/x")) for _ in range(12)
    ])  # fmt: skip
    entries = [block_key(prefix, "api_key=ka"), block_key(prefix, "api_key=kb")]

    async def in_redis(count: int) -> bool:
        return bool(await redis.exists(*entries) == count)

    await eventually(lambda: in_redis(2), timeout_s=60, what="both keys blocked")

    async with edge(sandbox) as gateway:
        assert gateway.blocked("api_key=ka") is not None and gateway.blocked("api_key=kb") is not None
        worker.stop()
        policy_file.write_text(AFTER)  # hourly-a removed, sliding-b raised to 100: neither key is over a limit
        started = time.monotonic()
        spawn("worker", "--policy-file", str(policy_file))

        def at_edge() -> bool:
            return gateway.blocked("api_key=ka") is None and gateway.blocked("api_key=kb") is None

        await eventually(lambda: in_redis(0), timeout_s=30, what="the stale blocks lifted in Redis")
        await eventually(at_edge, timeout_s=5, what="the stale blocks lifted at the edge")
        lifted_s = time.monotonic() - started
    print(f"stale blocks lifted in Redis and at the edge {lifted_s:.1f} s after the worker was started")
    assert lifted_s <= LIFTED_WITHIN_S
