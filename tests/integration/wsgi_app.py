"""A small Flask API behind the ThrottleX WSGI middleware, as a Flask team would write it: served by
waitress in `test_wsgi.py`, its settings from the ``THROTTLEX_*`` variables."""

from flask import Flask

from throttlex.ingest.settings import GatewaySettings
from throttlex.ingest.wsgi import ThrottleXWSGIMiddleware

app = Flask(__name__)


@app.get("/healthz")
def healthz() -> str:
    return "ok"


@app.get("/items/<int:item_id>")
def item(item_id: int) -> dict[str, int]:
    return {"id": item_id}


app.wsgi_app = ThrottleXWSGIMiddleware(app.wsgi_app, GatewaySettings(), public_paths=frozenset({"/healthz"}))  # type: ignore[method-assign]
