"""Tenants (API.md v1.2) on real servers: the programmes of two counties on one service, a
key per role scoped to each, platform-wide keys beside them.

The route × role × tenant matrix is generated from the route table: for every route and
every role that may call it, a key of another tenant (as able as the right one in every
other way: its merchant key even acts for the right tenant's merchant) gets 403 and
changes nothing, read back from Redis and PostgreSQL; then the right tenant's key succeeds
or fails for a usual reason. Lists answer the other tenant without a trace of this one.
A route declared without a tenant rule, or without a case here, fails."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from redis.asyncio import Redis

from issuer import integrity, keyfile, logs, metrics, store, tenancy
from issuer.app import RequestLine, finish
from issuer.auth import ROLES, ApiKey, Verified
from issuer.campaigns import Campaigns
from issuer.client import Response, signed_headers
from issuer.documents import LocalStore
from issuer.http import Route
from issuer.keys import MERCHANTS, CampaignKeys
from issuer.model import CampaignDef, VoucherOut
from issuer.rebuild import rebuild, restore_global
from issuer.routes import ROUTES
from issuer.scripts import Scripts
from tests.conftest import (
    Keyspace,
    Servers,
    Service,
    database_at,
    running_service,
    unique_id,
)
from tests.money import fridge
from tests.people import campaign, claim, id_number, iso
from tests.test_rebuild import lose_campaign
from tests.test_settlement import JPEG, fresh, papers

A, B = "xiangning", "xixian"
SEED = "7e" * 32
SEQ = itertools.count(1)
PEOPLE = itertools.count(900_000)  # persons the matrix's own claims and registrations use
# path parameters that name a part of something a ref already covers, not an owner
PARTS = {"round_id", "user_id", "sha256"}


def request_id() -> str:
    return f"tenant-{next(SEQ):08d}"


# ------------------------------------------------------------------ keys and calls


def key_id(tenant: str, role: str) -> str:
    return f"{tenant}-{role}"


def intruder_id(role: str) -> str:
    """A key of tenant B for tenant A's records; its merchant key acts for A's merchant, so
    that only the tenant can stop it."""
    return f"{B}-{role}-for-{A}" if role == "merchant" else key_id(B, role)


def write_keys(path: Path) -> None:
    keys = [keyfile.new_key(r, key_id=f"dev-{r}", merchant_id=shop("dev", r)) for r in ROLES]
    for tenant in (A, B):
        keys += [
            keyfile.new_key(r, [tenant], key_id=key_id(tenant, r), merchant_id=shop(tenant, r))
            for r in ROLES
        ]
    keys.append(
        keyfile.new_key("merchant", [B], key_id=intruder_id("merchant"), merchant_id=f"{A}-shop")
    )
    keyfile.write(path, keys)


def shop(tenant: str, role: str) -> str | None:
    return f"{tenant}-shop" if role == "merchant" else None


async def send(
    service: Service,
    key: ApiKey,
    method: str,
    path_qs: str,
    payload: Any = None,
    *,
    raw: tuple[bytes, str] | None = None,
) -> Response:
    """A signed call; `raw`: (body, content type) instead of a JSON payload."""
    body, content_type = raw or (
        b"" if payload is None else msgspec.json.encode(payload),
        "application/json",
    )
    headers = signed_headers(key, method, path_qs, body)
    headers["Content-Type"] = content_type
    async with service.session.request(
        method, service.url + path_qs, data=body, headers=headers
    ) as resp:
        raw_body = await resp.read()
        json = resp.headers.get("Content-Type", "").startswith("application/json")
        decoded = msgspec.json.decode(raw_body) if raw_body and json else raw_body
        return Response(resp.status, decoded, dict(resp.headers))


def ok(resp: Response, *statuses: int) -> Any:
    assert resp.status in (statuses or (200, 201)), (resp.status, resp.body)
    return resp.body


# ------------------------------------------------------------------ the seeded world


@dataclass
class World:
    """One tenant's records, made with its own scoped keys."""

    tenant: str
    merchant: str
    campaigns: dict[str, str]  # main, staff, spare, future, lottery -> id
    ids: dict[str, str] = field(default_factory=dict)  # path parameter -> a record's id
    staff_person: int = 0
    fresh_voucher: dict[str, Any] = field(default_factory=dict)

    def traces(self) -> set[str]:
        """Strings that would betray this tenant's records in another tenant's answer."""
        mine = [v for k, v in self.ids.items() if k != "round_id"]  # a round's name: "r1"
        return {*self.campaigns.values(), self.merchant, *mine}


