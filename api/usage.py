"""``GET /v1/usage`` and ``GET /v1/usage/export``: usage from the ClickHouse rollups.

An API key sees only its own usage, whatever it asks for; an admin sees any tenant's.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from collections.abc import Awaitable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import AfterValidator, BaseModel

from throttlex.api.auth import Caller, caller
from throttlex.processors.accounting import queries as usage_queries
from throttlex.processors.accounting.queries import GROUP_FIELDS, ROLLUPS, UsageQuery
from throttlex.processors.accounting.store import StoreError, UsageStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/usage", tags=["usage"])

Granularity = Literal["minute", "hour", "day"]


class UsageReport(BaseModel):
    granularity: Granularity
    start: datetime
    end: datetime
    group_by: list[str]
    rows: list[dict[str, Any]]


class UsageExport(BaseModel):
    period: str
    rows: list[dict[str, Any]]


def _store(request: Request) -> UsageStore:
    store: UsageStore | None = request.app.state.store
    if store is None:
        raise HTTPException(
            status_code=503,
            detail="usage needs ClickHouse: run the API with the sink (`throttlex run`) or point it at a ClickHouse server",
        )
    return store


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(2106, 1, 1, tzinfo=UTC)


def _storable(moment: datetime) -> datetime:
    outside = ValueError("must be between 1970-01-01 and 2105-12-31 (UTC), the range usage is stored for")
    try:
        moment = _utc(moment)
    except OverflowError:  # an offset that moves it past year 1 or 9999
        raise outside from None
    if not EARLIEST <= moment < LATEST:
        raise outside
    return moment


Instant = Annotated[datetime, AfterValidator(_storable)]
"""A point in time usage can be asked about, in UTC (a time without an offset is read as UTC)."""


def _scope(who: Caller, tenant: str | None, api_key_id: str | None) -> tuple[str | None, str | None]:
    """The (tenant, key) filter a caller may use: a key is always limited to itself."""
    if who.key is None:
        return tenant, api_key_id
    if api_key_id is not None and api_key_id != who.key.key_id:
        raise HTTPException(status_code=403, detail="an API key may only read its own usage")
    return tenant, who.key.key_id


T = TypeVar("T")


async def store_answer(call: Awaitable[T], what: str = "usage") -> T:
    """Await a read of the usage store. ClickHouse's own error text names tables, settings and servers: it
    goes to the log with a request id, and the caller (often an API-key holder) gets a 503 with that id only."""
    try:
        return await call
    except StoreError as exc:
        request_id = uuid.uuid4().hex
        log.error(f"{what} query failed", extra={"request_id": request_id, "error": str(exc), "retriable": exc.retriable})
        raise HTTPException(
            status_code=503,
            detail=f"{what} cannot be read right now; try again, or quote request id {request_id} to the operators",
            headers={"X-Request-Id": request_id},
        ) from None


@router.get("", response_model=UsageReport, summary="Usage over time, from the rollups")
async def usage(
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    start: Annotated[Instant, Query(alias="from", description="start, inclusive (ISO 8601; UTC if no offset)")],
    end: Annotated[Instant, Query(alias="to", description="end, exclusive")],
    granularity: Granularity = "hour",
    group_by: Annotated[str, Query(description=f"comma-separated, any of: {', '.join(GROUP_FIELDS)}")] = "",
    tenant: Annotated[str | None, Query(max_length=256)] = None,
    api_key_id: Annotated[str | None, Query(max_length=256)] = None,
) -> UsageReport:
    settings = request.app.state.settings
    if end <= start:
        raise HTTPException(status_code=422, detail="'to' must be after 'from'")
    _, bucket_s = ROLLUPS[granularity]
    if (end - start).total_seconds() / bucket_s > settings.usage_max_buckets:
        raise HTTPException(
            status_code=422,
            detail=f"range too large: more than {settings.usage_max_buckets} {granularity} buckets; use a coarser granularity",
        )
    fields = tuple(field.strip() for field in group_by.split(",") if field.strip())
    unknown = sorted(set(fields) - set(GROUP_FIELDS))
    if unknown:
        raise HTTPException(status_code=422, detail=f"unknown group_by field(s) {', '.join(unknown)}; use {', '.join(GROUP_FIELDS)}")
    if len(set(fields)) != len(fields):
        raise HTTPException(status_code=422, detail="group_by repeats a field")
    tenant, api_key_id = _scope(who, tenant, api_key_id)
    query = UsageQuery(start, end, granularity, fields, tenant, api_key_id)
    rows = await store_answer(usage_queries.usage(_store(request), query))
    return UsageReport(granularity=granularity, start=start, end=end, group_by=list(fields), rows=rows)


_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")


def _month(period: str) -> tuple[datetime, datetime]:
    match = _PERIOD.match(period)
    if match is None or not 1 <= int(match[2]) <= 12 or not EARLIEST.year <= int(match[1]) < LATEST.year:
        raise HTTPException(status_code=422, detail=f"period must be a calendar month as YYYY-MM, not {period!r}")
    year, month = int(match[1]), int(match[2])
    start = datetime(year, month, 1, tzinfo=UTC)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


@router.get(
    "/export",
    summary="Billing export for one calendar month (UTC), per tenant and key",
    response_model=UsageExport,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                     "description": "JSON (`format=json`) or CSV with a header line (`format=csv`)"}},
)  # fmt: skip
async def export(
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    period: Annotated[str, Query(description="calendar month, YYYY-MM", max_length=7)],
    format: Literal["json", "csv"] = "json",
) -> Response:
    start, end = _month(period)
    _, api_key_id = _scope(who, None, None)
    rows = await store_answer(usage_queries.billing(_store(request), start, end, api_key_id))
    if format == "json":
        return Response(
            UsageExport(period=period, rows=rows).model_dump_json(), media_type="application/json"
        )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["period", "tenant", "api_key_id", *usage_queries.TOTALS])
    writer.writeheader()
    for row in rows:
        writer.writerow({"period": period, **row})
    return Response(
        buffer.getvalue(),
        media_type="text/csv",
        headers={"content-disposition": f'attachment; filename="throttlex-usage-{period}.csv"'},
    )
