"""The ASGI middleware in front of a small Starlette app, against the real Kafka and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from redis.asyncio import Redis
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.denylist_entries import Block, event_limit_key
from throttlex.ingest.events import UsageEvent, decode, key_id_for
from throttlex.ingest.keys import EdgeKeys
from throttlex.ingest.middleware import ThrottleXMiddleware
from throttlex.ingest.settings import ConnectionSettings
from throttlex.api.server import HttpServer
from throttlex.processors.registry import issue_key, open_registry
from throttlex.ingest.producer import EventProducer
from throttlex.ingest.routes import UNMATCHED
from throttlex.processors.worker.denylist_writer import DenylistWriter
from throttlex.processors.topics import ensure_topics
from tests.conftest import EVENTS_PARTITIONS, Sandbox, eventually, free_port

SALT = b"middleware-test-salt"


async def fine(request: Request) -> PlainTextResponse:
    return PlainTextResponse("fine")


async def broken(request: Request) -> PlainTextResponse:
    raise RuntimeError("a defect in the handler")


async def test_a_handler_that_raises_is_counted_as_a_500_and_billed(sandbox: Sandbox) -> None:
    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    async with _gateway(sandbox, Starlette(routes=[Route("/fine", fine), Route("/broken", broken)])) as client:
        assert (await client.get("/fine", headers={"x-api-key": "caller"})).status_code == 200
        assert (await client.get("/broken", headers={"x-api-key": "caller"})).status_code == 500
    events = await _events(sandbox, topic, 2)
    assert sorted((event.route, event.status, event.api_key_id) for event in events) == [
        ("/broken", 500, key_id_for("caller", SALT)),
        ("/fine", 200, key_id_for("caller", SALT)),
    ]


async def test_requests_are_counted_under_their_route_template_and_blocked_on_it(sandbox: Sandbox) -> None:
    """Raw paths never reach the events (a scanner's paths would each become a route of their own): a routed
    request carries its template, one no route takes carries `unmatched`; and a block keyed on the route an
    event carried, as the worker writes it, refuses the route's other paths at the edge."""
    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    app = Starlette(routes=[Route("/v1/items/{item_id}", fine), Mount("/v2", routes=[Route("/things/{thing}", fine)])])
    paths = [("GET", "/v1/items/1"), ("GET", "/v1/items/2"), ("POST", "/v1/items/3"), ("GET", "/v2/things/x"),
             ("GET", "/.env"), ("GET", "/wp-admin/setup.php"), ("GET", "/v2/nothing/here")]  # fmt: skip
    async with _gateway(sandbox, app) as client:
        statuses = [(await client.request(method, path, headers={"x-api-key": "scanner"})).status_code for method, path in paths]
    assert statuses == [200, 200, 405, 200, 404, 404, 404]
    events = await _events(sandbox, topic, len(paths))
    assert sorted((event.method, event.route, event.status) for event in events) == [
        ("GET", "/v1/items/{item_id}", 200), ("GET", "/v1/items/{item_id}", 200), ("GET", "/v2/things/{thing}", 200),
        ("GET", UNMATCHED, 404), ("GET", UNMATCHED, 404), ("GET", UNMATCHED, 404), ("POST", "/v1/items/{item_id}", 405),
    ]  # fmt: skip
    [item] = [event for event in events if event.status == 200 and event.route.startswith("/v1/")][:1]

    redis = Redis.from_url(sandbox.redis_url)
    writer = DenylistWriter(redis, sandbox.env["THROTTLEX_REDIS_PREFIX"])
    block = Block(event_limit_key(("route",), item), wall_clock_ms() + 60_000, "per-route", dims=("route",))
    try:
        assert await writer.publish([block]) == 1
        async with _gateway(sandbox, app) as client:
            async def refused() -> bool:
                return (await client.get("/v1/items/77", headers={"x-api-key": "other"})).status_code == 429

            await eventually(refused, timeout_s=10, what="the route block at the edge")
            assert (await client.get("/v2/things/y", headers={"x-api-key": "other"})).status_code == 200
    finally:
        await redis.aclose()


@asynccontextmanager
async def _edge(sandbox: Sandbox) -> AsyncIterator[tuple[EventProducer, EdgeDenylist]]:
    """A real producer to the sandbox's events topic and a real edge denylist; every event delivered on exit."""
    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    await ensure_topics(sandbox.kafka_bootstrap, {topic: EVENTS_PARTITIONS})
    producer = EventProducer(sandbox.kafka_bootstrap, topic)
    denylist = EdgeDenylist(sandbox.redis_url, sandbox.env["THROTTLEX_REDIS_PREFIX"])
    await producer.start()
    await denylist.start()
    try:
        yield producer, denylist
        await eventually(lambda: producer.undelivered == 0, timeout_s=30, what="every event to be delivered")
    finally:
        await denylist.stop()
        await producer.stop()


@asynccontextmanager
async def _gateway(sandbox: Sandbox, app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` behind the middleware (`_edge`), called in-process."""
    async with _edge(sandbox) as (producer, denylist):
        gateway = ThrottleXMiddleware(app, denylist=denylist, producer=producer, key_salt=SALT)
        transport = httpx.ASGITransport(gateway, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


async def _events(sandbox: Sandbox, topic: str, count: int) -> list[UsageEvent]:
    events: list[UsageEvent] = []
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=sandbox.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while len(events) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    events += [decode(record.value or b"") for record in records]
    finally:
        await consumer.stop()
    assert len(events) == count
    return events


async def test_a_websocket_handshake_is_checked_limited_and_accounted_like_a_request(sandbox: Sandbox) -> None:
    """Through uvicorn, with registered keys only: a handshake without a key, or with a blocked one, is refused
    (an HTTP answer through the server's denial response extension) and only the blocked one is accounted; an
    accepted one carries its route template and the method WEBSOCKET on its event, with status 101."""
    settings = sandbox.settings(ConnectionSettings)
    topic, prefix = sandbox.env["THROTTLEX_EVENTS_TOPIC"], sandbox.env["THROTTLEX_REDIS_PREFIX"]

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    redis = Redis.from_url(sandbox.redis_url)
    keys = EdgeKeys(sandbox.redis_url, prefix)
    await keys.start()
    try:
        async with _edge(sandbox) as (producer, denylist):
            app = ThrottleXMiddleware(Starlette(routes=[WebSocketRoute("/ws/{room}", echo)]), denylist=denylist,
                                      producer=producer, key_salt=settings.key_salt_bytes, keys=keys)  # fmt: skip
            server = HttpServer(app, "127.0.0.1", free_port())
            await server.start()
            url = server.url.replace("http://", "ws://") + "/ws/lobby"
            try:
                async with open_registry(settings) as registry:
                    plain, record = await issue_key(registry, settings.key_salt_bytes, tenant="acme")
                with pytest.raises(InvalidStatus) as missing:
                    async with connect(url):
                        pass
                assert missing.value.response.status_code == 401

                async with connect(url, additional_headers={"x-api-key": plain}) as websocket:
                    await websocket.send("hello")
                    assert await websocket.recv() == "hello"

                block = Block(f"api_key={record.key_id}", wall_clock_ms() + 60_000, "per-key", dims=("api_key",))
                assert await DenylistWriter(redis, prefix).publish([block]) == 1
                await eventually(lambda: denylist.check({"api_key": record.key_id}) is not None, timeout_s=10, what="the block")
                with pytest.raises(InvalidStatus) as blocked:
                    async with connect(url, additional_headers={"x-api-key": plain}):
                        pass
                assert blocked.value.response.status_code == 429
                assert int(blocked.value.response.headers["retry-after"]) >= 1
            finally:
                await server.stop()
    finally:
        await keys.stop()
        await redis.aclose()
    events = await _events(sandbox, topic, 2)
    assert sorted((e.method, e.route, e.status, e.edge_blocked, e.api_key_id, e.tenant) for e in events) == [
        ("WEBSOCKET", "/ws/{room}", 101, False, record.key_id, "acme"),
        ("WEBSOCKET", "/ws/{room}", 429, True, record.key_id, "acme"),
    ]


@pytest.mark.parametrize("server_rewrites", [False, True], ids=["server-leaves-peer", "uvicorn-forwarded-allow-ips"])
async def test_behind_a_trusted_proxy_the_client_is_read_from_x_forwarded_for_once(sandbox: Sandbox, server_rewrites: bool) -> None:
    """A request through one proxy (127.0.0.1, trusted) whose caller wrote an address of its own into
    X-Forwarded-For: the event carries the caller the proxy saw, whether uvicorn already took it from the
    header (its proxy headers on, trusting 127.0.0.1) or not; without trusted proxies, the peer."""
    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    async with _edge(sandbox) as (producer, denylist):
        for trusted in (["127.0.0.1"], []):
            app = ThrottleXMiddleware(Starlette(routes=[Route("/fine", fine)]), denylist=denylist, producer=producer,
                                      key_salt=SALT, trusted_proxies=trusted)  # fmt: skip
            server = HttpServer(app, "127.0.0.1", free_port(), proxy_headers=server_rewrites, forwarded_allow_ips="127.0.0.1")
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=server.url) as client:
                    headers = {"x-api-key": "caller", "x-forwarded-for": "198.51.100.9, 203.0.113.7"}
                    assert (await client.get("/fine", headers=headers)).status_code == 200
            finally:
                await server.stop()
    without_trust = "203.0.113.7" if server_rewrites else "127.0.0.1"  # what the server hands over, taken as it is
    assert sorted(event.client_ip for event in await _events(sandbox, topic, 2)) == sorted(["203.0.113.7", without_trust])