async def build_world(service: Service, tenant: str, first_person: int) -> World:
    def key(role: str) -> ApiKey:
        return service.keys[key_id(tenant, role)]

    people = itertools.count(first_person)
    world = World(
        tenant,
        f"{tenant}-shop",
        {
            name: f"{tenant}-{name}-{unique_id('c')}"
            for name in ("main", "staff", "spare", "future", "lottery")
        },
    )
    merchant = {"name": "家电城", "county_code": "141029", "categories": ["appliance", "furniture"]}
    ok(await send(service, key("ops"), "PUT", f"/v1/merchants/{world.merchant}", merchant))
    closes = datetime.now(UTC) + timedelta(minutes=30)  # applications; the round, in an hour
    lottery = campaign(quota=10, opens_in_s=-1)
    lottery["rounds"][0] |= {
        "allocation": "lottery",
        "applications_close_at": iso(closes),
        "draws_at": iso(closes + timedelta(minutes=10)),
        "commitment": hashlib.sha256(bytes.fromhex(SEED)).hexdigest(),
    }
    bodies = {
        "main": campaign(quota=10_000),
        "staff": campaign(mode="staff"),
        "spare": campaign(),
        "future": campaign(opens_in_s=3600),
        "lottery": lottery,
    }
    for name, body in bodies.items():
        ok(await send(service, key("ops"), "PUT", f"/v1/campaigns/{world.campaigns[name]}", body))
    held = await voucher(service, world, next(people))
    world.ids |= {"voucher_id": held["voucher_id"], "user_id": held["user_id"], "round_id": "r1"}
    world.fresh_voucher = await voucher(service, world, next(people))
    world.ids["redemption_id"] = await redeemed(service, world, next(people))
    refund = {"request_id": request_id(), "amount_fen": 100, "reason": "退货"}
    path = f"/v1/redemptions/{world.ids['redemption_id']}/refunds"
    world.ids["refund_id"] = ok(await send(service, key("payment"), "POST", path, refund))[
        "refund_id"
    ]
    world.ids["decided_redemption"] = await redeemed(service, world, next(people))
    paid = await redeemed(service, world, next(people))
    for rid in (paid, world.ids["decided_redemption"]):
        path = f"/v1/redemptions/{rid}/documents"
        submitted = ok(await send(service, key("merchant"), "POST", path, raw=papers(300_000)))
    world.ids["sha256"] = submitted["files"][0]["sha256"]  # a file of decided_redemption
    approve = {
        "request_id": request_id(),
        "decision": "approve",
        "reason": "ok",
        "override_reason": "checked by hand",
    }
    ok(await send(service, key("auditor"), "POST", f"/v1/settlements/{paid}/decision", approve))
    batch = {"request_id": request_id(), "merchant_id": world.merchant}
    out = ok(await send(service, key("auditor"), "POST", "/v1/disbursements", batch))
    world.ids["disbursement_id"] = out["disbursements"][0]["disbursement_id"]
    world.staff_person = next(people)
    registration = registration_of(world.staff_person)
    path = f"/v1/campaigns/{world.campaigns['staff']}/registrations"
    ok(await send(service, key("app"), "POST", path, registration))
    path = f"/v1/campaigns/{world.campaigns['lottery']}/claims"
    applied = ok(await send(service, key("app"), "POST", path, claim(next(people))), 202)
    world.ids["application_id"] = applied["application_id"]
    return world


async def voucher(service: Service, world: World, person: int) -> dict[str, Any]:
    """A voucher of the tenant's main campaign, claimed with its app key."""
    path = f"/v1/campaigns/{world.campaigns['main']}/claims"
    key = service.keys[key_id(world.tenant, "app")]
    body: dict[str, Any] = ok(await send(service, key, "POST", path, claim(person)))
    return body


