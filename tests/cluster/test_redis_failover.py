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

from throttlex.ingest import denylist_entries
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.producer import EventProducer
from throttlex.ingest.redis_connection import connect_redis
from tests.cluster.conftest import LocalCluster, on_cluster
from tests.conftest import RoleProcess, Sandbox, eventually, free_port, owns_partitions
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
