"""The ThrottleX image, run as users run it: each role in a container of its own on the host's Kafka and
Redis, the role as PID 1 (as in Kubernetes, without `--init`), stopped with `docker stop` (SIGTERM, then
SIGKILL after the grace period)."""

from __future__ import annotations

import os
import subprocess
import uuid

import httpx
import pytest

from throttlex.ingest.clock import wall_clock_ms
from tests.conftest import EventSender, Sandbox, eventually, free_port, register_keys
from tests.factories import make_event
from tests.image.conftest import GRACE_S, ROOT, Container, docker
from tests.integration.test_sink import committed_offsets, end_offsets, wait_until_all_committed

pytestmark = pytest.mark.image

LIMIT, WINDOW_S = 20, 30


async def answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(url)).status_code == 200
    except httpx.TransportError:
        return False


def test_help_and_a_refused_placeholder_secret_are_as_on_the_host(image: str) -> None:
    shown = docker("run", "--rm", image, "--help")
    assert shown.returncode == 0 and "Usage: throttlex" in shown.stdout, shown.stdout + shown.stderr
    placeholder = {"THROTTLEX_KEY_SALT": "change-me-in-production"}
    in_container = docker("run", "--rm", *(f"--env={k}={v}" for k, v in placeholder.items()), image, "worker")
    env = {k: v for k, v in os.environ.items() if not k.startswith("THROTTLEX_")} | placeholder
    on_host = subprocess.run([str(ROOT / ".venv/bin/throttlex"), "worker"], env=env, capture_output=True, text=True, timeout=60)
    assert on_host.returncode != 0 and on_host.stderr.strip(), on_host
    assert (in_container.returncode, in_container.stderr.strip().splitlines()[-1]) == (
        on_host.returncode, on_host.stderr.strip().splitlines()[-1])  # fmt: skip


def test_the_envoy_rate_limit_service_is_in_the_image_and_refuses_a_placeholder_salt(image: str) -> None:
    shown = docker("run", "--rm", "--entrypoint", "throttlex-rls", image, "--help")
    assert shown.returncode == 0 and "ShouldRateLimit" in shown.stderr + shown.stdout, shown.stdout + shown.stderr
    refused = docker("run", "--rm", "--entrypoint", "throttlex-rls", "--env=THROTTLEX_KEY_SALT=change-me", image)
    assert refused.returncode == 2 and "THROTTLEX_KEY_SALT" in refused.stderr, refused.stderr


async def test_run_answers_its_health_check_and_stops_within_its_grace_period(
    image: str, sandbox: Sandbox, containers: list[Container], volume: str
) -> None:
    sandbox.write_policy(LIMIT, WINDOW_S)
    port = free_port()
    containers.append(run := Container.run(image, sandbox, "run", "--api-port", str(port), volumes=(f"{volume}:/data",)))
    await run.wait_for(lambda: answers(f"http://127.0.0.1:{port}/healthz"), timeout_s=90, what="`throttlex run` to answer /healthz")
    code, took = run.stop()
    assert (code, took < GRACE_S) == (0, True), f"exit {code} after {took:.1f}s:\n{run.logs()[-3000:]}"
    assert '"message": "stopping"' in run.logs()


async def test_a_gateway_container_refuses_a_hot_key_and_delivers_every_event_when_stopped(
    image: str, sandbox: Sandbox, containers: list[Container]
) -> None:
    sandbox.write_policy(LIMIT, WINDOW_S)
    await register_keys(sandbox, {"hot-key": "default"})
    containers.append(worker := Container.run(image, sandbox, "worker"))
    port = free_port()
    containers.append(gateway := Container.run(image, sandbox, "gateway", "--host", "127.0.0.1", "--port", str(port)))
    url = f"http://127.0.0.1:{port}"
    await gateway.wait_for(lambda: answers(f"{url}/metrics"), timeout_s=90, what="the gateway container to answer")
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:

        async def refused() -> bool:
            statuses.append((await client.get("/v1/items/1", headers={"x-api-key": "hot-key"})).status_code)
            return statuses[-1] == 429

        await eventually(refused, timeout_s=60, what="the hot key to be refused")
    assert statuses.count(200) >= LIMIT and set(statuses) == {200, 429}, statuses
    code, took = gateway.stop()
    assert (code, took < GRACE_S) == (0, True), f"exit {code} after {took:.1f}s:\n{gateway.logs()[-3000:]}"
    # One event per request answered, refused ones included: all on the topic once the gateway has stopped.
    assert sum((await end_offsets(sandbox)).values()) == len(statuses)

    async def worker_read_all() -> bool:
        committed = await committed_offsets(sandbox, sandbox.env["THROTTLEX_WORKER_GROUP"])
        topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
        return sum(offset for tp, offset in committed.items() if tp.topic == topic) == len(statuses)

    await eventually(worker_read_all, timeout_s=30, what="the worker container to commit every event")
    code, took = worker.stop()
    assert (code, took < GRACE_S) == (0, True), f"exit {code} after {took:.1f}s:\n{worker.logs()[-3000:]}"


async def test_the_sink_stopped_mid_stream_loses_nothing_and_keeps_chdb_on_a_volume_of_its_user(
    image: str, sandbox: Sandbox, containers: list[Container], volume: str, producer: EventSender
) -> None:
    now = wall_clock_ms()
    events = [make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % 13}", event_time_ms=now - n) for n in range(30_000)]
    await producer.send_all(events)
    env = {"THROTTLEX_SINK_BATCH_MAX_ROWS": "2000"}  # many batches: the stop lands between them
    containers.append(sink := Container.run(image, sandbox, "sink", env=env, volumes=(f"{volume}:/data",)))

    async def some_committed() -> bool:
        return sum((await committed_offsets(sandbox)).values()) > 0

    await sink.wait_for(some_committed, timeout_s=90, what="the sink container to commit a batch")
    code, took = sink.stop()
    assert (code, took < GRACE_S) == (0, True), f"exit {code} after {took:.1f}s:\n{sink.logs()[-3000:]}"
    committed = sum((await committed_offsets(sandbox)).values())
    assert stored(image, volume) == (committed, committed), "what was committed is stored, nothing more"

    containers.append(again := Container.run(image, sandbox, "sink", volumes=(f"{volume}:/data",)))
    await wait_until_all_committed(sandbox, await end_offsets(sandbox), timeout_s=120)
    assert again.stop()[0] == 0, again.logs()[-3000:]
    assert stored(image, volume) == (len(events), len(events))
    owner = docker("run", "--rm", f"--volume={volume}:/data", "--entrypoint=stat", image, "-c", "%u", "/data/chdb")
    assert owner.stdout.strip() == "10001", owner


def stored(image: str, volume: str) -> tuple[int, int]:
    """Rows and distinct event ids in the chDB on ``volume``, read by the image's own ThrottleX."""
    script = (
        "import asyncio\n"
        "from throttlex.processors.accounting.store import UsageStore\n"
        "async def main():\n"
        "    store = UsageStore('chdb:///data/chdb')\n"
        "    await store.open()\n"
        "    [(rows, ids)] = await store.query('SELECT count(), uniqExact(event_id) FROM usage_events')\n"
        "    print(rows, ids)\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
    )
    done = docker("run", "--rm", f"--volume={volume}:/data", "--entrypoint=python", image, "-c", script)
    assert done.returncode == 0, done.stderr
    rows, ids = done.stdout.split()[-2:]
    return int(rows), int(ids)
