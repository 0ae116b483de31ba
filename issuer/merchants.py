"""Merchants: stored now, checked at redemption.

Merchants live in the global slot, a campaign's redemptions in the campaign's: a worker
decides the merchants' verdicts from its own copy of them (`Cache`), read with the
merchants' version (keys.MERCHANT_VERSION, raised by every change), and the `redeem`
script refuses a batch decided at another version than its campaign's. A change raises
every campaign's version before it is answered, so from then on no batch decided from the
merchant as it was is applied."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import msgspec
from redis.asyncio import Redis

from issuer import keys
from issuer.errors import ApiError
from issuer.model import DEFAULT_TENANT, MerchantDef, MerchantOut
from issuer.products import expand_categories
from issuer.protocol import MerchantPut, MerchantVersion
from issuer.scripts import Scripts

MERCHANT = msgspec.json.Decoder(MerchantOut)
ENCODE = msgspec.json.Encoder()
RAISE_AT_ONCE = 64  # campaigns whose version one change raises concurrently


class Cache:
    """One worker's copy of the merchants its redemptions name (None: no such merchant),
    all read at `version` or later."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.version = 0
        self.found: dict[str, MerchantOut | None] = {}

    async def read(self, merchant_ids: list[str]) -> None:
        """Read these merchants and the version; a new version drops every other copy."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.MERCHANT_VERSION)  # first: the records read after are as new
            pipe.hmget(keys.MERCHANTS, merchant_ids)
            version, raw = await pipe.execute()
        version = int(version or 0)
        if version != self.version:
            self.version = version
            self.found = {}
        self.found.update(
            (m, MERCHANT.decode(r) if r else None) for m, r in zip(merchant_ids, raw, strict=True)
        )

    async def fill(self, merchant_ids: list[str]) -> None:
        """Read those of these merchants the copy lacks, if any."""
        missing = [m for m in merchant_ids if m not in self.found]
        if missing:
            await self.read(missing)


async def raise_version(scripts: Scripts, held: Iterable[str], version: int) -> None:
    """Raise these merchants' versions (MerchantVersion) to `version`."""
    calls = [MerchantVersion(held=key, version=version) for key in held]
    for at in range(0, len(calls), RAISE_AT_ONCE):
        await asyncio.gather(*(scripts.run(call) for call in calls[at : at + RAISE_AT_ONCE]))


async def raise_everywhere(redis: Redis, scripts: Scripts, version: int) -> None:
    """Raise every campaign's merchants' version to `version`, that of a change just made."""
    # the registry lists a campaign before it exists (Campaigns.put): none is missed
    campaign_ids = [c.decode() for c in await redis.smembers(keys.CAMPAIGNS)]
    await raise_version(
        scripts, [keys.CampaignKeys(c).merchant_version for c in campaign_ids], version
    )


async def put(
    redis: Redis, scripts: Scripts, merchant_id: str, definition: MerchantDef
) -> tuple[MerchantOut, bool]:
    """Create or replace; returns (merchant, created) once every campaign's merchants'
    version is raised past the change. Its tenant is fixed: another one is TENANT_CONFLICT
    (none: DEFAULT_TENANT)."""
    try:
        expand_categories(definition.categories)
    except ValueError as exc:
        raise ApiError("INVALID_REQUEST", f"categories: {exc}") from None
    fields = msgspec.structs.asdict(definition)
    fields["tenant"] = definition.tenant or DEFAULT_TENANT
    out = MerchantOut(merchant_id=merchant_id, **fields)
    answer = await scripts.run(
        MerchantPut(
            merchants=keys.MERCHANTS,
            events=keys.GLOBAL_EVENTS,
            version=keys.MERCHANT_VERSION,
            merchant_id=merchant_id,
            merchant=ENCODE.encode(out),
            tenant=out.tenant,
        )
    )
    if answer[0] == b"TENANT_CONFLICT":
        raise ApiError("TENANT_CONFLICT", f"merchant {merchant_id}")
    await raise_everywhere(redis, scripts, answer[1])
    return out, answer[0] == b"CREATED"


async def get(redis: Redis, merchant_id: str) -> MerchantOut:
    raw = await redis.hget(keys.MERCHANTS, merchant_id)
    if raw is None:
        raise ApiError("NOT_FOUND", f"merchant {merchant_id}")
    return MERCHANT.decode(raw)


async def tenant_of(redis: Redis, merchant_id: str) -> str | None:
    """The merchant's tenant, or None if there is no such merchant."""
    raw = await redis.hget(keys.MERCHANTS, merchant_id)
    return None if raw is None else MERCHANT.decode(raw).tenant
