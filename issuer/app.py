"""The aiohttp app, without middleware: each route's handler wrapped to shed (claims),
sign-check, check its role, decode its body and answer every failure in the contract's
format, counted and logged; the unsigned operational pages; the contract's 404 and 405 as
routes of their own."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from math import floor
from types import CoroutineType
from typing import Any, cast

import asyncpg
import msgspec
from aiohttp import hdrs, web
from multidict import istr

from issuer import documents, due_dates, gauges, keys, logs, metrics, openapi, tenancy, topology
from issuer.auth import Verified, role_refused, verify
from issuer.errors import ApiError
from issuer.http import (
    ENCODER,
    JSON,
    MAX_BODY,
    Ctx,
    ErrorResponse,
    Handler,
    Route,
    error_response,
)
from issuer.ids import campaign_prefix
from issuer.routes import ROUTES
from issuer.routes_claims import claim
from issuer.routes_ops import provisional_due_dates

log = logging.getLogger("issuer.api")
# a request line's head (`logs.head`) by its level, made once
_HEADS = {level: logs.head(level, log.name, "request") for level in logs.LEVEL_NAMES}


Next = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNMATCHED = "unmatched"  # the route label of a request no route serves (404, 405)
X_REQUEST_ID = istr("X-Request-Id")  # its case folded once, not at every lookup


def served(label: str, inner: Next) -> Next:
    """`inner` as a route's handler: every failure answered in the contract's format,
    every request counted and logged. The app has no middleware (aiohttp adds a second
    layer to any app that has one): each route is wrapped by this, or by `endpoint`."""

    series = metrics.RouteSeries(label)

    async def serve(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await inner(request)
        except Exception as exc:  # every failure answers in the contract's error format
            # (no local may keep `exc`: its traceback holds this frame, a cycle that only
            # the garbage collector would free, in long pauses under load)
            response = failure_response(request, exc)
        route = request.match_info.route.name
        return finish(request, response, series, started, route, request.get("verified"))

    return serve


def finish(
    request: web.Request,
    response: web.StreamResponse,
    series: metrics.RouteSeries,
    started: float,
    route: str | None,
    verified: Verified | None,
    request_id: str | None = None,
    campaign: str | None = None,
    tenant: str | None = None,
) -> web.StreamResponse:
    """Count and log a request to `route` (its name) once answered. Its line
    (`RequestLine`, made here: one frame fewer per request) names its signer, its body's
    request_id, its campaign and the tenant it acted in, as the caller gives them (read
    back from the request, each would cost a miss). The campaign is the path's, else the
    one its body names: read from the path here unless the caller gives one."""
    # by its type: isinstance of another response would run ABCMeta.__instancecheck__ (a
    # response is a MutableMapping), a frame; an error's status read with no property call
    if type(response) is ErrorResponse:
        code, status = response.outcome
    else:
        code, status = "OK", response.status
    elapsed = time.perf_counter() - started
    shed = code == "OVERLOADED"
    # the latency of what was served: shed answers would drown it
    series.answered(status, None if shed else elapsed)
    # shed claims are counted (issuer_claims_shed_total), not logged one by one: a
    # line each would flood the log, and cost CPU, exactly when the worker is behind
    method = request.method  # a reified property: read once
    level = logging.DEBUG if method == "GET" or shed else logging.INFO
    if level < logs.lowest[0]:
        return response
    if code == "OK" and response.headers.get("Idempotent-Replay"):
        code = "REPLAY"
    key = verified.key if verified else None
    if campaign is None:  # the path's, or the campaign of what the path names
        ids = request.match_info
        campaign = ids.get("campaign_id")
        if campaign is None:
            subject = ids.get("voucher_id") or ids.get("redemption_id") or ids.get("refund_id")
            campaign = campaign_prefix(subject or "")
    line = RequestLine(  # by position, in its fields' order (logs.Line)
        logs.timestamp(time.time()),
        _HEADS[level],
        route,
        method,
        status,
        code,
        request_id,
        campaign,
        key.id if key else None,
        None if key is None or key.tenants is None else _tenants(key.tenants),
        tenant,
        request.headers.get(X_REQUEST_ID),
        # to the microsecond, half up: round(x, 3) formats and parses the decimal, ~10x
        # the cost, and round(x) is a lookup of __round__ and a call, twice floor()'s
        floor(elapsed * 1e6 + 0.5) / 1e3,
    )
    logs.batched(line)
    return response


def check_signed(ctx: Ctx, request: web.Request, raw: bytes) -> Verified:
    """Check the body's signature; keep the signer on the request (`request["verified"]`,
    for the log line). `endpoint` does the same in its own frame."""
    verified = verify(
        ctx.keys.current, request.method, request.path_qs, request.headers, raw, time.time()
    )
    request["verified"] = verified
    return verified


async def spend_nonce(ctx: Ctx, verified: Verified) -> None:
    """Spend a signed request's nonce (claims and redemptions spend theirs in their
    batched script); UNAUTHENTICATED if it was spent before."""
    fresh = await ctx.redis.set(
        keys.nonce_key(verified.key.id, verified.nonce), 1, nx=True, ex=keys.NONCE_BUCKET_S
    )
    if not fresh:
        raise ApiError("UNAUTHENTICATED", "nonce already used")


def endpoint(ctx: Ctx, route: Route) -> Next:
    """A contract route's handler: shed (claims), read the body and check its signature,
    spend the nonce (all but claims and redemptions: their batched scripts do), check the
    role, decode and validate the body with msgspec, check the key's tenants against what
    the route touches (its `tenant` rule), then run the route's handler; answered, counted
    and logged as by `served`, in one coroutine with it."""
    decoder: msgspec.json.Decoder[Any] | None = (
        msgspec.json.Decoder(route.body) if route.body is not None else None
    )
    name = route.handler.__name__
    upload = name == "upload_documents"  # its handler reads the body as sent
    shed = route.handler is claim
    # claims and redemptions spend their nonce inside their campaign's batched script, or,
    # refused before it, in a background batch (the claim handler answers its own
    # refusals: routes_claims.claim). A redemption whose body named no campaign spends
    # none: the same request is refused the same way again.
    batched = shed or name == "redeem"
    names_voucher = "voucher_id" in getattr(route.body, "__struct_fields__", ())
    series = metrics.RouteSeries(route.path)
    roles = route.roles
    handler = cast(Handler, route.handler)  # all but the claim's (called by name)

    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        verified: Verified | None = None
        body: Any = None
        tenant: str | None = None
        campaign: str | None = None  # the claim's, from its path (finish reads the others')
        held = False  # a claim taken into admission's count, let go once answered
        try:
            if shed:  # taken into admission's count unless the worker is behind
                admission = ctx.admission
                full = admission.in_hand >= admission.queue_max
                if full or time.monotonic() > admission.lag.behind_from:
                    raise admission.refusal(full)
                admission.in_hand += 1
                held = True
            if upload:  # the one route whose body may exceed the app's MAX_BODY
                request = request.clone(client_max_size=documents.MAX_UPLOAD_BYTES)
            raw = await request.read()
            # the signature checked here, in no frame of its own; the signer kept for the
            # handler (`request["verified"]`), but the claim's, which is handed it
            verified = verify(
                ctx.keys.current, request.method, request.path_qs, request.headers, raw, time.time()
            )
            if not shed:
                request["verified"] = verified
            if upload:
                request["raw_body"] = raw
            if not batched:
                await spend_nonce(ctx, verified)
            key = verified.key
            if key.role not in roles:
                raise role_refused(key)
            try:  # the body decoded and validated here, in no frame of its own
                body = decoder.decode(raw) if decoder is not None else queried(request)
            except msgspec.ValidationError as exc:
                raise ApiError("INVALID_REQUEST", str(exc)) from None
            except msgspec.DecodeError as exc:
                raise ApiError("INVALID_REQUEST", f"malformed JSON: {exc}") from None
            ids = request.match_info  # a reified property: read once, for both
            admitted = tenancy.known(ctx.owners, route.tenant, ids, body, key)
            if admitted is tenancy.UNKNOWN:
                admitted = await tenancy.admit(ctx.owners, route.tenant, request, body, key)
            body, tenant = admitted
            if shed:  # its campaign read from the path once, for the claim and its line
                campaign = ids["campaign_id"]
                answered: Any = claim(ctx, request, campaign, body, verified)
            else:
                answered = handler(ctx, request, body)
            # a response or a coroutine, told apart by the coroutine's type, not
            # web.StreamResponse: isinstance against an ABC (a response is a
            # MutableMapping) runs ABCMeta.__instancecheck__, a frame
            response = await answered if isinstance(answered, CoroutineType) else answered
        except ApiError as err:
            if batched and verified is not None:
                response = error_response(refused(request, verified, body, err))
            else:
                response = error_response(err)
        except Exception as exc:  # as in `served`
            response = failure_response(request, exc)
        finally:
            if held:
                admission.in_hand -= 1
        request_id = getattr(body, "request_id", None) if decoder is not None else None
        if names_voucher:  # (no route whose body names a voucher has a campaign in its path)
            campaign = named(body)
        return finish(
            request, response, series, started, name, verified, request_id, campaign, tenant
        )

    def queried(request: web.Request) -> Any:
        """The query of a route that takes no body, decoded and validated (None: the
        route takes neither)."""
        if route.query is None:
            return None
        try:
            return msgspec.convert(dict(request.query), route.query, strict=False)
        except msgspec.ValidationError as exc:
            raise ApiError("INVALID_REQUEST", f"query: {exc}") from None

    def refused(request: web.Request, verified: Verified, body: Any, err: ApiError) -> ApiError:
        """A claim or redemption refused before its script: its nonce spent in the
        background (`Claims.refused`), unless its campaign is not known."""
        campaign_id = request.match_info.get("campaign_id") or named(body)
        return err if campaign_id is None else ctx.claims.refused(campaign_id, verified, err)

    handle.__name__ = name
    return handle


def named(body: Any) -> str | None:
    """The campaign of the voucher a decoded body names (None: none), for the log and the
    nonce."""
    voucher_id = getattr(body, "voucher_id", None)
    return None if voucher_id is None else campaign_prefix(voucher_id)


def unmatched(ctx: Ctx, error: Callable[[web.Request], ApiError]) -> Next:
    """The answer to a request no route serves: `error`, after the signature check (and
    the nonce's spend) that every /v1/ request passes first."""

    async def refuse(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            await spend_nonce(ctx, check_signed(ctx, request, await request.read()))
        raise error(request)

    return served(UNMATCHED, refuse)


def not_found(request: web.Request) -> ApiError:
    return ApiError("NOT_FOUND", f"no route {request.path}")


def not_allowed(request: web.Request) -> ApiError:
    return ApiError("INVALID_REQUEST", f"method {request.method} not allowed here", status=405)


def as_api_error(request: web.Request, exc: Exception) -> ApiError:
    """The contract's error for any exception a handler raised."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, web.HTTPRequestEntityTooLarge):  # read past its client_max_size
        return ApiError("INVALID_REQUEST", f"body over {request.client_max_size} bytes")
    if isinstance(exc, (*topology.REDIS_ERRORS, OSError)):
        log.warning("redis unavailable: %r", exc)
        return ApiError("UNAVAILABLE", "the gate is unreachable")
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        log.warning("postgres unavailable: %r", exc)
        return ApiError("UNAVAILABLE", "the record is unreachable")
    log.exception("unexpected error", extra={"route": request.match_info.route.name})
    return ApiError("INTERNAL")


def failure_response(request: web.Request, exc: Exception) -> web.Response:
    """The response to an exception a handler raised."""
    return error_response(as_api_error(request, exc))


class RequestLine(logs.Line):
    """One request's log line: who (the key and the tenants it is scoped to, null for a
    platform-wide key), what (in which tenant), outcome, latency; never a body (PII)."""

    route: str | None
    method: str
    status: int
    code: str
    request_id: str | None
    campaign: str | None
    key: str | None
    key_tenants: list[str] | None
    tenant: str | None
    trace: str | None
    latency_ms: float


@functools.lru_cache(maxsize=256)
def _tenants(tenants: frozenset[str]) -> list[str]:
    """A scoped key's tenants, sorted once per set (the keys in force are few; the list is
    only encoded, never changed). A platform-wide key's (None) is logged without a call."""
    return sorted(tenants)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# /readyz?scope= -> the checks it leaves out
