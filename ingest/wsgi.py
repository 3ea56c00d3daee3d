"""WSGI middleware (Flask, Django, any WSGI app): the same edge check and usage event as the ASGI
`ThrottleXMiddleware`, for threaded servers such as gunicorn or waitress.

The edge caches and the producer are asyncio objects; here they live on an event loop of their own, on a
daemon thread started by each server process on its first request (pre-fork servers such as gunicorn
fork their workers before any request, and a thread does not survive a fork). A request thread reads the
caches directly (dictionary lookups), asks the loop only for a key it has not cached yet, and hands its
event to the loop without waiting (``call_soon_threadsafe``): no request waits on Kafka, and only a key
never seen before waits on Redis, as with the ASGI middleware.

    app.wsgi_app = ThrottleXWSGIMiddleware(app.wsgi_app, GatewaySettings())   # Flask: routes found by itself

Settings come from ``THROTTLEX_*`` like the gateway's (`GatewaySettings`). A request's route is its
route template: for a Flask app it is found in the app's URL map; for other frameworks pass ``route_of``
(a function of the WSGI environ returning the template, e.g. Django's ``resolve(path).route``; one that
raises counts the request as ``unmatched``); without
one every route is accounted as ``unmatched`` (raw paths would make one series per URL).
"""

from __future__ import annotations

import asyncio
import atexit
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import cache, lru_cache, partial
from typing import Any

import msgspec

from throttlex.ingest import metrics
from throttlex.ingest.client_address import ClientAddress
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.denylist_entries import Block
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import UsageEvent, key_id_for, new_event_id
from throttlex.ingest.keys import EdgeKeys, KeyLookupUnavailable, KeyRecord
from throttlex.ingest.middleware import KEY_CACHED_MAX_CHARS, KEY_IDS_CACHED
from throttlex.ingest.producer import EventProducer
from throttlex.ingest.routes import UNMATCHED
from throttlex.ingest.settings import GatewaySettings

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

KEY_LOOKUP_TIMEOUT_S = 2.0
"""Longest a request waits for Redis to answer about a key it has not seen (then 503, as at the ASGI edge)."""
ROUTES_CACHED = 4096
"""Flask apps: (path, method) pairs whose matched route is kept (least recently used dropped first)."""


class _Edge:
    """The caches and the producer of one server process, on their event loop thread."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._pid = os.getpid()
        self._events: deque[UsageEvent] = deque()
        """Events request threads handed over, until the loop's next drain (deque appends and pops are atomic)."""
        self._drain_scheduled = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="throttlex-edge", daemon=True)
        self._thread.start()
        try:  # up to ~15 s when Kafka or Redis do not answer: the producer and the caches start anyway
            self.producer, self.denylist, self.keys = asyncio.run_coroutine_threadsafe(self._start(settings), self.loop).result(60)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
            raise
        atexit.register(self.stop)

    @staticmethod
    async def _start(settings: GatewaySettings) -> tuple[EventProducer, EdgeDenylist, EdgeKeys | None]:
        producer = EventProducer(settings.kafka, settings.events_topic, linger_ms=settings.producer_linger_ms,
                                 buffer_max_events=settings.producer_buffer_max_events)  # fmt: skip
        denylist = EdgeDenylist(settings.redis_url, settings.redis_prefix, fail_mode=settings.edge_fail_mode,
                                fail_after_s=settings.edge_fail_after_s,
                                resync_interval_s=settings.edge_resync_interval_s)  # fmt: skip
        keys = None
        if settings.edge_keys == "registry":
            keys = EdgeKeys(settings.redis_url, settings.redis_prefix, unknown_size=settings.edge_unknown_keys_cached,
                            unknown_ttl_s=settings.edge_unknown_key_ttl_s)  # fmt: skip
        await producer.start()
        await denylist.start()
        if keys is not None:
            await keys.start()
        return producer, denylist, keys

    def usable(self, key_id: str) -> KeyRecord | None:
        """`EdgeKeys.usable`, asked on the loop (it may ask Redis) and waited for here."""
        assert self.keys is not None
        lookup = asyncio.run_coroutine_threadsafe(self.keys.usable(key_id), self.loop)
        try:
            return lookup.result(KEY_LOOKUP_TIMEOUT_S)
        except TimeoutError as exc:
            lookup.cancel()
            raise KeyLookupUnavailable(f"no answer from Redis in {KEY_LOOKUP_TIMEOUT_S} s") from exc

    def forget_later(self, limit_key: str) -> None:
        """An expired block a request thread came across: dropped on the loop, which alone changes the cache."""
        self.loop.call_soon_threadsafe(self.denylist.forget_if_expired, limit_key)

    def emit(self, event: UsageEvent) -> None:
        """Hand ``event`` to the loop. Under load one wake-up of the loop takes every event queued by
        then, instead of one wake-up (a write to the loop's self-pipe, a turn of the loop) per request."""
        self._events.append(event)  # before looking at the flag: a drain that has already cleared it takes the event
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False  # before taking: an event queued from now on schedules another drain
        events, emit = self._events, self.producer.emit
        while events:
            emit(events.popleft())

    def stop(self) -> None:
        """Deliver what the producer holds (waiting for Kafka at most 10 s) and stop the loop. Only in the
        process that started it: a child forked after it inherits this exit handler, not the loop thread."""
        if os.getpid() != self._pid:
            return

        async def stop() -> None:
            self._drain()
            if self.keys is not None:
                await self.keys.stop()
            await self.denylist.stop()
            await self.producer.stop(timeout_s=10)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
            self.loop.call_soon_threadsafe(self.loop.stop)


