"""A worker that stalls past the session timeout (a GC pause, a VM freeze: SIGSTOP here) while another takes
its partitions over, then wakes up (SIGCONT) holding state older than what the other has written since. Its
first act is to write that state to the changelog; were that write to land after the new owner's, compaction
would keep the older state as the only record. The changelog writes are fenced (a transactional producer per
input partition), so the woken worker's writes never become visible, and a restore from the changelog gives
every key exactly the events produced for it."""

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
                            compacted_state, owns_partitions, wait_until_worker_committed, window_counts,
                            worker_state)  # fmt: skip
from tests.integration.test_policies import request

pytestmark = pytest.mark.faults

POLICIES = """
policies:
  - name: per-key
    key: [api_key]
    algorithm: {type: sliding_window, limit: 1000000, window_s: 3600, bucket_s: 1}
  - name: per-tenant
    key: [tenant]
    algorithm: {type: sliding_window, limit: 1000000, window_s: 3600, bucket_s: 1}
"""
SESSION = {"THROTTLEX_WORKER_SESSION_TIMEOUT_S": "6"}


async def test_a_worker_woken_after_its_partitions_moved_cannot_overwrite_newer_state(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(POLICIES)
    ports = [free_port(), free_port()]
    stalled, other = (spawn("worker", "--policy-file", str(policy_file),
                            extra_env={**SESSION, "THROTTLEX_METRICS_PORT": str(port)}) for port in ports)  # fmt: skip

    async def both_assigned() -> bool:
        return all([await owns_partitions(port, 1) for port in ports])

    await eventually(both_assigned, timeout_s=60, what="both workers to own partitions")

    keys: Counter[str] = Counter()
    tenants: Counter[str] = Counter()

    async def load(events: int) -> None:  # about 400 events/s over 200 keys of 4 tenants
        for start in range(0, events, 20):
            batch = [request(f"k-{(start + i) % 200}", wall_clock_ms(), tenant=f"t-{(start + i) % 4}") for i in range(20)]
            await producer.send_all(batch)
            keys.update(e.api_key_id for e in batch)
            tenants.update(e.tenant for e in batch)
            await asyncio.sleep(0.05)

    await load(1_000)
    stalled.process.send_signal(signal.SIGSTOP)  # state applied since its last flush is in its memory only
    try:
        await load(400)
        await eventually(lambda: owns_partitions(ports[1], 2 * EVENTS_PARTITIONS), timeout_s=60,
                         what="the other worker to take the stalled worker's partitions")  # fmt: skip
        await load(400)
        await wait_until_worker_committed(sandbox)  # the new owner's state is written and its offsets committed
    finally:
        assignments = stalled.log().count("partitions assigned")
        stalled.process.send_signal(signal.SIGCONT)
    # Woken, the stalled worker finds it has left the group; before it rejoins it flushes what it held (the
    # write that must not land), then it is given partitions again.
    await eventually(lambda: stalled.log().count("partitions assigned") > assignments or stalled.process.poll() is not None,
                     timeout_s=60, what="the woken worker to flush what it held and rejoin")  # fmt: skip
    stalled.stop()
    await wait_until_worker_committed(sandbox)

    policies = parse_policies(POLICIES, "test")
    now_ms = wall_clock_ms()
    expected = ({f"api_key={key}": n for key, n in keys.items()}, {f"tenant={tenant}": n for tenant, n in tenants.items()})
    # What a restore reads now, and what it will read once compaction has kept one record per key.
    for states in (await worker_state(sandbox, policies), await compacted_state(sandbox, policies)):
        assert (window_counts(states, "per-key", now_ms), window_counts(states, "per-tenant", now_ms)) == expected
    assert other.process.poll() is None
