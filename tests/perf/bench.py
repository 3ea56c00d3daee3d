"""`make bench`: every ThrottleX benchmark next to what users would pick instead, in one run.

    make bench                                  # or: python -m tests.perf.bench [--quick]

Needs the local Kafka and Redis (`make bench` starts them) and `wrk` (`make bench` installs it from
Debian). Scenarios, each with medians over ``--runs`` runs, alternatives measured in the same run:

1. edge check per request: ThrottleX's cache vs `limits` (fixed window, moving window, sliding-window
   counter) vs a plain Redis GET, on the same Redis (`bench_edge`);
2. a real gateway under `wrk`: the bare app, ThrottleX's middleware and slowapi (`bench_gateway`; at
   least seven runs of 8 s each, since wrk's figures on a shared machine vary by ±20 % from run to run);
3. the policy engine alone: memory per key and CPU per event per algorithm (`bench_engine`);
4. pipeline: worker processes draining a backlog (1 and 2 workers), the floors of a Faust agent, a
   confluent-kafka loop and the worker's aiokafka loop (`bench_floor`), and the sink into chDB
   (`bench_pipeline`, `bench_sink`);
5. detection latency and overshoot at 1,000, 10,000 and 20,000 events/s (`bench_detection`);
6. CPU per request for the whole system beside `limits`' moving window (`bench_system`);
7. 100 edges resynchronising at once over 100,000 keys, this release beside the previous one (`bench_resync`);
8. the plan ledger's CPU with N API replicas: the sink's rollups beside every replica reading every raw
   event, the previous release's way (`bench_ledger`);
9. Envoy's rate-limit call: throttlex-rls beside envoyproxy/ratelimit, same Redis, same descriptors, same Go
   client (`bench_envoy`).

Prints a table per scenario, writes tests/perf/results.json and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from throttlex.processors.topics import ensure_topics
from tests.previous_release import LEDGER_BEFORE_ROLLUPS, PREVIOUS_RELEASE, previous_release
from tests.perf import (bench_detection, bench_edge, bench_engine, bench_envoy, bench_floor, bench_gateway, bench_ledger,
                        bench_pipeline, bench_quota, bench_resync, bench_sink, bench_system)

ROOT = Path(__file__).parents[2]
RESULTS = Path(__file__).with_name("results.json")
LEDGER_REPLICAS = 4
"""API replicas the plan ledger's goal is checked for (the ledger table gives 1 to 8)."""
REPORT = ROOT / "BENCHMARKS.md"
ENVOY_RUN_S = 8
"""Seconds per Envoy load measurement (scenario 9)."""


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2:3]
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gb": round(memory_kb / 1024 / 1024, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "kafka": "3.9.1 (KRaft, one broker on the same machine)", "redis": redis[0] if redis else "?"}  # fmt: skip


SINK_BATCHES = bench_sink.DEFAULT_BATCH_MAX_ROWS
SINK_SMALLER_BATCHES = 50_000
"""The default before batches were cut per partition and full (`processors.accounting.sink`), measured beside it."""


def sink(bootstrap: str, runs: int, events: int) -> dict[int, dict[str, float]]:
    """The sink's medians at the default batch size and at smaller batches, the runs interleaved."""
    topic = asyncio.run(bench_sink.events_topic(bootstrap, events))
    results: dict[int, list[dict[str, float]]] = {SINK_BATCHES: [], SINK_SMALLER_BATCHES: []}
    for n in range(runs):
        for batch, measured in results.items():
            measured.append(asyncio.run(bench_sink.one_run(bootstrap, topic, events, batch)))
            print(f"  sink run {n + 1}/{runs}, batches ≤ {batch:,}: {measured[-1]['rows_per_s']:,.0f} rows/s", flush=True)
    return {batch: {key: statistics.median(r[key] for r in measured) for key in measured[0]} for batch, measured in results.items()}


def accounting(bootstrap: str, runs: int, quick: bool) -> tuple[dict[int, dict[str, float]], dict[str, Any], dict[str, Any]]:
    """Tables 4b (the sink's rows), 4c (the insert formats) and 4d (the quota read)."""
    by_batch = sink(bootstrap, runs, 200_000 if quick else 1_000_000)
    forms = asyncio.run(bench_sink.formats(runs=runs))
    quota = asyncio.run(bench_quota.run(bootstrap, 1_000_000 if quick else 10_000_000, 10_000, 50_000,
                                        300 if quick else 1_000))  # fmt: skip
    return by_batch, {name: {k: round(v, 2) for k, v in r.items()} for name, r in forms.items()}, quota


