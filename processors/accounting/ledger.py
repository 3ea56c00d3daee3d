"""Every key's billable units per plan month, kept in memory as the sink's batches arrive.

A plan-quota read (`GET /v1/quota`) asked ClickHouse for the key's month on every call: a few
milliseconds on an idle machine, tens while the sink inserts. The ledger asks once, for every key, and
then follows the sums the sink publishes per batch, so a read is a dictionary lookup however long the
history.

How it stays exact: the ledger is split at the sink group's committed offsets, below which every table
holds every event. The units stored below them, per key and month, come from ClickHouse (`load`, two
queries for all keys); every batch at or past them is added from the sums the sink published for it
(`add_units`, fed by `tail.RollupFollower`). No event is in both, none in neither, and the sink inserting
meanwhile changes nothing. Months are those of the plan's time zone; a ledger serves
one zone (a new zone loads a new ledger). The units of each minute of the last hour are kept beside
them, for the plan's forecast.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from throttlex.processors.accounting.store import UsageStore

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
_RECENT_MS = HOUR_MS + 2 * MINUTE_MS  # minutes kept for `units_between`: the last hour and a margin
_FUTURE_MS = 400 * 24 * HOUR_MS  # events further ahead are counted in no month kept here

# One read of the per-minute rollup (one snapshot: a sink insert landing meanwhile cannot make a minute
# count twice or not at all), per key and month of the zone: the units of the minutes wholly below the
# split, those of the last hour's such minutes, and the minutes that also hold events stored at or past
# it (the sink's batch in flight, late events), which `_UNSETTLED` then sums from the raw rows below the
# split. Partitions not among {parts} (no longer in the topic) are wholly stored.
_SETTLED = """
SELECT api_key_id, toStartOfMonth(bucket, {zone:String}) AS month, sumIf(units, settled),
       groupArrayIf((bucket, units), settled AND bucket >= {recent:DateTime('UTC')}),
       groupArrayIf((bucket, kafka_partition), NOT settled)
FROM (
    SELECT api_key_id, bucket, kafka_partition, sum(billable_units) AS units,
           NOT has({parts:Array(UInt16)}, kafka_partition)
               OR max(top_offset) < {offsets:Array(UInt64)}[indexOf({parts:Array(UInt16)}, kafka_partition)] AS settled
    FROM usage_units_per_minute WHERE bucket >= {since:DateTime('UTC')}
    GROUP BY api_key_id, bucket, kafka_partition
)
GROUP BY api_key_id, month
"""
_UNSETTLED = """
SELECT api_key_id, toStartOfMonth(event_time, {zone:String}) AS month, toStartOfMinute(event_time) AS bucket, sum(cost)
FROM usage_events
WHERE NOT edge_blocked AND event_time >= {since:DateTime('UTC')}
    AND (api_key_id, toStartOfMinute(event_time), kafka_partition) IN {minutes:Array(Tuple(String, DateTime('UTC'), UInt16))}
    AND kafka_offset < {offsets:Array(UInt64)}[indexOf({parts:Array(UInt16)}, kafka_partition)]
