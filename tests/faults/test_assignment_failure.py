"""Taking over assigned partitions can fail (a changelog that cannot be read, a broker away): aiokafka logs
and swallows what a rebalance callback raises, and a worker would then keep its partitions and apply nothing.
Here the changelog restore is made to fail, inside a real `throttlex worker` process: once, and the retry
takes the partitions over and every key on them is enforced; every time, and the worker exits non-zero with
a one-line reason, so that its orchestrator restarts it."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist_entries import block_key
from tests.conftest import (EVENTS_PARTITIONS, EventSender, RoleProcess, Sandbox, eventually, free_port, role_metrics,
                            start_role, stop_role)  # fmt: skip
from tests.integration.test_policies import request

pytestmark = pytest.mark.faults

FAILING_RESTORE = """
import os
from throttlex.processors.worker import changelog

failures = os.environ["THROTTLEX_TEST_RESTORE_FAILURES"]
left = [10**9 if failures == "always" else int(failures)]
restore = changelog.restore

async def failing_restore(*args, **kwargs):
    if left[0] > 0:
        left[0] -= 1
        raise OSError("the changelog cannot be read (injected)")
    return await restore(*args, **kwargs)

changelog.restore = failing_restore
from throttlex.api.cli import main
main()
"""
LIMIT = 3


@pytest.fixture
def failing_worker(sandbox: Sandbox) -> Iterator[list[RoleProcess]]:
    started: list[RoleProcess] = []
    yield started
    for role in started:
        stop_role(role)


async def test_a_restore_that_fails_once_is_retried_and_every_key_is_enforced(
    sandbox: Sandbox, producer: EventSender, redis: Redis, failing_worker: list[RoleProcess]
) -> None:
    port = free_port()
    policy_file = sandbox.write_policy(limit=LIMIT, window_s=3600)
    env = {"THROTTLEX_TEST_RESTORE_FAILURES": "1", "THROTTLEX_METRICS_PORT": str(port)}
    failing_worker.append(start_role(sandbox, ["worker", "--policy-file", str(policy_file)], env, launch=FAILING_RESTORE))
    # A key on every events partition (keys are partitioned as the gateways' producer does: by the key's hash).
    keys = [f"key-{n}" for n in range(4 * EVENTS_PARTITIONS)]
    await producer.send_all([request(key, wall_clock_ms()) for key in keys for _ in range(LIMIT)])

    prefix = sandbox.env["THROTTLEX_REDIS_PREFIX"]
    entries = [block_key(prefix, f"api_key={key}") for key in keys]

    async def all_blocked() -> bool:
        return bool(await redis.exists(*entries) == len(entries))

    await eventually(all_blocked, timeout_s=60, what="every key blocked after the failed restore was retried")
    failures = (await role_metrics(port)).get(("throttlex_worker_errors_total", (("kind", "assignment"),)), 0.0)
    assert failures == 1.0
    assert "taking over the assigned partitions failed; retrying" in failing_worker[0].log()


async def test_a_restore_that_keeps_failing_stops_the_worker_with_a_reason(
    sandbox: Sandbox, producer: EventSender, failing_worker: list[RoleProcess]
) -> None:
    policy_file = sandbox.write_policy(limit=LIMIT, window_s=3600)
    env = {"THROTTLEX_TEST_RESTORE_FAILURES": "always"}
    worker = start_role(sandbox, ["worker", "--policy-file", str(policy_file)], env, launch=FAILING_RESTORE)
    failing_worker.append(worker)
    try:
        code = await asyncio.to_thread(worker.process.wait, 90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker went on without its partitions' state:\n{worker.log()[-3000:]}")
    assert code != 0
    [reason] = [line for line in worker.log().splitlines() if line.startswith("throttlex: error:")]
    assert "could not restore the state of the assigned partitions after 6 attempts" in reason
    assert "the changelog cannot be read (injected)" in reason
