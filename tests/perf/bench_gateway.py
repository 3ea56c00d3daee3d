"""Through a real gateway: the same FastAPI route bare (no rate limiter), behind ThrottleX (API keys
checked against the registry, or any key admitted) and behind slowapi, each served by one uvicorn
process and driven by `wrk` on loopback, interleaved run by run.

Per gateway: requests per second, its share of the bare app's (``of_bare``: the median over rounds of
each round's ratio, the two measured within seconds of each other, so the machine's speed drifting
between rounds, 2× here at times, cancels out of it), latency p50/p99/max (`wrk --latency`), CPU-µs per request of the
server process (all its threads, librdkafka's included) and of the local Kafka broker (which shares the
machine's two cores with wrk and the server: the events ThrottleX sends cost it CPU the bare app's runs
do not lose), and for ThrottleX the events on its topic against the requests it served (every request
must emit one).
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from throttlex.ingest.events import key_id_for
from throttlex.ingest.keys import KeyRecord
from throttlex.ingest.settings import GatewaySettings
from throttlex.processors.registry import open_registry
from throttlex.processors.topics import ensure_topics
from tests.conftest import free_port

APPS = {
    "bare": "tests.perf.gateway_apps:bare_app",
    "throttlex": "tests.perf.gateway_apps:throttlex_app",
    "throttlex_any_key": "tests.perf.gateway_apps:throttlex_any_key_app",
    "slowapi": "tests.perf.gateway_apps:slowapi_app",
}
WSGI_APPS = {
    "bare": "tests.perf.gateway_apps:flask_bare_app",
    "throttlex": "tests.perf.gateway_apps:flask_throttlex_app",
}
"""The same comparison for the WSGI middleware: a Flask app served by waitress, bare and behind ThrottleX."""
WAITRESS_THREADS = 8
EMITTING = ("throttlex", "throttlex_any_key")
PARTITIONS = 4


def _serve(target: str, port: int, env: dict[str, str], *, wsgi: bool = False) -> subprocess.Popen[bytes]:
    """A server for ``target``; its output goes to a file (a pipe nobody reads would stall it once full:
    waitress warns of its task queue's depth under load)."""
    command = (["waitress", f"--port={port}", f"--threads={WAITRESS_THREADS}", "--call", target] if wsgi else
               ["uvicorn", target, "--factory", "--port", str(port), "--log-level", "warning", "--no-access-log"])  # fmt: skip
    output = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-m", *command], env=env, stdout=output, stderr=output)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/items/1", headers={"x-api-key": "warm-up"}).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    output.seek(0)
    raise RuntimeError(f"{target} did not start: {output.read().decode(errors='replace')}")


