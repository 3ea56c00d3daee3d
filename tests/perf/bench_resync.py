"""Every edge resynchronising at once, as after a Redis failover: 100 edge denylists (the gateway's own
`EdgeDenylist`) take a snapshot together from a Redis holding 100,000 keys under their prefix, 1,000 of them
blocks. Measured for this release (the block index) and the previous one (a SCAN of the keyspace), on a Redis
of the benchmark's own so its CPU is theirs alone, rounds interleaved; reported: the time until every edge
has its snapshot, Redis's CPU for the round, and the commands it served.

    python -m tests.perf.bench_resync        # or: make bench BENCH_ARGS=--only-resync
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist_entries import Block
from throttlex.processors.worker.denylist_writer import DenylistWriter
from tests.conftest import free_port
from tests.previous_release import previous_release

KEYS, BLOCKS, EDGES = 100_000, 1_000, 100
PREFIX = "bench"

EDGES_SCRIPT = """
import asyncio, json, sys, time
from redis.asyncio import Redis
from redis.exceptions import RedisError
from throttlex.ingest.denylist import EdgeDenylist

async def main(url, prefix, edges):
    redis = Redis.from_url(url)
    caches = [EdgeDenylist(url, prefix) for _ in range(edges)]
    await asyncio.gather(*(cache._snapshot() for cache in caches))  # connections made, caches warm
    cpu = lambda info: info["used_cpu_sys"] + info["used_cpu_user"]
    calls = lambda stats: sum(v["calls"] for v in stats.values())
    cpu_before, calls_before = cpu(await redis.info("cpu")), calls(await redis.info("commandstats"))
    started = time.perf_counter()
    await asyncio.gather(*(cache._snapshot() for cache in caches))
    wall_s = time.perf_counter() - started
    cpu_after, calls_after = cpu(await redis.info("cpu")), calls(await redis.info("commandstats"))
    blocks = {len(cache._cache) for cache in caches}
    for cache in caches:
        await cache.stop()
    await redis.aclose()
    print(json.dumps({"wall_s": wall_s, "redis_cpu_s": cpu_after - cpu_before,
                      "redis_commands": calls_after - calls_before - 2, "blocks_per_edge": sorted(blocks)}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def fill(url: str) -> None:
    """``KEYS`` keys under the prefix: ``BLOCKS`` blocks (written as a worker writes them) and the rest live usage
    and key views, as a busy deployment's Redis holds them."""
    redis = Redis.from_url(url)
    try:
        until = wall_clock_ms() + 3_600_000
        await DenylistWriter(redis, PREFIX).publish([Block(f"api_key=hot-{n}", until, "per-key") for n in range(BLOCKS)])
        others = KEYS - BLOCKS
        for start in range(0, others, 10_000):
            async with redis.pipeline(transaction=False) as pipe:
                for n in range(start, min(others, start + 10_000)):
                    name = f"{PREFIX}:usage:api_key=k{n}" if n % 3 else f"{PREFIX}:apikey:k{n}"
                    pipe.set(name, b"x" * 64, ex=3_600)
                await pipe.execute()
        assert await redis.dbsize() >= KEYS
    finally:
        await redis.aclose()


def round_of(url: str, pythonpath: str | None) -> dict[str, Any]:
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    done = subprocess.run([sys.executable, "-c", EDGES_SCRIPT, url, PREFIX, str(EDGES)], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(runs: int, previous: Path) -> dict[str, dict[str, Any]]:
    """Medians over ``runs`` rounds of each release, interleaved."""
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        asyncio.run(_wait_and_fill(url))
        rounds: dict[str, list[dict[str, Any]]] = {"previous_release": [], "this_release": []}
        for _ in range(runs):
            rounds["previous_release"].append(round_of(url, str(previous)))
            rounds["this_release"].append(round_of(url, None))
    finally:
        server.kill()
        server.wait()
    results = {}
    for name, measured in rounds.items():
        assert all(r["blocks_per_edge"] == [BLOCKS] for r in measured), measured  # every edge had every block
        results[name] = {
            "resync_all_edges_ms": round(statistics.median(r["wall_s"] for r in measured) * 1000, 1),
            "redis_cpu_ms": round(statistics.median(r["redis_cpu_s"] for r in measured) * 1000, 1),
            "redis_cpu_us_per_edge": round(statistics.median(r["redis_cpu_s"] for r in measured) * 1e6 / EDGES, 1),
            "redis_commands_per_edge": round(statistics.median(r["redis_commands"] for r in measured) / EDGES, 1),
        }
    return {"keys": KEYS, "blocks": BLOCKS, "edges": EDGES, "runs": runs, **results}  # type: ignore[dict-item]


async def _wait_and_fill(url: str) -> None:
    redis = Redis.from_url(url)
    try:
        for _ in range(100):
            try:
                await redis.ping()
                break
            except (RedisError, OSError):
                await asyncio.sleep(0.05)  # the server starting
    finally:
        await redis.aclose()
    await fill(url)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(5, previous_release(Path(tmp))), indent=2))
