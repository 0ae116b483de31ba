"""Working-day arithmetic across China's official holidays and make-up workdays, and
provisional counts through years whose holidays are not known yet."""

from datetime import date, timedelta
from pathlib import Path

import chinese_calendar
import pytest

from issuer.due_dates import MAY_MOVE_EARLIER_DAYS, PAY_WITHIN_WORKING_DAYS
from issuer.workdays import Calendar, Due, HolidaysFileError

pytestmark = pytest.mark.fast

OFFICIAL = Calendar()


def test_national_day_2025_is_skipped_and_make_up_days_count() -> None:
    # 2025: Oct 1-8 off; Sunday Sep 28 and Saturday Oct 11 are make-up workdays
    assert OFFICIAL.is_working_day(date(2025, 9, 28))
    assert not OFFICIAL.is_working_day(date(2025, 10, 1))
    assert OFFICIAL.is_working_day(date(2025, 10, 11))
    assert OFFICIAL.add_working_days(date(2025, 9, 30), 1) == Due(date(2025, 10, 9))
    assert OFFICIAL.add_working_days(date(2025, 10, 9), 2) == Due(date(2025, 10, 11))


def test_thirty_working_days_after_an_approval() -> None:
    # Sep 26 (Fri) + 30: Sep 28, 29, 30 (3), Oct 9, 10, 11 (6), four full weeks Oct 13 -
    # Nov 7 (26), Nov 10-13 (30)
    assert OFFICIAL.add_working_days(date(2025, 9, 26), 30) == Due(date(2025, 11, 13))
    # Mar 3 (Mon) + 30: Qingming (Fri Apr 4) is off, so one day later than six weeks
    assert OFFICIAL.add_working_days(date(2025, 3, 3), 30) == Due(date(2025, 4, 15))


def test_a_year_no_source_knows_counts_weekends_only_and_says_so() -> None:
    assert OFFICIAL.is_working_day(date(2031, 6, 2)) is None
    assert not OFFICIAL.knows(2031) and OFFICIAL.knows(2026)
    # Sun 2031-06-01 + 30 weekdays: six full weeks, Jun 2 - Jul 11 (a Friday)
    assert OFFICIAL.add_working_days(date(2031, 6, 1), 30) == Due(date(2031, 7, 11), 2031)
    # a count that starts in a known year waits for the first unknown one it reaches
    assert OFFICIAL.add_working_days(date(2026, 12, 30), 30).provisional_until_year == 2027


def test_a_year_from_the_holidays_file(tmp_path: Path) -> None:
    path = tmp_path / "holidays.toml"
    path.write_text("[[year]]\nyear = 2031\nholidays = [2031-01-01]\nworkdays = [2031-01-04]\n")
    calendar = Calendar.from_file(path)
    assert calendar.knows(2031)
    assert not calendar.is_working_day(date(2031, 1, 1))  # a Wednesday, off
    assert calendar.is_working_day(date(2031, 1, 4))  # a Saturday, worked
    assert calendar.add_working_days(date(2030, 12, 31), 3) == Due(date(2031, 1, 4))
    path.write_text("[[year]]\nyear = 'soon'\n")
    with pytest.raises(HolidaysFileError, match=f"holidays file {path}"):
        Calendar.from_file(path)
    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(HolidaysFileError, match=f"holidays file {path}"):
        Calendar.from_file(path)


class Published(Calendar):
    """The official calendar as it stood before the notice of `unknown_from` (read from a
    table of the package's days, for speed)."""

    def __init__(self, working: dict[date, bool], unknown_from: int) -> None:
        super().__init__()
        self.working = working
        self.unknown_from = unknown_from

    def is_working_day(self, day: date) -> bool | None:
        return None if day.year >= self.unknown_from else self.working[day]


def test_provisional_dates_move_at_most_the_bound_earlier() -> None:
    """Over every approval day of the years the package knows (2004-2026), as if the
    notice of the approval's year, or of the next, were not out yet: the weekends-only
    date was at most MAY_MOVE_EARLIER_DAYS after the true one (make-up workdays in the
    window whose holidays fall after it), and more often before it (holidays)."""
    years = {day.year for day in chinese_calendar.holidays}
    first, last = min(years), max(years)
    day, working = date(first, 1, 1), {}
    while day.year <= last:
        working[day] = bool(chinese_calendar.is_workday(day))
        day += timedelta(days=1)
    true = Published(working, last + 1)
    earlier = later = 0
    day = date(first, 1, 1)
    while day < date(last, 10, 31):  # the window stays in the package's years
        due = true.add_working_days(day, PAY_WITHIN_WORKING_DAYS).day
        for unknown in {(day + timedelta(days=1)).year, due.year}:  # the first day counted
            estimate = Published(working, unknown).add_working_days(day, PAY_WITHIN_WORKING_DAYS)
            assert estimate.provisional_until_year == unknown
            shift = (due - estimate.day).days
            earlier, later = max(earlier, -shift), max(later, shift)
        day += timedelta(days=1)
    assert earlier == MAY_MOVE_EARLIER_DAYS
    assert later == 10
