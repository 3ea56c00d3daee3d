"""The policy engine alone, per algorithm: memory per tracked key and CPU time per event.

    python -m tests.perf.bench_engine [--keys 20000] [--events 100000] [--runs 5]

No servers: the engine runs over a dict of live key states, as the worker runs it per partition.
For each algorithm:

- memory per key: Python heap growth (tracemalloc) after ``--keys`` keys each counted a few events,
  divided by the keys: the key string and its live `KeyState` with its windows. The size of the
  key's changelog record (`encode_key_state`) is reported separately.
- per-event cost: wall time of ``engine.apply`` (and `apply_forwarded` for the forwards it makes, as
  the worker owning those keys would) over ``--events`` in-order events spread over 1,000 keys (1 ms
  apart), median of ``--runs`` runs.

Prints a table and merges the results into tests/perf/results.json under ``engine``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
import uuid
from pathlib import Path

from throttlex.ingest.events import UsageEvent
from throttlex.processors.core.engine import PolicyEngine
from throttlex.processors.core.policy import PolicySet, load_policies, parse_policies
from throttlex.processors.core.state import encode_key_state
from tests.factories import make_event

RESULTS = Path(__file__).with_name("results.json")
SAMPLE = Path(__file__).parents[2] / "deploy" / "config" / "policies.yaml"
START_MS = 1_790_000_000_000

ALGORITHMS = {
    "sliding_window 60 s / 1 s buckets": "{type: sliding_window, limit: 1000000, window_s: 60, bucket_s: 1}",
    "sliding_window 10 s / 1 s buckets": "{type: sliding_window, limit: 1000000, window_s: 10, bucket_s: 1}",
    "fixed_window 1 h": "{type: fixed_window, limit: 1000000, window_s: 3600}",
    "token_bucket (GCRA, 5 s lateness)": "{type: token_bucket, rate_per_s: 1000000, burst: 1000000}",
    "quota month, Europe/Berlin": "{type: quota, period: month, time_zone: Europe/Berlin, limit: 1000000}",
}


def single(algorithm: str) -> PolicySet:
    return parse_policies(f"policies:\n  - name: p\n    key: [api_key]\n    algorithm: {algorithm}\n", "benchmark")


def memory_per_key(policies: PolicySet, keys: int) -> tuple[float, float]:
    """Heap bytes per key and encoded state bytes per key, after each key counted 5 events in 1 s."""
    events = [make_event(event_id=uuid.uuid4(), api_key_id=f"{n:024x}", event_time_ms=START_MS + 200 * i, cost=1)
              for n in range(keys) for i in range(5)]  # fmt: skip
    engine = PolicyEngine(policies)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    apply_everywhere(engine, events)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    encoded = sum(len(key) + len(encode_key_state(state)) for key, state in engine.state.items())
    return (after - before) / len(engine.state), encoded / len(engine.state)


def apply_everywhere(engine: PolicyEngine, events: list[UsageEvent]) -> None:
    for n, event in enumerate(events):
        outcome = engine.apply(event, (0, n))
        for forward in outcome.forwards:
            engine.apply_forwarded(forward, n, outcome)


def microseconds_per_event(policies: PolicySet, events: int, runs: int) -> float:
    stream = [make_event(event_id=uuid.uuid4(), api_key_id=f"{n % 1000:024x}", event_time_ms=START_MS + n, cost=1)
              for n in range(events)]  # fmt: skip
    timings = []
    for _ in range(runs):
        engine = PolicyEngine(policies)
        started = time.perf_counter()
        apply_everywhere(engine, stream)
        timings.append((time.perf_counter() - started) / events * 1e6)
    return statistics.median(timings)


def measure_all(keys: int, events: int, runs: int) -> dict[str, object]:
    cases = {name: single(algorithm) for name, algorithm in ALGORITHMS.items()}
    cases["the sample policy file (5 policies)"] = load_policies(SAMPLE)
    rows = {}
    print("| policy set | heap bytes per key | changelog record bytes per key | µs per event |")
    print("|---|---|---|---|")
    for name, policies in cases.items():
        heap, encoded = memory_per_key(policies, keys)
        cost = microseconds_per_event(policies, events, runs)
        rows[name] = {"heap_bytes_per_key": round(heap), "state_bytes_per_key": round(encoded), "us_per_event": round(cost, 2)}
        print(f"| {name} | {heap:,.0f} | {encoded:,.0f} | {cost:.2f} |", flush=True)
    return {"keys": keys, "events_per_run": events, "runs": runs, "policy_sets": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=20_000, help="keys for the memory measurement")
    parser.add_argument("--events", type=int, default=100_000, help="events per timing run")
    parser.add_argument("--runs", type=int, default=5, help="timing runs; the median is reported")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["engine"] = measure_all(args.keys, args.events, args.runs)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