async def redeemed(service: Service, world: World, person: int) -> str:
    """A redemption at the tenant's merchant, made with its payment key."""
    body = payment_of(await voucher(service, world, person), world.merchant)
    key = service.keys[key_id(world.tenant, "payment")]
    return str(ok(await send(service, key, "POST", "/v1/redemptions", body))["redemption_id"])


def payment_of(voucher: dict[str, Any], merchant_id: str) -> dict[str, Any]:
    order = unique_id("o")
    return {
        "request_id": f"pay-{order}",
        "voucher_id": voucher["voucher_id"],
        "user_id": voucher["user_id"],
        "merchant_id": merchant_id,
        "order_id": order,
        "order_amount_fen": 300_000,
        "paid_at": datetime.now(UTC).isoformat(),
        "items": [fridge(300_000)],
    }


def registration_of(n: int) -> dict[str, Any]:
    return {
        "request_id": request_id(),
        "user_id": f"u{n}",
        "person": {"id_number": id_number(n), "name": "张三", "phone": "13912345678"},
    }


@pytest.fixture(scope="module")
async def service(keyspace: Keyspace, workdir: Path) -> AsyncIterator[Service]:
    data_dir = workdir / f"data-{keyspace.name}"
    write_keys(data_dir / "keys.toml")
    async with running_service(keyspace, data_dir, connections=200) as running:
        yield running


@pytest.fixture(scope="module")
async def worlds(service: Service) -> dict[str, World]:
    a, b = await asyncio.gather(build_world(service, A, 700_000), build_world(service, B, 800_000))
    await service.drained()
    return {A: a, B: b}


# ------------------------------------------------------------------ what A holds, read back


async def state(redis: Redis, pg: asyncpg.Pool, world: World) -> list[Any]:
    """Everything of the tenant a request could change: each campaign's keys (DUMPed: any
    type, exact), its stream's last id, its merchant, its settlement rows and batches."""
    found: list[Any] = []
    for campaign_id in world.campaigns.values():
        ck = CampaignKeys(campaign_id)
        names = [
            ck.definition, ck.ledger, ck.persons, ck.accounts, ck.vouchers, ck.registrations,
            ck.winners, ck.expiry, ck.redemptions, ck.orders, ck.refunds, ck.applications,
            ck.applicants, ck.applicant_accounts, ck.round("r1"), ck.entries("r1"), ck.draw("r1"),
        ]  # fmt: skip
        found += [await redis.dump(name) for name in names]
        found.append((await redis.xinfo_stream(ck.events))["last-generated-id"])
    found.append(await redis.hget(MERCHANTS, world.merchant))
    ids = list(world.campaigns.values())
    found += await pg.fetch(
        "SELECT * FROM settlements WHERE campaign_id = ANY($1) ORDER BY redemption_id", ids
    )
    found += await pg.fetch(
        "SELECT * FROM disbursements WHERE merchant_id = $1 ORDER BY disbursement_id",
        world.merchant,
    )
    found.append(await pg.fetchval("SELECT count(*) FROM audit_log WHERE tenant = $1", A))
    return found


# ------------------------------------------------------------------ the matrix


@dataclass
class Call:
    params: dict[str, str] = field(default_factory=dict)  # path parameters over the world's
    body: Any = None
    query: str = ""
    raw: tuple[bytes, str] | None = None


Case = Callable[[World, str], Call]


def _campaign(name: str, body: Callable[[World, str], Any] | None = None) -> Case:
    def case(w: World, role: str) -> Call:
        return Call({"campaign_id": w.campaigns[name]}, body(w, role) if body else None)

    return case


def _claim(w: World, role: str) -> Call:
    if role == "merchant":  # face to face, for the person registered in the staff campaign
        body = claim(w.staff_person, request_id=request_id(), staff_id="clerk-1")
        return Call({"campaign_id": w.campaigns["staff"]}, body)
    return Call({"campaign_id": w.campaigns["main"]}, claim(next(PEOPLE), request_id=request_id()))


def _with_request_id(**fields: Any) -> Case:
    return lambda w, role: Call(body={"request_id": request_id(), **fields})


