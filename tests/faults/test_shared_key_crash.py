"""Two worker processes share the partitions; one is SIGKILLed under steady load and its partitions move to
the other after the session timeout, with a backlog older than any policy's allowed lateness. The shared
`[tenant]` keys, which the surviving worker went on counting meanwhile, count the moved backlog like any
other events: after the killed worker is restarted and the partitions are shared again, every tenant's
count equals the events produced for it, exactly."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.processors.core.policy import parse_policies
from tests.conftest import (EVENTS_PARTITIONS, EventSender, RoleProcess, Sandbox, eventually, free_port,
                            owns_partitions, wait_until_worker_committed, window_counts, worker_state)  # fmt: skip
from tests.integration.test_policies import request

pytestmark = pytest.mark.faults

POLICIES = """
policies:
  - name: per-tenant
    key: [tenant]
    algorithm: {type: sliding_window, limit: 1150, window_s: 3600, bucket_s: 1}
"""
SESSION = {"THROTTLEX_WORKER_SESSION_TIMEOUT_S": "6"}


async def test_a_killed_workers_moved_backlog_counts_exactly_for_shared_keys(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(POLICIES)

    def start_worker() -> tuple[RoleProcess, int]:
        port = free_port()
        return spawn("worker", "--policy-file", str(policy_file), extra_env={**SESSION, "THROTTLEX_METRICS_PORT": str(port)}), port

    (first, first_port), (_, second_port) = start_worker(), start_worker()

    async def both_assigned() -> bool:
        return await owns_partitions(first_port, 1) and await owns_partitions(second_port, 1)

    await eventually(both_assigned, timeout_s=60, what="both workers to own partitions")

    tenants: Counter[str] = Counter()
    stop_load = asyncio.Event()

    async def steady_load() -> None:  # about 400 events/s over 600 keys of 6 tenants
        n = 0
        while not stop_load.is_set():
            batch = [request(f"k-{(n + i) % 600}", wall_clock_ms(), tenant=f"t-{(n + i) % 6}") for i in range(20)]
            await producer.send_all(batch)
            tenants.update(e.tenant for e in batch)
            n += 20
            await asyncio.sleep(0.05)

    load = asyncio.create_task(steady_load())
    try:
        await eventually(lambda: sum(tenants.values()) >= 1_000, what="load before the kill")
        first.stop(signal.SIGKILL)
        # The survivor takes every partition after the session timeout, the dead one's backlog with them.
        await eventually(lambda: owns_partitions(second_port, 2 * EVENTS_PARTITIONS), timeout_s=60,
                         what="the surviving worker to take the killed worker's partitions")  # fmt: skip
        produced_before = sum(tenants.values())
        await eventually(lambda: sum(tenants.values()) >= produced_before + 800, what="load after the takeover")
        _, restarted_port = start_worker()
        await eventually(lambda: owns_partitions(restarted_port, 1), timeout_s=60, what="the restarted worker to own partitions")
        produced_before = sum(tenants.values())
        await eventually(lambda: sum(tenants.values()) >= produced_before + 800, what="load after the restart")
    finally:
        stop_load.set()
        await load

    await wait_until_worker_committed(sandbox)
    states = await worker_state(sandbox, parse_policies(POLICIES, "test"))
    counted = window_counts(states, "per-tenant", wall_clock_ms())
    assert counted == {f"tenant={tenant}": n for tenant, n in tenants.items()}
    print(f"{sum(tenants.values())} events over {len(tenants)} tenants, one of two workers SIGKILLed and restarted: "
          "every tenant counted exactly")  # fmt: skip
