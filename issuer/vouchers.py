"""Vouchers: the record the scripts store, and reading them, one by id or a user's across
campaigns."""

from __future__ import annotations

import time

import msgspec
from redis.asyncio import Redis

from issuer import keys
from issuer.campaigns import Campaigns, read_record
from issuer.model import VoucherOut
from issuer.schedule import from_millis


class VoucherRecord(msgspec.Struct, kw_only=True):
    """A voucher as the claim and draw scripts store it (times in epoch ms). The claim
    script also keeps the request that made it, `request`: [idempotency field, body
    fingerprint], which only `issuer rebuild` reads."""

    voucher_id: str
    campaign_id: str
    round_id: str
    user_id: str
    person_ref: str
    status: str
    issued_at: int
    expires_at: int
    reserve_fen: int
    discount_rate_bp: int
    cap_fen: int
    device_id: str | None = None
    staff_id: str | None = None
    redemption_id: str | None = None


VOUCHER = msgspec.json.Decoder(VoucherRecord)


def voucher_out(rec: VoucherRecord, tz: str, status: str | None = None) -> VoucherOut:
    return VoucherOut(
        voucher_id=rec.voucher_id,
        campaign_id=rec.campaign_id,
        round_id=rec.round_id,
        user_id=rec.user_id,
        status=status or rec.status,
        issued_at=from_millis(rec.issued_at, tz),
        expires_at=from_millis(rec.expires_at, tz),
        discount_rate_bp=rec.discount_rate_bp,
        cap_fen=rec.cap_fen,
        redemption_id=rec.redemption_id,
    )


async def get(redis: Redis, campaigns: Campaigns, voucher_id: str) -> VoucherOut:
    cached = await campaigns.of_entity(voucher_id, "voucher")
    rec = VOUCHER.decode(await read_record(redis, cached.keys.vouchers, voucher_id, "voucher"))
    # past its time but not swept yet: it is expired all the same
    late = rec.status == "issued" and time.time() * 1000 >= rec.expires_at
    return voucher_out(rec, cached.definition.timezone, "expired" if late else None)


async def campaign_ids(redis: Redis, campaign_id: str | None) -> list[str]:
    """The campaign asked for, or every campaign."""
    if campaign_id is not None:
        return [campaign_id]
    return sorted(m.decode() for m in await redis.smembers(keys.CAMPAIGNS))


async def of_user(
    redis: Redis, campaigns: Campaigns, user_id: str, ids: list[str]
) -> list[VoucherOut]:
    """The user's voucher in each of these campaigns that has one."""
    found = []
    async for cached in campaigns.existing(ids):
        voucher_id = await redis.hget(cached.keys.accounts, user_id)
        if voucher_id is not None:
            found.append(await get(redis, campaigns, voucher_id.decode()))
    return found
