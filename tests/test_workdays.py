"""Working-day arithmetic across China's official holidays and make-up workdays."""

from datetime import date
from pathlib import Path

import pytest

from issuer.workdays import Calendar

OFFICIAL = Calendar()


def test_national_day_2025_is_skipped_and_make_up_days_count() -> None:
    # 2025: Oct 1-8 off; Sunday Sep 28 and Saturday Oct 11 are make-up workdays
    assert OFFICIAL.is_working_day(date(2025, 9, 28))
    assert not OFFICIAL.is_working_day(date(2025, 10, 1))
    assert OFFICIAL.is_working_day(date(2025, 10, 11))
    assert OFFICIAL.add_working_days(date(2025, 9, 30), 1) == date(2025, 10, 9)
    assert OFFICIAL.add_working_days(date(2025, 10, 9), 2) == date(2025, 10, 11)


def test_thirty_working_days_after_an_approval() -> None:
    # Sep 26 (Fri) + 30: Sep 28, 29, 30 (3), Oct 9, 10, 11 (6), four full weeks Oct 13 -
    # Nov 7 (26), Nov 10-13 (30)
    assert OFFICIAL.add_working_days(date(2025, 9, 26), 30) == date(2025, 11, 13)
    # Mar 3 (Mon) + 30: Qingming (Fri Apr 4) is off, so one day later than six weeks
    assert OFFICIAL.add_working_days(date(2025, 3, 3), 30) == date(2025, 4, 15)


def test_a_year_without_an_official_calendar_fails_loudly() -> None:
    with pytest.raises(ValueError, match="no official holiday calendar for 2031"):
        OFFICIAL.add_working_days(date(2031, 6, 1), 30)


def test_a_year_from_the_holidays_file(tmp_path: Path) -> None:
    path = tmp_path / "holidays.toml"
    path.write_text("[[year]]\nyear = 2031\nholidays = [2031-01-01]\nworkdays = [2031-01-04]\n")
    calendar = Calendar.from_file(path)
    assert not calendar.is_working_day(date(2031, 1, 1))  # a Wednesday, off
    assert calendar.is_working_day(date(2031, 1, 4))  # a Saturday, worked
    assert calendar.add_working_days(date(2030, 12, 31), 3) == date(2031, 1, 4)
    path.write_text("[[year]]\nyear = 'soon'\n")
    with pytest.raises(SystemExit, match="holidays file"):
        Calendar.from_file(path)