# route (its handler's name) -> the request that the matrix sends, with the world's ids
CASES: dict[str, Case] = {
    "put_campaign": _campaign("future", lambda w, r: campaign(opens_in_s=3600)),
    "get_campaign": _campaign("main"),
    "pause": _campaign("spare", lambda w, r: {"request_id": request_id()}),
    "resume": _campaign("spare", lambda w, r: {"request_id": request_id()}),
    "round_budget": _campaign(
        "main",
        lambda w, r: {
            "request_id": request_id(),
            "expected_budget_fen": None,
            "budget_fen": 10**12,
        },
    ),
    "put_merchant": lambda w, r: Call(
        body={"name": "家电城", "county_code": "141029", "categories": ["appliance", "furniture"]}
    ),
    "get_merchant": lambda w, r: Call(),
    "ops_overview": lambda w, r: Call(),
    "register": _campaign("staff", lambda w, r: registration_of(next(PEOPLE))),
    "claim": _claim,
    "get_voucher": lambda w, r: Call(),
    "user_vouchers": lambda w, r: Call(),
    "get_application": lambda w, r: Call(),
    "run_draw": _campaign("lottery", lambda w, r: {"request_id": request_id(), "seed": SEED}),
    "get_draw": _campaign("lottery"),
    "redeem": lambda w, r: Call(body=payment_of(w.fresh_voucher, w.merchant)),
    "get_redemption": lambda w, r: Call(),
    "refund": _with_request_id(amount_fen=100, reason="退货"),
    "clawback_repaid": _with_request_id(),
    "upload_documents": lambda w, r: Call(raw=papers(300_000)),
    "list_settlements": lambda w, r: Call(),
    "decide": lambda w, r: Call(
        {"redemption_id": w.ids["decided_redemption"]},
        {"request_id": request_id(), "decision": "reject", "reason": "invoice unreadable"},
    ),
    "disburse": _with_request_id(),
    "disbursement_paid": _with_request_id(),
    "report": _campaign("main"),
    "reconciliation": lambda w, r: Call(
        {"campaign_id": w.campaigns["main"]}, query=f"?date={datetime.now(UTC).date()}"
    ),
    "get_settlement": lambda w, r: Call({"redemption_id": w.ids["decided_redemption"]}),
    "settlement_file": lambda w, r: Call({"redemption_id": w.ids["decided_redemption"]}),
    "list_disbursements": lambda w, r: Call(),
    "get_disbursement": lambda w, r: Call(),
    "audit_log": lambda w, r: Call(),
    "risk_report": _campaign("main"),
}
# refusals the right tenant may meet, as any caller would at that moment
USUAL = {"NOT_OPEN", "NO_CLAWBACK_DUE"}
MATRIX = [(r.handler.__name__, role) for r in ROUTES for role in r.roles]
ROUTE_OF = {r.handler.__name__: r for r in ROUTES}


def target(route: Route, world: World, call: Call) -> str:
    params = {**world.ids, "campaign_id": world.campaigns["main"], "merchant_id": world.merchant}
    params |= call.params
    path = re.sub(r"{(\w+)}", lambda m: params[m.group(1)], route.path)
    return path + call.query


@pytest.mark.fast
def test_every_route_has_a_tenant_rule_and_a_matrix_case() -> None:
    """A route added to the table without a rule that covers its path, or without a case
    here, fails this test (and one without any rule cannot even be declared)."""
    for route in ROUTES:
        rule = route.tenant
        assert isinstance(rule, tenancy.Rule), route.path
        assert rule.refs or rule.lists, f"{route.path}: its rule touches nothing"
        named = {ref.name for ref in rule.refs if not ref.in_body}
        owners = set(re.findall(r"{(\w+)}", route.path)) - PARTS
        assert owners <= named, f"{route.method} {route.path}: no tenant rule for {owners - named}"
        assert route.handler.__name__ in CASES, f"{route.path}: add a tenant matrix case"


@pytest.mark.fast
def test_a_route_cannot_be_declared_without_a_tenant_rule() -> None:
    with pytest.raises(TypeError, match="tenant"):
        Route("GET", "/v1/new", ROUTES[0].handler, ("ops",), "a new route", None, VoucherOut)  # type: ignore[call-arg]


