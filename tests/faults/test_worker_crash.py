"""A policy worker killed with SIGKILL three times under steady load: window state survives (a key near
its limit is not reset, a blocked key's window goes on), the stream is processed to its end, and the
sink beside it stores every event once. (SIGTERM: `test_graceful_stop.py`.)"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from ingest.clock import wall_clock_ms
from tests.conftest import EventSender, RoleProcess, Sandbox, eventually, free_port, role_metrics
from tests.integration.test_policies import _has_block_until, _wait_until_worker_committed, request, sliding_admit, worker_counting

pytestmark = pytest.mark.faults

LIMIT, WINDOW_S = 10, 600
FAST_REJOIN = {"THROTTLEX_WORKER_SESSION_TIMEOUT_S": "6"}


async def test_sigkill_three_times_under_load_loses_no_state_and_no_event(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy = str(sandbox.write_policy(LIMIT, WINDOW_S))
    worker = spawn("worker", "--policy-file", policy, extra_env=FAST_REJOIN)
    sink_port = free_port()
    spawn("sink", extra_env={"THROTTLEX_METRICS_PORT": str(sink_port)})
    await worker_counting(sandbox, producer, redis)
    produced = 1  # the warm-up event
    stop_load = asyncio.Event()

    async def steady_load() -> None:  # about 400 events/s over 5,000 keys (none near its limit)
        nonlocal produced
        n = 0
        while not stop_load.is_set():
            now = wall_clock_ms()
            await producer.send_all([request(f"load-{(n + i) % 5_000}", now) for i in range(20)])
            n += 20
            produced += 20
            await asyncio.sleep(0.05)

    load = asyncio.create_task(steady_load())
    recoveries = []
    try:
        for cycle in range(3):
            now = wall_clock_ms()
            near = [request(f"near-{cycle}", now + i) for i in range(LIMIT - 1)]
            # two events in one second, nine in the next: over the limit until the first second leaves
            blocked = [request(f"blocked-{cycle}", now + (0 if i < 2 else 1_000) + i) for i in range(LIMIT + 1)]
            await producer.send_all(near + blocked)
            produced += len(near) + len(blocked)
            blocked_times = [e.event_time_ms for e in blocked]
            first_until = sliding_admit(blocked_times, LIMIT, WINDOW_S)
            await eventually(lambda: _has_block_until(redis, prefix, f"blocked-{cycle}", first_until), timeout_s=60,
                             what=f"cycle {cycle}: the first block")  # fmt: skip
            await asyncio.sleep(0.3)  # events in flight, state maybe not flushed, offsets not committed: kill now

            worker.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            worker = spawn("worker", "--policy-file", policy, extra_env=FAST_REJOIN)
            late = now + 5_000  # with it, the blocked key stays over until the second second leaves too
            extra = [request(f"near-{cycle}", late), request(f"blocked-{cycle}", late)]
            await producer.send_all(extra)
            produced += len(extra)
            near_until = sliding_admit([e.event_time_ms for e in near] + [late], LIMIT, WINDOW_S)
            blocked_until = sliding_admit(blocked_times + [late], LIMIT, WINDOW_S)
            assert blocked_until == first_until + 1_000
            await eventually(lambda: _has_block_until(redis, prefix, f"near-{cycle}", near_until), timeout_s=60,
                             what=f"cycle {cycle}: the near key blocked by one more event (its count survived)")  # fmt: skip
            await eventually(lambda: _has_block_until(redis, prefix, f"blocked-{cycle}", blocked_until), timeout_s=30,
                             what=f"cycle {cycle}: the blocked key's window going on")  # fmt: skip
            recoveries.append(time.monotonic() - killed_at)
    finally:
        stop_load.set()
        await load

    await _wait_until_worker_committed(sandbox)  # the whole stream, to its end
    await eventually(lambda: _rows_are(sink_port, produced), timeout_s=60, what="the sink to store every event")
    print(
        f"worker SIGKILLed 3 times under ~400 events/s: {produced} events produced, all processed and "
        f"{produced} stored; kill to both decisions after restart: {', '.join(f'{s:.1f} s' for s in recoveries)}"
    )


async def _rows_are(port: int, expected: int) -> bool:
    return (await role_metrics(port)).get(("throttlex_sink_rows_total", ())) == expected
