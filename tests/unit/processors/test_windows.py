"""Window arithmetic (sliding, fixed, token bucket), by example and against brute-force references."""

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datetime import datetime
from zoneinfo import ZoneInfo

from throttlex.processors.core.windows import SETTLE_AT_ONCE, CalendarQuota, FixedWindow, SlidingWindow, TokenBucket

SECOND = 1000


def window_10s() -> SlidingWindow:
    return SlidingWindow(window_ms=10 * SECOND, bucket_ms=SECOND)


def test_counts_cost_units_in_the_window() -> None:
    window = window_10s()
    for t in (0, 500, 1_200, 9_999):
        assert window.add(t, 2)
    assert window.used_at(9_999) == 8


def test_an_event_leaves_at_the_first_bucket_boundary_a_window_after_its_bucket() -> None:
    window = window_10s()
    window.add(1_500, 1)  # bucket [1s, 2s)
    assert window.used_at(10_999) == 1
    assert window.used_at(11_000) == 0


def test_blocked_at_the_limit_and_admitted_when_enough_old_units_leave() -> None:
    window = window_10s()
    window.add(0, 3)
    window.add(4_000, 3)
    window.add(9_000, 4)
    assert window.admits_at(limit=11) is None
    # 10 units: blocked. The 3 units of bucket 0 leave at 10s, leaving 7 < 10.
    assert window.admits_at(limit=10) == 10 * SECOND
    # With limit 5 the units of bucket 4 must leave too: at 14s only 4 remain.
    assert window.admits_at(limit=5) == 14 * SECOND


def test_out_of_order_events_inside_the_window_are_counted() -> None:
    window = window_10s()
    window.add(9_000, 1)
    assert window.add(2_000, 1)
    assert window.used_at(9_000) == 2


def test_events_older_than_the_window_are_refused() -> None:
    window = window_10s()
    window.add(20_000, 1)
    assert not window.add(10_999, 1)  # bucket 10 left the window of bucket 20
    assert window.add(11_000, 1)
    assert window.used_at(20_000) == 2


def test_empties_when_the_newest_counted_bucket_leaves() -> None:
    window = window_10s()
    assert window.empties_at() is None
    window.add(3_200, 1)
    window.add(5_900, 1)
    assert window.empties_at() == 15 * SECOND


def test_window_must_be_whole_buckets() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(window_ms=10_500, bucket_ms=SECOND)


# --- brute force reference -------------------------------------------------------------------


def reference(events: list[tuple[int, int]], bucket_ms: int, buckets: int) -> tuple[list[tuple[int, int]], int]:
    """Accepted (bucket, cost) pairs and the newest bucket, by the rule in the module docstring."""
    accepted: list[tuple[int, int]] = []
    head = -1
    for t, cost in events:
        bucket = t // bucket_ms
        head = max(head, bucket)
        if bucket > head - buckets:
            accepted.append((bucket, cost))
    return accepted, head


def reference_used(accepted: list[tuple[int, int]], head: int, now_bucket: int, buckets: int) -> int:
    current = max(head, now_bucket)
    return sum(cost for bucket, cost in accepted if current - buckets < bucket <= current)


event_times = st.lists(
    st.tuples(st.integers(min_value=0, max_value=60_000), st.integers(min_value=0, max_value=5)),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    events=event_times,
    buckets=st.integers(min_value=1, max_value=12),
    bucket_ms=st.sampled_from([100, 250, 1000]),
    limit=st.integers(min_value=1, max_value=40),
    probe_ms=st.integers(min_value=0, max_value=90_000),
)
def test_matches_brute_force(events: list[tuple[int, int]], buckets: int, bucket_ms: int, limit: int, probe_ms: int) -> None:
    window = SlidingWindow(window_ms=buckets * bucket_ms, bucket_ms=bucket_ms)
    accepted_flags = [window.add(t, cost) for t, cost in events]
    accepted, head = reference(events, bucket_ms, buckets)

    assert sum(accepted_flags) == len(accepted)
    assert window.used_at(probe_ms) == reference_used(accepted, head, probe_ms // bucket_ms, buckets)

    expected_admit = None
    if reference_used(accepted, head, head, buckets) >= limit:
        k = head + 1
        while reference_used(accepted, head, k, buckets) >= limit:
            k += 1
        expected_admit = k * bucket_ms
    assert window.admits_at(limit) == expected_admit


# --- fixed window -----------------------------------------------------------------------------


def test_fixed_window_blocks_until_the_next_window_starts() -> None:
    window = FixedWindow(window_ms=60_000, origin_ms=30_000)  # windows [30s, 90s), [90s, 150s)...
    window.add(40_000, 3)
    window.add(89_999, 2)
    assert window.admits_at(limit=5) == 90_000
    assert window.admits_at(limit=6) is None
    assert window.used_at(89_999) == 5 and window.used_at(90_000) == 0
    window.add(90_000, 1)  # a new window
    assert window.used_at(90_000) == 1 and window.admits_at(limit=5) is None
    assert not window.add(89_000, 1)  # the earlier window is closed


@settings(max_examples=300, deadline=None)
@given(events=event_times, window_ms=st.sampled_from([1_000, 7_000, 60_000]), origin_ms=st.integers(0, 10_000),
       limit=st.integers(min_value=1, max_value=40))  # fmt: skip
def test_fixed_window_matches_brute_force(events: list[tuple[int, int]], window_ms: int, origin_ms: int, limit: int) -> None:
    window = FixedWindow(window_ms=window_ms, origin_ms=origin_ms)
    accepted: list[tuple[int, int]] = []
    newest: int | None = None
    for t, cost in events:
        index = (t - origin_ms) // window_ms
        newest = index if newest is None else max(newest, index)
        assert window.add(t, cost) == (index == newest)
        if index == newest:
            accepted.append((index, cost))
    if newest is None:
        assert window.admits_at(limit) is None
        return
    used = sum(cost for index, cost in accepted if index == newest)
    assert window.used_at(origin_ms + newest * window_ms) == used
    assert window.admits_at(limit) == (origin_ms + (newest + 1) * window_ms if used >= limit else None)


# --- token bucket -----------------------------------------------------------------------------


def test_token_bucket_admits_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5)  # a token every 100 ms
    for _ in range(4):
        bucket.add(1_000, 1)
    assert bucket.admits_at(limit=5) is None  # one token left
    bucket.add(1_000, 1)
    assert bucket.admits_at(limit=5) == 1_100  # empty: the next token comes 100 ms later
    assert bucket.used_at(1_000) == 5 and bucket.used_at(1_250) == 3 and bucket.used_at(1_500) == 0
    assert bucket.empties_at() == 1_500


