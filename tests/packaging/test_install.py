"""ThrottleX as an API team installs it: a built wheel puts everything under ``throttlex`` (nothing named
``api``, ``ingest`` or ``processors`` in site-packages), and the gateway install alone, in a fresh
virtual environment without the server parts, runs a Starlette app behind the middleware against the real
Kafka and Redis: a blocked key gets 429 with ``Retry-After``, other requests pass and their events reach
the topic."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist_entries import Block
from throttlex.ingest.events import key_id_for
from throttlex.processors.topics import ensure_topics
from throttlex.processors.worker.denylist_writer import DenylistWriter
from tests.conftest import EVENTS_PARTITIONS, Sandbox, events_on_topic, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SERVER_ONLY = ("aiokafka", "fastapi", "chdb", "clickhouse_connect", "pyarrow", "typer", "rich", "yaml")
"""Modules of the server install (uvicorn too, but this test installs it to serve its app)."""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    [path] = out.glob("throttlex-*.whl")
    return path


@pytest.fixture(scope="module")
def gateway_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment with the gateway install and a server to run an app with."""
    venv = tmp_path_factory.mktemp("gateway-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel), "uvicorn"],
                               capture_output=True, text=True, timeout=900)  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    yield venv


def test_the_wheel_installs_everything_under_throttlex(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"throttlex"}, top_level
    assert {"throttlex/ingest/middleware.py", "throttlex/processors/accounting/schema/0001_usage_events.sql",
            "throttlex/api/cli.py"} <= set(names)  # fmt: skip
    assert not top_level & {"api", "ingest", "processors", "tests"}


def test_the_gateway_install_leaves_the_server_parts_out(gateway_venv: Path) -> None:
    python = str(gateway_venv / "bin" / "python")
    probe = "import importlib.util, sys; print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])"
    found = subprocess.run([python, "-c", probe, *SERVER_ONLY], capture_output=True, text=True, check=True, cwd="/")
    assert found.stdout.strip() == "[]"
    every_module = ("import importlib, pkgutil, throttlex.ingest as ingest; "
                    "[importlib.import_module(m.name) for m in pkgutil.walk_packages(ingest.__path__, 'throttlex.ingest.')]")
    imports = subprocess.run([python, "-c", every_module], capture_output=True, text=True, cwd="/")
    assert imports.returncode == 0, imports.stderr  # every gateway module imports with the base dependencies alone
    cli = subprocess.run([str(gateway_venv / "bin" / "throttlex"), "--help"], capture_output=True, text=True, cwd="/")
    assert cli.returncode != 0 and cli.stderr.strip().splitlines() == [cli.stderr.strip()]
    assert "pip install 'throttlex[server]'" in cli.stderr


async def test_a_starlette_app_behind_the_gateway_install_blocks_and_emits(
    gateway_venv: Path, sandbox: Sandbox, tmp_path: Path
) -> None:
    topic = sandbox.env["THROTTLEX_EVENTS_TOPIC"]
    await ensure_topics(sandbox.kafka_bootstrap, {topic: EVENTS_PARTITIONS})
    salt, prefix = sandbox.env["THROTTLEX_KEY_SALT"], sandbox.env["THROTTLEX_REDIS_PREFIX"]
    port = free_port()
    env = {"PATH": str(gateway_venv / "bin"), "GATEWAY_KAFKA": sandbox.kafka_bootstrap, "GATEWAY_TOPIC": topic,
           "GATEWAY_REDIS_URL": sandbox.redis_url, "GATEWAY_REDIS_PREFIX": prefix, "GATEWAY_SALT": salt}  # fmt: skip
    log = tmp_path / "app.log"
    with log.open("wb") as output:
        server = subprocess.Popen([str(gateway_venv / "bin" / "python"), "-m", "uvicorn", "gateway_app:app", "--port", str(port),
                                   "--no-access-log"], cwd=Path(__file__).parent, env=env, stdout=output, stderr=output)  # fmt: skip
    redis = Redis.from_url(sandbox.redis_url)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await http.get("/items/1", headers={"x-api-key": "calm-key"})).status_code == 200:
                        break
                except httpx.TransportError:
                    assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"the app behind the gateway install did not start:\n{log.read_text()}"
                await asyncio.sleep(0.2)
            hot_id = key_id_for("hot-key", salt.encode())
            block = Block(f"api_key={hot_id}", wall_clock_ms() + 60_000, "packaging-test")
            assert await DenylistWriter(redis, prefix).publish([block]) == 1
            while (refused := await http.get("/items/2", headers={"x-api-key": "hot-key"})).status_code != 429:
                assert refused.status_code == 200 and time.monotonic() < deadline + 10, refused.status_code
                await asyncio.sleep(0.05)
            assert 0 < int(refused.headers["retry-after"]) <= 60
            served = [(await http.get(f"/items/{n}", headers={"x-api-key": "calm-key"})).status_code for n in range(20)]
            assert served == [200] * 20
    finally:
        server.terminate()  # the lifespan delivers what the producer holds before it exits
        server.wait(60)
        await redis.aclose()
    calm_id = key_id_for("calm-key", salt.encode())
    events = await events_on_topic(sandbox, topic)
    calm = [e for e in events if e.api_key_id == calm_id]
    assert len(calm) >= 21 and {e.tenant for e in calm} == {"packaging-test"}
    assert any(e.api_key_id == hot_id and e.edge_blocked for e in events)
