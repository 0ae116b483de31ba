"""Rounds of a campaign: expanding a definition into explicit rounds, finding the live one.

All local times (`at`, "HH:MM", dates) are read in the campaign's timezone; every
datetime this module returns is timezone-aware in that zone.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from itertools import pairwise
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from msgspec import UnsetType

from issuer.model import CampaignDef, Round, RoundRule, RoundSpec

MAX_ROUNDS = 1000
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLI = timedelta(milliseconds=1)
# "22:00" or "+5d 22:00": an offset from midnight of the opening day
_DAY_TIME = re.compile(r"(?:\+([0-9]{1,3})d )?([01][0-9]|2[0-3]):([0-5][0-9])")


def zone(name: str) -> ZoneInfo:
    """The IANA timezone `name`; ValueError if there is no such zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}") from None


def to_millis(dt: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime (exact, no float rounding)."""
    return (dt - _EPOCH) // _MILLI


# below this many milliseconds either side of the epoch (1833 to 2106), ms / 1000 is
# within 0.5 µs of the exact time, so fromtimestamp's rounding to the µs gives it back
_FLOAT_EXACT_MS = 2**32 * 1000


def from_millis(ms: int, tz: str | tzinfo) -> datetime:
    """The aware datetime in timezone `tz` (a name, or the zone) that is `ms` milliseconds
    after the Unix epoch (through a float where that is exact: half the cost)."""
    where = zone(tz) if isinstance(tz, str) else tz
    if -_FLOAT_EXACT_MS < ms < _FLOAT_EXACT_MS:
        return datetime.fromtimestamp(ms / 1000, where)
    return (_EPOCH + ms * _MILLI).astimezone(where)


def expand_rounds(defn: CampaignDef) -> list[Round]:
    """The campaign's rounds in order, with explicit times; ValueError if they are invalid."""
    tz = zone(defn.timezone)
    if isinstance(defn.rounds, RoundRule):
        rounds = _from_rule(defn.rounds, tz)
    else:
        rounds = [_from_spec(spec, tz) for spec in defn.rounds]
    _check(rounds)
    return rounds


class Windows:
    """Rounds' claim windows in epoch seconds, to find the live one with float comparisons
    (the claim path does it per request; aware datetimes compare through their offsets).
    `rounds` must be as `expand_rounds` returns them (sorted, not overlapping)."""

    def __init__(self, rounds: Sequence[Round]) -> None:
        self.opens = [r.opens_at.timestamp() for r in rounds]
        self.closes = [r.closes_at.timestamp() for r in rounds]

    def at(self, now: float) -> int | None:
        """The index of the round whose window holds `now`, else of the next to open, else
        None. O(log n)."""
        i = bisect_right(self.opens, now)
        if i and now < self.closes[i - 1]:
            return i - 1
        return i if i < len(self.opens) else None


def current_round(rounds: Sequence[Round], now: datetime) -> Round | None:
    """The round whose claim window holds `now` (aware), else the next to open, else None."""
    i = Windows(rounds).at(now.timestamp())
    return None if i is None else rounds[i]


def _from_spec(spec: RoundSpec, tz: ZoneInfo) -> Round:
    """An explicit round, its times moved to the campaign's timezone."""
    return Round(
        round_id=spec.round_id,
        opens_at=spec.opens_at.astimezone(tz),
        closes_at=spec.closes_at.astimezone(tz),
        valid_until=spec.valid_until.astimezone(tz),
        quota=spec.quota,
        budget_fen=spec.budget_fen,
        allocation=spec.allocation or "first_come",
        applications_close_at=_local(spec.applications_close_at, tz),
        draws_at=_local(spec.draws_at, tz),
        commitment=spec.commitment or None,
    )


def _local(dt: datetime | UnsetType, tz: ZoneInfo) -> datetime | None:
    """An optional time of a round in the campaign's timezone; None if unset."""
    return dt.astimezone(tz) if dt else None


def _from_rule(rule: RoundRule, tz: ZoneInfo) -> list[Round]:
    """One round per opening day of the rule, at its local wall-clock times."""
    opens = _offset(rule.at, "at")
    valid = _offset(rule.valid_until, "valid_until")
    closes = valid if rule.closes is None else _offset(rule.closes, "closes")
    if opens >= timedelta(days=1):
        raise ValueError(f"rounds.at {rule.at!r} must be a time of day")
    if valid <= opens:
        raise ValueError(f"rounds.valid_until {rule.valid_until!r} must be after at {rule.at!r}")
    if not opens < closes <= valid:
        raise ValueError(
            f"rounds.closes {rule.closes!r} must be after at and not after valid_until"
        )
    rounds = []
    for day in _days(rule):
        midnight = datetime.combine(day, time(), tzinfo=tz)
        rounds.append(
            Round(
                round_id=day.strftime("%Y%m%d"),
                opens_at=midnight + opens,
                closes_at=midnight + closes,
                valid_until=midnight + valid,
                quota=rule.quota,
                budget_fen=rule.budget_fen,
            )
        )
    if rounds and rule.first_budget_fen is not None:
        rounds[0].budget_fen = rule.first_budget_fen
    return rounds


def _offset(text: str, field: str) -> timedelta:
    """'HH:MM' or '+Nd HH:MM' as the wall-clock offset from midnight of the opening day."""
    m = _DAY_TIME.fullmatch(text)
    if m is None:
        raise ValueError(f"rounds.{field} {text!r} is not 'HH:MM' or '+Nd HH:MM'")
    days, hours, minutes = m.groups()
    return timedelta(days=int(days or 0), hours=int(hours), minutes=int(minutes))


def _days(rule: RoundRule) -> list[date]:
    """The opening days of a rule: each day, or each given weekday, from `from` to `to`."""
    if rule.to < rule.from_:
        raise ValueError(f"rounds.to {rule.to} is before rounds.from {rule.from_}")
    step = 1 if rule.every == "day" else 7
    first = rule.from_
    if rule.every != "day":
        first += timedelta(days=(_WEEKDAYS.index(rule.every) - first.weekday()) % 7)
    count = (rule.to - first).days // step + 1 if first <= rule.to else 0
    if count > MAX_ROUNDS:
        raise ValueError(f"rounds rule yields {count} rounds, more than {MAX_ROUNDS}")
    return [first + timedelta(days=i * step) for i in range(count)]


def _check(rounds: list[Round]) -> None:
    """ValueError unless the rounds are 1..MAX_ROUNDS, well-formed, unique and in order."""
    if not rounds:
        raise ValueError("the campaign has no rounds")
    if len(rounds) > MAX_ROUNDS:
        raise ValueError(f"{len(rounds)} rounds, more than {MAX_ROUNDS}")
    seen: set[str] = set()
    for r in rounds:
        if r.round_id in seen:
            raise ValueError(f"round {r.round_id!r} appears twice")
        seen.add(r.round_id)
        if r.closes_at <= r.opens_at:
            raise ValueError(f"round {r.round_id!r}: closes_at must be after opens_at")
        if r.valid_until < r.closes_at:
            raise ValueError(f"round {r.round_id!r}: valid_until must not be before closes_at")
        _check_allocation(r)
    for prev, cur in pairwise(rounds):
        if cur.opens_at < prev.closes_at:
            raise ValueError(
                f"round {cur.round_id!r} opens before round {prev.round_id!r} closes;"
                " list rounds in time order without overlapping claim windows"
            )


_LOTTERY_FIELDS = ("applications_close_at", "draws_at", "commitment")


def _check_allocation(r: Round) -> None:
    """ValueError unless a lottery round has its application window, draw time and
    commitment, in order inside the round, and a first-come round has none of them."""
    given = [name for name in _LOTTERY_FIELDS if getattr(r, name) is not None]
    if r.allocation == "first_come":
        if given:
            raise ValueError(
                f"round {r.round_id!r}: {', '.join(given)} only apply to allocation = 'lottery'"
            )
        return
    if r.applications_close_at is None or r.draws_at is None or r.commitment is None:
        missing = [name for name in _LOTTERY_FIELDS if name not in given]
        raise ValueError(f"round {r.round_id!r}: a lottery round needs {', '.join(missing)}")
    if not r.opens_at < r.applications_close_at <= r.draws_at < r.closes_at:
        raise ValueError(
            f"round {r.round_id!r}: a lottery round needs"
            " opens_at < applications_close_at <= draws_at < closes_at"
        )
