"""Evidence, audit decisions, disbursements and reports (API.md: settlement and reports)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from issuer import reports, tenancy
from issuer.auth import ApiKey
from issuer.http import (
    CONTENT_TYPES,
    Ctx,
    Route,
    attachment,
    now,
    path_id,
    postgres,
    reply,
    stored_reply,
)
from issuer.model import (
    DecisionIn,
    DisbursementIn,
    DisbursementList,
    DisbursementOut,
    PaidIn,
    SettlementList,
    SettlementOut,
    SettlementQuery,
)


async def upload_documents(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    out = await ctx.settlement.submit(
        request.match_info["redemption_id"],
        request["verified"].key,
        request.headers.get("Content-Type", ""),
        request["raw_body"],
    )
    return reply(out, 201)


async def list_settlements(ctx: Ctx, request: web.Request, query: SettlementQuery) -> web.Response:
    key: ApiKey = request["verified"].key
    if key.role == "merchant":
        query = msgspec.structs.replace(query, merchant_id=key.merchant_id)
    found = await ctx.settlement.queue(query, tenancy.scope(request))
    return reply(SettlementList(settlements=found))


async def decide(ctx: Ctx, request: web.Request, body: DecisionIn) -> web.Response:
    redemption_id = request.match_info["redemption_id"]
    key: ApiKey = request["verified"].key
    return stored_reply(await ctx.settlement.decide(redemption_id, body, key))


async def disburse(ctx: Ctx, request: web.Request, body: DisbursementIn) -> web.Response:
    return stored_reply(await ctx.settlement.disburse(body, request["verified"].key))


async def disbursement_paid(ctx: Ctx, request: web.Request, body: PaidIn) -> web.Response:
    disbursement_id = path_id(request, "disbursement_id")
    return stored_reply(await ctx.settlement.paid(disbursement_id, body, request["verified"].key))


async def report(ctx: Ctx, request: web.Request, query: reports.ReportQuery) -> web.Response:
    cached = await ctx.campaigns.cached(path_id(request, "campaign_id"))
    campaign_id = cached.keys.campaign_id
    out = await reports.build_report(
        postgres(ctx), campaign_id, query.by, cached.definition.timezone, now()
    )
    if query.format == "json":
        return reply(out)
    render = reports.report_csv if query.format == "csv" else reports.report_xlsx
    name = f"{campaign_id}-report-{query.by}.{query.format}"
    return attachment(render(out), query.format, name)


async def reconciliation(
    ctx: Ctx, request: web.Request, query: reports.ReconciliationQuery
) -> web.Response:
    """The day's redemptions and refunds as CSV; its SHA-256 in `X-Content-SHA256`."""
    cached = await ctx.campaigns.cached(path_id(request, "campaign_id"))
    campaign_id = cached.keys.campaign_id
    body = await reports.reconciliation_file(
        postgres(ctx), campaign_id, query.date, cached.definition.timezone
    )
    return attachment(body, "csv", f"{campaign_id}-{query.date.isoformat()}.csv")


SETTLEMENT_ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/redemptions/{redemption_id}/documents",
        upload_documents,
        ("merchant",),
        "Upload a redemption's reimbursement documents (multipart/form-data: confirmation,"
        " invoice, payment_proof, photo, energy_label, meta JSON); runs the checks",
        None,
        SettlementOut,
        201,
        tenant=tenancy.path("campaign_of", "redemption_id"),
    ),
    Route(
        "GET",
        "/v1/settlements",
        list_settlements,
        ("auditor", "merchant"),
        "Submissions by status (a merchant key: its own)",
        None,
        SettlementList,
        query=SettlementQuery,
        tenant=tenancy.LISTS,
    ),
    Route(
        "POST",
        "/v1/settlements/{redemption_id}/decision",
        decide,
        ("auditor",),
        "Approve or reject a submission (override_reason to approve one that failed a check)",
        DecisionIn,
        SettlementOut,
        tenant=tenancy.path("campaign_of", "redemption_id"),
    ),
    Route(
        "POST",
        "/v1/disbursements",
        disburse,
        ("auditor",),
        "Batch approved, unpaid records per merchant, due 30 working days after approval",
        DisbursementIn,
        DisbursementList,
        201,
        tenant=tenancy.body(("merchant", "merchant_id"), lists=True),
    ),
    Route(
        "POST",
        "/v1/disbursements/{disbursement_id}/paid",
        disbursement_paid,
        ("auditor",),
        "Record a batch as paid; later refunds of its redemptions become clawbacks",
        PaidIn,
        DisbursementOut,
        tenant=tenancy.path("disbursement", "disbursement_id"),
    ),
    Route(
        "GET",
        "/v1/campaigns/{campaign_id}/report",
        report,
        ("ops", "auditor"),
        "Issued, redeemed and refunded figures by total, round, day, merchant or category",
        None,
        reports.ReportOut,
        query=reports.ReportQuery,
        files=(CONTENT_TYPES["csv"], CONTENT_TYPES["xlsx"]),
        tenant=tenancy.CAMPAIGN,
    ),
    Route(
        "GET",
        "/v1/campaigns/{campaign_id}/reconciliation",
        reconciliation,
        ("ops", "auditor"),
        "The day's redemptions and refunds as CSV, with its SHA-256",
        None,
        bytes,
        query=reports.ReconciliationQuery,
        files=(CONTENT_TYPES["csv"],),
        tenant=tenancy.CAMPAIGN,
    ),
)
