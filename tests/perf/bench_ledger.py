"""The plan ledger's cost with N API replicas: this release (the sink publishes each batch's sums, every
replica reads the sums) beside the previous one (every replica reads every raw event).

    python -m tests.perf.bench_ledger        # or: make bench BENCH_ARGS=--only-ledger

``--events`` events (20,000 a second of event time) go to a fresh events topic of 4 partitions, for two key
spreads: Zipf over 10,000 keys, and 1,000,000 keys drawn uniformly (nearly every event of a batch a key of
its own: the sums save nothing). The sink's share is measured in this process on the sink's own code: the
events become the sink's Arrow rows, cut as the sink cuts them at that rate (a batch a partition a second,
5,000 events), and each batch's rollups are summed and published (`rollup_records` and the sink's producer
settings); the CPU counted is the summing and publishing only, librdkafka's threads included. Each replica's
share is a process of its own, started (and idle a second) before anything is sent, so that what is
measured is following rather than starting: this release's `RollupFollower` on the rollups topic and the
previous release's follower (from the repository's history) on the events topic, both following while
the events and rollups are published; its CPU (user + system) from then until its ledger has every batch,
over the events sent.

Reported per spread, medians of ``--runs`` rounds (releases interleaved): CPU-µs per event of each part, and
the whole ledger's cost for N replicas, beside one replica of the previous release. Needs the local Kafka
(deploy/local/services.sh up).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import encode
from throttlex.ingest.kafka_access import KafkaAccess
from throttlex.processors.accounting import rollups
from throttlex.processors.accounting.rows import event_rows
from tests.factories import make_event
from tests.previous_release import LEDGER_BEFORE_ROLLUPS, previous_release

PARTITIONS = 4
RATE = 20_000
BATCH = RATE // PARTITIONS  # the sink's batch at this rate: a partition's second (sink_flush_interval_s)
REPLICAS = (1, 2, 4, 8)
GOAL = 1.2

FOLLOWER_SCRIPT = """
import json, resource, sys, time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo
from throttlex.processors.accounting.ledger import PlanLedger

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

bootstrap, topic, partitions = sys.argv[1], sys.argv[2], range(int(sys.argv[3]))
ledger = PlanLedger(ZoneInfo("UTC"), datetime.now(UTC))
try:
    from throttlex.processors.accounting.rollups import topic_of
    from throttlex.processors.accounting.tail import RollupFollower
    follower = RollupFollower(bootstrap, topic_of(topic), {p: None for p in partitions}, {p: 0 for p in partitions}, ledger)
    read = lambda p: follower._counters[p].position
except ImportError:  # the previous release: every raw event
    from throttlex.processors.accounting.tail import TailFollower
    follower = TailFollower(bootstrap, topic, {p: 0 for p in partitions}, ledger)
    read = lambda p: follower._positions[p]
time.sleep(1.0)  # connected and fetching: what is measured from here on is following, not starting
print("ready", flush=True)
started, wall = cpu(), time.perf_counter()
ends = {int(p): end for p, end in json.loads(sys.stdin.readline()).items()}
while any(read(p) < end for p, end in ends.items()):
    if not follower.alive:
        raise SystemExit(f"the follower stopped: {follower.failure!r}")
    time.sleep(0.01)
