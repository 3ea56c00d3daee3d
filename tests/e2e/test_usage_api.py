"""Usage, billing export and event ingest over HTTP, against `throttlex run` on real Kafka and chDB.

Events go in through ``POST /v1/events``; every number the API returns is checked against a
computation over those same events, made here.
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer

from throttlex.ingest.events import UsageEvent, decode, encode, key_id_for
from tests.conftest import Sandbox, eventually, free_port, register_keys, start_role, stop_role
from tests.factories import make_event

pytestmark = pytest.mark.e2e

ADMIN, INGEST, EU_INGEST = "admin-secret-token", "gateway-ingest-token", "eu-gateways-ingest-token"
UPLOAD = "acme-upload-token"
# Three hours across a month boundary: 2026-10-31 22:00 to 2026-11-01 01:00 UTC.
START = datetime(2026, 10, 31, 22, 0, tzinfo=UTC)
START_MS = int(START.timestamp() * 1000)
API_KEYS = {"alice-key": "acme", "bob-key": "acme", "carol-key": "globex"}
PLAN_UNITS = 5_000


@dataclass
class UsageApi:
    url: str
    sandbox: Sandbox
    events: list[UsageEvent]
    key_ids: dict[str, str]


def as_array(events: list[UsageEvent]) -> bytes:
    return b"[" + b",".join(encode(e) for e in events) + b"]"


@pytest.fixture(scope="module")
def api(service_addresses: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[UsageApi]:
    kafka, redis_url = service_addresses
    sandbox = Sandbox(kafka_bootstrap=kafka, redis_url=redis_url, root=Path(tmp_path_factory.mktemp("usage-api")))
    port = free_port()
    asyncio.run(register_keys(sandbox, API_KEYS))
    role = start_role(
        sandbox,
        ["run", "--policy-file", str(sandbox.write_policy(1_000_000, 60, monthly_units=PLAN_UNITS)), "--api-port", str(port)],
        {"THROTTLEX_ADMIN_TOKENS": f"root:{ADMIN},second:another-admin",
         "THROTTLEX_INGEST_TOKENS": f"billing-import;gateway;past=36500d:*:{INGEST},eu-gateways;gateway;past=36500d:acme:{EU_INGEST},acme-upload:acme:{UPLOAD}"},
    )
    salt = sandbox.env["THROTTLEX_KEY_SALT"].encode()
    key_ids = {key: key_id_for(key, salt) for key in API_KEYS}
    rng = random.Random(11)
    events = []
    for _ in range(3_000):
        key = rng.choice(list(API_KEYS))
        events.append(
            make_event(
                event_id=uuid.uuid4(),
                api_key_id=key_ids[key],
                tenant=API_KEYS[key],
                event_time_ms=START_MS + rng.randrange(3 * 3_600_000),
                route=rng.choice(["/v1/search", "/v1/items/{item_id}"]),
                status=rng.choice([200, 200, 429, 500]),
                cost=rng.randint(1, 4),
                edge_blocked=rng.random() < 0.1,
                latency_ms=rng.uniform(1, 50),
            )
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"`throttlex run` not healthy:\n{role.log()[-3000:]}"
                time.sleep(0.2)
            for start in range(0, len(events), 1_000):
                response = client.post(
                    "/v1/events",
                    content=as_array(events[start : start + 1_000]),
                    headers={"authorization": f"Bearer {INGEST}"},
                )
                assert response.status_code == 202, response.text
                assert response.json() == {"accepted": 1_000, "rejected": 0, "errors": [], "duplicates": 0}
            deadline = time.monotonic() + 60
            while total_requests(client) != len(events):
                assert time.monotonic() < deadline, "the sink did not store every event"
                time.sleep(0.3)
        yield UsageApi(url, sandbox, events, key_ids)
    finally:
        stop_role(role)


def total_requests(client: httpx.Client) -> int:
    response = client.get(
        "/v1/usage",
        params={"from": "2026-10-31T00:00:00Z", "to": "2026-11-02T00:00:00Z", "granularity": "day"},
        headers={"authorization": f"Bearer {ADMIN}"},
    )
    return sum(row["requests"] for row in response.json()["rows"]) if response.status_code == 200 else -1


@pytest.fixture
async def client(api: UsageApi) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        yield http


def as_admin() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


def as_key(key: str) -> dict[str, str]:
    return {"x-api-key": key}


def bucket_of(event: UsageEvent, seconds: int) -> str:
    moment = datetime.fromtimestamp((event.event_time_ms // 1000) // seconds * seconds, tz=UTC)
    return moment.isoformat().replace("+00:00", "Z")


def normal(bucket: str) -> str:
    return datetime.fromisoformat(bucket).astimezone(UTC).isoformat().replace("+00:00", "Z")


async def test_admin_usage_by_hour_key_and_status_matches_the_events(api: UsageApi, client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/v1/usage",
        params={"from": "2026-10-31T22:00:00Z", "to": "2026-11-01T01:00:00Z", "granularity": "hour", "group_by": "api_key_id,status"},
        headers=as_admin(),
    )
    assert response.status_code == 200, response.text
    got = {(normal(r["bucket"]), r["api_key_id"], r["status"]): (r["requests"], r["cost_units"], r["billable_units"], r["errors"], r["edge_blocked"]) for r in response.json()["rows"]}
    expected: dict[tuple[str, str, int], list[int]] = {}
    for e in api.events:
        totals = expected.setdefault((bucket_of(e, 3600), e.api_key_id, e.status), [0, 0, 0, 0, 0])
        totals[0] += 1
        totals[1] += e.cost
        totals[2] += 0 if e.edge_blocked else e.cost
        totals[3] += e.status >= 500
        totals[4] += e.edge_blocked
    assert got == {key: tuple(values) for key, values in expected.items()}
    assert all(row["latency_ms"]["p50"] is not None for row in response.json()["rows"])


async def test_admin_reads_one_tenant_by_minute(api: UsageApi, client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/v1/usage",
        params={"from": "2026-10-31T23:30:00Z", "to": "2026-11-01T00:30:00Z", "granularity": "minute", "tenant": "globex", "group_by": "route"},
        headers=as_admin(),
    )
    assert response.status_code == 200, response.text
    got = {(normal(r["bucket"]), r["route"]): r["cost_units"] for r in response.json()["rows"]}
    lo, hi = START_MS + 90 * 60_000, START_MS + 150 * 60_000
    expected: Counter[tuple[str, str]] = Counter()
    for e in api.events:
        if e.tenant == "globex" and lo <= e.event_time_ms < hi:
            expected[(bucket_of(e, 60), e.route)] += e.cost
    assert got == expected


async def test_a_key_sees_only_its_own_usage_whatever_it_asks(api: UsageApi, client: httpx.AsyncClient) -> None:
    params = {"from": "2026-10-31T00:00:00Z", "to": "2026-11-02T00:00:00Z", "granularity": "day", "group_by": "api_key_id,tenant"}
    own = await client.get("/v1/usage", params=params, headers=as_key("alice-key"))
    widened = await client.get("/v1/usage", params={**params, "tenant": "globex"}, headers=as_key("alice-key"))
    assert own.status_code == 200 and widened.status_code == 200
    assert {row["api_key_id"] for row in own.json()["rows"]} == {api.key_ids["alice-key"]}
    assert sum(r["requests"] for r in own.json()["rows"]) == sum(e.api_key_id == api.key_ids["alice-key"] for e in api.events)
    assert widened.json()["rows"] == []  # alice's key in globex: nothing, never globex's usage
    other = await client.get("/v1/usage", params={**params, "api_key_id": api.key_ids["carol-key"]}, headers=as_key("alice-key"))
    assert other.status_code == 403


@pytest.mark.parametrize("fmt", ["json", "csv"])
async def test_billing_export_per_tenant_and_key(api: UsageApi, client: httpx.AsyncClient, fmt: str) -> None:
    response = await client.get("/v1/usage/export", params={"period": "2026-11", "format": fmt}, headers=as_admin())
    assert response.status_code == 200, response.text
    if fmt == "json":
        rows = response.json()["rows"]
    else:
        assert response.headers["content-type"].startswith("text/csv")
        rows = [{**row, "billable_units": int(row["billable_units"])} for row in csv.DictReader(io.StringIO(response.text))]
    got = {(row["tenant"], row["api_key_id"]): row["billable_units"] for row in rows}
    november_ms = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() * 1000)
    expected: Counter[tuple[str, str]] = Counter()
    for e in api.events:
        if e.event_time_ms >= november_ms and not e.edge_blocked:
            expected[(e.tenant, e.api_key_id)] += e.cost
    assert got == expected

    mine = await client.get("/v1/usage/export", params={"period": "2026-10"}, headers=as_key("bob-key"))
    assert [(r["tenant"], r["api_key_id"]) for r in mine.json()["rows"]] == [("acme", api.key_ids["bob-key"])]


async def test_quota_reports_the_plan_used_this_month_and_a_forecast(api: UsageApi, client: httpx.AsyncClient) -> None:
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    month_start_ms = int(month_start.timestamp() * 1000)
    recent = [
        make_event(event_id=uuid.uuid4(), api_key_id=api.key_ids["alice-key"], tenant="acme", cost=10,
                   event_time_ms=int((now - timedelta(minutes=50 - n)).timestamp() * 1000))
        for n in range(45)
    ]  # fmt: skip
    ingest = await client.post("/v1/events", content=as_array(recent), headers={"authorization": f"Bearer {INGEST}"})
    assert ingest.json()["accepted"] == len(recent)
    history = [e for e in api.events if e.api_key_id == api.key_ids["alice-key"]] + recent
    used = sum(e.cost for e in history if e.event_time_ms >= month_start_ms and not e.edge_blocked)

    async def stored() -> bool:
        report = (await client.get("/v1/quota", headers=as_key("alice-key"))).json()
        return bool(report["plan"]["used_units"] == used)

    await eventually(stored, timeout_s=15, what="the recent events to reach ClickHouse")
    plan = (await client.get("/v1/quota", headers=as_key("alice-key"))).json()["plan"]
    assert plan["plan"] == "test-plan" and plan["limit_units"] == PLAN_UNITS
    assert plan["remaining_units"] == max(0, PLAN_UNITS - used)
    rate_per_s = 450 / 3600  # the 45 recent events of 10 units, all in the last hour
    expected = now + timedelta(seconds=plan["remaining_units"] / rate_per_s)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    if plan["remaining_units"] == 0:
        assert plan["runs_out_at"] is not None
    elif expected >= next_month:
        assert plan["runs_out_at"] is None
    else:
        assert abs((datetime.fromisoformat(plan["runs_out_at"]) - expected).total_seconds()) < 120


@pytest.mark.parametrize(
    ("path", "params", "status", "message"),
    [
        ("/v1/usage", {"from": "2026-11-02T00:00:00Z", "to": "2026-11-01T00:00:00Z"}, 422, "'to' must be after 'from'"),
        ("/v1/usage", {"from": "2026-01-01T00:00:00Z", "to": "2026-11-01T00:00:00Z", "granularity": "minute"}, 422, "range too large"),
        ("/v1/usage", {"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z", "group_by": "route,password"}, 422, "unknown group_by field(s) password"),
        ("/v1/usage", {"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z", "group_by": "route,route"}, 422, "repeats"),
        ("/v1/usage", {"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z", "granularity": "week"}, 422, "granularity"),
        ("/v1/usage", {"from": "yesterday", "to": "2026-11-02T00:00:00Z"}, 422, "from"),
        ("/v1/usage", {"to": "2026-11-02T00:00:00Z"}, 422, "from"),
        ("/v1/usage/export", {"period": "2026-13"}, 422, "YYYY-MM"),
        ("/v1/usage/export", {"period": "nov"}, 422, "YYYY-MM"),
        ("/v1/usage/export", {"period": "2026-11", "format": "xml"}, 422, "format"),
    ],
)
async def test_bad_parameters_get_a_422_that_says_why(
    client: httpx.AsyncClient, path: str, params: dict[str, str], status: int, message: str
) -> None:
    response = await client.get(path, params=params, headers=as_admin())
    assert response.status_code == status, response.text
    assert message in response.text


async def test_usage_needs_credentials(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/usage", params={"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z"})
    assert response.status_code == 401


async def test_ingest_validates_each_event_and_enforces_its_limits(api: UsageApi, client: httpx.AsyncClient) -> None:
    good = make_event(event_id=uuid.uuid4(), api_key_id="ingest-test", event_time_ms=START_MS)
    bad_cost = msgspec.json.decode(encode(good))
    bad_cost["cost"] = -3
    body = b"[" + encode(good) + b"," + msgspec.json.encode(bad_cost) + b',{"v": 9}, "text"]'
    response = await client.post("/v1/events", content=body, headers={"authorization": f"Bearer {INGEST}"})
    assert response.status_code == 202, response.text
    result = response.json()
    assert (result["accepted"], result["rejected"]) == (1, 3)
    assert [(e["index"], e["reason"].split(":")[0]) for e in result["errors"]] == [
        (1, "invalid event"), (2, "unknown schema version 9 (this build reads v1)"), (3, "invalid event"),
    ]  # fmt: skip

    ingest = {"authorization": f"Bearer {INGEST}"}
    assert (await client.post("/v1/events", content=b"[]")).status_code == 401
    assert (await client.post("/v1/events", content=b"[]", headers=as_key("alice-key"))).status_code == 401
    assert (await client.post("/v1/events", content=b"[]", headers={"authorization": "Bearer alice-key"})).status_code == 403
    assert (await client.post("/v1/events", content=b"{not json", headers=ingest)).status_code == 400
    assert (await client.post("/v1/events", content=b'{"v": 1}', headers=ingest)).status_code == 400
    too_many = as_array([good] * 1_001)
    assert (await client.post("/v1/events", content=too_many, headers=ingest)).status_code == 422
    too_big = b"[" + b" " * (1024 * 1024) + b"]"
    assert (await client.post("/v1/events", content=too_big, headers=ingest)).status_code == 413


async def test_an_ingest_token_sends_for_its_tenants_only_and_is_named_on_what_it_sent(
    api: UsageApi, client: httpx.AsyncClient
) -> None:
    """An event for a tenant outside the token's scope is refused with the reason; the accepted ones carry
    the token's name as their source, whatever the body claimed."""
    at = int(datetime(2026, 9, 1, tzinfo=UTC).timestamp() * 1000)  # outside every range the other tests read
    ours, theirs, claimed = (make_event(event_id=uuid.uuid4(), api_key_id="scoped", tenant=tenant, event_time_ms=at)
                             for tenant in ("acme", "globex", "acme"))  # fmt: skip
    claiming = msgspec.json.decode(encode(claimed)) | {"source": "ingest:billing-import"}
    # Another tenant's registered key, under this token's tenant: refused (it would count against that key).
    borrowed = make_event(event_id=uuid.uuid4(), api_key_id=api.key_ids["carol-key"], tenant="acme", event_time_ms=at)
    # A registered key of this tenant claiming a plan: stored with the key's own plan.
    planned = make_event(event_id=uuid.uuid4(), api_key_id=api.key_ids["alice-key"], tenant="acme", event_time_ms=at,
                         plan="claimed-plan")  # fmt: skip
    body = b"[" + b",".join([encode(ours), encode(theirs), msgspec.json.encode(claiming), encode(borrowed), encode(planned)]) + b"]"
    response = await client.post("/v1/events", content=body, headers={"authorization": f"Bearer {EU_INGEST}"})
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 3, "rejected": 2, "errors": [
        {"index": 1, "reason": "tenant 'globex' is not one ingest token 'eu-gateways' may send for (acme)"},
        {"index": 3, "reason": f"key {api.key_ids['carol-key']} is not a key of tenant 'acme'"}], "duplicates": 0}  # fmt: skip
    wide = await client.post("/v1/events", content=as_array([theirs]), headers={"authorization": f"Bearer {INGEST}"})
    assert wide.json()["accepted"] == 1  # a token for every tenant

    sources: dict[uuid.UUID, list[str]] = {}
    plans: list[str] = []
    consumer = AIOKafkaConsumer(api.sandbox.env["THROTTLEX_EVENTS_TOPIC"], bootstrap_servers=api.sandbox.kafka_bootstrap,
                                auto_offset_reset="earliest")  # fmt: skip
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while len(sources) < 3 or not plans:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        event = decode(record.value or b"")
                        if event.api_key_id == "scoped":
                            sources.setdefault(event.event_id, []).append(event.source)
                        if event.event_id == planned.event_id:
                            plans.append(event.plan)
    finally:
        await consumer.stop()
    assert sources == {ours.event_id: ["ingest:eu-gateways"], claimed.event_id: ["ingest:eu-gateways"],
                       theirs.event_id: ["ingest:billing-import"]}  # fmt: skip
    assert plans == [""]  # alice's own plan: the default


