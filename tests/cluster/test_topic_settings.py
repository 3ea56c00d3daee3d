"""Every topic the worker, the sink and the registry create on a three-broker cluster has three replicas and
``min.insync.replicas=2`` of its own (the brokers keep Kafka's default of 1), so a write acknowledged with
``acks=all`` is on two brokers, and one broker can be lost without refusing writes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from throttlex.ingest.settings import ConnectionSettings
from throttlex.processors.registry import open_registry
from tests.cluster.conftest import LocalCluster, on_cluster
from tests.conftest import RoleProcess, Sandbox, eventually, free_port, owns_partitions

pytestmark = pytest.mark.cluster


async def topic_settings(bootstrap: str, tag: str) -> dict[str, tuple[int, str]]:
    """Each of the test's topics: its replica count and its min.insync.replicas."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = sorted(t for t in await admin.list_topics() if tag in t)
        replicas = {d["topic"]: len(d["partitions"][0]["replicas"]) for d in await admin.describe_topics(topics)}
        found = {}
        for topic in topics:
            [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
            [(_, _, _, _, entries)] = response.resources
            found[topic] = (replicas[topic], {e[0]: e[1] for e in entries}["min.insync.replicas"])
        return found
    finally:
        await admin.close()


async def test_topics_created_on_a_cluster_need_two_in_sync_replicas(
    sandbox: Sandbox, cluster: LocalCluster, spawn_on: Callable[..., RoleProcess]
) -> None:
    sandbox = on_cluster(sandbox, cluster)
    port = free_port()
    spawn_on(sandbox, "worker", extra_env={"THROTTLEX_METRICS_PORT": str(port)})
    spawn_on(sandbox, "sink")
    await eventually(lambda: owns_partitions(port, 4), timeout_s=60, what="the worker to own the events partitions")
    async with open_registry(sandbox.settings(ConnectionSettings), replication_factor=3):
        pass

    found = await topic_settings(cluster.kafka_bootstrap, sandbox.tag)
    events = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    assert {events, f"{events}.regrouped", sandbox.env["THROTTLEX_DEAD_LETTER_TOPIC"],
            sandbox.env["THROTTLEX_REGISTRY_TOPIC"]} <= set(found)  # fmt: skip
    assert any(".state." in topic for topic in found), found  # the changelogs
    assert found == {topic: (3, "2") for topic in found}
