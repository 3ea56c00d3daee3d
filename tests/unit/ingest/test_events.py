import uuid

import msgspec
import pytest

from ingest.events import SCHEMA_VERSION, EventError, UsageEvent, decode, encode, key_id_for


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


def raw_with(**changes: object) -> bytes:
    document = msgspec.json.decode(encode(make_event()))
    document.update(changes)
    return msgspec.json.encode(document)


def test_round_trip_keeps_every_field() -> None:
    event = make_event(edge_blocked=True)
    assert decode(encode(event)) == event


def test_wire_format_carries_the_schema_version() -> None:
    assert msgspec.json.decode(encode(make_event()))["v"] == SCHEMA_VERSION
    assert make_event().schema_version == SCHEMA_VERSION


def test_cost_defaults_to_one() -> None:
    document = msgspec.json.decode(encode(make_event()))
    del document["cost"]
    assert decode(msgspec.json.encode(document)).cost == 1


@pytest.mark.parametrize(
    ("raw", "kind", "fragment"),
    [
        (b"{not json", "malformed", "malformed JSON"),
        (b"", "malformed", "malformed JSON"),
        (raw_with(v=99), "unknown_version", "unknown schema version 99"),
        (raw_with(cost=-1), "invalid", "$.cost"),
        (raw_with(status=42), "invalid", "$.status"),
        (raw_with(event_id="not-a-uuid"), "invalid", "$.event_id"),
        (raw_with(api_key_id=""), "invalid", "$.api_key_id"),
        (raw_with(route="x" * 5000), "invalid", "$.route"),
    ],
)
def test_bad_events_are_rejected_with_a_reason(raw: bytes, kind: str, fragment: str) -> None:
    with pytest.raises(EventError) as caught:
        decode(raw)
    assert caught.value.kind == kind
    assert fragment in caught.value.reason


def test_missing_field_is_named() -> None:
    document = msgspec.json.decode(encode(make_event()))
    del document["tenant"]
    with pytest.raises(EventError, match="missing required field `tenant`"):
        decode(msgspec.json.encode(document))


def test_key_ids_are_stable_per_salt_and_hide_the_key() -> None:
    first = key_id_for("sk_live_secret", b"salt-one")
    assert first == key_id_for("sk_live_secret", b"salt-one")
    assert first != key_id_for("sk_live_secret", b"salt-two")
    assert first != key_id_for("sk_live_other", b"salt-one")
    assert "secret" not in first and len(first) == 24


def test_an_event_without_a_version_is_read_as_version_one() -> None:
    document = msgspec.json.decode(encode(make_event()))
    del document["v"]
    assert decode(msgspec.json.encode(document)) == make_event()
