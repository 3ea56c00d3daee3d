"""Sliding-window arithmetic over event time. Pure: no clock, no I/O; every instant is passed in.

Time is cut into buckets of ``bucket_ms``; bucket ``b`` holds the events with
``b * bucket_ms <= event_time_ms < (b + 1) * bucket_ms``. At instant ``t`` the window holds the last
``buckets = window_ms // bucket_ms`` buckets, the current one included: buckets ``(b(t) - buckets, b(t)]``.
The count is therefore exact at bucket resolution: an event leaves the window at the first bucket
boundary at least ``window_ms`` after its own bucket began.

A key is blocked while its window holds ``limit`` cost units or more, and admitted again at the first
bucket boundary at which the window holds fewer than ``limit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SlidingWindow:
    """Per-bucket cost totals of one limit key.

    ``counts[i]`` is the total of bucket ``head - buckets + 1 + i``; ``head`` is the newest bucket any
    event has reached (``-1`` while empty). Memory: one int per bucket.
    """

    window_ms: int
    bucket_ms: int
    head: int = -1
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.bucket_ms <= 0 or self.window_ms <= 0 or self.window_ms % self.bucket_ms:
            raise ValueError("window_ms must be a positive multiple of bucket_ms")
        if not self.counts:
            self.counts = [0] * self.buckets

    @property
    def buckets(self) -> int:
        return self.window_ms // self.bucket_ms

    def add(self, event_time_ms: int, cost: int) -> bool:
        """Count ``cost`` units at ``event_time_ms``.

        Returns False, counting nothing, when the event's bucket has already left the window of the
        newest event seen (the event is too late to matter for this window).
        """
        bucket = event_time_ms // self.bucket_ms
        if bucket > self.head:
            self._advance(bucket)
        index = bucket - (self.head - self.buckets + 1)
        if index < 0:
            return False
        self.counts[index] += cost
        return True

    def used_at(self, now_ms: int) -> int:
        """Cost units in the window at ``now_ms`` (instants before the newest event count as the newest)."""
        dropped = max(0, now_ms // self.bucket_ms - self.head)
        return sum(self.counts[dropped:])

    def admits_at(self, limit: int) -> int | None:
        """The instant at which the window next holds fewer than ``limit`` units, or None if it does now.

        "Now" is the newest bucket seen; the answer assumes no further events arrive.
        """
        remaining = sum(self.counts)
        if remaining < limit:
            return None
        for dropped in range(1, self.buckets + 1):
            remaining -= self.counts[dropped - 1]
            if remaining < limit:
                return (self.head + dropped) * self.bucket_ms
        raise ValueError("limit must be positive")

    def empties_at(self) -> int | None:
        """The instant at which every unit now counted has left the window, or None if it is empty."""
        for index in range(self.buckets - 1, -1, -1):
            if self.counts[index]:
                return (self.head + 1 + index) * self.bucket_ms
        return None

    def _advance(self, bucket: int) -> None:
        shift = bucket - self.head
        if shift >= self.buckets:
            self.counts = [0] * self.buckets
        else:
            self.counts = self.counts[shift:] + [0] * shift
        self.head = bucket
