"""The ASGI middleware in front of a small Starlette app, against the real Kafka and Redis."""

from __future__ import annotations

import asyncio

import httpx
from aiokafka import AIOKafkaConsumer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ingest.denylist import EdgeDenylist
from ingest.events import UsageEvent, decode, key_id_for
from ingest.middleware import ThrottleXMiddleware
from ingest.producer import EventProducer
from processors.topics import ensure_topics
from tests.conftest import EVENTS_PARTITIONS, Sandbox, eventually

SALT = b"middleware-test-salt"


async def fine(request: Request) -> PlainTextResponse:
    return PlainTextResponse("fine")


async def broken(request: Request) -> PlainTextResponse:
    raise RuntimeError("a defect in the handler")


async def test_a_handler_that_raises_is_counted_as_a_500_and_billed(sandbox: Sandbox) -> None:
    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    await ensure_topics(sandbox.kafka_bootstrap, {topic: EVENTS_PARTITIONS})
    producer = EventProducer(sandbox.kafka_bootstrap, topic)
    denylist = EdgeDenylist(sandbox.redis_url, sandbox.env["THROTTLEX_REDIS_PREFIX"])
    await producer.start()
    await denylist.start()
    app = ThrottleXMiddleware(
        Starlette(routes=[Route("/fine", fine), Route("/broken", broken)]), denylist=denylist, producer=producer, key_salt=SALT
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://gw") as client:
            assert (await client.get("/fine", headers={"x-api-key": "caller"})).status_code == 200
            assert (await client.get("/broken", headers={"x-api-key": "caller"})).status_code == 500
        await eventually(lambda: producer.undelivered == 0, timeout_s=30, what="both events to be delivered")
    finally:
        await denylist.stop()
        await producer.stop()

    events: list[UsageEvent] = []
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=sandbox.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while len(events) < 2:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    events += [decode(record.value or b"") for record in records]
    finally:
        await consumer.stop()
    assert sorted((event.route, event.status, event.api_key_id) for event in events) == [
        ("/broken", 500, key_id_for("caller", SALT)),
        ("/fine", 200, key_id_for("caller", SALT)),
    ]
