"""What a caller of the usage API sees when ClickHouse fails: a request id, never ClickHouse's own text."""

from __future__ import annotations

import logging

import pytest
from fastapi import HTTPException

from throttlex.api.usage import store_answer
from throttlex.processors.accounting.store import StoreError

CLICKHOUSE_TEXT = "Code: 60. DB::Exception: Unknown table expression identifier 'default.usage_per_hour' (UNKNOWN_TABLE)"


async def failing() -> None:
    raise StoreError(CLICKHOUSE_TEXT, retriable=False)


async def test_a_store_error_reaches_the_log_with_a_request_id_and_the_caller_gets_the_id_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="throttlex.api.usage"), pytest.raises(HTTPException) as raised:
        await store_answer(failing())
    answer = raised.value
    request_id = (answer.headers or {})["X-Request-Id"]
    assert answer.status_code == 503
    assert request_id in answer.detail and "usage_per_hour" not in answer.detail and "Code" not in answer.detail
    [record] = caplog.records
    assert (record.request_id, record.error) == (request_id, CLICKHOUSE_TEXT)  # type: ignore[attr-defined]