GROUP BY api_key_id, month, bucket
"""


def month_around(moment: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The calendar month in ``zone`` holding ``moment``, as UTC instants ``[start, end)``."""
    local = moment.astimezone(zone)
    start = datetime(local.year, local.month, 1, tzinfo=zone)
    end = datetime(local.year + local.month // 12, local.month % 12 + 1, 1, tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)


def _add(counts: dict[str, int], keys: Sequence[str], units: Sequence[int]) -> None:
    get = counts.get
    for key_id, cost in zip(keys, units, strict=True):
        counts[key_id] = get(key_id, 0) + cost


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class PlanLedger:
    """Billable units per key: per month of ``zone`` from the month before ``now``'s, and per minute of
    the last hour. Loaded once (`load`), then fed every batch's sums from the split on (`add_units`)."""

    def __init__(self, zone: ZoneInfo, now: datetime) -> None:
        self.zone = zone
        self._now = now
        self._months: dict[int, dict[str, int]] = {}  # month start (UTC ms) -> key -> units
        self._minutes: dict[int, dict[str, int]] = {}  # minute (UTC ms) -> key -> units
        previous, _ = month_around(month_around(now, zone)[0] - timedelta(days=1), zone)
        self._bounds = [_ms(previous)]  # month starts in order (UTC ms); the last one ends the last month kept
        self._extend_to(_ms(now))

    async def load(self, store: UsageStore, splits: dict[int, int]) -> None:
        """Add the units stored below ``splits`` (partition -> offset) of every key: two queries in all."""
        now, previous = self._now, datetime.fromtimestamp(self._bounds[0] / 1000, tz=UTC)
        recent = datetime.fromtimestamp((_ms(now) - _RECENT_MS) // MINUTE_MS * 60, tz=UTC)
        parameters: dict[str, Any] = {"since": previous, "recent": recent, "parts": list(splits),
                                      "offsets": list(splits.values()), "zone": self.zone.key}  # fmt: skip
        unsettled = []
        for key_id, month, units, minutes, later in await store.query(_SETTLED, parameters):
            self._count(key_id, self._local_midnight_ms(month), int(units))
            for minute, minute_units in minutes:
                self._count_minute(key_id, _ms(minute.replace(tzinfo=UTC)), int(minute_units))
            unsettled += [(key_id, minute, partition) for minute, partition in later]
        if unsettled:
            for key_id, month, minute, units in await store.query(_UNSETTLED, {**parameters, "minutes": unsettled}):
                self._count(key_id, self._local_midnight_ms(month), int(units))
                if (at := minute.replace(tzinfo=UTC)) >= recent:
                    self._count_minute(key_id, _ms(at), int(units))

    def _count(self, key_id: str, month_ms: int, units: int) -> None:
        counts = self._months[month_ms]
        counts[key_id] = counts.get(key_id, 0) + units

    def _count_minute(self, key_id: str, minute_ms: int, units: int) -> None:
        counts = self._minutes.setdefault(minute_ms, {})
        counts[key_id] = counts.get(key_id, 0) + units

    def add_units(
        self, minutes: Sequence[int], sizes: Sequence[int], keys: Sequence[str], units: Sequence[int], now_ms: int
    ) -> None:
        """Count a batch's sums past the split, as the sink publishes them (`rollups.Rollup`): the first
        ``sizes[0]`` of ``keys`` and ``units`` in the minute starting at ``minutes[0]`` (UTC ms), and so on."""
        bounds, recent, start = self._bounds, now_ms - _RECENT_MS, 0
        for at, size in zip(minutes, sizes, strict=True):
            these_keys, these_units, start = keys[start : start + size], units[start : start + size], start + size
            if at >= bounds[-1]:
                if at > now_ms + _FUTURE_MS:
                    continue  # a clock years ahead: no plan month counts it yet
                self._extend_to(at)
            index = bisect_right(bounds, at) - 1
            if index >= 0:  # not older than the months kept
                _add(self._months[bounds[index]], these_keys, these_units)
            if recent <= at < now_ms + HOUR_MS:
                if (minute := self._minutes.get(at)) is None:
                    self._minutes[at] = dict(zip(these_keys, these_units, strict=True))  # a minute's keys are distinct
                else:
                    _add(minute, these_keys, these_units)
        for old in [minute for minute in self._minutes if minute < recent]:
            del self._minutes[old]

    def month_units(self, key_id: str, month_start: datetime) -> int:
        """``key_id``'s units in the month of this ledger's zone starting at ``month_start``."""
        if _ms(month_start) < self._bounds[0]:
            raise ValueError(f"the ledger holds months from {self._bounds[0]} ms on, not {month_start}")
        return self._months.get(_ms(month_start), {}).get(key_id, 0)

    def units_between(self, key_id: str, start_ms: int, end_ms: int) -> int:
        """``key_id``'s units in the whole minutes from ``start_ms``'s to before ``end_ms`` (within the last hour)."""
        first = start_ms - start_ms % MINUTE_MS
        return sum(units.get(key_id, 0) for minute, units in list(self._minutes.items()) if first <= minute < end_ms)

    def _extend_to(self, at_ms: int) -> None:
        """Keep months up to and including the one holding ``at_ms``."""
        while self._bounds[-1] <= at_ms:
            start = datetime.fromtimestamp(self._bounds[-1] / 1000, tz=UTC)
            self._months[self._bounds[-1]] = {}
            self._bounds.append(_ms(month_around(start, self.zone)[1]))

    def _local_midnight_ms(self, month: date) -> int:
        start = _ms(datetime(month.year, month.month, 1, tzinfo=self.zone))
        if start not in self._months:
            self._extend_to(start)
        return start
