"""Scenario 9: Envoy's rate-limit call, throttlex-rls beside envoyproxy/ratelimit (built from the Go module proxy),
on the same Redis, with the same descriptors and the same Go load client (`rls-client load`, Envoy's own RLS
client types) in the same run.

Both get one descriptor per call: ``api_key`` (one of 1,000 keys), ``method`` and ``route``, as
deploy/envoy/envoy.yaml sends them. envoyproxy/ratelimit is configured with a limit on that descriptor path high
enough never to refuse, so both do their whole check and both answer OK: envoyproxy/ratelimit increments and
expires a Redis counter per call (INCRBY and EXPIRE, pipelined); throttlex-rls looks the key up in the denylist
it holds in memory and queues the call's usage event for Kafka.

The keys are registered (throttlex-rls checks them against the registry's view in Redis, as in production) and
each is called once before the measurements. Per service and number of concurrent callers (4 and 50): checks/s
with callers calling again as soon as answered, then p50 and p99 at the same offered load for both (an open loop
at 60 % of the slower one's rate), Redis commands per check, and CPU per check of the service plus Redis. A second
column adds what throttlex-rls moves off the check: the Kafka broker's CPU per event and the stream worker's, from
one more run of throttlex-rls at the same offered load with a `throttlex worker` following its events live (apart
from the measured runs, so the worker competes with neither service for the two cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from throttlex.ingest.events import key_id_for
from throttlex.ingest.keys import KeyRecord, encode_key, key_view
from throttlex.ingest.settings import DEV_SALT
from throttlex.processors.topics import APPEND_TIME, ensure_topics
from tests.conftest import Sandbox, free_port, group_committed, role_metrics, topic_ends
from tests.perf.bench_pipeline import cpu_seconds, worker_process

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
RATELIMIT_MODULE = "github.com/envoyproxy/ratelimit/src/service_cmd@v1.4.1-0.20260122083618-3fb702589d36"
"""envoyproxy/ratelimit's main branch as the module proxy serves it (its last tagged release predates the RLS v3
types go-control-plane has now)."""
TOOLS = ROOT / ".throttlex" / "bench-tools"
KEYS = 1_000
CONCURRENCY = (4, 50)
RATELIMIT_CONFIG = """\
domain: throttlex
descriptors:
  - key: api_key
    descriptors:
      - key: method
        descriptors:
          - key: route
            rate_limit: {unit: second, requests_per_unit: 100000000}
"""
POLICY = "policies:\n  - name: per-key\n    key: [api_key]\n    algorithm: {type: sliding_window, limit: 100000000, window_s: 60}\n"


def ratelimit_binary() -> Path:
    """envoyproxy/ratelimit's service, built once into .throttlex/bench-tools."""
    binary = TOOLS / "service_cmd"
    if not binary.exists():
        go = shutil.which("go") or "/usr/local/go/bin/go"
        print(f"building envoyproxy/ratelimit ({RATELIMIT_MODULE})", flush=True)
        subprocess.run([go, "install", RATELIMIT_MODULE], check=True, env={**os.environ, "GOBIN": str(TOOLS), "GOFLAGS": "-mod=mod"})
    return binary


def _redis_address(redis_url: str) -> str:
    return redis_url.split("://", 1)[1].split("/", 1)[0]


