"""Campaign definitions in Redis, each worker's cached view of them, and the ops writes
(create/replace, pause/resume, round budget compare-and-set)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
from redis.asyncio import Redis

from issuer import idempotency, keys
from issuer.errors import ApiError, invalid_field
from issuer.geofence import Region, region_for
from issuer.ids import campaign_of
from issuer.model import (
    DEFAULT_TENANT,
    CampaignDef,
    CampaignOut,
    Ledger,
    Round,
    RoundBudgetIn,
    RoundState,
    StatusChangeIn,
    StoredCampaign,
)
from issuer.products import expand_categories
from issuer.protocol import CampaignPut, RoundBudget, RoundSettings, SetStatus
from issuer.schedule import Windows, expand_rounds, from_millis, to_millis
from issuer.scripts import Scripts

STORED = msgspec.json.Decoder(StoredCampaign)
ENCODE = msgspec.json.Encoder()
HINT_TTL_S = 1.0  # how long a worker trusts "sold out" / "paused" without asking Redis
# refusals of a round budget change that answer with the round's figures
BUDGET_REFUSALS = ("BUDGET_CONFLICT", "IDEMPOTENCY_MISMATCH")


@dataclass(frozen=True)
class Holders:
    """Who already holds a voucher: Redis would answer their requests with a replay or
    ALREADY_CLAIMED, so a worker never refuses them locally (`Claims.check`)."""

    count: int  # vouchers in the campaign when loaded
    requests: frozenset[str] = frozenset()  # idempotency fields of winning requests
    persons: frozenset[str] = frozenset()
    accounts: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Hint:
    """A refusal this worker may repeat without asking Redis, until `until`."""

    refusal: ApiError  # answered as it is, made once per code (`claims.refusal`)
    round_id: str
    until: float
    holders: Holders


@dataclass
class CachedCampaign:
    """One worker's view of a campaign: definition, parsed rounds and local hints. What
    the claim path reads of it is made once, when it is cached, as plain attributes: the
    interpreter cannot specialise the read of a name its class holds a descriptor for (a
    cached_property's value was read through the generic attribute path every time)."""

    stored: StoredCampaign
    version: str
    keys: keys.CampaignKeys
    region: Region
    hint: Hint | None = None
    arming: bool = False  # a hint is being prepared
    windows: Windows = field(init=False)
    # each round's NOT_OPEN refusal: the claim path returns it, never raises it (a raised
    # one would keep its traceback, and its frames, for good)
    not_open: list[ApiError] = field(init=False)
    tenant: str = field(init=False)  # fixed once the campaign exists (its tenant check)
    staff: bool = field(init=False)  # its claims made face to face, by merchant keys
    lottery: bool = field(init=False)  # a round drawn by lottery (claims check applicants)

    def __post_init__(self) -> None:
        rounds, definition = self.stored.rounds, self.stored.definition
        self.windows = Windows(rounds)
        self.not_open = [
            ApiError("NOT_OPEN", f"round {r.round_id} opens at {r.opens_at.isoformat()}")
            for r in rounds
        ]
        self.tenant = definition.tenant or DEFAULT_TENANT
        self.staff = definition.mode == "staff"
        self.lottery = any(r.allocation == "lottery" for r in rounds)

    @property
    def definition(self) -> CampaignDef:
        return self.stored.definition

    def round_at(self, now: float) -> Round | None:
        """The round whose claim window holds `now` (epoch s), else the next to open."""
        i = self.windows.at(now)
        return None if i is None else self.stored.rounds[i]


def round_settings(rnd: Round) -> RoundSettings:
    """A round hash's settings."""
    close = rnd.applications_close_at
    return RoundSettings(
        opens=to_millis(rnd.opens_at),
        closes=to_millis(rnd.closes_at),
        valid_until=to_millis(rnd.valid_until),
        quota=-1 if rnd.quota is None else rnd.quota,
        budget=-1 if rnd.budget_fen is None else rnd.budget_fen,
        apps_close=-1 if close is None else to_millis(close),
    )


class Campaigns:
    """Reads and writes campaigns; keeps the per-worker cache."""

    def __init__(self, redis: Redis, scripts: Scripts) -> None:
        self.redis = redis
        self.scripts = scripts
        self._cache: dict[str, CachedCampaign] = {}
        self._loading: dict[str, asyncio.Future[CachedCampaign]] = {}
        # the cached campaign, if cached: the cache's own get, called in C (the claim path's
        # hit, twice per claim: its tenant, then its checks). The claim path reads it, then
        # calls it: `campaigns.peek(x)` is looked up as a method, which the interpreter does
        # not specialise for an instance's attribute (~130 instructions more a call); read
        # as an attribute, it is (as `Claims.refused` and `Claims.person_ref`)
        self.peek: Callable[[str], CachedCampaign | None] = self._cache.get

    # ------------------------------------------------------------ reads

    async def load(self, campaign_id: str) -> CachedCampaign:
        """The campaign from Redis (refreshing the cache), or NOT_FOUND."""
        ck = keys.CampaignKeys(campaign_id)
        raw, version = await self._read_definition(ck)
        if raw is None:
            self._cache.pop(campaign_id, None)
            raise ApiError("NOT_FOUND", f"campaign {campaign_id}")
        stored = STORED.decode(raw)
        if stored.definition.tenant is None:  # stored before tenants existed
            stored.definition = msgspec.structs.replace(stored.definition, tenant=DEFAULT_TENANT)
        geo = stored.definition.geofence
        cached = CachedCampaign(
            stored=stored,
            version=version,
            keys=ck,
            region=region_for(tuple(geo.region_codes), geo.polygons_file),
        )
        self._cache[campaign_id] = cached
        return cached

    async def cached(self, campaign_id: str) -> CachedCampaign:
        """The cached campaign; on a miss, one load serves every waiting request."""
        hit = self._cache.get(campaign_id)
        if hit is not None:
            return hit
        loading = self._loading.get(campaign_id)
        if loading is None:
            loading = asyncio.ensure_future(self.load(campaign_id))
            self._loading[campaign_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(campaign_id, None))
        return await asyncio.shield(loading)

    async def of_entity(self, entity_id: str, what: str) -> CachedCampaign:
        """The campaign of one of its vouchers, applications, redemptions or refunds (its
        id starts with the campaign's); NOT_FOUND naming `what` if there is none."""
        try:
            return await self.cached(campaign_of(entity_id, what))
        except ApiError:
            raise ApiError("NOT_FOUND", f"{what} {entity_id}") from None

    async def existing(self, campaign_ids: Iterable[str]) -> AsyncIterator[CachedCampaign]:
        """Those of these campaigns that exist."""
        for campaign_id in campaign_ids:
            try:
                yield await self.cached(campaign_id)
            except ApiError:
                continue

    def forget(self, campaign_id: str) -> None:
        self._cache.pop(campaign_id, None)

    def note_version(self, campaign_id: str, version: str) -> bool:
        """True if Redis reports a newer definition than the cached one."""
        hit = self._cache.get(campaign_id)
        return hit is not None and hit.version != version

    async def _read_definition(self, ck: keys.CampaignKeys) -> tuple[bytes | None, str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(ck.definition)
            pipe.hget(ck.ledger, "version")
            raw, version = await pipe.execute()
        return raw, (version or b"0").decode()

    async def describe(self, campaign_id: str, now: datetime) -> CampaignOut:
        """The campaign as Redis holds it now (its definition reloaded into the cache)."""
        return await self.live_state(await self.load(campaign_id), now)

    async def live_state(self, cached: CachedCampaign, now: datetime) -> CampaignOut:
        """`cached`'s definition with its ledger and current round read from Redis."""
        ck = cached.keys
        current = cached.round_at(now.timestamp())
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(ck.ledger)
            if current is not None:
                pipe.hgetall(ck.round(current.round_id))
            results = await pipe.execute()
        led = {k.decode(): v.decode() for k, v in results[0].items()}
        tz = cached.definition.timezone
        round_state = None
        if current is not None:
            rnd = {k.decode(): int(v) for k, v in results[1].items()}
            round_state = round_state_of(current.round_id, rnd, tz)
        return CampaignOut(
            campaign_id=ck.campaign_id,
            definition=cached.definition,
            status=led.get("status", "unknown"),
            ledger=Ledger(
                budget_fen=int(led["budget"]),
                available_fen=int(led["available"]),
                reserved_fen=int(led["reserved"]),
                spent_fen=int(led["spent"]),
                clawback_due_fen=int(led["clawback_due"]),
                adjustments_fen=int(led["adjustments"]),
            ),
            current_round=round_state,
            rounds_total=len(cached.stored.rounds),
        )

    # ------------------------------------------------------------ writes

    async def put(self, campaign_id: str, definition: CampaignDef) -> bool:
        """Create or replace a campaign that has not opened; True if it was new. Its tenant
        is fixed: another one is TENANT_CONFLICT; none keeps the campaign's (a new one:
        DEFAULT_TENANT)."""
        fence = definition.geofence
        with invalid_field("eligibility.categories"):
            expand_categories(definition.eligibility.categories)
        with invalid_field("geofence.polygons_file"):
            region_for(tuple(fence.region_codes), fence.polygons_file)
        with invalid_field("rounds"):
            rounds = expand_rounds(definition)
        if not rounds:
            raise ApiError("INVALID_REQUEST", "rounds: the campaign has no round")
        ck = keys.CampaignKeys(campaign_id)
        # the registry lives in the global slot: listed first, so whatever reads it (the
        # flusher, the sweeps) never misses a campaign that exists
        await self.redis.sadd(keys.CAMPAIGNS, campaign_id)
        for _ in range(5):  # retried only if another writer changed it in between
            raw, version = await self._read_definition(ck)
            old = STORED.decode(raw) if raw else None
            old_rounds = old.rounds if old else []
            tenant = (old.definition.tenant if old else None) or DEFAULT_TENANT
            if old and definition.tenant not in (None, tenant):
                raise ApiError("TENANT_CONFLICT", f"campaign {campaign_id}")
            fixed = msgspec.structs.replace(definition, tenant=definition.tenant or tenant)
            stored = StoredCampaign(campaign_id=campaign_id, definition=fixed, rounds=rounds)
            put = CampaignPut(
                definition=ck.definition,
                ledger=ck.ledger,
                events=ck.events,
                new_rounds=[ck.round(r.round_id) for r in rounds],
                old_rounds=[ck.round(r.round_id) for r in old_rounds],
                stored_campaign=ENCODE.encode(stored),
                budget_fen=definition.budget_fen,
                expected_version=version if raw else "",
                rounds=[round_settings(r) for r in rounds],
            )
            code, _ = await self.scripts.run(put)
            if code == b"OK":
                self._cache.pop(campaign_id, None)
                return raw is None
            if code == b"CAMPAIGN_RUNNING":
                raise ApiError(
                    "CAMPAIGN_RUNNING", "use pause, resume or the round budget call instead"
                )
        raise ApiError("UNAVAILABLE", "campaign changed concurrently, retry")

    async def set_status(
        self, campaign_id: str, body: StatusChangeIn, key_id: str, status: str, now_s: float
    ) -> tuple[str, bool]:
        """Pause or resume; returns (status, replayed)."""
        ck = keys.CampaignKeys(campaign_id)
        event = ENCODE.encode({"by": key_id, "reason": body.reason, "status": status})
        change = SetStatus(
            request=idempotency.request(ck, now_s, key_id, body.request_id, (status, body)),
            ledger=ck.ledger,
            events=ck.events,
            status=status,
            event=event,
        )
        answer = await idempotency.write(self.scripts, change)
        hit = self._cache.get(campaign_id)
        if hit is not None:
            hit.hint = None
        # a replay answers the status its first call set
        return answer.payload[0].decode(), answer.replayed

    async def set_round_budget(
        self, campaign_id: str, round_id: str, body: RoundBudgetIn, key_id: str, now_s: float
    ) -> tuple[list[int], bool]:
        """Compare-and-set; returns ([budget, quota, issued, reserved], replayed)."""
        cached = await self.cached(campaign_id)
        ck = cached.keys
        event = ENCODE.encode({"by": key_id, "round_id": round_id, "request": body})
        expected = body.expected_budget_fen
        change = RoundBudget(
            request=idempotency.request(ck, now_s, key_id, body.request_id, (round_id, body)),
            ledger=ck.ledger,
            round=ck.round(round_id),
            events=ck.events,
            expected_budget_fen=-1 if expected is None else expected,
            budget_fen=body.budget_fen,
            quota="" if body.quota is None else body.quota,
            event=event,
        )
        answer = await idempotency.write(
            self.scripts, change, f"round {round_id}", (*idempotency.OK_OR_REPLAY, *BUDGET_REFUSALS)
        )
        budget, quota, issued, reserved = (int(x) for x in answer.payload)
        if answer.code in BUDGET_REFUSALS:
            raise ApiError(
                answer.code, f"round holds {reserved} fen in {issued} vouchers, budget is {budget}"
            )
        cached.hint = None
        return [budget, quota, issued, reserved], answer.replayed


async def hash_keys(redis: Redis, key: str) -> set[str]:
    """Field names of a hash, read with HSCAN so a big hash never blocks Redis."""
    return {k.decode() async for k in redis.hscan_iter(key, count=1000, no_values=True)}


async def read_record(redis: Redis, key: str, field: str, what: str) -> bytes:
    """A record of hash `key`; NOT_FOUND naming `what` if it holds none."""
    raw: bytes | None = await redis.hget(key, field)
    if raw is None:
        raise ApiError("NOT_FOUND", f"{what} {field}")
    return raw


def round_state_of(round_id: str, rnd: dict[str, int], tz: str) -> RoundState:
    return RoundState(
        round_id=round_id,
        opens_at=from_millis(rnd["opens"], tz),
        closes_at=from_millis(rnd["closes"], tz),
        valid_until=from_millis(rnd["valid_until"], tz),
        issued=rnd["issued"],
        quota=None if rnd["quota"] < 0 else rnd["quota"],
        reserved_fen=rnd["reserved"],
        spent_fen=rnd.get("spent", 0),
        overdrawn_fen=rnd.get("overdrawn", 0),
        budget_fen=None if rnd["budget"] < 0 else rnd["budget"],
    )
