"""Campaign TOML files: the shipped examples, relative times, errors that name the field."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from issuer.campaign_file import load_campaign_file
from issuer.draw_rules import commits
from issuer.model import RoundRule
from issuer.schedule import current_round, expand_rounds

pytestmark = pytest.mark.fast

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CST = timezone(timedelta(hours=8))
NOW = datetime(2024, 7, 5, 2, 0, 0, 123456, tzinfo=UTC)  # 10:00:00.123456 in Shanghai

GOOD = """\
id = "t1"
name = "test"
budget_fen = 1000

[geofence]
region_codes = ["1410"]

[[rounds]]
round_id = "r1"
opens_at = "now"
closes_at = "now+3d"
valid_until = 2099-01-01T00:00:00+08:00

[eligibility]
categories = ["appliance"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "campaign.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name", ["xiangning-2024", "xixian-2024", "xixian-2024-lottery", "demo", "demo-lottery"]
)
def test_examples_load(name: str) -> None:
    campaign_id, defn = load_campaign_file(EXAMPLES / f"{name}.toml")
    assert campaign_id == name
    assert defn.geofence.region_codes == ["1410"]
    assert defn.voucher.discount_rate_bp == 1000
    assert defn.voucher.cap_fen == 200_000


def test_xiangning_example() -> None:
    _, defn = load_campaign_file(EXAMPLES / "xiangning-2024.toml")
    assert defn.budget_fen == 320_000_000
    assert defn.mode == "staff"
    assert defn.eligibility.categories == [
        "appliance", "bed", "cabinet", "sofa", "tea_table", "table", "bedding", "curtain",
        "tile", "flooring", "wallpaper", "wall_cloth", "paint", "latex_paint",
    ]  # fmt: skip
    assert isinstance(defn.rounds, RoundRule) and defn.rounds.quota is None
    rounds = expand_rounds(defn)
    assert len(rounds) == 103
    assert rounds[0].opens_at == datetime(2024, 7, 5, 10, tzinfo=CST)
    assert rounds[-1].valid_until == datetime(2024, 10, 15, 22, tzinfo=CST)


def test_xixian_example() -> None:
    _, defn = load_campaign_file(EXAMPLES / "xixian-2024.toml")
    assert defn.budget_fen == 60_000_000
    assert defn.mode == "self"
    assert defn.eligibility.categories == ["appliance", "furniture", "textile", "decoration"]
    rounds = expand_rounds(defn)
    assert [r.round_id for r in rounds] == [
        "20240621", "20240628", "20240705", "20240712", "20240719", "20240726",
    ]  # fmt: skip
    assert [r.budget_fen for r in rounds] == [30_000_000, 0, 0, 0, 0, 0]
    assert rounds[0].valid_until == datetime(2024, 6, 26, 22, tzinfo=CST)


def test_xixian_lottery_example() -> None:
    path = EXAMPLES / "xixian-2024-lottery.toml"
    _, defn = load_campaign_file(path)
    [rnd] = expand_rounds(defn)
    assert rnd.allocation == "lottery"
    assert rnd.opens_at == datetime(2024, 6, 17, 10, tzinfo=CST)
    assert rnd.applications_close_at == datetime(2024, 6, 20, 22, tzinfo=CST)
    assert rnd.draws_at == datetime(2024, 6, 21, 10, tzinfo=CST)
    assert rnd.closes_at == rnd.valid_until == datetime(2024, 6, 26, 22, tzinfo=CST)
    assert (rnd.quota, rnd.budget_fen) == (150, 30_000_000)
    # the demo seed written in the file's comment opens its commitment
    seed = re.search(r"seed = ([0-9a-f]{64})", path.read_text(encoding="utf-8"))
    assert seed is not None and rnd.commitment is not None
    assert commits(seed[1], rnd.commitment)


def test_lottery_times_may_be_relative(tmp_path: Path) -> None:
    lottery = 'allocation = "lottery"\napplications_close_at = "now+1d"\ndraws_at = "now+2d"\n'
    lottery += f'commitment = "{"0" * 64}"\n'
    path = write(tmp_path, GOOD.replace("[eligibility]", lottery + "\n[eligibility]"))
    _, defn = load_campaign_file(path, now=NOW)
    [rnd] = expand_rounds(defn)
    now = NOW.replace(microsecond=0)
    assert rnd.applications_close_at == now + timedelta(days=1)
    assert rnd.draws_at == now + timedelta(days=2)


