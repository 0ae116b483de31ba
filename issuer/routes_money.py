"""Redemptions, refunds and clawbacks (API.md: the money path)."""

from __future__ import annotations

import time

from aiohttp import web

from issuer import metrics, tenancy
from issuer.auth import Verified
from issuer.errors import ApiError
from issuer.http import Ctx, Route, counted, reply
from issuer.ids import campaign_prefix
from issuer.model import RedemptionIn, RedemptionOut, RefundIn, RefundOut, RepaidIn


async def redeem(ctx: Ctx, request: web.Request, body: RedemptionIn) -> web.Response:
    verified: Verified = request["verified"]
    campaign_id = campaign_prefix(body.voucher_id) or "-"
    redeemed = ctx.redemptions.redeem(body, verified, time.time())
    out, replay = await counted(metrics.REDEMPTIONS, campaign_id, redeemed)
    return reply(out, 201, replay=replay)


async def get_redemption(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    out = await ctx.redemptions.get(request.match_info["redemption_id"])
    verified: Verified = request["verified"]
    if verified.key.role == "merchant" and verified.key.merchant_id != out.merchant_id:
        raise ApiError("FORBIDDEN", "a merchant key reads only its own redemptions")
    return reply(out)


async def refund(ctx: Ctx, request: web.Request, body: RefundIn) -> web.Response:
    verified: Verified = request["verified"]
    redemption_id = request.match_info["redemption_id"]
    campaign_id = campaign_prefix(redemption_id) or "-"
    refunded = ctx.redemptions.refund(redemption_id, body, verified.key.id, time.time())
    out, replay = await counted(metrics.REFUNDS, campaign_id, refunded)
    return reply(out, 201, replay=replay)


async def clawback_repaid(ctx: Ctx, request: web.Request, body: RepaidIn) -> web.Response:
    verified: Verified = request["verified"]
    out, replay = await ctx.redemptions.clawback_repaid(
        request.match_info["refund_id"], body, verified.key.id, time.time()
    )
    return reply(out, replay=replay)


MONEY_ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/redemptions",
        redeem,
        ("payment",),
        "Apply a voucher to a payment",
        RedemptionIn,
        RedemptionOut,
        201,
        tenant=tenancy.body(("campaign_of", "voucher_id"), ("merchant", "merchant_id")),
    ),
    Route(
        "GET",
        "/v1/redemptions/{redemption_id}",
        get_redemption,
        ("payment", "merchant", "auditor", "ops"),
        "Read a redemption (a merchant key: its own)",
        None,
        RedemptionOut,
        tenant=tenancy.path("campaign_of", "redemption_id"),
    ),
    Route(
        "POST",
        "/v1/redemptions/{redemption_id}/refunds",
        refund,
        ("payment",),
        "Refund (part of) a redeemed order; the voucher is not given back",
        RefundIn,
        RefundOut,
        201,
        tenant=tenancy.path("campaign_of", "redemption_id"),
    ),
    Route(
        "POST",
        "/v1/clawbacks/{refund_id}/repaid",
        clawback_repaid,
        ("auditor",),
        "A merchant paid back the subsidy of a refund made after reimbursement",
        RepaidIn,
        RefundOut,
        tenant=tenancy.path("campaign_of", "refund_id"),
    ),
)
