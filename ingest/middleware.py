"""ASGI middleware that enforces the denylist at the edge and emits one usage event per request.

The check is a lookup in the local `EdgeDenylist` cache; the event goes to the producer's batch
buffer after the response has been sent. Neither adds a network round trip to the request.
Requests without an API key are passed through untouched and counted as ``unauthenticated``.
"""

from __future__ import annotations

import math
import time

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest import metrics
from ingest.blocklist import Block
from ingest.clock import Clock, wall_clock_ms
from ingest.denylist import EdgeDenylist
from ingest.events import UsageEvent, key_id_for, new_event_id
from ingest.producer import EventProducer


class ThrottleXMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        denylist: EdgeDenylist,
        producer: EventProducer,
        key_salt: bytes,
        tenant: str = "default",
        api_key_header: str = "x-api-key",
        clock: Clock = wall_clock_ms,
    ) -> None:
        self.app = app
        self._denylist = denylist
        self._producer = producer
        self._salt = key_salt
        self._tenant = tenant
        self._header = api_key_header.lower().encode()
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api_key = _header(scope, self._header)
        if api_key is None:
            metrics.REQUESTS.labels(outcome="unauthenticated").inc()
            await self.app(scope, receive, send)
            return

        key_id = key_id_for(api_key, self._salt)
        received_ms = self._clock()
        started = time.perf_counter()
        client_ip = (scope.get("client") or ("", 0))[0]
        values = {"api_key": key_id, "tenant": self._tenant, "ip": client_ip, "route": scope["path"],
                  "method": scope["method"]}  # fmt: skip
        block = self._denylist.check(values)
        if self._denylist.refusing:  # fail-closed and Redis out of reach for too long
            metrics.REQUESTS.labels(outcome="refused_unavailable").inc()
            block = Block(limit_key="", until_ms=received_ms + 1_000, policy="")
            sent_bytes = await _send_error(send, 503, block, received_ms, "rate limiter unavailable; try again")
            status = 503
        elif block is not None:
            metrics.REQUESTS.labels(outcome="blocked").inc()
            sent_bytes = await _send_error(send, 429, block, received_ms, "rate limit exceeded")
            status = 429
        else:
            metrics.REQUESTS.labels(outcome="admitted").inc()
            response = _ResponseMeter(send)
            await self.app(scope, receive, response)
            status, sent_bytes = response.status, response.body_bytes

        await self._producer.emit(
            UsageEvent(
                event_id=new_event_id(),
                event_time_ms=received_ms,
                api_key_id=key_id,
                tenant=self._tenant,
                route=_route_template(scope),
                method=scope["method"],
                status=status,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                response_bytes=sent_bytes,
                client_ip=client_ip,
                edge_blocked=block is not None,
            )
        )


class _ResponseMeter:
    """Wraps ``send`` to record the status and body size of the response."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 500
        self.body_bytes = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body_bytes += len(message.get("body", b""))
        await self._send(message)


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


def _route_template(scope: Scope) -> str:
    """The matched route's template (``/items/{id}``) when the router recorded one, else the raw path."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) else str(scope["path"])


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
