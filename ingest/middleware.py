"""ASGI middleware that enforces the denylist at the edge and emits one usage event per request.

The check is a lookup in the local `EdgeDenylist` cache; the event goes to the producer's batch
buffer after the response has been sent. Neither adds a network round trip to the request.

With an `EdgeKeys` cache, only registered keys pass: a request without a key, or with an unknown,
suspended, revoked or expired one, gets 401 (and no event), and the event of an admitted request
carries the key's tenant and plan. Without one (``keys=None``, for a gateway behind another
authenticator) every key passes, requests without a key are passed through untouched and counted as
``unauthenticated``, and events carry the gateway's configured tenant. Paths in ``public_paths``
(health checks, ``/metrics``) are neither checked nor accounted. A request's route, at the check and on its
event, is its route template (`ingest.routes`).
"""

from __future__ import annotations

import math
import time
from functools import lru_cache, partial
from typing import NamedTuple

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from throttlex.ingest import metrics
from throttlex.ingest.denylist_entries import Block
from throttlex.ingest.clock import Clock, wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.events import UsageEvent, key_id_for, new_event_id
from throttlex.ingest.keys import EdgeKeys, KeyLookupUnavailable
from throttlex.ingest.producer import EventProducer
from throttlex.ingest.routes import RouteTemplates


_OUTCOMES = metrics.REQUESTS.counts

KEY_IDS_CACHED = 16_384
"""API keys whose id (a keyed hash) each middleware remembers, so a returning caller is not hashed again."""
KEY_CACHED_MAX_CHARS = 128
"""Longer keys are hashed on every request: a client sending huge made-up keys cannot fill memory with them
(16,384 keys of at most 128 characters: a few MB)."""


class ThrottleXMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        denylist: EdgeDenylist,
        producer: EventProducer,
        key_salt: bytes,
        keys: EdgeKeys | None = None,
        public_paths: frozenset[str] = frozenset(),
        tenant: str = "default",
        gateway_name: str = "",
        api_key_header: str = "x-api-key",
        clock: Clock = wall_clock_ms,
    ) -> None:
        self.app = app
        self._denylist = denylist
        self._producer = producer
        self._key_id_for = partial(key_id_for, salt=key_salt)
        self._remembered_key_id = lru_cache(maxsize=KEY_IDS_CACHED)(self._key_id_for)
        self._keys = keys
        self._public = public_paths
        self._tenant = tenant
        self._source = f"gateway:{gateway_name}" if gateway_name else ""
        self._header = api_key_header.lower().encode()
        self._clock = clock
        self._routes = RouteTemplates(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._public:
            await self.app(scope, receive, send)
            return
        api_key = _header(scope, self._header)
        if api_key is None and self._keys is None:
            _OUTCOMES["unauthenticated"] += 1
            await self.app(scope, receive, send)
            return
        if api_key is None:
            await _refuse(send, 401, f"missing API key: send it in the {self._header.decode()} header")
            return

        key_id = self._remembered_key_id(api_key) if len(api_key) <= KEY_CACHED_MAX_CHARS else self._key_id_for(api_key)
        tenant, plan = self._tenant, ""
        if self._keys is not None:
            record = self._keys.cached(key_id)
            if record is None:
                try:
                    record = await self._keys.usable(key_id)
                except KeyLookupUnavailable:
                    await _refuse(send, 503, "cannot check the API key now; try again")
                    return
            if record is None:
                await _refuse(send, 401, "unknown, suspended, revoked or expired API key")
                return
            tenant, plan = record.tenant, record.plan
        received_ms = self._clock()
        started = time.perf_counter()
        request = _Request(key_id, tenant, plan, (scope.get("client") or ("", 0))[0], self._routes.of(scope),
                           scope["method"], received_ms, started)  # fmt: skip
        block = self._denylist.check({"api_key": key_id, "tenant": tenant, "ip": request.client_ip,
                                      "route": request.route, "method": request.method})  # fmt: skip
        if self._denylist.refusing:  # fail-closed and Redis out of reach for too long
            _OUTCOMES["refused_unavailable"] += 1
            block = Block(limit_key="", until_ms=received_ms + 1_000, policy="")
            sent_bytes = await _send_error(send, 503, block, received_ms, "rate limiter unavailable; try again")
            status = 503
        elif block is not None:
            _OUTCOMES["blocked"] += 1
            sent_bytes = await _send_error(send, 429, block, received_ms, "rate limit exceeded")
            status = 429
        else:
            _OUTCOMES["admitted"] += 1
            response = _ResponseMeter(send)
            try:
                await self.app(scope, receive, response)
            finally:  # a handler that raised was still served (the server answers 500): counted and billed
                self._emit(request, response.status, response.body_bytes)
            return
        self._emit(request, status, sent_bytes, edge_blocked=True)

    def _emit(self, request: _Request, status: int, sent_bytes: int, *, edge_blocked: bool = False) -> None:
        self._producer.emit(
            UsageEvent(
                event_id=new_event_id(),
                event_time_ms=request.received_ms,
                api_key_id=request.key_id,
                tenant=request.tenant,
                plan=request.plan,
                route=request.route,
                method=request.method,
                status=status,
                latency_ms=(time.perf_counter() - request.started) * 1000.0,
                response_bytes=sent_bytes,
                client_ip=request.client_ip,
                edge_blocked=edge_blocked,
                source=self._source,
            )
        )


class _Request(NamedTuple):
    """What the middleware knows of an accounted request before it is answered."""

    key_id: str
    tenant: str
    plan: str
    client_ip: str
    route: str
    method: str
    received_ms: int
    started: float


class _ResponseMeter:
    """Wraps ``send`` to record the status and body size of the response."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 500  # until the app starts a response: one that raises before it gets a 500
        self.body_bytes = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body_bytes += len(message.get("body", b""))
        await self._send(message)


async def _refuse(send: Send, status: int, message: str) -> None:
    """Answer a request that is not let through and not accounted (no usable key)."""
    _OUTCOMES["unauthorized" if status == 401 else "key_check_unavailable"] += 1
    body = msgspec.json.encode({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers.append((b"www-authenticate", b"ApiKey") if status == 401 else (b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, status: int, block: Block, now_ms: int, message: str) -> int:
    retry_after_s = max(1, math.ceil((block.until_ms - now_ms) / 1000))
    body = msgspec.json.encode(
        {
            "error": message,
            "policy": block.policy,
            "retry_after_s": retry_after_s,
            "blocked_until_ms": block.until_ms,
        }
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"retry-after", str(retry_after_s).encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return len(body)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
