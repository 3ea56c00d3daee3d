"""The floor a stream framework sets: events/s and CPU-µs per event to read the events topic and
decode every event with msgspec, doing nothing else, in one process.

    python -m tests.perf.bench_floor [--events 200000] [--runs 3]

Consumers compared on the same topic, each in its own process (its CPU is that process's user +
system time, threads included, from the first event to the last):

- ``aiokafka batch loop`` — `getmany` per partition, as the ThrottleX worker reads;
- ``confluent-kafka batch loop`` — librdkafka's `consume(num_messages=…)`;
- ``Faust agent`` — faust-streaming, one agent iterating its stream record by record (what the
  worker ran on before).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from throttlex.ingest.events import decode
from tests.perf.bench_pipeline import produce

CONSUMERS = {"aiokafka": "aiokafka batch loop", "confluent": "confluent-kafka batch loop", "faust": "Faust agent"}


def _cpu_s() -> float:
    return time.process_time()  # the whole process: librdkafka's and aiokafka's threads included


async def _aiokafka(bootstrap: str, topic: str, events: int) -> tuple[float, float]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"floor-{uuid.uuid4().hex}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=1024 * 1024)  # fmt: skip
    await consumer.start()
    seen, started, cpu = 0, 0.0, 0.0
    try:
        while seen < events:
            batch = await consumer.getmany(timeout_ms=200, max_records=5_000)
            if batch and not seen:
                started, cpu = time.perf_counter(), _cpu_s()
            for records in batch.values():
                for record in records:
                    decode(record.value or b"")
                seen += len(records)
    finally:
        await consumer.stop()
    return time.perf_counter() - started, _cpu_s() - cpu


def _confluent(bootstrap: str, topic: str, events: int) -> tuple[float, float]:
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"floor-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    consumer.subscribe([topic])
    seen, started, cpu = 0, 0.0, 0.0
    try:
        while seen < events:
            messages = consumer.consume(num_messages=5_000, timeout=0.2)
            if messages and not seen:
                started, cpu = time.perf_counter(), _cpu_s()
            for message in messages:
                if message.error() is None:
                    decode(message.value() or b"")
                    seen += 1
    finally:
        consumer.close()
    return time.perf_counter() - started, _cpu_s() - cpu


async def _faust(bootstrap: str, topic: str, events: int) -> tuple[float, float]:
    import faust

    data_dir = tempfile.mkdtemp(prefix="throttlex-faust-floor-")  # Faust writes its table directory here
    app = faust.App(f"floor-{uuid.uuid4().hex}", broker=f"kafka://{bootstrap}", store="memory://", web_enabled=False,
                    consumer_auto_offset_reset="earliest", key_serializer="raw", value_serializer="raw",
                    datadir=data_dir)  # fmt: skip
    source = app.topic(topic, key_type=bytes, value_type=bytes)
    done = asyncio.Event()
    seen, started, cpu = 0, 0.0, 0.0

    async def agent(stream: faust.StreamT[bytes]) -> None:
        nonlocal seen, started, cpu
        async for value in stream:
            if not seen:
                started, cpu = time.perf_counter(), _cpu_s()
            decode(value)
            seen += 1
            if seen >= events:
                done.set()

    app.agent(source, name="floor")(agent)
    await app.start()
    try:
        await done.wait()
        return time.perf_counter() - started, _cpu_s() - cpu
    finally:
        await app.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _consume(kind: str, bootstrap: str, topic: str, events: int) -> None:
    """Run one consumer in this process; print ``seconds cpu_seconds``."""
    if kind == "confluent":
        elapsed, cpu = _confluent(bootstrap, topic, events)
    else:
        elapsed, cpu = asyncio.run((_aiokafka if kind == "aiokafka" else _faust)(bootstrap, topic, events))
    print(f"{elapsed} {cpu}", flush=True)


def one_run(bootstrap: str, topic: str, events: int, kind: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "tests.perf.bench_floor", "--consume", kind, "--topic", topic,
                           "--events", str(events)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{kind} floor failed: {done.stderr[-2000:]}")
    elapsed, cpu = map(float, done.stdout.split()[-2:])
    return {"events_per_s": events / elapsed, "cpu_us_per_event": cpu / events * 1e6}


def run(bootstrap: str, runs: int, events: int) -> dict[str, dict[str, float]]:
    """Medians per consumer, runs interleaved, all on one topic of ``events`` events."""
    topic = f"bench-floor-{secrets.token_hex(4)}"
    asyncio.run(produce(bootstrap, topic, events))
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in CONSUMERS}
    for n in range(runs):
        for kind in CONSUMERS:
            results[kind].append(one_run(bootstrap, topic, events, kind))
            r = results[kind][-1]
            print(f"  floor run {n + 1}/{runs} ({CONSUMERS[kind]}): {r['events_per_s']:,.0f} events/s, "
                  f"{r['cpu_us_per_event']:.2f} CPU-µs per event", flush=True)  # fmt: skip
    return {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--consume", choices=sorted(CONSUMERS), help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    bootstrap = os.environ.get("THROTTLEX_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    if args.consume:
        _consume(args.consume, bootstrap, args.topic, args.events)
        return
    for kind, r in run(bootstrap, args.runs, args.events).items():
        print(f"| {CONSUMERS[kind]} | {r['events_per_s']:,.0f} | {r['cpu_us_per_event']:.2f} |")


if __name__ == "__main__":
    main()
