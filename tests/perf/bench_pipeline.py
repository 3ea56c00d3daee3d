"""Pipeline throughput of one `throttlex worker` process with every policy of the sample policy file.

Each run produces ``events`` events to a fresh topic first (5,000 keys, 20 tenants, 1,000 addresses),
then starts a worker and polls its consumer group's committed offsets. The rate is measured between
the first and the last commit, so start-up and table recovery are left out; CPU is the worker
process's user + system time over the same span. A backlog drained this way is the highest rate the
worker sustains: offered more, its lag grows without bound. (Policies keyed on tenant or address
send each event through the regroup topic once more, and that work is included.)
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

from ingest.events import encode
from processors.topics import ensure_topics
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


async def committed(admin: AIOKafkaAdminClient, group: str, topic: str) -> int:
    offsets = await admin.list_consumer_group_offsets(group)
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def worker_process(
    bootstrap: str, redis_url: str, tag: str, policy_file: Path
) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """A `throttlex worker` on topic ``bench-{tag}.events`` (stderr to a temporary file), stopped on exit."""
    env = {**os.environ, "THROTTLEX_KAFKA_BOOTSTRAP": bootstrap, "THROTTLEX_REDIS_URL": redis_url,
           "THROTTLEX_EVENTS_TOPIC": f"bench-{tag}.events", "THROTTLEX_WORKER_GROUP": f"bench-{tag}-worker",
           "THROTTLEX_REDIS_PREFIX": f"bench-{tag}", "THROTTLEX_METRICS_PORT": "0", "THROTTLEX_LOG_LEVEL": "WARNING"}  # fmt: skip
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen([sys.executable, "-c", "from api.cli import main; main()", "worker", "--policy-file",
                                   str(policy_file)], env=env, stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        try:
            yield worker, log
        finally:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()


async def one_run(bootstrap: str, redis_url: str, events: int, policy_file: Path) -> dict[str, float]:
    tag = secrets.token_hex(4)
    topic = f"bench-{tag}.events"
    await produce(bootstrap, topic, events)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        with worker_process(bootstrap, redis_url, tag, policy_file) as (worker, log):
            first = 0
            while first == 0:
                if worker.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"worker exited: {log.read().decode()[-2000:]}")
                first = await committed(admin, f"bench-{tag}-worker", topic)
                await asyncio.sleep(0.05)
            started, cpu_started = time.perf_counter(), cpu_seconds(worker.pid)
            done = first
            while done < events:
                await asyncio.sleep(0.05)
                done = await committed(admin, f"bench-{tag}-worker", topic)
            elapsed, cpu = time.perf_counter() - started, cpu_seconds(worker.pid) - cpu_started
    finally:
        await admin.close()
    counted = events - first
    return {"events_per_s": counted / elapsed, "cpu_s_per_100k_events": cpu / counted * 100_000, "seconds": elapsed}


async def run(bootstrap: str, redis_url: str, runs: int, events: int) -> dict[str, dict[str, float]]:
    """Medians for the sample policy file, the per-key-only set and no policies at all (the floor the
    Faust consumer and the worker's bookkeeping set), runs interleaved."""
    sets = {"sample_policies": SAMPLE, "per_key_policies": PER_KEY, "no_policies": NO_POLICIES}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sets}
    for n in range(runs):
        for name, policy_file in sets.items():
            results[name].append(await one_run(bootstrap, redis_url, events, policy_file))
            print(f"  worker run {n + 1}/{runs} ({name}): {results[name][-1]['events_per_s']:,.0f} events/s", flush=True)
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