class Service:
    """One rate-limit service process, started for one measurement."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int) -> None:
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=self.log, stderr=self.log)

    def cpu_s(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_ratelimit(redis_url: str, runtime: Path) -> Service:
    port, http_port, debug_port = free_port(), free_port(), free_port()
    config = runtime / "ratelimit" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "throttlex.yaml").write_text(RATELIMIT_CONFIG)
    env = {"REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": _redis_address(redis_url), "REDIS_TYPE": "SINGLE",
           "RUNTIME_ROOT": str(runtime), "RUNTIME_SUBDIRECTORY": "ratelimit", "RUNTIME_APPDIRECTORY": "config",
           "RUNTIME_WATCH_ROOT": "false", "USE_STATSD": "false", "DISABLE_STATS": "true", "LOG_LEVEL": "warn",
           "GRPC_HOST": "127.0.0.1", "GRPC_PORT": str(port), "HOST": "127.0.0.1", "PORT": str(http_port),
           "DEBUG_HOST": "127.0.0.1", "DEBUG_PORT": str(debug_port)}  # fmt: skip
    return Service("envoyproxy/ratelimit", [str(ratelimit_binary())], env, port)


def start_throttlex(bootstrap: str, redis_url: str, tag: str) -> tuple[Service, int]:
    port, metrics_port = free_port(), free_port()
    env = {"THROTTLEX_KAFKA_BOOTSTRAP": bootstrap, "THROTTLEX_REDIS_URL": redis_url, "THROTTLEX_REDIS_PREFIX": f"bench-{tag}",
           "THROTTLEX_EVENTS_TOPIC": f"bench-{tag}.events", "THROTTLEX_ALLOW_DEV_SECRETS": "1",
           "THROTTLEX_RLS_GRPC_ADDR": f"127.0.0.1:{port}", "THROTTLEX_RLS_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
           "THROTTLEX_LOG_LEVEL": "WARNING", "THROTTLEX_GATEWAY_NAME": "bench"}  # fmt: skip
    return Service("throttlex-rls", [str(BIN / "throttlex-rls")], env, port), metrics_port


def load(port: int, concurrency: int, seconds: float, rate: float = 0) -> dict[str, Any]:
    out = subprocess.run([str(BIN / "rls-client"), "load", "-addr", f"127.0.0.1:{port}", "-concurrency", str(concurrency),
                          "-duration", f"{seconds}s", "-rate", str(rate), "-keys", str(KEYS)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


async def wait_serving(port: int, service: Service) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            service.log.seek(0)
            raise RuntimeError(f"{service.name} exited: {service.log.read()[-2000:].decode(errors='replace')}")
        try:
            load(port, 1, 0.2)
            return
        except subprocess.CalledProcessError:
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{service.name} does not answer on {port}")


async def _redis_counters(redis: Redis) -> tuple[float, int]:
    cpu, stats = await redis.info("cpu"), await redis.info("stats")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), int(stats["total_commands_processed"])


def broker_pid() -> int | None:
    found = subprocess.run(["pgrep", "-f", "kafka.Kafka"], capture_output=True, text=True, check=False).stdout.split()
    return int(found[0]) if len(found) == 1 else None


async def measured(service: Service, redis: Redis, concurrency: int, seconds: float, rate: float) -> dict[str, float]:
    """One load run with the service's and Redis's CPU and Redis's commands around it."""
    await asyncio.sleep(0)
    cpu_before, (redis_cpu_before, commands_before) = service.cpu_s(), await _redis_counters(redis)
    result = await asyncio.to_thread(load, service.port, concurrency, seconds, rate)
    cpu_after, (redis_cpu_after, commands_after) = service.cpu_s(), await _redis_counters(redis)
    checks = max(result["checks"], 1)
    return {
        "checks_per_s": result["checks_per_s"], "p50_us": result["p50_us"], "p99_us": result["p99_us"], "checks": checks,
        "errors": sum(n for code, n in result["codes"].items() if code.startswith("error")),
        "service_cpu_us": (cpu_after - cpu_before) * 1e6 / checks,
        "redis_cpu_us": (redis_cpu_after - redis_cpu_before) * 1e6 / checks,
        "redis_commands_per_check": (commands_after - commands_before) / checks,
    }  # fmt: skip


async def register_bench_keys(redis: Redis, prefix: str) -> None:
    """The load's API keys as the registry's view in Redis holds them, so throttlex-rls checks them as registered."""
    salt = DEV_SALT.encode()
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(KEYS):
            key_id = key_id_for(f"key-{n}", salt)
            pipe.set(key_view(prefix, key_id), encode_key(KeyRecord(key_id=key_id, tenant="bench", version=1)))
        await pipe.execute()


