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

from typing import Annotated

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel

from throttlex.api import metrics
from throttlex.api.auth import gateway
from throttlex.api.credentials import Credential
from throttlex.api.ingest_scope import Refused, admit
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import EventError, UsageEvent, decode
from throttlex.ingest.producer import EventProducer

router = APIRouter(prefix="/v1", tags=["ingest"])

class Rejection(BaseModel):
    index: int
    reason: str

class IngestResult(BaseModel):
    accepted: int
    rejected: int
    errors: list[Rejection]

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
    settings = request.app.state.settings
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
    bounds, now_ms = settings.ingest_bounds(), wall_clock_ms()
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
    outcomes = await producer.send_confirmed([event for _, event in valid])
    for (index, _), outcome in zip(valid, outcomes, strict=True):
        if outcome is not None:
            errors.append(Rejection(index=index, reason=f"not stored: Kafka error {type(outcome).__name__}"))
    errors.sort(key=lambda rejection: rejection.index)
    metrics.INGESTED_EVENTS.labels(outcome="accepted").inc(len(items) - len(errors))
    metrics.INGESTED_EVENTS.labels(outcome="rejected").inc(len(errors))
    return IngestResult(accepted=len(items) - len(errors), rejected=len(errors), errors=errors)
