"""Lottery rounds: applications and the draw (API.md Additions v1.1, "Lottery rounds").
Applying is the claim call itself (issuer/routes_claims.py)."""

from __future__ import annotations

import logging

from aiohttp import web

from issuer import applications, draws, tenancy
from issuer.auth import Verified
from issuer.draw_rules import DrawDocument
from issuer.http import Ctx, Route, path_id, reply
from issuer.model import ApplicationOut, DrawIn, DrawOut

log = logging.getLogger("issuer.api")


async def get_application(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    application_id = request.match_info["application_id"]
    return reply(await applications.get(ctx.redis, ctx.campaigns, application_id))


async def run_draw(ctx: Ctx, request: web.Request, body: DrawIn) -> web.Response:
    """Draw the round with the revealed seed; called again, it finishes or repeats the
    same draw."""
    campaign_id = path_id(request, "campaign_id")
    round_id = path_id(request, "round_id")
    out = await draws.draw(ctx.redis, ctx.scripts, ctx.campaigns, campaign_id, round_id, body.seed)
    verified: Verified = request["verified"]
    log.info(
        "draw",
        extra={
            "campaign": campaign_id,
            "round": round_id,
            "winners": out.winners,
            "applications": out.applications,
            "by": verified.key.id,
        },
    )
    return reply(out)


async def get_draw(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    campaign_id = path_id(request, "campaign_id")
    round_id = path_id(request, "round_id")
    return reply(await draws.document(ctx.redis, ctx.campaigns, campaign_id, round_id))


DRAW_PATH = "/v1/campaigns/{campaign_id}/rounds/{round_id}/draw"

LOTTERY_ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/applications/{application_id}",
        get_application,
        ("app", "ops", "auditor"),
        "Read an application to a lottery round",
        None,
        ApplicationOut,
        tenant=tenancy.path("campaign_of", "application_id"),
    ),
    Route(
        "POST",
        DRAW_PATH,
        run_draw,
        ("ops",),
        "Draw a lottery round with the seed of its commitment (idempotent)",
        DrawIn,
        DrawOut,
        tenant=tenancy.CAMPAIGN,
    ),
    Route(
        "GET",
        DRAW_PATH,
        get_draw,
        ("app", "merchant", "payment", "auditor", "ops"),
        "The published draw: commitment, root, every application ref, rank and outcome",
        None,
        DrawDocument,
        tenant=tenancy.CAMPAIGN,
    ),
)
