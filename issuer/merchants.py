"""Merchants: stored now, checked at redemption."""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

from issuer import keys
from issuer.errors import ApiError
from issuer.model import DEFAULT_TENANT, MerchantDef, MerchantOut
from issuer.products import expand_categories
from issuer.protocol import MerchantPut
from issuer.scripts import Scripts

MERCHANT = msgspec.json.Decoder(MerchantOut)
ENCODE = msgspec.json.Encoder()


async def put(
    scripts: Scripts, merchant_id: str, definition: MerchantDef
) -> tuple[MerchantOut, bool]:
    """Create or replace; returns (merchant, created). Its tenant is fixed: another one is
    TENANT_CONFLICT (none: DEFAULT_TENANT)."""
    try:
        expand_categories(definition.categories)
    except ValueError as exc:
        raise ApiError("INVALID_REQUEST", f"categories: {exc}") from None
    fields = msgspec.structs.asdict(definition)
    fields["tenant"] = definition.tenant or DEFAULT_TENANT
    out = MerchantOut(merchant_id=merchant_id, **fields)
    (code,) = await scripts.run(
        MerchantPut(
            merchants=keys.MERCHANTS,
            events=keys.GLOBAL_EVENTS,
            merchant_id=merchant_id,
            merchant=ENCODE.encode(out),
            tenant=out.tenant,
        )
    )
    if code == b"TENANT_CONFLICT":
        raise ApiError("TENANT_CONFLICT", f"merchant {merchant_id}")
    return out, code == b"CREATED"


async def get(redis: Redis, merchant_id: str) -> MerchantOut:
    raw = await redis.hget(keys.MERCHANTS, merchant_id)
    if raw is None:
        raise ApiError("NOT_FOUND", f"merchant {merchant_id}")
    return MERCHANT.decode(raw)


async def tenant_of(redis: Redis, merchant_id: str) -> str | None:
    """The merchant's tenant, or None if there is no such merchant."""
    raw = await redis.hget(keys.MERCHANTS, merchant_id)
    return None if raw is None else MERCHANT.decode(raw).tenant
