"""Detection latency and overshoot: from the event that takes a key over its limit to the block being
in an edge cache, under background traffic at a given rate.

One `throttlex worker` runs a per-key limit of 50 requests per 10 s. A second process produces
background events for 10,000 calm keys at the target rate; this one plays a gateway: every tenth of
a second it starts a new hot key (100 in all) that requests 200 times a second. Each hot request is checked against an
edge cache (`EdgeDenylist`, as the middleware does) and only an admitted request emits an event. The
latency of a hot key is the time from emitting its 50th event to its block appearing in the cache;
its overshoot is how many requests were admitted beyond the 50. A key not blocked within
``give_up_s`` counts as that long (and its admitted requests as the overshoot).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka import AIOKafkaProducer

from throttlex.ingest.denylist_entries import limit_key
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.events import encode
from throttlex.processors.topics import ensure_topics
from tests.factories import make_event
from tests.perf.bench_pipeline import worker_process

LIMIT, HOT_RATE, HOT_KEYS = 50, 200, 100
POLICY = f"""policies:
  - name: per-key-10s
    key: [api_key]
    algorithm: {{type: sliding_window, limit: {LIMIT}, window_s: 10, bucket_s: 1}}
"""


async def one_rate(bootstrap: str, redis_url: str, rate: int, give_up_s: float) -> dict[str, float]:
    tag = secrets.token_hex(4)
    topic, prefix = f"bench-{tag}.events", f"bench-{tag}"
    await ensure_topics(bootstrap, {topic: 4, f"{topic}.regrouped": 4})
    policy_file = Path(tempfile.mkdtemp()) / "policies.yaml"
    policy_file.write_text(POLICY)
    with worker_process(bootstrap, redis_url, tag, policy_file):  # started first, as before the gateways
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                                    compression_type="lz4")  # fmt: skip
        await producer.start()
        edge = EdgeDenylist(redis_url, prefix)
        await edge.start()
        stop = asyncio.Event()

        async def emit(key_id: str) -> None:
            event = make_event(event_id=uuid.uuid4(), api_key_id=key_id, event_time_ms=wall_clock_ms(), cost=1)
            await producer.send(topic, encode(event), key=key_id.encode())

        async def hot(key_id: str) -> tuple[float, int]:
            admitted, crossed_at = 0, 0.0
            deadline = time.perf_counter() + give_up_s
            while time.perf_counter() < deadline:
                if edge.check({"api_key": key_id}) is not None:
                    return (time.perf_counter() - crossed_at) * 1000, admitted - LIMIT
                admitted += 1
                await emit(key_id)
                if admitted == LIMIT:
                    crossed_at = time.perf_counter()
                await asyncio.sleep(1 / HOT_RATE)
            return give_up_s * 1000, admitted - LIMIT

        try:
            await _wait_until_counting(edge, emit)
            load = subprocess.Popen([sys.executable, "-m", "tests.perf.bench_detection", "--background", str(rate),
                                     "--topic", topic, "--seconds", str(60 + HOT_KEYS * give_up_s)],
                                    stdout=subprocess.DEVNULL)  # fmt: skip
            await asyncio.sleep(2)  # let the background rate settle
            hot_keys = []
            for n in range(HOT_KEYS):
                hot_keys.append(asyncio.create_task(hot(f"hot-{tag}-{n}")))
                await asyncio.sleep(0.1)
            outcomes = await asyncio.gather(*hot_keys)
            load.terminate()
            load.wait()
        finally:
            stop.set()
            await edge.stop()
            await producer.stop()
    latencies = sorted(latency for latency, _ in outcomes)
    overshoots = [over for _, over in outcomes]
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_ms": latencies[-1],
        "overshoot_requests_median": statistics.median(overshoots),
        "overshoot_requests_max": max(overshoots),
        "hot_keys": len(outcomes),
    }


async def _wait_until_counting(edge: EdgeDenylist, emit: Callable[[str], Awaitable[None]]) -> None:
    """Start measuring only once the worker has joined its group and blocks a warm-up key."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for _ in range(LIMIT + 1):
            await emit("warm-up")
        await asyncio.sleep(1)
        if edge.blocked(limit_key([("api_key", "warm-up")])) is not None:
            return
    raise RuntimeError("the worker did not start blocking within 90 s")


async def run(bootstrap: str, redis_url: str, rates: list[int], give_up_s: float = 10.0) -> dict[str, dict[str, float]]:
    results = {}
    for rate in rates:
        results[str(rate)] = await one_rate(bootstrap, redis_url, rate, give_up_s)
        r = results[str(rate)]
        print(f"  detection at {rate:,} events/s: p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
              f"overshoot max {r['overshoot_requests_max']:.0f}", flush=True)  # fmt: skip
    return results


async def _background(bootstrap: str, topic: str, rate: int, seconds: float) -> None:
    """Produce events of 10,000 calm keys at ``rate`` per second for ``seconds``."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                                compression_type="lz4")  # fmt: skip
    await producer.start()
    try:
        sent, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            due = int((time.perf_counter() - started) * rate)
            for _ in range(due - sent):
                key_id = f"calm-{sent % 10_000}"
                event = make_event(event_id=uuid.uuid4(), api_key_id=key_id, event_time_ms=wall_clock_ms(), cost=1)
                await producer.send(topic, encode(event), key=key_id.encode())
                sent += 1
            await asyncio.sleep(0.005)
    finally:
        await producer.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the background load of the detection benchmark")
    parser.add_argument("--background", type=int, required=True, help="events per second")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    bootstrap = os.environ.get("THROTTLEX_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    asyncio.run(_background(bootstrap, args.topic, args.background, args.seconds))
