"""What every route module shares: the per-worker context, the route record, replies."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import msgspec
from aiohttp import hdrs, web
from redis.asyncio import Redis

from issuer import metrics
from issuer.admission import Admission
from issuer.auth import Role, Verified
from issuer.campaigns import Campaigns
from issuer.claims import Claims
from issuer.config import Settings
from issuer.errors import ApiError
from issuer.model import fits_id
from issuer.redemptions import Redemptions
from issuer.scripts import Scripts
from issuer.settlement import Settlement

if TYPE_CHECKING:
    from issuer.keyring import Keyring
    from issuer.tenancy import Owners, Rule

MAX_BODY = 64 * 1024
JSON = "application/json"
ENCODER = msgspec.json.Encoder()
# a handler may answer without a coroutine (the claim refused before the gate)
Answer = Awaitable[web.Response] | web.Response
Handler = Callable[["Ctx", web.Request, Any], Answer]
# the claim's handler is handed its path's campaign id (read once, for it and the request's
# line) and its signer: not kept on the request for it (a key set and read back are two
# Python frames)
SignedHandler = Callable[["Ctx", web.Request, str, Any, Verified], Answer]
T = TypeVar("T")
# the outcome not counted: no series for ids that name nothing (`count_outcome`, and the
# claim's refusals, counted in their own frame: routes_claims.refuse)
UNCOUNTED = "NOT_FOUND"


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
    keys: Keyring  # `keys.current`: the keys in force (read again when the file changes)
    person_key: bytes
    admission: Admission
    owners: Owners  # the tenants of campaigns, merchants and disbursements


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler | SignedHandler
    roles: tuple[Role, ...]
    summary: str
    body: type | None
    response: type
    status: int = 200
    # a Struct of the query string, passed as the handler's body (a route that takes none)
    query: type | None = None
    files: tuple[str, ...] = ()  # media types answered as a download (response bytes: only)
    also: tuple[tuple[int, type], ...] = ()  # other success answers: (status, type)
    # how the tenant of what it touches is found (issuer/tenancy.py); no route without one
    tenant: Rule = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.body is not None and self.query is not None:
            raise ValueError(f"{self.path}: a route takes a body or a query, not both")


def reply(payload: Any, status: int = 200, *, replay: bool = False) -> web.Response:
    return encoded(ENCODER.encode(payload), status, replay=replay)


def encoded(body: bytes, status: int = 200, *, replay: bool = False) -> web.Response:
    """An answer whose JSON body is encoded already."""
    headers = {"Idempotent-Replay": "true"} if replay else None
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


class ErrorResponse(web.Response):
    """The contract's error answer; `outcome`, its code and status, is what the request
    log reads (an attribute: a response key's get and set are two Python frames each, and
    the response's `status` a property, one; not the error itself: a raised one holds the
    frames it passed, and the frame that holds this response would be a cycle)."""

    outcome: tuple[str, int]


def error_response(err: ApiError) -> ErrorResponse:
    """The contract's error answer, its body encoded once per code and detail unless it
    names a voucher, and kept on the error (`ApiError.body`: a slot's read, where the
    cache's look-up is a call and a tuple's hash); no header mapping to copy unless it
    carries Retry-After."""
    body = err.body
    if body is None:
        body = err.body = (
            _error_body(err.code, err.detail)
            if err.voucher_id is None
            else ENCODER.encode(err.envelope())
        )
    headers = None if err.retry_after is None else {hdrs.RETRY_AFTER: str(err.retry_after)}
    response = ErrorResponse(body=body, status=err.status, content_type=JSON, headers=headers)
    response.outcome = err.code, err.status
    return response


@functools.lru_cache(maxsize=1024)
def _error_body(code: str, detail: str | None) -> bytes:
    """The encoded envelope of a refusal that names no voucher: a surge repeats a few."""
    return ENCODER.encode(ApiError(code, detail).envelope())


async def counted(
    metric: Any, campaign_id: str, outcome: Awaitable[tuple[T, bool]]
) -> tuple[T, bool]:
    """Await a write's (result, replay) and count it in `metric` by campaign and outcome:
    OK, REPLAY or the error code (`count_outcome`)."""
    try:
        result, replay = await outcome
    except ApiError as err:
        count_outcome(metric, campaign_id, err.code)
        raise
    count_outcome(metric, campaign_id, "REPLAY" if replay else "OK")
    return result, replay


def count_outcome(metric: Any, campaign_id: str, code: str) -> None:
    """Count a write's outcome in `metric`, unless it is UNCOUNTED."""
    if code != UNCOUNTED:
        metrics.count(metrics.child(metric, campaign_id, code))


def path_id(request: web.Request, name: str, fits: Callable[[str], bool] = fits_id) -> str:
    """The path's parameter `name`; INVALID_REQUEST unless it `fits` (an id, by default)."""
    value = request.match_info[name]
    if not fits(value):
        raise ApiError("INVALID_REQUEST", f"{name}: not a valid id")
    return value


def postgres(ctx: Ctx) -> asyncpg.Pool:
    """The worker's PostgreSQL pool; UNAVAILABLE when it has none."""
    if ctx.pg is None:
        raise ApiError("UNAVAILABLE", "PostgreSQL is not connected")
    return ctx.pg


def now() -> datetime:
    return datetime.now(UTC)


def stored_reply(result: tuple[int, bytes, bool]) -> web.Response:
    status, body, replay = result
    return encoded(body, status, replay=replay)


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
