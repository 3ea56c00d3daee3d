"""Schema-driven fuzzing: schemathesis generates requests for every operation of the API's own OpenAPI
document and sends them to a running `throttlex run` as an admin, as an API-key holder and as an ingest
token scoped to one tenant; no answer may be a 5xx or break the documented schema, a key holder may read
only its own key's usage, and neither may be granted anything outside its scope. Bounded: ``FUZZ_EXAMPLES``
examples per operation as an admin, half as many as each of the others (``THROTTLEX_FUZZ_EXAMPLES``)."""

from __future__ import annotations

import csv
import io
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.core.result import Ok
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from throttlex.ingest.events import encode
from tests.conftest import Sandbox, stop_role
from tests.e2e.deployment import INGEST, admin, create_key, start_deployment, wait_healthy
from tests.factories import make_event

pytestmark = pytest.mark.e2e

FUZZ_EXAMPLES = int(os.environ.get("THROTTLEX_FUZZ_EXAMPLES", "40"))
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


FUZZ_TENANT = "fuzz"
SCOPED_INGEST = "ingest-token-of-the-fuzz-tenant"
GATEWAY_INGEST = "gateway-token-of-the-fuzz-tenant"


@dataclass
class Target:
    schema: BaseSchema
    key: str
    """A plain API key of tenant `FUZZ_TENANT`."""
    key_id: str


