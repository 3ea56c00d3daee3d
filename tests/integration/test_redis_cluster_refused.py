"""A Redis Cluster node given as a plain redis:// URL is refused when a role starts: the worker exits with a
one-line reason, and a gateway's edge denylist does not start."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.redis_connection import RedisUrlError
from tests.conftest import RoleProcess, Sandbox, eventually, free_port, redis_answers

pytestmark = pytest.mark.integration


@pytest.fixture
async def cluster_node(tmp_path: Path) -> AsyncIterator[str]:
    """A Redis started in cluster mode (no slots assigned: enough for it to say it is a cluster node), answering.
    Its cluster bus gets a free port of its own: by default it is the port + 10,000, past 65,535 for a port
    drawn from the top of the ephemeral range, and the node would not start."""
    port, log = free_port(), tmp_path / "node.log"
    with log.open("wb") as output:
        node = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--cluster-enabled",
                                 "yes", "--cluster-port", str(free_port()), "--cluster-config-file", str(tmp_path / "nodes.conf"),
                                 "--dir", str(tmp_path)], stdout=output, stderr=output)  # fmt: skip
    client = Redis(port=port)
    try:

        async def answers() -> bool:
            assert node.poll() is None, f"the cluster node did not start:\n{log.read_text()}"
            return await redis_answers(client)

        await eventually(answers, timeout_s=10, what="the cluster node to answer")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        await client.aclose()
        node.kill()
        node.wait()


async def test_a_worker_and_an_edge_refuse_a_redis_cluster_at_start(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], cluster_node: str
) -> None:
    worker = spawn("worker", extra_env={"THROTTLEX_REDIS_URL": cluster_node})
    await eventually(lambda: worker.process.poll() is not None, timeout_s=60, what="the worker to stop")
    assert worker.process.returncode != 0
    [reason] = [line for line in worker.log().splitlines() if line.startswith("throttlex: error:")]
    assert "Redis Cluster is not supported" in reason and "redis+sentinel://" in reason

    edge = EdgeDenylist(cluster_node, sandbox.env["THROTTLEX_REDIS_PREFIX"])
    with pytest.raises(RedisUrlError, match="Redis Cluster is not supported"):
        await edge.start(ready_timeout_s=10)
    await edge.stop()
