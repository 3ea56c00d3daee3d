"""Read-only queries over the rollups, for the usage API and the billing export.

Every value is a bound query parameter; column and table names come only from the fixed tables below,
so no caller input is ever spliced into SQL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from throttlex.processors.accounting.store import UsageStore

ROLLUPS = {"minute": ("usage_per_minute", 60), "hour": ("usage_per_hour", 3600), "day": ("usage_per_day", 86400)}
GROUP_FIELDS = ("tenant", "api_key_id", "route", "status")
TOTALS = ("requests", "cost_units", "billable_units", "response_bytes", "errors", "edge_blocked")


@dataclass(frozen=True)
class UsageQuery:
    start: datetime
    end: datetime
    granularity: str
    group_by: tuple[str, ...] = ()
    tenant: str | None = None
    api_key_id: str | None = None


def _filters(tenant: str | None, api_key_id: str | None) -> tuple[str, dict[str, Any]]:
    clauses, parameters = [], {}
    if tenant is not None:
        clauses.append("tenant = {tenant:String}")
        parameters["tenant"] = tenant
    if api_key_id is not None:
        clauses.append("api_key_id = {api_key_id:String}")
        parameters["api_key_id"] = api_key_id
    return "".join(f" AND {clause}" for clause in clauses), parameters


async def usage(store: UsageStore, query: UsageQuery) -> list[dict[str, Any]]:
    """One row per bucket (and group), oldest first: the totals and latency quantiles."""
    table, _ = ROLLUPS[query.granularity]
    dimensions = "".join(f", {field}" for field in query.group_by)
    where, parameters = _filters(query.tenant, query.api_key_id)
    sums = ", ".join(f"sum({total})" for total in TOTALS)
    sql = (
        f"SELECT bucket{dimensions}, {sums}, quantilesMerge(0.5, 0.9, 0.99)(latency_ms) FROM {table} "
        f"WHERE bucket >= {{start:DateTime('UTC')}} AND bucket < {{end:DateTime('UTC')}}{where} "
        f"GROUP BY bucket{dimensions} ORDER BY bucket{dimensions}"
    )
    rows = await store.query(sql, {"start": query.start, "end": query.end, **parameters})
    result = []
    for row in rows:
        bucket, groups = row[0], row[1 : 1 + len(query.group_by)]
        totals = row[1 + len(query.group_by) : -1]
        p50, p90, p99 = (None if math.isnan(q) else round(q, 3) for q in row[-1])
        result.append(
            {
                "bucket": bucket,
                **dict(zip(query.group_by, groups, strict=True)),
                **dict(zip(TOTALS, totals, strict=True)),
                "latency_ms": {"p50": p50, "p90": p90, "p99": p99},
            }
        )
    return result


async def billing(store: UsageStore, start: datetime, end: datetime, api_key_id: str | None) -> list[dict[str, Any]]:
    """Totals per tenant and key over ``[start, end)``, from the daily rollup."""
    where, parameters = _filters(None, api_key_id)
    sums = ", ".join(f"sum({total})" for total in TOTALS)
    sql = (
        f"SELECT tenant, api_key_id, {sums} FROM usage_per_day "
        f"WHERE bucket >= {{start:DateTime('UTC')}} AND bucket < {{end:DateTime('UTC')}}{where} "
        "GROUP BY tenant, api_key_id ORDER BY tenant, api_key_id"
    )
    rows = await store.query(sql, {"start": start, "end": end, **parameters})
    return [dict(zip(("tenant", "api_key_id", *TOTALS), row, strict=True)) for row in rows]
