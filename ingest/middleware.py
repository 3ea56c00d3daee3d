"""ASGI middleware that enforces the denylist at the edge and emits one usage event per request.

The check is a lookup in the local `EdgeDenylist` cache; the event goes to the producer's batch
buffer after the response has been sent. Neither adds a network round trip to the request.

With an `EdgeKeys` cache, only registered keys pass: a request without a key, or with an unknown,
suspended, revoked or expired one, gets 401 (and no event), and the event of an admitted request
carries the key's tenant and plan. Without one (``keys=None``, for a gateway behind another
authenticator) every key passes, requests without a key are passed through untouched and counted as
``unauthenticated``, and events carry the gateway's configured tenant. Paths in ``public_paths``
(health checks, ``/metrics``) are neither checked nor accounted. Behind proxies listed in ``trusted_proxies``
the client's address is read from the forwarding headers (`ingest.client_address`). A request's route, at the check and on its
event, is its route template (`ingest.routes`).

A WebSocket's handshake is checked and accounted as a request with the method ``WEBSOCKET``: refused with an
HTTP answer where the server offers the denial response extension, else closed before accepting; its event
is emitted when the handshake is answered (status 101 when accepted), not when the connection closes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import NamedTuple

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from throttlex.ingest import metrics
from throttlex.ingest.client_address import ClientAddress
from throttlex.ingest.denylist_entries import Block
from throttlex.ingest.clock import Clock, wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.events import UsageEvent, key_id_for, new_event_id
from throttlex.ingest.keys import EdgeKeys, KeyLookupUnavailable
from throttlex.ingest.producer import EventProducer
from throttlex.ingest.routes import WEBSOCKET, RouteTemplates


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
        trusted_proxies: Sequence[str] = (),
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
        self._client = ClientAddress(list(trusted_proxies))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self._public:
            await self.app(scope, receive, send)
            return
        refuse = _refuse if scope["type"] == "http" else partial(_refuse_websocket, scope)
        api_key = _header(scope, self._header)
        if api_key is None and self._keys is None:
            _OUTCOMES["unauthenticated"] += 1
            await self.app(scope, receive, send)
            return
        if api_key is None:
            await refuse(send, 401, f"missing API key: send it in the {self._header.decode()} header")
            return

        key_id = self._remembered_key_id(api_key) if len(api_key) <= KEY_CACHED_MAX_CHARS else self._key_id_for(api_key)
        tenant, plan = self._tenant, ""
        if self._keys is not None:
            record = self._keys.cached(key_id)
            if record is None:
                try:
                    record = await self._keys.usable(key_id)
                except KeyLookupUnavailable:
                    await refuse(send, 503, "cannot check the API key now; try again")
                    return
            if record is None:
                await refuse(send, 401, "unknown, suspended, revoked or expired API key")
                return
            tenant, plan = record.tenant, record.plan
        received_ms = self._clock()
        started = time.perf_counter()
        client_ip = (scope.get("client") or ("", 0))[0]
        if self._client.enabled:
            client_ip = self._client.of(client_ip, _header(scope, b"x-forwarded-for"), _header(scope, b"forwarded"))
        request = _Request(key_id, tenant, plan, client_ip, self._routes.of(scope), scope.get("method", WEBSOCKET),
                           received_ms, started)  # fmt: skip
        block = self._denylist.check({"api_key": key_id, "tenant": tenant, "ip": request.client_ip,
                                      "route": request.route, "method": request.method})  # fmt: skip
        if self._denylist.refusing:  # fail-closed and Redis out of reach for too long
            _OUTCOMES["refused_unavailable"] += 1
            block = Block(limit_key="", until_ms=received_ms + 1_000, policy="")
            status, message = 503, "rate limiter unavailable; try again"
        elif block is not None:
            _OUTCOMES["blocked"] += 1
            status, message = 429, "rate limit exceeded"
        else:
            _OUTCOMES["admitted"] += 1
            if scope["type"] == "websocket":  # accounted when the handshake is answered, however long it stays open
                handshake = _HandshakeMeter(send, lambda answered: self._emit(request, answered, 0))
                try:
                    await self.app(scope, receive, handshake)
                finally:
                    if not handshake.answered:  # ended or raised before answering: the server refuses it
                        self._emit(request, 500, 0)
                return
            response = _ResponseMeter(send)
            try:
                await self.app(scope, receive, response)
            finally:  # a handler that raised was still served (the server answers 500): counted and billed
                self._emit(request, response.status, response.body_bytes)
            return
        if scope["type"] == "http":
            sent_bytes = await _send_error(send, status, block, received_ms, message)
        else:
            sent_bytes = await _refuse_websocket(scope, send, status, message, _retry_after_s(block, received_ms))
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


class _HandshakeMeter:
    """Wraps a WebSocket's ``send`` to learn how its handshake was answered: accepted (101), closed before
    accepting (403, as servers answer it) or denied with an HTTP response (its status)."""

    def __init__(self, send: Send, on_answer: Callable[[int], None]) -> None:
        self._send = send
        self._on_answer = on_answer
        self.answered = False

    async def __call__(self, message: Message) -> None:
        if not self.answered and message["type"] in _HANDSHAKE_ANSWERS:
            self.answered = True
            self._on_answer(_HANDSHAKE_ANSWERS[message["type"]] or int(message.get("status", 500)))
        await self._send(message)


_HANDSHAKE_ANSWERS = {"websocket.accept": 101, "websocket.close": 403, "websocket.http.response.start": 0}
"""The status each way of answering a handshake gives (0: the one it names)."""


async def _refuse_websocket(scope: Scope, send: Send, status: int, message: str, retry_after_s: int | None = None) -> int:
    """Refuse a WebSocket handshake: with an HTTP response where the server offers the denial response extension
    (the client sees ``status``), else by closing before accepting (the server answers 403) with a close code
    that says why. Returns the bytes of the body sent."""
    if status == 401:
        _OUTCOMES["unauthorized"] += 1
    elif status == 503 and retry_after_s is None:
        _OUTCOMES["key_check_unavailable"] += 1
    if "websocket.http.response" in scope.get("extensions", {}):
        body = msgspec.json.encode({"error": message, **({"retry_after_s": retry_after_s} if retry_after_s else {})})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry_after_s is not None or status == 503:
            headers.append((b"retry-after", str(retry_after_s or 1).encode()))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
        return len(body)
    code = {401: 1008, 429: 1013, 503: 1013}[status]  # policy violation; try again later
    await send({"type": "websocket.close", "code": code, "reason": message[:120]})
    return 0


def _retry_after_s(block: Block, now_ms: int) -> int:
    return max(1, math.ceil((block.until_ms - now_ms) / 1000))


async def _refuse(send: Send, status: int, message: str) -> None:
    """Answer a request that is not let through and not accounted (no usable key)."""
    _OUTCOMES["unauthorized" if status == 401 else "key_check_unavailable"] += 1
    body = msgspec.json.encode({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers.append((b"www-authenticate", b"ApiKey") if status == 401 else (b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, status: int, block: Block, now_ms: int, message: str) -> int:
    retry_after_s = _retry_after_s(block, now_ms)
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
    """The header's value; a header sent several times, its values joined with commas (as HTTP reads them)."""
    values = [value.decode("latin-1") for key, value in scope["headers"] if key == name]
    return ",".join(values) if values else None
