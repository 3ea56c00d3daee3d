"""Taking partitions over when Kafka assigns them: retried, and loud when it cannot be done.

aiokafka logs and swallows what a rebalance callback raises, and a worker that kept its group membership
without its partitions' state would apply nothing of them, silently. So a taking-over that fails is tried
again with backoff, and if it still cannot be done the worker fails with the reason (`AssignmentFailed`):
its process exits non-zero, and its orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from throttlex.ingest.kafka_access import KafkaAccess
from throttlex.processors import metrics

log = logging.getLogger(__name__)

ATTEMPTS = 6
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
DEADLINE_S = 240.0
"""Tried this many times, waiting 0.5, 1, 2, 4, 8 s between tries, and for at most ``DEADLINE_S`` in all (a
large changelog takes long to read), before the worker gives up: well inside the 300 s after which a consumer
that polls nothing leaves its group (the loop cannot poll while a taking-over holds its lock)."""


class AssignmentFailed(RuntimeError):
    """The worker could not take over the partitions Kafka assigned it: it stops, so that it is restarted."""


async def with_retries(take_over: Callable[[], Awaitable[None]]) -> AssignmentFailed | None:
    """Run ``take_over`` until it succeeds (None) or ``ATTEMPTS`` tries have failed (why, to stop the worker)."""
    delay_s = FIRST_BACKOFF_S
    deadline = time.monotonic() + DEADLINE_S
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await take_over()
            return None
        except Exception as exc:  # noqa: BLE001 - aiokafka would log and swallow it: every kind counts
            metrics.WORKER_ERRORS.labels(kind="assignment").inc()
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if attempt == ATTEMPTS or time.monotonic() + delay_s >= deadline:
                log.error("could not take over the assigned partitions; stopping", extra={"error": reason})
                return AssignmentFailed(f"could not restore the state of the assigned partitions after {attempt} attempts: {reason}")
            log.warning("taking over the assigned partitions failed; retrying",
                        extra={"error": reason, "attempt": attempt, "retry_in_s": delay_s})  # fmt: skip
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, MAX_BACKOFF_S)
    raise AssertionError("unreachable")


async def committed_offsets(kafka: KafkaAccess, group: str, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    """The offsets ``group`` has committed for ``partitions`` (-1: none)."""
    admin = AIOKafkaAdminClient(**kafka.aiokafka_options())
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=list(partitions))
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items()}


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's rebalance callbacks to the worker."""

    def __init__(
        self,
        revoked: Callable[[set[TopicPartition]], Awaitable[None]],
        assigned: Callable[[set[TopicPartition]], Awaitable[None]],
    ) -> None:
        self._revoked = revoked
        self._assigned = assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._assigned(assigned)
