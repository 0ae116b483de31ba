"""HTTP routes of API.md, the middlewares that sign-check and shape errors, and the app."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

import asyncpg
import msgspec
from aiohttp import web
from redis.asyncio import Redis

from issuer import (
    documents,
    due_dates,
    gauges,
    keys,
    merchants,
    metrics,
    registrations,
    reports,
    topology,
    vouchers,
)
from issuer.admission import Admission
from issuer.auth import ApiKey, Role, Verified, require_role, verify
from issuer.campaigns import Campaigns
from issuer.claims import Claims
from issuer.config import Settings
from issuer.errors import ApiError, GateRefusal
from issuer.ids import campaign_prefix
from issuer.model import (
    CampaignDef,
    CampaignLive,
    CampaignOut,
    ClaimIn,
    DecisionIn,
    DisbursementIn,
    DisbursementList,
    DisbursementOut,
    Id,
    MerchantDef,
    MerchantOut,
    OpsOverview,
    PaidIn,
    ProvisionalDueDates,
    RedemptionIn,
    RedemptionOut,
    RefundIn,
    RefundOut,
    RegistrationIn,
    RegistrationOut,
    RepaidIn,
    RoundBudgetIn,
    SettlementList,
    SettlementOut,
    SettlementQuery,
    StatusChangeIn,
    UserId,
    VoucherList,
    VoucherOut,
)
from issuer.redemptions import Redemptions
from issuer.scripts import Scripts
from issuer.settlement import Settlement

log = logging.getLogger("issuer.api")
MAX_BODY = 64 * 1024
JSON = "application/json"
ENCODER = msgspec.json.Encoder()
Handler = Callable[["Ctx", web.Request, Any], Awaitable[web.Response]]


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


@dataclass
class Ctx:
    """What every handler may use; one per worker process."""

    settings: Settings
    redis: Redis
    pg: asyncpg.Pool | None
    scripts: Scripts
    campaigns: Campaigns
    claims: Claims
    redemptions: Redemptions
    settlement: Settlement
    keys: dict[str, ApiKey]
    person_key: bytes
    admission: Admission


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    roles: tuple[Role, ...]
    summary: str
    body: type | None
    response: type
    status: int = 200
    query: type | None = None  # a Struct of the query string, passed as the handler's body
    files: tuple[str, ...] = ()  # media types answered as a download (response bytes: only)


def reply(payload: Any, status: int = 200, *, replay: bool = False) -> web.Response:
    headers = {"Idempotent-Replay": "true"} if replay else None
    return web.Response(
        body=ENCODER.encode(payload), status=status, content_type=JSON, headers=headers
    )


def error_response(err: ApiError) -> web.Response:
    return web.Response(
        body=ENCODER.encode(err.envelope()),
        status=err.status,
        content_type=JSON,
        headers=err.headers(),
    )


def path_id(request: web.Request, name: str, pattern: type = Id) -> str:
    value = request.match_info[name]
    try:
        return str(msgspec.convert(value, pattern))
    except msgspec.ValidationError:
        raise ApiError("INVALID_REQUEST", f"{name}: not a valid id") from None


def now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------ handlers


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
    out, created = await merchants.put(ctx.scripts, path_id(request, "merchant_id"), body)
    return reply(out, 201 if created else 200)


async def get_merchant(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    merchant_id = path_id(request, "merchant_id")
    verified: Verified = request["verified"]
    if verified.key.role == "merchant" and verified.key.merchant_id != merchant_id:
        raise ApiError("FORBIDDEN", "a merchant key reads only its own merchant")
    return reply(await merchants.get(ctx.redis, merchant_id))


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


async def claim(ctx: Ctx, request: web.Request, body: ClaimIn) -> web.Response:
    campaign_id = path_id(request, "campaign_id")
    try:
        voucher, replay = await ctx.claims.claim(
            campaign_id, body, request["verified"], request.remote
        )
    except ApiError as err:
        if err.code != "NOT_FOUND":  # no series for ids that name no campaign
            metrics.child(metrics.CLAIMS, campaign_id, err.code).inc()
        raise
    metrics.child(metrics.CLAIMS, campaign_id, "REPLAY" if replay else "OK").inc()
    return reply(voucher, 201, replay=replay)


async def get_voucher(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    voucher_id = request.match_info["voucher_id"]
    return reply(await vouchers.get(ctx.redis, ctx.campaigns, voucher_id))


async def user_vouchers(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    user_id = path_id(request, "user_id", UserId)
    campaign_id = request.query.get("campaign_id")
    if campaign_id is not None:
        try:
            campaign_id = msgspec.convert(campaign_id, Id)
        except msgspec.ValidationError:
            raise ApiError("INVALID_REQUEST", "campaign_id: not a valid id") from None
    found = await vouchers.of_user(ctx.redis, ctx.campaigns, user_id, campaign_id)
    return reply(VoucherList(vouchers=found))


def _count(metric: Any, campaign_id: str, code: str) -> None:
    metrics.child(metric, campaign_id, code).inc()


async def redeem(ctx: Ctx, request: web.Request, body: RedemptionIn) -> web.Response:
    verified: Verified = request["verified"]
    campaign_id = campaign_prefix(body.voucher_id) or "-"
    try:
        out, replay = await ctx.redemptions.redeem(body, verified.key.id, time.time())
    except ApiError as err:
        if err.code != "NOT_FOUND":
            _count(metrics.REDEMPTIONS, campaign_id, err.code)
        raise
    _count(metrics.REDEMPTIONS, campaign_id, "REPLAY" if replay else "OK")
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
    try:
        out, replay = await ctx.redemptions.refund(
            redemption_id, body, verified.key.id, time.time()
        )
    except ApiError as err:
        if err.code != "NOT_FOUND":
            _count(metrics.REFUNDS, campaign_id, err.code)
        raise
    _count(metrics.REFUNDS, campaign_id, "REPLAY" if replay else "OK")
    return reply(out, 201, replay=replay)


async def clawback_repaid(ctx: Ctx, request: web.Request, body: RepaidIn) -> web.Response:
    verified: Verified = request["verified"]
    out, replay = await ctx.redemptions.clawback_repaid(
        request.match_info["refund_id"], body, verified.key.id, time.time()
    )
    return reply(out, replay=replay)


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
    return reply(SettlementList(settlements=await ctx.settlement.queue(query)))


def stored_reply(result: tuple[int, bytes, bool]) -> web.Response:
    status, body, replay = result
    headers = {"Idempotent-Replay": "true"} if replay else None
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


async def decide(ctx: Ctx, request: web.Request, body: DecisionIn) -> web.Response:
    redemption_id = request.match_info["redemption_id"]
    key: ApiKey = request["verified"].key
    return stored_reply(await ctx.settlement.decide(redemption_id, body, key))


async def disburse(ctx: Ctx, request: web.Request, body: DisbursementIn) -> web.Response:
    return stored_reply(await ctx.settlement.disburse(body, request["verified"].key))


async def disbursement_paid(ctx: Ctx, request: web.Request, body: PaidIn) -> web.Response:
    disbursement_id = path_id(request, "disbursement_id")
    return stored_reply(await ctx.settlement.paid(disbursement_id, body, request["verified"].key))


async def ops_overview(ctx: Ctx, request: web.Request, _: None) -> web.Response:
    """Every campaign's live ledger, current round and claims by outcome (the /ops page)."""
    counts = metrics.claim_counts()
    states = await gauges.campaigns(ctx.redis, ctx.campaigns)
    live = [
        CampaignLive(
            campaign_id=c.campaign_id,
            name=c.definition.name,
            status=c.status,
            ledger=c.ledger,
            current_round=c.current_round,
            claims=counts.get(c.campaign_id, {}),
        )
        for c in states
    ]
    due = await provisional_due_dates(ctx)
    return reply(OpsOverview(generated_at=now(), campaigns=live, due_dates=due))


