"""`KeyTail`: a partition's unstored records by key, summed from an offset, dropped once stored."""

from __future__ import annotations

import uuid

from aiokafka import ConsumerRecord

from ingest.events import encode
from processors.accounting.tail import KeyTail
from tests.factories import make_event


def record(offset: int, key: str, time_ms: int, cost: int, blocked: bool = False) -> ConsumerRecord[bytes, bytes]:
    event = make_event(event_id=uuid.uuid4(), api_key_id=key, event_time_ms=time_ms, cost=cost, edge_blocked=blocked)
    return ConsumerRecord("events", 0, offset, 0, 0, key.encode(), encode(event), None, 0, 0, [])


T = 1_790_000_000_000


def tail() -> KeyTail:
    tail = KeyTail()
    tail.add([record(10, "a", T, 1), record(11, "b", T, 5), record(12, "a", T + 10, 2), record(13, "a", T + 20, 4, blocked=True)])
    tail.add([record(14, "a", T + 30, 8),
              ConsumerRecord("events", 0, 15, 0, 0, b"a", b"not an event", None, 0, 0, []),
              ConsumerRecord("events", 0, 16, 0, 0, None, b"keyless", None, 0, 0, [])])  # fmt: skip
    return tail


def test_a_keys_billable_units_from_an_offset_within_a_time_range() -> None:
    t = tail()
    assert t.billable_units(b"a", 0, T, T + 100) == 1 + 2 + 8  # the refused (edge-blocked) one and the bad record left out
    assert t.billable_units(b"a", 12, T, T + 100) == 2 + 8
    assert t.billable_units(b"a", 0, T + 10, T + 30) == 2  # the end of the range excluded
    assert t.billable_units(b"b", 0, T, T + 100) == 5
    assert t.billable_units(b"c", 0, T, T + 100) == 0
    assert t.records == 6  # the keyless record is not held


def test_records_below_an_offset_are_dropped_once() -> None:
    t = tail()
    t.drop_below(12)
    assert (t.lowest, t.records) == (12, 4)
    assert t.billable_units(b"a", 0, T, T + 100) == 2 + 8
    assert t.billable_units(b"b", 0, T, T + 100) == 0
    t.drop_below(11)  # lower than before: nothing changes
    assert (t.lowest, t.records) == (12, 4)
    t.drop_below(100)
    assert (t.records, t.billable_units(b"a", 0, T, T + 100)) == (0, 0)
