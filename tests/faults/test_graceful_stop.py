"""Every role stopped gracefully with SIGTERM mid-stream: window state, offsets and the sink's batch
are saved, chDB is closed, and after a restart nothing is lost or counted twice.

(A worker killed with SIGKILL resuming with the same counts is `tests/integration/test_policies.py`.)"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from tests.conftest import EventSender, RoleProcess, Sandbox, eventually, free_port, stored_events, topic_ends, worker_committed
from tests.integration.test_sink import end_offsets, wait_until_all_committed
from tests.integration.test_policies import _has_block_until, _wait_until_worker_committed, request, sliding_admit, worker_counting

pytestmark = pytest.mark.faults

LIMIT, WINDOW_S = 10, 600
FAST_REJOIN = {"THROTTLEX_WORKER_SESSION_TIMEOUT_S": "6"}


async def test_sigterm_stops_every_role_cleanly_and_loses_nothing(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    """`throttlex run` (worker, sink, API) stopped with SIGTERM mid-stream, then started again."""
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy = str(sandbox.write_policy(LIMIT, WINDOW_S))
    run = spawn("run", "--policy-file", policy, "--api-port", str(free_port()), extra_env=FAST_REJOIN)
    await worker_counting(sandbox, producer, redis)
    now = wall_clock_ms()
    near = [request("near", now + i) for i in range(LIMIT - 1)]
    load = [request(f"load-{n % 700}", now + n) for n in range(5_000)]
    ends = await topic_ends(sandbox, [sandbox.env["THROTTLEX_EVENTS_TOPIC"]])
    await producer.send_all(near + load)
    produced = 1 + len(near) + len(load)

    async def applying() -> bool:  # the stop comes once the run has committed some of these events
        committed = await worker_committed(sandbox)
        return any(committed.get(tp, 0) > end for tp, end in ends.items())

    await eventually(applying, timeout_s=30, what="the run to commit some of the events")
    stopped_at = time.monotonic()
    assert run.stop(signal.SIGTERM, timeout_s=30) == 0
    stop_s = time.monotonic() - stopped_at
    assert "Traceback" not in run.log()

    again = spawn("run", "--policy-file", policy, "--api-port", str(free_port()), extra_env=FAST_REJOIN)
    last = wall_clock_ms()  # dated when it is sent: a time ahead of the worker's clock would be dead-lettered
    await producer(request("near", last))
    produced += 1
    until = sliding_admit([e.event_time_ms for e in near] + [last], LIMIT, WINDOW_S)
    await eventually(lambda: _has_block_until(redis, prefix, "near", until), timeout_s=60, what="the near key's count to survive the stop")
    await _wait_until_worker_committed(sandbox)
    await wait_until_all_committed(sandbox, await end_offsets(sandbox), timeout_s=60)  # the sink's group too
    assert again.stop(signal.SIGTERM, timeout_s=30) == 0
    rows, unique = await stored_events(sandbox)  # opens only if the run closed chDB
    assert (rows, unique) == (produced, produced)
    print(f"SIGTERM: `throttlex run` stopped in {stop_s:.1f} s with exit status 0; {produced} events produced, "
          f"{rows} stored once each across the stop and restart")
