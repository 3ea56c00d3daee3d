"""Sliding-window arithmetic, by example and against a brute-force reference over random histories."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.windows import SlidingWindow

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
