"""The gateways compared in the gateway benchmark, all serving the same route: the bare app (no rate
limiter), the app behind ThrottleX's middleware (keys checked against the registry, or any key
admitted), and the app behind slowapi (the `limits` library on the same Redis, moving window,
checked per request).

Run with uvicorn's ``--factory``; settings come from ``THROTTLEX_*`` variables.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded

from throttlex.api.demo_gateway import create_gateway_app
from throttlex.ingest.settings import GatewaySettings

LIMIT = "1000000000/hour"  # never reached: every request does the full work of being admitted


def bare_app() -> FastAPI:
    app = FastAPI(title="the same route with no rate limiter")

    @app.get("/v1/items/{item_id}")
    async def item(item_id: int) -> dict[str, int | str]:
        return {"id": item_id, "name": f"item {item_id}"}

    return app


def throttlex_app() -> FastAPI:
    return create_gateway_app(GatewaySettings(edge_keys="registry"))


def throttlex_any_key_app() -> FastAPI:
    return create_gateway_app(GatewaySettings(edge_keys="any"))


def slowapi_app() -> FastAPI:
    settings = GatewaySettings()
    limiter = Limiter(
        key_func=lambda request: request.headers.get(settings.api_key_header, "anonymous"),
        strategy="moving-window",
        storage_uri=settings.redis_url,
        key_prefix="bench-slowapi",
    )
    app = FastAPI(title="the same route behind slowapi")
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]

    @app.get("/v1/items/{item_id}")
    @limiter.limit(LIMIT)
    async def item(request: Request, item_id: int) -> dict[str, int | str]:
        return {"id": item_id, "name": f"item {item_id}"}

    return app
