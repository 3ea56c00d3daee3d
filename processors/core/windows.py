"""Window arithmetic over event time: sliding window, fixed window, token bucket, calendar quota.

Pure: no clock, no I/O; every instant is passed in. Each keeps ``add``, ``used_at``, ``admits_at``,
``empties_at`` and a compact ``to_state``/``restore``.

Order. Every limiter remembers the newest time it has counted (``newest_ms``), and counts an event of
any period still open, however far behind that it arrives: a sliding window counts every event whose
bucket is still in the window, a fixed window and a calendar quota every event of the current period.
Adding up counts does not depend on order, so such events count exactly as if they had arrived in time
order. Only an event whose bucket or period has already closed is refused (``add`` returns False): no
decision depends on it any more, though the sink still accounts it. A key regrouped from many input
partitions therefore counts the backlog of a partition that moved after a crash like any other events.

The token bucket depends on order (a full bucket wastes refill), so it keeps the last ``lateness_ms``
of its history to place late events in time; an event older than that counts at the oldest instant it
still keeps (see `TokenBucket`): counted, a little later than it happened, never dropped.

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

import bisect
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

SETTLE_AT_ONCE = 32
"""A token bucket folds its settled events in groups of at least this many."""


@dataclass(slots=True)
class SlidingWindow:
    """Per-bucket cost totals of one limit key.

    ``counts[i]`` is the total of bucket ``head - buckets + 1 + i``, where ``head`` is the bucket of
    ``newest_ms`` (``-1`` while empty), and ``total`` their sum, kept as events come so that most
    decisions take one comparison. Memory: one int per bucket.
    """

    window_ms: int
    bucket_ms: int
    lateness_ms: int | None = None
    """Unused: a sliding window counts every event whose bucket is still in the window (kept so every
    limiter is built alike)."""
    newest_ms: int = -1
    counts: list[int] = field(default_factory=list)
    total: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.bucket_ms <= 0 or self.window_ms <= 0 or self.window_ms % self.bucket_ms:
            raise ValueError("window_ms must be a positive multiple of bucket_ms")
        if not self.counts:
            self.counts = [0] * self.buckets
        self.total = sum(self.counts)

    @property
    def span_ms(self) -> int:
        """How long a unit counts, at most: live usage is kept this long after the last event."""
        return self.window_ms

    @property
    def buckets(self) -> int:
        return self.window_ms // self.bucket_ms

    @property
    def head(self) -> int:
        return self.newest_ms // self.bucket_ms

    def add(self, event_time_ms: int, cost: int) -> bool:
        """Count ``cost`` units at ``event_time_ms``; False (nothing counted) for an event whose bucket
        has already left the window."""
        newest = self.newest_ms
        bucket = event_time_ms // self.bucket_ms
        head = newest // self.bucket_ms
        if event_time_ms > newest:
            if bucket > head:
                self._advance(bucket)
                head = bucket
            self.newest_ms = event_time_ms
        counts = self.counts
        index = bucket - head + len(counts) - 1
        if index < 0:
            return False
        counts[index] += cost
        self.total += cost
        return True

    def used_at(self, now_ms: int) -> int:
        """Cost units in the window at ``now_ms`` (instants before the newest event count as the newest)."""
        dropped = max(0, now_ms // self.bucket_ms - self.head)
        return sum(self.counts[dropped:])

    def admits_at(self, limit: int) -> int | None:
        """The instant at which the window next holds fewer than ``limit`` units, or None if it does now.

        "Now" is the newest bucket seen; the answer assumes no further events arrive.
        """
        remaining = self.total
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
        return [self.newest_ms, *self.counts]

    def restore(self, state: list[int]) -> None:
        """Take a stored state; one of another window shape (the policy changed) is ignored."""
        if len(state) == self.buckets + 1:
            self.newest_ms, self.counts = state[0], list(state[1:])
            self.total = sum(self.counts)

    def _advance(self, bucket: int) -> None:
        counts = self.counts
        shift = bucket - self.head
        if shift == 1:  # the usual step: one bucket on
            self.total -= counts[0]
            del counts[0]
            counts.append(0)
        elif shift >= len(counts):
            counts[:] = [0] * len(counts)
            self.total = 0
        elif shift > 0:
            self.total -= sum(counts[:shift])
            del counts[:shift]
            counts.extend([0] * shift)


@dataclass(slots=True)
class FixedWindow:
    """Cost units per fixed window: ``[origin_ms + k * window_ms, origin_ms + (k + 1) * window_ms)``.

    A key is blocked once the current window holds ``limit`` units, until the next window starts. An
    event of the current window counts however late it arrives; one of an earlier window is refused:
    that window has closed, and no decision depends on it any more.
    """

    window_ms: int
    origin_ms: int = 0
    lateness_ms: int | None = None
    newest_ms: int | None = None
    used: int = 0

    @property
    def span_ms(self) -> int:
        return self.window_ms

    def add(self, event_time_ms: int, cost: int) -> bool:
        newest = self.newest_ms
        if newest is None:
            self.newest_ms, self.used = event_time_ms, cost
            return True
        origin, window = self.origin_ms, self.window_ms
        index, newest_index = (event_time_ms - origin) // window, (newest - origin) // window
        if index < newest_index:
            return False
        if index > newest_index:
            self.used = 0
        if event_time_ms > newest:
            self.newest_ms = event_time_ms
        self.used += cost
        return True

    def used_at(self, now_ms: int) -> int:
        if self.newest_ms is None:
            return 0
        return self.used if self._index(now_ms) <= self._index(self.newest_ms) else 0

    def admits_at(self, limit: int) -> int | None:
        return self._next_start() if self.used >= limit else None

    def empties_at(self) -> int | None:
        return self._next_start() if self.used else None

    def _index(self, t_ms: int) -> int:
        return (t_ms - self.origin_ms) // self.window_ms

    def _next_start(self) -> int | None:
        if self.newest_ms is None:
            return None
        return self.origin_ms + (self._index(self.newest_ms) + 1) * self.window_ms

    def to_state(self) -> list[int]:
        return [] if self.newest_ms is None else [self.newest_ms, self.used]

    def restore(self, state: list[int]) -> None:
        if len(state) == 2:
            self.newest_ms, self.used = state


@dataclass(slots=True)
class TokenBucket:
    """A bucket of ``burst`` tokens refilled at ``rate_per_s``; each cost unit takes one (GCRA form).

    In time order the state is one number, ``tat_ms``: the instant the bucket is full again. An event
    at ``t`` moves it to ``max(tat_ms, t) + cost * interval``. A key is blocked while the bucket holds
    less than one token, and admitted at the instant it holds one again.

    Unlike a count, the bucket depends on the order of events (a full bucket wastes refill), so events
    inside the lateness bound are kept pending, one entry per distinct millisecond in time order, as
    three parallel lists: ``times``, ``costs`` and ``tats`` (the ``tat`` after the entry); older events
    are folded into ``settled_tat_ms``. Memory: at most ``lateness_ms`` + 32 pending entries. An event
    older than the lateness bound counts at the bound's instant (``newest_ms - lateness_ms``).

    An event in time order moves ``tat`` on directly. One that arrives out of order is inserted, and
    the entries after it are replayed only when an answer needs them: until then their ``tat`` is
    short by at most ``interval_ms`` times the cost inserted out of order (``_missing_cost``), which is
    often enough to tell that the bucket still admits.
    """

    rate_per_s: float
    burst: int
    lateness_ms: int = 0
    settled_tat_ms: float = 0.0
    newest_ms: int = -1
    times: list[int] = field(default_factory=list)
    costs: list[int] = field(default_factory=list)
    tats: list[float] = field(default_factory=list)
    interval_ms: float = field(init=False, repr=False, compare=False)
    """Milliseconds per token."""
    _stale_from: int | None = field(default=None, init=False, repr=False, compare=False)
    """The first pending entry whose ``tat`` may be short (None: all are exact)."""
    _missing_cost: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.interval_ms = 1000.0 / self.rate_per_s

    @property
    def span_ms(self) -> int:
        """The time an empty bucket takes to fill."""
        return math.ceil(self.burst * self.interval_ms)

    @property
    def tat_ms(self) -> float:
        if self._stale_from is not None:
            self._make_exact()
        return self.tats[-1] if self.tats else self.settled_tat_ms

    def add(self, event_time_ms: int, cost: int) -> bool:
        """Always True: an event older than ``lateness_ms`` before the newest counts at that horizon."""
        newest = self.newest_ms
        if event_time_ms < newest - self.lateness_ms:
            event_time_ms = newest - self.lateness_ms
        times, tats = self.times, self.tats
        if not times or event_time_ms > times[-1]:
            tat = tats[-1] if tats else self.settled_tat_ms
            times.append(event_time_ms)
            self.costs.append(cost)
            tats.append((tat if tat > event_time_ms else event_time_ms) + cost * self.interval_ms)
        elif event_time_ms == times[-1]:  # the same formula as a replay, so results never drift
            costs = self.costs
            costs[-1] += cost
            tat = tats[-2] if len(tats) > 1 else self.settled_tat_ms
            tats[-1] = (tat if tat > event_time_ms else event_time_ms) + costs[-1] * self.interval_ms
        else:
            at = bisect.bisect_left(times, event_time_ms)
            if times[at] == event_time_ms:
                self.costs[at] += cost
            else:
                times.insert(at, event_time_ms)
                self.costs.insert(at, cost)
                tats.insert(at, 0.0)
            self._stale_from = at if self._stale_from is None else min(at, self._stale_from)
            self._missing_cost += cost
        if event_time_ms > newest:
            self.newest_ms = event_time_ms
            horizon = event_time_ms - self.lateness_ms
            if len(times) >= SETTLE_AT_ONCE and times[SETTLE_AT_ONCE - 1] < horizon:
                self._settle(horizon)
        return True

    def used_at(self, now_ms: int) -> int:
        """Tokens taken and not yet refilled at ``now_ms``."""
        owed_ms = self.tat_ms - max(now_ms, self.newest_ms)
        return math.ceil(owed_ms / self.interval_ms - 1e-9) if owed_ms > 0 else 0

    def admits_at(self, limit: int) -> int | None:
        """``limit`` is the burst: blocked while fewer than one of ``limit`` tokens is left."""
        if self.newest_ms < 0:  # no event yet
            return None
        if self._stale_from is not None:
            highest = self.tats[-1] + self._missing_cost * self.interval_ms
            if highest - (limit - 1) * self.interval_ms < self.newest_ms - 1.0:  # 1 ms: far beyond float error
                return None
            self._make_exact()
        admit_ms = (self.tats[-1] if self.tats else self.settled_tat_ms) - (limit - 1) * self.interval_ms
        return math.ceil(admit_ms) if admit_ms > self.newest_ms else None

    def empties_at(self) -> int | None:
        tat = self.tat_ms
        return math.ceil(tat) if self.newest_ms >= 0 and tat > self.newest_ms else None

    def to_state(self) -> list[float]:
        """``[settled_tat_ms, newest_ms, time, cost, time, cost…]`` of the entries the lateness still needs."""
        horizon = self.newest_ms - self.lateness_ms
        if self.times and self.times[0] < horizon:
            self._settle(horizon)  # store no more than the lateness needs
        times = self.times
        state: list[float] = [self.settled_tat_ms, self.newest_ms, *times, *times]
        state[2::2] = times
        state[3::2] = self.costs
        return state

    def restore(self, state: list[float]) -> None:
        if len(state) >= 2 and len(state) % 2 == 0:
            self.settled_tat_ms, self.newest_ms = state[0], int(state[1])
            self.times = [int(t) for t in state[2::2]]
            self.costs = [int(c) for c in state[3::2]]
            self.tats = [0.0] * len(self.times)
            self._stale_from = 0
            self._make_exact()

    def _make_exact(self) -> None:
        """Replay the entries whose ``tat`` may be short."""
        start = self._stale_from
        if start is None:
            return
        times, costs, tats, interval = self.times, self.costs, self.tats, self.interval_ms
        tat = tats[start - 1] if start else self.settled_tat_ms
        for index in range(start, len(times)):
            t = times[index]
            tat = (tat if tat > t else t) + costs[index] * interval
            tats[index] = tat
        self._stale_from, self._missing_cost = None, 0

    def _settle(self, horizon_ms: int) -> None:
        """Fold the pending events before ``horizon_ms`` (no late event can precede them any more):
        ``add`` moves events before the horizon onto it, whatever is pending."""
        settled = bisect.bisect_left(self.times, horizon_ms)
        if not settled:
            return
        if self._stale_from is not None and self._stale_from < settled:
            self._make_exact()
        self.settled_tat_ms = self.tats[settled - 1]
        del self.times[:settled], self.costs[:settled], self.tats[:settled]
        if self._stale_from is not None:
            self._stale_from -= settled


Period = Literal["day", "month"]


@dataclass(slots=True)
class CalendarQuota:
    """Cost units per calendar day or month in one time zone, e.g. 100,000 per month in Europe/Berlin.

    Like a fixed window whose boundaries are local midnights (or first days of months), including
    days of 23 or 25 hours at daylight-saving changes. Blocked once the period holds ``limit`` units,
    until the next period starts.
    """

    period: Period
    zone: ZoneInfo
    lateness_ms: int | None = None
    newest_ms: int | None = None
    used: int = 0
    _bounds: tuple[int, int] = (0, 0)
    """The period of ``newest_ms`` as ``[start, end)`` in Unix ms (a cache, not state)."""

    def add(self, event_time_ms: int, cost: int) -> bool:
        newest = self.newest_ms
        if newest is not None:
            start, end = self._bounds
            if not start <= newest < end:
                start, end = self._period_of(newest)
            if event_time_ms < start:
                return False  # a closed period: no decision depends on it
            if event_time_ms < end:
                if event_time_ms > newest:
                    self.newest_ms = event_time_ms
                self.used += cost
                return True
        self.newest_ms, self.used = event_time_ms, cost
        return True

    @property
    def span_ms(self) -> int:
        return 86_400_000 if self.period == "day" else 31 * 86_400_000

    def used_at(self, now_ms: int) -> int:
        if self.newest_ms is None:
            return 0
        return self.used if now_ms < self._period_of(self.newest_ms)[1] else 0

    def admits_at(self, limit: int) -> int | None:
        if self.used < limit or self.newest_ms is None:
            return None
        return self._period_of(self.newest_ms)[1]

    def empties_at(self) -> int | None:
        return self._period_of(self.newest_ms)[1] if self.newest_ms is not None and self.used else None

    def period_bounds(self, t_ms: int) -> tuple[int, int]:
        """The ``[start, end)`` of the period holding ``t_ms``, in Unix ms."""
        return self._period_of(t_ms)

    def _period_of(self, t_ms: int) -> tuple[int, int]:
        start, end = self._bounds
        if start <= t_ms < end:
            return self._bounds
        local = datetime.fromtimestamp(t_ms / 1000, tz=self.zone)
        if self.period == "day":
            first = local.replace(hour=0, minute=0, second=0, microsecond=0)
            after = (first.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=self.zone)
        else:
            first = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            after = (first.replace(tzinfo=None) + timedelta(days=32)).replace(day=1, tzinfo=self.zone)
        self._bounds = (round(first.timestamp() * 1000), round(after.timestamp() * 1000))
        return self._bounds

    def to_state(self) -> list[int]:
        return [] if self.newest_ms is None else [self.newest_ms, self.used]

    def restore(self, state: list[int]) -> None:
        if len(state) == 2:
            self.newest_ms, self.used = state


Limiter = SlidingWindow | FixedWindow | TokenBucket | CalendarQuota
"""Any of the algorithms; the engine, live usage and the quota report work with all of them."""