@pytest.mark.parametrize(("name", "role"), MATRIX, ids=[f"{n}-{r}" for n, r in MATRIX])
async def test_route_role_tenant(
    service: Service,
    redis: Redis,
    pg: asyncpg.Pool,
    worlds: dict[str, World],
    name: str,
    role: str,
) -> None:
    route, world = ROUTE_OF[name], worlds[A]
    call = CASES[name](world, role)
    path = target(route, world, call)
    traces = world.traces()

    before = await state(redis, pg, world)
    other = await send(
        service, service.keys[intruder_id(role)], route.method, path, call.body, raw=call.raw
    )
    assert await state(redis, pg, world) == before, "another tenant's key changed something"
    if route.tenant.lists:
        ok(other)
        assert not [t for t in traces if t.encode() in msgspec.json.encode(other.body)]
    else:
        assert other.status == 403, (other.status, other.body)
        error = other.body["error"]
        assert error["code"] == "FORBIDDEN" and "tenant" in error["message"], error
        assert not [t for t in traces if t in error["message"]], error

    right = await send(
        service, service.keys[key_id(A, role)], route.method, path, call.body, raw=call.raw
    )
    if right.status >= 400:
        assert right.body["error"]["code"] in USUAL, (right.status, right.body)
    if route.tenant.lists and route.method == "GET":
        assert [t for t in traces if t.encode() in msgspec.json.encode(right.body)], right.body


# ------------------------------------------------------------------ lists, overviews, PUTs


async def test_platform_keys_see_every_tenant_and_scoped_keys_only_theirs(
    service: Service, worlds: dict[str, World]
) -> None:
    platform = await send(service, service.key("ops"), "GET", "/v1/ops/overview")
    shown = {c["campaign_id"]: c["tenant"] for c in ok(platform)["campaigns"]}
    for world in worlds.values():
        assert {shown[c] for c in world.campaigns.values()} == {world.tenant}
    settlements = await send(service, service.key("auditor"), "GET", "/v1/settlements")
    campaigns = {s["campaign_id"] for s in ok(settlements)["settlements"]}
    assert {worlds[A].campaigns["main"], worlds[B].campaigns["main"]} <= campaigns
    for tenant in (A, B):
        mine = await send(service, service.keys[key_id(tenant, "ops")], "GET", "/v1/ops/overview")
        assert {c["tenant"] for c in ok(mine)["campaigns"]} == {tenant}


async def test_a_defining_put_takes_the_tenant_it_may(
    service: Service, worlds: dict[str, World]
) -> None:
    """Platform key without tenant: `default`; scoped key: its own; another value for an
    existing record: 409 TENANT_CONFLICT (and nothing changes); a tenant outside the
    key's: 403; a key of several tenants must name one."""
    platform, scoped = service.key("ops"), service.keys[key_id(A, "ops")]
    body = campaign(opens_in_s=3600)
    plain = unique_id()
    ok(await send(service, platform, "PUT", f"/v1/campaigns/{plain}", body))
    got = ok(await send(service, platform, "GET", f"/v1/campaigns/{plain}"))
    assert got["definition"]["tenant"] == "default"
    conflict = await send(service, platform, "PUT", f"/v1/campaigns/{plain}", body | {"tenant": A})
    assert conflict.status == 409 and conflict.body["error"]["code"] == "TENANT_CONFLICT"
    assert (
        ok(await send(service, platform, "GET", f"/v1/campaigns/{plain}"))["definition"]
        == got["definition"]
    )
    refused = await send(
        service, scoped, "PUT", f"/v1/campaigns/{unique_id()}", body | {"tenant": B}
    )
    assert refused.status == 403 and refused.body["error"]["code"] == "FORBIDDEN"
    future = worlds[A].campaigns["future"]
    kept = ok(await send(service, platform, "PUT", f"/v1/campaigns/{future}", body))
    assert kept["definition"]["tenant"] == A  # no tenant given: the campaign keeps its own

    merchant = {"name": "五金店", "county_code": "141029", "categories": ["hardware"]}
    shop = unique_id("m")
    ok(await send(service, scoped, "PUT", f"/v1/merchants/{shop}", merchant), 201)
    assert ok(await send(service, platform, "GET", f"/v1/merchants/{shop}"))["tenant"] == A
    moved = await send(service, platform, "PUT", f"/v1/merchants/{shop}", merchant | {"tenant": B})
    assert moved.status == 409 and moved.body["error"]["code"] == "TENANT_CONFLICT"
    assert ok(await send(service, platform, "GET", f"/v1/merchants/{shop}"))["tenant"] == A


