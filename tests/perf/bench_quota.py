"""The plan quota's used units (what ``GET /v1/quota`` asks ClickHouse and Kafka) over a long history, while
the sink inserts.

    python -m tests.perf.bench_quota --stored 10000000 --keys 10000 --rate 50000   # also part of make bench

One process, as `throttlex run` is: a fresh chDB directory holding ``--stored`` events of ``--keys`` keys,
spread over the current month, and a `UsageSink` on a loop thread of its own storing what a load process
produces at ``--rate`` events a second to a fresh topic. Meanwhile random keys' month usage is read with
`ExactUsage.plan_usage`, what ``GET /v1/quota`` calls: the ledger every key's plan month is kept in
(the first read loads it, and the bench waits for the follower to catch up before measuring).

The reads before it, measured by this bench in this scenario (BENCHMARKS.md of commit 70fddc5): a key's
per-minute rollups in ClickHouse plus the unstored tail on every call, 61 ms p50 / 332 ms p99; a scan
of the key's raw rows and of the partition's unstored records on Kafka on every call, 125 / 696 ms.
The history is stored under partitions 4-7, which the live topic does not have, so the live offsets
start at 0 and the reads split ClickHouse from Kafka as in production. Prints the medians and merges them
into tests/perf/results.json under ``quota``. Needs the local Kafka (deploy/local/services.sh up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from prometheus_client import REGISTRY

from throttlex.ingest.events import encode
from throttlex.processors.accounting.exact_usage import ExactUsage
from throttlex.processors.accounting.ledger import month_around
from throttlex.processors.accounting.sink import UsageSink
from throttlex.processors.accounting.store import UsageStore
from throttlex.processors.settings import SinkSettings
from throttlex.processors.tasks import LoopThread, share_interpreter_often, tune_gc
from throttlex.processors.topics import ensure_topics
from tests.factories import make_event

PARTITIONS = 4
UTC_ZONE = ZoneInfo("UTC")
READ_EVERY_S = 0.02
RESULTS = Path(__file__).with_name("results.json")


def _sink_rows() -> float:
    return REGISTRY.get_sample_value("throttlex_sink_rows_total") or 0.0


async def run(bootstrap: str, stored: int, keys: int, rate: int, calls: int) -> dict[str, Any]:
    tag = secrets.token_hex(4)
    topic, group = f"bench-{tag}.events", f"bench-{tag}-sink"
    await ensure_topics(bootstrap, {topic: PARTITIONS})
    start, end = month_around(datetime.now(UTC), UTC_ZONE)
    with tempfile.TemporaryDirectory() as directory:
        settings = SinkSettings(kafka_bootstrap=bootstrap, events_topic=topic, sink_group=group,
                                clickhouse_dsn=f"chdb://{directory}/chdb")  # fmt: skip
        store = UsageStore(settings.clickhouse_dsn)
        await store.open()
        await store.migrate()
        filled = time.perf_counter()
        month_ms = int((min(end, datetime.now(UTC)) - start).total_seconds() * 1000)
        await store.command(
            "INSERT INTO usage_events (event_id, event_time, api_key_id, tenant, route, method, status, latency_ms, "
            "response_bytes, cost, client_ip, edge_blocked, schema_version, kafka_partition, kafka_offset) "
            f"SELECT generateUUIDv4(number), fromUnixTimestamp64Milli(toInt64({int(start.timestamp() * 1000)} + "
            f"cityHash64(number) % {max(month_ms, 1)}), 'UTC'), 'key-' || toString(number % {keys}), 'acme', "
            "'/v1/items/{item_id}', 'GET', 200, 3.5, 512, 1 + number % 3, '', number % 17 = 0, 1, "
            f"{PARTITIONS} + number % {PARTITIONS}, intDiv(number, {PARTITIONS}) FROM numbers({stored})"
        )
        fill_s = time.perf_counter() - filled
        print(f"  stored {stored:,} events of {keys:,} keys in {fill_s:.0f} s", flush=True)

        current = ExactUsage(bootstrap, topic, group)
        await current.start()
        tune_gc()
        share_interpreter_often()  # as throttlex run does
        sink_loop = LoopThread("sink")  # as in throttlex run: the sink on a loop of its own
        sink = await sink_loop.start(lambda: UsageSink(settings, store))
        load = subprocess.Popen([sys.executable, "-m", "tests.perf.bench_quota", "--load", str(rate), "--topic", topic,
                                 "--keys", str(keys)], stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            while _sink_rows() < rate:  # the sink is storing the live load
                await asyncio.sleep(0.1)
            loaded = time.perf_counter()
            await current.plan_usage(store, "key-0", UTC_ZONE, datetime.now(UTC))  # the first read loads the ledger
            ledger_load_s = time.perf_counter() - loaded
            for partition in range(PARTITIONS):  # the follower catches up with what arrived meanwhile
                await current.plan_usage(store, f"key-{partition}", UTC_ZONE, datetime.now(UTC), settle_s=60)
            catch_up_s = time.perf_counter() - loaded - ledger_load_s
            print(f"  ledger loaded in {ledger_load_s:.1f} s, follower caught up {catch_up_s:.1f} s later", flush=True)
            latencies: list[float] = []
            rows_before, measured = _sink_rows(), time.perf_counter()
            loop = asyncio.get_running_loop()
            rng, due = random.Random(7), loop.time()
            for _ in range(calls):
                # A read arrives every READ_EVERY_S, as requests do, and waits for the loop like them: its
                # latency counts from when it was due (a read never yielding would hold the loop for itself).
                due = max(due + READ_EVERY_S, loop.time())
                await asyncio.sleep(due - loop.time())
                await current.plan_usage(store, f"key-{rng.randrange(keys)}", UTC_ZONE, datetime.now(UTC))
                latencies.append((loop.time() - due) * 1000)
            sink_rows_per_s = (_sink_rows() - rows_before) / (time.perf_counter() - measured)
        finally:
            load.terminate()
            load.wait()
            await sink_loop.run(sink.stop())
            sink_loop.close()
            await current.stop()
            await store.close()
    ordered = sorted(latencies)
    return {"stored_events": stored, "keys": keys, "offered_rate": rate, "sink_rows_per_s": round(sink_rows_per_s),
            "ledger_load_s": round(ledger_load_s, 2), "catch_up_s": round(catch_up_s, 2), "reads": calls,
            "current": {"p50_ms": round(statistics.median(ordered), 2), "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 2)},
            "before": {"p50_ms": 61.0, "p99_ms": 332.0, "measured_at": "70fddc5"},
            "raw_scan": {"p50_ms": 125.0, "p99_ms": 696.0, "measured_at": "70fddc5"}}  # fmt: skip


def load(bootstrap: str, topic: str, rate: int, keys: int) -> None:
    """Produce events of ``keys`` keys at ``rate`` a second (librdkafka, as the gateways) until terminated,
    cycling through 100,000 events encoded up front so the load costs the machine little."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                         "partitioner": "murmur2_random", "queue.buffering.max.messages": 1_000_000})  # fmt: skip
    now_ms = int(time.time() * 1000)
    pool = [(f"key-{n % keys}".encode(), encode(make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % keys}",
                                                           event_time_ms=now_ms + n // 100, cost=1 + n % 3)))
            for n in range(100_000)]  # fmt: skip
    sent, started = 0, time.perf_counter()
    while True:
        due = int((time.perf_counter() - started) * rate)
        while sent < due:
            key, value = pool[sent % len(pool)]
            try:
                producer.produce(topic, value, key=key)
            except BufferError:
                break
            sent += 1
        producer.poll(0)
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stored", type=int, default=10_000_000, help="events stored before the reads")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=50_000, help="events a second the sink stores meanwhile")
    parser.add_argument("--calls", type=int, default=1_000, help="reads, one every 20 ms")
    parser.add_argument("--load", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    bootstrap = os.environ.get("THROTTLEX_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    if args.load is not None:
        load(bootstrap, args.topic, args.load, args.keys)
        return
    result = asyncio.run(run(bootstrap, args.stored, args.keys, args.rate, args.calls))
    print(json.dumps(result, indent=2))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["quota"] = {**result, "measured_alone": True}  # not in the same run as the other tables
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
