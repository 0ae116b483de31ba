"""Campaigns, merchants and the ops overview (API.md: operations)."""

from __future__ import annotations

import contextlib
import logging
import time

import asyncpg
import msgspec
from aiohttp import web

from issuer import due_dates, gauges, merchants, metrics, tenancy
from issuer.auth import Verified
from issuer.errors import ApiError
from issuer.http import Ctx, Route, now, path_id, reply
from issuer.model import (
    DEFAULT_TENANT,
    CampaignDef,
    CampaignLive,
    CampaignOut,
    MerchantDef,
    MerchantOut,
    OpsOverview,
    ProvisionalDueDates,
    RoundBudgetIn,
    StatusChangeIn,
)

log = logging.getLogger("issuer.api")


class StatusOut(msgspec.Struct, kw_only=True):
    campaign_id: str
    status: str


class RoundBudgetOut(msgspec.Struct, kw_only=True):
    campaign_id: str
    round_id: str
    budget_fen: int
    quota: int | None
    issued: int
    reserved_fen: int


async def put_campaign(ctx: Ctx, request: web.Request, body: CampaignDef) -> web.Response:
    campaign_id = path_id(request, "campaign_id")
    created = await ctx.campaigns.put(campaign_id, body)
    out = await ctx.campaigns.describe(campaign_id, now())
    return reply(out, 201 if created else 200)


async def get_campaign(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    return reply(await ctx.campaigns.describe(path_id(request, "campaign_id"), now()))


async def _set_status(
    ctx: Ctx, request: web.Request, body: StatusChangeIn, status: str
) -> web.Response:
    campaign_id = path_id(request, "campaign_id")
    verified: Verified = request["verified"]
    new_status, replay = await ctx.campaigns.set_status(
        campaign_id, body, verified.key.id, status, time.time()
    )
    log.info(
        "campaign status",
        extra={"campaign": campaign_id, "status": new_status, "by": verified.key.id},
    )
    return reply(StatusOut(campaign_id=campaign_id, status=new_status), replay=replay)


async def pause(ctx: Ctx, request: web.Request, body: StatusChangeIn) -> web.Response:
    return await _set_status(ctx, request, body, "paused")


async def resume(ctx: Ctx, request: web.Request, body: StatusChangeIn) -> web.Response:
    return await _set_status(ctx, request, body, "active")


async def round_budget(ctx: Ctx, request: web.Request, body: RoundBudgetIn) -> web.Response:
    campaign_id = path_id(request, "campaign_id")
    round_id = path_id(request, "round_id")
    verified: Verified = request["verified"]
    (budget, quota, issued, reserved), replay = await ctx.campaigns.set_round_budget(
        campaign_id, round_id, body, verified.key.id, time.time()
    )
    out = RoundBudgetOut(
        campaign_id=campaign_id,
        round_id=round_id,
        budget_fen=budget,
        quota=None if quota < 0 else quota,
        issued=issued,
        reserved_fen=reserved,
    )
    return reply(out, replay=replay)


async def put_merchant(ctx: Ctx, request: web.Request, body: MerchantDef) -> web.Response:
    out, created = await merchants.put(
        ctx.redis, ctx.scripts, path_id(request, "merchant_id"), body
    )
    return reply(out, 201 if created else 200)


async def get_merchant(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    merchant_id = path_id(request, "merchant_id")
    verified: Verified = request["verified"]
    if verified.key.role == "merchant" and verified.key.merchant_id != merchant_id:
        raise ApiError("FORBIDDEN", "a merchant key reads only its own merchant")
    return reply(await merchants.get(ctx.redis, merchant_id))


async def ops_overview(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    """Every campaign's live ledger, current round and claims by outcome (the /ops page),
    of the key's tenants."""
    tenants = tenancy.scope(request)
    counts = metrics.claim_counts()
    states = [
        c
        for c in await gauges.campaigns(ctx.redis, ctx.campaigns)
        if tenants is None or c.definition.tenant in tenants
    ]
    live = [
        CampaignLive(
            campaign_id=c.campaign_id,
            name=c.definition.name,
            tenant=c.definition.tenant or DEFAULT_TENANT,
            status=c.status,
            ledger=c.ledger,
            current_round=c.current_round,
            claims=counts.get(c.campaign_id, {}),
        )
        for c in states
    ]
    due = await provisional_due_dates(ctx, tenants)
    return reply(OpsOverview(generated_at=now(), campaigns=live, due_dates=due))


async def provisional_due_dates(
    ctx: Ctx, tenants: frozenset[str] | None = None
) -> ProvisionalDueDates | None:
    """The provisional due dates (of these tenants; None: all), or None while PostgreSQL
    does not answer."""
    if ctx.pg is None:
        return None
    with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return await due_dates.provisional(ctx.pg, tenants)
    return None


OPS_ROUTES: tuple[Route, ...] = (
    Route(
        "PUT",
        "/v1/campaigns/{campaign_id}",
        put_campaign,
        ("ops",),
        "Create or replace a campaign before it opens",
        CampaignDef,
        CampaignOut,
        201,
        tenant=tenancy.defines("campaign", "campaign_id"),
    ),
    Route(
        "GET",
        "/v1/campaigns/{campaign_id}",
        get_campaign,
        ("ops", "auditor"),
        "Definition, live ledger and current round",
        None,
        CampaignOut,
        tenant=tenancy.CAMPAIGN,
    ),
    Route(
        "POST",
        "/v1/campaigns/{campaign_id}/pause",
        pause,
        ("ops",),
        "Pause claims",
        StatusChangeIn,
        StatusOut,
        tenant=tenancy.CAMPAIGN,
    ),
    Route(
        "POST",
        "/v1/campaigns/{campaign_id}/resume",
        resume,
        ("ops",),
        "Resume claims",
        StatusChangeIn,
        StatusOut,
        tenant=tenancy.CAMPAIGN,
    ),
    Route(
        "POST",
        "/v1/campaigns/{campaign_id}/rounds/{round_id}/budget",
        round_budget,
        ("ops",),
        "Compare-and-set a round's budget",
        RoundBudgetIn,
        RoundBudgetOut,
        tenant=tenancy.CAMPAIGN,
    ),
    Route(
        "PUT",
        "/v1/merchants/{merchant_id}",
        put_merchant,
        ("ops",),
        "Create or replace a merchant",
        MerchantDef,
        MerchantOut,
        201,
        tenant=tenancy.defines("merchant", "merchant_id"),
    ),
    Route(
        "GET",
        "/v1/merchants/{merchant_id}",
        get_merchant,
        ("ops", "auditor", "payment", "merchant"),
        "Read a merchant",
        None,
        MerchantOut,
        tenant=tenancy.MERCHANT,
    ),
    Route(
        "GET",
        "/v1/ops/overview",
        ops_overview,
        ("ops",),
        "Every campaign's live ledger, current round and claims by outcome (the /ops page)",
        None,
        OpsOverview,
        tenant=tenancy.LISTS,
    ),
)
