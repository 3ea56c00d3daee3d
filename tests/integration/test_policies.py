"""Several policies on one stream, shadow mode, live policy changes and crash recovery, on a real
Kafka, Redis and `throttlex worker` process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from redis.asyncio import Redis

from throttlex.ingest import denylist_entries
from throttlex.ingest.denylist_entries import Block
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.events import UsageEvent
from throttlex.processors.core.windows import SlidingWindow
from tests.conftest import EventSender, RoleProcess, Sandbox, eventually, free_port
from tests.factories import make_event
from tests.integration.test_sink import committed_offsets, end_offsets

pytestmark = pytest.mark.integration

HOUR_MS = 3_600_000


def request(key_id: str, t_ms: int, **changes: object) -> UsageEvent:
    fields: dict[str, object] = dict(event_id=uuid.uuid4(), api_key_id=key_id, event_time_ms=t_ms, cost=1,
                                     route="/v1/items", method="GET", tenant=f"tenant-of-{key_id}",
                                     client_ip=f"198.51.100.{abs(hash(key_id)) % 250}")  # fmt: skip
    fields.update(changes)
    return make_event(**fields)


def values(key_id: str = "someone", **changes: str) -> dict[str, str]:
    """A request's dimension values as the gateway middleware builds them."""
    return {"api_key": key_id, "tenant": "elsewhere", "ip": "203.0.113.250", "route": "/v1/items",
            "method": "GET", **changes}  # fmt: skip


def sliding_admit(times: list[int], limit: int, window_s: int, *, bucket_ms: int = 1000) -> int:
    reference = SlidingWindow(window_s * 1000, bucket_ms)
    for t in times:
        reference.add(t, 1)
    until = reference.admits_at(limit)
    assert until is not None
    return until


async def stored_block(redis: Redis, prefix: str, limit_key: str) -> Block | None:
    raw = await redis.get(denylist_entries.block_key(prefix, limit_key))
    return None if raw is None else denylist_entries.decode_block(raw)


@contextlib.asynccontextmanager
async def edge(sandbox: Sandbox) -> AsyncIterator[EdgeDenylist]:
    client = EdgeDenylist(sandbox.redis_url, sandbox.env["THROTTLEX_REDIS_PREFIX"])
    await client.start()
    assert client.synced
    try:
        yield client
    finally:
        await client.stop()


SEVERAL = """
policies:
  - name: per-key-minute
    key: [api_key]
    algorithm: {type: sliding_window, limit: 10, window_s: 60, bucket_s: 1}
  - name: tenant-burst
    match: {tenants: [t-burst]}
    key: [tenant]
    algorithm: {type: token_bucket, rate_per_s: 0.1, burst: 5}
  - name: per-ip-hour
    match: {routes: ["/v1/ip/*"]}
    key: [ip]
    algorithm: {type: fixed_window, limit: 8, window_s: 3600}
  - name: watch-deletes
    shadow: true
    match: {methods: [DELETE]}
    key: [method]
    algorithm: {type: sliding_window, limit: 3, window_s: 60, bucket_s: 1}
"""


