"""A small API behind the ThrottleX middleware, for the demo, the load generator and tests.

It shows the whole gateway integration: build an `EventProducer`, an `EdgeDenylist` and (unless keys
are checked elsewhere) an `EdgeKeys` cache, start them in the app's lifespan, and add
`ThrottleXMiddleware` in front of the routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.keys import EdgeKeys
from throttlex.ingest.middleware import ThrottleXMiddleware
from throttlex.ingest.producer import EventProducer
from throttlex.ingest.settings import GatewaySettings


def create_gateway_app(settings: GatewaySettings) -> FastAPI:
    producer = EventProducer(
        settings.kafka, settings.events_topic,
        linger_ms=settings.producer_linger_ms, buffer_max_events=settings.producer_buffer_max_events,
    )  # fmt: skip
    denylist = EdgeDenylist(
        settings.redis_url, settings.redis_prefix,
        fail_mode=settings.edge_fail_mode, fail_after_s=settings.edge_fail_after_s,
        resync_interval_s=settings.edge_resync_interval_s,
    )  # fmt: skip
    keys = None
    if settings.edge_keys == "registry":
        keys = EdgeKeys(
            settings.redis_url, settings.redis_prefix,
            unknown_size=settings.edge_unknown_keys_cached, unknown_ttl_s=settings.edge_unknown_key_ttl_s,
        )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await producer.start()
        await denylist.start()
        if keys is not None:
            await keys.start()
        try:
            yield
        finally:
            if keys is not None:
                await keys.stop()
            await denylist.stop()
            await producer.stop()

    app = FastAPI(title="ThrottleX demo gateway", lifespan=lifespan)
    app.state.producer = producer  # its buffer, for operators' tooling and the fault tests
    app.add_middleware(
        ThrottleXMiddleware,
        denylist=denylist,
        producer=producer,
        key_salt=settings.key_salt_bytes,
        keys=keys,
        public_paths=frozenset({"/metrics"}),
        tenant=settings.tenant,
        gateway_name=settings.gateway_name,
        api_key_header=settings.api_key_header,
        trusted_proxies=settings.trusted_proxy_list,
    )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/items/{item_id}")
    async def item(item_id: int) -> dict[str, int | str]:
        return {"id": item_id, "name": f"item {item_id}"}

    @app.get("/v1/search")
    async def search(q: str = "") -> dict[str, list[str]]:
        return {"results": [f"{q} {n}" for n in range(3)]}

    return app
