"""Through a real gateway: the same FastAPI route behind ThrottleX and behind slowapi, each served by
one uvicorn process and driven by `wrk` on loopback; requests per second and latency percentiles.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import time

import httpx

from ingest.events import key_id_for
from ingest.keys import KeyRecord
from ingest.settings import GatewaySettings
from processors.registry import open_registry
from tests.conftest import free_port

APPS = {"throttlex": "tests.perf.gateway_apps:throttlex_app", "slowapi": "tests.perf.gateway_apps:slowapi_app"}


def _serve(target: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", target, "--factory", "--port", str(port), "--log-level", "warning",
         "--no-access-log"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/items/1", headers={"x-api-key": "warm-up"}).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"{target} did not start: {server.stderr.read().decode() if server.stderr else ''}")


def _wrk(port: int, seconds: int, connections: int) -> dict[str, float]:
    output = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", "x-api-key: bench-key",
         f"http://127.0.0.1:{port}/v1/items/1"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {"req_per_s": rps, "p50_ms": _percentile(output, "50%"), "p99_ms": _percentile(output, "99%"),
            "non_2xx": float(errors.group(1)) if errors else 0.0}  # fmt: skip


def _percentile(output: str, label: str) -> float:
    value, unit = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def _register_keys(env: dict[str, str]) -> None:
    """The gateway admits registered keys only: register the two the benchmark sends."""
    settings = GatewaySettings(
        events_topic=env["THROTTLEX_EVENTS_TOPIC"], redis_prefix=env["THROTTLEX_REDIS_PREFIX"],
        registry_topic=env["THROTTLEX_REGISTRY_TOPIC"],
    )  # fmt: skip
    async with open_registry(settings) as registry:
        for plain in ("warm-up", "bench-key"):
            await registry.put_key(KeyRecord(key_id=key_id_for(plain, settings.key_salt_bytes), tenant="bench"))


def run(runs: int, seconds: int, connections: int, env: dict[str, str]) -> dict[str, dict[str, float]]:
    """Median results per gateway; the ThrottleX one checks each request's key against the registry."""
    asyncio.run(_register_keys(env))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in APPS}
    servers = {name: (port := free_port(), _serve(target, port, {**os.environ, **env})) for name, target in APPS.items()}
    try:
        for run_number in range(runs):  # interleaved: each run of each gateway sees the same machine
            for name, (port, _) in servers.items():
                results[name].append(_wrk(port, seconds, connections))
            print(f"  gateway run {run_number + 1}/{runs}: "
                  + ", ".join(f"{n} {r[-1]['req_per_s']:,.0f} req/s" for n, r in results.items()), flush=True)  # fmt: skip
    finally:
        for _, server in servers.values():
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    return {name: {k: statistics.median(r[k] for r in runs_) for k in runs_[0]} for name, runs_ in results.items()}
