"""Reading vouchers: one by id, or a user's across campaigns."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from issuer import keys
from issuer.campaigns import Campaigns, read_record
from issuer.claims import RECORD, voucher_out
from issuer.model import VoucherOut


async def get(redis: Redis, campaigns: Campaigns, voucher_id: str) -> VoucherOut:
    cached = await campaigns.of_entity(voucher_id, "voucher")
    rec = RECORD.decode(await read_record(redis, cached.keys.vouchers, voucher_id, "voucher"))
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