async def test_several_policies_on_one_stream_each_block_their_own_key_and_shadow_never_blocks(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(SEVERAL)
    metrics_port = free_port()
    spawn("worker", "--policy-file", str(policy_file), extra_env={"THROTTLEX_METRICS_PORT": str(metrics_port)})

    now = wall_clock_ms()
    # per key per minute: 10 requests of one key, each from its own address.
    hot = [request("k-hot", now - 1_000 + 100 * n) for n in range(10)]
    # per tenant burst: 6 keys of tenant t-burst at one instant; the bucket holds 5.
    t0 = now
    burst = [request(f"k-burst-{n}", t0, tenant="t-burst") for n in range(6)]
    # per ip: 8 keys from one address on /v1/ip/...; the hourly window holds 8.
    shared_ip = [request(f"k-ip-{n}", now + n, route="/v1/ip/lookup", client_ip="192.0.2.9") for n in range(8)]
    # shadow: 4 DELETEs from a key under every other limit.
    deletes = [request("k-calm", now + n, method="DELETE") for n in range(4)]
    await producer.send_all(hot + burst + shared_ip + deletes)

    expected = {
        "api_key=k-hot": Block("api_key=k-hot", sliding_admit([e.event_time_ms for e in hot], 10, 60), "per-key-minute"),
        # GCRA: six units take the bucket to t0 + 6 * 10 s; one token (of 5) is back 4 * 10 s earlier.
        "tenant=t-burst": Block("tenant=t-burst", t0 + 20_000, "tenant-burst", dims=("tenant",)),
        "ip=192.0.2.9": Block("ip=192.0.2.9", (now // HOUR_MS + 1) * HOUR_MS, "per-ip-hour", dims=("ip",)),
    }
    block_keys = [denylist_entries.block_key(prefix, k) for k in expected]
    await eventually(lambda: _all_exist(redis, block_keys), what="a block for each policy")
    for limit_key, block in expected.items():
        stored = await stored_block(redis, prefix, limit_key)
        assert stored is not None
        assert (stored.limit_key, stored.until_ms, stored.policy, stored.dims) == (
            block.limit_key, block.until_ms, block.policy, block.dims,
        )  # fmt: skip

    async with edge(sandbox) as gateway:
        assert gateway.check(values("k-hot")) is not None
        assert gateway.check(values("a-new-key", ip="192.0.2.9")) is not None  # another key, same address
        assert gateway.check(values("k-burst-0")) is None  # only its tenant is limited
        assert gateway.check(values("a-new-key", tenant="t-burst")) is not None  # another key, same tenant
        assert gateway.check(values("k-calm", method="DELETE")) is None  # shadow: never blocks

    keys = [key.decode() async for key in redis.scan_iter(match=f"{prefix}:block:*")]
    assert sorted(keys) == sorted(denylist_entries.block_key(prefix, k) for k in expected)  # nothing for the shadow policy

    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    # The 3rd and 4th DELETE would each have been blocked (3 in the window is the limit).
    assert 'throttlex_worker_decisions_total{outcome="shadow_block",policy="watch-deletes"} 2.0' in text
    assert 'throttlex_worker_decisions_total{outcome="block",policy="tenant-burst"} 2.0' in text


async def test_policy_changes_apply_under_traffic_and_removal_lifts_the_block(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.write_policy(limit=1_000, window_s=30)
    worker = spawn("worker", "--policy-file", str(policy_file), extra_env={"THROTTLEX_POLICY_RELOAD_INTERVAL_S": "1"})
    stop = asyncio.Event()

    async def traffic() -> None:  # one request every 100 ms, stamped now
        while not stop.is_set():
            await producer(request("k-steady", wall_clock_ms()))
            await asyncio.sleep(0.1)

    sender = asyncio.create_task(traffic())
    async with edge(sandbox) as gateway:
        try:
            usage = f"{prefix}:usage:api_key=k-steady"
            await eventually(lambda: redis.exists(usage), timeout_s=30, what="the worker to count the traffic")
            assert gateway.check(values("k-steady")) is None
            changed_at = time.monotonic()
            sandbox.write_policy(limit=5, window_s=30)  # the same policy, now far below the traffic
            await eventually(lambda: gateway.check(values("k-steady")) is not None, timeout_s=10, what="the new limit")
            assert time.monotonic() - changed_at <= 5.0
        finally:
            stop.set()
            await sender
        block = gateway.check(values("k-steady"))
        assert block is not None and block.until_ms - wall_clock_ms() > 10_000  # ~30 s window: far from its end

        policy_file.write_text("policies:\n  - name: someone-else\n    key: [ip]\n"
                               "    algorithm: {type: fixed_window, limit: 5, window_s: 60}\n")  # fmt: skip
        removed_at = time.monotonic()
        await eventually(lambda: gateway.check(values("k-steady")) is None, timeout_s=10, what="the lift")
        assert time.monotonic() - removed_at <= 5.0
        assert not await redis.exists(denylist_entries.block_key(prefix, "api_key=k-steady"))

        # A change that does not validate is refused, and the policies in force stay.
        policy_file.write_text("policies:\n  - name: broken\n    key: [nothing]\n")
        await eventually(lambda: "policy change refused" in worker.log(), timeout_s=10, what="the refusal")
        assert "broken" in worker.log() and worker.process.poll() is None


async def test_the_edge_unblocks_at_the_exact_admit_time(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    spawn("worker", "--policy-file", str(sandbox.write_policy(limit=3, window_s=3)))
    await worker_counting(sandbox, producer, redis)
    async with edge(sandbox) as gateway:
        start = wall_clock_ms()
        times = [start, start + 10, start + 20]
        expected_until = sliding_admit(times, 3, 3)
        for t in times:
            await producer(request("k-short", t))
        await eventually(lambda: gateway.check(values("k-short")) is not None, timeout_s=10, what="the block")
        while gateway.check(values("k-short")) is not None:
            await asyncio.sleep(0.01)
        observed = wall_clock_ms()
    assert abs(observed - expected_until) <= 1_000  # within one bucket


async def test_a_worker_killed_with_sigkill_resumes_with_the_same_counts(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.write_policy(limit=10, window_s=120, bucket_s=0.05)
    worker = spawn("worker", "--policy-file", str(policy_file))
    now = wall_clock_ms()
    # One event every 50 ms bucket, so that each extra event moves the admit time by a whole bucket; all
    # within the tolerance of Kafka's append time, so each counts at its own time.
    blocked = [request("k-blocked", now - 1_000 + 50 * n) for n in range(10)]
    near = [request("k-near", now - 1_000 + 50 * n) for n in range(9)]
    await producer.send_all(blocked + near)
    await eventually(lambda: redis.exists(denylist_entries.block_key(prefix, "api_key=k-blocked")), what="the first block")
    await _wait_until_worker_committed(sandbox)

    worker.stop(signal.SIGKILL)
    spawn("worker", "--policy-file", str(policy_file))
    later = wall_clock_ms()
    extra = [request("k-blocked", later), request("k-near", later)]
    await producer.send_all(extra)

    # k-near had 9 of 10: one more blocks it, so its count survived. k-blocked's block moves on by one
    # bucket, to the admit time of all 11 of its events, so its window survived too.
    first_until = sliding_admit([e.event_time_ms for e in blocked], 10, 120, bucket_ms=50)
    assert sliding_admit([e.event_time_ms for e in blocked] + [later], 10, 120, bucket_ms=50) == first_until + 50
    for key, events in (("k-near", near), ("k-blocked", blocked)):
        times = [e.event_time_ms for e in events] + [later]
        until = sliding_admit(times, 10, 120, bucket_ms=50)
        await eventually(lambda: _has_block_until(redis, prefix, key, until), timeout_s=60, what=f"{key}'s block")


async def worker_counting(sandbox: Sandbox, producer: EventSender, redis: Redis) -> None:
    """Wait until the worker has joined its group and counts events (a warm-up key's live usage)."""
    await producer(request("warm-up", wall_clock_ms()))
    usage = f"{sandbox.env['THROTTLEX_REDIS_PREFIX']}:usage:api_key=warm-up"
    await eventually(lambda: redis.exists(usage), timeout_s=60, what="the worker to count a first event")


async def _all_exist(redis: Redis, keys: list[str]) -> bool:
    return bool(await redis.exists(*keys) == len(keys))


async def _has_block_until(redis: Redis, prefix: str, key_id: str, until_ms: int) -> bool:
    block = await stored_block(redis, prefix, f"api_key={key_id}")
    return block is not None and block.until_ms == until_ms


async def _wait_until_worker_committed(sandbox: Sandbox) -> None:
    """The worker commits offsets after each state flush; wait until everything sent so far is committed."""
    group = sandbox.env["THROTTLEX_WORKER_GROUP"]

    async def committed() -> bool:
        ends = await end_offsets(sandbox)
        done = await committed_offsets(sandbox, group)
        return all(done.get(tp, 0) >= end for tp, end in ends.items())

    await eventually(committed, timeout_s=30, what="the worker to commit its offsets")
