"""The WSGI middleware in front of a real Flask app under a real WSGI server (waitress, several threads),
against the real Kafka and Redis: registered keys pass and each request's event reaches the topic with the
Flask route's template, a blocked key gets 429 with ``Retry-After`` (its refusals accounted as edge
blocked), an unknown key gets 401 and no event."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist_entries import Block
from throttlex.processors.topics import ensure_topics
from throttlex.processors.worker.denylist_writer import DenylistWriter
from tests.conftest import EVENTS_PARTITIONS, Sandbox, eventually, free_port, events_on_topic, register_keys

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SERVE = "import signal, sys; from waitress.runner import run; signal.signal(signal.SIGINT, signal.default_int_handler); run(sys.argv)"
"""waitress's command line, stopped by SIGINT as by Ctrl-C in a terminal. A process a non-interactive shell
starts in the background (a CI runner's, say) inherits SIGINT ignored, and Python then sets no handler of
its own: waitress would never stop."""


@asynccontextmanager
async def _waitress(sandbox: Sandbox, log: Path, app: str, *options: str, env: dict[str, str] | None = None) -> AsyncIterator[int]:
    """waitress serving ``app`` (``module:attribute``) with the sandbox's settings, once it answers: its port.
    Stopped with SIGINT, so the events still held are delivered first."""
    port = free_port()
    with log.open("wb") as output:
        server = subprocess.Popen([sys.executable, "-c", SERVE, f"--port={port}", *options, app], cwd=ROOT,
                                  env={**os.environ, **sandbox.env, **(env or {})}, stdout=output, stderr=output)  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def serving() -> bool:  # a public path: the middleware's edge is not started by it
                assert server.poll() is None, log.read_text()
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(serving, timeout_s=60, what="waitress to serve the Flask app")
        yield port
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            pytest.fail(f"waitress did not exit within 30 s of SIGINT:\n{log.read_text()[-3000:]}")


async def test_a_flask_app_under_waitress_blocks_refuses_and_accounts_every_request(sandbox: Sandbox, tmp_path: Path) -> None:
    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    await ensure_topics(sandbox.kafka_bootstrap, {topic: EVENTS_PARTITIONS})
    ids = await register_keys(sandbox, {"wsgi-calm-key": "acme", "wsgi-hot-key": "acme"})
    statuses: Counter[tuple[str, int]] = Counter()
    redis = Redis.from_url(sandbox.redis_url)
    try:
        async with (_waitress(sandbox, tmp_path / "waitress.log", "tests.integration.wsgi_app:app", "--threads=8") as port,
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http):  # fmt: skip

            async def get(key: str, item: int = 1) -> httpx.Response:
                response = await http.get(f"/items/{item}", headers={"x-api-key": key})
                statuses[key, response.status_code] += 1
                return response

            with ThreadPoolExecutor(8) as pool:  # the first requests, on the server's threads at once: the edge starts
                concurrent = list(pool.map(lambda n: httpx.get(f"http://127.0.0.1:{port}/items/{n}", timeout=30,
                                                               headers={"x-api-key": "wsgi-calm-key"}).status_code, range(40)))  # fmt: skip
            statuses["wsgi-calm-key", 200] += concurrent.count(200)
            assert concurrent == [200] * 40

            unknown = await get("not-a-registered-key")
            assert unknown.status_code == 401 and unknown.headers["www-authenticate"] == "ApiKey"

            block = Block(f"api_key={ids['wsgi-hot-key']}", wall_clock_ms() + 30_000, "wsgi-test")
            assert await DenylistWriter(redis, sandbox.env["THROTTLEX_REDIS_PREFIX"]).publish([block]) == 1

            async def refused() -> bool:
                return (await get("wsgi-hot-key")).status_code == 429

            await eventually(refused, timeout_s=10, what="the hot key to be refused")
            refusal = await get("wsgi-hot-key")
            assert refusal.status_code == 429 and 0 < int(refusal.headers["retry-after"]) <= 30
            assert refusal.json()["policy"] == "wsgi-test"

    finally:
        await redis.aclose()
    expected = {"calm": statuses["wsgi-calm-key", 200], "hot_admitted": statuses["wsgi-hot-key", 200],
                "hot_refused": statuses["wsgi-hot-key", 429]}  # fmt: skip
    events = await events_on_topic(sandbox, topic)
    calm = [e for e in events if e.api_key_id == ids["wsgi-calm-key"]]
    hot = [e for e in events if e.api_key_id == ids["wsgi-hot-key"]]
    assert len(events) == len(calm) + len(hot), "an unknown key's request was accounted"
    assert len(calm) == expected["calm"] and {(e.route, e.tenant, e.status, e.edge_blocked) for e in calm} == {
        ("/items/<int:item_id>", "acme", 200, False)}  # fmt: skip
    assert sum(e.edge_blocked for e in hot) == expected["hot_refused"] and {e.status for e in hot if e.edge_blocked} == {429}
    assert len(hot) == expected["hot_refused"] + expected["hot_admitted"]


@pytest.mark.parametrize("app", ["app", "proxied"], ids=["remote-addr-as-served", "werkzeug-proxyfix"])
async def test_behind_a_trusted_proxy_the_client_is_read_from_x_forwarded_for_once(sandbox: Sandbox, tmp_path: Path, app: str) -> None:
    """A request through one proxy (127.0.0.1, in THROTTLEX_TRUSTED_PROXIES) whose caller wrote an address of
    its own into X-Forwarded-For: its event carries the caller the proxy saw, whether ProxyFix already took it
    from the header or not."""
    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    await ensure_topics(sandbox.kafka_bootstrap, {topic: EVENTS_PARTITIONS})
    await register_keys(sandbox, {"wsgi-proxied-key": "acme"})
    # waitress drops forwarding headers from peers it does not trust itself; here the app handles them
    options = ("--no-clear-untrusted-proxy-headers",)
    trusted = {"THROTTLEX_TRUSTED_PROXIES": "127.0.0.1"}
    async with _waitress(sandbox, tmp_path / "waitress.log", f"tests.integration.wsgi_app:{app}", *options, env=trusted) as port:
        headers = {"x-api-key": "wsgi-proxied-key", "x-forwarded-for": "198.51.100.9, 203.0.113.7"}
        assert httpx.get(f"http://127.0.0.1:{port}/items/1", headers=headers, timeout=30).status_code == 200
    assert [event.client_ip for event in await events_on_topic(sandbox, topic)] == ["203.0.113.7"]
