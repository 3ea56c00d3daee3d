"""The edge denylist against a real Redis: blocks and lifts of every key kind, and the fail modes
when Redis cannot be reached."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from redis.asyncio import Redis

from throttlex.ingest.denylist_entries import Block, encode_block
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.processors.worker.denylist_writer import DenylistWriter
from tests.conftest import Sandbox, eventually, free_port

pytestmark = pytest.mark.integration


def request(**changes: str) -> dict[str, str]:
    return {"api_key": "k1", "tenant": "acme", "ip": "10.1.2.3", "route": "/v1/items", "method": "GET", **changes}


async def test_blocks_of_each_key_kind_apply_to_matching_requests_and_lifts_remove_them(
    sandbox: Sandbox, redis: Redis
) -> None:
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    writer = DenylistWriter(redis, prefix)
    edge = EdgeDenylist(sandbox.redis_url, prefix)
    await edge.start()
    try:
        until = wall_clock_ms() + 60_000
        tenant_route = Block("tenant=acme|route=/v1/items", until, "tenant-route", dims=("tenant", "route"))
        ip = Block("ip=10.1.2.3", until + 5_000, "per-ip", dims=("ip",))
        assert await writer.publish([tenant_route]) == 1
        await eventually(lambda: edge.check(request()) is not None, timeout_s=5, what="the tenant/route block")
        assert edge.check(request(route="/v1/other")) is None
        assert edge.check(request(tenant="other")) is None
        assert await writer.publish([ip]) == 1
        await eventually(lambda: edge.check(request(tenant="other")) is not None, timeout_s=5, what="the ip block")
        found = edge.check(request())
        assert found is not None and found.policy == "per-ip"  # both match: the longer wins

        assert await writer.publish([msgspec.structs.replace(ip, until_ms=0)]) == 1  # a lift
        await eventually(lambda: edge.check(request(tenant="other")) is None, timeout_s=5, what="the lift")
        assert not await redis.exists(f"{prefix}:block:ip=10.1.2.3")
        late = EdgeDenylist(sandbox.redis_url, prefix)  # a gateway starting now sees the same
        await late.start()
        try:
            found = late.check(request())
            assert found is not None and found.policy == "tenant-route"
            assert late.check(request(tenant="other")) is None
        finally:
            await late.stop()
    finally:
        await edge.stop()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_fail_mode_applies_once_redis_is_unreachable_for_longer_than_stated(mode: str) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    edge = EdgeDenylist(unreachable, "nowhere", fail_mode=mode, fail_after_s=0.5, reconnect_delay_s=0.1)  # type: ignore[arg-type]
    started = time.monotonic()
    await edge.start(ready_timeout_s=0.2)
    try:
        assert not edge.synced and not edge.refusing  # within the grace period: admit
        if mode == "closed":
            await eventually(lambda: edge.refusing, timeout_s=5, what="the closed edge to refuse")
            assert time.monotonic() - started > 0.5, "refused within the grace period"
        else:
            await eventually(lambda: time.monotonic() - started > 0.6, timeout_s=5, what="the grace period to pass")
            assert not edge.refusing
        assert edge.check(request()) is None  # the cache is only consulted, never Redis
    finally:
        await edge.stop()


async def test_a_synchronised_edge_never_refuses_in_closed_mode(sandbox: Sandbox) -> None:
    edge = EdgeDenylist(sandbox.redis_url, "anything", fail_mode="closed", fail_after_s=0.1)
    await edge.start()
    try:
        await asyncio.sleep(0.3)
        assert edge.synced and not edge.refusing
    finally:
        await edge.stop()


async def test_a_block_whose_notice_was_lost_reaches_the_edge_at_its_next_resync(sandbox: Sandbox, redis: Redis) -> None:
    """A change written to Redis whose notice never reached the edge (published to a primary that failed over
    before its replicas had it, say) is in the edge's cache within its resync interval."""
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    edge = EdgeDenylist(sandbox.redis_url, prefix, resync_interval_s=1.0)
    await edge.start()
    try:
        block = Block("api_key=unannounced", wall_clock_ms() + 60_000, "per-key")
        async with redis.pipeline(transaction=False) as pipe:  # the entry and its index, as the writer leaves them, no notice
            pipe.set(f"{prefix}:block:{block.limit_key}", encode_block(block), px=60_000)
            pipe.zadd(f"{prefix}:block-index", {block.limit_key: block.until_ms})
            await pipe.execute()
        written = time.monotonic()
        await eventually(lambda: edge.blocked(block.limit_key) is not None, timeout_s=5, what="the edge's resync")
        assert time.monotonic() - written < 1.0 + 0.5, "not within the resync interval"
    finally:
        await edge.stop()


async def test_a_resync_reads_the_blocks_in_force_not_the_keyspace(sandbox: Sandbox, redis: Redis) -> None:
    """Ten thousand other keys (live usage, key views) beside three blocks and one ended block: a resync reads
    the three, without a SCAN."""
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(10_000):
            pipe.set(f"{prefix}:usage:api_key=k{n}", b"1", ex=60)
        await pipe.execute()
    now = wall_clock_ms()
    blocks = [Block(f"api_key=hot-{n}", now + 60_000, "per-key") for n in range(3)]
    writer = DenylistWriter(redis, prefix)
    assert await writer.publish([*blocks, Block("api_key=ended", now + 300, "per-key")]) == 4

    async def ended() -> bool:
        return not await redis.exists(f"{prefix}:block:api_key=ended")

    await eventually(ended, timeout_s=5, what="the short block to end")
    scans_before = (await redis.info("commandstats")).get("cmdstat_scan", {}).get("calls", 0)
    edge = EdgeDenylist(sandbox.redis_url, prefix)
    await edge.start()
    try:
        assert set(edge.in_force()) == {block.limit_key for block in blocks}
        assert (await redis.info("commandstats")).get("cmdstat_scan", {}).get("calls", 0) == scans_before
    finally:
        await edge.stop()
