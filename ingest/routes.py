"""The route a request is counted, limited and stored under: its route template, never the raw path.

A raw path (``/v1/items/8841``) would give every item, and every path a scanner tries, a value of its own
in the rollups, the worker's state and the denylist. The middleware therefore asks the app's router, before
the app runs, which route the request will reach, and uses that route's template (``/v1/items/{item_id}``);
a request no route takes (a 404) is counted as `UNMATCHED`. The edge check and the event carry the same
value, so a policy keyed on ``route`` matches the same string at the edge and in the worker.

Starlette and FastAPI routers are read (their routes, including mounted sub-applications and routers).
An ASGI app without a router, and routes chosen by host name (``Host``), count every request as `UNMATCHED`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Scope

UNMATCHED = "unmatched"
"""The route of a request no route of the app takes."""
WEBSOCKET = "WEBSOCKET"
"""The method a WebSocket handshake is counted, limited and stored under (a handshake is an HTTP GET)."""

_CACHE_SIZE = 4096
"""Templates remembered per (method, path): the paths a scanner tries only push older ones out."""


class RouteTemplates:
    """The route template of each request to ``app``, resolved from its router and remembered per path."""

    def __init__(self, app: ASGIApp) -> None:
        self._routes = _routes_of(app)
        self._resolve = lru_cache(maxsize=_CACHE_SIZE)(self._template)

    def of(self, scope: Scope) -> str:
        """The template of the route that will take this HTTP request or WebSocket, or `UNMATCHED`."""
        if self._routes is None:
            routes = _routes_of(scope.get("app"))  # a middleware added inside a Starlette app: the app set it
            if routes is None:
                return UNMATCHED
            self._routes = routes
        return self._resolve(scope.get("method", WEBSOCKET), scope.get("root_path", ""), scope["path"])

    def _template(self, method: str, root_path: str, path: str) -> str:
        assert self._routes is not None
        kind = {"type": "websocket"} if method == WEBSOCKET else {"type": "http", "method": method}
        scope = {**kind, "root_path": root_path, "path": path, "headers": []}
        return _match(self._routes, scope) or UNMATCHED


def _routes_of(app: object) -> Sequence[BaseRoute] | None:
    routes = getattr(app, "routes", None)  # a Starlette or FastAPI app, or a router
    return routes if isinstance(routes, list) else None


def _match(routes: Sequence[BaseRoute], scope: Scope) -> str | None:
    """The template the router would pick, as it picks: the first full match, else the first route that matches
    the path but not the method (the router answers 405 from it)."""
    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount):
            inner = route.routes
            if not inner:  # a mounted ASGI app (static files, another framework): everything below its path
                return route.path_format
            found = _match(inner, {**scope, **child})
            return route.path + found if found is not None else None  # the mount answers 404 itself
        template = getattr(route, "path", None)
        if not isinstance(template, str):
            continue
        if match is Match.FULL:
            return template
        partial = partial or template
    return partial
