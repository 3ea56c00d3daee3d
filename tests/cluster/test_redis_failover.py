"""The Redis primary is killed (``kill -9``) under traffic, with every role on ``redis+sentinel://``: each
gateway's denylist equals Redis's again within the failover time and the edges' resync interval, the blocks
in force before the kill are back, and new blocks are written and enforced, with no ThrottleX process
restarted."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from throttlex.ingest import denylist_entries, metrics
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.producer import EventProducer
from throttlex.ingest.redis_connection import connect_redis
from tests.cluster.conftest import LocalCluster, on_cluster
from tests.conftest import RoleProcess, Sandbox, eventually, free_port, owns_partitions
from tests.faults.test_broker_restart import counter
from tests.factories import make_event

pytestmark = pytest.mark.cluster

LIMIT, WINDOW_S = 20, 60
RESYNC_S = 5.0  # the edges' resync interval: the shipped default
BEFORE = [f"before-{n}" for n in range(4)]  # hot from the start: blocked before the kill
AFTER = [f"after-{n}" for n in range(4)]  # hot once the new primary is in place
POLICIES = f"""
policies:
  - name: per-key
    key: [api_key]
    algorithm: {{type: sliding_window, limit: {LIMIT}, window_s: {WINDOW_S}, bucket_s: 1}}
