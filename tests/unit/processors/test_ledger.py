"""`PlanLedger`: events counted in the month of the plan's time zone they fall in, as the sink stores them,
from the sums the sink publishes per batch (`rollups`): each batch counted once, however often published."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

from throttlex.ingest.events import encode
from throttlex.processors.accounting import rollups
from throttlex.processors.accounting.ledger import PlanLedger, month_around
from throttlex.processors.accounting.rollups import Rollup, RollupCounter, RollupGap, rollup_records
from throttlex.processors.accounting.rows import event_rows
from tests.factories import make_event

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
DECEMBER = datetime(2026, 12, 1, tzinfo=BERLIN).astimezone(UTC)  # 2026-11-30 23:00 UTC


def event(at: datetime, cost: int, key: str = "k", blocked: bool = False) -> bytes:
    return encode(make_event(event_id=uuid.uuid4(), api_key_id=key, event_time_ms=int(at.timestamp() * 1000),
                             cost=cost, edge_blocked=blocked))  # fmt: skip


def batch_rollups(values: list[bytes | None], first: int = 0) -> list[Rollup]:
    """What the sink publishes for a batch of these records at offsets ``first...``."""
    offsets = list(range(first, first + len(values)))
    rows, _ = event_rows(values, offsets, 0, [NOW_MS] * len(values))
    return [rollups.decode(value) for _, value in rollup_records(pa.Table.from_batches([rows]), offsets[0], offsets[-1])]


def entries(rollup: Rollup) -> list[tuple[str, int, int]]:
    """(key, minute, units) of each sum in ``rollup``."""
    starts = [sum(rollup.sizes[:n]) for n in range(len(rollup.sizes))]
    return [(key, minute, units) for minute, start, size in zip(rollup.minutes, starts, rollup.sizes, strict=True)
            for key, units in zip(rollup.keys[start : start + size], rollup.units[start : start + size], strict=True)]  # fmt: skip


def feed(ledger: PlanLedger, values: list[bytes | None], now_ms: int = NOW_MS) -> None:
    for rollup in batch_rollups(values):
        ledger.add_units(rollup.minutes, rollup.sizes, rollup.keys, rollup.units, now_ms)


def test_month_around_is_the_zones_calendar_month() -> None:
    assert month_around(DECEMBER - timedelta(milliseconds=1), BERLIN) == (
        datetime(2026, 11, 1, tzinfo=BERLIN).astimezone(UTC), DECEMBER)
    assert month_around(DECEMBER, BERLIN)[0] == DECEMBER


def test_events_count_in_the_month_of_the_zone_they_fall_in() -> None:
    ledger = PlanLedger(BERLIN, NOW)
    november, _ = month_around(NOW, BERLIN)
    feed(ledger, [
        event(DECEMBER - timedelta(milliseconds=1), 1),  # Berlin November, though UTC's November 30
        event(DECEMBER, 10),  # Berlin December, still UTC's November
        event(november - timedelta(seconds=1), 100),  # Berlin October: the month before is kept
        event(NOW, 1_000, blocked=True),  # refused at the edge: not billable
        event(NOW, 5, key="other"),
    ])  # fmt: skip
    assert ledger.month_units("k", november) == 1
    assert ledger.month_units("k", DECEMBER) == 10
    assert ledger.month_units("k", month_around(november - timedelta(days=1), BERLIN)[0]) == 100
    assert ledger.month_units("other", november) == 5
    assert ledger.month_units("nobody", november) == 0


def test_what_the_sink_would_not_store_is_not_counted() -> None:
    ledger = PlanLedger(BERLIN, NOW)
    feed(ledger, [b"not an event", None, event(NOW, 3), b'{"v": 99}'])
    assert ledger.month_units("k", month_around(NOW, BERLIN)[0]) == 3


def test_events_too_old_or_years_ahead_count_in_no_month() -> None:
    ledger = PlanLedger(BERLIN, NOW)
    feed(ledger, [event(NOW - timedelta(days=90), 7), event(NOW + timedelta(days=3650), 9)])
    assert ledger.month_units("k", month_around(NOW, BERLIN)[0]) == 0
    with pytest.raises(ValueError, match="holds months from"):
        ledger.month_units("k", month_around(NOW - timedelta(days=90), BERLIN)[0])


def test_the_last_hour_is_kept_per_minute() -> None:
    ledger = PlanLedger(BERLIN, NOW)
    feed(ledger, [event(NOW - timedelta(minutes=90), 1), event(NOW - timedelta(minutes=59, seconds=30), 2),
                  event(NOW - timedelta(seconds=1), 4), event(NOW, 8)])  # fmt: skip
    hour_ago = NOW_MS - 3_600_000
    assert ledger.units_between("k", hour_ago, NOW_MS) == 2 + 4  # whole minutes from an hour ago to before now
    assert ledger.units_between("k", hour_ago, NOW_MS + 60_000) == 2 + 4 + 8
    ledger.add_units([], [], [], [], NOW_MS + 2 * 3_600_000)  # two hours later: all of them too old to keep
    assert ledger.units_between("k", hour_ago, NOW_MS + 2 * 3_600_000) == 0


def test_a_batch_is_summed_per_key_and_minute_in_chunks_cut_the_same_way_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollups, "MAX_BYTES", 3 * (len("k0") + 16))  # three sums a record
    values: list[bytes | None] = [event(NOW + timedelta(seconds=s), 1 + s % 2, key=f"k{s % 4}") for s in range(0, 120, 5)]
    first, again = batch_rollups(values, first=100), batch_rollups(values, first=100)
    assert first == again
    assert [(r.first, r.last, r.chunk, r.chunks) for r in first] == [(100, 123, c, 3) for c in range(3)]
    assert all(sum(r.sizes) == len(r.keys) == len(r.units) for r in first)
    sums = {(k, m): u for r in first for k, m, u in entries(r)}
    assert len(sums) == 8  # 4 keys x 2 minutes
    assert sum(sums.values()) == sum(1 + s % 2 for s in range(0, 120, 5))
    assert batch_rollups([event(NOW, 3, blocked=True)]) == [Rollup(0, 0, 0, 1, [], [], [], [])]  # done, nothing billable


def test_a_counter_counts_each_chunk_of_each_batch_past_the_split_once_and_notices_a_gap() -> None:
    counter = RollupCounter(split=100)

    def chunk(first: int, last: int, index: int, chunks: int) -> Rollup:
        return Rollup(first, last, index, chunks, [], [], [], [])

    def read(rollup: Rollup) -> bool:
        counted = counter.counts(rollup)
        if counted:
            counter.counted(rollup)
        return counted

    assert not read(chunk(50, 99, 0, 1))  # below the split: loaded from ClickHouse
    assert read(chunk(100, 149, 0, 2))
    assert counter.position == 100  # half of the batch
    assert not read(chunk(100, 149, 0, 2))  # a replay publishing it again
    assert read(chunk(100, 149, 1, 2))
    assert counter.position == 150
    assert not read(chunk(100, 149, 1, 2))
    assert read(chunk(150, 160, 0, 1)) and counter.position == 161
    assert not read(chunk(100, 149, 0, 2))  # an older batch replayed late
    assert read(chunk(161, 170, 0, 2))
    with pytest.raises(RollupGap, match="offsets 161..170 are missing"):  # the batch's second chunk never came
        read(chunk(171, 180, 0, 1))
    with pytest.raises(RollupGap, match="offsets 100..149 are missing"):  # a sink that published nothing for them
        RollupCounter(split=100).counts(chunk(150, 160, 0, 1))


def test_the_sinks_commit_metadata_reads_back_and_reads_an_older_sinks() -> None:
    assert rollups.read_metadata(rollups.commit_metadata(inflight=41, rollups=7)) == (41, 7)
    assert rollups.read_metadata(rollups.commit_metadata(rollups=7) + "\0") == (None, 7)  # librdkafka's trailing NUL
    assert rollups.read_metadata("inflight:41") == (41, None)
    assert rollups.read_metadata("") == rollups.read_metadata(None) == (None, None)


def test_a_batch_of_long_key_ids_is_cut_into_records_of_bounded_size() -> None:
    values: list[bytes | None] = [event(NOW, 1, key=f"{n:0256d}") for n in range(5_000)]  # the longest key ids allowed
    records = [value for _, value in rollup_records(pa.Table.from_batches([event_rows(values, list(range(5_000)), 0,
                                                                                      [NOW_MS] * 5_000)[0]]), 0, 4_999)]  # fmt: skip
    assert len(records) > 1 and max(map(len, records)) <= rollups.MAX_BYTES + 1_000
    assert sum(len(rollups.decode(value).keys) for value in records) == 5_000