def assert_bucket_matches(bucket: TokenBucket, burst: int, rate: Fraction, owed: Fraction, now_ms: int) -> None:
    """The bucket at ``now_ms`` against the simulation: ``owed`` tokens taken and not refilled at
    ``rate`` tokens per ms. Admission is expected once a token is back (within 1 ms of rounding)."""
    assert bucket.used_at(now_ms) == math.ceil(owed)
    expected = None if burst - owed >= 1 else now_ms + (owed - (burst - 1)) / rate
    got = bucket.admits_at(burst)
    if expected is None:
        assert got is None
    else:
        assert got is not None and abs(got - math.ceil(expected)) <= 1


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.tuples(st.integers(min_value=0, max_value=3_000), st.integers(min_value=0, max_value=4)), max_size=60),
    rate_per_s=st.sampled_from([0.5, 1, 4, 10, 250]),
    burst=st.integers(min_value=1, max_value=20),
)
def test_token_bucket_matches_a_continuous_simulation(gaps: list[tuple[int, int]], rate_per_s: float, burst: int) -> None:
    """In time order the bucket equals a simulation of tokens refilling continuously (exact fractions)."""
    bucket = TokenBucket(rate_per_s=rate_per_s, burst=burst)
    rate = Fraction(rate_per_s) / 1000  # tokens per ms
    owed = Fraction(0)  # tokens taken and not refilled
    t, previous = 0, 0
    for gap, cost in gaps:
        t += gap
        owed = max(Fraction(0), owed - (t - previous) * rate) + cost
        previous = t
        bucket.add(t, cost)
        assert_bucket_matches(bucket, burst, rate, owed, now_ms=t)


# --- order: events of an open period count however late they arrive ----------------------------