async def test_a_redemption_needs_voucher_and_merchant_of_one_tenant(
    service: Service, worlds: dict[str, World]
) -> None:
    """Even a platform-wide payment key cannot apply tenant A's voucher at B's merchant."""
    path = f"/v1/campaigns/{worlds[A].campaigns['main']}/claims"
    voucher = ok(
        await send(service, service.keys[key_id(A, "app")], "POST", path, claim(next(PEOPLE)))
    )
    body = payment_of(voucher, worlds[B].merchant)
    refused = await send(service, service.key("payment"), "POST", "/v1/redemptions", body)
    assert refused.status == 403 and refused.body["error"]["code"] == "MERCHANT_NOT_ELIGIBLE"
    scoped = await send(
        service, service.keys[key_id(A, "payment")], "POST", "/v1/redemptions", body
    )
    assert scoped.status == 403 and scoped.body["error"]["code"] == "FORBIDDEN"
    body = payment_of(voucher, worlds[A].merchant)
    ok(await send(service, service.key("payment"), "POST", "/v1/redemptions", body), 201)


def test_a_check_counts_the_redemptions_of_another_tenant_it_hides() -> None:
    """A platform-wide key reads every id a check names (the first SHOWN); a scoped one
    reads the others' count in their place, and the count of those not named as before."""
    others = [f"c.r{n:02d}" for n in range(integrity.SHOWN + 2)]
    found = {"unique_invoice": others, "unique_documents": [], "distinct_photos": []}
    check = integrity.results(found)[0]
    assert check.detail.endswith("c.r19 and 2 more")
    seen = integrity.hide(check, {"c.r00", "c.r05", "c.r21"})  # c.r21: not named anyway
    kept = [rid for rid in others[: integrity.SHOWN] if rid not in {"c.r00", "c.r05"}]
    assert seen.redemption_ids == kept
    assert seen.detail == (
        f"same invoice number as {', '.join(kept)}, 2 redemptions of other tenants and 2 more"
    )
    assert integrity.hide(check, {"d.r1"}) is check


async def desk(service: Service, world: World) -> list[bytes]:
    """What the tenant's own auditor key reads on the desk: the queue (all, failed a check),
    the batches, the whole audit log and its main campaign's risk report (JSON, CSV)."""
    key = service.keys[key_id(world.tenant, "auditor")]
    risk = f"/v1/campaigns/{world.campaigns['main']}/risk"
    paths = [
        "/v1/settlements",
        "/v1/settlements?checks_passed=false",
        "/v1/disbursements",
        "/v1/audit-log?limit=1000",
        risk,
        risk + "?format=csv",
    ]
    bodies = [ok(await send(service, key, "GET", path)) for path in paths]
    assert "next_after" not in bodies[3], "the tenant's log is longer than one page"
    return [b if isinstance(b, bytes) else msgspec.json.encode(b) for b in bodies]