async def test_a_tenants_upload_token_cannot_block_others_bill_nothing_or_rewrite_the_past(
    api: UsageApi, client: httpx.AsyncClient
) -> None:
    """The review's reproduction: a token scoped to ``acme`` (written as before, ``name:tenant:token``) sent one
    event of cost 1,000,000 from a chosen client address (blocking that address for every tenant under an
    ``[ip]`` policy) and one dated two years back, and both were accepted. Each is now refused with the field
    named; the one honest event is stored, its unknown route counted under ``other``."""
    now_ms = int(time.time() * 1000)
    fields: dict[str, object] = {"api_key_id": "upload-scoped", "tenant": "acme", "client_ip": "", "event_time_ms": now_ms}
    sent = [
        make_event(event_id=uuid.uuid4(), **{**fields, "cost": 1_000_000, "client_ip": "203.0.113.7"}),
        make_event(event_id=uuid.uuid4(), **{**fields, "event_time_ms": now_ms - 2 * 365 * 86_400_000}),
        make_event(event_id=uuid.uuid4(), **{**fields, "edge_blocked": True}),  # unbilled usage, without end
        make_event(event_id=uuid.uuid4(), **{**fields, "plan": "enterprise"}),  # an unregistered key picking a plan
        make_event(event_id=uuid.uuid4(), **{**fields, "route": "/wp-admin/setup-8841.php"}),
    ]
    response = await client.post("/v1/events", content=as_array(sent), headers={"authorization": f"Bearer {UPLOAD}"})
    assert response.status_code == 202, response.text
    assert [(error["index"], error["reason"].split(":")[0]) for error in response.json()["errors"]] == [
        (0, "cost"), (1, "event_time_ms"), (2, "edge_blocked"), (3, "plan")]  # fmt: skip
    assert response.json()["accepted"] == 1

    landed: dict[uuid.UUID, str] = {}
    consumer = AIOKafkaConsumer(api.sandbox.env["THROTTLEX_EVENTS_TOPIC"], bootstrap_servers=api.sandbox.kafka_bootstrap,
                                auto_offset_reset="earliest")  # fmt: skip
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while sent[4].event_id not in landed:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        event = decode(record.value or b"")
                        if event.api_key_id == "upload-scoped":
                            landed[event.event_id] = event.route
    finally:
        await consumer.stop()
    assert landed == {sent[4].event_id: "other"}


async def test_an_event_sent_again_is_a_copy_only_from_the_same_token(api: UsageApi, client: httpx.AsyncClient) -> None:
    """The same batch from the same token is counted once; another token cannot claim a tenant's event ids
    first and have that tenant's own events taken for copies."""
    event = make_event(event_id=uuid.uuid4(), api_key_id="copied", tenant="acme", client_ip="", event_time_ms=int(time.time() * 1000))
    first = await client.post("/v1/events", content=as_array([event, event]), headers={"authorization": f"Bearer {UPLOAD}"})
    assert (first.json()["accepted"], first.json()["duplicates"]) == (2, 1), first.text
    again = await client.post("/v1/events", content=as_array([event]), headers={"authorization": f"Bearer {UPLOAD}"})
    assert (again.json()["accepted"], again.json()["duplicates"]) == (1, 1), again.text
    other = await client.post("/v1/events", content=as_array([event]), headers={"authorization": f"Bearer {EU_INGEST}"})
    assert (other.json()["accepted"], other.json()["duplicates"]) == (1, 0), other.text
