"""Dry-run of a policy: replay stored usage through it and say which keys it would have blocked, when.

The policy is applied alone (enforcing, even if it is a shadow policy), by the same `PolicyEngine`
the workers run, to the events in event-time order. While the replay has a key blocked, that key's
requests count as refused at the edge — as they would have been — so they do not extend the block.
Requests the policies in force refused at the time (``edge_blocked``) never reached the API and do
not count either.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from ingest.events import UsageEvent
from processors.core.engine import PolicyEngine
from processors.core.policy import Policy, PolicySet
from processors.accounting.store import UsageStore


@dataclass
class KeyBlocks:
    limit_key: str
    intervals: list[tuple[int, int]] = field(default_factory=list)
    """``(start_ms, until_ms)``: from the event that crossed the limit to when the policy admitted again."""


@dataclass
class Backtest:
    events: int = 0
    keys: dict[str, KeyBlocks] = field(default_factory=dict)


def replay(policy: Policy, policies: PolicySet, events: Iterable[UsageEvent]) -> Backtest:
    """Blocks ``policy`` would have set over ``events`` (in event-time order); plans from ``policies``."""
    alone = PolicySet(
        policies=[policy.model_copy(update={"shadow": False})], plans=policies.plans, default_plan=policies.default_plan
    )
    engine = PolicyEngine(alone)
    result = Backtest()
    for event in events:
        result.events += 1
        key = policy.limit_key(event)
        blocked = result.keys.get(key)
        if blocked is not None and blocked.intervals[-1][1] > event.event_time_ms:
            continue  # refused at the edge under this policy
        outcome = engine.apply(event)
        for forward in outcome.forwards:  # a policy not keyed on api_key: applied by its own key
            engine.apply_forwarded(forward, into=outcome)
        for block in outcome.blocks:
            entry = result.keys.setdefault(block.limit_key, KeyBlocks(block.limit_key))
            entry.intervals.append((event.event_time_ms, block.until_ms))
    return result


async def stored_events(store: UsageStore, start: datetime, end: datetime, limit: int) -> list[UsageEvent]:
    """Stored events in ``[start, end)`` in event-time order (ties in Kafka order); at most ``limit + 1``,
    so a caller can tell that the range holds more than ``limit``."""
    rows = await store.query(
        "SELECT event_id, toUnixTimestamp64Milli(event_time), api_key_id, tenant, route, method, status, latency_ms, "
        "response_bytes, cost, client_ip, edge_blocked, plan FROM usage_events "
        "WHERE event_time >= {start:DateTime64(3, 'UTC')} AND event_time < {end:DateTime64(3, 'UTC')} "
        "ORDER BY event_time, kafka_partition, kafka_offset LIMIT {limit:UInt64}",
        {"start": start, "end": end, "limit": limit + 1},
    )
    return [
        UsageEvent(
            event_id=row[0], event_time_ms=int(row[1]), api_key_id=row[2], tenant=row[3], route=row[4], method=row[5],
            status=int(row[6]), latency_ms=float(row[7]), response_bytes=int(row[8]), cost=int(row[9]),
            client_ip=row[10], edge_blocked=bool(row[11]), plan=row[12],
        )  # fmt: skip
        for row in rows
    ]
