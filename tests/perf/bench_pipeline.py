"""Pipeline throughput of `throttlex worker` processes draining a backlog.

Each run produces ``events`` events to a fresh topic first (5,000 keys, 20 tenants, 1,000 addresses,
10 events per millisecond of event time), then starts the workers and reads their metrics every 100 ms:
the run is timed from the first event a worker applies until every event is applied and every forward
sent through the regroup topic has been applied too. CPU is the worker processes' user +
system time over the same span (their threads included). A backlog drained this way is the highest
rate the workers sustain: offered more, their lag grows without bound.

Policy sets: the sample policy file (two policies keyed on tenant or address, so each event is
forwarded twice), policies keyed on ``api_key`` only, and none at all (reading and decoding).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from throttlex.ingest.events import encode
from throttlex.processors.topics import ensure_topics
from tests.conftest import free_port, role_metrics
from tests.factories import make_event

SAMPLE = Path(__file__).parents[2] / "deploy" / "config" / "policies.yaml"
PER_KEY = Path(__file__).with_name("policies_per_key.yaml")
NO_POLICIES = Path(__file__).with_name("policies_none.yaml")
PARTITIONS = 4


async def produce(bootstrap: str, topic: str, events: int) -> None:
    await ensure_topics(bootstrap, {topic: PARTITIONS, f"{topic}.regrouped": PARTITIONS})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=20,
                                compression_type="lz4", max_batch_size=512 * 1024)  # fmt: skip
    await producer.start()
    now_ms = int(time.time() * 1000) - 60_000
    try:
        deliveries = []
        for n in range(events):
            event = make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % 5000}", tenant=f"tenant-{n % 20}",
                               client_ip=f"10.0.{n % 1000 // 250}.{n % 250}", event_time_ms=now_ms + n // 10,
                               cost=1)  # fmt: skip
            deliveries.append(await producer.send(topic, encode(event), key=event.api_key_id.encode()))
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def worker_process(
    bootstrap: str, redis_url: str, tag: str, policy_file: Path, metrics_port: int = 0, python_path: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """A `throttlex worker` on topic ``bench-{tag}.events`` (stderr to a temporary file), stopped on exit; with
    ``python_path``, the `throttlex` found there (another release's) instead of this tree's."""
    extra = {} if python_path is None else {"PYTHONPATH": str(python_path)}
    env = {**os.environ, **extra, "THROTTLEX_KAFKA_BOOTSTRAP": bootstrap, "THROTTLEX_REDIS_URL": redis_url,
           "THROTTLEX_EVENTS_TOPIC": f"bench-{tag}.events", "THROTTLEX_WORKER_GROUP": f"bench-{tag}-worker",
           "THROTTLEX_REDIS_PREFIX": f"bench-{tag}", "THROTTLEX_METRICS_PORT": str(metrics_port),
           "THROTTLEX_LOG_LEVEL": "WARNING"}  # fmt: skip
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen([sys.executable, "-c", "from throttlex.api.cli import main; main()", "worker", "--policy-file",
                                   str(policy_file)], env=env, stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        try:
            yield worker, log
        finally:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()


async def _progress(ports: list[int]) -> tuple[float, float, float]:
    """Events applied, forwards sent through the regroup topic and forwards read from it, summed over
    the workers."""
    totals = [0.0, 0.0, 0.0]
    for port in ports:
        samples = await role_metrics(port)
        totals[0] += samples.get(("throttlex_worker_events_total", ()), 0.0)
        totals[1] += samples.get(("throttlex_worker_forwards_total", (("route", "kafka"),)), 0.0)
        totals[2] += samples.get(("throttlex_worker_forwards_received_total", ()), 0.0)
    return totals[0], totals[1], totals[2]


async def one_run(
    bootstrap: str, redis_url: str, events: int, policy_file: Path, workers: int = 1, python_path: Path | None = None
) -> dict[str, float]:
    tag = secrets.token_hex(4)
    await produce(bootstrap, f"bench-{tag}.events", events)
    ports = [free_port() for _ in range(workers)]
    with contextlib.ExitStack() as stack:
        processes = [stack.enter_context(worker_process(bootstrap, redis_url, tag, policy_file, port, python_path))
                     for port in ports]  # fmt: skip
        first = 0.0
        while not first:
            for worker, log in processes:
                if worker.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"worker exited: {log.read().decode()[-2000:]}")
            first = (await _progress(ports))[0]
            await asyncio.sleep(0.05)
        started, cpu_started = time.perf_counter(), sum(cpu_seconds(w.pid) for w, _ in processes)
        deadline = started + 600
        while time.perf_counter() < deadline:
            applied, sent, forwarded = await _progress(ports)
            if applied >= events and forwarded >= sent:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"the workers did not finish within 600 s ({applied:,.0f} of {events:,} events)")
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(w.pid) for w, _ in processes) - cpu_started
    await delete_topics(bootstrap, tag)
    counted = events - first
    return {"events_per_s": counted / elapsed, "cpu_us_per_event": cpu / counted * 1e6, "seconds": elapsed}


async def delete_topics(bootstrap: str, tag: str) -> None:
    """Remove a run's topics (events, regroup, the workers' changelogs), so that the broker does not
    keep compacting and serving them during the runs after it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic for topic in await admin.list_topics() if f"bench-{tag}" in topic])
    finally:
        await admin.close()


SETS = {"sample_policies": SAMPLE, "per_key_policies": PER_KEY, "no_policies": NO_POLICIES}


async def run(
    bootstrap: str, redis_url: str, runs: int, events: int, *, previous: Path | None = None
) -> dict[str, dict[str, float]]:
    """Medians for each policy set with one worker, and for the sample set with two workers sharing
    the four partitions (``scale_out``); with ``previous`` (another release's `throttlex` on a Python path),
    that release's worker with the sample set too (``previous_release_sample_policies``); runs interleaved."""
    cases: dict[str, tuple[Path, int, Path | None]] = {name: (path, 1, None) for name, path in SETS.items()}
    cases["scale_out_2_workers"] = (SAMPLE, 2, None)
    if previous is not None:
        cases["previous_release_sample_policies"] = (SAMPLE, 1, previous)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for n in range(runs):
        for name, (policy_file, workers, python_path) in cases.items():
            results[name].append(await one_run(bootstrap, redis_url, events, policy_file, workers, python_path))
            r = results[name][-1]
            print(f"  worker run {n + 1}/{runs} ({name}): {r['events_per_s']:,.0f} events/s, "
                  f"{r['cpu_us_per_event']:.1f} CPU-µs per event", flush=True)  # fmt: skip
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
