"""The reviewer's reads and the merchant risk report (API.md v1.2)."""

from __future__ import annotations

from aiohttp import web

from issuer import review, risk, tenancy
from issuer.auth import Role
from issuer.documents import MAGIC_TYPES
from issuer.http import CONTENT_TYPES, Ctx, Route, attachment, now, path_id, postgres, reply
from issuer.model import (
    AuditLog,
    AuditQuery,
    DisbursementList,
    DisbursementOut,
    DisbursementQuery,
    SettlementOut,
    fits_sha256,
)

READERS: tuple[Role, ...] = ("auditor", "merchant", "ops")  # ops read only; merchant its own


async def get_settlement(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    rid = request.match_info["redemption_id"]
    return reply(await review.record(postgres(ctx), rid, request["verified"].key))


async def settlement_file(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    """The bytes as uploaded, typed by what they were found to be, shown in the browser."""
    rid = request.match_info["redemption_id"]
    sha256 = path_id(request, "sha256", fits_sha256)
    stored, data = await review.file(
        postgres(ctx), ctx.settlement.store, rid, sha256, request["verified"].key
    )
    extension = stored.content_type.rpartition("/")[2]
    return web.Response(
        body=data,
        headers={
            "Content-Type": stored.content_type,
            "Content-Disposition": f'inline; filename="{stored.part}-{sha256[:12]}.{extension}"',
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",  # papers hold personal data
        },
    )


async def list_disbursements(
    ctx: Ctx, request: web.Request, query: DisbursementQuery
) -> web.Response:
    batches = await review.disbursements(
        postgres(ctx), query, request["verified"].key, tenancy.scope(request)
    )
    return reply(DisbursementList(disbursements=batches))


async def get_disbursement(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    batch_id = path_id(request, "disbursement_id")
    return reply(await review.disbursement(postgres(ctx), batch_id, request["verified"].key))


async def audit_log(ctx: Ctx, request: web.Request, query: AuditQuery) -> web.Response:
    return reply(await review.audit_log(postgres(ctx), query, tenancy.scope(request)))


async def risk_report(ctx: Ctx, request: web.Request, query: risk.RiskQuery) -> web.Response:
    cached = await ctx.campaigns.cached(path_id(request, "campaign_id"))
    campaign_id = cached.keys.campaign_id
    out = await risk.build(postgres(ctx), campaign_id, now())
    if query.format == "json":
        return reply(out)
    return attachment(risk.risk_csv(out), "csv", f"{campaign_id}-risk.csv")


REVIEW_ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/settlements/{redemption_id}",
        get_settlement,
        READERS,
        "One settlement record as in the list, with its order, items and voucher (from"
        " PostgreSQL); a merchant key: its own",
        None,
        SettlementOut,
        tenant=tenancy.path("campaign_of", "redemption_id"),
    ),
    Route(
        "GET",
        "/v1/settlements/{redemption_id}/files/{sha256}",
        settlement_file,
        READERS,
        "A file of the record: its bytes, typed by their first bytes, Content-Disposition"
        " inline; 404 for a file not on that record",
        None,
        bytes,
        files=MAGIC_TYPES,
        tenant=tenancy.path("campaign_of", "redemption_id"),
    ),
    Route(
        "GET",
        "/v1/disbursements",
        list_disbursements,
        READERS,
        "Disbursement batches with their records, newest first (status pending or paid)",
        None,
        DisbursementList,
        query=DisbursementQuery,
        tenant=tenancy.LISTS,
    ),
    Route(
        "GET",
        "/v1/disbursements/{disbursement_id}",
        get_disbursement,
        READERS,
        "One disbursement batch with its records",
        None,
        DisbursementOut,
        tenant=tenancy.path("disbursement", "disbursement_id"),
    ),
    Route(
        "GET",
        "/v1/audit-log",
        audit_log,
        ("auditor",),
        "The audit log, oldest first, paged by after=entry_id; a redemption's log holds its"
        " batch's entries too",
        None,
        AuditLog,
        query=AuditQuery,
        tenant=tenancy.LISTS,
    ),
    Route(
        "GET",
        "/v1/campaigns/{campaign_id}/risk",
        risk_report,
        ("auditor", "ops"),
        f"Merchant risk signals, highest score first; {risk.SCORE}",
        None,
        risk.RiskOut,
        query=risk.RiskQuery,
        files=(CONTENT_TYPES["csv"],),
        tenant=tenancy.CAMPAIGN,
    ),
)