def integrity_failed(body: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """The integrity checks a record fails: (detail, redemption_ids) of each."""
    return {
        c["name"]: (c["detail"], c.get("redemption_ids", []))
        for c in body["checks"]
        if c["name"] in integrity.NAMES and not c["passed"]
    }


async def test_the_desk_of_a_scoped_auditor_shows_nothing_of_the_other_tenant(
    service: Service, worlds: dict[str, World]
) -> None:
    """One invoice and one file used for a redemption of each tenant: the checks span every
    tenant, so both records fail; a key of either tenant reads the other's redemption, and
    the key whose upload re-ran its record's checks, only as "of another tenant" (record,
    upload and decision answers, queue, batches, audit log), while a platform-wide key
    reads their ids. Nothing else of the other tenant is on the desk's reads either: every
    id of a tenant's world starts with the tenant's name."""
    a, b = worlds[A], worlds[B]
    rids = {t: await redeemed(service, worlds[t], next(PEOPLE)) for t in (A, B)}
    shared = {"invoice_no": f"SHARED-{unique_id()}", "files": {"energy_label": fresh(JPEG)}}
    path = f"/v1/redemptions/{rids[A]}/documents"
    first = await send(
        service, service.keys[key_id(A, "merchant")], "POST", path, raw=papers(300_000, **shared)
    )
    assert integrity_failed(ok(first)) == {}
    path = f"/v1/redemptions/{rids[B]}/documents"
    second = await send(
        service, service.keys[key_id(B, "merchant")], "POST", path, raw=papers(300_000, **shared)
    )
    hidden = {
        name: (f"{integrity.SAME[name]} {integrity.OTHER_TENANT}", [])
        for name in ("unique_invoice", "unique_documents")
    }
    assert integrity_failed(ok(second)) == hidden
    auditor = {t: service.keys[key_id(t, "auditor")] for t in (A, B)}
    for t, other in ((A, B), (B, A)):
        mine = ok(await send(service, auditor[t], "GET", f"/v1/settlements/{rids[t]}"))
        assert integrity_failed(mine) == hidden
        seen = ok(await send(service, service.key("auditor"), "GET", f"/v1/settlements/{rids[t]}"))
        assert {n: ids for n, (_, ids) in integrity_failed(seen).items()} == {
            "unique_invoice": [rids[other]],
            "unique_documents": [rids[other]],
        }

    # B's record approved (overridden) and batched by B's auditor: its answers hide A's
    decision = {
        "request_id": request_id(),
        "decision": "approve",
        "reason": "ok",
        "override_reason": "the other county's record is another sale",
    }
    path = f"/v1/settlements/{rids[B]}/decision"
    assert integrity_failed(ok(await send(service, auditor[B], "POST", path, decision))) == hidden
    batch = {"request_id": request_id(), "merchant_id": b.merchant}
    ok(await send(service, auditor[B], "POST", "/v1/disbursements", batch))

    # A's log: the rerun B's upload caused, by a key and for a redemption it does not name
    log = f"/v1/audit-log?redemption_id={rids[A]}"
    (rerun,) = [e for e in ok(await send(service, auditor[A], "GET", log))["entries"]
                if e["action"] == "checks_rerun"]  # fmt: skip
    assert (rerun["actor"], rerun["detail"]["cause"]) == (
        integrity.OTHER_TENANT_KEY,
        integrity.OTHER_TENANT,
    )
    (rerun,) = [e for e in ok(await send(service, service.key("auditor"), "GET", log))["entries"]
                if e["action"] == "checks_rerun"]  # fmt: skip
    assert (rerun["actor"], rerun["detail"]["cause"]) == (key_id(B, "merchant"), rids[B])
    by_b = f"/v1/audit-log?actor={key_id(B, 'merchant')}"
    assert ok(await send(service, auditor[A], "GET", by_b))["entries"] == []

    for world, other in ((a, b), (b, a)):
        bodies = await desk(service, world)
        assert not [body for body in bodies if other.tenant.encode() in body]
        assert all(world.tenant.encode() in body for body in bodies)


async def test_audit_entries_and_log_lines_name_the_key_and_its_tenant(
    pg: asyncpg.Pool, worlds: dict[str, World]
) -> None:
    rows = await pg.fetch(
        "SELECT actor, tenant, details->'key_tenants' AS scope FROM audit_log WHERE actor = $1",
        key_id(A, "auditor"),
    )
    assert rows and {(r["tenant"], r["scope"]) for r in rows} == {(A, f'["{A}"]')}
    request = make_mocked_request("POST", "/v1/campaigns/c/pause")
    verified = Verified(ApiKey(id="k", secret="s", role="ops", tenants=frozenset({A})), "n", 0)
    lines: list[RequestLine] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logs, "batched", lines.append)
        response = web.Response(status=200)
        series = metrics.RouteSeries("/tenants-test/pause")
        finish(request, response, series, time.perf_counter(), "pause", verified, None, None, A)
    (line,) = lines
    assert (line.key, line.key_tenants, line.tenant) == ("k", [A], A)


# ------------------------------------------------------------------ records from before