async def one_run(bootstrap: str, redis_url: str, seconds: float) -> dict[str, dict[str, Any]]:
    """Both services at each concurrency: closed loop, then an open loop at the same offered load, with no worker
    running; then throttlex-rls once more at that load with a `throttlex worker` following its events live, for the
    broker's and the worker's CPU per event (the whole-system column)."""
    redis = Redis.from_url(redis_url)
    tag = secrets.token_hex(4)
    await ensure_topics(bootstrap, {f"bench-{tag}.events": 4}, configs={f"bench-{tag}.events": APPEND_TIME})
    await register_bench_keys(redis, f"bench-{tag}")
    out: dict[str, dict[str, Any]] = {}
    broker = broker_pid()
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policies.yaml"
        policy.write_text(POLICY)
        ratelimit = start_ratelimit(redis_url, Path(tmp))
        throttlex, metrics_port = start_throttlex(bootstrap, redis_url, tag)
        try:
            await wait_serving(ratelimit.port, ratelimit)
            await wait_serving(throttlex.port, throttlex)
            for service in (ratelimit, throttlex):  # every key seen once: connections made, throttlex-rls's key cache filled
                await asyncio.to_thread(load, service.port, 4, 2)
            for concurrency in CONCURRENCY:
                closed = {s.name: await measured(s, redis, concurrency, seconds, 0) for s in (ratelimit, throttlex)}
                offered = round(0.6 * min(r["checks_per_s"] for r in closed.values()))
                opened = {s.name: await measured(s, redis, concurrency, seconds, offered) for s in (ratelimit, throttlex)}
                out[str(concurrency)] = {"offered_per_s": offered, "closed": closed, "open": opened,
                                         **await downstream(bootstrap, redis_url, tag, policy, throttlex, metrics_port, broker,
                                                            concurrency, seconds, offered)}  # fmt: skip
                print(f"  {concurrency} callers: " + ", ".join(
                    f"{name} {r['checks_per_s']:,.0f}/s" for name, r in closed.items()) + f"; at {offered:,}/s p99 " +
                    ", ".join(f"{name} {r['p99_us']:.0f} µs" for name, r in opened.items()), flush=True)  # fmt: skip
        finally:
            ratelimit.stop()
            throttlex.stop()
            await redis.aclose()
    return out


async def downstream(bootstrap: str, redis_url: str, tag: str, policy: Path, throttlex: Service, metrics_port: int,
                     broker: int | None, concurrency: int, seconds: float, offered: float) -> dict[str, float]:  # fmt: skip
    """The broker's and a live worker's CPU per event of throttlex-rls at ``offered`` checks/s, until the worker has
    applied every event of the run."""
    worker_port = free_port()
    with worker_process(bootstrap, redis_url, tag, policy, worker_port) as (worker, _):
        await wait_caught_up(bootstrap, tag)
        broker_before, worker_before = cpu_seconds(broker) if broker else 0.0, cpu_seconds(worker.pid)
        applied_before = await _worker_events(worker_port)
        result = await asyncio.to_thread(load, throttlex.port, concurrency, seconds, offered)
        applied = await _wait_worker(worker_port, applied_before, int(result["checks"]))
        broker_cpu = cpu_seconds(broker) - broker_before if broker else float("nan")
        worker_cpu = cpu_seconds(worker.pid) - worker_before
    return {"broker_cpu_us_per_event": broker_cpu * 1e6 / max(applied, 1), "worker_cpu_us_per_event": worker_cpu * 1e6 / max(applied, 1)}


async def wait_caught_up(bootstrap: str, tag: str) -> None:
    """Wait until the worker group has committed the events topic's end (a worker of a later round resumes where
    the previous one committed; a first one reads the topic from its start)."""
    probe = Sandbox(kafka_bootstrap=bootstrap, redis_url="", root=Path("."))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ends = await topic_ends(probe, [f"bench-{tag}.events"])
        committed = await group_committed(probe, f"bench-{tag}-worker")
        if all(committed.get(tp, -1) >= end for tp, end in ends.items()):
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("the worker did not catch up with the events topic within 180 s")


async def _worker_events(port: int) -> float:
    return (await role_metrics(port)).get(("throttlex_worker_events_total", ()), 0.0)


async def _wait_worker(port: int, before: float, at_least: int) -> float:
    """Wait until the worker has applied ``at_least`` more events (the open-loop run's); the events it applied."""
    deadline = time.monotonic() + 120
    while (applied := await _worker_events(port) - before) < at_least and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return applied


def run(bootstrap: str, redis_url: str, runs: int, seconds: float) -> dict[str, Any]:
    """Medians over ``runs`` of `one_run`."""
    ratelimit_binary()
    all_runs = [asyncio.run(one_run(bootstrap, redis_url, seconds)) for _ in range(runs)]
    result: dict[str, Any] = {"module": RATELIMIT_MODULE, "seconds": seconds, "runs": runs}
    for concurrency in map(str, CONCURRENCY):
        these = [r[concurrency] for r in all_runs]
        row: dict[str, Any] = {"offered_per_s": statistics.median(r["offered_per_s"] for r in these)}
        for loop in ("closed", "open"):
            row[loop] = {name: {field: round(statistics.median(r[loop][name][field] for r in these), 2)
                                for field in these[0][loop][name]} for name in these[0][loop]}  # fmt: skip
        for field in ("broker_cpu_us_per_event", "worker_cpu_us_per_event"):
            row[field] = round(statistics.median(r[field] for r in these), 2)
        result[concurrency] = row
    return result
