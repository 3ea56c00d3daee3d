"""A small Flask API behind the ThrottleX WSGI middleware, as a Flask team would write it: served by
waitress in `test_wsgi.py`, its settings from the ``THROTTLEX_*`` variables."""

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

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

# The same app behind werkzeug's ProxyFix (one proxy in front: REMOTE_ADDR becomes the last X-Forwarded-For hop),
# outside the ThrottleX middleware as a Flask team would add it: for the trusted-proxies test.
proxied = Flask(__name__)
proxied.add_url_rule("/healthz", view_func=healthz)
proxied.add_url_rule("/items/<int:item_id>", view_func=item)
proxied.wsgi_app = ProxyFix(  # type: ignore[method-assign]
    ThrottleXWSGIMiddleware(proxied.wsgi_app, GatewaySettings(), public_paths=frozenset({"/healthz"})), x_for=1
)
