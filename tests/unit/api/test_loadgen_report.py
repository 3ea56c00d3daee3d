"""The demo's quota report: reset and block instants read in UTC, dated when not today."""

from datetime import date

from throttlex.api.loadgen import _clock_time


def test_an_instant_today_shows_its_time_and_another_day_its_date_too() -> None:
    today = date(2026, 11, 29)
    assert _clock_time("2026-11-29T23:19:30+00:00", today) == "23:19:30 UTC"
    assert _clock_time("2026-12-01T00:00:00+01:00", today) == "2026-11-30 23:00:00 UTC"  # a Berlin month starts
    assert _clock_time(None, today) == "-"
