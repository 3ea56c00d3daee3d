"""Redis stops answering (its process stopped with SIGSTOP, connections open) while events flow, until
the worker's attempt to write the blocks it decided meanwhile has timed out (at most 10 s):
the worker goes on consuming and deciding — its offsets move on during the stall — and those blocks
are in Redis within 2 s of Redis answering again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from tests.conftest import (EventSender, RoleProcess, Sandbox, eventually, free_port, redis_answers, role_metrics,
                            topic_ends, wait_until_worker_committed)  # fmt: skip
from tests.integration.test_policies import request, sliding_admit, stored_block, worker_counting

pytestmark = pytest.mark.faults

LIMIT, WINDOW_S, HOT_KEYS = 5, 120, 3
STALL_S = 10.0


async def test_a_stalled_redis_holds_up_no_decision_and_gets_the_blocks_within_2s(
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
    port = free_port()
    spawn("worker", "--policy-file", str(sandbox.write_policy(LIMIT, WINDOW_S)),
          extra_env={"THROTTLEX_REDIS_URL": url, "THROTTLEX_METRICS_PORT": str(port)})  # fmt: skip
    await worker_counting(sandbox, producer, redis)
    stop_load = asyncio.Event()

    async def calm_load() -> None:  # about 200 events/s, no key near its limit
        n = 0
        while not stop_load.is_set():
            await producer.send_all([request(f"calm-{(n + i) % 5_000}", wall_clock_ms()) for i in range(10)])
            n += 10
            await asyncio.sleep(0.05)

    load = asyncio.create_task(calm_load())
    try:
        os.kill(processes[-1].pid, signal.SIGSTOP)
        stalled_at = time.monotonic()
        applied_before = await _applied(port)
        hot = {f"hot-{n}": [request(f"hot-{n}", wall_clock_ms() + i) for i in range(LIMIT)] for n in range(HOT_KEYS)}
        await producer.send_all([event for events in hot.values() for event in events])
        # Decisions and commits go on while Redis says nothing: past the hot events, though the calm load
        # keeps the topic's end moving.
        sent = await topic_ends(sandbox, [sandbox.env["THROTTLEX_EVENTS_TOPIC"]])
        await wait_until_worker_committed(sandbox, timeout_s=STALL_S - 2, past=sent)
        assert await _applied(port) >= applied_before + LIMIT * HOT_KEYS
        assert time.monotonic() - stalled_at < STALL_S
        # The stall goes on until an attempt to write those blocks has timed out (each round of the
        # worker's publisher writes the blocks it holds first).
        errors_before = await _redis_errors(port)

        async def attempt_timed_out() -> bool:
            return await _redis_errors(port) > errors_before

        await eventually(attempt_timed_out, timeout_s=max(0.1, STALL_S - (time.monotonic() - stalled_at)),
                         what="an attempt to write the blocks to time out during the stall")  # fmt: skip
        stalled_s = time.monotonic() - stalled_at
        os.kill(processes[-1].pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        expected = {key: sliding_admit([e.event_time_ms for e in events], LIMIT, WINDOW_S) for key, events in hot.items()}
        await eventually(lambda: _all_blocked(redis, prefix, expected), timeout_s=2.0,
                         what="every block decided during the stall, within 2 s of Redis answering")  # fmt: skip
        written_s = time.monotonic() - resumed_at
    finally:
        os.kill(processes[-1].pid, signal.SIGCONT)
        stop_load.set()
        await load
        await redis.aclose()
    print(f"Redis stalled {stalled_s:.1f} s: the worker committed everything sent during the stall; "
          f"{HOT_KEYS} blocks in Redis {written_s:.2f} s after it answered again")


async def _applied(port: int) -> float:
    return (await role_metrics(port)).get(("throttlex_worker_events_total", ()), 0.0)


async def _redis_errors(port: int) -> float:
    return sum(value for (name, _), value in (await role_metrics(port)).items() if name == "throttlex_worker_redis_errors_total")


async def _all_blocked(redis: Redis, prefix: str, expected: dict[str, int]) -> bool:
    for key, until in expected.items():
        block = await stored_block(redis, prefix, f"api_key={key}")
        if block is None or block.until_ms != until:
            return False
    return True
