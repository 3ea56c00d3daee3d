"""The gateway's Kafka producer: durable, batched, compressed, and keyed by limit key."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from ingest import metrics
from ingest.events import UsageEvent, encode

log = logging.getLogger(__name__)


class EventProducer:
    """Hands events to Kafka without ever making a request wait.

    `emit` puts the event in this producer's buffer and returns; a background task hands buffered
    events to the Kafka client, which batches them and confirms delivery in the background (failures
    are counted in ``throttlex_gateway_events_failed_total``). Events are keyed by ``api_key_id``, so
    every event of one key lands in one partition and one worker sees all of them. Delivery is
    ``acks=all`` with the idempotent producer, so the client's retries never duplicate an event.

    While Kafka is out of reach (a broker restart), events wait here and the client retries on its
    own. At most ``buffer_max_events`` events are held accepted but not yet delivered; beyond that the
    gateway sheds events (the request itself is served as usual): each is counted in
    ``throttlex_gateway_events_shed_total``, and one log line says when shedding starts and one how
    many were shed when it stops. Every event accepted into the buffer is delivered.
    """

    def __init__(self, bootstrap: str, topic: str, *, linger_ms: int = 5, buffer_max_events: int = 100_000) -> None:
        self._topic = topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            compression_type="lz4",
            max_batch_size=256 * 1024,
        )
        self._buffer_max = buffer_max_events
        self._buffer: asyncio.Queue[UsageEvent] = asyncio.Queue()
        self._undelivered = 0  # accepted by `emit`, delivery not yet confirmed (or failed)
        self._shed = 0  # events shed since shedding last started
        self._handing_over: asyncio.Task[None] | None = None

    @property
    def undelivered(self) -> int:
        """Events accepted by `emit` whose delivery Kafka has not confirmed yet."""
        return self._undelivered

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
        self._handing_over = asyncio.create_task(self._hand_over(), name="throttlex-event-producer")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Deliver what is buffered (waiting at most ``timeout_s`` for Kafka), then close."""
        try:
            await asyncio.wait_for(self._drain(), timeout_s)
        except TimeoutError:
            log.error("stopping with events Kafka has not confirmed", extra={"events": self._undelivered})
        if self._handing_over is not None:
            self._handing_over.cancel()
        await self._producer.stop()

    def emit(self, event: UsageEvent) -> None:
        """Buffer one event for delivery, or shed it if the buffer is full; never waits."""
        if self._undelivered >= self._buffer_max:
            if not self._shed:
                log.warning(
                    "producer buffer full: shedding usage events until Kafka takes the buffered ones",
                    extra={"buffered": self._undelivered},
                )
            self._shed += 1
            metrics.EVENTS_SHED.inc()
            return
        if self._shed:
            log.warning("producer buffer has room again: shedding stopped", extra={"shed": self._shed})
            self._shed = 0
        self._undelivered += 1
        metrics.PRODUCER_BUFFERED.inc()
        self._buffer.put_nowait(event)

    async def _hand_over(self) -> None:
        """Move buffered events into the client's batches (waiting while the client's own are full)."""
        while True:
            event = await self._buffer.get()
            try:
                delivery = await self._send_patiently(event)
            except Exception as exc:  # one event the client refuses must not stop delivery of the rest
                self._settled(failure=type(exc).__name__)
                log.warning("usage event not accepted by the producer", extra={"error": str(exc)})
            else:
                delivery.add_done_callback(self._on_delivery)
            finally:
                self._buffer.task_done()

    async def _send_patiently(self, event: UsageEvent) -> asyncio.Future[object]:
        """The client waits (up to its request timeout) for room in a full batch; keep waiting: the
        event was not appended, so trying again cannot duplicate it."""
        while True:
            try:
                return await self._send(event)
            except KafkaTimeoutError:
                log.warning("Kafka has not taken the buffered events for a while; still waiting", extra={"buffered": self._undelivered})

    def _on_delivery(self, delivery: asyncio.Future[object]) -> None:
        if delivery.cancelled():
            self._settled(failure="cancelled")
        elif (error := delivery.exception()) is not None:
            self._settled(failure=type(error).__name__)
        else:
            self._settled(failure=None)

    def _settled(self, failure: str | None) -> None:
        self._undelivered -= 1
        metrics.PRODUCER_BUFFERED.dec()
        if failure is None:
            metrics.EVENTS_PRODUCED.inc()
        else:
            metrics.EVENTS_FAILED.labels(reason=failure).inc()

    async def _drain(self) -> None:
        await self._buffer.join()
        await self._producer.flush()

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
