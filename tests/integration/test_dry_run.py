"""A dry run read from chDB a page at a time gives exactly the replay of all the stored events at once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from throttlex.ingest.events import UsageEvent, encode
from throttlex.processors.accounting.rows import EVENT_SCHEMA, arrow_stream, event_rows
from throttlex.processors.accounting.store import UsageStore
from throttlex.processors.core.dry_run import TooManyEvents, replay, replay_stored
from throttlex.processors.core.policy import parse_policies
from tests.factories import make_event

START_MS = int(datetime(2026, 10, 5, 10, tzinfo=UTC).timestamp() * 1000)
POLICIES = parse_policies(
    "policies:\n"
    "  - name: per-key\n"
    "    key: [api_key]\n"
    "    algorithm: {type: sliding_window, limit: 6, window_s: 5, bucket_s: 1}\n"
    "  - name: per-tenant\n"
    "    key: [tenant]\n"
    "    algorithm: {type: token_bucket, burst: 30, rate_per_s: 1.5}\n",
    "test policies",
)


def history() -> list[UsageEvent]:
    """Bursts of 12 keys of 3 tenants over ten minutes, many on the same millisecond (ties across pages)."""
    events = []
    for n in range(3_000):
        t = START_MS + (n // 5) * 1_000 + (n % 3) * 250 * ((n // 60) % 2)
        events.append(make_event(event_id=uuid.uuid4(), api_key_id=f"key-{n % 12}", tenant=f"tenant-{n % 3}",
                                 event_time_ms=t, cost=1 + n % 2))  # fmt: skip
    return events


async def stored(tmp_path: Path, events: list[UsageEvent]) -> UsageStore:
    """The events in a fresh chDB, each key's events on one partition in order, as the sink stores them."""
    store = UsageStore(f"chdb://{tmp_path / 'chdb'}")
    await store.open()
    await store.migrate()
    for partition in range(4):
        mine = [event for event in events if int(event.api_key_id.removeprefix("key-")) % 4 == partition]
        rows, _ = event_rows([encode(event) for event in mine], range(len(mine)), partition)
        await store.insert_arrow("usage_events", arrow_stream(pa.Table.from_batches([rows])), EVENT_SCHEMA.names,
                                 dedup_token=f"dry-run/{partition}")  # fmt: skip
    return store


@pytest.mark.parametrize("name", ["per-key", "per-tenant"])
async def test_a_paged_dry_run_equals_the_replay_of_every_event_at_once(tmp_path: Path, name: str) -> None:
    events = history()
    store = await stored(tmp_path, events)
    policy = POLICIES.by_name(name)
    assert policy is not None
    start, end = datetime(2026, 10, 5, tzinfo=UTC), datetime(2026, 10, 6, tzinfo=UTC)
    try:
        paged = await replay_stored(store, policy, POLICIES, start, end, most=len(events), page_rows=257)
        with pytest.raises(TooManyEvents, match="3000 events in the range, more than the 2999"):
            await replay_stored(store, policy, POLICIES, start, end, most=len(events) - 1)
    finally:
        await store.close()
    # Stored order: event time, then partition and offset; each key's events keep their order.
    by_partition = {id(event): (int(event.api_key_id.removeprefix("key-")) % 4) for event in events}
    ordered = sorted(events, key=lambda event: (event.event_time_ms, by_partition[id(event)]))
    whole = replay(policy, POLICIES, ordered)
    assert paged.events == whole.events == len(events)
    assert {k: v.intervals for k, v in paged.keys.items()} == {k: v.intervals for k, v in whole.keys.items()}
    assert sum(len(v.intervals) for v in whole.keys.values()) >= 20  # the policy does block, often