@pytest.fixture(scope="module")
def target(service_addresses: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    kafka, redis_url = service_addresses
    sandbox = Sandbox(kafka_bootstrap=kafka, redis_url=redis_url, root=Path(tmp_path_factory.mktemp("fuzz")))
    run, gateway, api_url, _ = start_deployment(sandbox, extra_ingest=f"fuzz-upload:{FUZZ_TENANT}:{SCOPED_INGEST},"
                                                                  f"fuzz-edge;gateway:{FUZZ_TENANT}:{GATEWAY_INGEST}")
    try:
        with httpx.Client(base_url=api_url, timeout=10) as api:
            wait_healthy(api, run)
            key = create_key(api, tenant=FUZZ_TENANT)  # so listing has something to page through
            other = create_key(api, tenant="elsewhere")
            # Usage of both tenants in January of every year from 2000 to 2099 and today, so the ranges asked
            # about hold someone else's usage to leak if scoping failed; the other tenant's requests cost 7 units,
            # the key holder's 1. (A month is a partition: an insert across many of them is slow.)
            moments = [datetime(year, 1, 15, tzinfo=UTC) for year in range(2000, 2100)] + [datetime.now(UTC)]
            events = [make_event(event_id=uuid.uuid4(), api_key_id=owner["key_id"], tenant=owner["tenant"],
                                 event_time_ms=int(moment.timestamp() * 1000), cost=1 if owner is key else 7)
                      for moment in moments for owner in (key, other)]  # fmt: skip
            for first in range(0, len(events), 1_000):
                body = b"[" + b",".join(encode(event) for event in events[first : first + 1_000]) + b"]"
                assert api.post("/v1/events", content=body, headers={"authorization": f"Bearer {INGEST}"}).status_code == 202
            stored_by = time.monotonic() + 60
            while _stored(api) < len(events):
                assert time.monotonic() < stored_by, f"the sink stored {_stored(api)} of {len(events)} events:\n{run.log()[-3000:]}"
                time.sleep(0.3)
        yield Target(schemathesis.openapi.from_url(f"{api_url}/openapi.json"), key["key"], key["key_id"])
    finally:
        stop_role(gateway)
        log = run.log()
        stop_role(run)
        assert "Traceback" not in log, "the API logged an unhandled exception"


def _stored(api: httpx.Client) -> int:
    """Requests stored from 2000 to 2100, read in spans of 25 years (a day's buckets: under the API's cap)."""
    total = 0
    for year in range(2000, 2100, 25):
        span = {"from": f"{year}-01-01T00:00:00Z", "to": f"{year + 25}-01-01T00:00:00Z", "granularity": "day"}
        answer = api.get("/v1/usage", params=span, headers=admin())
        assert answer.status_code == 200, answer.text
        total += sum(row["requests"] for row in answer.json()["rows"])
    return total


PUBLIC = {"/healthz"}


def within_a_key_holders_scope(key_id: str) -> Callable[[Any, Response, Case[Any]], None]:
    """A key holder reads its own quota and usage only, and nothing else is granted to it."""

    def check(ctx: Any, response: Response, case: Case[Any]) -> None:
        path, granted = case.operation.path, 200 <= response.status_code < 300
        if path.startswith("/v1/admin") or path == "/v1/events":
            assert not granted, f"a key holder got {response.status_code} from {case.method} {path}"
        if not granted or path in PUBLIC:
            return
        if path == "/v1/quota":
            assert response.json()["api_key_id"] == key_id
        elif path == "/v1/usage":
            for row in response.json()["rows"]:
                assert row.get("tenant", FUZZ_TENANT) == FUZZ_TENANT and row.get("api_key_id", key_id) == key_id, row
                assert row["cost_units"] == row["requests"], f"another key's usage (7 units a request) in {row}"
        elif path == "/v1/usage/export":
            text_csv = "csv" in response.headers.get("content-type", [""])[0]
            rows = list(csv.DictReader(io.StringIO(response.text))) if text_csv else response.json()["rows"]
            assert all((row["tenant"], row["api_key_id"]) == (FUZZ_TENANT, key_id) for row in rows), rows

    return check


def within_an_ingest_tokens_scope(*, gateway: bool) -> Callable[[Any, Response, Case[Any]], None]:
    """An ingest token for one tenant sends that tenant's events within its bounds, and can do nothing else; an
    upload token's events never set a client address or an edge refusal."""

    def check(ctx: Any, response: Response, case: Case[Any]) -> None:
        path, granted = case.operation.path, 200 <= response.status_code < 300
        if path in PUBLIC:
            return
        if path != "/v1/events":
            assert not granted, f"an ingest token got {response.status_code} from {case.method} {path}"
        elif granted:
            rejected = {error["index"] for error in response.json()["errors"]}
            items = case.body if isinstance(case.body, list) else []
            refusable = [n for n, item in enumerate(items) if _outside_the_scope(item, gateway=gateway)]
            assert not set(refusable) - rejected, f"events outside the token's scope accepted: {set(refusable) - rejected}"

    return check


def _outside_the_scope(item: Any, *, gateway: bool) -> bool:
    if not isinstance(item, dict) or item.get("tenant") != FUZZ_TENANT:
        return True
    cost = item.get("cost", 0)
    return not isinstance(cost, int) or cost > 1000 or (not gateway and bool(item.get("client_ip") or item.get("edge_blocked")))


@pytest.mark.parametrize("identity", ["admin", "key holder", "upload token", "gateway token"])
def test_no_server_error_and_every_answer_matches_the_schema_and_the_callers_scope(target: Target, identity: str) -> None:
    headers, checks, examples = {
        "admin": (admin(), CHECKS, FUZZ_EXAMPLES),
        "key holder": ({"x-api-key": target.key}, [*CHECKS, within_a_key_holders_scope(target.key_id)],
                       max(FUZZ_EXAMPLES // 2, 1)),
        "upload token": ({"authorization": f"Bearer {SCOPED_INGEST}"}, [*CHECKS, within_an_ingest_tokens_scope(gateway=False)],
                         max(FUZZ_EXAMPLES // 2, 1)),
        "gateway token": ({"authorization": f"Bearer {GATEWAY_INGEST}"}, [*CHECKS, within_an_ingest_tokens_scope(gateway=True)],
                          max(FUZZ_EXAMPLES // 4, 1)),
    }[identity]  # fmt: skip
    results = list(target.schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), "the OpenAPI document has invalid operations"
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) >= 15
    failures = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: Case[Any]) -> None:
            case.call_and_validate(headers=headers, checks=checks, timeout=30)

        try:
            fuzz()
            for query in EXPLICIT.get(operation.label, []):  # requests that reach stored usage, which random ones rarely do
                operation.Case(query=query).call_and_validate(headers=headers, checks=checks, timeout=30)
        except (Exception, BaseExceptionGroup) as exc:  # every operation's failures, then fail once
            failures.append(f"{operation.label}: {exc}")
        print(f"fuzzed {operation.label} as {identity}")
    assert not failures, "\n\n".join(failures)


_SPAN = {"from": "2000-01-01T00:00:00Z", "to": "2025-01-01T00:00:00Z", "granularity": "day"}
EXPLICIT: dict[str, list[dict[str, str]]] = {
    "GET /v1/usage": [
        *({**_SPAN, "group_by": group_by} for group_by in ("", "tenant", "api_key_id", "tenant,api_key_id,route,status")),
        {**_SPAN, "group_by": "tenant", "tenant": "elsewhere"},
        {"from": "2010-01-01T00:00:00Z", "to": "2010-12-31T00:00:00Z", "granularity": "hour", "group_by": "api_key_id"},
    ],
    "GET /v1/usage/export": [{"period": period, "format": fmt} for period in ("2000-01", "2050-01", "2099-01") for fmt in ("json", "csv")],
}
"""Requests sent as each identity after the generated ones: ranges holding both tenants' usage."""