async def provisional_due_dates(ctx: Ctx) -> ProvisionalDueDates | None:
    """The provisional due dates, or None while PostgreSQL does not answer."""
    if ctx.pg is None:
        return None
    with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return await due_dates.provisional(ctx.pg)
    return None


def _pool(ctx: Ctx) -> asyncpg.Pool:
    if ctx.pg is None:
        raise ApiError("UNAVAILABLE", "PostgreSQL is not connected")
    return ctx.pg


CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


def attachment(body: bytes, fmt: str, filename: str) -> web.Response:
    return web.Response(
        body=body,
        headers={
            "Content-Type": CONTENT_TYPES[fmt],
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Content-SHA256": hashlib.sha256(body).hexdigest(),
        },
    )


async def report(ctx: Ctx, request: web.Request, query: reports.ReportQuery) -> web.Response:
    cached = await ctx.campaigns.cached(path_id(request, "campaign_id"))
    campaign_id = cached.keys.campaign_id
    out = await reports.build_report(
        _pool(ctx), campaign_id, query.by, cached.definition.timezone, now()
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
        _pool(ctx), campaign_id, query.date, cached.definition.timezone
    )
    return attachment(body, "csv", f"{campaign_id}-{query.date.isoformat()}.csv")


ROUTES: tuple[Route, ...] = (
    Route(
        "PUT",
        "/v1/campaigns/{campaign_id}",
        put_campaign,
        ("ops",),
        "Create or replace a campaign before it opens",
        CampaignDef,
        CampaignOut,
        201,
    ),
    Route(
        "GET",
        "/v1/campaigns/{campaign_id}",
        get_campaign,
        ("ops", "auditor"),
        "Definition, live ledger and current round",
        None,
        CampaignOut,
    ),
    Route(
        "POST",
        "/v1/campaigns/{campaign_id}/pause",
        pause,
        ("ops",),
        "Pause claims",
        StatusChangeIn,
        StatusOut,
    ),
    Route(
        "POST",
        "/v1/campaigns/{campaign_id}/resume",
        resume,
        ("ops",),
        "Resume claims",
        StatusChangeIn,
        StatusOut,
    ),
    Route(
        "POST",
        "/v1/campaigns/{campaign_id}/rounds/{round_id}/budget",
        round_budget,
        ("ops",),
        "Compare-and-set a round's budget",
        RoundBudgetIn,
        RoundBudgetOut,
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
    ),
    Route(
        "GET",
        "/v1/merchants/{merchant_id}",
        get_merchant,
        ("ops", "auditor", "payment", "merchant"),
        "Read a merchant",
        None,
        MerchantOut,
    ),
    Route(
        "POST",
        "/v1/campaigns/{campaign_id}/registrations",
        register,
        ("app",),
        "Register a person for a campaign",
        RegistrationIn,
        RegistrationOut,
        201,
    ),
    Route(
        "POST",
        "/v1/campaigns/{campaign_id}/claims",
        claim,
        ("app", "merchant"),
        "Claim a voucher (app key; merchant key in staff mode)",
        ClaimIn,
        VoucherOut,
        201,
    ),
    Route(
        "POST",
        "/v1/redemptions",
        redeem,
        ("payment",),
        "Apply a voucher to a payment",
        RedemptionIn,
        RedemptionOut,
        201,
    ),
    Route(
        "GET",
        "/v1/redemptions/{redemption_id}",
        get_redemption,
        ("payment", "merchant", "auditor", "ops"),
        "Read a redemption (a merchant key: its own)",
        None,
        RedemptionOut,
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
    ),
    Route(
        "POST",
        "/v1/clawbacks/{refund_id}/repaid",
        clawback_repaid,
        ("auditor",),
        "A merchant paid back the subsidy of a refund made after reimbursement",
        RepaidIn,
        RefundOut,
    ),
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
    ),
    Route(
        "POST",
        "/v1/settlements/{redemption_id}/decision",
        decide,
        ("auditor",),
        "Approve or reject a submission (override_reason to approve one that failed a check)",
        DecisionIn,
        SettlementOut,
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
    ),
    Route(
        "POST",
        "/v1/disbursements/{disbursement_id}/paid",
        disbursement_paid,
        ("auditor",),
        "Record a batch as paid; later refunds of its redemptions become clawbacks",
        PaidIn,
        DisbursementOut,
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
    ),
    Route(
        "GET",
        "/v1/ops/overview",
        ops_overview,
        ("ops",),
        "Every campaign's live ledger, current round and claims by outcome (the /ops page)",
        None,
        OpsOverview,
    ),
    Route(
        "GET",
        "/v1/vouchers/{voucher_id}",
        get_voucher,
        ("app", "payment", "ops", "auditor"),
        "Read a voucher",
        None,
        VoucherOut,
    ),
    Route(
        "GET",
        "/v1/users/{user_id}/vouchers",
        user_vouchers,
        ("app", "ops", "auditor"),
        "A user's vouchers",
        None,
        VoucherList,
    ),
)


