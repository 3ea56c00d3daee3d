"""`PlanLedger`: events counted in the month of the plan's time zone they fall in, as the sink stores them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from throttlex.ingest.events import encode
from throttlex.processors.accounting.ledger import PlanLedger, month_around
from tests.factories import make_event

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
DECEMBER = datetime(2026, 12, 1, tzinfo=BERLIN).astimezone(UTC)  # 2026-11-30 23:00 UTC


def event(at: datetime, cost: int, key: str = "k", blocked: bool = False) -> bytes:
    return encode(make_event(event_id=uuid.uuid4(), api_key_id=key, event_time_ms=int(at.timestamp() * 1000),
                             cost=cost, edge_blocked=blocked))  # fmt: skip


def test_month_around_is_the_zones_calendar_month() -> None:
    assert month_around(DECEMBER - timedelta(milliseconds=1), BERLIN) == (
        datetime(2026, 11, 1, tzinfo=BERLIN).astimezone(UTC), DECEMBER)
    assert month_around(DECEMBER, BERLIN)[0] == DECEMBER


def test_events_count_in_the_month_of_the_zone_they_fall_in() -> None:
    ledger = PlanLedger(BERLIN, NOW)
    november, _ = month_around(NOW, BERLIN)
    ledger.add([
        event(DECEMBER - timedelta(milliseconds=1), 1),  # Berlin November, though UTC's November 30
        event(DECEMBER, 10),  # Berlin December, still UTC's November
        event(november - timedelta(seconds=1), 100),  # Berlin October: the month before is kept
        event(NOW, 1_000, blocked=True),  # refused at the edge: not billable
        event(NOW, 5, key="other"),
    ], NOW_MS)  # fmt: skip
    assert ledger.month_units("k", november) == 1
    assert ledger.month_units("k", DECEMBER) == 10
    assert ledger.month_units("k", month_around(november - timedelta(days=1), BERLIN)[0]) == 100
    assert ledger.month_units("other", november) == 5
    assert ledger.month_units("nobody", november) == 0


def test_what_the_sink_would_not_store_is_not_counted() -> None:
    ledger = PlanLedger(BERLIN, NOW)
    ledger.add([b"not an event", None, event(NOW, 3), b'{"v": 99}'], NOW_MS)
    assert ledger.month_units("k", month_around(NOW, BERLIN)[0]) == 3


def test_events_too_old_or_years_ahead_count_in_no_month() -> None:
    ledger = PlanLedger(BERLIN, NOW)
    ledger.add([event(NOW - timedelta(days=90), 7), event(NOW + timedelta(days=3650), 9)], NOW_MS)
    assert ledger.month_units("k", month_around(NOW, BERLIN)[0]) == 0
    with pytest.raises(ValueError, match="holds months from"):
        ledger.month_units("k", month_around(NOW - timedelta(days=90), BERLIN)[0])


def test_the_last_hour_is_kept_per_minute() -> None:
    ledger = PlanLedger(BERLIN, NOW)
    ledger.add([event(NOW - timedelta(minutes=90), 1), event(NOW - timedelta(minutes=59, seconds=30), 2),
                event(NOW - timedelta(seconds=1), 4), event(NOW, 8)], NOW_MS)  # fmt: skip
    hour_ago = NOW_MS - 3_600_000
    assert ledger.units_between("k", hour_ago, NOW_MS) == 2 + 4  # whole minutes from an hour ago to before now
    assert ledger.units_between("k", hour_ago, NOW_MS + 60_000) == 2 + 4 + 8
    ledger.add([], NOW_MS + 2 * 3_600_000)  # two hours later: all of them too old to keep
    assert ledger.units_between("k", hour_ago, NOW_MS + 2 * 3_600_000) == 0
