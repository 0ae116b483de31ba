"""Applications to lottery rounds: the record the claim script stores, and reading them."""

from __future__ import annotations

from typing import Literal

import msgspec
from redis.asyncio import Redis

from issuer.campaigns import Campaigns, read_record
from issuer.errors import ApiError
from issuer.model import ApplicationOut, Round
from issuer.schedule import from_millis


class ApplicationRecord(msgspec.Struct, kw_only=True):
    """An application as the claim script stores it (times in epoch ms); the draw adds the
    outcome and, for a winner, the voucher."""

    application_id: str
    application_ref: str
    campaign_id: str
    round_id: str
    user_id: str
    person_ref: str
    status: Literal["applied", "won", "not_drawn"]
    applied_at: int
    discount_rate_bp: int
    cap_fen: int
    device_id: str | None = None
    staff_id: str | None = None
    voucher_id: str | None = None
    request: list[str] | None = None


APPLICATION = msgspec.json.Decoder(ApplicationRecord)


def round_of(rounds: list[Round], round_id: str) -> Round:
    found = next((r for r in rounds if r.round_id == round_id), None)
    if found is None or found.allocation != "lottery":
        raise ApiError("NOT_FOUND", f"lottery round {round_id}")
    return found


def application_out(rec: ApplicationRecord, rnd: Round, tz: str) -> ApplicationOut:
    assert rnd.draws_at is not None
    return ApplicationOut(
        application_id=rec.application_id,
        campaign_id=rec.campaign_id,
        round_id=rec.round_id,
        user_id=rec.user_id,
        status=rec.status,
        draws_at=rnd.draws_at,
        applied_at=from_millis(rec.applied_at, tz),
        voucher_id=rec.voucher_id,
    )


async def get(redis: Redis, campaigns: Campaigns, application_id: str) -> ApplicationOut:
    cached = await campaigns.of_entity(application_id, "application")
    key = cached.keys.applications
    rec = APPLICATION.decode(await read_record(redis, key, application_id, "application"))
    rnd = round_of(cached.stored.rounds, rec.round_id)
    return application_out(rec, rnd, cached.definition.timezone)


async def of_user(
    redis: Redis, campaigns: Campaigns, user_id: str, campaign_ids: list[str]
) -> list[ApplicationOut]:
    """The user's latest application in each of these campaigns."""
    found = []
    async for cached in campaigns.existing(campaign_ids):
        if not cached.lottery:
            continue
        application_id = await redis.hget(cached.keys.applicant_accounts, user_id)
        if application_id is not None:
            found.append(await get(redis, campaigns, application_id.decode()))
    return found