class ThrottleXWSGIMiddleware:
    """Refuses blocked keys (429 with ``Retry-After``), and with registry keys unknown ones (401), before
    the app runs; emits one usage event per accounted request after the app has answered."""

    def __init__(
        self,
        app: WSGIApp,
        settings: GatewaySettings,
        *,
        route_of: Callable[[Environ], str] | None = None,
        public_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self._settings = settings
        self._source = f"gateway:{settings.gateway_name}"
        self._route_of = route_of or _flask_routes(app) or (lambda environ: UNMATCHED)
        self._public = public_paths
        self._client = ClientAddress(settings.trusted_proxy_list)
        self._header = "HTTP_" + settings.api_key_header.upper().replace("-", "_")
        self._key_id = lru_cache(maxsize=KEY_IDS_CACHED)(partial(key_id_for, salt=settings.key_salt_bytes))
        self._edge: _Edge | None = None
        self._edge_pid = 0
        self._starting = threading.Lock()
        self._counting = threading.Lock()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in self._public:
            return self.app(environ, start_response)
        edge = self._edge if self._edge is not None and self._edge_pid == os.getpid() else self._start_edge()
        api_key = environ.get(self._header)
        if api_key is None and edge.keys is None:
            self._count("unauthenticated")
            return self.app(environ, start_response)
        if api_key is None:
            return self._refuse(start_response, 401, f"missing API key: send it in the {self._settings.api_key_header} header")
        key_id = self._key_id(api_key) if len(api_key) <= KEY_CACHED_MAX_CHARS else key_id_for(api_key, self._settings.key_salt_bytes)
        tenant, plan = self._settings.tenant, ""
        if edge.keys is not None:
            record = edge.keys.cached(key_id, count=False)
            if record is not None:
                self._count("cache", metrics.KEY_LOOKUPS)
            else:
                try:
                    record = edge.usable(key_id)
                except KeyLookupUnavailable:
                    return self._refuse(start_response, 503, "cannot check the API key now; try again")
            if record is None:
                return self._refuse(start_response, 401, "unknown, suspended, revoked or expired API key")
            tenant, plan = record.tenant, record.plan
        received_ms, started = wall_clock_ms(), time.perf_counter()
        client_ip, route, method = environ.get("REMOTE_ADDR", ""), self._route(environ), environ.get("REQUEST_METHOD", "GET")
        if self._client.enabled:
            client_ip = self._client.of(client_ip, environ.get("HTTP_X_FORWARDED_FOR"), environ.get("HTTP_FORWARDED"))
        event = partial(UsageEvent, api_key_id=key_id, tenant=tenant, plan=plan, route=route, method=method,
                        client_ip=client_ip, event_time_ms=received_ms, source=self._source)  # fmt: skip
        block = edge.denylist.check({"api_key": key_id, "tenant": tenant, "ip": client_ip, "route": route, "method": method},
                                    on_expired=edge.forget_later)  # fmt: skip
        if edge.denylist.refusing or block is not None:
            status, message = (503, "rate limiter unavailable; try again") if edge.denylist.refusing else (429, "rate limit exceeded")
            self._count("refused_unavailable" if status == 503 else "blocked")
            block = block if status == 429 and block is not None else Block("", received_ms + 1_000, "")
            body = _blocked_body(start_response, status, block, received_ms, message)
            edge.emit(event(event_id=new_event_id(), status=status, latency_ms=(time.perf_counter() - started) * 1000.0,
                            response_bytes=len(body), edge_blocked=True))  # fmt: skip
            return [body]
        self._count("admitted")
        return _Metered(self.app, environ, start_response, lambda status, sent: edge.emit(event(
            event_id=new_event_id(), status=status, latency_ms=(time.perf_counter() - started) * 1000.0, response_bytes=sent)))  # fmt: skip

    def _route(self, environ: Environ) -> str:
        """The request's route template; `UNMATCHED` when no route takes it (a ``route_of`` that raises,
        such as Django's ``resolve`` on an unknown path, included)."""
        try:
            return self._route_of(environ)
        except Exception:
            return UNMATCHED

    def _start_edge(self) -> _Edge:
        with self._starting:
            if self._edge is None or self._edge_pid != os.getpid():
                self._edge = _Edge(self._settings)
                self._edge_pid = os.getpid()
            return self._edge

    def _count(self, label: str, counter: metrics.RequestPathCounter = metrics.REQUESTS) -> None:
        """Add one to a request-path counter; request threads add under a lock (``+=`` on a dict is not atomic)."""
        with self._counting:
            counter.counts[label] += 1

    def _refuse(self, start_response: StartResponse, status: int, message: str) -> list[bytes]:
        """Answer a request that is not let through and not accounted (no usable key)."""
        self._count("unauthorized" if status == 401 else "key_check_unavailable")
        body = msgspec.json.encode({"error": message})
        extra = ("WWW-Authenticate", "ApiKey") if status == 401 else ("Retry-After", "1")
        start_response(_STATUS_LINES[status], [("Content-Type", "application/json"), ("Content-Length", str(len(body))), extra])
        return [body]


_STATUS_LINES = {401: "401 Unauthorized", 429: "429 Too Many Requests", 503: "503 Service Unavailable"}


def _blocked_body(start_response: StartResponse, status: int, block: Block, now_ms: int, message: str) -> bytes:
    retry_after_s = max(1, math.ceil((block.until_ms - now_ms) / 1000))
    body = msgspec.json.encode({"error": message, "policy": block.policy, "retry_after_s": retry_after_s,
                                "blocked_until_ms": block.until_ms})  # fmt: skip
    start_response(_STATUS_LINES[status], [("Content-Type", "application/json"), ("Retry-After", str(retry_after_s)),
                                           ("Content-Length", str(len(body)))])  # fmt: skip
    return body


class _Metered:
    """The app's response, passed through; when the server closes it (the response is sent, or the
    client went away), the status and the bytes sent are reported once."""

    def __init__(self, app: WSGIApp, environ: Environ, start_response: StartResponse, done: Callable[[int, int], None]) -> None:
        self._status = 500  # until the app starts a response: one that raises before it gets a 500
        self._sent = 0
        self._done = done

        def metered_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            self._status = int(status.split(" ", 1)[0])
            return start_response(status, headers, exc_info) if exc_info is not None else start_response(status, headers)

        try:
            self._response = app(environ, metered_start)
        except BaseException:
            done(self._status, 0)
            raise

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._response:
            self._sent += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._response, "close", None)
            if close is not None:
                close()
        finally:
            self._done(self._status, self._sent)


