"""The Kafka broker stops under load and starts again: gateway requests never wait on it, the gateway
buffers events up to its bound and then sheds them with a metric and a log line, every event it
accepted is delivered and stored exactly once, and the worker and the sink resume by themselves."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx
import pytest

from throttlex.api.demo_gateway import create_gateway_app
from throttlex.api.server import HttpServer
from throttlex.ingest import metrics
from throttlex.ingest.producer import EventProducer
from throttlex.ingest.settings import GatewaySettings
from throttlex.processors.topics import ensure_topics
from tests.integration.test_sink import end_offsets, wait_until_all_committed
from tests.conftest import (EVENTS_PARTITIONS, PrivateKafka, Sandbox, eventually, free_port, register_keys, role_metrics,
                            start_role, stop_role, stored_events)

pytestmark = pytest.mark.faults

BUFFER_MAX_EVENTS = 300
RATE_PER_S = 100
LIMIT, WINDOW_S = 200, 60
REQUEST_TIMEOUT_S = 1.0
"""The longest a gateway request may take while the broker is away (stated bound)."""


@dataclass
class Load:
    """Requests at a steady rate over many keys, each one's status and duration recorded."""

    http: httpx.AsyncClient
    keys: list[str]
    statuses: list[int] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    loop_lags: list[tuple[float, float]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def watch_loop(self) -> None:
        """Record how late the event loop (the gateway's and this test's) runs a 10 ms sleep, with when: a
        request over the bound with the loop late as long says the time went to the process, not to Kafka."""
        while not self.stop.is_set():
            due = time.monotonic() + 0.01
            await asyncio.sleep(0.01)
            self.loop_lags.append((due, time.monotonic() - due))

    async def run(self) -> None:
        n = 0
        started = time.monotonic()
        while not self.stop.is_set():
            t0 = time.perf_counter()
            response = await self.http.get(f"/v1/items/{n}", headers={"x-api-key": self.keys[n % len(self.keys)]})
            self.durations.append(time.perf_counter() - t0)
            self.finished.append(time.monotonic())
            self.statuses.append(response.status_code)
            n += 1
            await asyncio.sleep(max(0.0, started + n / RATE_PER_S - time.monotonic()))


def counter(metric: object) -> float:
    return sum(sample.value for family in metric.collect() for sample in family.samples if sample.name.endswith("_total"))  # type: ignore[attr-defined]


def gateway_counters() -> dict[str, float]:
    """The gateway's event counters now (this process's): produced, shed and failed."""
    return {name: counter(m) for name, m in [("produced", metrics.EVENTS_PRODUCED), ("shed", metrics.EVENTS_SHED),
                                             ("failed", metrics.EVENTS_FAILED)]}  # fmt: skip


def accounted_for(before: dict[str, float]) -> float:
    """Events the gateway delivered or shed since ``before`` (its counters then)."""
    return counter(metrics.EVENTS_PRODUCED) - before["produced"] + counter(metrics.EVENTS_SHED) - before["shed"]


async def test_broker_restart_sheds_past_the_bound_and_delivers_every_accepted_event_once(
    sandbox: Sandbox, private_kafka: PrivateKafka, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="throttlex.ingest.producer")
    sandbox = Sandbox(kafka_bootstrap=private_kafka.bootstrap, redis_url=sandbox.redis_url, root=sandbox.root, tag=sandbox.tag)
    env = {"THROTTLEX_KAFKA_BOOTSTRAP": private_kafka.bootstrap}
    sink_port = free_port()
    worker = start_role(sandbox, ["worker", "--policy-file", str(sandbox.write_policy(LIMIT, WINDOW_S))], env)
    sink = start_role(sandbox, ["sink"], {**env, "THROTTLEX_METRICS_PORT": str(sink_port)})
    await ensure_topics(sandbox.kafka_bootstrap, {sandbox.env["THROTTLEX_EVENTS_TOPIC"]: EVENTS_PARTITIONS})
    plain_keys = [f"broker-key-{n:02d}" for n in range(50)]
    await register_keys(sandbox, {key: "acme" for key in [*plain_keys, "broker-probe"]})
    settings = sandbox.settings(GatewaySettings).model_copy(update={"producer_buffer_max_events": BUFFER_MAX_EVENTS})
    app = create_gateway_app(settings)
    producer: EventProducer = app.state.producer
    gateway = HttpServer(app, "127.0.0.1", free_port())
    before = gateway_counters()
    http = httpx.AsyncClient(base_url=gateway.url, timeout=10)
    load = Load(http, plain_keys)
    try:
        await gateway.start()
        await eventually(lambda: _sink_running(sink_port), timeout_s=60, what="the sink to serve metrics")
        running = asyncio.create_task(load.run())
        watching = asyncio.create_task(load.watch_loop())
        # The load runs with the broker there (two seconds' worth delivered), then without it until the
        # gateway has shed a second's worth (its buffer is small here), then with it again.
        await eventually(lambda: counter(metrics.EVENTS_PRODUCED) - before["produced"] >= 2 * RATE_PER_S, timeout_s=30,
                         what="events delivered before the broker goes down")  # fmt: skip

        stopped_at = time.monotonic()
        await asyncio.to_thread(private_kafka.run, "down")
        await eventually(lambda: counter(metrics.EVENTS_SHED) - before["shed"] >= RATE_PER_S, timeout_s=30,
                         what="the gateway to shed a second of events")  # fmt: skip
        await asyncio.to_thread(private_kafka.run, "up")
        back_at = time.monotonic()
        # Under load some events are always in flight, so "nothing undelivered" is not a condition to
        # wait for here: wait until as many events are delivered or shed as were taken before the
        # broker answered again (the buffer is at the head of every partition's queue).
        taken_before = len(load.statuses)
        await eventually(lambda: accounted_for(before) >= taken_before, timeout_s=60,
                         what="the events buffered while the broker was away to be delivered")  # fmt: skip
        drained_s = time.monotonic() - back_at
        delivered_at_drain = counter(metrics.EVENTS_PRODUCED)
        await eventually(lambda: counter(metrics.EVENTS_PRODUCED) - delivered_at_drain >= 2 * RATE_PER_S, timeout_s=30,
                         what="two seconds of load delivered after the backlog")  # fmt: skip
        load.stop.set()
        await running
        await watching

        # The worker resumed: a fresh key is admitted exactly up to its limit (nothing of it counted twice),
        # then refused at the gateway. The request that reaches the limit triggers the block, so the one
        # after it may already be refused: how soon depends on detection latency, not on correctness.
        probe = [(await http.get(f"/v1/items/{n}", headers={"x-api-key": "broker-probe"})).status_code for n in range(LIMIT)]
        assert probe.count(200) == LIMIT, {status: probe.count(status) for status in set(probe)}

        async def probe_refused() -> bool:
            response = await http.get("/v1/items/0", headers={"x-api-key": "broker-probe"})
            probe.append(response.status_code)
            return response.status_code == 429

        await eventually(probe_refused, timeout_s=60, what="the worker to block the probe key after the restart")
        await eventually(lambda: producer.undelivered == 0, timeout_s=30, what="the probe's events to be delivered")
        requests = len(load.statuses) + len(probe)
        shed = counter(metrics.EVENTS_SHED) - before["shed"]
        produced = counter(metrics.EVENTS_PRODUCED) - before["produced"]
        assert counter(metrics.EVENTS_FAILED) - before["failed"] == 0
        assert produced + shed == requests, (produced, shed, requests)

        # Every delivered event stored: the sink has committed the topic's end (its rows are counted once it
        # has stopped; its row counter would count twice a batch replayed after its partitions were lost).
        await wait_until_all_committed(sandbox, await end_offsets(sandbox), timeout_s=60)
    finally:
        load.stop.set()
        await http.aclose()
        await gateway.stop()
        for role in (worker, sink):
            stop_role(role)

    assert set(load.statuses) == {200}, {s: load.statuses.count(s) for s in set(load.statuses)}
    waited_past = sum(d > REQUEST_TIMEOUT_S for d in load.durations)
    slowest = max(range(len(load.durations)), key=load.durations.__getitem__)
    slowest_end = load.finished[slowest]
    lag_then = max((lag for at, lag in load.loop_lags if slowest_end - load.durations[slowest] <= at <= slowest_end), default=0.0)
    assert waited_past == 0, (
        f"slowest request {load.durations[slowest]:.3f} s, ending {slowest_end - stopped_at:+.1f} s from the broker stop "
        f"({back_at - stopped_at:.1f} s to answering again); the event loop was up to {lag_then:.3f} s late meanwhile"
    )
    started = [r for r in caplog.records if r.getMessage().startswith("producer buffer full")]
    ended = [r for r in caplog.records if r.getMessage().startswith("producer buffer has room again")]
    assert len(started) >= 1 and len(ended) == len(started)
    assert sum(r.shed for r in ended) == shed  # type: ignore[attr-defined]

    assert await stored_events(sandbox) == (produced, produced)
    print(f"Kafka broker restart: {requests} requests ({RATE_PER_S}/s), {shed:.0f} events shed past the bound of "
          f"{BUFFER_MAX_EVENTS}, {produced:.0f} delivered and stored once; longest request "
          f"{max(load.durations) * 1000:.1f} ms, {waited_past} over {REQUEST_TIMEOUT_S:.0f} s (event loop at most "
          f"{max(lag for _, lag in load.loop_lags) * 1000:.1f} ms late); broker away "
          f"{back_at - stopped_at:.1f} s (stop begun to answering again); buffer delivered {drained_s:.1f} s after it answered")


async def _sink_running(port: int) -> bool:
    return bool(await role_metrics(port))
