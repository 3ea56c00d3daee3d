"""``POST /v1/events`` while Kafka is away: the request answers 503 with Retry-After by its deadline instead of
waiting for the broker, and a batch sent again (whose first copy lands once the broker is back) is counted
once in enforcement (the worker's window), once in the raw rows and once in the plan's rollups."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from throttlex.ingest.events import UsageEvent, encode
from tests.conftest import PrivateKafka, Sandbox, eventually, free_port, register_keys, start_role, stop_role, wait_until_sink_committed
from tests.factories import make_event

pytestmark = pytest.mark.faults

ADMIN, INGEST = "retry-admin-token", "retry-ingest-token"
DEADLINE_S = 1


def batch(key_id: str, n: int) -> list[UsageEvent]:
    now_ms = int(time.time() * 1000)
    return [make_event(event_id=uuid.uuid4(), api_key_id=key_id, tenant="acme", event_time_ms=now_ms, cost=1) for _ in range(n)]


def body(events: list[UsageEvent]) -> bytes:
    return b"[" + b",".join(encode(event) for event in events) + b"]"


async def test_a_batch_sent_again_after_a_503_is_counted_once_everywhere(sandbox: Sandbox, private_kafka: PrivateKafka) -> None:
    sandbox = Sandbox(kafka_bootstrap=private_kafka.bootstrap, redis_url=sandbox.redis_url, root=sandbox.root, tag=sandbox.tag)
    [key_id] = (await register_keys(sandbox, {"retry-key": "acme"})).values()
    port = free_port()
    run = start_role(
        sandbox, ["run", "--policy-file", str(sandbox.write_policy(1_000_000, 3600, monthly_units=1_000_000)), "--api-port", str(port)],
        {"THROTTLEX_ADMIN_TOKENS": f"root:{ADMIN}", "THROTTLEX_INGEST_TOKENS": f"edge;gateway:acme:{INGEST}",
         "THROTTLEX_INGEST_DEADLINE_S": str(DEADLINE_S),  # and longer than the broker may take to come back:
         "THROTTLEX_INGEST_DELIVERY_TIMEOUT_S": "600", "THROTTLEX_INGEST_DEDUP_WINDOW_S": "1200"},
    )  # fmt: skip
    ingest, admin = {"authorization": f"Bearer {INGEST}"}, {"authorization": f"Bearer {ADMIN}"}
    first, second = batch(key_id, 20), batch(key_id, 30)
    # A request that waited for the broker (the defect) would hit this client's timeout instead of answering.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
        try:
            await eventually(lambda: _answers(api), timeout_s=60, what="`throttlex run` to answer")
            sent = await api.post("/v1/events", content=body(first), headers=ingest)
            assert sent.status_code == 202 and sent.json()["accepted"] == 20, sent.text

            await asyncio.to_thread(private_kafka.run, "down")
            for attempt in range(2):  # the first copy waits in the producer; the second finds it pending
                away = await api.post("/v1/events", content=body(second), headers=ingest)
                assert away.status_code == 503, away.text
                assert away.headers["retry-after"] == str(DEADLINE_S) and "send the same batch again" in away.json()["detail"]
            await asyncio.to_thread(private_kafka.run, "up")

            answers: list[dict[str, int]] = []

            async def taken() -> bool:
                response = await api.post("/v1/events", content=body(second), headers=ingest)
                if response.status_code == 202:
                    answers.append(response.json())
                return response.status_code == 202

            await eventually(taken, timeout_s=120, what="the batch to be taken once the broker is back")
            assert (answers[0]["accepted"], answers[0]["duplicates"]) == (30, 30)  # the first copy landed
            again = await api.post("/v1/events", content=body(second + first), headers=ingest)
            assert again.status_code == 202 and (again.json()["accepted"], again.json()["duplicates"]) == (50, 50), again.text

            await wait_until_sink_committed(sandbox, timeout_s=120)
            today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            days = {"from": (today - timedelta(days=1)).isoformat(), "to": (today + timedelta(days=2)).isoformat()}
            usage = await api.get("/v1/usage", headers=admin, params={**days, "granularity": "day", "api_key_id": key_id})
            assert sum(row["requests"] for row in usage.json()["rows"]) == 50, usage.text  # raw rows

            async def quota() -> tuple[int, int]:
                report = (await api.get("/v1/quota", headers={"x-api-key": "retry-key"})).json()
                return report["policies"][0]["used"], report["plan"]["used_units"]

            await eventually(lambda: _equals(quota(), (50, 50)), timeout_s=30, what="the window and the plan to count 50")
        finally:
            stop_role(run)


async def _answers(api: httpx.AsyncClient) -> bool:
    try:
        return (await api.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def _equals(value: object, expected: object) -> bool:
    got = await value  # type: ignore[misc]
    return bool(got == expected)
