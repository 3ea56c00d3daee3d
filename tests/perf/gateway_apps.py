"""The gateways compared in the gateway benchmark, all serving the same route: the bare app (no rate
limiter), the app behind ThrottleX's middleware (keys checked against the registry, or any key
admitted), and the app behind slowapi (the `limits` library on the same Redis, moving window,
checked per request).

Run with uvicorn's ``--factory``; settings come from ``THROTTLEX_*`` variables. For the WSGI middleware, the
same route in Flask, bare and behind ThrottleX (waitress's ``--call``).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from flask import Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded

from throttlex.api.demo_gateway import create_gateway_app
from throttlex.ingest.settings import GatewaySettings
from throttlex.ingest.wsgi import ThrottleXWSGIMiddleware

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


def flask_bare_app() -> Flask:
    app = Flask("bare")

    @app.get("/v1/items/<int:item_id>")
    def item(item_id: int) -> dict[str, int | str]:
        return {"id": item_id, "name": f"item {item_id}"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)

    return app


def flask_throttlex_app() -> Flask:
    app = flask_bare_app()
    app.wsgi_app = ThrottleXWSGIMiddleware(app.wsgi_app, GatewaySettings(edge_keys="registry"),  # type: ignore[method-assign]
                                           public_paths=frozenset({"/metrics"}))  # fmt: skip
    return app
