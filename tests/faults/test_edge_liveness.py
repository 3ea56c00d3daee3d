"""An edge cache whose Redis stops answering while its connection stays open (the process stopped with
SIGSTOP for 10 s: nothing is closed, nothing arrives), as a stopped Redis or a dropped NAT entry does."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.denylist_entries import Block
from throttlex.processors.worker.denylist_writer import DenylistWriter
from tests.conftest import eventually, redis_answers

STALL_S = 10.0
SILENCE_S = 1.0
NOTICE_BOUND_S = 2 * SILENCE_S + 1.0  # silent for SILENCE_S, then a ping unanswered as long (about 2 s in all)


async def test_an_edge_notices_a_redis_that_stops_answering_and_catches_up_when_it_answers(
    private_redis: tuple[str, list[subprocess.Popen[bytes]]],
) -> None:
    url, processes = private_redis
    writer_client = Redis.from_url(url, socket_timeout=3 * STALL_S)  # its write waits out the stall
    await eventually(lambda: redis_answers(writer_client), timeout_s=10, what="the private Redis to answer")
    prefix = "liveness"
    edge = EdgeDenylist(url, prefix, silence_s=SILENCE_S)
    await edge.start()
    assert edge.synced
    request = {"api_key": "k1", "tenant": "acme", "ip": "10.0.0.1", "route": "/v1/items", "method": "GET"}
    block = Block("api_key=k1", wall_clock_ms() + 120_000, "per-key", dims=("api_key",))
    try:
        os.kill(processes[-1].pid, signal.SIGSTOP)
        stalled_at = time.monotonic()
        await eventually(lambda: not edge.synced, timeout_s=NOTICE_BOUND_S, what="the edge to notice the silent Redis")
        noticed_s = time.monotonic() - stalled_at
        # A worker's block decided during the stall: its write waits for Redis.
        writing = asyncio.create_task(DenylistWriter(writer_client, prefix).publish([block]))
        slowest_check_s = 0.0
        while time.monotonic() - stalled_at < STALL_S:  # requests go on being checked (a local lookup: nothing to wait on)
            started = time.perf_counter()
            assert edge.check(request) is None
            slowest_check_s = max(slowest_check_s, time.perf_counter() - started)
            await asyncio.sleep(0.01)
        os.kill(processes[-1].pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        assert await writing == 1
        await eventually(lambda: edge.check(request) is not None, timeout_s=2.0,
                         what="the block written during the stall, within 2 s of Redis answering")  # fmt: skip
        caught_up_s = time.monotonic() - resumed_at
        await eventually(lambda: edge.synced, timeout_s=2.0, what="the edge to be synchronised again")
    finally:
        os.kill(processes[-1].pid, signal.SIGCONT)
        await edge.stop()
        await writer_client.aclose()
    print(f"silent Redis noticed after {noticed_s:.2f} s; a check took at most {slowest_check_s * 1e6:.0f} µs meanwhile; "
          f"the block written during the stall reached the edge {caught_up_s:.2f} s after Redis answered")  # fmt: skip
