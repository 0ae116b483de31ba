"""Tenants (API.md v1.2): what each route touches belongs to a tenant, and a key scoped to
some tenants (`ApiKey.tenants`) may touch only theirs.

Every route declares in the route table how the tenant of what it touches is found
(`Route.tenant`, a `Rule`), and the endpoint wrapper (`issuer/app.py`) applies it with
`admit` before the handler runs: no handler decides it, and a route cannot be declared
without a rule. Lists and overviews (`Rule.lists`) are the one thing a handler does
itself: it keeps the records of `scope(request)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import msgspec
from aiohttp import web
from redis.asyncio import Redis

from issuer import merchants
from issuer.auth import ApiKey
from issuer.campaigns import Campaigns
from issuer.errors import ApiError
from issuer.ids import campaign_prefix
from issuer.model import DEFAULT_TENANT, fits_id

# campaign: a campaign id; campaign_of: an id that starts with its campaign's (a voucher,
# application, redemption or refund, issuer/ids.py); merchant; disbursement (its merchant's)
Kind = Literal["campaign", "campaign_of", "merchant", "disbursement"]
CACHE_MAX = 50_000  # tenants remembered per kind before the memory is cleared


@dataclass(frozen=True)
class Ref:
    """One thing a route touches: what it is, and the path parameter (or body field) that
    holds its id. An id that names nothing passes: the handler answers NOT_FOUND."""

    kind: Kind
    name: str
    in_body: bool = False

    @property
    def what(self) -> str:
        return self.name.removesuffix("_id")


@dataclass(frozen=True)
class Rule:
    """How a route finds the tenants of what it touches; each must be one of the key's.
    `defines`: a PUT that creates or replaces the thing of its first ref, whose body's
    `tenant` must be the key's too (filled in when the key has exactly one). `lists`: the
    route answers records of many tenants, and its handler keeps those of `scope()`."""

    refs: tuple[Ref, ...] = ()
    defines: bool = False
    lists: bool = False
    # the one ref of a rule that touches one campaign, named in its path, and defines
    # nothing (the claim's): `known` decides it in one frame
    campaign_in_path: Ref | None = field(init=False, default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.refs) == 1 and not self.defines:
            (ref,) = self.refs
            if ref.kind == "campaign" and not ref.in_body:
                object.__setattr__(self, "campaign_in_path", ref)

    def describe(self) -> str:
        """For the OpenAPI document (`x-tenant`)."""
        parts = [f"{r.what} ({'body' if r.in_body else 'path'} {r.name})" for r in self.refs]
        text = "tenant of: " + ", ".join(parts) if parts else ""
        if self.defines:
            text += "; the body's tenant (default: the key's only tenant)"
        if self.lists:
            text += ("; " if text else "") + "lists only the key's tenants"
        return text


def path(kind: Kind, name: str) -> Rule:
    """The route touches the thing whose id is path parameter `name`."""
    return Rule((Ref(kind, name),))


def defines(kind: Kind, name: str) -> Rule:
    """The route creates or replaces the thing whose id is path parameter `name`."""
    return Rule((Ref(kind, name),), defines=True)


def body(*refs: tuple[Kind, str], lists: bool = False) -> Rule:
    """The route touches the things whose ids are these body fields (None: not given)."""
    return Rule(tuple(Ref(kind, name, in_body=True) for kind, name in refs), lists=lists)


CAMPAIGN = path("campaign", "campaign_id")
MERCHANT = path("merchant", "merchant_id")
LISTS = Rule(lists=True)


class Owners:
    """The tenant of a campaign, merchant or disbursement as this worker sees it. A tenant
    is fixed once its record exists, so a campaign's is its cached definition's (on the
    claim path: a dictionary look-up) and the others are kept once read."""

    def __init__(self, redis: Redis, campaigns: Campaigns, pg: asyncpg.Pool | None) -> None:
        self.redis = redis
        self.campaigns = campaigns
        self.pg = pg
        self._merchants: dict[str, str] = {}
        self._disbursements: dict[str, str] = {}

    def known(self, kind: Kind, thing_id: str) -> str | None:
        """The thing's tenant if this worker holds it (no coroutine: the claim path)."""
        if kind == "campaign":
            cached = self.campaigns.peek(thing_id)
            return None if cached is None else cached.tenant
        if kind == "campaign_of":
            return self.known("campaign", campaign_prefix(thing_id) or "")
        return (self._merchants if kind == "merchant" else self._disbursements).get(thing_id)

    async def tenant(self, kind: Kind, thing_id: str) -> str | None:
        """The thing's tenant, read where this worker does not hold it; None if there is
        no such thing."""
        if kind == "campaign_of":
            kind, thing_id = "campaign", campaign_prefix(thing_id) or ""
        if not fits_id(thing_id):
            return None
        if kind == "campaign":
            try:
                return (await self.campaigns.cached(thing_id)).tenant
            except ApiError:  # NOT_FOUND
                return None
        if kind == "merchant":
            found = await merchants.tenant_of(self.redis, thing_id)
            memory = self._merchants
        elif self.pg is None:
            return None
        else:
            found = await self.pg.fetchval(
                "SELECT tenant FROM disbursements WHERE disbursement_id = $1", thing_id
            )
            memory = self._disbursements
        if found is not None:  # fixed for good: kept (within CACHE_MAX)
            if len(memory) >= CACHE_MAX:
                memory.clear()
            memory[thing_id] = found
        return found


