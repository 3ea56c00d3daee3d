"""Window arithmetic (sliding, fixed, token bucket), by example and against brute-force references."""

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.windows import FixedWindow, SlidingWindow, TokenBucket

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
        assert bucket.used_at(t) == math.ceil(owed)
        expected = None if burst - owed >= 1 else t + (owed - (burst - 1)) / rate
        got = bucket.admits_at(burst)
        if expected is None:
            assert got is None
        else:
            assert got is not None and abs(got - math.ceil(expected)) <= 1
