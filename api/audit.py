"""The audit trail: one record per change an admin makes (keys, plans, policies): who, what, before and after.

Each record is written to the audit topic (one partition, kept for ever: ``retention.ms=-1``) before the
change is answered, and logged as a JSON line at INFO on the ``throttlex.audit`` logger. If Kafka refuses
the record, the change (already in the registry) stands, and the record is logged at ERROR instead, so it
is never lost silently. Admins read the trail, newest first, with ``GET /v1/admin/audit``. Records never
hold a plain API key: keys appear as the API describes them (key id, last four characters).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.kafka_access import KafkaAccess
from throttlex.processors.topics import ensure_topics

log = logging.getLogger("throttlex.audit")

SCAN_LIMIT = 10_000
"""Most recent records a read of the trail looks through (older ones stay in the topic, for Kafka's own tools)."""
READ_TIMEOUT_S = 15.0


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    at_ms: int
    actor: str
    """``admin:<credential name>``, or ``cli:<user>`` for `throttlex keys create`."""
    action: str
    """``key.create``, ``key.change``, ``key.revoke``, ``plans.replace`` or ``policies.replace``."""
    target: str
    """The key id, or ``plans`` / ``policies``."""
    before: Any = None
    after: Any = None


class AuditTrail:
    def __init__(self, kafka: KafkaAccess | str, topic: str, *, replication_factor: int = 1) -> None:
        self._kafka = KafkaAccess.of(kafka)
        self._topic = topic
        self._replication_factor = replication_factor
        self._partition = TopicPartition(topic, 0)
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        await ensure_topics(
            self._kafka, {self._topic: 1}, replication_factor=self._replication_factor,
            configs={self._topic: {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}},
        )  # fmt: skip
        self._producer = AIOKafkaProducer(**self._kafka.aiokafka_options(), acks="all", enable_idempotence=True)
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def record(self, actor: str, action: str, target: str, before: Any, after: Any) -> AuditRecord:
        """Write and log one record; a refused write is logged at ERROR with the whole record."""
        entry = AuditRecord(id=uuid.uuid4().hex, at_ms=wall_clock_ms(), actor=actor, action=action, target=target,
                            before=before, after=after)  # fmt: skip
        fields = {"audit": msgspec.to_builtins(entry)}
        try:
            if self._producer is None:
                raise KafkaError("the audit trail is not started (Kafka was not reachable at start-up)")
            await self._producer.send_and_wait(self._topic, msgspec.json.encode(entry), key=target.encode())
        except KafkaError as exc:
            log.error("audit record not stored in Kafka; this line is the record", extra={**fields, "error": str(exc)})
            return entry
        log.info(f"{actor} {action} {target}", extra=fields)
        return entry

    async def recent(self, limit: int, *, target: str | None = None, actor: str | None = None) -> list[AuditRecord]:
        """The newest ``limit`` records (matching ``target`` and ``actor`` if given) among the last `SCAN_LIMIT`;
        `KafkaTimeoutError` if Kafka does not give them within `READ_TIMEOUT_S`."""
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                return await self._recent(limit, target, actor)
        except TimeoutError:
            raise KafkaTimeoutError(f"the audit trail was not read within {READ_TIMEOUT_S:g} s") from None

    async def _recent(self, limit: int, target: str | None, actor: str | None) -> list[AuditRecord]:
        consumer = AIOKafkaConsumer(**self._kafka.aiokafka_options(), group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([self._partition])
            end = (await consumer.end_offsets([self._partition]))[self._partition]
            start = max(0, end - SCAN_LIMIT)
            begin = (await consumer.beginning_offsets([self._partition]))[self._partition]
            consumer.seek(self._partition, max(start, begin))
            found: list[AuditRecord] = []
            while await consumer.position(self._partition) < end:
                batches = await consumer.getmany(self._partition, timeout_ms=1000)
                for record in batches.get(self._partition, []):
                    if record.offset >= end or record.value is None:
                        continue
                    entry = msgspec.json.decode(record.value, type=AuditRecord)
                    if (target is None or entry.target == target) and (actor is None or entry.actor == actor):
                        found.append(entry)
        finally:
            await consumer.stop()
        return found[::-1][:limit]
