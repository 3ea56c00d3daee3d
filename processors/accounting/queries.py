"""Read-only queries over the rollups, for the usage API and the billing export.

Every value is a bound query parameter; column and table names come only from the fixed tables below,
so no caller input is ever spliced into SQL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from processors.accounting.store import UsageStore

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


async def stored_billable_units(
    store: UsageStore, api_key_id: str, start: datetime, end: datetime, *, partition: int, below_offset: int
) -> int:
    """Billable units of one key over ``[start, end)`` stored below ``below_offset`` of its partition.

    Whole minutes come from ``usage_units_per_minute``, so the read does not grow with the history and
    holds after raw retention. A minute whose highest offset is not below the split (it also holds
    events stored above it: the sink's batch in flight, or a late event landing in an older minute) is
    summed from the raw rows below the split instead, and so are the parts of minutes ``start`` and
    ``end`` cut (none for periods starting at midnight in any time zone). Those raw rows must still be
    there: recent minutes always are; a late event older than the raw retention is not.
    """
    first_minute = _ceil_minute(start)
    end_minute = max(_floor_minute(end), first_minute)
    settled_sql = (
        "SELECT sumIf(units, kafka_partition != {p:UInt16} OR top < {below:UInt64}), "
        "groupArrayIf(bucket, kafka_partition = {p:UInt16} AND top >= {below:UInt64}) "
        "FROM (SELECT bucket, kafka_partition, sum(billable_units) AS units, max(top_offset) AS top "
        "FROM usage_units_per_minute WHERE api_key_id = {api_key_id:String} "
        "AND bucket >= {first:DateTime('UTC')} AND bucket < {end:DateTime('UTC')} GROUP BY bucket, kafka_partition)"
    )
    parameters: dict[str, Any] = {"api_key_id": api_key_id, "p": partition, "below": below_offset,
                                  "first": first_minute, "end": end_minute}  # fmt: skip
    [(settled, unsettled)] = await store.query(settled_sql, parameters)
    units = int(settled or 0)
    if not unsettled and first_minute == start and end_minute == end:
        return units
    raw_sql = (
        "SELECT sum(cost) FROM usage_events WHERE api_key_id = {api_key_id:String} AND NOT edge_blocked "
        "AND kafka_partition = {p:UInt16} AND kafka_offset < {below:UInt64} "
        "AND event_time >= {start:DateTime64(3, 'UTC')} AND event_time < {stop:DateTime64(3, 'UTC')} "
        "AND (event_time < {first:DateTime('UTC')} OR event_time >= {end:DateTime('UTC')} "
        "OR toStartOfMinute(event_time) IN {unsettled:Array(DateTime('UTC'))})"
    )
    [(raw,)] = await store.query(raw_sql, {**parameters, "start": start, "stop": end, "unsettled": list(unsettled)})
    return units + int(raw or 0)


def _floor_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _ceil_minute(moment: datetime) -> datetime:
    floor = _floor_minute(moment)
    return floor if floor == moment else floor + timedelta(minutes=1)
