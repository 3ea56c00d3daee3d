"""A stream worker killed with SIGKILL three times under steady load, each time in the middle of a
state flush (its state records written or being written, the offsets they cover not committed yet):
afterwards every key's count is exactly the number of events sent for it — keys on ``api_key`` and
regrouped tenant keys alike — a key one event short of its limit before the kills is blocked by one
more, and the sink beside the worker stores every event once. (SIGTERM: `test_graceful_stop.py`.)"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.processors.core.policy import parse_policies
from throttlex.processors.core.windows import SlidingWindow
from tests.conftest import (EventSender, RoleProcess, Sandbox, eventually, free_port, role_metrics,
                            wait_until_worker_committed, window_counts, worker_state)  # fmt: skip
from tests.integration.test_policies import request, stored_block, worker_counting

pytestmark = pytest.mark.faults

LIMIT = 50
POLICIES = f"""
policies:
  - name: per-key
    key: [api_key]
    algorithm: {{type: sliding_window, limit: {LIMIT}, window_s: 3600, bucket_s: 60}}
  - name: per-tenant
    key: [tenant]
    algorithm: {{type: sliding_window, limit: 1000000000, window_s: 3600, bucket_s: 60}}
"""
MID_FLUSH = {"THROTTLEX_WORKER_SESSION_TIMEOUT_S": "6", "THROTTLEX_STATE_FLUSH_INTERVAL_S": "1",
             "THROTTLEX_STATE_COMMIT_DELAY_S": "0.5"}  # fmt: skip
"""Flush every second and wait half a second between writing state and committing: a kill right after
a flush starts lands while the changelog holds state past the committed offsets."""


async def test_sigkill_three_times_mid_flush_counts_every_event_exactly_once(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(POLICIES)
    policies = parse_policies(POLICIES, "test")

    def start_worker() -> tuple[RoleProcess, int]:
        port = free_port()
        return spawn("worker", "--policy-file", str(policy_file), extra_env={**MID_FLUSH, "THROTTLEX_METRICS_PORT": str(port)}), port

    worker, port = start_worker()
    sink_port = free_port()
    spawn("sink", extra_env={"THROTTLEX_METRICS_PORT": str(sink_port)})
    await worker_counting(sandbox, producer, redis)
    sent: Counter[str] = Counter({"warm-up": 1})
    tenants: Counter[str] = Counter({"tenant-of-warm-up": 1})
    near = [request("near", wall_clock_ms() + i, tenant="t-near") for i in range(LIMIT - 1)]
    await producer.send_all(near)
    sent["near"] += len(near)
    tenants["t-near"] += len(near)
    stop_load = asyncio.Event()

    async def steady_load() -> None:  # about 400 events/s over 2,000 keys of 10 tenants
        n = 0
        while not stop_load.is_set():
            batch = [request(f"load-{(n + i) % 2_000}", wall_clock_ms(), tenant=f"t-{(n + i) % 10}") for i in range(20)]
            await producer.send_all(batch)
            sent.update(e.api_key_id for e in batch)
            tenants.update(e.tenant for e in batch)
            n += 20
            await asyncio.sleep(0.05)

    load = asyncio.create_task(steady_load())
    recoveries = []
    try:
        for cycle in range(3):
            await _state_flush_started(port, what=f"cycle {cycle}: a state flush to kill the worker in")
            worker.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            worker, port = start_worker()
            await _state_flush_started(port, what=f"cycle {cycle}: the restarted worker's first flush", timeout_s=60)
            recoveries.append(time.monotonic() - killed_at)
    finally:
        stop_load.set()
        await load

    last = request("near", wall_clock_ms(), tenant="t-near")
    await producer(last)
    sent["near"] += 1
    tenants["t-near"] += 1
    reference = SlidingWindow(3_600_000, 60_000)
    for event in [*near, last]:
        reference.add(event.event_time_ms, 1)
    until = reference.admits_at(LIMIT)
    await eventually(lambda: _block_until(redis, prefix, until), timeout_s=30,
                     what="the near key blocked by one more event after three kills (its count survived)")  # fmt: skip

    await wait_until_worker_committed(sandbox)
    states = await worker_state(sandbox, policies)
    now_ms = wall_clock_ms()
    assert window_counts(states, "per-key", now_ms) == {f"api_key={key}": n for key, n in sent.items()}
    assert window_counts(states, "per-tenant", now_ms) == {f"tenant={tenant}": n for tenant, n in tenants.items()}
    produced = sum(sent.values())
    await eventually(lambda: _rows_are(sink_port, produced), timeout_s=60, what="the sink to store every event")
    print(f"worker SIGKILLed 3 times mid-flush under ~400 events/s: {produced} events, each counted exactly once "
          f"in {len(sent)} key and {len(tenants)} tenant windows and stored once; kill to the restarted worker's "
          f"first flush: {', '.join(f'{s:.1f} s' for s in recoveries)}")  # fmt: skip


async def _state_flush_started(port: int, *, what: str, timeout_s: float = 20.0) -> None:
    """Wait until the worker on ``port`` starts a state flush (writes its first state record after now)."""
    name = ("throttlex_worker_state_records_total", ())
    before = (await role_metrics(port)).get(name, 0.0)
    await eventually(lambda: _grown(port, name, before), timeout_s=timeout_s, what=what)


async def _grown(port: int, name: tuple[str, tuple[()]], before: float) -> bool:
    return (await role_metrics(port)).get(name, 0.0) > before


async def _block_until(redis: Redis, prefix: str, until: int | None) -> bool:
    block = await stored_block(redis, prefix, "api_key=near")
    return block is not None and block.until_ms == until


async def _rows_are(port: int, expected: int) -> bool:
    return (await role_metrics(port)).get(("throttlex_sink_rows_total", ()), 0.0) == expected
