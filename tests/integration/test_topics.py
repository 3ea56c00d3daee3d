"""Roles check the partition count of the topics their keyed state depends on."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from throttlex.processors.topics import APPEND_TIME, ensure_topic_configs, ensure_topics
from tests.conftest import Sandbox
from tests.unit.api.test_cli import throttlex


async def test_roles_refuse_an_events_topic_with_another_partition_count(sandbox: Sandbox, tmp_path: Path) -> None:
    topic = f"mismatch-{sandbox.tag}.events"
    await ensure_topics(sandbox.kafka_bootstrap, {topic: 2})  # made before, with another count
    env = {**sandbox.env, "THROTTLEX_EVENTS_TOPIC": topic, "THROTTLEX_EVENTS_PARTITIONS": "4",
           "THROTTLEX_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}", "THROTTLEX_METRICS_PORT": "0"}  # fmt: skip
    for role in ("worker", "sink"):
        result = await asyncio.to_thread(throttlex, role, env=env)
        assert result.returncode == 2, (role, result.stderr[-2000:])
        [error] = [line for line in result.stderr.splitlines() if line.startswith("throttlex: error:")]
        assert error.startswith(f"throttlex: error: topic '{topic}' has 2 partitions but THROTTLEX_EVENTS_PARTITIONS is 4"), error


async def test_a_topic_created_a_moment_ago_is_checked_once_its_partitions_are_known(sandbox: Sandbox) -> None:
    """Right after it is created, a topic may be described with no partitions yet: that is not a mismatch. (A
    worker once refused to start on its fresh regroup topic: "has 0 partitions but ... is 4".)"""
    topics = [f"fresh-{sandbox.tag}-{n}" for n in range(30)]
    await asyncio.gather(*(ensure_topics(sandbox.kafka_bootstrap, {topic: 4}, exact=[topic]) for topic in topics))


async def test_an_existing_events_topic_is_switched_to_append_time_keeping_its_other_settings(sandbox: Sandbox) -> None:
    """A topic made before (by an older worker, or by hand) stamps records with the producer's clock; the worker
    switches it to Kafka's append time at start, and Kafka's AlterConfigs replaces a topic's whole set of settings,
    so the ones made on the topic must be carried over."""
    topic = f"old-{sandbox.tag}.events"
    await ensure_topics(sandbox.kafka_bootstrap, {topic: 1}, configs={topic: {"retention.ms": "123456789"}})
    assert await ensure_topic_configs(sandbox.kafka_bootstrap, {topic: APPEND_TIME}) == [topic]
    assert await ensure_topic_configs(sandbox.kafka_bootstrap, {topic: APPEND_TIME}) == []  # nothing left to change
    admin = AIOKafkaAdminClient(bootstrap_servers=sandbox.kafka_bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        settings = {entry[0]: entry[1] for entry in response.resources[0][4]}
    finally:
        await admin.close()
    assert (settings["message.timestamp.type"], settings["retention.ms"]) == ("LogAppendTime", "123456789")
