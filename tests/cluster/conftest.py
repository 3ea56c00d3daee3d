"""Fixtures for the tests on a local cluster of each engine: three Kafka brokers, and Redis with Sentinel.

The cluster is the one `deploy/local/cluster.sh` starts. These fixtures start it themselves when it is
not running (and stop it again at the end of the session, if they started it), and give each test every
node running and every replica in sync, since the tests kill and stop nodes.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests.conftest import RoleProcess, Samples, Sandbox, eventually, start_role, stop_role

CLUSTER_SH = Path(__file__).parents[2] / "deploy" / "local" / "cluster.sh"
NODES = ["controller", "broker-1", "broker-2", "broker-3", "redis-1", "redis-2", "redis-3",
         "sentinel-1", "sentinel-2", "sentinel-3"]  # fmt: skip
SERVICE = "throttlex"


@dataclass
class LocalCluster:
    """The local cluster, and what a test does to its nodes (``broker-2``, ``redis-1``, …)."""

    env: dict[str, str]
    brokers: list[str]  # host:port of broker-1..3
    redis_ports: list[int]  # redis-1..3
    sentinel_ports: list[int]  # sentinel-1..3

    @property
    def kafka_bootstrap(self) -> str:
        return ",".join(self.brokers)

    @property
    def sentinel_url(self) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in self.sentinel_ports)}/{SERVICE}/0"

    def run(self, *args: str) -> str:
        done = subprocess.run(["bash", str(CLUSTER_SH), *args], env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"cluster.sh {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def running(self) -> set[str]:
        return {line.split()[1] for line in self.run("status").splitlines() if " running " in line}

    def kill(self, node: str) -> None:
        self.run("kill", node)

    def stop(self, node: str) -> None:
        self.run("stop", node)

    def start(self, node: str) -> None:
        self.run("start", node)

    def pause(self, node: str) -> None:
        self.run("pause", node)

    def resume(self, node: str) -> None:
        self.run("resume", node)

    async def leaders(self, topic: str) -> dict[int, int]:
        """Partition -> the broker id that leads it (-1: none); empty if no broker answered."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka_bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            [description] = await admin.describe_topics([topic])
        except KafkaError:  # the broker asked was just killed: ask again
            return {}
        finally:
            await admin.close()
        return {p["partition"]: p["leader"] for p in description["partitions"]}

    async def in_sync(self, topics: list[str] | None = None) -> bool:
        """Whether every partition (of ``topics``, or of every topic) has all its replicas in sync."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka_bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            descriptions = await admin.describe_topics(topics or await admin.list_topics())
        except KafkaError:  # a broker just started (or killed) may not answer metadata
            return False
        finally:
            await admin.close()
        return all(
            d["error_code"] == 0 and p["leader"] >= 0 and sorted(p["isr"]) == sorted(p["replicas"])
            for d in descriptions
            for p in d["partitions"]
        )

    async def primary_named_by_sentinels(self) -> int | None:
        """The primary's port if every Sentinel names the same one."""
        answers = set()
        for port in self.sentinel_ports:
            client = Redis(port=port, socket_timeout=2)
            try:
                host_port = await client.sentinel_get_master_addr_by_name(SERVICE)
                assert isinstance(host_port, tuple | list), host_port
                answers.add(int(host_port[1]))
            except (RedisError, OSError):
                return None
            finally:
                await client.aclose()
        return answers.pop() if len(answers) == 1 else None

    async def redis_primary_port(self) -> int | None:
        """The primary's port as the Sentinels agree on it, once it has both replicas attached."""
        primary = await self.primary_named_by_sentinels()
        if primary is None:
            return None
        client = Redis(port=primary, socket_timeout=2)
        try:
            info = await client.info("replication")
        except (RedisError, OSError):
            return None
        finally:
            await client.aclose()
        return primary if info.get("role") == "master" and info.get("connected_slaves") == 2 else None


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    """The cluster, started for this session if it was not running (and then stopped at its end)."""
    env = dict(os.environ)
    kafka_port = int(env.get("THROTTLEX_CLUSTER_KAFKA_PORT", "19091"))
    redis_port = int(env.get("THROTTLEX_CLUSTER_REDIS_PORT", "16379"))
    sentinel_port = int(env.get("THROTTLEX_CLUSTER_SENTINEL_PORT", "26379"))
    cluster = LocalCluster(
        env,
        brokers=[f"127.0.0.1:{kafka_port + i}" for i in range(3)],
        redis_ports=[redis_port + i for i in range(3)],
        sentinel_ports=[sentinel_port + i for i in range(3)],
    )
    started_here = not cluster.running()
    started = time.monotonic()
    cluster.run("up")
    print(f"local cluster up in {time.monotonic() - started:.1f} s")
    yield cluster
    if started_here:
        cluster.run("down")


@pytest.fixture
async def cluster(local_cluster: LocalCluster) -> LocalCluster:
    """The cluster with every node running, every Kafka replica in sync and the Redis primary with both
    replicas (a test before may have killed some)."""
    running = local_cluster.running()
    for node in running & {"redis-1", "redis-2", "redis-3"}:
        local_cluster.resume(node)  # a test that failed may have left one frozen
    if running != set(NODES):
        local_cluster.run("up")
    await eventually(local_cluster.in_sync, timeout_s=60, what="every Kafka replica to be in sync")
    await eventually(local_cluster.redis_primary_port, timeout_s=60, what="the Redis primary with both replicas")
    return local_cluster


def on_cluster(sandbox: Sandbox, cluster: LocalCluster, *, redis: str = "single") -> Sandbox:
    """The test's sandbox with its Kafka on the cluster's brokers, and its Redis on the cluster's Sentinels
    (``redis="sentinel"``) or on the single-node Redis of the other tests."""
    redis_url = cluster.sentinel_url if redis == "sentinel" else sandbox.redis_url
    return Sandbox(kafka_bootstrap=cluster.kafka_bootstrap, redis_url=redis_url, root=sandbox.root, tag=sandbox.tag,
                   replication_factor=3)



@pytest.fixture
def spawn_on() -> Iterator[Callable[..., RoleProcess]]:
    """Start `throttlex <args>` with a given sandbox's settings (`on_cluster`'s); stopped at teardown."""
    started: list[RoleProcess] = []

    def start(sandbox: Sandbox, *args: str, extra_env: dict[str, str] | None = None) -> RoleProcess:
        started.append(start_role(sandbox, list(args), extra_env))
        return started[-1]

    yield start
    for role in started:
        stop_role(role)


def histogram_quantile(samples: Samples, name: str, q: float) -> float:
    """The upper bound of the bucket of a Prometheus histogram that holds its ``q`` quantile."""
    buckets = sorted((float(dict(labels)["le"]), value) for (sample, labels), value in samples.items()
                     if sample == f"{name}_bucket")  # fmt: skip
    total = buckets[-1][1] if buckets else 0.0
    return next((bound for bound, count in buckets if count >= q * total), float("nan"))
