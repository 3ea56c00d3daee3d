"""``GET /v1/quota``: the calling key's limits, usage, remaining units, reset and block times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from redis.asyncio import Redis

from throttlex.api import metrics
from throttlex.api.auth import CallerKey, caller_key
from throttlex.ingest import denylist_entries
from throttlex.ingest.clock import wall_clock_ms
from throttlex.processors.worker.live_usage import read_live_usage
from throttlex.processors.accounting.exact_usage import ExactUsage
from throttlex.processors.core.policy import PolicySet, QuotaAlgorithm
from throttlex.processors.accounting.store import StoreError, UsageStore

router = APIRouter(prefix="/v1", tags=["quota"])


class PolicyQuota(BaseModel):
    policy: str
    algorithm: str
    limit: int = Field(description="cost units allowed per window")
    window_s: float
    used: int = Field(description="cost units counted in the window now")
    remaining: int = Field(description="cost units left before the key is blocked")
    resets_at: datetime | None = Field(description="when everything counted now has left the window")
    blocked_until: datetime | None = Field(description="when this policy admits the key again, if it is over")
    shadow: bool


class PlanQuota(BaseModel):
    plan: str
    period_start: datetime
    period_end: datetime
    limit_units: int = Field(description="billable cost units in the period")
    used_units: int = Field(description="billable units this period: in ClickHouse plus on Kafka not stored yet")
    remaining_units: int
    runs_out_at: datetime | None = Field(
        description="when the quota runs out at the last hour's rate: now if it has, null if not this period"
    )


class QuotaReport(BaseModel):
    api_key_id: str
    limit_key: str
    blocked_until: datetime | None = Field(description="the block the gateways enforce now, if any")
    blocked_by: str | None = Field(description="the policy that caused that block")
    policies: list[PolicyQuota]
    plan: PlanQuota | None = Field(description="the key's plan quota; null without plans or ClickHouse access")


def _instant(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


@router.get("/quota", response_model=QuotaReport, summary="Quota and usage of the calling API key")
async def quota(request: Request, caller: Annotated[CallerKey, Depends(caller_key)]) -> QuotaReport:
    redis: Redis = request.app.state.redis
    prefix: str = request.app.state.settings.redis_prefix
    policies: PolicySet = request.app.state.policies
    now_ms = wall_clock_ms()
    windows = await read_live_usage(redis, prefix, caller.limit_key, policies)

    plan = caller.plan or policies.default_plan
    reports = []
    for policy in policies.policies:
        limit = policies.limit_of(policy, plan)
        if policy.key != ("api_key",) or limit is None:
            continue  # reported here: the policies that count this key alone
        algorithm = policy.algorithm
        window = windows.get(policy.name)
        used = window.used_at(now_ms) if window else 0
        over = window is not None and used >= limit
        reports.append(
            PolicyQuota(
                policy=policy.name,
                algorithm=algorithm.type,
                limit=limit,
                window_s=algorithm.window_s,
                used=used,
                remaining=max(0, limit - used),
                resets_at=_instant(window.empties_at()) if window and used else None,
                blocked_until=_instant(window.admits_at(limit)) if window and over else None,
                shadow=policy.shadow,
            )
        )

    raw = await redis.get(denylist_entries.block_key(prefix, caller.limit_key))
    block = denylist_entries.decode_block(raw) if raw is not None else None
    metrics.QUOTA_REPORTS.inc()
    return QuotaReport(
        api_key_id=caller.key_id,
        limit_key=caller.limit_key,
        blocked_until=_instant(block.until_ms) if block else None,
        blocked_by=block.policy if block else None,
        policies=reports,
        plan=await _plan_quota(request, caller, datetime.fromtimestamp(now_ms / 1000, tz=UTC)),
    )


async def _plan_quota(request: Request, caller: CallerKey, now: datetime) -> PlanQuota | None:
    """The key's plan's monthly quota: the units ClickHouse holds plus those still on their way to
    it, so the count is exact and never counted twice."""
    store: UsageStore | None = request.app.state.store
    exact: ExactUsage | None = request.app.state.exact_usage
    policies: PolicySet = request.app.state.policies
    plan_name = caller.plan or policies.default_plan
    if store is None or exact is None or plan_name is None or plan_name not in policies.plans:
        return None
    plan = policies.plans[plan_name]
    key_id = caller.key_id
    try:
        usage = await exact.plan_usage(store, key_id, plan_zone(policies), now)
    except (StoreError, KafkaError):
        return None
    start, end, used, last_hour = usage.month_start, usage.month_end, usage.month_units, usage.last_hour_units
    remaining = max(0, plan.monthly_units - used)
    runs_out_at = None
    if remaining == 0:
        runs_out_at = now
    elif last_hour:
        forecast = now + timedelta(seconds=remaining / (last_hour / 3600))
        runs_out_at = forecast if forecast < end else None
    return PlanQuota(
        plan=plan_name, period_start=start, period_end=end, limit_units=plan.monthly_units,
        used_units=used, remaining_units=remaining, runs_out_at=runs_out_at,
    )  # fmt: skip


def plan_zone(policies: PolicySet) -> ZoneInfo:
    """The time zone whose months the plan quota counts in: that of the policy enforcing monthly quotas
    per key, if there is one, else UTC."""
    for policy in policies.policies:
        algorithm = policy.algorithm
        if isinstance(algorithm, QuotaAlgorithm) and algorithm.period == "month" and policy.key == ("api_key",):
            return algorithm.zone
    return ZoneInfo("UTC")
