"""Rounds from rules and lists, the live round, epoch-millisecond helpers."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, time, timedelta, timezone
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest

from issuer.model import CampaignDef, Round
from issuer.schedule import MAX_ROUNDS, current_round, expand_rounds, from_millis, to_millis

pytestmark = pytest.mark.fast

CST = timezone(timedelta(hours=8))
XIANGNING = {
    "every": "day",
    "at": "10:00",
    "valid_until": "22:00",
    "from": "2024-07-05",
    "to": "2024-10-15",
}
XIXIAN = {
    "every": "friday",
    "at": "10:00",
    "valid_until": "+5d 22:00",
    "from": "2024-06-21",
    "to": "2024-07-31",
    "first_budget_fen": 30_000_000,
    "budget_fen": 0,
}


def campaign(rounds: Any, **fields: Any) -> CampaignDef:
    """A campaign decoded from a JSON-shaped body, as the HTTP path does."""
    body = {
        "name": "test",
        "budget_fen": 1_000_000,
        "geofence": {"region_codes": ["1410"]},
        "eligibility": {"categories": ["appliance"]},
        "rounds": rounds,
        **fields,
    }
    return msgspec.convert(body, CampaignDef)


def spec(round_id: str, opens: str, closes: str, valid: str | None = None) -> dict[str, str]:
    return {
        "round_id": round_id,
        "opens_at": opens,
        "closes_at": closes,
        "valid_until": valid or closes,
    }


def test_xiangning_daily_rounds() -> None:
    rounds = expand_rounds(campaign(XIANGNING))
    assert len(rounds) == 103
    assert [r.round_id for r in rounds[:2]] == ["20240705", "20240706"]
    assert rounds[-1].round_id == "20241015"
    first, last = rounds[0], rounds[-1]
    assert first.opens_at == datetime(2024, 7, 5, 10, tzinfo=CST)
    assert first.closes_at == first.valid_until == datetime(2024, 7, 5, 22, tzinfo=CST)
    assert last.opens_at == datetime(2024, 10, 15, 10, tzinfo=CST)
    assert last.valid_until == datetime(2024, 10, 15, 22, tzinfo=CST)
    assert first.opens_at.isoformat() == "2024-07-05T10:00:00+08:00"
    assert all(r.quota is None and r.budget_fen is None for r in rounds)
    assert all(b.opens_at - a.opens_at == timedelta(days=1) for a, b in pairwise(rounds))


def test_xixian_weekly_rounds() -> None:
    rounds = expand_rounds(campaign(XIXIAN))
    days = (date(2024, 6, 21) + timedelta(days=i) for i in range(41))  # 06-21 .. 07-31
    fridays = [d for d in days if d.weekday() == 4]
    assert [r.round_id for r in rounds] == [d.strftime("%Y%m%d") for d in fridays]
    assert [r.budget_fen for r in rounds] == [30_000_000] + [0] * (len(fridays) - 1)
    for r, friday in zip(rounds, fridays, strict=True):
        assert r.opens_at == datetime.combine(friday, time(10), CST)
        wednesday = friday + timedelta(days=5)
        assert wednesday.weekday() == 2
        assert r.valid_until == datetime.combine(wednesday, time(22), CST)
        assert r.closes_at == r.valid_until
    assert rounds[-1].valid_until == datetime(2024, 7, 31, 22, tzinfo=CST)


def test_rule_closes_differs_from_valid_until() -> None:
    rounds = expand_rounds(
        campaign({**XIANGNING, "closes": "12:00", "valid_until": "+1d 22:00", "quota": 300})
    )
    assert rounds[0].closes_at == datetime(2024, 7, 5, 12, tzinfo=CST)
    assert rounds[0].valid_until == datetime(2024, 7, 6, 22, tzinfo=CST)
    assert {r.quota for r in rounds} == {300}


def test_rule_in_another_timezone() -> None:
    rounds = expand_rounds(campaign(XIANGNING, timezone="Europe/London"))
    assert rounds[0].opens_at.utcoffset() == timedelta(hours=1)  # BST
    assert rounds[-1].opens_at.isoformat() == "2024-10-15T10:00:00+01:00"


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2024, 6, 1), "20240621"),  # before the first: the next to open
        (utc(2024, 6, 21, 1, 59, 59), "20240621"),  # 09:59:59 in Shanghai, not open yet
        (utc(2024, 6, 21, 2), "20240621"),  # 10:00 in Shanghai: open
        (utc(2024, 6, 26, 13, 59), "20240621"),  # Wednesday 21:59
        (utc(2024, 6, 26, 14), "20240628"),  # Wednesday 22:00: closed, next is Friday
        (utc(2024, 6, 27), "20240628"),  # between rounds
        (utc(2024, 7, 31, 13, 59, 59), "20240726"),  # the last, still open
        (utc(2024, 7, 31, 14), None),  # after the last
    ],
)
def test_current_round(now: datetime, expected: str | None) -> None:
    found = current_round(expand_rounds(campaign(XIXIAN)), now)
    assert (found and found.round_id) == expected


def test_current_round_is_open_only_inside_its_window() -> None:
    rounds = expand_rounds(campaign(XIANGNING))
    early = utc(2024, 7, 5, 1, 59, 59)
    r = current_round(rounds, early)
    assert r is not None and r.round_id == "20240705" and early < r.opens_at
    r = current_round(rounds, utc(2024, 7, 5, 13, 59))
    assert r is not None and r.round_id == "20240705" and r.opens_at <= utc(2024, 7, 5, 13, 59)
    assert current_round([], utc(2024, 7, 5)) is None


def test_explicit_rounds_move_to_campaign_timezone() -> None:
    rounds = expand_rounds(
        campaign(
            [
                {**spec("a", "2024-07-05T02:00:00Z", "2024-07-05T14:00:00Z"), "quota": 5},
                spec(
                    "b",
                    "2024-07-06T10:00:00+08:00",
                    "2024-07-06T12:00:00+08:00",
                    "2024-07-07T22:00:00+08:00",
                ),
            ]
        )
    )
    assert rounds[0] == Round(
        round_id="a",
        opens_at=datetime(2024, 7, 5, 10, tzinfo=CST),
        closes_at=datetime(2024, 7, 5, 22, tzinfo=CST),
        valid_until=datetime(2024, 7, 5, 22, tzinfo=CST),
        quota=5,
    )
    assert rounds[0].opens_at.utcoffset() == timedelta(hours=8)
    assert rounds[1].valid_until == datetime(2024, 7, 7, 22, tzinfo=CST)


T1, T2, T3 = "2024-07-05T10:00:00+08:00", "2024-07-05T12:00:00+08:00", "2024-07-05T14:00:00+08:00"


@pytest.mark.parametrize(
    ("rounds", "message"),
    [
        ([spec("a", T2, T1)], "round 'a': closes_at must be after opens_at"),
        ([spec("a", T1, T1)], "round 'a': closes_at must be after opens_at"),
        ([spec("a", T1, T3, T2)], "round 'a': valid_until must not be before closes_at"),
        ([spec("a", T1, T2), spec("a", T2, T3)], "round 'a' appears twice"),
        ([spec("a", T1, T3), spec("b", T2, T3)], "round 'b' opens before round 'a' closes"),
        ([spec("b", T2, T3), spec("a", T1, T2)], "round 'a' opens before round 'b' closes"),
        ([], "no rounds"),
    ],
)
def test_explicit_round_errors(rounds: list[dict[str, str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_rounds(campaign(rounds))


def test_explicit_rounds_may_touch() -> None:
    assert len(expand_rounds(campaign([spec("a", T1, T2), spec("b", T2, T3)]))) == 2


def test_too_many_explicit_rounds() -> None:
    start = datetime(2024, 1, 1, tzinfo=CST)
    many = [
        spec(
            f"r{i}",
            (start + timedelta(hours=i)).isoformat(),
            (start + timedelta(hours=i, minutes=30)).isoformat(),
        )
        for i in range(MAX_ROUNDS + 1)
    ]
    with pytest.raises(ValueError, match="more than 1000"):
        expand_rounds(campaign(many))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"from": "2024-10-16"}, "rounds.to 2024-10-15 is before rounds.from 2024-10-16"),
        ({"valid_until": "09:00"}, "valid_until '09:00' must be after at"),
        ({"valid_until": "10:00"}, "valid_until '10:00' must be after at"),
        ({"closes": "23:00"}, "closes '23:00' must be after at and not after valid_until"),
        ({"closes": "09:00"}, "closes '09:00' must be after at"),
        ({"valid_until": "+1d 22:00"}, "round '20240706' opens before round '20240705' closes"),
        ({"from": "2000-01-01", "to": "2030-12-31"}, "rounds rule yields 11323 rounds"),
        ({"every": "monday", "from": "2024-07-09", "to": "2024-07-14"}, "no rounds"),
    ],
)
def test_rule_errors(change: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_rounds(campaign({**XIANGNING, **change}))


def test_unknown_timezone() -> None:
    with pytest.raises(ValueError, match="unknown timezone 'Mars/Olympus'"):
        expand_rounds(campaign(XIANGNING, timezone="Mars/Olympus"))
    with pytest.raises(ValueError, match="unknown timezone"):
        from_millis(0, "../etc/passwd")


def test_millis() -> None:
    opens = datetime(2024, 7, 5, 10, tzinfo=CST)
    ms = to_millis(opens)
    assert ms == 1_720_144_800_000
    assert to_millis(opens.astimezone(UTC)) == ms
    assert to_millis(opens + timedelta(microseconds=1999)) == ms + 1
    back = from_millis(ms + 1, "Asia/Shanghai")
    assert back == opens + timedelta(milliseconds=1)
    assert back.isoformat() == "2024-07-05T10:00:00.001000+08:00"
    assert from_millis(-1, "UTC") == datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)


def test_millis_through_a_float_are_exact() -> None:
    """from_millis takes a float's short cut only where it gives every millisecond back: the
    same datetimes, in every zone, as the exact arithmetic, up to its edges and past them."""
    exact = datetime(1970, 1, 1, tzinfo=UTC)
    edge = 2**32 * 1000
    near = [edge - 1, edge, edge + 1, 1 - edge, -edge, 1_796_000_000_123, 0, -1]
    near += [2**36 * 1000 + n for n in range(1, 1000, 7)]  # where a float is not exact
    rng = random.Random(24)
    spread = [rng.randrange(1 - edge, edge) for _ in range(2_000)]
    for name in ("Asia/Shanghai", "America/New_York", "Australia/Lord_Howe", "UTC"):
        tz = ZoneInfo(name)
        for ms in near + spread:
            expected = (exact + ms * timedelta(milliseconds=1)).astimezone(tz)
            got = from_millis(ms, tz)
            assert (got, got.isoformat(), got.fold) == (
                expected,
                expected.isoformat(),
                expected.fold,
            ), (name, ms)
