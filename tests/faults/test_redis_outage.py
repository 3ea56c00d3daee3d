"""Redis stops for 10 s under load, then comes back empty (no persistence): gateways follow their fail
mode and no request waits on Redis; the worker keeps deciding, and once Redis answers the denylist and
every edge cache hold every block in force again within 2 s."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Callable

import httpx
import pytest
from redis.asyncio import Redis

from throttlex.api.demo_gateway import create_gateway_app
from throttlex.api.server import HttpServer
from throttlex.ingest import denylist_entries
from throttlex.ingest.denylist_entries import limit_key
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.settings import GatewaySettings
from tests.conftest import EventSender, RoleProcess, Sandbox, eventually, free_port, redis_answers, register_keys
from tests.factories import make_event
from tests.integration.test_policies import sliding_admit

pytestmark = pytest.mark.faults

LIMIT, WINDOW_S = 20, 120
OUTAGE_S = 10.0
REQUEST_TIMEOUT_S = 1.0
"""The longest a gateway request may wait on Redis: the key cache's connect and socket timeout."""


async def test_redis_outage_fail_modes_no_waiting_and_resync_within_2s(
    sandbox: Sandbox,
    spawn: Callable[..., RoleProcess],
    producer: EventSender,
    private_redis: tuple[str, list[subprocess.Popen[bytes]]],
) -> None:
    url, processes = private_redis
    sandbox = Sandbox(kafka_bootstrap=sandbox.kafka_bootstrap, redis_url=url, root=sandbox.root, tag=sandbox.tag)
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    redis = Redis.from_url(url)
    await eventually(lambda: redis_answers(redis), timeout_s=10, what="the private Redis")
    worker = spawn("worker", "--policy-file", str(sandbox.write_policy(LIMIT, WINDOW_S)), extra_env={"THROTTLEX_REDIS_URL": url})
    ids = await register_keys(sandbox, {"gateway-key": "acme"})
    settings = GatewaySettings(
        kafka_bootstrap=sandbox.kafka_bootstrap, redis_url=url, events_topic=sandbox.env["THROTTLEX_EVENTS_TOPIC"],
        redis_prefix=prefix, registry_topic=sandbox.env["THROTTLEX_REGISTRY_TOPIC"],
        key_salt=sandbox.settings(GatewaySettings).key_salt, edge_fail_mode="closed", edge_fail_after_s=1.0,
    )  # fmt: skip
    gateway = HttpServer(create_gateway_app(settings), "127.0.0.1", free_port())
    edges = {mode: EdgeDenylist(url, prefix, fail_mode=mode, fail_after_s=1.0, reconnect_delay_s=0.2) for mode in ("open", "closed")}
    for edge in edges.values():
        await edge.start()
    await gateway.start()
    stop_load = asyncio.Event()
    sent = 0

    async def steady_load() -> None:  # 200 events/s over 50 calm keys for the whole test
        nonlocal sent
        while not stop_load.is_set():
            now = wall_clock_ms()
            await producer.send_all([make_event(event_id=uuid.uuid4(), api_key_id=f"{n:024x}", event_time_ms=now) for n in range(20)])
            sent += 20
            await asyncio.sleep(0.1)

    load = asyncio.create_task(steady_load())
    http = httpx.AsyncClient(base_url=gateway.url, timeout=10)
    try:
        hot_a, hot_b = "a" * 24, "c" * 24
        start_ms = wall_clock_ms() - 1_000  # within the tolerance of Kafka's time: each keeps its own
        a_times = [start_ms + 10 * n for n in range(LIMIT + 3)]
        await producer.send_all([make_event(event_id=uuid.uuid4(), api_key_id=hot_a, event_time_ms=t, cost=1) for t in a_times])
        a_key = limit_key([("api_key", hot_a)])
        await eventually(lambda: all(e.blocked(a_key) for e in edges.values()), timeout_s=30, what="key A blocked at both edges")
        assert (await http.get("/v1/items/1", headers={"x-api-key": "gateway-key"})).status_code == 200

        processes[-1].kill()  # Redis goes away
        processes[-1].wait()
        down_at = time.monotonic()
        b_times = [wall_clock_ms() - 1_000 + 10 * n for n in range(LIMIT + 3)]
        await producer.send_all([make_event(event_id=uuid.uuid4(), api_key_id=hot_b, event_time_ms=t, cost=1) for t in b_times])
        waits, statuses = [], []
        while time.monotonic() - down_at < OUTAGE_S:
            began = time.monotonic()
            response = await http.get("/v1/items/1", headers={"x-api-key": "gateway-key"})
            waits.append(time.monotonic() - began)
            statuses.append(response.status_code)
            assert edges["open"].blocked(a_key) is not None  # fail-open: cached blocks still hold
            if time.monotonic() - down_at > 1.5:
                assert edges["closed"].refusing and not edges["open"].refusing
            await asyncio.sleep(0.05)
        assert worker.process.poll() is None, "the worker died during the Redis outage"
        assert max(waits) < REQUEST_TIMEOUT_S, f"a request waited {max(waits):.2f} s on Redis"
        assert statuses[-1] == 503 and 200 in statuses  # fail-closed after 1 s; admitted before

        processes.append(subprocess.Popen(processes[0].args, stdout=subprocess.DEVNULL))
        await eventually(lambda: redis_answers(redis), timeout_s=10, what="Redis to restart")
        back_at = time.monotonic()
        b_key = limit_key([("api_key", hot_b)])

        async def all_blocked_again() -> bool:
            stored = await redis.get(denylist_entries.block_key(prefix, a_key)), await redis.get(denylist_entries.block_key(prefix, b_key))
            return all(stored) and all(e.blocked(a_key) and e.blocked(b_key) and not e.refusing for e in edges.values())

        await eventually(all_blocked_again, timeout_s=2, what="the denylist and both edges to hold A and B again")
        resync_s = time.monotonic() - back_at
        for key, times in ((a_key, a_times), (b_key, b_times)):
            raw = await redis.get(denylist_entries.block_key(prefix, key))
            assert raw is not None and denylist_entries.decode_block(raw).until_ms == sliding_admit(times, LIMIT, WINDOW_S)
        # 200, or 429 if the gateway's own key went over its limit in the outage's first second
        await eventually(lambda: _decides(http, "gateway-key"), timeout_s=2, what="the gateway deciding again, not 503")
        print(
            f"outage {OUTAGE_S:.0f} s: {len(waits)} gateway requests, longest wait {max(waits) * 1000:.1f} ms, "
            f"{statuses.count(503)} answered 503 (fail-closed); blocks back in Redis and both edges {resync_s:.2f} s "
            f"after Redis answered; {sent} background events sent; key id {ids['gateway-key'][:6]}…"
        )
    finally:
        stop_load.set()
        await load
        await http.aclose()
        await gateway.stop()
        for edge in edges.values():
            await edge.stop()
        await redis.aclose()


async def _decides(http: httpx.AsyncClient, key: str) -> bool:
    return (await http.get("/v1/items/1", headers={"x-api-key": key})).status_code in (200, 429)
