"""Working days of mainland China: weekends and official holidays off, make-up workdays
(调休) on, from the `chinese-calendar` package, which knows only the years the State
Council has published. A year it does not know yet can be given in a TOML file
(`ISSUER_HOLIDAYS_FILE`, copied from the State Council's notice); a count that reaches a
year neither knows is provisional: that year's days count as working on weekdays only."""

from __future__ import annotations

import tomllib
from datetime import date, timedelta
from pathlib import Path
from typing import NamedTuple

import chinese_calendar
import msgspec


class Year(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    year: int
    holidays: list[date]  # days off that would otherwise be working days
    workdays: list[date] = []  # weekend days worked instead (调休)


class YearsFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    year: list[Year] = []  # none yet: the package alone


class HolidaysFileError(ValueError):
    """The holidays file cannot be read or is malformed; the message names it."""


class Due(NamedTuple):
    day: date
    # the first year counted weekends-only (its holidays not known yet); None: final
    provisional_until_year: int | None = None


class Calendar:
    """The package's years, plus the years of an optional file (which take precedence)."""

    def __init__(self, extra: list[Year] | None = None) -> None:
        self.off = {d for y in extra or [] for d in y.holidays}
        self.on = {d for y in extra or [] for d in y.workdays}
        self.years = {y.year for y in extra or []}

    @classmethod
    def from_file(cls, path: Path | None) -> Calendar:
        if path is None:
            return cls()
        try:
            parsed = msgspec.convert(
                tomllib.loads(path.read_text()), YearsFile, builtin_types=(date,)
            )
        except (
            OSError,
            UnicodeDecodeError,
            tomllib.TOMLDecodeError,
            msgspec.ValidationError,
        ) as exc:
            raise HolidaysFileError(f"holidays file {path}: {exc}") from None
        return cls(parsed.year)

    def is_working_day(self, day: date) -> bool | None:
        """None for a year neither the package nor the file covers."""
        if day.year in self.years:
            return day in self.on or (day.weekday() < 5 and day not in self.off)
        try:
            return bool(chinese_calendar.is_workday(day))
        except NotImplementedError:
            return None

    def knows(self, year: int) -> bool:
        return self.is_working_day(date(year, 1, 1)) is not None

    def add_working_days(self, start: date, days: int) -> Due:
        """The `days`-th working day after `start` (not counting `start` itself)."""
        day = start
        left = days
        waits_for = None
        while left > 0:
            day += timedelta(days=1)
            working = self.is_working_day(day)
            if working is None:
                waits_for = waits_for or day.year
                working = day.weekday() < 5
            if working:
                left -= 1
        return Due(day, waits_for)
