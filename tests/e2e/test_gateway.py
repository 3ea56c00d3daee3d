"""The whole pipeline: HTTP requests through a gateway with the middleware, `throttlex run`
(worker + sink + API in one process) on real Kafka, Redis and chDB, and the quota report."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from throttlex.api.demo_gateway import create_gateway_app
from throttlex.api.server import HttpServer
from throttlex.ingest.settings import GatewaySettings
from tests.conftest import RoleProcess, Sandbox, eventually, free_port, register_keys

pytestmark = pytest.mark.e2e

LIMIT, WINDOW_S = 20, 10


@pytest.fixture
async def pipeline(sandbox: Sandbox, spawn: Callable[..., RoleProcess]) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """(gateway client, API client) with `throttlex run` behind them, ready and processing."""
    api_port = free_port()
    await register_keys(sandbox, {key: "default" for key in ("hot-key", "calm-key", "metered-key", "warm-up")})
    role = spawn("run", "--policy-file", str(sandbox.write_policy(LIMIT, WINDOW_S)), "--api-port", str(api_port))
    gateway = HttpServer(create_gateway_app(sandbox.settings(GatewaySettings)), "127.0.0.1", free_port())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=5) as api:

        async def healthy() -> bool:
            try:
                return (await api.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(healthy, timeout_s=60, what="`throttlex run` to report healthy")
        await gateway.start()
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
                # One request end to end, so the worker is assigned and processing before the test starts.
                assert (await client.get("/v1/items/0", headers={"x-api-key": "warm-up"})).status_code == 200
                await eventually(lambda: used(api, "warm-up", 1), timeout_s=60, what="the first event to be counted")
                yield client, api
        finally:
            await gateway.stop()
    log = role.log()
    plain_keys = [key for key in ("hot-key", "calm-key", "metered-key", "warm-up") if key in log]
    assert not plain_keys, "plain API keys appear in the log"
    for line in log.splitlines():  # every line is a JSON log record
        assert {"time", "level", "logger", "message", "role"} <= json.loads(line).keys(), line


async def quota(api: httpx.AsyncClient, api_key: str) -> dict[str, Any]:
    response = await api.get("/v1/quota", headers={"x-api-key": api_key})
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


async def used(api: httpx.AsyncClient, api_key: str, expected: int) -> bool:
    return bool((await quota(api, api_key))["policies"][0]["used"] == expected)


async def test_over_limit_key_gets_429_within_a_second_and_quota_tells_the_truth(
    pipeline: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    gateway, api = pipeline
    hot_statuses: list[tuple[float, int]] = []
    calm_statuses: list[int] = []

    hot_done = asyncio.Event()

    async def hot() -> None:
        started = time.monotonic()
        while time.monotonic() - started < 6:
            response = await gateway.get("/v1/items/1", headers={"x-api-key": "hot-key"})
            hot_statuses.append((time.monotonic(), response.status_code))
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["policy"] == "test-limit"
            await asyncio.sleep(0.025)
        hot_done.set()

    async def calm() -> None:
        for k in range(5):  # spread over the hot key's requests: one every 40 of them
            await eventually(lambda: len(hot_statuses) >= 40 * k or hot_done.is_set(), timeout_s=10,
                             what="the hot key's requests to go on")  # fmt: skip
            calm_statuses.append((await gateway.get("/v1/search", headers={"x-api-key": "calm-key"})).status_code)

    await asyncio.gather(hot(), calm())

    admitted = [t for t, status in hot_statuses if status == 200]
    limited = [t for t, status in hot_statuses if status == 429]
    assert len(admitted) >= LIMIT and limited, hot_statuses
    crossed_at = admitted[LIMIT - 1]  # the request that filled the window
    assert limited[0] - crossed_at <= 1.0, f"first 429 came {limited[0] - crossed_at:.3f}s after crossing the limit"
    assert calm_statuses == [200] * 5

    hot_report = await quota(api, "hot-key")
    [hot_policy] = hot_report["policies"]
    assert hot_report["blocked_by"] == "test-limit"
    assert hot_report["blocked_until"] is not None
    assert hot_policy["limit"] == LIMIT and hot_policy["remaining"] == 0
    assert hot_policy["used"] >= LIMIT and hot_policy["blocked_until"] is not None

    await eventually(lambda: used(api, "calm-key", 5), timeout_s=5, what="all calm requests to be counted")
    calm_report = await quota(api, "calm-key")
    [calm_policy] = calm_report["policies"]
    assert calm_report["blocked_until"] is None and calm_policy["blocked_until"] is None
    assert calm_policy["remaining"] == LIMIT - 5


async def test_metrics_show_the_pipeline_moving(pipeline: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    gateway, api = pipeline
    for _ in range(LIMIT + 5):
        await gateway.get("/v1/items/2", headers={"x-api-key": "metered-key"})

    async def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = (await api.get("/metrics")).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def moving() -> bool:
        samples = await scraped()
        return (
            samples.get(("throttlex_worker_events_total", ()), 0) >= LIMIT
            and samples.get(("throttlex_worker_decisions_total", (("outcome", "block"), ("policy", "test-limit"))), 0) >= 1
            and samples.get(("throttlex_sink_rows_total", ()), 0) >= LIMIT
        )

    await eventually(moving, timeout_s=10, what="worker and sink metrics to count the traffic")


async def test_quota_needs_an_api_key(pipeline: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    _, api = pipeline
    response = await api.get("/v1/quota")
    assert response.status_code == 401
    assert "missing credentials" in response.json()["detail"]
