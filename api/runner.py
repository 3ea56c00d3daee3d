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
from collections.abc import Coroutine
from typing import Any

import prometheus_client

from throttlex.api.app import create_app
from throttlex.api.server import HttpServer
from throttlex.api.settings import RunSettings
from throttlex.processors.lag import watch_lag
from throttlex.processors.core.policy import PolicySet, load_policies
from throttlex.processors.policy_watch import PolicySource, watch_policy_file
from throttlex.processors.accounting.reconcile import Reconciler
from throttlex.processors.registry import open_registry
from throttlex.processors.accounting.sink import UsageSink
from throttlex.processors.accounting.store import UsageStore
from throttlex.processors.redis_client import redis_client
from throttlex.processors.tasks import LoopThread, SlowStopReport, share_interpreter_often, tune_gc
from throttlex.processors.worker.worker import StreamWorker

log = logging.getLogger(__name__)


async def run_roles(roles: set[str], settings: RunSettings) -> None:
    file_policies = load_policies(settings.policy_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with contextlib.AsyncExitStack() as stack:
        slow_stop = stack.enter_context(SlowStopReport())  # entered first, left last: covers the whole stop
        watches: list[asyncio.Task[BaseException]] = []
        registry = await stack.enter_async_context(
            open_registry(settings, replication_factor=settings.topic_replication_factor)
        )
        source = PolicySource(file_policies, registry.policies)
        policies = source.current
        log.info("policies in force", extra={"origin": source.origin, "policies": [p.name for p in policies.policies]})
        store = await _open_store(stack, roles, settings)
        if "worker" in roles:
            worker_loop = _loop_thread(stack, "worker")
            worker = await worker_loop.start(lambda: StreamWorker(settings, policies))
            stack.push_async_callback(lambda: worker_loop.run(worker.stop()))
            source.on_change(lambda changed: worker_loop.run(worker.replace_policies(changed)))
            watches.append(asyncio.create_task(worker_loop.run(worker.crashed()), name="worker-watch"))
            lag = watch_lag(settings.kafka, settings.worker_group, settings.events_topic)
            watches.append(_background(stack, lag))
            log.info("worker started", extra={"policies": [p.name for p in policies.policies]})
        if "sink" in roles:
            assert store is not None
            watches += await _start_sink(stack, settings, source, store)
        if "api" in roles:
            app = create_app(settings, source, registry, store=store)
            server = HttpServer(app, settings.api_host, settings.api_port)
            await server.start()
            stack.push_async_callback(server.stop)
            log.info("api listening", extra={"url": server.url})
        elif settings.metrics_port:
            prometheus_client.start_http_server(settings.metrics_port, addr=settings.api_host)

        watch = watch_policy_file(settings.policy_file, settings.policy_reload_interval_s, source.file_changed)
        watches.append(_background(stack, watch))
        watches.append(_background(stack, registry.follow(source.registry_changed)))
        tune_gc()
        share_interpreter_often()
        log.info("running", extra={"roles": sorted(roles)})
        stopping = asyncio.create_task(stop.wait(), name="signal-watch")
        await asyncio.wait([stopping, *watches], return_when=asyncio.FIRST_COMPLETED)
        slow_stop.arm()
        for task in [stopping, *watches]:
            task.cancel()
        crashed = [task.result() for task in watches if task.done() and not task.cancelled()]
        if crashed:
            log.error("a role crashed; stopping the others", extra={"reason": repr(crashed[0])})
            raise RuntimeError(f"a role crashed: {crashed[0]!r}")
        log.info("stopping")


async def _open_store(stack: contextlib.AsyncExitStack, roles: set[str], settings: RunSettings) -> UsageStore | None:
    """The ClickHouse store, when this process writes usage (sink) or may read it (API on a server)."""
    if "sink" not in roles and ("api" not in roles or settings.clickhouse_dsn.startswith("chdb:")):
        return None
    store = UsageStore(settings.clickhouse_dsn, cluster=settings.clickhouse_cluster)
    await store.open()
    stack.push_async_callback(store.close)
    if "sink" in roles:  # the writer owns the schema; `throttlex migrate` does it ahead of time
        applied = await store.migrate()
        await store.apply_retention(settings.raw_retention_days)
        log.info("clickhouse schema ready", extra={"embedded": store.embedded, "migrations_applied": applied})
    return store


async def _start_sink(
    stack: contextlib.AsyncExitStack, settings: RunSettings, source: PolicySource, store: UsageStore
) -> list[asyncio.Task[BaseException]]:
    """The sink, and the reconciliation loop that runs where ClickHouse is."""
    sink_loop = _loop_thread(stack, "sink")
    sink = await sink_loop.start(lambda: UsageSink(settings, store))
    stack.push_async_callback(lambda: sink_loop.run(sink.stop()))
    watches = [
        asyncio.create_task(sink_loop.run(sink.crashed()), name="sink-watch"),
        _background(stack, watch_lag(settings.kafka, settings.sink_group, settings.events_topic)),
    ]
    if settings.reconcile_interval_s:
        redis = redis_client(settings.redis_url, settings.redis_timeout_s)
        stack.push_async_callback(redis.aclose)
        reconciler = Reconciler(
            redis, settings.redis_prefix, source.current, store,
            settle_s=settings.reconcile_settle_s, max_keys=settings.reconcile_max_keys,
        )  # fmt: skip

        async def follow(changed: PolicySet) -> None:  # compare what the workers count now
            reconciler.policies = changed

        source.on_change(follow)
        watches.append(_background(stack, reconciler.run(settings.reconcile_interval_s)))
    log.info("sink started")
    return watches


def _loop_thread(stack: contextlib.AsyncExitStack, name: str) -> LoopThread:
    """A loop of its own for a stream role, so requests to the API never wait behind its batches; closed
    after the role's stop (the exit stack runs callbacks in reverse)."""
    thread = LoopThread(name)
    stack.callback(thread.close)
    return thread


def _background(stack: contextlib.AsyncExitStack, loop: Coroutine[Any, Any, None]) -> asyncio.Task[BaseException]:
    """Run a loop that never ends on its own, cancelled on exit; the task's result is what ended it."""

    async def failure() -> BaseException:
        try:
            await loop
        except Exception as exc:
            return exc
        return RuntimeError("background loop ended unexpectedly")

    task = asyncio.create_task(failure(), name=getattr(loop, "__name__", "background"))
    stack.callback(task.cancel)
    return task
