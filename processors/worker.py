"""The Faust worker: consumes usage events, runs the policy engine, publishes blocks to Redis.

This is the only module that imports faust. Window state lives in a changelog-backed Faust table, so a
restarted or rebalanced worker recovers its counts from Kafka. The events topic is keyed by
``api_key_id`` and the table has the same partitions, so each key's state is local to the worker that
owns the key's partition.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust

from ingest.clock import wall_clock_ms
from ingest.events import EventError, decode
from processors import metrics
from processors.denylist_writer import DenylistWriter
from processors.engine import PolicyEngine
from processors.live_usage import LiveUsageWriter
from processors.policy import PolicySet
from processors.redis_client import redis_client
from processors.settings import WorkerSettings
from processors.topics import ensure_topics

log = logging.getLogger(__name__)


class PolicyWorker:
    """One worker process's Faust app. Create and start it inside the running event loop."""

    def __init__(self, settings: WorkerSettings, policies: PolicySet) -> None:
        self._settings = settings
        self._redis = redis_client(settings.redis_url, settings.redis_timeout_s)
        self._writer = DenylistWriter(self._redis, settings.redis_prefix)
        self._live = LiveUsageWriter(self._redis, settings.redis_prefix)
        self._active: dict[str, int] = {}  # limit key -> until_ms of the blocks this worker wrote
        self.app = faust.App(
            settings.worker_app_id,
            broker=f"kafka://{settings.kafka_bootstrap}",
            store="memory://",
            web_enabled=False,
            topic_partitions=settings.events_partitions,
            topic_replication_factor=settings.topic_replication_factor,
            producer_acks=-1,
            consumer_auto_offset_reset="earliest",
            key_serializer="raw",
            value_serializer="raw",  # events are decoded by ingest.events; table values are bytes
        )
        self._events = self.app.topic(settings.events_topic, key_type=bytes, value_type=bytes)
        self._dead_letters = self.app.topic(settings.dead_letter_topic, key_type=bytes, value_type=bytes)
        table = self.app.Table(
            "windows",
            default=None,
            partitions=settings.events_partitions,
            key_type=str,
            value_type=bytes,
        )
        self.engine = PolicyEngine(policies, table)
        self.app.agent(self._events, name="enforce")(self._consume)
        self.app.timer(settings.live_flush_interval_s)(self._flush)

    async def start(self) -> None:
        settings = self._settings
        await ensure_topics(
            settings.kafka_bootstrap,
            {settings.events_topic: settings.events_partitions, settings.dead_letter_topic: 1},
            replication_factor=settings.topic_replication_factor,
        )
        await self.app.start()

    async def crashed(self) -> BaseException:
        """Wait until the Faust app crashes (a consumer or agent failed for good); return the reason."""
        while not self.app.crashed:
            await asyncio.sleep(0.5)
        return self.app.crash_reason or RuntimeError("faust app crashed")

    async def stop(self) -> None:
        await self.app.stop()
        await self._flush()
        await self._redis.aclose()

    async def _consume(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            await self._handle(event.key, event.value)

    async def _handle(self, key: bytes | None, value: bytes) -> None:
        try:
            usage = decode(value)
        except EventError as exc:
            await self._dead_letter(key, value, exc)
            return
        metrics.EVENTS_CONSUMED.inc()
        outcome = self.engine.apply(usage)
        if outcome.late:
            metrics.EVENTS_LATE.inc(outcome.late)
        for block in outcome.shadow_blocks:
            metrics.DECISIONS.labels(policy=block.policy, outcome="shadow_block").inc()
        for block in outcome.blocks:
            metrics.DECISIONS.labels(policy=block.policy, outcome="block").inc()
            if await self._writer.publish(block):
                self._active[block.limit_key] = block.until_ms
                metrics.PROCESSING_SECONDS.observe(max(0.0, time.time() - usage.event_time_ms / 1000))
                log.info("blocked", extra={"limit_key": block.limit_key, "policy": block.policy, "until_ms": block.until_ms})
        self._live.record(outcome.counted)

    async def _dead_letter(self, key: bytes | None, value: bytes, error: EventError) -> None:
        """Forward the original bytes with the reason in a ``reason`` header, and carry on."""
        metrics.EVENTS_DEAD_LETTERED.labels(reason=error.kind).inc()
        log.warning("dead-lettered event", extra={"reason": error.reason})
        await self._dead_letters.send(key=key, value=value, headers={"reason": error.reason.encode()})

    async def _flush(self) -> None:
        await self._writer.retry_pending()
        await self._live.flush()
        now_ms = wall_clock_ms()
        self._active = {key: until for key, until in self._active.items() if until > now_ms}
        metrics.ACTIVE_BLOCKS.set(len(self._active))
