"""Test data shared by the suites."""

import uuid

from throttlex.ingest.events import UsageEvent


def make_event(**changes: object) -> UsageEvent:
    fields: dict[str, object] = dict(
        event_id=uuid.UUID("5f0c7a52-8d7e-4c39-9a57-3b8f0f0c2a11"),
        event_time_ms=1_790_000_000_123,
        api_key_id="a1b2c3",
        tenant="acme",
        route="/v1/items/{item_id}",
        method="GET",
        status=200,
        latency_ms=3.25,
        response_bytes=512,
        cost=2,
        client_ip="203.0.113.7",
    )
    fields.update(changes)
    return UsageEvent(**fields)  # type: ignore[arg-type]
