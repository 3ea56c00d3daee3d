"""Sink throughput into embedded ClickHouse (chDB): rows per second from Kafka to committed offsets.

    make bench-sink            # or: python -m tests.perf.bench_sink --events 200000 --runs 3

Each run produces the events to a fresh topic, then times one `UsageSink` (in this process, on a
fresh chDB directory) from start until every offset is committed. Prints a table and merges the
medians into tests/perf/results.json under ``pipeline.sink``. Needs the local Kafka
(deploy/local/services.sh up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from ingest.events import encode
from processors.settings import SinkSettings
from processors.accounting.sink import UsageSink
from processors.topics import ensure_topics
from processors.accounting.store import UsageStore
from tests.factories import make_event

RESULTS = Path(__file__).with_name("results.json")
PARTITIONS = 4


async def produce(bootstrap: str, topic: str, events: int) -> None:
    await ensure_topics(bootstrap, {topic: PARTITIONS})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=20,
                                compression_type="lz4", max_batch_size=512 * 1024)  # fmt: skip
    await producer.start()
    now_ms = int(time.time() * 1000)
    try:
        deliveries = []
        for n in range(events):
            event = make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % 500}", event_time_ms=now_ms + n, cost=1 + n % 3)
            deliveries.append(await producer.send(topic, encode(event), key=event.api_key_id.encode()))
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


async def committed(bootstrap: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sum(meta.offset for meta in (await admin.list_consumer_group_offsets(group)).values() if meta.offset > 0)
    finally:
        await admin.close()


async def one_run(bootstrap: str, events: int, batch_max_rows: int) -> dict[str, float]:
    tag = secrets.token_hex(4)
    topic = f"bench-{tag}.events"
    await produce(bootstrap, topic, events)
    with tempfile.TemporaryDirectory() as directory:
        settings = SinkSettings(kafka_bootstrap=bootstrap, events_topic=topic, sink_group=f"bench-{tag}",
                                clickhouse_dsn=f"chdb://{directory}/chdb", sink_batch_max_rows=batch_max_rows)  # fmt: skip
        store = UsageStore(settings.clickhouse_dsn)
        await store.open()
        await store.migrate()
        sink = UsageSink(settings, store)
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        await sink.start()
        while await committed(bootstrap, settings.sink_group) < events:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        await sink.stop()
        [(rows,)] = await store.query("SELECT count() FROM usage_events")
        await store.close()
    assert rows == events, f"{rows} rows for {events} events"
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"seconds": elapsed, "rows_per_s": events / elapsed, "cpu_s_per_100k_rows": cpu_s / events * 100_000}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events per run")
    parser.add_argument("--runs", type=int, default=3, help="runs; the medians are reported")
    parser.add_argument("--batch-max-rows", type=int, default=SinkSettings.model_fields["sink_batch_max_rows"].default)
    args = parser.parse_args()
    bootstrap = os.environ.get("THROTTLEX_KAFKA_BOOTSTRAP", "127.0.0.1:9092")

    runs = []
    for n in range(1, args.runs + 1):
        runs.append(await one_run(bootstrap, args.events, args.batch_max_rows))
        print(f"run {n}/{args.runs}: {runs[-1]['rows_per_s']:,.0f} rows/s ({runs[-1]['seconds']:.2f} s)", flush=True)
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}

    print(f"\n| sink into chDB | events/run | batch max rows | median rows/s | median s | CPU s per 100k rows |")
    print(f"|---|---|---|---|---|---|")
    print(f"| throttlex sink | {args.events:,} | {args.batch_max_rows:,} | {median['rows_per_s']:,.0f} | "
          f"{median['seconds']:.2f} | {median['cpu_s_per_100k_rows']:.2f} |")  # fmt: skip

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault("machine", {}).update({"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()})
    results.setdefault("pipeline", {})["sink"] = {
        "rows_per_s": round(median["rows_per_s"]),
        "cpu_s_per_100k_rows": round(median["cpu_s_per_100k_rows"], 3),
        "events_per_run": args.events,
        "batch_max_rows": args.batch_max_rows,
        "runs": [{key: round(value, 3) for key, value in run.items()} for run in runs],
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
