"""Dry-run of a policy: replay stored usage through it and say which keys it would have blocked, when.

The policy is applied alone (enforcing, even if it is a shadow policy), by the same `PolicyEngine`
the workers run, to the events in event-time order. While the replay has a key blocked, that key's
requests count as refused at the edge — as they would have been — so they do not extend the block.
Requests the policies in force refused at the time (``edge_blocked``) never reached the API and do
not count either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from throttlex.ingest.events import UsageEvent
from throttlex.processors.core.engine import PolicyEngine
from throttlex.processors.core.policy import Policy, PolicySet
from throttlex.processors.accounting.store import UsageStore


@dataclass
class KeyBlocks:
    limit_key: str
    intervals: list[tuple[int, int]] = field(default_factory=list)
    """``(start_ms, until_ms)``: from the event that crossed the limit to when the policy admitted again."""


@dataclass
class Backtest:
    events: int = 0
    keys: dict[str, KeyBlocks] = field(default_factory=dict)


class Replay:
    """``policy`` replayed alone over events fed to it in event-time order, a page at a time; plans from
    ``policies``. Pure computation: callers run `feed` off the event loop."""

    def __init__(self, policy: Policy, policies: PolicySet) -> None:
        self._policy = policy
        alone = PolicySet(
            policies=[policy.model_copy(update={"shadow": False})], plans=policies.plans, default_plan=policies.default_plan
        )
        self._engine = PolicyEngine(alone)
        self.result = Backtest()

    def feed(self, events: Iterable[UsageEvent]) -> None:
        result, engine = self.result, self._engine
        for event in events:
            result.events += 1
            key = self._policy.limit_key(event)
            blocked = result.keys.get(key)
            if blocked is not None and blocked.intervals[-1][1] > event.event_time_ms:
                continue  # refused at the edge under this policy
            outcome = engine.apply(event)
            for forward in outcome.forwards:  # a policy not keyed on api_key: applied by its own key
                engine.apply_forwarded(forward, into=outcome)
            for block in outcome.blocks:
                entry = result.keys.setdefault(block.limit_key, KeyBlocks(block.limit_key))
                entry.intervals.append((event.event_time_ms, block.until_ms))

    def feed_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        """Feed rows of `_PAGE_SQL`."""
        self.feed(
            UsageEvent(
                event_id=row[0], event_time_ms=int(row[1]), api_key_id=row[2], tenant=row[3], route=row[4], method=row[5],
                status=int(row[6]), latency_ms=float(row[7]), response_bytes=int(row[8]), cost=int(row[9]),
                client_ip=row[10], edge_blocked=bool(row[11]), plan=row[12],
            )  # fmt: skip
            for row in rows
        )


def replay(policy: Policy, policies: PolicySet, events: Iterable[UsageEvent]) -> Backtest:
    """Blocks ``policy`` would have set over ``events`` (in event-time order); plans from ``policies``."""
    replaying = Replay(policy, policies)
    replaying.feed(events)
    return replaying.result


class TooManyEvents(ValueError):
    def __init__(self, count: int, most: int) -> None:
        super().__init__(f"{count} events in the range, more than the {most} a dry run replays; narrow from/to")


PAGE_ROWS = 10_000
"""Events read and replayed at a time: memory stays bounded, and turning a page of rows into Python values,
which holds the interpreter lock throughout, stays short (13 ms for 10,000 rows here, 55 ms for 50,000)."""
_RANGE = "event_time >= {start:DateTime64(3, 'UTC')} AND event_time < {end:DateTime64(3, 'UTC')}"
_PAGE_SQL = (
    "SELECT event_id, toUnixTimestamp64Milli(event_time) AS t, api_key_id, tenant, route, method, status, latency_ms, "
    "response_bytes, cost, client_ip, edge_blocked, plan, kafka_partition, kafka_offset FROM usage_events "
    f"WHERE {_RANGE} AND (t, kafka_partition, kafka_offset) > ({{t:Int64}}, {{partition:UInt16}}, {{offset:Int64}}) "
    "ORDER BY event_time, kafka_partition, kafka_offset LIMIT {rows:UInt64}"
)


async def replay_stored(
    store: UsageStore, policy: Policy, policies: PolicySet, start: datetime, end: datetime, *, most: int,
    page_rows: int = PAGE_ROWS,
) -> Backtest:
    """Replay ``policy`` over the events stored in ``[start, end)``, in event-time order (ties in Kafka order).

    The events are read a page at a time (on the store's session for long reads) and replayed on a thread of their
    own, so a dry run of millions of events neither holds them all in memory nor stops the event loop: the
    API keeps answering meanwhile. `TooManyEvents` if the range holds more than ``most``.
    """
    bounds = {"start": start, "end": end}
    [(count,)] = await store.query(f"SELECT count() FROM usage_events WHERE {_RANGE}", bounds)
    if count > most:
        raise TooManyEvents(count, most)
    replaying = Replay(policy, policies)
    after = (-1, 0, -1)  # before every (time, partition, offset)
    while True:
        rows = await store.scan(_PAGE_SQL, {**bounds, "t": after[0], "partition": after[1], "offset": after[2], "rows": page_rows})
        await asyncio.to_thread(replaying.feed_rows, rows)
        if len(rows) < page_rows:
            return replaying.result
        last = rows[-1]
        after = (int(last[1]), int(last[13]), int(last[14]))
