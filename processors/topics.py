"""Creates the Kafka topics ThrottleX reads, so no role depends on broker auto-creation."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError


async def ensure_topics(
    bootstrap: str,
    partitions: dict[str, int],
    *,
    replication_factor: int = 1,
    configs: dict[str, dict[str, str]] | None = None,
) -> None:
    """Create each missing topic with its partition count and topic configs (e.g. compaction);
    existing topics are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, count, replication_factor, topic_configs=(configs or {}).get(name, {}))
            for name, count in partitions.items()
            if name not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:  # another role created it meanwhile
                pass
    finally:
        await admin.close()
