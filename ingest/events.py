"""The usage event contract: one `UsageEvent` per request, JSON on the wire, versioned by the `v` field.

This module is the only place that knows the wire format. Producers call `encode`, every consumer
calls `decode`; a new schema version is a new tagged struct added to `_Versions`.
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from typing import Annotated, Literal

import msgspec

SCHEMA_VERSION = 1

EARLIEST_EVENT_MS = 946_684_800_000
"""2000-01-01 UTC: no request this system sees is older; earlier times are clock or encoding errors."""
LATEST_EVENT_MS = 4_102_444_800_000
"""2100-01-01 UTC: likewise, and well inside what ClickHouse stores."""

_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class UsageEvent(msgspec.Struct, tag_field="v", tag=SCHEMA_VERSION, frozen=True, kw_only=True, gc=False):
    """One request seen by a gateway.

    `event_time_ms` is when the gateway received the request (Unix epoch, milliseconds); windows are
    computed on it, never on arrival time. `cost` is the weight the request counts for in limits
    (default 1). `edge_blocked` marks requests the gateway itself refused with 429: they are
    accounted but never count towards a window, so a blocked client is not kept blocked by its retries.
    `api_key_id` is a keyed hash of the caller's API key (see `key_id_for`); the plain key never leaves
    the gateway. An event without ``v`` is read as version 1, the first version of the contract.

    Instances hold scalars only, so the garbage collector does not track them (``gc=False``): consumers
    holding tens of thousands of decoded events would otherwise pay for collections that find nothing.
    """

    event_id: uuid.UUID
    event_time_ms: Annotated[int, msgspec.Meta(ge=EARLIEST_EVENT_MS, lt=LATEST_EVENT_MS)]
    api_key_id: _Text
    tenant: _Text
    route: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    method: Annotated[str, msgspec.Meta(min_length=1, max_length=16)]
    status: Annotated[int, msgspec.Meta(ge=100, le=599)]
    latency_ms: Annotated[float, msgspec.Meta(ge=0)]
    response_bytes: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # what msgspec bounds (int64); ClickHouse stores UInt64
    cost: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1
    client_ip: Annotated[str, msgspec.Meta(max_length=64)] = ""
    edge_blocked: bool = False
    plan: Annotated[str, msgspec.Meta(max_length=64)] = ""
    """The calling key's plan when the gateway knows it; empty means the deployment's default plan."""
    source: Annotated[str, msgspec.Meta(max_length=80)] = ""
    """Who sent the event: ``gateway:<name>`` from a gateway's middleware (``THROTTLEX_GATEWAY_NAME``, the host
    name by default), ``ingest:<token name>`` for events posted to ``POST /v1/events`` (set by the API from the
    credential, whatever the body says); empty from a middleware given no name."""
    stage: Literal["response", "check"] = "response"
    """``response``: the gateway saw the response (``status``, ``latency_ms`` and ``response_bytes`` are the
    upstream's). ``check``: a rate-limit check made before the upstream answered (``throttlex-rls``, asked by
    Envoy): ``status`` is what the check decided (200 admitted, 429 refused) and the latency and size are 0.
    Limits and billing count both alike; latency and error figures read ``response`` events only."""

    @property
    def schema_version(self) -> int:
        return SCHEMA_VERSION


class EventError(ValueError):
    """Raised by `decode` for bytes that are not a valid event.

    `kind` is one of ``malformed``, ``invalid`` or ``unknown_version`` (a metric label); `reason` is a
    one-line explanation fit for a dead-letter record.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(UsageEvent)

decode_valid = _decoder.decode
"""`decode` for hot loops: the same validation, msgspec's own errors (call `decode` for the reason)."""
_version_probe = msgspec.json.Decoder(dict[str, object])


def encode(event: UsageEvent) -> bytes:
    return _encoder.encode(event)


def decode(raw: bytes) -> UsageEvent:
    """Decode and validate one event, raising `EventError` with a one-line reason on any defect."""
    try:
        return _decoder.decode(raw)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: catch it first
        if "`$.v`" in str(exc):
            version = _version_probe.decode(raw).get("v")
            reason = f"unknown schema version {version!r} (this build reads v{SCHEMA_VERSION})"
            raise EventError("unknown_version", reason) from None
        raise EventError("invalid", f"invalid event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise EventError("malformed", f"malformed JSON: {exc}") from None


_UUID_KEPT_BITS = ~(0xF000 << 64 | 0xC000 << 48)  # all but the version and variant bits
_UUID_VERSION_4 = 0x4000 << 64 | 0x8000 << 48  # version 4 (random), variant RFC 4122
_ids = random.Random()  # seeded from the operating system; its own, so the host app's random.seed() cannot touch it
os.register_at_fork(after_in_child=_ids.seed)  # a pre-forking server's workers do not share a sequence


def new_event_id() -> uuid.UUID:
    """A random (version 4) UUID, as `uuid.uuid4` makes, from a generator of this module's own instead of
    ``os.urandom``: an event id must be unique, not secret, and the system call was the largest single
    cost of the gateway's request path. The generator is seeded from the operating system when this
    module is imported, and again in every forked child."""
    return uuid.UUID(int=_ids.getrandbits(128) & _UUID_KEPT_BITS | _UUID_VERSION_4)


def key_id_for(api_key: str, salt: bytes) -> str:
    """The stable, non-reversible id under which an API key is counted, blocked and stored.

    A keyed BLAKE2b digest: the same key always maps to the same id for one deployment salt, and the id
    reveals nothing about the key.
    """
    return hashlib.blake2b(api_key.encode(), key=salt, digest_size=12).hexdigest()
