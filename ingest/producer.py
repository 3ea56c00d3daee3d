"""The gateway's Kafka producer: durable, batched, compressed, and keyed by API key."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, Message

from throttlex.ingest import metrics
from throttlex.ingest.events import UsageEvent, encode
from throttlex.ingest.kafka_access import KafkaAccess

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
"""How often the producer's task collects delivery reports and updates the buffer gauge."""


class EventProducer:
    """Hands events to Kafka without ever making a request wait.

    Built on librdkafka (confluent-kafka). `emit` only appends the event to a list; on the event loop's
    next turn `_hand_over` encodes the events of all the requests served meanwhile and appends them to
    librdkafka's queue one after another, and librdkafka's own thread batches, compresses (lz4) and
    sends them, outside the GIL and the event loop. Appending them together rather than one per request
    between the requests' other work takes about half the CPU: librdkafka's queue locks, its broker
    thread's wake-ups and the CPU caches serve a run of appends at once (measured with the app driven
    in-process: BENCHMARKS.md, "What the profiles showed").
    Events are keyed by ``api_key_id`` and partitioned with Kafka's default (Java-compatible murmur2)
    partitioner, as every other ThrottleX producer does, so every event of one key lands in one
    partition and one worker sees all of them. Delivery is ``acks=all`` with the idempotent producer,
    so the client's retries never duplicate an event, and a gateway's producer has no delivery timeout:
    while Kafka is out of reach (a broker restart) events wait in the queue and are sent when it is back.

    At most ``buffer_max_events`` events are held accepted but not yet delivered; beyond that the
    gateway sheds events (the request itself is served as usual): each is counted in
    ``throttlex_gateway_events_shed_total``, and one log line says when shedding starts and one how
    many were shed when it stops. Every event accepted is delivered, or counted in
    ``throttlex_gateway_events_failed_total`` if Kafka refuses it for good.
    """

    def __init__(
        self, kafka: KafkaAccess | str, topic: str, *, linger_ms: int = 5, buffer_max_events: int = 100_000,
        delivery_timeout_s: float = 0,
    ) -> None:  # fmt: skip
        """``delivery_timeout_s``: how long an event may wait for Kafka before it fails; 0 (a gateway's): for ever.
        `POST /v1/events` gives a bound, so the fate of an event its caller gave up on is known in time."""
        self._topic = topic
        self._producer = confluent_kafka.Producer({
            **KafkaAccess.of(kafka).librdkafka_config(),
            "enable.idempotence": True,  # acks=all, ordered retries without duplicates
            "linger.ms": linger_ms,
            "compression.type": "lz4",
            "partitioner": "murmur2_random",  # the Java client's (and aiokafka's) partitioner for keyed records
            "queue.buffering.max.messages": buffer_max_events,
            "message.timeout.ms": int(delivery_timeout_s * 1000),  # 0: never give up on an event, wait for Kafka
            "on_delivery": self._on_delivery,
            "logger": logging.getLogger("throttlex.ingest.librdkafka"),
        })  # fmt: skip
        self._undelivered = 0  # queued, delivery not reported yet (librdkafka's len() also counts its logs)
        self._produced = 0  # delivered since the counter was last updated
        self._shed = 0  # events shed since shedding last started
        self._pending: list[UsageEvent] = []  # emitted in this turn of the event loop, not handed over yet
        self._handing_over = False  # a hand-over of `_pending` is scheduled
        self._polling: asyncio.Task[None] | None = None

    @property
    def undelivered(self) -> int:
        """Events taken by `emit` whose delivery Kafka has not confirmed yet (or that are yet to be shed)."""
        return self._undelivered + len(self._pending)

    async def start(self) -> None:
        try:  # without the topic, events wait in the queue until it exists
            metadata = await asyncio.to_thread(functools.partial(self._producer.list_topics, topic=self._topic, timeout=10))
            missing = metadata.topics[self._topic].error is not None
        except KafkaException:
            missing = True
        if missing:
            log.error(
                "the events topic does not exist; events are not delivered until it does "
                "(`throttlex worker` creates it, or create it yourself)",
                extra={"topic": self._topic},
            )
        self._polling = asyncio.create_task(self._poll(), name="throttlex-event-producer")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Deliver what is queued (waiting at most ``timeout_s`` for Kafka), then stop."""
        if self._polling is not None:
            self._polling.cancel()
        self._hand_over()
        deadline = time.monotonic() + timeout_s
        while self._undelivered and time.monotonic() < deadline:
            self._collect()
            await asyncio.sleep(0.01)
        self._collect()
        if self._undelivered:
            log.error("stopping with events Kafka has not confirmed", extra={"events": self._undelivered})

    def emit(self, event: UsageEvent) -> None:
        """Take one event for delivery; never waits. It is handed to librdkafka on the event loop's next
        turn with the others emitted meanwhile (and at the latest by the next `_collect`), or at once when
        no event loop runs. Call it from the event loop's thread, or from one thread when none runs."""
        self._pending.append(event)
        if not self._handing_over:
            self._handing_over = True
            try:
                asyncio.get_running_loop().call_soon(self._hand_over)
            except RuntimeError:
                self._hand_over()

    def _hand_over(self) -> None:
        """Append the pending events to librdkafka's queue; past the bound, shed them."""
        self._handing_over = False
        pending, self._pending = self._pending, []
        produce, topic = self._producer.produce, self._topic
        for event in pending:
            try:
                produce(topic, encode(event), event.api_key_id.encode())
            except BufferError:
                if not self._shed:
                    log.warning(
                        "producer buffer full: shedding usage events until Kafka takes the buffered ones",
                        extra={"buffered": self._undelivered},
                    )
                self._shed += 1
                metrics.EVENTS_SHED.inc()
                continue
            except Exception as exc:  # refused outright (larger than the broker takes, say): counted, the rest go on
                error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
                if isinstance(error, KafkaError):
                    _not_delivered(error.name(), error.str())
                else:
                    _not_delivered(type(exc).__name__, str(exc))
                continue
            self._undelivered += 1
            if self._shed:
                log.warning("producer buffer has room again: shedding stopped", extra={"shed": self._shed})
                self._shed = 0

    async def send_confirmed(self, events: list[UsageEvent]) -> list[BaseException | None]:
        """Send events and wait until Kafka has each (acks=all); per event, the error or None."""
        deliveries = self.send(events)
        await self.settle([d for d in deliveries if isinstance(d, asyncio.Future)])
        return [d if isinstance(d, BaseException) else d.exception() for d in deliveries]

    async def settle(self, deliveries: list[asyncio.Future[None]], timeout_s: float | None = None) -> None:
        """Wait until Kafka has answered for every one of ``deliveries`` (of `send`), or ``timeout_s`` has passed:
        the polling task resolves the rest later. Polls often meanwhile, so a caller waits for Kafka only."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not all(d.done() for d in deliveries) and (deadline is None or time.monotonic() < deadline):
            self._collect()
            await asyncio.sleep(0.002)

    def send(self, events: list[UsageEvent]) -> list[asyncio.Future[None] | BaseException]:
        """Send events; per event, a future that Kafka's acknowledgement (acks=all) resolves, or the error that
        kept it from being queued. The futures are resolved by this producer's polling task."""
        loop = asyncio.get_running_loop()
        deliveries: list[asyncio.Future[None] | BaseException] = []
        for event in events:
            delivery: asyncio.Future[None] = loop.create_future()
            try:
                self._producer.produce(self._topic, encode(event), event.api_key_id.encode(),
                                       on_delivery=_settle(delivery, self._on_delivery))  # fmt: skip
            except (BufferError, KafkaException) as exc:
                deliveries.append(exc)
            else:
                self._undelivered += 1
                deliveries.append(delivery)
        refused = sum(isinstance(d, BaseException) for d in deliveries)  # never queued (a full queue, say)
        if refused:
            metrics.EVENTS_FAILED.labels(reason="ingest").inc(refused)
        return deliveries

    async def _poll(self) -> None:
        while True:
            self._collect()
            await asyncio.sleep(POLL_INTERVAL_S)

    def _collect(self) -> None:
        """Hand over any events still pending (should the loop have stopped before their hand-over ran),
        serve delivery reports (they call `_on_delivery`) and publish the counts."""
        if self._pending:
            self._hand_over()
        self._producer.poll(0)
        if self._produced:
            metrics.EVENTS_PRODUCED.inc(self._produced)
            self._produced = 0
        metrics.PRODUCER_BUFFERED.set(self.undelivered)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        self._undelivered -= 1
        if error is None:
            self._produced += 1
        else:
            _not_delivered(error.name(), error.str())


def _not_delivered(reason: str, detail: str) -> None:
    """Count and log one event Kafka or librdkafka refused for good."""
    metrics.EVENTS_FAILED.labels(reason=reason).inc()
    log.warning("usage event not delivered", extra={"error": detail})


DeliveryCallback = Callable[[KafkaError | None, Message], None]


def _settle(delivery: asyncio.Future[None], then: DeliveryCallback) -> DeliveryCallback:
    """A delivery callback for one confirmed send: resolve its future, then count it as usual."""

    def settled(error: KafkaError | None, message: Message) -> None:
        if error is None:
            delivery.set_result(None)
        else:
            delivery.set_exception(KafkaException(error))
        then(error, message)

    return settled
