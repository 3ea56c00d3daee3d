"""The leader of an events partition is SIGKILLed five times while gateways produce 50,000 events with
``acks=all`` into topics of three replicas: every acknowledged event is stored once (ClickHouse's row
count, its distinct event ids and the events acknowledged to the gateways are one number, the same ids),
and the hot keys stay blocked from their first block to the end of the traffic."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from throttlex.ingest import denylist_entries
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.producer import EventProducer
from tests.cluster.conftest import LocalCluster, histogram_quantile, on_cluster
from tests.conftest import (RoleProcess, Sandbox, eventually, free_port, owns_partitions, role_metrics,
                            stored_events_where, wait_until_sink_committed)  # fmt: skip
from tests.factories import make_event

pytestmark = pytest.mark.cluster

EVENTS = 50_000
RATE_PER_S = 1_000
BATCH = 50  # events a gateway hands over per tick (RATE_PER_S / BATCH ticks a second)
HOT_KEYS = [f"hot-{i}" for i in range(4)]
HOT_SHARE = 0.2  # of all events, spread over the hot keys: 50 a second each
COLD_KEYS = 5_000  # the rest, 8 each over the run: never near the limit
LIMIT, WINDOW_S = 100, 10
KILLS = 5
POLICIES = f"""
policies:
  - name: per-key
    key: [api_key]
    algorithm: {{type: sliding_window, limit: {LIMIT}, window_s: {WINDOW_S}, bucket_s: 1}}
"""


def key_for(n: int) -> str:
    if (n * 7919) % 100 < HOT_SHARE * 100:
        return HOT_KEYS[n % len(HOT_KEYS)]
    return f"cold-{n % COLD_KEYS}"


async def test_killed_partition_leaders_lose_and_double_nothing_and_hot_keys_stay_blocked(
    sandbox: Sandbox, cluster: LocalCluster, spawn_on: Callable[..., RoleProcess], redis: Redis
) -> None:
    sandbox = on_cluster(sandbox, cluster)
    topic, prefix = sandbox.env["THROTTLEX_EVENTS_TOPIC"], sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(POLICIES)
    worker_port = free_port()
    worker = spawn_on(sandbox, "worker", "--policy-file", str(policy_file), extra_env={"THROTTLEX_METRICS_PORT": str(worker_port)})
    sink = spawn_on(sandbox, "sink")
    await eventually(lambda: owns_partitions(worker_port, 4), timeout_s=60, what="the worker to own the events partitions")

    gateway = EventProducer(sandbox.kafka_bootstrap, topic)
    await gateway.start()
    acknowledged: set[uuid.UUID] = set()
    refused: list[BaseException] = []
    traffic_done = asyncio.Event()

    async def deliver(events: list) -> None:  # type: ignore[type-arg]
        for event, error in zip(events, await gateway.send_confirmed(events), strict=True):
            if error is None:
                acknowledged.add(event.event_id)
            else:
                refused.append(error)

    async def traffic() -> None:
        deliveries = []
        started = time.monotonic()
        for n in range(0, EVENTS, BATCH):
            now_ms = wall_clock_ms()
            events = [make_event(event_id=uuid.uuid4(), api_key_id=key_for(i), event_time_ms=now_ms, cost=1)
                      for i in range(n, n + BATCH)]  # fmt: skip
            deliveries.append(asyncio.create_task(deliver(events)))
            await asyncio.sleep(max(0.0, started + (n + BATCH) / RATE_PER_S - time.monotonic()))
        await asyncio.gather(*deliveries)
        traffic_done.set()

    unblocked: list[tuple[float, str]] = []  # hot keys seen unblocked after the first block of all of them

    async def watch_blocks() -> None:
        names = [denylist_entries.block_key(prefix, f"api_key={key}") for key in HOT_KEYS]
        first_all: float | None = None
        while not traffic_done.is_set():
            values = await redis.mget(names)
            if first_all is None and all(values):
                first_all = time.monotonic()
            elif first_all is not None:
                unblocked.extend((time.monotonic(), key) for key, value in zip(HOT_KEYS, values, strict=True) if not value)
            await asyncio.sleep(0.2)
        assert first_all is not None, "the hot keys were never all blocked"

    kills: list[str] = []

    async def kill_leaders() -> None:
        for k in range(KILLS):  # spread over the traffic: after each sixth of it
            await eventually(lambda: len(acknowledged) >= (k + 1) * EVENTS // (KILLS + 1), timeout_s=60,
                             what=f"{(k + 1) * EVENTS // (KILLS + 1)} events acknowledged")  # fmt: skip
            partition = k % 4
            leaders: dict[int, int] = {}

            async def led() -> bool:
                leaders.update(await cluster.leaders(topic))
                return leaders.get(partition, -1) >= 0

            await eventually(led, what=f"partition {partition}'s leader")
            leader = leaders[partition]
            await asyncio.to_thread(cluster.kill, f"broker-{leader}")  # the traffic goes on meanwhile
            kills.append(f"broker-{leader} (leader of partition {partition})")

            async def moved() -> bool:
                return (await cluster.leaders(topic)).get(partition, -1) not in (-1, leader)

            await eventually(moved, timeout_s=30, what=f"a new leader for partition {partition}")
            await asyncio.to_thread(cluster.start, f"broker-{leader}")
            await eventually(lambda: cluster.in_sync([topic]), timeout_s=60, what=f"broker-{leader} back in sync")

    started = time.monotonic()
    await asyncio.gather(traffic(), watch_blocks(), kill_leaders())
    took_s = time.monotonic() - started
    await gateway.stop()

    samples = await role_metrics(worker_port)
    p99 = histogram_quantile(samples, "throttlex_worker_processing_seconds", 0.99)
    print(f"{EVENTS} events in {took_s:.1f} s with {len(kills)} leaders killed ({', '.join(kills)}); "
          f"{len(acknowledged)} acknowledged, {len(refused)} refused; detection p99 <= {p99} s")  # fmt: skip
    assert len(kills) == KILLS
    assert worker.process.poll() is None, f"the worker exited:\n{worker.log()[-3000:]}"
    assert sink.process.poll() is None, f"the sink exited:\n{sink.log()[-3000:]}"
    assert not refused, f"{len(refused)} events refused, e.g. {refused[0]!r}"
    assert unblocked == [], f"hot keys unblocked during the run: {unblocked[:10]}"

    # Every acknowledged event stored, once.
    await wait_until_sink_committed(sandbox, timeout_s=120)
    sink.stop()
    [(rows, unique)] = await stored_events_where(sandbox, "SELECT count(), uniqExact(event_id) FROM usage_events")
    stored = {row[0] for row in await stored_events_where(sandbox, "SELECT event_id FROM usage_events")}
    assert (rows, unique) == (len(acknowledged), len(acknowledged)) == (EVENTS, EVENTS)
    assert stored == acknowledged
