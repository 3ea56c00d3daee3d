"""CPU per request for the whole system, ThrottleX beside `limits`' moving window, in one run.

ThrottleX spreads a request's work over processes, so its cost is the sum of each part, measured on
its own with real Kafka and Redis:

- the gateway: an edge check (`EdgeDenylist.check`, the middleware's check) plus building the
  request's `UsageEvent` and `EventProducer.emit`, until Kafka confirmed every event — this
  process's CPU, the producer's I/O included;
- the worker: CPU per event with the sample policy file (from the pipeline benchmark of the run);
- the sink: CPU per row into chDB (from the sink benchmark of the run).

`limits`' moving window is a synchronous limiter: its cost is the client's CPU per `hit` plus the
Redis server's CPU over the same checks (``INFO cpu``, user + system).
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
import uuid

from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.events import UsageEvent
from throttlex.ingest.producer import EventProducer
from throttlex.processors.topics import ensure_topics


async def gateway_cpu_us(bootstrap: str, redis_url: str, requests: int) -> float:
    """CPU-µs per request of the gateway's part: check the denylist cache, emit the event."""
    topic = f"bench-system-{secrets.token_hex(4)}.events"
    await ensure_topics(bootstrap, {topic: 4})
    edge = EdgeDenylist(redis_url, f"bench-system-{secrets.token_hex(4)}")
    producer = EventProducer(bootstrap, topic)
    await edge.start()
    await producer.start()
    try:
        cpu = time.process_time()
        for n in range(requests):
            key = f"key-{n % 10_000}"
            if edge.check({"api_key": key, "tenant": "acme", "ip": "203.0.113.7", "route": "/v1/items", "method": "GET"}) is None:
                producer.emit(UsageEvent(event_id=uuid.uuid4(), event_time_ms=wall_clock_ms(), api_key_id=key, tenant="acme",
                                         route="/v1/items", method="GET", status=200, latency_ms=1.0, response_bytes=512,
                                         client_ip="203.0.113.7"))  # fmt: skip
            if n % 100 == 99:
                await asyncio.sleep(0)  # as a server does between requests: the producer's task runs
    finally:
        await producer.stop()  # every event confirmed by Kafka
        await edge.stop()
    return (time.process_time() - cpu) / requests * 1e6


async def limits_cpu_us(redis_url: str, checks: int) -> dict[str, float]:
    """Client and Redis CPU-µs per check of `limits`' moving window."""
    redis = Redis.from_url(redis_url)
    storage = RedisStorage(redis_url.replace("redis://", "async+redis://"), implementation="redispy", key_prefix="bench-system")
    limiter = MovingWindowRateLimiter(storage)
    item = parse("1000000000/hour")  # never reached: every check does the full work of admitting
    try:
        await limiter.hit(item, "system", "warm-up")
        server_before = await _redis_cpu_s(redis)
        cpu = time.process_time()
        for n in range(checks):
            await limiter.hit(item, "system", f"key-{n % 10_000}")
        client = (time.process_time() - cpu) / checks * 1e6
        server = (await _redis_cpu_s(redis) - server_before) / checks * 1e6
    finally:
        async for key in redis.scan_iter(match="bench-system*"):
            await redis.delete(key)
        await redis.aclose()
    return {"client_cpu_us": client, "redis_cpu_us": server, "total_cpu_us": client + server}


async def _redis_cpu_s(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def run(bootstrap: str, redis_url: str, runs: int, requests: int) -> dict[str, dict[str, float]]:
    gateway, limits = [], []
    for n in range(runs):
        gateway.append(await gateway_cpu_us(bootstrap, redis_url, requests))
        limits.append(await limits_cpu_us(redis_url, requests // 4))
        print(f"  system run {n + 1}/{runs}: gateway {gateway[-1]:.1f} CPU-µs per request, "
              f"limits moving window {limits[-1]['total_cpu_us']:.1f}", flush=True)  # fmt: skip
    return {
        "throttlex_gateway": {"cpu_us": statistics.median(gateway)},
        "limits_moving_window": {key: statistics.median(r[key] for r in limits) for key in limits[0]},
    }