def sink_results(by_batch: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    def figures(batch: int) -> dict[str, float]:
        return {"rows_per_s": round(by_batch[batch]["rows_per_s"]), "cpu_s_per_100k_rows": round(by_batch[batch]["cpu_s_per_100k_rows"], 2),
                "batch_max_rows": batch}  # fmt: skip

    return {"sink": figures(SINK_BATCHES), "sink_smaller_batches": figures(SINK_SMALLER_BATCHES)}


def _ms(value: float) -> str:
    return f"≥ {value:,.0f} (not within the wait)" if value >= 10_000 else f"{value:,.0f}"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


GATEWAY_RUNS_AT_LEAST = 7
GATEWAY_RUN_S = 8
"""wrk through one uvicorn process varies by ±20 % from run to run on a shared 2-core machine: seven
8-second runs per gateway, interleaved with the others', make the medians steadier than three of 10 s."""


def measure_gateway(runs: int, seconds: int, *, wsgi: bool = False) -> dict[str, dict[str, float]]:
    return bench_gateway.run(runs, seconds, 50, {"THROTTLEX_REDIS_PREFIX": "bench-gateway",
                                                 "THROTTLEX_REGISTRY_TOPIC": "bench-gateway.registry"},
                             tag=secrets.token_hex(4), wsgi=wsgi)  # fmt: skip


def gateway_results(gateway: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {name: {k: round(v, 2) for k, v in r.items()} for name, r in gateway.items()}


def gateway_ratios(gateway: dict[str, dict[str, float]]) -> dict[str, float]:
    throttlex = gateway["throttlex"]["req_per_s"]
    return {"gateway_vs_slowapi": round(throttlex / gateway["slowapi"]["req_per_s"], 2),
            "gateway_vs_bare_app": round(of_bare(gateway, "throttlex"), 2)}  # fmt: skip


def of_bare(gateway: dict[str, dict[str, float]], name: str) -> float:
    """A gateway's req/s as a share of the bare app's: the median of the rounds' paired ratios where
    measured (`bench_gateway`), else the ratio of the medians (results from before)."""
    return gateway[name].get("of_bare", gateway[name]["req_per_s"] / gateway["bare"]["req_per_s"])


CPU_SHARE = "the bare app's CPU-µs per request over this one's"


def cpu_share(gateway: dict[str, dict[str, float]], name: str) -> float:
    """What a CPU-bound app keeps of its capacity behind this gateway: the bare app's CPU per request over
    this one's (medians). Unlike req/s, it does not depend on how much of the shared machine the server got
    while wrk ran, only on what each request cost."""
    return gateway["bare"]["cpu_us_per_request"] / gateway[name]["cpu_us_per_request"]


def remeasure_gateway(runs: int, seconds: int) -> None:
    """The gateway scenario alone, replacing its figures (and the ratios made from them) in results.json."""
    results = json.loads(RESULTS.read_text())
    gateway = measure_gateway(runs, seconds)
    results["gateway"] = gateway_results(gateway)
    results["gateway_wsgi"] = gateway_results(measure_gateway(runs, seconds, wsgi=True))
    results["ratios"].update(gateway_ratios(gateway))
    results["gateway_runs"] = runs
    results["gateway_measured_apart"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    REPORT.write_text(report(results))
    print(REPORT.read_text())
    print(f"wrote {RESULTS} and {REPORT}")


def remeasure_accounting(bootstrap: str, runs: int, quick: bool) -> None:
    """The sink, its insert formats and the quota read alone, replacing their figures (and the whole system's
    CPU per request, which counts the sink's) in results.json."""
    results = json.loads(RESULTS.read_text())
    by_batch, results["pipeline"]["sink_formats"], results["quota"] = accounting(bootstrap, runs, quick)
    results["pipeline"].update(sink_results(by_batch))
    write_measured_apart(results, "accounting", "sink", by_batch[SINK_BATCHES]["cpu_s_per_100k_rows"] * 10)


def write_measured_apart(results: dict[str, Any], part: str, role: str, cpu_us: float) -> None:
    """Results with ``part`` measured again apart from the rest: the whole system's CPU per request takes the
    role's new figure, the date is noted, results.json and BENCHMARKS.md are written."""
    cpu = results["system_cpu_us_per_request"]
    cpu["throttlex"][role] = round(cpu_us, 1)
    cpu["throttlex"]["total"] = round(sum(v for k, v in cpu["throttlex"].items() if k != "total"), 1)
    results["ratios"]["system_cpu_limits_vs_throttlex"] = round(cpu["limits_moving_window"]["total_cpu_us"] / cpu["throttlex"]["total"], 2)
    results[f"{part}_measured_apart"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    REPORT.write_text(report(results))
    print(REPORT.read_text())
    print(f"wrote {RESULTS} and {REPORT}")


def worker_ratios(worker: dict[str, dict[str, float]]) -> dict[str, float]:
    sample, previous = worker["sample_policies"], worker["previous_release_sample_policies"]
    return {
        "worker_2_vs_1": round(worker["scale_out_2_workers"]["events_per_s"] / sample["events_per_s"], 2),
        "worker_vs_previous_release": round(sample["events_per_s"] / previous["events_per_s"], 2),
        "worker_cpu_us_per_event_added": round(sample["cpu_us_per_event"] - previous["cpu_us_per_event"], 2),
    }


def remeasure_worker(bootstrap: str, redis_url: str, runs: int, quick: bool) -> None:
    """The workers (this release's, and the previous release's beside it) and detection alone, replacing their
    figures (and the whole system's CPU per request, which counts the worker's) in results.json."""
    results = json.loads(RESULTS.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        worker = asyncio.run(bench_pipeline.run(bootstrap, redis_url, runs, 150_000 if quick else 400_000,
                                                previous=previous_release(Path(tmp))))  # fmt: skip
    print("detection", flush=True)
    detection = asyncio.run(bench_detection.run(bootstrap, redis_url, [1_000, 10_000, 20_000]))
    results["pipeline"]["worker"] = {name: {k: round(v, 2) for k, v in r.items()} for name, r in worker.items()}
    results["detection"] = detection_results(detection)
    results["ratios"].update(worker_ratios(worker))
    write_measured_apart(results, "worker", "worker", worker["sample_policies"]["cpu_us_per_event"])


def measure_resync(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return bench_resync.run(max(runs, 5), previous_release(Path(tmp)))


def remeasure_resync(runs: int) -> None:
    """The edges' resync alone (scenario 7), added to or replaced in results.json."""
    results = json.loads(RESULTS.read_text())
    results["resync"] = measure_resync(runs)
    results["resync_measured_apart"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    REPORT.write_text(report(results))
    print(REPORT.read_text())
    print(f"wrote {RESULTS} and {REPORT}")


def measure_ledger(bootstrap: str, runs: int, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        previous = previous_release(Path(tmp), LEDGER_BEFORE_ROLLUPS)
        return bench_ledger.run(bootstrap, runs, 50_000 if quick else 200_000, previous)


def remeasure_ledger(bootstrap: str, runs: int, quick: bool) -> None:
    """The plan ledger with N replicas alone (scenario 8), added to or replaced in results.json."""
    results = json.loads(RESULTS.read_text())
    results["ledger"] = measure_ledger(bootstrap, runs, quick)
    results["ledger_measured_apart"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    REPORT.write_text(report(results))
    print(REPORT.read_text())
    print(f"wrote {RESULTS} and {REPORT}")


def detection_results(detection: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {
        "p99_ms_at_10k_eps": round(detection["10000"]["p99_ms"], 1),
        "overshoot_requests_at_10k_eps": detection["10000"]["overshoot_requests_max"],
        "by_rate": {rate: {k: round(v, 1) for k, v in r.items()} for rate, r in detection.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario; medians are reported")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs, to try the benchmark out")
    parser.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from results.json")
    parser.add_argument("--only-gateway", action="store_true",
                        help="measure the gateway scenario (2.) alone and replace it in results.json; the report "
                             "says when it was measured apart from the rest")  # fmt: skip
    parser.add_argument("--only-accounting", action="store_true",
                        help="measure the sink, its insert formats and the quota read (4b-4d) alone and replace them "
                             "in results.json; the report says when they were measured apart from the rest")  # fmt: skip
    parser.add_argument("--only-worker", action="store_true",
                        help="measure the workers (this release's and the previous release's beside it) and detection "
                             "alone and replace them in results.json; the report says when they were measured apart")  # fmt: skip
    parser.add_argument("--only-resync", action="store_true",
                        help="measure the edges' resync (7.), this release's and the previous one's, alone and put it "
                             "in results.json; the report says when it was measured apart")  # fmt: skip
    parser.add_argument("--only-ledger", action="store_true",
                        help="measure the plan ledger with N API replicas (8.), this release's and the previous one's, "
                             "alone and put it in results.json; the report says when it was measured apart")  # fmt: skip
    parser.add_argument("--only-envoy", action="store_true",
                        help="measure throttlex-rls beside envoyproxy/ratelimit (9.) alone and put it in results.json; "
                             "the report says when it was measured apart")  # fmt: skip
    args = parser.parse_args()
    if args.report_only:
        REPORT.write_text(report(json.loads(RESULTS.read_text())))
        print(f"wrote {REPORT}")
        return
    runs = 1 if args.quick else args.runs
    gateway_runs = 1 if args.quick else max(runs, GATEWAY_RUNS_AT_LEAST)
    if args.only_gateway:
        remeasure_gateway(gateway_runs, 5 if args.quick else GATEWAY_RUN_S)
        return
    if args.only_resync:
        remeasure_resync(runs)
        return
    bootstrap = os.environ.get("THROTTLEX_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    redis_url = os.environ.get("THROTTLEX_REDIS_URL", "redis://127.0.0.1:6379/0")
    if args.only_accounting:
        remeasure_accounting(bootstrap, runs, args.quick)
        return
    if args.only_ledger:
        remeasure_ledger(bootstrap, runs, args.quick)
        return
    if args.only_worker:
        remeasure_worker(bootstrap, redis_url, runs, args.quick)
        return
    if args.only_envoy:
        remeasure_envoy(bootstrap, redis_url, runs, args.quick)
        return

    print("1/9 edge check", flush=True)
    edge = asyncio.run(bench_edge.run(redis_url, runs, 5_000 if args.quick else 20_000))
    print("2/9 gateway", flush=True)
    gateway = measure_gateway(gateway_runs, 5 if args.quick else GATEWAY_RUN_S)
    gateway_wsgi = measure_gateway(gateway_runs, 5 if args.quick else GATEWAY_RUN_S, wsgi=True)
    print("3/9 policy engine", flush=True)
    engine = bench_engine.measure_all(keys=5_000 if args.quick else 20_000, events=20_000 if args.quick else 100_000, runs=runs)
    print("4/9 pipeline", flush=True)
    floors = bench_floor.run(bootstrap, runs, 100_000 if args.quick else 300_000)
    with tempfile.TemporaryDirectory() as tmp:
        worker = asyncio.run(bench_pipeline.run(bootstrap, redis_url, runs, 150_000 if args.quick else 400_000,
                                                previous=previous_release(Path(tmp))))  # fmt: skip
    sink_by_batch, sink_formats, quota = accounting(bootstrap, runs, args.quick)
    sink_rows = sink_by_batch[SINK_BATCHES]
    print("5/9 detection", flush=True)
    detection = asyncio.run(bench_detection.run(bootstrap, redis_url, [1_000, 10_000, 20_000]))
    print("6/9 whole system", flush=True)
    system = asyncio.run(bench_system.run(bootstrap, redis_url, runs, 20_000 if args.quick else 100_000))
    print("7/9 edge resync", flush=True)
    resync = measure_resync(runs)
    print("8/9 plan ledger with N API replicas", flush=True)
    ledger = measure_ledger(bootstrap, runs, args.quick)
    print("9/9 Envoy's rate-limit call", flush=True)
    envoy = bench_envoy.run(bootstrap, redis_url, runs, 5 if args.quick else ENVOY_RUN_S)

    limits_moving = edge["limits_moving_window"]["checks_per_s"]
    throttlex_cpu = {"gateway": system["throttlex_gateway"]["cpu_us"],
                     "worker": worker["sample_policies"]["cpu_us_per_event"],
                     "sink": sink_rows["cpu_s_per_100k_rows"] * 10}  # fmt: skip
    results = {
        "machine": machine(),
        "runs": runs,
        "gateway_runs": gateway_runs,
        "edge_check": {name: {k: round(v, 3) for k, v in r.items()} for name, r in edge.items()},
        "gateway": gateway_results(gateway),
        "gateway_wsgi": gateway_results(gateway_wsgi),
        "engine": engine,
        "pipeline": {
            "floors": {name: {k: round(v, 2) for k, v in r.items()} for name, r in floors.items()},
            "worker": {name: {k: round(v, 2) for k, v in r.items()} for name, r in worker.items()},
            **sink_results(sink_by_batch),
            "sink_formats": sink_formats,
        },  # fmt: skip
        "quota": quota,
        "detection": detection_results(detection),
        "resync": resync,
        "ledger": ledger,
        "envoy": envoy,
        "system_cpu_us_per_request": {
            "throttlex": {**{k: round(v, 1) for k, v in throttlex_cpu.items()}, "total": round(sum(throttlex_cpu.values()), 1)},
            "limits_moving_window": {k: round(v, 1) for k, v in system["limits_moving_window"].items()},
        },
        "ratios": {
            "edge_check_vs_limits_moving_window": round(edge["throttlex"]["checks_per_s"] / limits_moving, 1),
            **gateway_ratios(gateway),
            **worker_ratios(worker),
            "system_cpu_limits_vs_throttlex": round(system["limits_moving_window"]["total_cpu_us"] / sum(throttlex_cpu.values()), 2),
        },
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    REPORT.write_text(report(results))
    print(REPORT.read_text())
    print(f"wrote {RESULTS} and {REPORT}")


def sink_rows(r: dict[str, Any]) -> list[list[str]]:
    """Table 4b's sink rows: the default batch size, and smaller batches where they were measured beside it."""
    apart = r.get("accounting_measured_apart")
    when = f"; measured apart from the rest, {apart}" if apart else ""
    rows = []
    for name, note in (("sink", "the default"), ("sink_smaller_batches", "the default before")):
        if name in r["pipeline"]:
            v = r["pipeline"][name]
            rows.append([f"sink into chDB (batches ≤ {v.get('batch_max_rows', 50_000):,}, {note}{when})",
                         f"{v['rows_per_s']:,} rows/s", f"{v['cpu_s_per_100k_rows'] * 10:.1f} per row"])  # fmt: skip
    return rows


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    parts = [
        "# ThrottleX benchmarks\n",
        "Produced by `make bench` (`tests/perf/bench.py`); numbers are medians of "
        f"{r['runs']} runs, every alternative measured in the same run. Machine: {m['cpus']} × {m['cpu_model']}, "
        f"{m['memory_gb']} GB, {m['platform']}, Python {m['python']}, Kafka {m['kafka']}, Redis {m['redis']}, "
        "everything on one machine. Raw figures: `tests/perf/results.json`.\n",
    ]
    e = r["edge_check"]
    parts.append(table("1. Edge check per request (one process, same Redis)",
                       ["check", "checks/s", "p50 µs", "p99 µs", "Redis commands per check"],
                       [[name, f"{v['checks_per_s']:,.0f}", f"{v['p50_us']:.1f}", f"{v['p99_us']:.1f}",
                         f"{v['redis_cmds_per_check']:.2f}"] for name, v in e.items()]))  # fmt: skip
    g = r["gateway"]
    apart = r.get("gateway_measured_apart")
    runs = r.get("gateway_runs", r["runs"])
    when = f"; measured apart from the rest, {apart}" if apart else ""
    parts.append(table(f"2. Through a gateway (uvicorn, one process; wrk -t2 -c50 --latency on loopback, same route; medians of {runs} runs{when})",
                       ["gateway", "req/s", "of the bare app's (median of paired runs)", "p50 ms", "p99 ms", "max ms", "CPU-µs per request",
                        CPU_SHARE, "Kafka broker CPU-µs per request", "non-2xx", "events on the topic / requests accounted"],
                       [[GATEWAY_NAMES.get(name, name), f"{v['req_per_s']:,.0f}", f"{of_bare(g, name):.0%}", f"{v['p50_ms']:.2f}",
                         f"{v['p99_ms']:.2f}", f"{v['max_ms']:.1f}", f"{v['cpu_us_per_request']:.0f}", f"{cpu_share(g, name):.0%}",
                         f"{v['broker_cpu_us_per_request']:.0f}" if "broker_cpu_us_per_request" in v else "–", f"{v['non_2xx']:.0f}",
                         f"{v['events_emitted']:,.0f} / {v['requests_accounted']:,.0f}" if "events_emitted" in v else "–"]
                        for name, v in g.items()]))  # fmt: skip
    if "gateway_wsgi" in r:
        w = r["gateway_wsgi"]
        parts.append(table(f"2b. The WSGI middleware: a Flask app under waitress ({bench_gateway.WAITRESS_THREADS} threads, one process), "
                           f"bare and behind ThrottleX (registry keys); same wrk settings, medians of {runs} runs{when}",
                           ["gateway", "req/s", "of the bare app's (median of paired runs)", "p50 ms", "p99 ms", "max ms",
                            "CPU-µs per request", CPU_SHARE, "events on the topic / requests accounted"],
                           [[WSGI_NAMES[name], f"{v['req_per_s']:,.0f}", f"{of_bare(w, name):.0%}", f"{v['p50_ms']:.2f}",
                             f"{v['p99_ms']:.2f}", f"{v['max_ms']:.1f}", f"{v['cpu_us_per_request']:.0f}", f"{cpu_share(w, name):.0%}",
                             f"{v['events_emitted']:,.0f} / {v['requests_accounted']:,.0f}" if "events_emitted" in v else "–"]
                            for name, v in w.items()]))  # fmt: skip
    parts.append(table("3. Policy engine alone, per algorithm",
                       ["policy set", "heap bytes per key", "encoded state bytes per key", "µs per event"],
                       [[name, f"{v['heap_bytes_per_key']:,}", f"{v['state_bytes_per_key']:,}", f"{v['us_per_event']:.1f}"]
                        for name, v in r["engine"]["policy_sets"].items()]))  # fmt: skip
    p = r["pipeline"]
    f = p["floors"]
    parts.append(table("4a. Floors: read the events topic and decode every event, nothing else (one process each)",
                       ["consumer", "events/s", "CPU-µs per event"],
                       [[bench_floor.CONSUMERS[name], f"{v['events_per_s']:,.0f}", f"{v['cpu_us_per_event']:.2f}"]
                        for name, v in f.items()]))  # fmt: skip
    w = p["worker"]
    names = {"sample_policies": "sample policy file (2 of 5 policies regrouped), 1 worker",
             "per_key_policies": "3 policies keyed on api_key, 1 worker", "no_policies": "no policies, 1 worker",
             "scale_out_2_workers": "sample policy file, 2 workers on the 4 + 4 partitions",
             "previous_release_sample_policies": f"the previous release ({PREVIOUS_RELEASE}: changelog outside transactions), "
                                                 "sample policy file, 1 worker"}  # fmt: skip
    apart = r.get("worker_measured_apart")
    when = f"; measured apart from the rest, {apart}" if apart else ""
    parts.append(table(f"4b. Workers draining a backlog (the worker's own metrics; CPU of the worker processes{when})",
                       ["case", "events/s", "CPU-µs per event"],
                       [[names[name], f"{v['events_per_s']:,.0f}", f"{v['cpu_us_per_event']:.1f}"] for name, v in w.items()]
                       + sink_rows(r)))  # fmt: skip
    if "sink_formats" in p:
        parts.append(table("4c. What one 50,000-row insert into `usage_events` (and the rollups it feeds) costs, by the form the sink hands ClickHouse",
                           ["form (every one validates each event with the contract's decoder first)", "build in Python, CPU-µs/row",
                            "insert, CPU-µs/row (ClickHouse, all threads)", "total"],
                           [[bench_sink.FORMATS[name][0], f"{v['build_cpu_us_per_row']:.2f}", f"{v['insert_cpu_us_per_row']:.2f}",
                             f"{v['total_cpu_us_per_row']:.2f}"] for name, v in p["sink_formats"].items()]))  # fmt: skip
    if "quota" in r:
        q = r["quota"]
        parts.append(table(f"4d. A key's plan-quota usage for the month, {q['stored_events']:,} events of {q['keys']:,} keys stored, "
                           f"while the sink stores {q['sink_rows_per_s']:,} rows/s (offered {q['offered_rate']:,}), one process",
                           ["read", "p50 ms", "p99 ms"],
                           [["now: every key's plan month kept in memory (the ledger), fed by the follower",
                             f"{q['current']['p50_ms']:.1f}", f"{q['current']['p99_ms']:.1f}"],
                            [f"before: the key's per-minute rollups in ClickHouse and the unstored tail, per call (commit {q['before']['measured_at']})",
                             f"{q['before']['p50_ms']:.1f}", f"{q['before']['p99_ms']:.1f}"],
                            [f"before that: the key's raw rows and the partition's unstored records on Kafka, per call (commit {q['raw_scan']['measured_at']})",
                             f"{q['raw_scan']['p50_ms']:.1f}", f"{q['raw_scan']['p99_ms']:.1f}"]]))  # fmt: skip
        parts.append("What `GET /v1/quota` spends on the plan quota, measured on `ExactUsage` in the process that runs the "
                     f"sink (started on a loop thread of its own as `throttlex run` does; it reads and inserts on threads of its own): {q['reads']:,} reads of random keys, one every "
                     "20 ms, each one's latency counted from when it was due, so waiting for the event loop counts. The "
                     f"ledger loaded in {q['ledger_load_s']:.1f} s (once, at start-up) and its follower caught up "
                     f"{q['catch_up_s']:.1f} s later. The earlier reads were measured by the same bench at the commits named"
                     + (" (measured alone, by `python -m tests.perf.bench_quota`, after the full run)" if q.get("measured_alone") else "")
                     + ".\n")  # fmt: skip
    if "worker_vs_previous_release" in r["ratios"]:
        parts.append(f"This release's worker against the previous release's, same run, sample policies: "
                     f"{r['ratios']['worker_vs_previous_release']}× the events/s, "
                     f"{r['ratios']['worker_cpu_us_per_event_added']:+.2f} CPU-µs per event, for three things together: writing "
                     "the changelog and committing offsets in one transaction per input partition (the fence against a "
                     "stalled worker), the enforcement time, and counting every event: the previous release dropped a "
                     "regrouped key's events that came more than 5 s out of order (25,013 event/policy pairs in one run "
                     "of this backlog), where a token bucket now replays its history from each out-of-order event.\n")
    parts.append(f"Two workers against one: {r['ratios']['worker_2_vs_1']}× (the machine has 2 cores and runs Kafka "
                 "and Redis too).\n")  # fmt: skip
    d = r["detection"]["by_rate"]
    parts.append(table("5. Detection: event over the limit → block in an edge cache (limit 50 / 10 s, hot keys at 200 req/s)",
                       ["background events/s", "p50 ms", "p99 ms", "max ms", "overshoot median", "overshoot max"],
                       [[f"{int(rate):,}", _ms(v["p50_ms"]), _ms(v["p99_ms"]), _ms(v["max_ms"]),
                         f"{v['overshoot_requests_median']:.0f}", f"{v['overshoot_requests_max']:.0f}"] for rate, v in d.items()]))  # fmt: skip
    parts.append("A latency of ≥ 10,000 ms means the block did not appear within the 10 s the benchmark waits. "
                 "The background load comes from a process of its own; this one plays the gateway.\n")  # fmt: skip
    c = r["system_cpu_us_per_request"]
    t, lm = c["throttlex"], c["limits_moving_window"]
    parts.append(table("6. CPU per request, whole system",
                       ["system", "where", "CPU-µs per request"],
                       [["ThrottleX", "gateway: edge check + event + emit to Kafka", f"{t['gateway']:.1f}"],
                        ["ThrottleX", "worker (sample policy file)", f"{t['worker']:.1f}"],
                        ["ThrottleX", "sink into chDB", f"{t['sink']:.1f}"],
                        ["ThrottleX", "**total**", f"**{t['total']:.1f}**"],
                        ["limits moving window", "client (`hit`)", f"{lm['client_cpu_us']:.1f}"],
                        ["limits moving window", "Redis server (`INFO cpu`)", f"{lm['redis_cpu_us']:.1f}"],
                        ["limits moving window", "**total**", f"**{lm['total_cpu_us']:.1f}**"]]))  # fmt: skip
    if "resync" in r:
        v = r["resync"]
        apart = r.get("resync_measured_apart")
        when = f"; measured apart from the rest, {apart}" if apart else ""
        names = {"previous_release": f"previous release ({PREVIOUS_RELEASE}): SCAN of the keyspace",
                 "this_release": "this release: the block index"}  # fmt: skip
        parts.append(table(f"7. Edge resync: {v['edges']} edges at once, {v['keys']:,} keys in Redis of which {v['blocks']:,} "
                           f"blocks (as after a failover; a Redis of its own; medians of {v['runs']} rounds{when})",
                           ["edges", "all resynced after", "Redis CPU for the round", "Redis CPU-µs per edge", "Redis commands per edge"],
                           [[names[name], f"{v[name]['resync_all_edges_ms']:,.0f} ms", f"{v[name]['redis_cpu_ms']:,.0f} ms",
                             f"{v[name]['redis_cpu_us_per_edge']:,.0f}", f"{v[name]['redis_commands_per_edge']:,.1f}"]
                            for name in ("previous_release", "this_release")]))  # fmt: skip
    if "ledger" in r:
        v = r["ledger"]
        apart = r.get("ledger_measured_apart")
        when = f"; measured apart from the rest, {apart}" if apart else ""
        spreads = {"zipf_10k_keys": "Zipf over 10,000 keys", "uniform_1m_keys": "1,000,000 keys, uniform"}
        rows = []
        for name, label in spreads.items():
            c = v[name]["cpu_us_per_event"]
            rows.append([label, "sink: sum and publish the rollups (this release)", f"{c['sink_share']:.2f}", ""])
            rows.append([label, "one replica: read the rollups (this release)", f"{c['replica']:.2f}", ""])
            rows.append([label, "one replica: read every event (previous release)", f"{c['previous_replica']:.2f}", ""])
            for n, x in v[name]["replicas"].items():
                rows.append([label, f"**{n} replica(s)**: this release / previous release", f"{x['this_release_cpu_us']:.2f} / "
                             f"{x['previous_release_cpu_us']:.2f}", f"{x['this_release_vs_one_previous']:.2f}×"])  # fmt: skip
            rows.append([label, "most replicas within 1.2× one replica of the previous release", "",
                         f"{v[name]['most_replicas_within_goal']}"])  # fmt: skip
        parts.append(table(f"8. Plan ledger with N API replicas: CPU-µs per event sent ({v['events']:,} events at 20,000/s of "
                           f"event time, sink batches of {v['batch_events']:,}; previous release {v['previous_release']}: "
                           f"every replica reads every event; medians of {v['runs']} rounds{when})",
                           ["keys", "part", "CPU-µs per event", "vs one replica of the previous release"], rows))  # fmt: skip
    if "envoy" in r:
        parts.append(envoy_report(r["envoy"], r.get("envoy_measured_apart")))
    parts.append(table("Goals", ["goal", "measured", "met"], goals(r)))
    parts.append(PROFILE)
    return "\n".join(parts)


PROFILE = """### What the profiles showed

`py-spy record` on one worker draining a backlog, and on the gateways under `wrk`; the fixes are in the
history of `processors/worker/`, `processors/core/` and `ingest/`:

- A token bucket fed from several events partitions sees its events out of order; replaying its
  pending events on every out-of-order one took half the CPU. Now it replays only when a decision
  needs the exact value, and keeps its pending events as parallel lists, written by slicing.
- Python's young-generation collection ran every 700 allocations over a heap of millions of live
  window objects: raising the threshold to 100,000 took about a fifth of the CPU off.
- The detection tail was the consumer, not the flush: aiokafka sends a broker no new fetch while the
  application still has records of it to take, so records left in the consumer made fetches wait
  40–100 ms at 10,000 events/s. The worker now takes them at once (p99 ~150 → ~70 ms).
- State flushes build the changelog's record batches directly (no future per record) and yield to
  the consumer loop every 200 keys; live usage is one string per key (three arguments per key to the
  script instead of two per window).
- A key over its limit takes a decision on every event: those are counted once a batch, not with a
  labelled metric per event.
- The gateway's aiokafka producer spent ~30 µs of Python per request (partitioner, a future and a
  callback per record); librdkafka does that work in C in its own thread (table 6).
- The middleware then still cost ~59 CPU-µs per request over the bare app (the app driven in-process,
  no HTTP server, librdkafka's threads included), ~25 µs after these fixes:
  handing librdkafka one event per request, between the requests' other work, cost twice what handing
  it the events of a turn of the event loop together does (~27 events a turn under wrk); `uuid.uuid4`'s
  `os.urandom` system call was the largest single cost (event ids now come from Python's `random`,
  seeded per process and after a fork); the key id hash is remembered per key; the key cache is a
  plain dictionary; request counts are integer adds read at scrape time instead of a locked
  prometheus_client `Counter` per request.
- What remains in the worker is spread thin: aiokafka's record objects and msgspec decoding (the
  `no policies` row, ~4 µs per event) and the policies' window arithmetic in Python (table 3).
"""


WSGI_NAMES = {"bare": "Flask app (no rate limiter)", "throttlex": "Flask app behind ThrottleX (registry keys)"}
GATEWAY_NAMES = {"bare": "bare app (no rate limiter)", "throttlex": "ThrottleX (registry keys)",
                 "throttlex_any_key": "ThrottleX (any key)", "slowapi": "slowapi (limits, moving window)"}  # fmt: skip


def goals(r: dict[str, Any]) -> list[list[str]]:
    """The issue's targets against this run's figures."""
    e, p = r["edge_check"], r["pipeline"]
    w = p["worker"]
    ratio = e["throttlex"]["checks_per_s"] / e["limits_moving_window"]["checks_per_s"]
    by_rate = r["detection"]["by_rate"]
    system = r["system_cpu_us_per_request"]
    share = system["throttlex"]["total"] / system["limits_moving_window"]["total_cpu_us"]
    g = r["gateway"]
    tx, bare = g["throttlex"], g["bare"]
    rows = [
        ("gateway: ThrottleX (registry keys) ≥ 90 % of the bare app's req/s", f"{of_bare(g, 'throttlex'):.0%}",
         of_bare(g, "throttlex") >= 0.9),
        ("gateway: p99 within 1.5× the bare app's", f"{tx['p99_ms']:.2f} vs {bare['p99_ms']:.2f} ms",
         tx["p99_ms"] <= 1.5 * bare["p99_ms"]),
        ("gateway: max latency within 1.5× the bare app's", f"{tx['max_ms']:.1f} vs {bare['max_ms']:.1f} ms",
         tx["max_ms"] <= 1.5 * bare["max_ms"]),
        ("gateway: an event on the topic for every request accounted",
         f"{tx['events_emitted']:,.0f} / {tx['requests_accounted']:,.0f}", tx["events_emitted"] == tx["requests_accounted"]),
        ("edge check: 0 Redis commands per check", f"{e['throttlex']['redis_cmds_per_check']:.2f}", e["throttlex"]["redis_cmds_per_check"] == 0),
        ("edge check: ≥ 20× limits' moving window", f"{ratio:,.0f}×", ratio >= 20),
        ("edge check: p99 < 50 µs", f"{e['throttlex']['p99_us']:.1f} µs", e["throttlex"]["p99_us"] < 50),
        ("worker: ≥ 50,000 events/s per process (sample policies)", f"{w['sample_policies']['events_per_s']:,.0f}",
         w["sample_policies"]["events_per_s"] >= 50_000),
        ("worker: < 20 CPU-µs per event (sample policies)", f"{w['sample_policies']['cpu_us_per_event']:.1f}",
         w["sample_policies"]["cpu_us_per_event"] < 20),
        ("worker: ≥ 100,000 events/s per process (policies on api_key)", f"{w['per_key_policies']['events_per_s']:,.0f}",
         w["per_key_policies"]["events_per_s"] >= 100_000),
        ("sink: ≥ 200,000 rows/s into chDB", f"{p['sink']['rows_per_s']:,}", p["sink"]["rows_per_s"] >= 200_000),
        *([("quota: plan usage read p99 < 20 ms (10 M events stored, sink storing 50,000 rows/s)",
            f"{r['quota']['current']['p99_ms']:.1f} ms", r["quota"]["current"]["p99_ms"] < 20)] if "quota" in r else []),
        ("detection: p99 < 100 ms at 10,000 events/s", _ms(by_rate["10000"]["p99_ms"]), by_rate["10000"]["p99_ms"] < 100),
        ("whole system: ThrottleX ≤ 1/5 of limits' CPU per request", f"{share:.2f} of it", share <= 0.2),
        *[(f"plan ledger, {label}: {LEDGER_REPLICAS} API replicas ≤ 1.2× one replica's cost (previous release)",
           f"{r['ledger'][name]['replicas'][str(LEDGER_REPLICAS)]['this_release_vs_one_previous']:.2f}×",
           r["ledger"][name]["replicas"][str(LEDGER_REPLICAS)]["this_release_vs_one_previous"] <= 1.2)
          for name, label in (("zipf_10k_keys", "Zipf keys"), ("uniform_1m_keys", "uniform keys")) if "ledger" in r],
        *(envoy_goals(r["envoy"]) if "envoy" in r else []),
    ]  # fmt: skip
    return [[goal, measured, "yes" if met else "no"] for goal, measured, met in rows]


RLS, INCUMBENT = "throttlex-rls", "envoyproxy/ratelimit"


def _service_cpu(row: dict[str, float]) -> float:
    return row["service_cpu_us"] + row["redis_cpu_us"]


def envoy_report(v: dict[str, Any], apart: str | None) -> str:
    when = f"; measured apart from the rest, {apart}" if apart else ""
    rows = []
    for concurrency in map(str, bench_envoy.CONCURRENCY):
        c = v[concurrency]
        for name in (INCUMBENT, RLS):
            closed, opened = c["closed"][name], c["open"][name]
            whole = _service_cpu(opened) + (c["broker_cpu_us_per_event"] + c["worker_cpu_us_per_event"] if name == RLS else 0)
            rows.append([concurrency, name, f"{closed['checks_per_s']:,.0f}", f"{closed['p50_us']:,.0f} / {closed['p99_us']:,.0f}",
                         f"{c['offered_per_s']:,.0f}", f"{opened['p50_us']:,.0f} / {opened['p99_us']:,.0f}",
                         f"{opened['redis_commands_per_check']:.2f}",
                         f"{opened['service_cpu_us']:.1f} + {opened['redis_cpu_us']:.1f} = {_service_cpu(opened):.1f}",
                         f"{whole:.1f}"])  # fmt: skip
    text = table(f"9. Envoy's rate-limit call: throttlex-rls beside envoyproxy/ratelimit (same Redis, same descriptors, "
                 f"same Go client `rls-client load`; {v['seconds']:.0f} s per measurement, medians of {v['runs']} runs{when})",
                 ["callers", "service", "checks/s (closed loop)", "p50 / p99 µs", "offered load /s", "p50 / p99 µs at it",
                  "Redis commands per check", "CPU-µs per check: service + Redis", "+ broker and worker per event"],
                 rows)  # fmt: skip
    return text + (
        "\nThe last column adds, for throttlex-rls, what it moves off the check: the Kafka broker's CPU per event "
        f"({v['4']['broker_cpu_us_per_event']:.1f} µs at 4 callers) and the stream worker's ({v['4']['worker_cpu_us_per_event']:.1f} µs), "
        "measured in one more run at the same offered load with a `throttlex worker` following the events live. "
        "envoyproxy/ratelimit does its counting in Redis on "
        "the check itself, so its two columns are the same. The load client runs on the same two cores as the services.\n"
    )


def envoy_goals(v: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows = []
    for concurrency in map(str, bench_envoy.CONCURRENCY):
        opened = v[concurrency]["open"]
        ours, theirs = opened[RLS], opened[INCUMBENT]
        share = _service_cpu(ours) / _service_cpu(theirs)
        rows += [
            (f"Envoy, {concurrency} callers: 0 Redis commands per check", f"{ours['redis_commands_per_check']:.2f}",
             ours["redis_commands_per_check"] < 0.005),
            (f"Envoy, {concurrency} callers: service + Redis CPU ≤ 2/3 of envoyproxy/ratelimit's (stretch 1/2)",
             f"{share:.2f} of it", share <= 2 / 3),
            (f"Envoy, {concurrency} callers: p99 below envoyproxy/ratelimit's at {v[concurrency]['offered_per_s']:,.0f}/s",
             f"{ours['p99_us']:,.0f} vs {theirs['p99_us']:,.0f} µs", ours["p99_us"] < theirs["p99_us"]),
        ]  # fmt: skip
    return rows


def remeasure_envoy(bootstrap: str, redis_url: str, runs: int, quick: bool) -> None:
    """Scenario 9 alone, added to or replaced in results.json."""
    results = json.loads(RESULTS.read_text())
    results["envoy"] = bench_envoy.run(bootstrap, redis_url, runs, 5 if quick else ENVOY_RUN_S)
    results["envoy_measured_apart"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    REPORT.write_text(report(results))
    print(REPORT.read_text())
    print(f"wrote {RESULTS} and {REPORT}")


if __name__ == "__main__":
    main()
