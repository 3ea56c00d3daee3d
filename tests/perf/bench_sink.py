"""Sink throughput into embedded ClickHouse (chDB): rows per second from Kafka to committed offsets.

    make bench-sink            # or: python -m tests.perf.bench_sink --events 1000000 --runs 3

The events are produced once to a fresh topic; each run then times one `UsageSink` reading all of them
(in this process, in a consumer group and on a chDB directory of its own, the garbage collector tuned
as the roles run it) from start until every offset is committed. A run includes the sink's start
(joining the group, loading the partitions' intents), which 200,000 events, as earlier versions of this
benchmark read, left a large part of it (measured on the same machine, 2026-11-30: 108,000-151,000 rows/s
over 200,000 events, 155,000-173,000 over a million). Prints a table and merges the
medians into tests/perf/results.json under ``pipeline.sink``. Needs the local Kafka
(deploy/local/services.sh up).

`formats` compares, without Kafka, what one 50,000-row insert costs in each form the sink could hand
ClickHouse: JSON rows re-encoded from the decoded events (the sink before), the events' own JSON bytes
with the Kafka position appended and parsed by ClickHouse, and an Arrow stream built from the decoded
events (the sink now). Every form validates the events with the contract's decoder first.
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
from typing import NamedTuple

import msgspec
import pyarrow as pa
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from throttlex.ingest.events import decode_valid, encode
from throttlex.processors.accounting.rows import EVENT_SCHEMA, arrow_stream, event_rows
from throttlex.processors.settings import SinkSettings
from throttlex.processors.accounting.sink import UsageSink
from throttlex.processors.tasks import share_interpreter_often, tune_gc
from throttlex.processors.topics import ensure_topics
from throttlex.processors.accounting.store import UsageStore
from tests.factories import make_event

RESULTS = Path(__file__).with_name("results.json")
PARTITIONS = 4
DEFAULT_BATCH_MAX_ROWS: int = SinkSettings.model_fields["sink_batch_max_rows"].default


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


class _Record(NamedTuple):
    offset: int
    value: bytes


class _JsonRow(msgspec.Struct):
    """The row the sink built before the Arrow stream: every field re-encoded as JSON."""

    event_id: uuid.UUID
    event_time: float
    api_key_id: str
    tenant: str
    route: str
    method: str
    status: int
    latency_ms: float
    response_bytes: int
    cost: int
    client_ip: str
    edge_blocked: bool
    plan: str
    schema_version: int
    kafka_partition: int
    kafka_offset: int


def _json_rows(records: list[_Record]) -> bytes:
    encode_row = msgspec.json.Encoder().encode
    rows = []
    for record in records:
        e = decode_valid(record.value)
        rows.append(encode_row(_JsonRow(e.event_id, e.event_time_ms / 1000, e.api_key_id, e.tenant, e.route, e.method,
                                        e.status, e.latency_ms, e.response_bytes, e.cost, e.client_ip, e.edge_blocked,
                                        e.plan, e.schema_version, 0, record.offset)))  # fmt: skip
    return b"\n".join(rows)


def _event_bytes(records: list[_Record]) -> bytes:
    rows = []
    for record in records:
        decode_valid(record.value)  # validated, then handed over as it came
        rows.append(record.value[:-1] + b',"kafka_partition":0,"kafka_offset":%d}' % record.offset)
    return b"\n".join(rows)


def _arrow(records: list[_Record]) -> bytes:
    rows, _ = event_rows([r.value for r in records], [r.offset for r in records], 0)
    return arrow_stream(pa.Table.from_batches([rows]))


_WIRE_COLUMNS = ["v", "event_id", "event_time_ms", *EVENT_SCHEMA.names[2:14], "kafka_partition", "kafka_offset"]
_READ_WIRE_EVENTS = [  # only in the benchmark's own database: lets ClickHouse read the events' own fields
    "ALTER TABLE usage_events ADD COLUMN event_time_ms Int64 EPHEMERAL",
    "ALTER TABLE usage_events ADD COLUMN v UInt8 EPHEMERAL 1",
    "ALTER TABLE usage_events MODIFY COLUMN event_time DateTime64(3, 'UTC') DEFAULT fromUnixTimestamp64Milli(event_time_ms, 'UTC')",
    "ALTER TABLE usage_events MODIFY COLUMN schema_version UInt8 DEFAULT v",
    "ALTER TABLE usage_events MODIFY COLUMN cost UInt32 DEFAULT 1",
]
FORMATS = {
    "json_rows": ("JSON rows re-encoded from the decoded events (the sink before)", _json_rows, "JSONEachRow", list(EVENT_SCHEMA.names)),
    "event_bytes": ("the events' own JSON, Kafka position appended", _event_bytes, "JSONEachRow", _WIRE_COLUMNS),
    "arrow": ("Arrow stream from the decoded events (the sink now)", _arrow, "ArrowStream", list(EVENT_SCHEMA.names)),
}  # fmt: skip


async def formats(rows: int = 50_000, runs: int = 3) -> dict[str, dict[str, float]]:
    """Median CPU-µs per row to build each form in Python and to insert it (ClickHouse, all its threads)."""
    now_ms = int(time.time() * 1000)
    records = [_Record(n, encode(make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % 500}", event_time_ms=now_ms + n)))
               for n in range(rows)]  # fmt: skip
    tune_gc()  # as the sink runs
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        store = UsageStore(f"chdb://{directory}/chdb")
        await store.open()
        try:
            await store.migrate()
            for statement in _READ_WIRE_EVENTS:
                await store.command(statement)
            for name, (_, build, fmt, columns) in FORMATS.items():
                build_us, insert_us = [], []
                for run in range(runs):
                    cpu = time.process_time()
                    data = build(records)
                    build_us.append((time.process_time() - cpu) / rows * 1e6)
                    cpu = _process_cpu_s()
                    await store.insert_formatted("usage_events", data, columns, fmt, dedup_token=f"{name}-{run}")
                    insert_us.append((_process_cpu_s() - cpu) / rows * 1e6)
                results[name] = {"build_cpu_us_per_row": statistics.median(build_us),
                                 "insert_cpu_us_per_row": statistics.median(insert_us)}  # fmt: skip
                results[name]["total_cpu_us_per_row"] = sum(results[name].values())
            [(stored,)] = await store.query("SELECT count() FROM usage_events")
        finally:
            await store.close()
    assert stored == rows * runs * len(FORMATS), f"{stored} rows stored"
    return results


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread: ClickHouse parses and writes on its own
    return usage.ru_utime + usage.ru_stime


async def committed(admin: AIOKafkaAdminClient, group: str) -> int:
    return sum(meta.offset for meta in (await admin.list_consumer_group_offsets(group)).values() if meta.offset > 0)


async def events_topic(bootstrap: str, events: int) -> str:
    """A fresh topic holding ``events`` events, for `one_run` to read as often as it is asked to."""
    topic = f"bench-{secrets.token_hex(4)}.events"
    await produce(bootstrap, topic, events)
    return topic


async def one_run(bootstrap: str, topic: str, events: int, batch_max_rows: int) -> dict[str, float]:
    """One sink from its start until it has committed all ``events`` on ``topic``."""
    tag = secrets.token_hex(4)
    with tempfile.TemporaryDirectory() as directory:
        settings = SinkSettings(kafka_bootstrap=bootstrap, events_topic=topic, sink_group=f"bench-{tag}",
                                clickhouse_dsn=f"chdb://{directory}/chdb", sink_batch_max_rows=batch_max_rows)  # fmt: skip
        store = UsageStore(settings.clickhouse_dsn)
        await store.open()
        await store.migrate()
        sink = UsageSink(settings, store)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        tune_gc()
        share_interpreter_often()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        await sink.start()
        while await committed(admin, settings.sink_group) < events:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        await admin.close()
        await sink.stop()
        [(rows,)] = await store.query("SELECT count() FROM usage_events")
        await store.close()
    assert rows == events, f"{rows} rows for {events} events"
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"seconds": elapsed, "rows_per_s": events / elapsed, "cpu_s_per_100k_rows": cpu_s / events * 100_000}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events per run (produced once, read by every run)")
    parser.add_argument("--runs", type=int, default=3, help="runs; the medians are reported")
    parser.add_argument("--batch-max-rows", type=int, default=DEFAULT_BATCH_MAX_ROWS)
    args = parser.parse_args()
    bootstrap = os.environ.get("THROTTLEX_KAFKA_BOOTSTRAP", "127.0.0.1:9092")

    print(f"producing {args.events:,} events", flush=True)
    topic = await events_topic(bootstrap, args.events)
    runs = []
    for n in range(1, args.runs + 1):
        runs.append(await one_run(bootstrap, topic, args.events, args.batch_max_rows))
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
    forms = await formats()
    print_formats(forms)
    results["pipeline"]["sink_formats"] = {name: {key: round(value, 2) for key, value in v.items()} for name, v in forms.items()}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


def print_formats(forms: dict[str, dict[str, float]]) -> None:
    print("\n| one 50,000-row insert into usage_events and its rollups | build, CPU-µs/row | insert, CPU-µs/row | total |")
    print("|---|---|---|---|")
    for name, v in forms.items():
        print(f"| {FORMATS[name][0]} | {v['build_cpu_us_per_row']:.2f} | {v['insert_cpu_us_per_row']:.2f} | "
              f"{v['total_cpu_us_per_row']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