READY_SCOPES: dict[str, frozenset[str]] = {
    "all": frozenset(),
    "gate": frozenset({"postgres_ok"}),
}


SHARED = {  # what the signed pages share, by the place a page leaves for it
    "<script>/* console.js */</script>": ("console.js", "script"),
    "<style>/* console.css */</style>": ("console.css", "style"),
}


def page(name: str) -> str:
    """A page of issuer/data, with the script and the styles the signed pages share
    (console.js, console.css) inlined where it asks for them: the page stays one document
    that loads nothing."""
    data = files("issuer.data")
    text = data.joinpath(f"{name}.html").read_text()
    for place, (shared, tag) in SHARED.items():
        text = text.replace(place, f"<{tag}>\n{data.joinpath(shared).read_text()}</{tag}>")
    return text


def ops_routes(ctx: Ctx, ready: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Next]:
    """The unsigned GET pages by path."""

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

    ops_html, audit_html = page("ops"), page("audit")

    async def ops_page(request: web.Request) -> web.Response:
        """The live ops page; it signs its calls with an ops key entered in its login form."""
        return web.Response(text=ops_html, content_type="text/html")

    async def audit_page(request: web.Request) -> web.Response:
        """The reviewer's desk; it signs its calls with an auditor key, as /ops does."""
        return web.Response(text=audit_html, content_type="text/html")

    return {
        "/healthz": healthz,
        "/readyz": readyz,
        "/metrics": metrics_page,
        "/openapi.json": openapi_json,
        "/docs": docs,
        "/ops": ops_page,
        "/audit": audit_page,
    }


def make_app(ctx: Ctx, ready: Callable[[], Awaitable[dict[str, Any]]]) -> web.Application:
    # a body is refused once its reading passes MAX_BODY (aiohttp's own check, as it reads:
    # no frame of ours per request), the upload route's past its own limit (`endpoint`)
    app = web.Application(client_max_size=MAX_BODY)
    router = app.router
    # routes are tried in order: the surge's route first
    for route in sorted(ROUTES, key=lambda r: r.handler is not claim):
        router.add_route(
            route.method, route.path, endpoint(ctx, route), name=route.handler.__name__
        )
    pages = ops_routes(ctx, ready)
    for path, handler in pages.items():
        router.add_get(path, served(path, handler))
    # without a middleware, the contract's 405 and 404 are routes: an any-method route
    # for each path, tried after that path's routes, then one for every other path
    wrong_method = unmatched(ctx, not_allowed)
    for path in dict.fromkeys([*(r.path for r in ROUTES), *pages]):
        router.add_route(hdrs.METH_ANY, path, wrong_method)
    router.add_route(hdrs.METH_ANY, "/{tail:.*}", unmatched(ctx, not_found))
    return app
