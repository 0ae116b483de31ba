"""Registration, claims and vouchers (API.md: claims and vouchers)."""

from __future__ import annotations

import time
from collections.abc import Awaitable

import msgspec
from aiohttp import web

from issuer import applications, metrics, registrations, tenancy, vouchers
from issuer.auth import Verified
from issuer.claims import Claimed, Issued
from issuer.errors import ApiError
from issuer.http import (
    UNCOUNTED,
    Ctx,
    Route,
    count_outcome,
    encoded,
    error_response,
    path_id,
    reply,
)
from issuer.model import (
    ApplicationOut,
    ClaimIn,
    Id,
    RegistrationIn,
    RegistrationOut,
    VoucherList,
    VoucherOut,
    fits_user_id,
)


async def register(ctx: Ctx, request: web.Request, body: RegistrationIn) -> web.Response:
    verified: Verified = request["verified"]
    out, outcome = await registrations.register(
        ctx.scripts,
        ctx.campaigns,
        ctx.person_key,
        path_id(request, "campaign_id"),
        body,
        verified.key.id,
        time.time(),
    )
    # a replay answers as the first call did; the same person under a new request_id: 200
    return reply(out, 200 if outcome == "EXISTING" else 201, replay=outcome == "REPLAY")


def claim(
    ctx: Ctx, request: web.Request, campaign_id: str, body: ClaimIn, verified: Verified
) -> web.Response | Awaitable[web.Response]:
    """The surge's route, handed its path's campaign id and its signer by the endpoint
    (which reads the id once, for this and the request's line): a claim refused before the
    gate is answered here, in no coroutine, and its refusals are answered, not raised
    through the frames above it (an exception costs at each frame it passes, and most
    claims at 10:00 are refused); the rest is awaited by the caller. A campaign held in
    the cache was loaded by a valid id: its id is not checked again."""
    peek = ctx.campaigns.peek  # read, then called (Campaigns.peek)
    cached = peek(campaign_id)
    if cached is None:  # its id checked and the campaign loaded first, in the coroutine
        campaign_id = path_id(request, "campaign_id")
        return claimed(
            ctx,
            campaign_id,
            verified,
            ctx.claims.claim(campaign_id, body, verified, request.remote),
        )
    try:
        checked = ctx.claims.check(cached, body, verified)
    except ApiError as err:
        return refuse(ctx, campaign_id, verified, err)
    if isinstance(checked, ApiError):
        return refuse(ctx, campaign_id, verified, checked)
    submitted = ctx.claims.submit(cached, body, verified, request.remote, checked)
    return claimed(ctx, campaign_id, verified, submitted)


async def claimed(
    ctx: Ctx, campaign_id: str, verified: Verified, outcome: Awaitable[Claimed | ApiError]
) -> web.Response:
    """The answer to a claim that went to the gate, counted (a new voucher by its batch)."""
    try:
        answer = await outcome
    except ApiError as err:
        return refuse(ctx, campaign_id, verified, err)
    if isinstance(answer, ApiError):
        return refuse(ctx, campaign_id, verified, answer)
    out, replay = answer
    if isinstance(out, Issued):  # a new voucher, its answer encoded by its batch
        return encoded(out.body, 201)
    count_outcome(metrics.CLAIMS, campaign_id, "REPLAY" if replay else "OK")
    # an application to a lottery round is accepted, its outcome comes with the draw
    return reply(out, 202 if isinstance(out, ApplicationOut) else 201, replay=replay)


def refuse(ctx: Ctx, campaign_id: str, verified: Verified, err: ApiError) -> web.Response:
    """A refused claim's answer, counted as `count_outcome` counts, in this frame (most
    claims at 10:00 are refused)."""
    if err.code != UNCOUNTED:
        metrics.count(metrics.child(metrics.CLAIMS, campaign_id, err.code))
    refused = ctx.claims.refused  # read, then called (Campaigns.peek)
    return error_response(refused(campaign_id, verified, err))


async def get_voucher(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    voucher_id = request.match_info["voucher_id"]
    return reply(await vouchers.get(ctx.redis, ctx.campaigns, voucher_id))


async def user_vouchers(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    user_id = path_id(request, "user_id", fits_user_id)
    campaign_id = request.query.get("campaign_id")
    if campaign_id is not None:
        try:
            campaign_id = msgspec.convert(campaign_id, Id)
        except msgspec.ValidationError:
            raise ApiError("INVALID_REQUEST", "campaign_id: not a valid id") from None
    ids = await vouchers.campaign_ids(ctx.redis, campaign_id)
    tenants = tenancy.scope(request)
    if tenants is not None:  # only the key's tenants' campaigns
        ids = [c.keys.campaign_id async for c in ctx.campaigns.existing(ids) if c.tenant in tenants]
    found = await vouchers.of_user(ctx.redis, ctx.campaigns, user_id, ids)
    applied = await applications.of_user(ctx.redis, ctx.campaigns, user_id, ids)
    return reply(VoucherList(vouchers=found, applications=applied))


CLAIM_ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/campaigns/{campaign_id}/registrations",
        register,
        ("app",),
        "Register a person for a campaign",
        RegistrationIn,
        RegistrationOut,
        201,
        tenant=tenancy.CAMPAIGN,
    ),
    Route(
        "POST",
        "/v1/campaigns/{campaign_id}/claims",
        claim,
        ("app", "merchant"),
        "Claim a voucher (app key; merchant key in staff mode); in a lottery round's"
        " window, apply (202)",
        ClaimIn,
        VoucherOut,
        201,
        also=((202, ApplicationOut),),
        tenant=tenancy.CAMPAIGN,
    ),
    Route(
        "GET",
        "/v1/vouchers/{voucher_id}",
        get_voucher,
        ("app", "payment", "ops", "auditor"),
        "Read a voucher",
        None,
        VoucherOut,
        tenant=tenancy.path("campaign_of", "voucher_id"),
    ),
    Route(
        "GET",
        "/v1/users/{user_id}/vouchers",
        user_vouchers,
        ("app", "ops", "auditor"),
        "A user's vouchers",
        None,
        VoucherList,
        tenant=tenancy.LISTS,
    ),
)
