"""Made-up but valid resident ID numbers and campaign bodies for tests."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

from stdnum.cn import ric

from issuer.keys import CampaignKeys

XIANGNING_SEAT = {"lat": 35.9736, "lon": 110.8456}  # 乡宁县城, GCJ-02
XI_SEAT = {"lat": 36.6927, "lon": 110.9402}  # 隰县城
YUNCHENG = {"lat": 35.0264, "lon": 111.0070}
BEIJING = {"lat": 39.9042, "lon": 116.4074}


def id_number(n: int, region: str = "141029") -> str:
    """The n-th distinct valid ID: birth date and sequence derived from n."""
    born = date(1950, 1, 1) + timedelta(days=n // 900)
    body = f"{region}{born:%Y%m%d}{n % 900 + 100:03d}"
    return body + ric.calc_check_digit(body + "0")


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat()


def campaign(
    *,
    quota: int | None = 500,
    budget_fen: int = 10**10,
    round_budget_fen: int | None = None,
    opens_in_s: float = -5,
    open_for_s: float = 3600,
    mode: str = "self",
    reserve_fen: int | None = None,
) -> dict[str, Any]:
    """A campaign body with one explicit round opening `opens_in_s` from now."""
    now = datetime.now(UTC)
    opens = now + timedelta(seconds=opens_in_s)
    closes = opens + timedelta(seconds=open_for_s)
    rnd: dict[str, Any] = {
        "round_id": "r1",
        "opens_at": iso(opens),
        "closes_at": iso(closes),
        "valid_until": iso(closes + timedelta(hours=1)),
    }
    if quota is not None:
        rnd["quota"] = quota
    if round_budget_fen is not None:
        rnd["budget_fen"] = round_budget_fen
    voucher: dict[str, Any] = {"discount_rate_bp": 1000, "cap_fen": 200_000}
    if reserve_fen is not None:
        voucher["reserve_fen"] = reserve_fen
    return {
        "name": "test campaign",
        "budget_fen": budget_fen,
        "voucher": voucher,
        "mode": mode,
        "geofence": {"region_codes": ["1410"]},
        "rounds": [rnd],
        "eligibility": {"categories": ["appliance", "furniture"]},
    }


def claim(
    n: int,
    *,
    user: str | None = None,
    request_id: str | None = None,
    location: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "request_id": request_id or f"req-{n:08d}",
        "user_id": user or f"u{n}",
        "person": {"id_number": id_number(n)},
        "location": location or XIANGNING_SEAT,
        **extra,
    }


def applications(campaign_id: str, round_id: str, n: int) -> list[dict[str, Any]]:
    """n applications to a lottery round as the claim script records them, written
    straight to Redis where only the draw is under test."""
    found = []
    for i in range(n):
        application_id = f"{campaign_id}.{i:020x}"
        found.append(
            {
                "application_id": application_id,
                "application_ref": hashlib.sha256(application_id.encode()).hexdigest(),
                "campaign_id": campaign_id,
                "round_id": round_id,
                "user_id": f"u{i}",
                "person_ref": hashlib.sha256(f"person {i}".encode()).hexdigest(),
                "status": "applied",
                "applied_at": 0,
                "discount_rate_bp": 1000,
                "cap_fen": 200_000,
            }
        )
    return found


async def write_applications(
    redis: Any, ck: CampaignKeys, records: list[dict[str, Any]]
) -> dict[str, str]:
    """Records straight into Redis; returns application_ref -> application_id."""
    async with redis.pipeline(transaction=False) as pipe:
        for r in records:
            pipe.hset(ck.applications, r["application_id"], json.dumps(r, separators=(",", ":")))
            pipe.hset(ck.entries(r["round_id"]), r["application_ref"], r["application_id"])
        await pipe.execute()
    return {r["application_ref"]: r["application_id"] for r in records}
