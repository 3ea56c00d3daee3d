"""The FastAPI application: quota report, usage, event ingest, admin, health, metrics. OpenAPI docs at ``/docs``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from throttlex.api import admin, analyst, event_ingest, quota, usage
from throttlex.api.audit import AuditTrail
from throttlex.api.settings import ApiSettings
from throttlex.api.seen_events import SeenEvents
from throttlex.ingest.producer import EventProducer
from throttlex.ingest.tasks import cancel_and_wait
from throttlex.processors.accounting.exact_usage import ExactUsage
from throttlex.processors.core.policy import PolicySet
from throttlex.processors.policy_watch import PolicySource
from throttlex.processors.registry import Registry
from throttlex.processors.accounting.readonly_sql import ReadOnlySql
from throttlex.processors.accounting.store import UsageStore
from throttlex.processors.redis_client import redis_client

log = logging.getLogger(__name__)

_HEALTH_TIMEOUT_S = 2.0


def create_app(
    settings: ApiSettings, source: PolicySource, registry: Registry, *, store: UsageStore | None = None
) -> FastAPI:
    """Build the app on a started registry. ``store`` is the open ClickHouse store when this process may read it.

    An embedded (chDB) store can be open in one process only; when the sink runs elsewhere the API
    is given no store and reports ClickHouse as not checked.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = redis_client(settings.redis_url, settings.redis_timeout_s)
        app.state.kafka = AIOKafkaAdminClient(**settings.kafka.aiokafka_options())
        app.state.producer = EventProducer(settings.kafka, settings.events_topic,
                                           delivery_timeout_s=settings.ingest_delivery_timeout_s)  # fmt: skip
        app.state.seen_events = SeenEvents(app.state.redis, settings.redis_prefix, window_s=settings.ingest_dedup_window_s,
                                           pending_s=settings.ingest_delivery_timeout_s + settings.ingest_deadline_s + 15)  # fmt: skip
        app.state.recording = set()  # tasks recording the fate of events confirmed after their request was answered
        app.state.exact_usage = ExactUsage(
            settings.kafka, settings.events_topic, settings.sink_group, replication_factor=settings.topic_replication_factor
        )
        app.state.audit = AuditTrail(settings.kafka, settings.audit_topic,
                                     replication_factor=settings.topic_replication_factor)  # fmt: skip
        try:  # without it, admin changes are still logged, at ERROR with the whole record
            await app.state.audit.start()
        except KafkaError as exc:
            log.error("the audit trail cannot write to Kafka; admin changes are logged only", extra={"error": str(exc)})
        try:
            await app.state.kafka.start()
            await app.state.producer.start()
            await app.state.exact_usage.start()
        except KafkaError as exc:  # /healthz reports Kafka; POST /v1/events answers 503
            log.warning("Kafka not reachable at start-up", extra={"error": str(exc)})
            app.state.producer = app.state.exact_usage = None
        if store is not None and store.engine_path is not None:  # analysts query the engine this process hosts
            analyst_sql = ReadOnlySql(store.engine_path, settings.analyst_limits())
            try:
                await analyst_sql.open()
                app.state.analyst_sql = analyst_sql
            except Exception as exc:  # the rest of the API serves on; analyst SQL answers 503
                log.error("analyst SQL could not open its connection to the engine", extra={"error": str(exc)[:500]})
                await analyst_sql.close()
        preparing = None
        if store is not None and app.state.exact_usage is not None:
            preparing = asyncio.create_task(_prepare_plan_ledger(app.state.exact_usage, store, source.current))
        try:
            yield
        finally:
            if preparing is not None:
                await cancel_and_wait(preparing)
            if app.state.producer is not None:
                await app.state.producer.stop()
                if app.state.recording:  # the fate of events its last flush delivered, before Redis closes
                    await asyncio.wait(app.state.recording, timeout=5)
                await app.state.exact_usage.stop()
            if app.state.analyst_sql is not None:
                await app.state.analyst_sql.close()
            await app.state.audit.stop()
            await app.state.kafka.close()
            await app.state.redis.aclose()

    app = FastAPI(
        title="ThrottleX",
        summary="Rate limits and usage of your API keys",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.policies = source.current
    app.state.policy_source = source
    app.state.registry = registry
    app.state.store = store
    app.state.analyst_sql = None  # opened with the app when it hosts the engine (lifespan)

    async def follow_policies(policies: PolicySet) -> None:
        app.state.policies = policies

    source.on_change(follow_policies)
    app.include_router(quota.router)
    app.include_router(usage.router)
    app.include_router(event_ingest.router)
    app.include_router(admin.router)
    app.include_router(analyst.router)

    def openapi() -> dict[str, Any]:
        """The generated document, saying that a 422 ``detail`` is a list of field errors (request
        validation) or one sentence (a check across fields, e.g. 'to' before 'from')."""
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)
            error = document.get("components", {}).get("schemas", {}).get("HTTPValidationError")
            if error is not None:
                fields = error["properties"]["detail"]
                error["properties"]["detail"] = {"anyOf": [fields, {"type": "string"}], "title": "Detail"}
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", tags=["operations"], summary="Status of each dependency")
    async def healthz(request: Request) -> JSONResponse:
        state = request.app.state
        checks = await asyncio.gather(
            _probe(state.redis.ping(), RedisError),
            _probe(_kafka_answers(state.kafka), KafkaError),
            _check_clickhouse(request),
        )
        report = dict(zip(("redis", "kafka", "clickhouse"), checks, strict=True))
        healthy = all(status in ("ok", "not checked") for status in report.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", "dependencies": report}, 200 if healthy else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _kafka_answers(admin: AIOKafkaAdminClient) -> None:
    """A metadata request for no topic: the brokers answer without listing any (the whole cluster's metadata
    took 110-130 ms with a few thousand topics, and health checks come every few seconds) and without creating
    one (a request naming a topic may create it, on brokers that auto-create topics)."""
    await admin._send_request(MetadataRequest([], allow_auto_topic_creation=False))  # aiokafka has no public call for it


async def _probe(check: Awaitable[object], error: type[Exception]) -> str:
    try:
        await asyncio.wait_for(check, _HEALTH_TIMEOUT_S)
        return "ok"
    except (error, OSError, TimeoutError) as exc:
        return f"error: {type(exc).__name__}"


async def _check_clickhouse(request: Request) -> str:
    store: UsageStore | None = request.app.state.store
    if store is None:
        return "not checked"
    return "ok" if await store.ping() else "error: query failed"


async def _prepare_plan_ledger(exact: ExactUsage, store: UsageStore, policies: PolicySet) -> None:
    """Load every key's plan usage at start-up, so the first quota read does not wait for it."""
    started = time.perf_counter()
    try:
        await exact.prepare(store, quota.plan_zone(policies))
    except Exception:  # the first quota read tries again
        log.exception("could not load the plan ledger at start-up")
        return
    log.info("plan ledger loaded", extra={"seconds": round(time.perf_counter() - started, 2)})