cpu_s, wall_s = cpu() - started, time.perf_counter() - wall
month = ledger._months[max(ledger._months)]
print(json.dumps({"cpu_s": cpu_s, "wall_s": wall_s, "keys": len(month), "units": sum(month.values())}))
"""


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def spreads(events: int, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    zipf = rng.choices([f"key-{k:05d}" for k in range(10_000)], weights=[1 / (k + 1) for k in range(10_000)], k=events)
    return {"zipf_10k_keys": zipf, "uniform_1m_keys": [f"key-{rng.randrange(1_000_000):07d}" for _ in range(events)]}


def publish_events(bootstrap: str, topic: str, keys: list[str]) -> dict[int, list[tuple[int, bytes]]]:
    """Send one event per key (20,000 a second of event time, ending now); each partition's (offset, value)."""
    start_ms = wall_clock_ms() - len(keys) * 1000 // RATE
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 20,
                         "compression.type": "lz4"})  # fmt: skip
    written: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(PARTITIONS)}

    def delivered(error: object, message: Any) -> None:
        assert error is None, error
        written[message.partition()].append((message.offset(), message.value()))

    for n, key in enumerate(keys):
        value = encode(make_event(event_id=uuid.uuid4(), api_key_id=key, event_time_ms=start_ms + n * 1000 // RATE, cost=1 + n % 3))
        producer.produce(topic, value, key.encode(), on_delivery=delivered)
        if n % 10_000 == 0:
            producer.poll(0)
    producer.flush()
    return {p: sorted(records) for p, records in written.items()}


def sink_share(bootstrap: str, topic: str, written: dict[int, list[tuple[int, bytes]]]) -> float:
    """CPU seconds the sink spends summing and publishing the rollups of these records' batches."""
    batches = []
    for partition, records in written.items():
        for at in range(0, len(records), BATCH):
            part = records[at : at + BATCH]
            offsets = [offset for offset, _ in part]
            rows, _ = event_rows([value for _, value in part], offsets, partition, [wall_clock_ms()] * len(part))
            batches.append((partition, offsets[0], offsets[-1], pa.Table.from_batches([rows])))
    producer = Producer(rollups.producer_config(KafkaAccess.of(bootstrap)))
    started = _cpu_s()
    for partition, first, last, rows in batches:
        for key, value in rollups.rollup_records(rows, first, last):
            producer.produce(rollups.topic_of(topic), value, key, partition=partition)
        producer.poll(0)
    assert producer.flush(30) == 0
    return _cpu_s() - started


def start_replica(bootstrap: str, topic: str, pythonpath: str | None) -> subprocess.Popen[str]:
    """A replica's follower in a process of its own, following the (still empty) topics once it says ``ready``."""
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    process = subprocess.Popen([sys.executable, "-c", FOLLOWER_SCRIPT, bootstrap, topic, str(PARTITIONS)], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None and process.stdout.readline().strip() == "ready", "the follower did not start"
    return process


def replica_result(process: subprocess.Popen[str], ends: dict[int, int]) -> dict[str, float]:
    """Tell the replica where the topics end; its CPU from ``ready`` until its ledger has everything."""
    output, _ = process.communicate(json.dumps(ends) + "\n", timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"the follower failed (exit {process.returncode})")
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def run(bootstrap: str, runs: int, events: int, previous: Path) -> dict[str, Any]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    results: dict[str, Any] = {"events": events, "runs": runs, "batch_events": BATCH, "previous_release": LEDGER_BEFORE_ROLLUPS}
    for spread, keys in spreads(events, seed=5).items():
        rounds: dict[str, list[float]] = {"sink_share": [], "replica": [], "previous_replica": []}
        for _ in range(runs):
            topic = f"bench-ledger-{uuid.uuid4().hex[:8]}"
            for created in admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in (topic, rollups.topic_of(topic))]).values():
                created.result()
            replicas: dict[str, subprocess.Popen[str]] = {}
            try:
                replicas["previous"] = start_replica(bootstrap, topic, str(previous))
                replicas["this"] = start_replica(bootstrap, topic, None)
                written = publish_events(bootstrap, topic, keys)
                ends = {p: records[-1][0] + 1 for p, records in written.items() if records}
                rounds["sink_share"].append(sink_share(bootstrap, topic, written))
                previous_round, this_round = (replica_result(replicas[name], ends) for name in ("previous", "this"))
                counted = [(r["keys"], r["units"]) for r in (this_round, previous_round)]
                assert counted == [(len(set(keys)), sum(1 + n % 3 for n in range(len(keys))))] * 2, counted
                rounds["previous_replica"].append(previous_round["cpu_s"])
                rounds["replica"].append(this_round["cpu_s"])
            finally:
                for process in replicas.values():
                    process.kill()  # a follower that failed or hung: nothing is left running (a no-op once done)
                    process.wait()
                for deleted in admin.delete_topics([topic, rollups.topic_of(topic)]).values():
                    deleted.result()
        per_event = {name: statistics.median(values) * 1e6 / events for name, values in rounds.items()}
        previous_one = per_event["previous_replica"]
        results[spread] = {
            "cpu_us_per_event": {name: round(value, 3) for name, value in per_event.items()},
            "replicas": {
                str(n): {
                    "this_release_cpu_us": round(per_event["sink_share"] + n * per_event["replica"], 3),
                    "previous_release_cpu_us": round(n * previous_one, 3),
                    "this_release_vs_one_previous": round((per_event["sink_share"] + n * per_event["replica"]) / previous_one, 3),
                }
                for n in REPLICAS
            },
            "most_replicas_within_goal": int((GOAL * previous_one - per_event["sink_share"]) // per_event["replica"]),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="rounds per spread; medians are reported")
    parser.add_argument("--events", type=int, default=200_000, help="events per round")
    args = parser.parse_args()
    bootstrap = os.environ.get("THROTTLEX_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(bootstrap, args.runs, args.events, previous_release(Path(tmp), LEDGER_BEFORE_ROLLUPS)), indent=2))


if __name__ == "__main__":
    main()
