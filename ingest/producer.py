"""The gateway's Kafka producer: durable, batched, compressed, and keyed by limit key."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ingest import metrics
from ingest.events import UsageEvent, encode

log = logging.getLogger(__name__)


class EventProducer:
    """Hands events to Kafka without waiting for the broker.

    `emit` appends the event to the client's batch buffer and returns; delivery is confirmed in the
    background and failures are counted in ``throttlex_gateway_events_failed_total``. Events are keyed
    by ``api_key_id``, so every event of one key lands in one partition and one worker sees all of them.
    Delivery is ``acks=all`` with the idempotent producer, so broker retries never duplicate an event.
    """

    def __init__(self, bootstrap: str, topic: str, *, linger_ms: int = 5) -> None:
        self._topic = topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            compression_type="lz4",
            max_batch_size=256 * 1024,
        )

    async def start(self) -> None:
        await self._producer.start()
        try:  # without the topic, every send would wait for metadata that never comes
            await asyncio.wait_for(self._producer.partitions_for(self._topic), timeout=10)
        except (KafkaError, TimeoutError):
            log.error(
                "the events topic does not exist; events are not delivered until it does "
                "(`throttlex worker` creates it, or create it yourself)",
                extra={"topic": self._topic},
            )

    async def stop(self) -> None:
        """Flush what is buffered, then close."""
        await self._producer.flush()
        await self._producer.stop()

    async def emit(self, event: UsageEvent) -> None:
        try:
            delivery = await self._send(event)
        except KafkaError as exc:
            metrics.EVENTS_FAILED.labels(reason=type(exc).__name__).inc()
            log.warning("usage event not accepted by the producer", extra={"error": str(exc)})
            return
        metrics.EVENTS_PRODUCED.inc()
        delivery.add_done_callback(_count_failure)


    async def _send(self, event: UsageEvent) -> asyncio.Future[object]:
        """Append to the batch buffer (waiting only if it is full); the future resolves on delivery."""
        delivery: asyncio.Future[object] = await self._producer.send(
            self._topic, encode(event), key=event.api_key_id.encode()
        )
        return delivery

    async def send_confirmed(self, events: list[UsageEvent]) -> list[BaseException | None]:
        """Send events and wait until Kafka has each (acks=all); per event, the error or None."""
        deliveries: list[asyncio.Future[object] | BaseException] = []
        for event in events:
            try:
                deliveries.append(await self._send(event))
            except KafkaError as exc:
                deliveries.append(exc)
        outcomes: list[BaseException | None] = []
        for delivery in deliveries:
            if isinstance(delivery, BaseException):
                outcomes.append(delivery)
                continue
            try:
                await delivery
                outcomes.append(None)
            except KafkaError as exc:
                outcomes.append(exc)
        failed = sum(outcome is not None for outcome in outcomes)
        metrics.EVENTS_PRODUCED.inc(len(events) - failed)
        if failed:
            metrics.EVENTS_FAILED.labels(reason="ingest").inc(failed)
        return outcomes


def _count_failure(delivery: asyncio.Future[object]) -> None:
    if not delivery.cancelled() and delivery.exception() is not None:
        metrics.EVENTS_FAILED.labels(reason=type(delivery.exception()).__name__).inc()