def endpoint(ctx: Ctx, route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Wrap a handler: check the role, decode and validate the body with msgspec."""
    decoder: msgspec.json.Decoder[Any] | None = (
        msgspec.json.Decoder(route.body) if route.body is not None else None
    )

    async def handle(request: web.Request) -> web.Response:
        require_role(request["verified"], *route.roles)
        body: Any = None
        if route.query is not None:
            try:
                body = msgspec.convert(dict(request.query), route.query, strict=False)
            except msgspec.ValidationError as exc:
                raise ApiError("INVALID_REQUEST", f"query: {exc}") from None
        elif decoder is not None:
            try:
                body = decoder.decode(request["raw_body"])
            except msgspec.ValidationError as exc:
                raise ApiError("INVALID_REQUEST", str(exc)) from None
            except msgspec.DecodeError as exc:
                raise ApiError("INVALID_REQUEST", f"malformed JSON: {exc}") from None
            request["request_id"] = getattr(body, "request_id", None)
            request["campaign"] = campaign_prefix(getattr(body, "voucher_id", ""))
        return await route.handler(ctx, request, body)

    handle.__name__ = route.handler.__name__
    return handle


# ------------------------------------------------------------------ middlewares


def as_api_error(request: web.Request, exc: Exception) -> ApiError:
    """The contract's error for any exception a handler raised."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError("INVALID_REQUEST", f"body over {MAX_BODY} bytes")
    if isinstance(exc, web.HTTPNotFound):
        return ApiError("NOT_FOUND", f"no route {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return ApiError("INVALID_REQUEST", f"method {request.method} not allowed here")
    if isinstance(exc, (*topology.REDIS_ERRORS, OSError)):
        log.warning("redis unavailable: %r", exc)
        return ApiError("UNAVAILABLE", "the gate is unreachable")
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        log.warning("postgres unavailable: %r", exc)
        return ApiError("UNAVAILABLE", "the record is unreachable")
    log.exception("unexpected error", extra={"route": request.match_info.route.name})
    return ApiError("INTERNAL")


def failure_response(request: web.Request, exc: Exception) -> tuple[str, web.Response]:
    """(error code, response) for an exception a handler raised."""
    err = as_api_error(request, exc)
    response = error_response(err)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        response.set_status(405)
    return err.code, response


def request_fields(
    request: web.Request, status: int, code: str, elapsed_s: float
) -> dict[str, object]:
    """One request's log line: who, what, outcome, latency; never a body (it holds PII)."""
    verified: Verified | None = request.get("verified")
    ids = request.match_info
    subject = ids.get("voucher_id") or ids.get("redemption_id") or ids.get("refund_id") or ""
    return {
        "route": request.match_info.route.name,
        "method": request.method,
        "status": status,
        "code": code,
        "request_id": request.get("request_id"),
        "campaign": ids.get("campaign_id") or request.get("campaign") or campaign_prefix(subject),
        "key": verified.key.id if verified else None,
        "trace": request.headers.get("X-Request-Id"),
        "latency_ms": round(elapsed_s * 1000, 3),
    }


def middlewares(ctx: Ctx) -> list[Any]:
    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        code = "OK"
        try:
            response = await handler(request)
        except Exception as exc:  # every failure answers in the contract's error format
            # (no local may keep `exc`: its traceback holds this frame, a cycle that only
            # the garbage collector would free, in long pauses under load)
            code, response = failure_response(request, exc)
        metrics.child(metrics.REQUESTS, name, str(response.status)).inc()
        elapsed = time.perf_counter() - started
        shed = code == "OVERLOADED"
        if not shed:  # the latency of what was served: shed answers would drown it
            metrics.child(metrics.LATENCY, name).observe(elapsed)
        # shed claims are counted (issuer_claims_shed_total), not logged one by one: a
        # line each would flood the log, and cost CPU, exactly when the worker is behind
        level = logging.DEBUG if request.method == "GET" or shed else logging.INFO
        if log.isEnabledFor(level):
            if code == "OK" and response.headers.get("Idempotent-Replay"):
                code = "REPLAY"
            log.log(level, "request", extra=request_fields(request, response.status, code, elapsed))
        return response

    @web.middleware
    async def authenticate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        name = request.match_info.route.name
        limit = documents.MAX_UPLOAD_BYTES if name == "upload_documents" else MAX_BODY
        if (request.content_length or 0) > limit:
            raise ApiError("INVALID_REQUEST", f"body over {limit} bytes")
        raw = await request.read()
        if len(raw) > limit:
            raise ApiError("INVALID_REQUEST", f"body over {limit} bytes")
        verified = verify(
            ctx.keys, request.method, request.path_qs, request.headers, raw, time.time()
        )
        # Claims check their nonce inside the batched script; other calls do it here.
        if request.match_info.route.name != "claim":
            fresh = await ctx.redis.set(
                keys.nonce_key(verified.key.id, verified.nonce), 1, nx=True, ex=keys.NONCE_BUCKET_S
            )
            if not fresh:
                raise ApiError("UNAUTHENTICATED", "nonce already used")
        request["verified"] = verified
        request["raw_body"] = raw
        if request.match_info.route.name != "claim":
            return await handler(request)
        try:
            return await handler(request)
        except GateRefusal:
            raise
        except ApiError as err:
            # UNAVAILABLE: the gate may have run (and spent the nonce), or not; either
            # way a retry is decided by the gate, so the answer stays 503
            if err.code == "UNAVAILABLE":
                raise
            # Refused before the gate: spend the nonce anyway, a replay must not succeed
            # later (say once the round has opened).
            if not await ctx.claims.spend_nonce(request.match_info["campaign_id"], verified):
                raise ApiError("UNAUTHENTICATED", "nonce already used") from None
            raise

    @web.middleware
    async def admit(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Claims only: shed before anything is read or checked; hold the claim until it
        is answered."""
        if request.match_info.route.name != "claim":
            return await handler(request)
        with ctx.admission.admit():
            return await handler(request)

    return [errors, admit, authenticate]


# ------------------------------------------------------------------ operations


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# /readyz?scope= -> the checks it leaves out
READY_SCOPES: dict[str, frozenset[str]] = {
    "all": frozenset(),
    "gate": frozenset({"postgres_ok"}),
}


def ops_routes(ctx: Ctx, ready: Callable[[], Awaitable[dict[str, Any]]]) -> list[web.RouteDef]:
    from issuer import openapi

    async def readyz(request: web.Request) -> web.Response:
        """Every check (API.md), or with `?scope=gate` those the claim path needs: claims
        go on while PostgreSQL is away (the streams hold them, up to the flusher-lag
        bound), so a load balancer routing claims can follow this one instead."""
        scope = request.query.get("scope", "all")
        if scope not in READY_SCOPES:
            raise ApiError("INVALID_REQUEST", f"scope: one of {', '.join(READY_SCOPES)}")
        checks = await ready()
        ignored = READY_SCOPES[scope]
        ok = all(v is True for k, v in checks.items() if k.endswith("ok") and k not in ignored)
        return web.json_response(checks, status=200 if ok else 503)

    async def metrics_page(request: web.Request) -> web.Response:
        health = await ready()
        states = await gauges.campaigns(ctx.redis, ctx.campaigns) if health.get("redis_ok") else []
        extra = gauges.families(states, health)
        due = await provisional_due_dates(ctx) if health.get("postgres_ok") else None
        if due is not None:
            extra += due_dates.families(due)
        body, content_type = metrics.exposition(extra)
        return web.Response(body=body, headers={"Content-Type": content_type})

    spec = ENCODER.encode(openapi.document(ROUTES))

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=spec, content_type=JSON)

    async def docs(request: web.Request) -> web.Response:
        return web.Response(text=openapi.DOCS_PAGE, content_type="text/html")

    ops_html = files("issuer.data").joinpath("ops.html").read_text()

    async def ops_page(request: web.Request) -> web.Response:
        """The live ops page; it signs its calls with an ops key entered in its login form."""
        return web.Response(text=ops_html, content_type="text/html")

    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics_page),
        web.get("/openapi.json", openapi_json),
        web.get("/docs", docs),
        web.get("/ops", ops_page),
    ]


def make_app(ctx: Ctx, ready: Callable[[], Awaitable[dict[str, Any]]]) -> web.Application:
    # the upload route's limit; every other route is held to MAX_BODY before reading
    app = web.Application(client_max_size=documents.MAX_UPLOAD_BYTES, middlewares=middlewares(ctx))
    # routes are tried in order: the surge's route first
    for route in sorted(ROUTES, key=lambda r: r.handler is not claim):
        app.router.add_route(
            route.method, route.path, endpoint(ctx, route), name=route.handler.__name__
        )
    app.add_routes(ops_routes(ctx, ready))
    return app
