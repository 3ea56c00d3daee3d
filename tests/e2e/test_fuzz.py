"""Schema-driven fuzzing: schemathesis generates requests for every operation of the API's own OpenAPI
document and sends them, as an admin, to a running `throttlex run`; no answer may be a 5xx or break
the documented schema. Bounded: ``FUZZ_EXAMPLES`` examples per operation (``THROTTLEX_FUZZ_EXAMPLES``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.core.result import Ok
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.conftest import Sandbox, stop_role
from tests.e2e.deployment import admin, create_key, start_deployment, wait_healthy

pytestmark = pytest.mark.e2e

FUZZ_EXAMPLES = int(os.environ.get("THROTTLEX_FUZZ_EXAMPLES", "40"))
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def api_schema(service_addresses: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaseSchema]:
    kafka, redis_url = service_addresses
    sandbox = Sandbox(kafka_bootstrap=kafka, redis_url=redis_url, root=Path(tmp_path_factory.mktemp("fuzz")))
    run, gateway, api_url, _ = start_deployment(sandbox)
    try:
        with httpx.Client(base_url=api_url, timeout=10) as api:
            wait_healthy(api, run)
            create_key(api, tenant="fuzz")  # so listing has something to page through
        yield schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    finally:
        stop_role(gateway)
        log = run.log()
        stop_role(run)
        assert "Traceback" not in log, "the API logged an unhandled exception"


def test_no_server_error_and_every_answer_matches_the_schema(api_schema: BaseSchema) -> None:
    results = list(api_schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), "the OpenAPI document has invalid operations"
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) >= 15
    failures = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: Case[Any]) -> None:
            case.call_and_validate(headers=admin(), checks=CHECKS, timeout=30)

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as exc:  # every operation's failures, then fail once
            failures.append(f"{operation.label}: {exc}")
        print(f"fuzzed {operation.label}")
    assert not failures, "\n\n".join(failures)
