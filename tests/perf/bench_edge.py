"""Edge check per request, side by side on the same Redis: ThrottleX's denylist cache, `limits`
(async Redis storage: fixed window, moving window, sliding-window counter) and a plain GET.

Each check is timed on its own (perf_counter_ns); checks per second are checks over their summed
time, from one process and one coroutine. Redis commands per check come from the server's
``INFO commandstats`` before and after (the INFO calls themselves left out).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from redis.asyncio import Redis

from throttlex.ingest.denylist_entries import Block, limit_key
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.processors.worker.denylist_writer import DenylistWriter

KEYS = 10_000
BLOCKED_EVERY = 10  # one key in ten is blocked
PREFIX = "bench-edge"


async def redis_commands(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def timed(check: Callable[[int], Awaitable[object] | object], checks: int, redis: Redis) -> dict[str, float]:
    durations = []
    before = await redis_commands(redis)
    for n in range(checks):
        started = time.perf_counter_ns()
        result = check(n % KEYS)
        if asyncio.iscoroutine(result):
            await result
        durations.append(time.perf_counter_ns() - started)
    after = await redis_commands(redis)
    durations.sort()
    return {
        "checks_per_s": checks / (sum(durations) / 1e9),
        "p50_us": durations[len(durations) // 2] / 1000,
        "p99_us": durations[int(len(durations) * 0.99)] / 1000,
        "redis_cmds_per_check": (after - before) / checks,
    }


async def run(redis_url: str, runs: int, checks: int) -> dict[str, dict[str, float]]:
    redis = Redis.from_url(redis_url)
    writer = DenylistWriter(redis, PREFIX)
    until = wall_clock_ms() + 3_600_000
    await writer.publish([Block(limit_key([("api_key", f"key-{n}")]), until, "bench") for n in range(0, KEYS, BLOCKED_EVERY)])
    edge = EdgeDenylist(redis_url, PREFIX)
    await edge.start()
    storage = RedisStorage(redis_url.replace("redis://", "async+redis://"), implementation="redispy", key_prefix="bench")
    item = parse("1000000000/hour")  # never reached: every check does the full work of admitting

    def throttlex(n: int) -> object:
        return edge.check({"api_key": f"key-{n}", "tenant": "t", "ip": "", "route": "/", "method": "GET"})

    def with_limits(limiter: RateLimiter) -> Callable[[int], Awaitable[bool]]:
        namespace = type(limiter).__name__  # each strategy keeps its own kind of Redis value
        return lambda n: limiter.hit(item, namespace, f"key-{n}")

    scenarios: dict[str, tuple[Callable[[int], Awaitable[object] | object], int]] = {
        "throttlex": (throttlex, checks * 10),
        "limits_fixed_window": (with_limits(FixedWindowRateLimiter(storage)), checks),
        "limits_moving_window": (with_limits(MovingWindowRateLimiter(storage)), checks),
        "limits_sliding_window_counter": (with_limits(SlidingWindowCounterRateLimiter(storage)), checks),
        "redis_get": (lambda n: redis.get(f"{PREFIX}:block:api_key=key-{n}"), checks),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in scenarios}
    try:
        for run_number in range(runs):  # interleaved, so each run sees the same machine state
            for name, (check, count) in scenarios.items():
                results[name].append(await timed(check, count, redis))
            print(f"  edge check run {run_number + 1}/{runs} done", flush=True)
    finally:
        await edge.stop()
        async for key in redis.scan_iter(match=f"{PREFIX}:*"):
            await redis.delete(key)
        async for key in redis.scan_iter(match="bench*"):
            await redis.delete(key)
        await redis.aclose()
    return {name: {k: statistics.median(r[k] for r in runs_) for k in runs_[0]} for name, runs_ in results.items()}