def _flask_routes(app: WSGIApp) -> Callable[[Environ], str] | None:
    """For a Flask app's ``wsgi_app`` (or the app itself): the rule its URL map matches, e.g.
    ``/items/<int:item_id>``; ``unmatched`` when none does. None for any other app."""
    flask_app = getattr(app, "__self__", app)
    url_map = getattr(flask_app, "url_map", None)
    if url_map is None or not hasattr(url_map, "bind_to_environ"):
        return None

    def rule_of(bound: Any, path: str | None = None, method: str | None = None) -> str:
        """The rule ``bound`` (a werkzeug MapAdapter) matches; for the environ it was bound to by default."""
        try:
            rule, _ = bound.match(path, method, return_rule=True)
        except Exception:  # werkzeug's NotFound, MethodNotAllowed, RequestRedirect: the app answers those
            return UNMATCHED
        return str(rule.rule)

    @cache
    def adapter() -> Any:
        """One adapter, bound on the first request (Flask takes no routes after it): binding one per request
        cost as much as the match. None when the map matches hosts or subdomains, which depend on the request."""
        by_host = url_map.host_matching or url_map.default_subdomain or any(rule.subdomain for rule in url_map.iter_rules())
        return None if by_host else url_map.bind("localhost")

    @lru_cache(maxsize=ROUTES_CACHED)
    def matched(path: str, method: str) -> str:
        return rule_of(adapter(), path.encode("latin-1").decode("utf-8", "replace"), method)

    def route_of(environ: Environ) -> str:
        """The rule for the request's path (as werkzeug reads it: UTF-8 bytes the server passed as latin-1)."""
        if adapter() is not None:  # werkzeug's matcher takes ~12 µs a request here: paths seen lately are cached
            return matched(environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET"))
        return rule_of(url_map.bind_to_environ(environ))

    return route_of