async def test_records_from_before_tenants_belong_to_the_default_one(
    servers: Servers, keyspace: Keyspace, redis: Redis, tmp_path: Path
) -> None:
    """Migration 7 gives every row the default tenant; a campaign or merchant stored in
    Redis without one reads as the default tenant's. Migration 8's backfill gives records
    stored before it (here: one of before tenants, one of tenant A sharing its invoice) the
    integrity checks, each audit entry in its record's tenant."""
    async with database_at(servers, f"{keyspace.name}_before"[:60], 6) as pool:
        async with pool.acquire() as conn:
            await conn.execute(
                """
                INSERT INTO campaigns (campaign_id, definition, version)
                    VALUES ('old', '{"definition": {"name": "old"}}', 1);
                INSERT INTO merchants VALUES ('old-shop', 'x', '141029', '{bed}', 'active', 1, 0);
                INSERT INTO settlements (redemption_id, campaign_id, merchant_id, status, meta,
                    checks, checks_passed, submitted_at)
                    VALUES ('old.r', 'old', 'old-shop', 'submitted', '{"invoice_no": "old-1"}',
                            '[]', true, now());
                INSERT INTO disbursements (disbursement_id, merchant_id, created_by, due_date,
                    total_fen) VALUES ('d-old', 'old-shop', 'k', '2027-01-04', 1);
                INSERT INTO audit_log (actor, action, subject) VALUES ('k', 'approved', 'old.r');
                """
            )
        assert await store.migrate(pool) >= 7
        for table in ("campaigns", "merchants", "settlements", "disbursements", "audit_log"):
            assert await pool.fetchval(f"SELECT array_agg(DISTINCT tenant) FROM {table}") == [
                "default"
            ], table
        await pool.execute(
            """
            INSERT INTO settlements (redemption_id, campaign_id, merchant_id, status, meta,
                checks, checks_passed, submitted_at, tenant, integrity_pending)
                VALUES ('new.r', 'new', 'new-shop', 'submitted', '{"invoice_no": " OLD-1 "}',
                        '[]', true, now(), $1, true)
            """,
            A,
        )
        assert await integrity.backfill(pool, LocalStore(tmp_path)) == 2
        flagged = await pool.fetch(
            "SELECT subject, tenant FROM audit_log WHERE actor = 'migration' ORDER BY subject"
        )
        assert [tuple(r) for r in flagged] == [("new.r", A), ("old.r", "default")]

    campaigns = Campaigns(redis, Scripts(redis))
    campaign_id = unique_id()
    await campaigns.put(campaign_id, msgspec.convert(campaign(opens_in_s=3600), CampaignDef))
    ck = CampaignKeys(campaign_id)
    stored = msgspec.json.decode(await redis.get(ck.definition))
    del stored["definition"]["tenant"]  # as stored before tenants existed
    await redis.set(ck.definition, msgspec.json.encode(stored))
    cached = await Campaigns(redis, Scripts(redis)).load(campaign_id)
    assert (cached.tenant, cached.definition.tenant) == ("default", "default")
    await redis.hset(
        MERCHANTS,
        "old-shop",
        b'{"merchant_id":"old-shop","name":"x",'
        b'"county_code":"141029","categories":["bed"],"status":"active"}',
    )
    assert await tenancy.Owners(redis, campaigns, None).tenant("merchant", "old-shop") == "default"


async def test_a_rebuild_keeps_tenants(
    service: Service, keyspace: Keyspace, redis: Redis, pg: asyncpg.Pool
) -> None:
    ops = service.keys[key_id(A, "ops")]
    campaign_id, shop = unique_id(), unique_id("m")
    ok(await send(service, ops, "PUT", f"/v1/campaigns/{campaign_id}", campaign()))
    merchant = {"name": "家具城", "county_code": "141029", "categories": ["furniture"]}
    ok(await send(service, ops, "PUT", f"/v1/merchants/{shop}", merchant))
    await service.drained()
    await lose_campaign(redis, campaign_id)
    await redis.hdel(MERCHANTS, shop)
    await restore_global(redis, pg)
    await rebuild(redis, pg, campaign_id)
    stored = msgspec.json.decode(await redis.get(CampaignKeys(campaign_id).definition))
    assert stored["definition"]["tenant"] == A
    assert msgspec.json.decode(await redis.hget(MERCHANTS, shop))["tenant"] == A
    assert (
        ok(await send(service, ops, "GET", f"/v1/campaigns/{campaign_id}"))["definition"]["tenant"]
        == A
    )
    other = await send(
        service, service.keys[key_id(B, "ops")], "GET", f"/v1/campaigns/{campaign_id}"
    )
    assert other.status == 403
