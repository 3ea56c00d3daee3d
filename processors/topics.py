"""Creates the Kafka topics ThrottleX reads, so no role depends on broker auto-creation, and checks the
partition counts that keyed state depends on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from throttlex.ingest.kafka_access import KafkaAccess


APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}
"""The events topic's setting: each record carries the time a broker appended it, which the worker
enforces on (`throttlex.processors.worker.timing`)."""

_DYNAMIC_TOPIC_CONFIG = 1
"""``config_source`` of a setting made on the topic itself (not inherited from the broker)."""


def min_insync_replicas(replication_factor: int) -> int:
    """The ``min.insync.replicas`` of every topic ThrottleX creates: a majority of its replicas, so a write
    acknowledged with ``acks=all`` is on a majority of them. With three replicas that is two, and one broker can be
    lost without refusing writes; with two replicas it is both, and losing either holds writes back."""
    return replication_factor // 2 + 1


class PartitionCountMismatch(ValueError):
    """An existing topic has another partition count than the settings give it."""


async def ensure_topics(
    kafka: KafkaAccess | str,
    partitions: dict[str, int],
    *,
    replication_factor: int = 1,
    configs: dict[str, dict[str, str]] | None = None,
    exact: Collection[str] = (),
) -> None:
    """Create each missing topic with its partition count, ``replication_factor`` replicas of which a majority
    must have a write (`min_insync_replicas`), and its topic configs (e.g. compaction); existing topics are left
    as they are. A topic in ``exact`` must have the count given, or
    `PartitionCountMismatch` says both: keys are spread by the count, and state kept per partition
    (windows, changelogs) would be read from the wrong partitions under another one."""
    admin = AIOKafkaAdminClient(**KafkaAccess.of(kafka).aiokafka_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        in_sync = {"min.insync.replicas": str(min_insync_replicas(replication_factor))}
        missing = [
            NewTopic(name, count, replication_factor, topic_configs={**in_sync, **(configs or {}).get(name, {})})
            for name, count in partitions.items()
            if name not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:  # another role created it meanwhile
                pass
        for description in await _described(admin, list(exact)) if exact else []:
            name, actual = description["topic"], len(description["partitions"])
            if actual != partitions[name]:
                raise PartitionCountMismatch(
                    f"topic {name!r} has {actual} partitions but THROTTLEX_EVENTS_PARTITIONS is {partitions[name]}: "
                    f"set it to {actual}, or move to a new topic (keyed state does not follow a changed count)"
                )
    finally:
        await admin.close()


async def ensure_topic_configs(kafka: KafkaAccess | str, configs: dict[str, dict[str, str]]) -> list[str]:
    """Give existing topics these topic-level settings, keeping the others set on them; returns the topics
    changed. (Kafka's AlterConfigs replaces a topic's whole set, so the settings it has are read first.)"""
    admin = AIOKafkaAdminClient(**KafkaAccess.of(kafka).aiokafka_options())
    await admin.start()
    try:
        changed = []
        for topic, wanted in configs.items():
            [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
            [(error_code, error_message, _, _, entries)] = response.resources
            if error_code:
                raise RuntimeError(f"cannot read the settings of topic {topic!r}: {error_message or error_code}")
            current = {entry[0]: entry[1] for entry in entries}
            if all(current.get(name) == value for name, value in wanted.items()):
                continue
            own = {entry[0]: entry[1] for entry in entries if entry[3] == _DYNAMIC_TOPIC_CONFIG}
            [altered] = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {**own, **wanted})])
            [(error_code, error_message, *_)] = altered.resources
            if error_code:
                raise RuntimeError(f"cannot change the settings of topic {topic!r}: {error_message or error_code}")
            changed.append(topic)
        return changed
    finally:
        await admin.close()


_DESCRIBE_WAIT_S = 15.0


async def _described(admin: AIOKafkaAdminClient, topics: list[str]) -> list[dict[str, Any]]:
    """The topics' descriptions once the brokers know their partitions: a topic created a moment ago (here or by
    another role) is described with no partitions, or with an error, until its metadata has spread."""
    deadline = time.monotonic() + _DESCRIBE_WAIT_S
    while True:
        descriptions: list[dict[str, Any]] = await admin.describe_topics(topics)
        settled = all(d["error_code"] == 0 and d["partitions"] for d in descriptions)
        if settled or time.monotonic() > deadline:
            return descriptions
        await asyncio.sleep(0.2)
