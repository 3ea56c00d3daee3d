"""Window arithmetic over event time: sliding window, fixed window, token bucket. Pure: no clock, no
I/O; every instant is passed in. Each keeps ``add``, ``used_at``, ``admits_at``, ``empties_at`` and a
compact ``to_state``/``restore``.

Sliding window:

Time is cut into buckets of ``bucket_ms``; bucket ``b`` holds the events with
``b * bucket_ms <= event_time_ms < (b + 1) * bucket_ms``. At instant ``t`` the window holds the last
``buckets = window_ms // bucket_ms`` buckets, the current one included: buckets ``(b(t) - buckets, b(t)]``.
The count is therefore exact at bucket resolution: an event leaves the window at the first bucket
boundary at least ``window_ms`` after its own bucket began.

A key is blocked while its window holds ``limit`` cost units or more, and admitted again at the first
bucket boundary at which the window holds fewer than ``limit``.
"""

from __future__ import annotations

import math
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

    def to_state(self) -> list[int]:
        return [self.head, *self.counts]

    def restore(self, state: list[int]) -> None:
        """Take a stored state; one of another window shape (the policy changed) is ignored."""
        if len(state) == self.buckets + 1:
            self.head, self.counts = state[0], list(state[1:])

    def _advance(self, bucket: int) -> None:
        shift = bucket - self.head
        if shift >= self.buckets:
            self.counts = [0] * self.buckets
        else:
            self.counts = self.counts[shift:] + [0] * shift
        self.head = bucket


@dataclass(slots=True)
class FixedWindow:
    """Cost units per fixed window: ``[origin_ms + k * window_ms, origin_ms + (k + 1) * window_ms)``.

    A key is blocked once the current window holds ``limit`` units, until the next window starts.
    Events of an earlier window than the newest seen are refused (too late to matter).
    """

    window_ms: int
    origin_ms: int = 0
    index: int | None = None
    used: int = 0

    def add(self, event_time_ms: int, cost: int) -> bool:
        index = (event_time_ms - self.origin_ms) // self.window_ms
        if self.index is None or index > self.index:
            self.index, self.used = index, 0
        elif index < self.index:
            return False
        self.used += cost
        return True

    def used_at(self, now_ms: int) -> int:
        if self.index is None:
            return 0
        return self.used if (now_ms - self.origin_ms) // self.window_ms <= self.index else 0

    def admits_at(self, limit: int) -> int | None:
        return self._next_start() if self.used >= limit else None

    def empties_at(self) -> int | None:
        return self._next_start() if self.used else None

    def _next_start(self) -> int | None:
        return None if self.index is None else self.origin_ms + (self.index + 1) * self.window_ms

    def to_state(self) -> list[int]:
        return [] if self.index is None else [self.index, self.used]

    def restore(self, state: list[int]) -> None:
        if len(state) == 2:
            self.index, self.used = state


@dataclass(slots=True)
class TokenBucket:
    """A bucket of ``burst`` tokens refilled at ``rate_per_s``; each cost unit takes one (GCRA form).

    The state is one number, ``tat_ms``: the instant the bucket is full again. An event at ``t``
    moves it to ``max(tat_ms, t) + cost * interval``. A key is blocked while the bucket holds less than
    one token, and admitted at the instant it holds one again.
    """

    rate_per_s: float
    burst: int
    tat_ms: float = 0.0
    head_ms: int = -1

    @property
    def interval_ms(self) -> float:
        return 1000.0 / self.rate_per_s

    def add(self, event_time_ms: int, cost: int) -> bool:
        self.tat_ms = max(self.tat_ms, float(event_time_ms)) + cost * self.interval_ms
        self.head_ms = max(self.head_ms, event_time_ms)
        return True

    def used_at(self, now_ms: int) -> int:
        """Tokens taken and not yet refilled at ``now_ms``."""
        owed_ms = self.tat_ms - max(now_ms, self.head_ms)
        return math.ceil(owed_ms / self.interval_ms - 1e-9) if owed_ms > 0 else 0

    def admits_at(self, limit: int) -> int | None:
        """``limit`` is the burst: blocked while fewer than one of ``limit`` tokens is left."""
        admit_ms = self.tat_ms - (limit - 1) * self.interval_ms
        return math.ceil(admit_ms) if admit_ms > self.head_ms else None

    def empties_at(self) -> int | None:
        return math.ceil(self.tat_ms) if self.tat_ms > self.head_ms else None

    def to_state(self) -> list[float]:
        return [self.tat_ms, self.head_ms]

    def restore(self, state: list[float]) -> None:
        if len(state) == 2:
            self.tat_ms, self.head_ms = state[0], int(state[1])


Limiter = SlidingWindow | FixedWindow | TokenBucket
"""Any of the algorithms; the engine, live usage and the quota report work with all three."""
