"""throttlex-rls, the Envoy rate-limit service (Go), with a real worker and sink on real Kafka, Redis and chDB,
asked over Envoy's own API by `rls-client` (go-control-plane's RLS client types, as Envoy calls it): a hot key is
admitted until its policy is exceeded, then refused within the detection bound for as long as its block lasts; a
calm key never is; every request lands in ClickHouse once with its cost, however many times it was checked; and a
block caused by the Python gateway's traffic is honoured by throttlex-rls, and one caused by its own by the
Python edge."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from throttlex.api.demo_gateway import create_gateway_app
from throttlex.api.server import HttpServer
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.settings import GatewaySettings
from tests.conftest import (RoleProcess, Sandbox, eventually, free_port, owns_partitions, register_keys, role_metrics,
                            stored_events_where, wait_until_sink_committed)  # fmt: skip

pytestmark = pytest.mark.e2e

LIMIT, WINDOW_S = 20, 10
DETECTION_BOUND_S = 1.0
BIN = Path(sys.executable).parent


def go_binary(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: `make install` builds it (it needs Go, see README)")
    return str(path)


@dataclass
class Rls:
    """A running throttlex-rls and a `rls-client check` coprocess asking it."""

    process: asyncio.subprocess.Process
    client: asyncio.subprocess.Process
    log: Path
    metrics_port: int

    async def ask(self, api_key: str, *, request_id: str = "", route: str = "/v1/items/{item_id}",
                  hits: int = 0, address: str = "203.0.113.7") -> dict[str, Any]:  # fmt: skip
        entries = [["api_key", api_key], ["remote_address", address], ["method", "GET"], ["route", route]]
        if request_id:
            entries.append(["request_id", request_id])
        call = {"domain": "throttlex", "descriptors": [entries], "hits_addend": hits}
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(json.dumps(call).encode() + b"\n")
        await self.client.stdin.drain()
        answer: dict[str, Any] = json.loads(await self.client.stdout.readline())
        assert "error" not in answer, answer
        return answer


@pytest.fixture
async def rls(sandbox: Sandbox) -> AsyncIterator[Rls]:
    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ, **sandbox.env, "THROTTLEX_RLS_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
           "THROTTLEX_RLS_METRICS_ADDR": f"127.0.0.1:{metrics_port}", "THROTTLEX_GATEWAY_NAME": "rls-test",
           "THROTTLEX_PRODUCER_LINGER_MS": "1"}  # fmt: skip
    log = sandbox.root / "throttlex-rls.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(go_binary("throttlex-rls"), env=env, stdout=output, stderr=output)
    await eventually(lambda: served(metrics_port), timeout_s=30, what="throttlex-rls to serve")
    client = await asyncio.create_subprocess_exec(go_binary("rls-client"), "check", "-addr", f"127.0.0.1:{grpc_port}",
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        yield Rls(process, client, log, metrics_port)
    finally:
        assert client.stdin is not None
        client.stdin.close()
        await client.wait()
        process.terminate()
        code = await process.wait()
        print(f"--- log of throttlex-rls ---\n{log.read_text()[-5000:]}")
        assert code == 0, f"throttlex-rls exited with {code}"


async def served(port: int) -> bool:
    return bool(await role_metrics(port))


async def test_envoy_checks_are_answered_from_the_denylist_and_each_request_is_stored_once(
    sandbox: Sandbox, spawn: Callable[..., RoleProcess], rls: Rls
) -> None:
    worker_port = free_port()
    sandbox.write_policy(LIMIT, WINDOW_S)
    spawn("worker", extra_env={"THROTTLEX_METRICS_PORT": str(worker_port)})
    sink = spawn("sink")
    await eventually(lambda: owns_partitions(worker_port, 1), timeout_s=60, what="the worker to own the events partitions")
    ids = await register_keys(sandbox, {key: "acme" for key in ("hot-key", "calm-key", "gateway-hot-key")})

    hot: list[tuple[float, dict[str, Any]]] = []
    calm: list[dict[str, Any]] = []
    requests: dict[str, set[str]] = {"hot-key": set(), "calm-key": set()}
    started = time.monotonic()
    while time.monotonic() - started < 4 or len(calm) < 4:
        request_id = str(uuid.uuid4())
        requests["hot-key"].add(request_id)
        answer = await rls.ask("hot-key", request_id=request_id)
        await rls.ask("hot-key", request_id=request_id)  # a second filter or stage checks the same request
        hot.append((time.monotonic(), answer))
        if len(hot) % 25 == 0 and len(calm) < 4:  # 4 requests of cost 2: 8 of the 20 units its window holds
            request_id = str(uuid.uuid4())
            requests["calm-key"].add(request_id)
            calm.append(await rls.ask("calm-key", request_id=request_id, hits=2))
        await asyncio.sleep(0.02)

    admitted = [t for t, answer in hot if answer["code"] == "OK"]
    refused = [(t, answer) for t, answer in hot if answer["code"] == "OVER_LIMIT"]
    assert len(admitted) >= LIMIT and refused, [answer["code"] for _, answer in hot]
    assert admitted[0] < refused[0][0] and all(t < refused[0][0] for t in admitted[:LIMIT])
    assert refused[0][0] - admitted[LIMIT - 1] <= DETECTION_BOUND_S, "refused later than the detection bound"
    for _, answer in refused:
        [reset_ms] = answer["reset_ms"]
        assert 0 < reset_ms <= WINDOW_S * 1000
        assert int(answer["headers"]["retry-after"]) == -(-reset_ms // 1000)
        assert json.loads(answer["body"])["policy"] == "test-limit"
    assert [answer["code"] for answer in calm] == ["OK"] * 4

    # The block this service's events caused is the Python edge's too (while it lasts: up to the window).
    edge = EdgeDenylist(sandbox.redis_url, sandbox.env["THROTTLEX_REDIS_PREFIX"])
    await edge.start()
    try:
        assert edge.check({"api_key": ids["hot-key"]}) is not None
    finally:
        await edge.stop()

    # A block the Python side caused (a gateway's traffic) is honoured here.
    gateway = HttpServer(create_gateway_app(sandbox.settings(GatewaySettings)), "127.0.0.1", free_port())
    await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:

            gateway_statuses: list[int] = []

            async def gateway_refuses() -> bool:
                response = await client.get("/v1/items/1", headers={"x-api-key": "gateway-hot-key"})
                gateway_statuses.append(response.status_code)
                return response.status_code == 429

            await eventually(gateway_refuses, timeout_s=20, what="the Python gateway to refuse its hot key")
    finally:
        await gateway.stop()
    gateway_hot: list[str] = []

    async def rls_refuses() -> bool:  # its own subscription brings the block: milliseconds, not at once
        gateway_hot.append((await rls.ask("gateway-hot-key"))["code"])
        return gateway_hot[-1] == "OVER_LIMIT"

    await eventually(rls_refuses, timeout_s=5, what="throttlex-rls to refuse the key the Python gateway got blocked")

    await eventually(lambda: produced_all(rls), timeout_s=30, what="throttlex-rls to deliver every event")
    await wait_until_sink_committed(sandbox, timeout_s=60)
    assert sink.stop() == 0, sink.log()[-3000:]
    rows = await stored_events_where(sandbox, "SELECT api_key_id, count(), uniqExact(event_id), sum(cost), "
                                              "countIf(edge_blocked), groupUniqArray(stage), groupUniqArray(source) "
                                              "FROM usage_events GROUP BY api_key_id")  # fmt: skip
    stored = {key_id: rest for key_id, *rest in rows}
    hot_ids, calm_ids, gateway_ids = ids["hot-key"], ids["calm-key"], ids["gateway-hot-key"]
    assert stored[gateway_ids][0] == len(gateway_statuses) + len(gateway_hot)  # no request id: each check is an event
    assert stored[hot_ids][:4] == [len(requests["hot-key"]), len(requests["hot-key"]), len(requests["hot-key"]), len(refused)]
    assert stored[calm_ids][:4] == [len(requests["calm-key"]), len(requests["calm-key"]), 2 * len(requests["calm-key"]), 0]
    assert stored[hot_ids][4:] == [["check"], ["rls:rls-test"]]
    log = rls.log.read_text()
    assert "hot-key" not in log and "calm-key" not in log, "a plain API key appears in the log"


async def produced_all(rls: Rls) -> bool:
    samples = await role_metrics(rls.metrics_port)
    return samples.get(("throttlex_rls_events_buffered", ()), 1) == 0 and samples.get(
        ("throttlex_rls_events_produced_total", ()), 0) > 0  # fmt: skip


async def test_unknown_keys_are_refused_without_an_event(sandbox: Sandbox, rls: Rls) -> None:
    answer = await rls.ask("never-registered")
    assert answer["code"] == "OVER_LIMIT" and answer["headers"]["www-authenticate"] == "ApiKey"
    assert "unknown" in json.loads(answer["body"])["error"]
    known = await rls.ask("never-registered-either", request_id="r-1")  # a made-up request id spares nothing either
    assert known["code"] == "OVER_LIMIT"
    samples = await role_metrics(rls.metrics_port)
    assert samples[("throttlex_rls_checks_total", (("outcome", "unknown_key"),))] == 2
    assert samples[("throttlex_rls_events_emitted_total", ())] == 0