UNKNOWN: Any = object()  # `known`'s answer when a tenant must be read first


def known(owners: Owners, rule: Rule, ids: Mapping[str, str], body: Any, key: ApiKey) -> Any:
    """`admit`'s answer without a coroutine when this worker holds the tenant of everything
    the route touches (the claim path: its campaign's cached definition), else UNKNOWN.
    `ids`: the request's path parameters (`match_info`, a reified property: its caller
    reads it once, for this and its own use)."""
    ref = rule.campaign_in_path
    if ref is not None:  # one campaign: decided here, not by _touched and _decide
        peek = owners.campaigns.peek  # read, then called (Campaigns.peek)
        cached = peek(ids[ref.name])
        if cached is None:
            return UNKNOWN
        if key.tenants is not None and cached.tenant not in key.tenants:  # may_act_in, inline
            raise _forbidden(key, ref.what)
        return body, cached.tenant
    found = []
    for ref, thing_id in _touched(rule, ids, body):
        tenant = owners.known(ref.kind, thing_id)
        if tenant is None:
            return UNKNOWN
        found.append((ref, tenant))
    return _decide(rule, body, key, found)


async def admit(
    owners: Owners, rule: Rule, request: web.Request, body: Any, key: ApiKey
) -> tuple[Any, str | None]:
    """Apply a route's rule: FORBIDDEN unless the key may act in the tenant of everything
    the route touches (`key`: the request's). Returns the body (a defining PUT's with its
    tenant decided) and the tenant acted in (None: none), for the request's log line."""
    found = [
        (ref, owners.known(ref.kind, thing_id) or await owners.tenant(ref.kind, thing_id))
        for ref, thing_id in _touched(rule, request.match_info, body)
    ]
    return _decide(rule, body, key, found)


def _touched(rule: Rule, ids: Mapping[str, str], body: Any) -> list[tuple[Ref, str]]:
    """Each ref of the rule with the id it names, in the body or in the path's parameters
    `ids` (an optional body field not given: none)."""
    out = []
    for ref in rule.refs:
        thing_id = getattr(body, ref.name) if ref.in_body else ids[ref.name]
        if thing_id is not None:
            out.append((ref, thing_id))
    return out


def _decide(
    rule: Rule,
    body: Any,
    key: ApiKey,
    found: Sequence[tuple[Ref, str | None]],
) -> tuple[Any, str | None]:
    """`admit`'s verdict once the tenants of what the route touches are known (None: no
    such thing, the handler answers NOT_FOUND)."""
    tenant: str | None = None
    for ref, owner in found:
        if owner is None:
            continue
        if not key.may_act_in(owner):
            raise _forbidden(key, ref.what)
        tenant = tenant or owner
    if rule.defines:
        body, tenant = _defined(key, body, tenant)
    return body, tenant


def _forbidden(key: ApiKey, what: str) -> ApiError:
    return ApiError("FORBIDDEN", f"key {key.id} is not scoped to this {what}'s tenant")


def _defined(key: ApiKey, body: Any, existing: str | None) -> tuple[Any, str]:
    """The tenant a PUT gives its record: the body's (one of the key's), else the existing
    record's, else the key's only one, else (a platform-wide key) DEFAULT_TENANT."""
    wanted: str | None = body.tenant
    if wanted is None:
        if existing is not None:
            wanted = existing
        elif key.tenants is None:
            wanted = DEFAULT_TENANT
        elif len(key.tenants) == 1:
            (wanted,) = key.tenants
        else:
            raise ApiError("INVALID_REQUEST", "tenant: required from a key of several tenants")
    elif not key.may_act_in(wanted):
        raise ApiError("FORBIDDEN", f"key {key.id} is not scoped to that tenant")
    return msgspec.structs.replace(body, tenant=wanted), wanted


def scope(request: web.Request) -> frozenset[str] | None:
    """The tenants whose records a list may show this request (None: every tenant)."""
    tenants: frozenset[str] | None = request["verified"].key.tenants
    return tenants