"""


async def blocks_in_redis(redis: Redis, prefix: str) -> set[str] | None:
    """The limit keys blocked now, as Redis holds them (index entries whose entry is there); None if it does
    not answer."""
    try:
        index = await redis.zrangebyscore(denylist_entries.block_index(prefix), f"({wall_clock_ms()}", "+inf")
        keys = [key.decode() for key in cast(list[bytes], index)]
        found = await redis.mget([denylist_entries.block_key(prefix, key) for key in keys]) if keys else []
    except (RedisError, OSError):  # failing over
        return None
    return {key for key, raw in zip(keys, found, strict=True) if raw is not None}


async def test_a_killed_redis_primary_is_replaced_and_every_edge_agrees_with_the_new_one(
    sandbox: Sandbox, cluster: LocalCluster, spawn_on: Callable[..., RoleProcess]
) -> None:
    sandbox = on_cluster(sandbox, cluster, redis="sentinel")
    topic, prefix = sandbox.env["THROTTLEX_EVENTS_TOPIC"], sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(POLICIES)
    port = free_port()
    worker = spawn_on(sandbox, "worker", "--policy-file", str(policy_file), extra_env={"THROTTLEX_METRICS_PORT": str(port)})
    await eventually(lambda: owns_partitions(port, 4), timeout_s=60, what="the worker to own the events partitions")
    edges = [EdgeDenylist(sandbox.redis_url, prefix, resync_interval_s=RESYNC_S) for _ in range(3)]
    for edge in edges:
        await edge.start()
    redis = connect_redis(sandbox.redis_url, socket_timeout=1, socket_connect_timeout=1)
    gateway = EventProducer(sandbox.kafka_bootstrap, topic)
    await gateway.start()
    hot = list(BEFORE)
    stop = asyncio.Event()

    async def traffic() -> None:  # 10 events a second for each hot key, 100 for cold ones
        n = 0
        while not stop.is_set():
            now_ms = wall_clock_ms()
            for key in [*hot, *(f"cold-{(n * 10 + i) % 1000}" for i in range(10))]:
                gateway.emit(make_event(event_id=uuid.uuid4(), api_key_id=key, event_time_ms=now_ms, cost=1))
            n += 1
            await asyncio.sleep(0.1)  # pacing of the load, not a wait for a condition

    def enforced_everywhere(keys: list[str]) -> bool:
        return all(edge.blocked(f"api_key={key}") is not None for key in keys for edge in edges)

    async def edges_agree_with_redis() -> bool:
        in_redis = await blocks_in_redis(redis, prefix)
        return in_redis is not None and all(set(edge.in_force()) == in_redis for edge in edges)

    load = asyncio.create_task(traffic())
    try:
        await eventually(lambda: enforced_everywhere(BEFORE), timeout_s=30, what="the first hot keys blocked at every edge")
        old_primary = await cluster.redis_primary_port()
        assert old_primary is not None
        killed = time.monotonic()
        await asyncio.to_thread(cluster.kill, f"redis-{cluster.redis_ports.index(old_primary) + 1}")

        async def failed_over() -> bool:
            return await cluster.primary_named_by_sentinels() not in (None, old_primary)

        await eventually(failed_over, timeout_s=30, what="the Sentinels to promote a replica")
        failover_s = time.monotonic() - killed
        await eventually(edges_agree_with_redis, timeout_s=30, what="every edge to agree with the new primary")
        agreed_s = time.monotonic() - killed
        assert {f"api_key={key}" for key in BEFORE} <= set(edges[0].in_force()), "blocks in force before the kill are gone"

        hot += AFTER  # new blocks: written to the new primary and enforced at every edge
        await eventually(lambda: enforced_everywhere(AFTER), timeout_s=30, what="blocks decided after the failover at every edge")
        await eventually(edges_agree_with_redis, timeout_s=10, what="every edge to agree with Redis after new blocks")
        print(f"failover {failover_s:.1f} s after the kill; every edge equal to the new primary {agreed_s:.1f} s after it")
        assert agreed_s <= failover_s + RESYNC_S, "the edges took longer than the failover and one resync interval"
        assert worker.process.poll() is None, "the worker exited"
    finally:
        stop.set()
        await load
        await gateway.stop()
        for edge in edges:
            await edge.stop()
        await redis.aclose()


async def test_a_lift_and_a_block_the_old_primary_took_with_it_are_written_again(
    sandbox: Sandbox, cluster: LocalCluster, spawn_on: Callable[..., RoleProcess]
) -> None:
    """The replicas are frozen while the worker lifts some blocks (a relaxed policy) and writes new ones; then the
    primary is killed, so the replica promoted never received either. No traffic touches those keys afterwards:
    only the worker's rewrite on seeing another Redis server puts Redis, and every edge, right."""
    sandbox = on_cluster(sandbox, cluster, redis="sentinel")
    topic, prefix = sandbox.env["THROTTLEX_EVENTS_TOPIC"], sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(POLICIES + f"""
  - name: per-tenant
    key: [tenant]
    algorithm: {{type: sliding_window, limit: {LIMIT}, window_s: {WINDOW_S}, bucket_s: 1}}
""")
    port = free_port()
    spawn_on(sandbox, "worker", "--policy-file", str(policy_file), extra_env={"THROTTLEX_METRICS_PORT": str(port)})
    await eventually(lambda: owns_partitions(port, 4), timeout_s=60, what="the worker to own the events partitions")
    edges = [EdgeDenylist(sandbox.redis_url, prefix, resync_interval_s=RESYNC_S) for _ in range(3)]
    for edge in edges:
        await edge.start()
    gateway = EventProducer(sandbox.kafka_bootstrap, topic)
    await gateway.start()

    async def burst(key: str, tenant: str) -> None:
        now_ms = wall_clock_ms()
        for _ in range(LIMIT + 5):
            gateway.emit(make_event(event_id=uuid.uuid4(), api_key_id=key, tenant=tenant, event_time_ms=now_ms, cost=1))
        await eventually(lambda: gateway.undelivered == 0, what=f"{key}'s events delivered")

    def everywhere(limit_key: str, blocked: bool) -> bool:
        return all((edge.blocked(limit_key) is not None) == blocked for edge in edges)

    primary_port = await cluster.redis_primary_port()
    assert primary_port is not None
    primary = Redis(port=primary_port, socket_timeout=2)
    replicas = [f"redis-{n + 1}" for n, p in enumerate(cluster.redis_ports) if p != primary_port]
    try:
        await burst("lifted", "t-lifted")  # blocked on its tenant, which the relaxed policies drop
        await eventually(lambda: everywhere("tenant=t-lifted", blocked=True), timeout_s=30, what="the tenant block at every edge")

        for node in replicas:
            await asyncio.to_thread(cluster.pause, node)
        policy_file.write_text(POLICIES)  # the tenant policy removed: its block is lifted...
        await burst("late", "t-late")  # ...and a new key blocked, on the primary alone

        async def only_on_the_primary() -> bool:
            lifted = not await primary.exists(f"{prefix}:block:tenant=t-lifted")
            return lifted and bool(await primary.exists(f"{prefix}:block:api_key=late"))

        await eventually(only_on_the_primary, timeout_s=30, what="the lift and the new block on the primary")
        named_before = await cluster.primary_named_by_sentinels()
        await asyncio.to_thread(cluster.kill, f"redis-{cluster.redis_ports.index(primary_port) + 1}")
        killed = time.monotonic()
        for node in replicas:
            await asyncio.to_thread(cluster.resume, node)

        async def failed_over() -> bool:
            return await cluster.primary_named_by_sentinels() not in (None, primary_port)

        # The replicas' link to the primary was down while they were frozen: the Sentinels take longer to trust one.
        await eventually(failed_over, timeout_s=60, what="the Sentinels to promote a replica")
        failover_s = time.monotonic() - killed
        new_primary = connect_redis(sandbox.redis_url, socket_timeout=1, socket_connect_timeout=1)

        async def right_in_redis() -> bool:
            try:
                lifted = not await new_primary.exists(f"{prefix}:block:tenant=t-lifted")
                return lifted and bool(await new_primary.exists(f"{prefix}:block:api_key=late"))
            except (RedisError, OSError):
                return False

        try:
            await eventually(right_in_redis, timeout_s=30, what="the lift and the block written again to the new primary")
        finally:
            await new_primary.aclose()
        settled_s = time.monotonic() - killed
        # Every edge then rereads the new primary (its resync), and holds the same.
        resyncs = counter(metrics.EDGE_RESYNCS)
        await eventually(lambda: counter(metrics.EDGE_RESYNCS) >= resyncs + len(edges), timeout_s=2 * RESYNC_S,
                         what="every edge to resync from the new primary")  # fmt: skip
        assert everywhere("tenant=t-lifted", blocked=False) and everywhere("api_key=late", blocked=True)
        print(f"Sentinels named {named_before} before the kill of {primary_port}; failover {failover_s:.1f} s after "
              f"the kill; the lost lift and block back in Redis {settled_s:.1f} s after it, and at every edge after a resync")
        assert settled_s <= failover_s + RESYNC_S
    finally:
        for node in replicas:
            await asyncio.to_thread(cluster.resume, node)
        await primary.aclose()
        await gateway.stop()
        for edge in edges:
            await edge.stop()
