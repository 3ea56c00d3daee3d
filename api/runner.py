"""Runs ThrottleX roles in this process until SIGINT or SIGTERM, then stops them in reverse order.

``run_roles({"worker", "sink", "api"}, ...)`` is `throttlex run`; each role alone is `throttlex worker`,
`throttlex sink` or `throttlex api`. Stopping flushes producers, commits consumed offsets and closes
the ClickHouse store (chDB must be closed before exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import prometheus_client

from api.app import create_app
from api.server import HttpServer
from api.settings import RunSettings
from processors.policy import load_policies
from processors.sink import UsageSink
from processors.usage_store import UsageStore
from processors.worker import PolicyWorker

log = logging.getLogger(__name__)


async def run_roles(roles: set[str], settings: RunSettings) -> None:
    policies = load_policies(settings.policy_file) if roles & {"worker", "api"} else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with contextlib.AsyncExitStack() as stack:
        failures: list[asyncio.Task[BaseException]] = []
        store = None
        if "sink" in roles or ("api" in roles and not settings.clickhouse_dsn.startswith("chdb:")):
            store = UsageStore(settings.clickhouse_dsn)
            await store.open()
            stack.push_async_callback(store.close)
            if "sink" in roles:  # the writer owns the schema; `throttlex migrate` does it ahead of time
                applied = await store.migrate()
                await store.apply_retention(settings.raw_retention_days)
                log.info("clickhouse schema ready", extra={"embedded": store.embedded, "migrations_applied": applied})

        if "worker" in roles:
            assert policies is not None
            worker = PolicyWorker(settings, policies)
            await worker.start()
            stack.push_async_callback(worker.stop)
            failures.append(asyncio.create_task(worker.crashed(), name="worker-watch"))
            log.info("worker started", extra={"policies": [p.name for p in policies.policies]})

        if "sink" in roles:
            assert store is not None
            sink = UsageSink(settings, store)
            await sink.start()
            stack.push_async_callback(sink.stop)
            failures.append(asyncio.create_task(sink.crashed(), name="sink-watch"))
            log.info("sink started")

        if "api" in roles:
            assert policies is not None
            app = create_app(settings, policies, store=store)
            server = HttpServer(app, settings.api_host, settings.api_port)
            await server.start()
            stack.push_async_callback(server.stop)
            log.info("api listening", extra={"url": server.url})
        elif settings.metrics_port:
            prometheus_client.start_http_server(settings.metrics_port, addr=settings.api_host)

        log.info("running", extra={"roles": sorted(roles)})
        stopping = asyncio.create_task(stop.wait(), name="signal-watch")
        await asyncio.wait([stopping, *failures], return_when=asyncio.FIRST_COMPLETED)
        for task in [stopping, *failures]:
            task.cancel()
        crashed = [task.result() for task in failures if task.done() and not task.cancelled()]
        if crashed:
            log.error("a role crashed; stopping the others", extra={"reason": repr(crashed[0])})
            raise RuntimeError(f"a role crashed: {crashed[0]!r}")
        log.info("stopping")