def test_demo_round_is_open_at_load_time() -> None:
    _, defn = load_campaign_file(EXAMPLES / "demo.toml", now=NOW)
    rounds = expand_rounds(defn)
    now = NOW.replace(microsecond=0)
    assert [r.round_id for r in rounds] == ["today", "tomorrow"]
    today = current_round(rounds, NOW)
    assert today is rounds[0]
    assert today.opens_at == now - timedelta(minutes=1)
    assert today.closes_at == today.valid_until == now + timedelta(hours=12)
    assert today.quota == 500
    assert rounds[1].opens_at == now + timedelta(days=1)
    assert defn.budget_fen == 100_000_000
    assert defn.eligibility.categories == ["appliance", "furniture"]


def test_demo_default_now_is_the_clock() -> None:
    _, defn = load_campaign_file(EXAMPLES / "demo.toml")
    found = current_round(expand_rounds(defn), datetime.now(UTC))
    assert found is not None and found.round_id == "today"


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("now", timedelta()),
        ("now+5s", timedelta(seconds=5)),
        ("now-10m", timedelta(minutes=-10)),
        ("now+12h", timedelta(hours=12)),
        ("now+2d", timedelta(days=2)),
    ],
)
def test_relative_times(tmp_path: Path, text: str, delta: timedelta) -> None:
    path = write(tmp_path, GOOD.replace('opens_at = "now"', f'opens_at = "{text}"'))
    _, defn = load_campaign_file(path, now=NOW)
    assert isinstance(defn.rounds, list)
    opens = defn.rounds[0].opens_at
    assert opens == NOW.replace(microsecond=0) + delta
    assert opens.utcoffset() == timedelta(hours=8)  # in the campaign's timezone


def test_relative_times_use_the_campaign_timezone(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('name = "test"', 'name = "test"\ntimezone = "UTC"'))
    _, defn = load_campaign_file(path, now=NOW.astimezone(CST))
    assert isinstance(defn.rounds, list)
    assert defn.rounds[0].opens_at.isoformat() == "2024-07-05T02:00:00+00:00"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("budget_fen = 1000", "budget_fen = -1", "Expected `int` >= 0 - at `$.budget_fen`"),
        ("budget_fen = 1000", "budjet_fen = 1000", "unknown field `budjet_fen`"),
        ('categories = ["appliance"]', "", "missing required field `categories`"),
        ('id = "t1"', 'id = "t 1"', "at `$.id`"),
        ('id = "t1"\n', "", "missing required field `id`"),
        ('"now+3d"', "2099-01-01T00:00:00", "timezone component - at `$.rounds[0].closes_at`"),
        ('"now+3d"', '"in an hour"', "'in an hour' is neither a TOML datetime"),
        ('"now+3d"', '"now+1w"', "at `$.rounds[0].closes_at`"),
        ('"now+3d"', '"now-1h"', "round 'r1': closes_at must be after opens_at"),
        ('region_codes = ["1410"]', "region_codes = []", "at `$.geofence.region_codes`"),
        ('name = "test"', "name = ", "Invalid value"),  # TOML syntax
        ('name = "test"', 'name = "test"\ntimezone = "Mars/Olympus"', "unknown timezone"),
        ("valid_until = 2099", 'draws_at = "now+1d"\nvalid_until = 2099', "allocation = 'lottery'"),
    ],
)
def test_bad_file_names_the_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ValueError) as caught:
        load_campaign_file(path, now=NOW)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_bad_rule_in_file(tmp_path: Path) -> None:
    rule = '[rounds]\nevery = "friday"\nat = "10:00"\nvalid_until = "+8d 22:00"\n'
    rule += "from = 2024-06-21\nto = 2024-07-31\n"
    text = GOOD.split("[[rounds]]")[0] + rule + '[eligibility]\ncategories = ["appliance"]\n'
    with pytest.raises(ValueError, match="round '20240628' opens before round '20240621'"):
        load_campaign_file(write(tmp_path, text))


def test_now_must_be_aware(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        load_campaign_file(write(tmp_path, GOOD), now=datetime(2024, 7, 5))
