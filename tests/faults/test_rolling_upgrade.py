"""A rolling upgrade: a worker of the previous release counts events and stops; a worker of this one takes its
partitions over and restores the state the previous one wrote (its changelog records, written before the
changelog went into transactions, and its committed offsets). One more event then blocks a key and a tenant
exactly at their limits: nothing was counted twice or lost across versions. A block the previous release wrote
(without an entry in the block index) is indexed by this release's worker at its start, so an edge of this release
enforces it. The previous release is taken from the repository's history (`git archive`), so it runs its own code."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.processors.core.policy import parse_policies
from tests.conftest import (EventSender, RoleProcess, Sandbox, eventually, start_role, stop_role, wait_until_worker_committed,
                            window_counts, worker_state)  # fmt: skip
from tests.integration.test_policies import request, stored_block
from tests.previous_release import PreviousReleaseMissing, previous_release

pytestmark = pytest.mark.faults

SHOWING_CODE = """
import throttlex.processors.worker.worker as worker
print("worker code:", worker.__file__, flush=True)
from throttlex.api.cli import main
main()
"""
POLICIES = """
policies:
  - name: per-key
    key: [api_key]
    algorithm: {type: sliding_window, limit: 10, window_s: 3600, bucket_s: 1}
  - name: per-tenant
    key: [tenant]
    algorithm: {type: sliding_window, limit: 30, window_s: 3600, bucket_s: 1}
"""


async def test_state_written_by_the_previous_release_restores_in_this_one(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender, redis: Redis
) -> None:
    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    policy_file = sandbox.root / "policies.yaml"
    policy_file.write_text(POLICIES)
    try:
        previous = previous_release(sandbox.root / "previous")
    except PreviousReleaseMissing as exc:
        pytest.fail(str(exc))
    old = start_role(sandbox, ["worker", "--policy-file", str(policy_file)], {"PYTHONPATH": str(previous)}, launch=SHOWING_CODE)
    near = [request("k-near", wall_clock_ms(), tenant="t-shared") for _ in range(9)]
    others = [request(f"k-{n}", wall_clock_ms(), tenant="t-shared") for n in range(20)]
    over = [request("k-over", wall_clock_ms(), tenant="t-other") for _ in range(10)]  # blocked by the previous release
    await producer.send_all(near + others + over)
    await wait_until_worker_committed(sandbox)
    stop_role(old)
    assert f"worker code: {previous}/throttlex/processors/worker/worker.py" in old.log()  # the archive's, not this tree's
    assert await stored_block(redis, prefix, "api_key=k-near") is None  # 9 of 10
    assert await stored_block(redis, prefix, "tenant=t-shared") is None  # 29 of 30
    assert await stored_block(redis, prefix, "api_key=k-over") is not None
    assert await redis.zscore(f"{prefix}:block-index", "api_key=k-over") is None  # the previous release has no index

    spawn("worker", "--policy-file", str(policy_file))
    await producer(request("k-near", wall_clock_ms(), tenant="t-shared"))
    for key in ("api_key=k-near", "tenant=t-shared"):
        await eventually(lambda: stored_block(redis, prefix, key), timeout_s=60, what=f"{key} blocked by one more event")
    await wait_until_worker_committed(sandbox)
    edge = EdgeDenylist(sandbox.redis_url, prefix)  # a gateway of this release, started after the new worker
    await edge.start()
    try:
        await eventually(lambda: edge.blocked("api_key=k-over") is not None, timeout_s=15,
                         what="the previous release's block at an edge of this one")  # fmt: skip
    finally:
        await edge.stop()
    states = await worker_state(sandbox, parse_policies(POLICIES, "test"))
    assert window_counts(states, "per-key", wall_clock_ms())["api_key=k-near"] == 10
    assert window_counts(states, "per-tenant", wall_clock_ms()) == {"tenant=t-shared": 30, "tenant=t-other": 10}
