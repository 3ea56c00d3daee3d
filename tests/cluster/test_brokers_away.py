"""Two of the three brokers stop for 30 s of traffic. With one broker left, no partition has the two replicas
in sync that its writes need, so nothing is acknowledged: gateway requests are still answered within their
bound, the gateway's buffer stays within its size and sheds the rest with a count, and once the brokers are
back every event acknowledged to the gateway is stored, once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from throttlex.api.demo_gateway import create_gateway_app
from throttlex.api.server import HttpServer
from throttlex.ingest import metrics
from throttlex.ingest.producer import EventProducer
from throttlex.ingest.settings import GatewaySettings
from tests.cluster.conftest import LocalCluster, on_cluster
from tests.conftest import (RoleProcess, Sandbox, eventually, events_stored_twice, free_port, owns_partitions, register_keys,
                            stored_events, wait_until_sink_committed)  # fmt: skip
from tests.faults.test_broker_restart import REQUEST_TIMEOUT_S, Load, accounted_for, counter, gateway_counters

pytestmark = pytest.mark.cluster

BUFFER_MAX_EVENTS = 300
RATE_PER_S = 100  # Load's rate
OUTAGE_S = 30
STOPPED = ["broker-2", "broker-3"]


async def test_two_brokers_away_shed_past_the_bound_and_lose_no_acknowledged_event(
    sandbox: Sandbox, cluster: LocalCluster, spawn_on: Callable[..., RoleProcess]
) -> None:
    sandbox = on_cluster(sandbox, cluster)
    worker_port = free_port()
    worker = spawn_on(sandbox, "worker", extra_env={"THROTTLEX_METRICS_PORT": str(worker_port)})
    sink = spawn_on(sandbox, "sink")
    await eventually(lambda: owns_partitions(worker_port, 4), timeout_s=60, what="the worker to own the events partitions")
    plain_keys = [f"away-key-{n:02d}" for n in range(50)]
    await register_keys(sandbox, {key: "acme" for key in plain_keys})
    settings = sandbox.settings(GatewaySettings).model_copy(update={"producer_buffer_max_events": BUFFER_MAX_EVENTS})
    app = create_gateway_app(settings)
    producer: EventProducer = app.state.producer
    gateway = HttpServer(app, "127.0.0.1", free_port())
    before = gateway_counters()
    http = httpx.AsyncClient(base_url=gateway.url, timeout=10)
    load = Load(http, plain_keys)
    buffered: list[int] = []
    try:
        await gateway.start()
        running = asyncio.create_task(load.run())
        await eventually(lambda: counter(metrics.EVENTS_PRODUCED) - before["produced"] >= 2 * RATE_PER_S, timeout_s=30,
                         what="events delivered with every broker there")  # fmt: skip

        stopped_at = time.monotonic()
        for node in STOPPED:
            await asyncio.to_thread(cluster.stop, node)
        served_then = len(load.statuses)

        def outage_over() -> bool:  # the outage lasts 30 s of traffic, its buffer watched meanwhile
            buffered.append(producer.undelivered)
            return len(load.statuses) - served_then >= OUTAGE_S * RATE_PER_S

        await eventually(outage_over, timeout_s=OUTAGE_S * 3, what=f"{OUTAGE_S} s of traffic with two brokers away")
        shed_while_away = counter(metrics.EVENTS_SHED) - before["shed"]
        for node in STOPPED:
            await asyncio.to_thread(cluster.start, node)
        back_at = time.monotonic()
        taken_before = len(load.statuses)
        await eventually(lambda: accounted_for(before) >= taken_before, timeout_s=60,
                         what="the events buffered while the brokers were away to be delivered")  # fmt: skip
        drained_s = time.monotonic() - back_at
        load.stop.set()
        await running
        await eventually(lambda: producer.undelivered == 0, timeout_s=30, what="the last events to be delivered")
        requests = len(load.statuses)
        shed = counter(metrics.EVENTS_SHED) - before["shed"]
        produced = counter(metrics.EVENTS_PRODUCED) - before["produced"]
        await wait_until_sink_committed(sandbox, timeout_s=90)
    finally:
        load.stop.set()
        await http.aclose()
        await gateway.stop()

    assert worker.process.poll() is None, f"the worker exited:\n{worker.log()[-3000:]}"
    assert sink.stop() == 0, sink.log()[-3000:]
    assert set(load.statuses) == {200}, {s: load.statuses.count(s) for s in set(load.statuses)}
    slowest = max(load.durations)
    assert slowest <= REQUEST_TIMEOUT_S, f"slowest request {slowest:.3f} s"
    # librdkafka's queue holds the bound; beside it, the event of the one request in flight (Load sends one at a
    # time) may wait for its hand-over at the loop's next turn.
    assert max(buffered) <= BUFFER_MAX_EVENTS + 1
    assert shed_while_away > 0, "nothing was shed: the brokers' absence did not hold writes back"
    assert counter(metrics.EVENTS_FAILED) - before["failed"] == 0
    assert produced + shed == requests, (produced, shed, requests)
    stored = await stored_events(sandbox)
    assert stored == (produced, produced), (stored, await events_stored_twice(sandbox), sink.log()[-6000:])
    print(f"two brokers away {back_at - stopped_at:.1f} s: {requests} requests, {shed:.0f} events shed past the bound of "
          f"{BUFFER_MAX_EVENTS} (buffer at most {max(buffered)}), {produced:.0f} delivered and stored once; slowest "
          f"request {slowest * 1000:.1f} ms; backlog delivered {drained_s:.1f} s after the brokers were back")