shuffled_events = st.lists(
    st.tuples(st.integers(min_value=0, max_value=30_000), st.integers(min_value=0, max_value=4)), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(events=shuffled_events, lateness_ms=st.sampled_from([0, 250, 1_000, 5_000]),
       buckets=st.integers(min_value=1, max_value=12), limit=st.integers(min_value=1, max_value=30))  # fmt: skip
def test_sliding_window_counts_every_event_whose_bucket_is_still_in_the_window(
    events: list[tuple[int, int]], lateness_ms: int, buckets: int, limit: int
) -> None:
    """Whatever the arrival order (and whatever ``lateness_ms`` says), the window ends up holding exactly the
    events of its last ``buckets`` buckets, and refuses only events whose bucket had already left it."""
    bucket_ms = 500
    window = SlidingWindow(window_ms=buckets * bucket_ms, bucket_ms=bucket_ms, lateness_ms=lateness_ms)
    head: int | None = None
    for t, cost in events:
        head = t // bucket_ms if head is None else max(head, t // bucket_ms)
        assert window.add(t, cost) == (t // bucket_ms > head - buckets)
    if head is None:
        return
    in_window, _ = reference(events, bucket_ms, buckets)
    expected_admit = None
    if reference_used(in_window, head, head, buckets) >= limit:
        k = head + 1
        while reference_used(in_window, head, k, buckets) >= limit:
            k += 1
        expected_admit = k * bucket_ms
    assert window.admits_at(limit) == expected_admit


@settings(max_examples=300, deadline=None)
@given(events=shuffled_events, lateness_ms=st.sampled_from([0, 250, 1_000, 5_000]),
       rate_per_s=st.sampled_from([0.5, 1, 4, 10, 250]), burst=st.integers(min_value=1, max_value=20))  # fmt: skip
def test_token_bucket_out_of_order_equals_time_order_with_older_events_at_the_horizon(
    events: list[tuple[int, int]], lateness_ms: int, rate_per_s: float, burst: int
) -> None:
    """Events arriving out of order within the lateness bound give exactly the bucket of the same events in
    time order; one older than the bound counts at the bound (never dropped). Simulated with exact fractions."""
    bucket = TokenBucket(rate_per_s=rate_per_s, burst=burst, lateness_ms=lateness_ms)
    placed: list[tuple[int, int]] = []
    newest: int | None = None
    for t, cost in events:
        assert bucket.add(t, cost)
        at = t if newest is None else max(t, newest - lateness_ms)
        placed.append((at, cost))
        newest = at if newest is None else max(newest, at)
    if not placed:
        assert bucket.admits_at(burst) is None
        return
    rate = Fraction(rate_per_s) / 1000
    owed, previous = Fraction(0), 0
    for t, cost in sorted(placed):
        owed = max(Fraction(0), owed - (t - previous) * rate) + cost
        previous = t
    assert_bucket_matches(bucket, burst, rate, owed, now_ms=max(t for t, _ in placed))
    # memory stays bounded by the lateness (one entry per millisecond) and the entries folded at once
    assert len(bucket.times) <= lateness_ms + 1 + SETTLE_AT_ONCE


@settings(max_examples=300, deadline=None)
@given(events=shuffled_events, lateness_ms=st.sampled_from([0, 250, 1_000, 5_000]),
       window_ms=st.sampled_from([1_000, 7_000]), limit=st.integers(min_value=1, max_value=30))  # fmt: skip
def test_fixed_window_counts_every_event_of_the_current_window(
    events: list[tuple[int, int]], lateness_ms: int, window_ms: int, limit: int
) -> None:
    window = FixedWindow(window_ms=window_ms, lateness_ms=lateness_ms)
    current: int | None = None
    for t, cost in events:
        current = t // window_ms if current is None else max(current, t // window_ms)
        assert window.add(t, cost) == (t // window_ms == current)
    if current is None:
        return
    used = sum(cost for t, cost in events if t // window_ms == current)
    assert window.used_at(current * window_ms) == used
    assert window.admits_at(limit) == ((current + 1) * window_ms if used >= limit else None)


# --- calendar quota ---------------------------------------------------------------------------


def ms(text: str, zone: str = "UTC") -> int:
    return round(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def test_monthly_quota_in_a_time_zone_resets_at_local_midnight_of_the_first() -> None:
    quota = CalendarQuota(period="month", zone=ZoneInfo("Europe/Berlin"))
    quota.add(ms("2026-10-31 23:30", "Europe/Berlin"), 7)  # still October in Berlin (22:30 UTC)
    assert quota.admits_at(limit=7) == ms("2026-11-01 00:00", "Europe/Berlin")
    assert quota.admits_at(limit=7) == ms("2026-10-31 23:00")  # CET: UTC+1 after the October change
    quota.add(ms("2026-11-01 00:00", "Europe/Berlin"), 1)
    assert quota.used_at(ms("2026-11-01 00:00", "Europe/Berlin")) == 1


def test_daily_quota_on_a_23_hour_day() -> None:
    quota = CalendarQuota(period="day", zone=ZoneInfo("Europe/Berlin"))
    quota.add(ms("2026-03-29 01:00", "Europe/Berlin"), 5)  # clocks go forward at 02:00 that day
    start, end = quota.period_bounds(ms("2026-03-29 12:00", "Europe/Berlin"))
    assert end - start == 23 * 3_600_000
    assert quota.admits_at(5) == ms("2026-03-30 00:00", "Europe/Berlin")


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, 90 * 86_400_000), st.integers(0, 5)), max_size=40),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]),
    period=st.sampled_from(["day", "month"]),
    limit=st.integers(1, 30),
)
def test_calendar_quota_matches_a_datetime_reference(
    events: list[tuple[int, int]], zone: str, period: str, limit: int
) -> None:
    base = ms("2026-01-20 00:00")
    tz = ZoneInfo(zone)
    quota = CalendarQuota(period=period, zone=tz, lateness_ms=None)  # type: ignore[arg-type]

    def label(t: int) -> tuple[int, ...]:
        local = datetime.fromtimestamp(t / 1000, tz=tz)
        return (local.year, local.month) if period == "month" else (local.year, local.month, local.day)

    newest: int | None = None
    for offset, cost in events:
        t = base + offset
        counts = newest is None or label(t) >= label(newest)
        assert quota.add(t, cost) == counts
        if counts:
            newest = t if newest is None else max(newest, t)
    if newest is None:
        return
    used = sum(cost for offset, cost in events if label(base + offset) == label(newest))
    assert quota.used_at(newest) == used
    admit = quota.admits_at(limit)
    if used < limit:
        assert admit is None
    else:  # the first millisecond whose local date is in the next period
        assert admit is not None and label(admit) > label(newest) and label(admit - 1) == label(newest)
