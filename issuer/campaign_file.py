"""Campaign definitions from TOML files (`examples/*.toml`).

A file holds `id = "..."` and the body of `PUT /v1/campaigns/{id}` in TOML form, and is
validated exactly as that body is. Times in explicit rounds are TOML datetimes with an
offset or, for demos, relative to now: "now", "now+5s", "now-10m", "now+12h", "now+2d".
"""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from issuer.model import CampaignDef, Id
from issuer.schedule import expand_rounds, zone

_DEFAULT_TZ = next(f.default for f in msgspec.structs.fields(CampaignDef) if f.name == "timezone")
_RELATIVE = re.compile(r"now(?:([+-])([0-9]{1,6})([smhd]))?")
_UNIT = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
}
_ROUND_TIMES = ("opens_at", "closes_at", "valid_until", "applications_close_at", "draws_at")


def load_campaign_file(path: Path, now: datetime | None = None) -> tuple[str, CampaignDef]:
    """(campaign id, definition) from a TOML file; ValueError naming the file and the field.

    Relative times resolve against `now` (aware; default the current time), truncated to
    the second, into the campaign's timezone.
    """
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
        campaign_id = _campaign_id(data)
        _resolve_relative(data, now.replace(microsecond=0))
        defn = msgspec.convert(data, CampaignDef, builtin_types=(datetime, date))
        expand_rounds(defn)
    except ValueError as e:  # TOML syntax, msgspec validation, rounds
        raise ValueError(f"{path}: {e}") from e
    return campaign_id, defn


def _campaign_id(data: dict[str, Any]) -> str:
    """Remove and return the top-level `id`."""
    if "id" not in data:
        raise ValueError("Object missing required field `id`")
    try:
        return msgspec.convert(data.pop("id"), Id)
    except msgspec.ValidationError as e:
        raise ValueError(f"{e} - at `$.id`") from None


def _resolve_relative(data: dict[str, Any], now: datetime) -> None:
    """Replace the string times of explicit rounds by aware datetimes, in place."""
    rounds = data.get("rounds")
    if not isinstance(rounds, list):
        return
    tz = zone(str(data.get("timezone", _DEFAULT_TZ)))
    for i, spec in enumerate(rounds):
        if not isinstance(spec, dict):
            continue  # msgspec reports it
        for key in _ROUND_TIMES:
            value = spec.get(key)
            if isinstance(value, str):
                spec[key] = _relative(value, now, f"$.rounds[{i}].{key}").astimezone(tz)


def _relative(text: str, now: datetime, where: str) -> datetime:
    """`now` moved by "now", "now+5s", "now-10m", "now+12h" or "now+2d"."""
    m = _RELATIVE.fullmatch(text)
    if m is None:
        raise ValueError(
            f"{text!r} is neither a TOML datetime with offset nor 'now', 'now+5s', 'now-10m',"
            f" 'now+12h', 'now+2d' - at `{where}`"
        )
    sign, amount, unit = m.groups()
    if unit is None:
        return now
    delta = int(amount) * _UNIT[unit]
    return now - delta if sign == "-" else now + delta
