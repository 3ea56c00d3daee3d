"""The plan quota's used units (what ``GET /v1/quota`` asks ClickHouse and Kafka) over a long history, while
the sink inserts.

    python -m tests.perf.bench_quota --stored 10000000 --keys 10000 --rate 50000   # also part of make bench

One process, as `throttlex run` is: a fresh chDB directory holding ``--stored`` events of ``--keys`` keys,
spread over the current month, and a `UsageSink` storing what a load process produces at ``--rate``
events a second to a fresh topic. Meanwhile random keys' month usage is read, alternately by the
current code (per-minute rollups, and the tail follower for what is not stored yet) and by the code
before it (a scan of the key's raw rows, of the partition's for its highest stored offset, and a read
of the partition's unstored records from Kafka on every call), and the latencies are compared. The history is stored under
partitions 4-7, which the live topic does not have, so the live offsets start at 0 and the reads split
ClickHouse from Kafka as in production. Prints the medians and merges them into tests/perf/results.json
under ``quota``. Needs the local Kafka (deploy/local/services.sh up).
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import REGISTRY

from ingest.events import decode, encode
from processors.accounting.exact_usage import ExactUsage
from processors.accounting.sink import UsageSink
from processors.accounting.store import UsageStore
from processors.settings import SinkSettings
from processors.tasks import tune_gc
from processors.topics import ensure_topics
from tests.factories import make_event

PARTITIONS = 4
RESULTS = Path(__file__).with_name("results.json")


class RawScanUsage:
    """The plan quota as computed before the per-minute rollup and the tail follower: on every call, the
    key's raw rows summed, the partition's raw rows scanned for its highest offset, and the partition's
    records from the split to its end read from Kafka."""

    def __init__(self, bootstrap: str, topic: str, sink_group: str) -> None:
        self._topic, self._sink_group = topic, sink_group
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._consumer.start()
        await self._admin.start()

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def billable_units(self, store: UsageStore, api_key_id: str, start: datetime, end: datetime) -> int:
        key = api_key_id.encode()
        async with self._lock:
            [description] = await self._admin.describe_topics([self._topic])
            ordered = sorted(p["partition"] for p in description["partitions"])
            tp = TopicPartition(self._topic, DefaultPartitioner()(key, ordered, ordered))
            committed = await self._admin.list_consumer_group_offsets(self._sink_group, partitions=[tp])
            [(highest, rows)] = await store.query(
                "SELECT max(kafka_offset), count() FROM usage_events WHERE kafka_partition = {p:UInt16}", {"p": tp.partition}
            )
            begin = max(committed[tp].offset if tp in committed else 0, int(highest) + 1 if rows else 0)
            [(total,)] = await store.query(
                "SELECT sum(cost) FROM usage_events WHERE api_key_id = {k:String} AND NOT edge_blocked "
                "AND event_time >= {start:DateTime64(3, 'UTC')} AND event_time < {end:DateTime64(3, 'UTC')} "
                "AND kafka_offset < {below:UInt64}",
                {"k": api_key_id, "start": start, "end": end, "below": begin},
            )
            units = int(total or 0)
            end_offset = (await self._consumer.end_offsets([tp]))[tp]
            if begin >= end_offset:
                return units
            self._consumer.assign([tp])
            self._consumer.seek(tp, begin)
            start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
            while await self._consumer.position(tp) < end_offset:
                for record in (await self._consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                    if record.offset < end_offset and record.key == key:
                        event = decode(record.value or b"")
                        if not event.edge_blocked and start_ms <= event.event_time_ms < end_ms:
                            units += event.cost
            return units


def _sink_rows() -> float:
    return REGISTRY.get_sample_value("throttlex_sink_rows_total") or 0.0


def _month() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


async def run(bootstrap: str, stored: int, keys: int, rate: int, calls: int) -> dict[str, Any]:
    tag = secrets.token_hex(4)
    topic, group = f"bench-{tag}.events", f"bench-{tag}-sink"
    await ensure_topics(bootstrap, {topic: PARTITIONS})
    start, end = _month()
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
        before = RawScanUsage(bootstrap, topic, group)
        sink = UsageSink(settings, store)
        for usage in (current, before):
            await usage.start()
        tune_gc()
        await sink.start()
        load = subprocess.Popen([sys.executable, "-m", "tests.perf.bench_quota", "--load", str(rate), "--topic", topic,
                                 "--keys", str(keys)], stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            while _sink_rows() < rate:  # the sink is storing the live load
                await asyncio.sleep(0.1)
            rng = random.Random(7)
            latencies: dict[str, list[float]] = {"current": [], "before": []}
            rows_before, measured = _sink_rows(), time.perf_counter()
            for n in range(calls):
                key = f"key-{rng.randrange(keys)}"
                for name, usage in (("current", current), ("before", before))[:: 1 if n % 2 else -1]:
                    started = time.perf_counter()
                    await usage.billable_units(store, key, start, end)
                    latencies[name].append((time.perf_counter() - started) * 1000)
            sink_rows_per_s = (_sink_rows() - rows_before) / (time.perf_counter() - measured)
        finally:
            load.terminate()
            load.wait()
            await sink.stop()
            for usage in (current, before):
                await usage.stop()
            await store.close()
    result: dict[str, Any] = {"stored_events": stored, "keys": keys, "offered_rate": rate,
                              "sink_rows_per_s": round(sink_rows_per_s)}  # fmt: skip
    for name, values in latencies.items():
        ordered = sorted(values)
        result[name] = {"p50_ms": round(statistics.median(ordered), 2),
                        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 2)}  # fmt: skip
    return result


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
    parser.add_argument("--calls", type=int, default=300, help="reads of each kind")
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
