"""Reconciliation: the workers' live windows against ClickHouse's exact counts, as a drift metric.

Each round reads the live windows the workers mirror to Redis and, for the buckets old enough that
both the worker and the sink have seen their events (``settle_s``), compares the window's units with
the units ClickHouse holds for the same key, policy match and time range. Differences come from
events the window refused as too late, from a worker that counted an event twice after a crash, or
from a fault; ``throttlex_reconciliation_drift_units`` says how large they are.

Sliding-window policies are compared (they keep per-bucket counts); fixed windows and token buckets
are not. Buckets count as settled by event time, so events that reach Kafka long after their event time
(backfills) show as drift until the sink has stored them; the next rounds clear it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from throttlex.ingest.clock import Clock, wall_clock_ms
from throttlex.processors import metrics
from throttlex.processors.worker.live_usage import read_live_usage, usage_key
from throttlex.processors.core.policy import Policy, PolicySet
from throttlex.processors.accounting.store import StoreError, UsageStore
from throttlex.processors.core.windows import SlidingWindow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Round:
    windows: int
    mismatched: int
    drift_units: int


def route_regex(patterns: list[str]) -> str:
    """An RE2 regular expression equivalent to the shell-style route globs (``*`` and ``?``)."""
    alternatives = []
    for pattern in patterns:
        parts = re.split(r"([*?])", pattern)
        alternatives.append("".join(".*" if p == "*" else "." if p == "?" else re.escape(p) for p in parts))
    return "^(" + "|".join(alternatives) + ")$"


def _counted_sql(policy: Policy, default_plan: str | None) -> tuple[str, str, dict[str, Any]]:
    """What a policy's window counts, in SQL over ``usage_events``: the units of each event (its route's
    cost where ``route_costs`` sets one, first match first, else its own) and the events its match takes
    (routes, methods, tenants, and plans, an event without a plan being on the default plan)."""
    match = policy.match
    parameters: dict[str, Any] = {"route_regex": route_regex(match.routes)}
    units = "cost"
    if policy.route_costs:
        branches = []
        for n, (pattern, cost) in enumerate(policy.route_costs.items()):
            branches.append(f"match(route, {{route_cost_{n}:String}}), {{cost_{n}:UInt32}}")
            parameters |= {f"route_cost_{n}": route_regex([pattern]), f"cost_{n}": cost}
        units = f"multiIf({', '.join(branches)}, cost)"
    where = " AND match(route, {route_regex:String})"
    if match.methods is not None:
        where += " AND method IN {methods:Array(String)}"
        parameters["methods"] = match.methods
    if match.tenants is not None:
        where += " AND tenant IN {tenants:Array(String)}"
        parameters["tenants"] = match.tenants
    if match.plans is not None:
        where += " AND if(plan = '', {default_plan:String}, plan) IN {plans:Array(String)}"
        parameters |= {"plans": match.plans, "default_plan": default_plan or ""}  # no default: matches no plan
    return units, where, parameters


def settled_range(window: SlidingWindow, now_ms: int, settle_ms: int) -> tuple[int, int] | None:
    """The window's buckets ``[first, end)`` that ended at least ``settle_ms`` ago, or None."""
    first = window.head - window.buckets + 1
    end = min(window.head + 1, (now_ms - settle_ms) // window.bucket_ms)
    return (first, end) if end > first else None


class Reconciler:
    def __init__(
        self,
        redis: Redis,
        prefix: str,
        policies: PolicySet,
        store: UsageStore,
        *,
        settle_s: float,
        max_keys: int,
        clock: Clock = wall_clock_ms,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.policies = policies
        """The policies in force: the runner replaces them when the file or the registry changes them."""
        self._store = store
        self._settle_ms = int(settle_s * 1000)
        self._max_keys = max_keys
        self._clock = clock

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                result = await self.run_once()
            except (RedisError, OSError, StoreError) as exc:
                metrics.RECONCILE_ERRORS.inc()
                log.warning("reconciliation round failed", extra={"error": str(exc)})
                continue
            metrics.RECONCILE_DRIFT.set(result.drift_units)
            if result.mismatched:
                log.warning("live counts drift from ClickHouse", extra=vars(result))

    async def run_once(self) -> Round:
        windows = mismatched = drift = 0
        prefix = usage_key(self._prefix, "")
        keys = []
        async for name in self._redis.scan_iter(match=f"{prefix}*", count=500):
            keys.append(name.decode().removeprefix(prefix))
            if len(keys) >= self._max_keys:
                break
        now_ms = self._clock()
        for limit_key in keys:
            dimension, _, key_id = limit_key.partition("=")
            if dimension != "api_key":
                continue
            policies = self.policies  # one set for the whole key, even if they change meanwhile
            for name, window in (await read_live_usage(self._redis, self._prefix, limit_key, policies)).items():
                if not isinstance(window, SlidingWindow):  # only sliding windows keep per-bucket counts
                    continue
                policy = policies.by_name(name)
                settled = settled_range(window, now_ms, self._settle_ms)
                if policy is None or settled is None:
                    continue
                first, end = settled
                live = sum(window.counts[bucket - first] for bucket in range(first, end))
                stored = await self._stored_units(key_id, policy, policies.default_plan, first * window.bucket_ms, end * window.bucket_ms)
                windows += 1
                metrics.RECONCILE_WINDOWS.inc()
                if live != stored:
                    mismatched += 1
                    drift += abs(live - stored)
                    metrics.RECONCILE_MISMATCHES.inc()
        return Round(windows, mismatched, drift)

    async def _stored_units(self, key_id: str, policy: Policy, default_plan: str | None, start_ms: int, end_ms: int) -> int:
        units, where, parameters = _counted_sql(policy, default_plan)
        sql = (
            f"SELECT sum({units}) FROM usage_events WHERE api_key_id = {{key:String}} AND NOT edge_blocked "
            "AND event_time >= {start:DateTime64(3, 'UTC')} AND event_time < {end:DateTime64(3, 'UTC')}" + where
        )
        [(stored,)] = await self._store.query(
            sql,
            {
                "key": key_id,
                "start": datetime.fromtimestamp(start_ms / 1000, tz=UTC),
                "end": datetime.fromtimestamp(end_ms / 1000, tz=UTC),
                **parameters,
            },
        )
        return int(stored or 0)
