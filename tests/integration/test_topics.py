"""Roles check the partition count of the topics their keyed state depends on."""

from __future__ import annotations

import asyncio
from pathlib import Path

from throttlex.processors.topics import ensure_topics
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
