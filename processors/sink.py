"""The usage sink: Kafka events into ClickHouse in large batches, committing offsets only after insert.

A plain aiokafka consumer with manual commits (not a Faust agent: a Faust stream acknowledges events
even when the code handling them raised). Each batch is inserted, then its offsets are committed; if
an insert fails the batch is retried with backoff and nothing is committed, so no event is lost. A
crash between insert and commit re-reads the batch (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from ingest.events import EventError, decode
from processors import metrics
from processors.settings import SinkSettings
from processors.topics import ensure_topics
from processors.usage_store import EVENT_COLUMNS, StoreError, UsageStore

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0


def event_row(record: ConsumerRecord[bytes, bytes]) -> tuple[Any, ...] | None:
    """The ``usage_events`` row for one Kafka record, or None if it is not a valid event."""
    try:
        event = decode(record.value or b"")
    except EventError:
        return None
    return (
        event.event_id, datetime.fromtimestamp(event.event_time_ms / 1000, tz=UTC), event.api_key_id,
        event.tenant, event.route, event.method, event.status, event.latency_ms, event.response_bytes,
        event.cost, event.client_ip, event.edge_blocked, event.schema_version, record.partition, record.offset,
    )  # fmt: skip


class UsageSink:
    def __init__(self, settings: SinkSettings, store: UsageStore) -> None:
        self._settings = settings
        self._store = store
        self._consumer = AIOKafkaConsumer(
            settings.events_topic,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.sink_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self._settings
        await ensure_topics(
            settings.kafka_bootstrap,
            {settings.events_topic: settings.events_partitions},
            replication_factor=settings.topic_replication_factor,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="usage-sink")

    async def crashed(self) -> BaseException:
        """Wait until the sink loop fails for good (it retries ClickHouse errors itself); return why."""
        assert self._task is not None
        await asyncio.wait([self._task])
        if self._task.cancelled() or self._task.exception() is None:
            await asyncio.Event().wait()  # stopped on request: never a crash
        error = self._task.exception()
        assert error is not None
        return error

    async def stop(self) -> None:
        """Insert and commit what has been read, then leave the consumer group."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait([self._task])
        await self._consumer.stop()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            records = await self._collect()
            if records and await self._insert(records):
                await self._consumer.commit(_next_offsets(records))

    async def _collect(self) -> list[ConsumerRecord[bytes, bytes]]:
        """Read until the batch is full, the flush interval has passed, or a stop is requested."""
        settings = self._settings
        deadline = time.monotonic() + settings.sink_flush_interval_s
        records: list[ConsumerRecord[bytes, bytes]] = []
        while len(records) < settings.sink_batch_max_rows and not self._stopping.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            fetched = await self._consumer.getmany(
                timeout_ms=min(left_ms, 200), max_records=settings.sink_batch_max_rows - len(records)
            )
            for batch in fetched.values():
                records.extend(batch)
        return records

    async def _insert(self, records: list[ConsumerRecord[bytes, bytes]]) -> bool:
        """Insert the batch, retrying with backoff; False if a stop came before it succeeded."""
        rows = [row for row in map(event_row, records) if row is not None]
        metrics.SINK_SKIPPED.inc(len(records) - len(rows))
        backoff_s = 0.2
        while True:
            started = time.perf_counter()
            try:
                if rows:
                    await self._store.insert("usage_events", rows, EVENT_COLUMNS)
            except StoreError as exc:
                metrics.SINK_ERRORS.labels(kind="insert").inc()
                log.warning("insert failed; retrying", extra={"rows": len(rows), "error": str(exc), "retry_in_s": backoff_s})
                try:
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                    return False
                except TimeoutError:
                    backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
                    continue
            metrics.SINK_INSERT_SECONDS.observe(time.perf_counter() - started)
            metrics.SINK_ROWS.inc(len(rows))
            return True


def _next_offsets(records: list[ConsumerRecord[bytes, bytes]]) -> dict[TopicPartition, int]:
    offsets: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
    return offsets
