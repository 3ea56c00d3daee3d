"""``POST /v1/events``: usage events from gateways that are not Python, in batches.

Each event is validated by the same contract as on the stream (`ingest.events.decode`) and must be for
one of the tenants the ingest token may send for (`api.credentials`); an event of a registered API key must
carry that key's tenant, and takes that key's plan (so no token acts on another tenant's key, or picks a
plan); and it may say only what the token's scope allows (`api.ingest_scope`: cost, time, route, and the
fields only a gateway sets). Valid events are written to Kafka,
marked with the token's name (``source = ingest:<name>``), and acknowledged by Kafka before the answer, so
"accepted" means stored. The answer lists every rejected event with its index and reason: nothing is
half-accepted silently.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Annotated

import msgspec
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from confluent_kafka import KafkaError, KafkaException
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from throttlex.api import metrics
from throttlex.api.auth import gateway
from throttlex.api.credentials import Credential
from throttlex.api.settings import ApiSettings
from throttlex.api.ingest_scope import Refused, admit
from throttlex.api.seen_events import EventKey, Seen, SeenEvents
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import EventError, UsageEvent, decode
from throttlex.ingest.producer import EventProducer

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["ingest"])

class Rejection(BaseModel):
    index: int
    reason: str

class IngestResult(BaseModel):
    accepted: int = Field(description="events stored, by this request or, within the dedup window, an earlier one")
    rejected: int
    errors: list[Rejection]
    duplicates: int = Field(0, description="of the accepted, those an earlier request (or this one) already carried")

async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status_code=413, detail=f"body larger than {limit} bytes; send smaller batches")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=413, detail=f"body larger than {limit} bytes; send smaller batches")
        chunks.append(chunk)
    return b"".join(chunks)

@router.post(
    "/events",
    status_code=202,
    response_model=IngestResult,
    summary="Send a batch of usage events (a JSON array of UsageEvent objects)",
)
async def ingest_events(request: Request, sender: Annotated[Credential, Depends(gateway)]) -> IngestResult:
    settings: ApiSettings = request.app.state.settings
    producer: EventProducer | None = request.app.state.producer
    body = await _read_body(request, settings.ingest_max_bytes)
    try:
        items = msgspec.json.decode(body, type=list[msgspec.Raw])
    except msgspec.DecodeError as exc:
        raise HTTPException(status_code=400, detail=f"body must be a JSON array of events: {exc}") from None
    if len(items) > settings.ingest_max_events:
        raise HTTPException(status_code=422, detail=f"{len(items)} events in one request; at most {settings.ingest_max_events}")
    if producer is None:
        raise HTTPException(status_code=503, detail="event ingest unavailable: Kafka was not reachable at start-up")

    valid: list[tuple[int, UsageEvent]] = []
    errors: list[Rejection] = []
    source = sender.name if sender.name.startswith("admin:") else f"ingest:{sender.name}"
    registry = request.app.state.registry
    bounds, now_ms = settings.ingest_bounds, wall_clock_ms()
    for index, raw in enumerate(items):
        try:
            event = decode(bytes(raw))
        except EventError as exc:
            errors.append(Rejection(index=index, reason=exc.reason))
            continue
        if not sender.allows(event.tenant):
            reason = f"tenant {event.tenant!r} is not one ingest token {sender.name!r} may send for ({sender.describe_tenants()})"
            errors.append(Rejection(index=index, reason=reason))
            continue
        key = registry.keys.get(event.api_key_id)  # a registered key's events carry its own tenant and plan
        if key is not None and key.tenant != event.tenant:
            errors.append(Rejection(index=index, reason=f"key {event.api_key_id} is not a key of tenant {event.tenant!r}"))
            continue
        try:
            event = admit(event, sender.scope, bounds, now_ms, key.plan if key is not None else None)
        except Refused as exc:
            errors.append(Rejection(index=index, reason=str(exc)))
            continue
        valid.append((index, msgspec.structs.replace(event, source=source)))
    unique: dict[EventKey, tuple[int, UsageEvent]] = {}
    for index, event in valid:  # a copy within the batch is a duplicate like one of an earlier batch
        unique.setdefault((f"{event.tenant}/{sender.name}", event.event_id), (index, event))
    seen: SeenEvents = request.app.state.seen_events
    try:
        claims = await seen.claim(list(unique))
    except (RedisError, OSError) as exc:
        raise _retry_later(settings, f"the store of ingested event ids (Redis) did not answer ({type(exc).__name__})")
    sending = [(key, *entry) for (key, entry), claim in zip(unique.items(), claims, strict=True) if claim is Seen.NEW]
    elsewhere = claims.count(Seen.PENDING)
    deliveries = producer.send([event for _, _, event in sending])
    await producer.settle([d for d in deliveries if isinstance(d, asyncio.Future)], settings.ingest_deadline_s)
    stored: list[EventKey] = []
    refused: list[EventKey] = []
    late: list[tuple[EventKey, asyncio.Future[None]]] = []
    for (key, index, _), delivery in zip(sending, deliveries, strict=True):
        if isinstance(delivery, asyncio.Future) and not delivery.done():
            late.append((key, delivery))
            continue
        error = delivery if isinstance(delivery, BaseException) else delivery.exception()
        if error is None:
            stored.append(key)
        else:
            (stored if _maybe_stored(error) else refused).append(key)
            errors.append(Rejection(index=index, reason=f"not stored: Kafka error {type(error).__name__}"))
    await _record(seen, stored, refused)
    if late:
        _record_when_delivered(request.app, seen, late)
    if late or elsewhere:
        metrics.INGESTED_EVENTS.labels(outcome="deferred").inc(len(items))
        raise _retry_later(settings, f"Kafka has not confirmed {len(late) + elsewhere} of the events yet")
    errors.sort(key=lambda rejection: rejection.index)
    duplicates = len(valid) - len(sending)
    metrics.INGESTED_EVENTS.labels(outcome="accepted").inc(len(items) - len(errors) - duplicates)
    metrics.INGESTED_EVENTS.labels(outcome="duplicate").inc(duplicates)
    metrics.INGESTED_EVENTS.labels(outcome="rejected").inc(len(errors))
    return IngestResult(accepted=len(items) - len(errors), rejected=len(errors), errors=errors, duplicates=duplicates)


def _retry_later(settings: ApiSettings, why: str) -> HTTPException:
    """503 for a batch to send again: every event it holds is counted once however often it is sent."""
    retry_after = math.ceil(settings.ingest_deadline_s)
    return HTTPException(status_code=503, headers={"Retry-After": str(retry_after)}, detail=f"{why}: send the same batch "
                         f"again after {retry_after} s (events already stored are not counted twice)")  # fmt: skip


async def _record(seen: SeenEvents, stored: list[EventKey], refused: list[EventKey]) -> None:
    try:
        await seen.settle(stored, refused)
    except (RedisError, OSError) as exc:  # the claims expire instead: a retry after that sends the events again
        log.warning("ingested event ids not recorded", extra={"events": len(stored) + len(refused), "error": str(exc)})


def _maybe_stored(error: BaseException) -> bool:
    """Whether Kafka may hold an event it did not confirm: one that timed out may have been written (its
    acknowledgement lost), so its id is kept as stored and a copy is not sent again (never counted twice)."""
    reason = error.args[0] if isinstance(error, KafkaException) and error.args else None
    return isinstance(reason, KafkaError) and reason.code() == KafkaError._MSG_TIMED_OUT


def _record_when_delivered(app: FastAPI, seen: SeenEvents, late: list[tuple[EventKey, asyncio.Future[None]]]) -> None:
    """Record the fate of events Kafka confirms (or refuses) after their request was answered."""

    async def record() -> None:
        await asyncio.wait([delivery for _, delivery in late])
        failed = [(event, delivery.exception()) for event, delivery in late]
        stored = [event for event, error in failed if error is None or _maybe_stored(error)]
        await _record(seen, stored, [event for event, error in failed if error is not None and not _maybe_stored(error)])

    task = asyncio.create_task(record(), name="throttlex-ingest-late-deliveries")
    app.state.recording.add(task)
    task.add_done_callback(app.state.recording.discard)
