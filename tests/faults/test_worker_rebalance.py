"""Workers joining and leaving while events flow: a second worker takes half the partitions, then the
first one stops; every key's count is exactly its events, each hot key is blocked exactly once (one
block decision over both workers) with the exact unblock time, and no key under its limit is blocked."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from throttlex.ingest import denylist_entries
from throttlex.ingest.clock import wall_clock_ms
from throttlex.processors.core.policy import parse_policies
from throttlex.processors.core.windows import SlidingWindow
from tests.conftest import (EventSender, RoleProcess, Sandbox, eventually, free_port, role_metrics,
                            wait_until_worker_committed, window_counts, worker_state)  # fmt: skip
from tests.integration.test_policies import request, stored_block, worker_counting

pytestmark = pytest.mark.faults

LIMIT, WINDOW_S, HOT_KEYS = 5, 600, 24
POLICIES = f"""
policies:
  - name: per-key
    key: [api_key]
    algorithm: {{type: sliding_window, limit: {LIMIT}, window_s: {WINDOW_S}, bucket_s: 1}}
  - name: per-tenant
    key: [tenant]
    algorithm: {{type: sliding_window, limit: 1000000000, window_s: {WINDOW_S}, bucket_s: 1}}
"""


async def test_a_worker_joining_and_one_leaving_count_exactly_and_block_each_hot_key_once(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(POLICIES)
    ports = [free_port(), free_port()]
    fast = {"THROTTLEX_WORKER_SESSION_TIMEOUT_S": "6"}
    first = spawn("worker", "--policy-file", str(policy_file), extra_env={**fast, "THROTTLEX_METRICS_PORT": str(ports[0])})
    await worker_counting(sandbox, producer, redis)
    sent: Counter[str] = Counter({"warm-up": 1})
    tenants: Counter[str] = Counter({"tenant-of-warm-up": 1})
    hot_times: dict[str, list[int]] = {f"hot-{n}": [] for n in range(HOT_KEYS)}
    stop_load = asyncio.Event()
    flowing, paused = asyncio.Event(), asyncio.Event()
    flowing.set()

    async def load() -> None:
        """~300 events/s of calm keys (fewer than LIMIT events each), and every fourth round one hot
        event: LIMIT for the first hot key, then for the next one, about 24 s in all."""
        n = 0
        while not stop_load.is_set():
            if not flowing.is_set():
                paused.set()
                await flowing.wait()
                paused.clear()
            now = wall_clock_ms()
            batch = [request(f"calm-{(n * 15 + i) % 20_000}", now, tenant=f"t-{(n * 15 + i) % 7}") for i in range(15)]
            hot = f"hot-{sum(map(len, hot_times.values())) // LIMIT}"  # one after the other, about 1 s each
            if n % 4 == 0 and hot in hot_times:
                batch.append(request(hot, now, tenant="t-hot"))
                hot_times[hot].append(now)
            await producer.send_all(batch)
            sent.update(e.api_key_id for e in batch)
            tenants.update(e.tenant for e in batch)
            n += 1
            await asyncio.sleep(0.05)

    traffic = asyncio.create_task(load())
    try:
        await eventually(lambda: _assigned(ports[0], 8), timeout_s=30, what="the first worker to own all 8 partitions")
        second = spawn("worker", "--policy-file", str(policy_file), extra_env={**fast, "THROTTLEX_METRICS_PORT": str(ports[1])})
        await eventually(lambda: _split(ports), timeout_s=60, what="the two workers to share the partitions")
        await eventually(lambda: sum(map(len, hot_times.values())) >= LIMIT * HOT_KEYS // 2, timeout_s=30,
                         what="half the hot events sent while both workers run")  # fmt: skip
        flowing.clear()  # a pause, so that every block the first worker decides is counted before it leaves
        await paused.wait()
        await wait_until_worker_committed(sandbox)
        decisions_of_first = await _blocks_decided(ports[0])
        assert first.stop() == 0  # leaves the group: its partitions move to the second worker
        flowing.set()
        await eventually(lambda: _assigned(ports[1], 8), timeout_s=60, what="the second worker to own all partitions")
        await eventually(lambda: all(len(t) == LIMIT for t in hot_times.values()), timeout_s=60, what="every hot key sent")
    finally:
        stop_load.set()
        flowing.set()
        await traffic

    await wait_until_worker_committed(sandbox)
    states = await worker_state(sandbox, parse_policies(POLICIES, "test"))
    now_ms = wall_clock_ms()
    assert window_counts(states, "per-key", now_ms) == {f"api_key={key}": n for key, n in sent.items()}
    assert window_counts(states, "per-tenant", now_ms) == {f"tenant={tenant}": n for tenant, n in tenants.items()}
    for key, times in hot_times.items():
        reference = SlidingWindow(WINDOW_S * 1000, 1000)
        for t in times:
            reference.add(t, 1)
        until = reference.admits_at(LIMIT)
        await eventually(lambda: _has_block(redis, prefix, key, until), timeout_s=10, what=f"{key}'s block")
    blocked = {key.decode() async for key in redis.scan_iter(match=denylist_entries.block_key(prefix, "*"))}
    assert blocked == {denylist_entries.block_key(prefix, f"api_key={key}") for key in hot_times}
    decisions_of_second = await _blocks_decided(ports[1])
    assert decisions_of_first > 0 and decisions_of_second > 0  # both workers decided blocks
    assert decisions_of_first + decisions_of_second == HOT_KEYS  # none decided twice, none missed
    second.stop()
    print(f"worker joined and left under ~300 events/s: {sum(sent.values())} events counted exactly once; "
          f"{HOT_KEYS} hot keys blocked once each ({decisions_of_first:.0f} by the worker that left)")


async def _assigned(port: int, partitions: int) -> bool:
    return (await role_metrics(port)).get(("throttlex_worker_assigned_partitions", ())) == partitions


async def _split(ports: list[int]) -> bool:
    owned = [(await role_metrics(port)).get(("throttlex_worker_assigned_partitions", ()), 0.0) for port in ports]
    return all(owned) and sum(owned) == 8


async def _blocks_decided(port: int) -> float:
    return (await role_metrics(port)).get(("throttlex_worker_decisions_total", (("outcome", "block"), ("policy", "per-key"))), 0.0)


async def _has_block(redis: Redis, prefix: str, key: str, until: int | None) -> bool:
    block = await stored_block(redis, prefix, f"api_key={key}")
    return block is not None and block.until_ms == until