def _wrk(port: int, seconds: int, connections: int) -> dict[str, float]:
    output = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", "x-api-key: bench-key",
         f"http://127.0.0.1:{port}/v1/items/1"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    requests = float(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    latency_max = re.search(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", output, re.M).groups()  # type: ignore[union-attr]
    return {"req_per_s": rps, "requests": requests, "p50_ms": _percentile(output, "50%"),
            "p99_ms": _percentile(output, "99%"), "max_ms": _in_ms(*latency_max),
            "non_2xx": float(errors.group(1)) if errors else 0.0}  # fmt: skip


def _percentile(output: str, label: str) -> float:
    return _in_ms(*re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups())  # type: ignore[union-attr]


def _in_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _broker_pid() -> int | None:
    """The local broker's process (`deploy/local/services.sh`), if it runs on this machine."""
    state = Path(os.environ.get("THROTTLEX_LOCAL_DIR", Path(__file__).resolve().parents[2] / ".throttlex" / "local"))
    try:
        pid = int((state / "kafka.pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _accounted(port: int) -> float:
    """Requests the gateway accounted (admitted or refused with 429/503), from its own metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(float(value) for outcome, value in re.findall(r'^throttlex_gateway_requests_total\{outcome="(\w+)"\} (\S+)$', text, re.M)
               if outcome in ("admitted", "blocked", "refused_unavailable"))  # fmt: skip


async def _prepare(env: dict[str, str], topics: list[str]) -> None:
    """The gateway admits registered keys only: register the two the benchmark sends; make the topics."""
    settings = GatewaySettings(redis_prefix=env["THROTTLEX_REDIS_PREFIX"], registry_topic=env["THROTTLEX_REGISTRY_TOPIC"])
    await ensure_topics(settings.kafka_bootstrap, {topic: PARTITIONS for topic in topics})
    async with open_registry(settings) as registry:
        for plain in ("warm-up", "bench-key"):
            await registry.put_key(KeyRecord(key_id=key_id_for(plain, settings.key_salt_bytes), tenant="bench"))


async def _events_on(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
        starts = await consumer.beginning_offsets(list(ends))
    finally:
        await consumer.stop()
    return sum(ends[tp] - starts[tp] for tp in ends)


def _events_emitted(bootstrap: str, topic: str, accounted: float) -> float:
    """Events on ``topic`` once the gateway's producer has delivered what it holds (30 s at most)."""
    deadline = time.monotonic() + 30
    while (events := asyncio.run(_events_on(bootstrap, topic))) < accounted and time.monotonic() < deadline:
        time.sleep(0.5)
    return float(events)


def run(runs: int, seconds: int, connections: int, env: dict[str, str], tag: str, *, wsgi: bool = False) -> dict[str, dict[str, float]]:
    """Median results per gateway (the events check over all runs); with ``wsgi``, the Flask pair."""
    apps = WSGI_APPS if wsgi else APPS
    topics = {name: f"bench-gateway-{tag}-{'wsgi-' if wsgi else ''}{name}.events" for name in EMITTING if name in apps}
    asyncio.run(_prepare(env, list(topics.values())))
    bootstrap = os.environ.get("THROTTLEX_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in apps}
    servers = {}
    try:
        for name, target in apps.items():
            port = free_port()
            servers[name] = (port, _serve(target, port, {**os.environ, **env, "THROTTLEX_EVENTS_TOPIC": topics.get(name, "unused")},
                                          wsgi=wsgi))  # fmt: skip
        for port, _ in servers.values():  # warm-up, not counted: first connections, caches, the key's first lookup
            _wrk(port, 2, connections)
        broker = _broker_pid()
        names = list(servers)
        for run_number in range(runs):  # interleaved; each run starts one gateway further on: none always goes first
            for name in names[run_number % len(names):] + names[: run_number % len(names)]:
                port, server = servers[name]
                cpu, broker_cpu = _cpu_s(server.pid), _cpu_s(broker) if broker else 0.0
                result = _wrk(port, seconds, connections)
                result["cpu_us_per_request"] = (_cpu_s(server.pid) - cpu) / max(1.0, result["requests"]) * 1e6
                if broker:
                    result["broker_cpu_us_per_request"] = (_cpu_s(broker) - broker_cpu) / max(1.0, result["requests"]) * 1e6
                results[name].append(result)
            print(f"  gateway run {run_number + 1}/{runs}: "
                  + ", ".join(f"{n} {r[-1]['req_per_s']:,.0f} req/s" for n, r in results.items())
                  + f" (ThrottleX {results['throttlex'][-1]['req_per_s'] / results['bare'][-1]['req_per_s']:.0%} of bare)", flush=True)  # fmt: skip
        medians = {name: {k: statistics.median(r[k] for r in runs_) for k in runs_[0]} for name, runs_ in results.items()}
        for name, runs_ in results.items():  # paired: each run's req/s over the bare app's in the same round
            medians[name]["of_bare"] = statistics.median(r["req_per_s"] / b["req_per_s"] for r, b in zip(runs_, results["bare"]))
        for name in topics:
            accounted = _accounted(servers[name][0])
            medians[name]["requests_accounted"] = accounted
            medians[name]["events_emitted"] = _events_emitted(bootstrap, topics[name], accounted)
    finally:
        for _, server in servers.values():
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    return medians
