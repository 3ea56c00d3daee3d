"""Every role as its own process (worker, sink, API, gateway): after a short run, each metric the
README documents is on its role's /metrics, and the ones traffic drives have moved."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EventSender, RoleProcess, Sandbox, eventually, free_port, register_keys

pytestmark = pytest.mark.e2e

README = Path(__file__).parents[2] / "README.md"


def documented() -> dict[str, set[str]]:
    """Metric name (as exported: counters with ``_total``) to the roles the README lists it under."""
    rows = re.findall(r"^\| `(throttlex_[a-z_]+)(?:\{[^}]*\})?` \| ([a-z, ]+) \|", README.read_text(), re.MULTILINE)
    return {name: {role.strip() for role in roles.split(",")} for name, roles in rows}


async def scrape(url: str) -> dict[str, float]:
    """Per metric family on ``url``: the sum of its series (a histogram's: its count), keyed by the
    name the README uses (counters with ``_total``)."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(url)).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        totals[name] = sum(s.value for s in family.samples if not s.name.endswith(("_created", "_bucket", "_sum")))
    return totals


async def test_every_documented_metric_is_exported_and_traffic_moves_them(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], producer: EventSender
) -> None:
    await register_keys(sandbox, {"metrics-hot-key": "default"})
    ports = {role: free_port() for role in ("worker", "sink", "api", "gateway")}
    policy = str(sandbox.write_policy(limit=10, window_s=60))
    fast = {"THROTTLEX_RECONCILE_INTERVAL_S": "1", "THROTTLEX_RECONCILE_SETTLE_S": "1"}
    spawn("worker", "--policy-file", policy, extra_env={"THROTTLEX_METRICS_PORT": str(ports["worker"])})
    spawn("sink", extra_env={"THROTTLEX_METRICS_PORT": str(ports["sink"]), **fast})
    spawn("api", "--policy-file", policy, "--api-port", str(ports["api"]))
    spawn("gateway", "--port", str(ports["gateway"]))
    urls = {
        "worker": f"http://127.0.0.1:{ports['worker']}/metrics",
        "sink": f"http://127.0.0.1:{ports['sink']}/metrics",
        "api": f"http://127.0.0.1:{ports['api']}/metrics",
        "gateway": f"http://127.0.0.1:{ports['gateway']}/metrics",
    }

    async def all_up() -> bool:
        try:
            await asyncio.gather(*(scrape(url) for url in urls.values()))
            return True
        except httpx.TransportError:
            return False

    await eventually(all_up, timeout_s=60, what="every role to serve /metrics")

    await producer(b"not an event", key=b"k")  # one for the dead-letter topic
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['gateway']}", timeout=5) as gateway, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['api']}", timeout=5) as api:  # fmt: skip

        async def blocked_at_the_edge() -> bool:
            response = await gateway.get("/v1/items/1", headers={"x-api-key": "metrics-hot-key"})
            await asyncio.sleep(0.05)
            return response.status_code == 429

        await eventually(blocked_at_the_edge, timeout_s=30, what="the hot key to be refused at the edge")
        await gateway.get("/v1/items/1")  # no key: refused with 401
        await api.get("/v1/quota", headers={"x-api-key": "metrics-hot-key"})
        await api.get("/v1/quota")  # no credentials
        await api.post("/v1/events", content=b"[]", headers={"authorization": "Bearer nobody"})

    moving = {
        "gateway": ["throttlex_gateway_requests_total", "throttlex_gateway_events_produced_total",
                    "throttlex_edge_sync_lag_seconds", "throttlex_edge_resyncs_total"],
        "worker": ["throttlex_worker_events_total", "throttlex_worker_dead_letters_total",
                   "throttlex_worker_decisions_total", "throttlex_worker_processing_seconds"],
        "sink": ["throttlex_sink_rows_total", "throttlex_sink_insert_seconds", "throttlex_sink_skipped_total",
                 "throttlex_reconciliation_windows_total"],
        "api": ["throttlex_api_quota_reports_total", "throttlex_api_auth_failures_total"],
    }  # fmt: skip

    still: list[str] = []

    async def moved() -> bool:
        scraped = {role: await scrape(url) for role, url in urls.items()}
        still[:] = [f"{role}:{name}" for role, names in moving.items() for name in names if scraped[role].get(name, 0) <= 0]
        return not still

    try:
        await eventually(moved, timeout_s=30, what="the metrics traffic drives to move")
    except pytest.fail.Exception:
        pytest.fail(f"these metrics did not move: {still}")

    scraped = {role: await scrape(url) for role, url in urls.items()}
    names = documented()
    assert len(names) >= 25
    for name, roles in names.items():
        for role in roles:
            assert name in scraped[role], f"{name} is documented for the {role} but not on its /metrics"
    assert scraped["worker"]["throttlex_worker_active_blocks"] >= 1
    assert "throttlex_consumer_lag_events" in scraped["worker"] and "throttlex_consumer_lag_events" in scraped["sink"]
