"""Signatures and roles (API.md "Authentication"): every malformed, tampered, stale or
replayed request is 401 UNAUTHENTICATED and changes nothing (a claim refused before the
gate, replayed while the refusal holds, is refused the same way); a role that may not call
an endpoint is 403 FORBIDDEN. Claims check their nonce inside the batched Redis script,
other calls in the middleware, so both paths are exercised."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from issuer import keys
from issuer.auth import ApiKey, signature
from issuer.client import Response, signed_headers
from issuer.keys import CampaignKeys
from tests.conftest import Service, unique_id
from tests.people import campaign, claim

SEQ = itertools.count(1)
ENC = msgspec.json.encode


async def send(
    service: Service, method: str, path: str, body: bytes, headers: dict[str, str]
) -> Response:
    async with service.session.request(
        method, service.url + path, data=body, headers=headers
    ) as resp:
        raw = await resp.read()
        json = resp.headers.get("Content-Type", "").startswith("application/json")
        decoded = msgspec.json.decode(raw) if raw and json else raw.decode("utf-8", "replace")
        return Response(resp.status, decoded, dict(resp.headers))


def assert_error(resp: Response, status: int, code: str) -> None:
    assert resp.status == status, (resp.status, resp.body)
    assert isinstance(resp.body, dict) and set(resp.body) >= {"error"}, resp.body
    err = resp.body["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["retryable"], bool)


def sign_raw(
    key: ApiKey, method: str, path: str, body: bytes, ts: str, nonce: str
) -> dict[str, str]:
    """Headers for any X-Timestamp / X-Nonce text, correctly signed over it."""
    return {
        "X-Api-Key": key.id,
        "X-Timestamp": ts,
        "X-Nonce": nonce,
        "X-Signature": signature(key.secret, method, path, ts, nonce, body),
        "Content-Type": "application/json",
    }


async def new_campaign(service: Service, **kwargs: Any) -> str:
    campaign_id = unique_id()
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(**kwargs))
    assert resp.status == 201, resp.body
    return campaign_id


async def campaign_state(redis: Redis, campaign_id: str) -> tuple[Any, ...]:
    ck = CampaignKeys(campaign_id)
    return (
        await redis.hgetall(ck.vouchers),
        await redis.hgetall(ck.persons),
        await redis.hgetall(ck.accounts),
        await redis.hgetall(ck.ledger),
        await redis.hgetall(ck.round("r1")),
    )


@dataclass
class Target:
    """One endpoint to attack: what a valid request looks like, and what it would write."""

    role: str
    method: str
    path: str
    other_path: str  # same endpoint, another resource (path tampering)
    ok_status: int
    body: Callable[[], bytes]  # a fresh valid body (another person / merchant each time)
    state: Callable[[], Awaitable[Any]]  # everything the endpoint could change


@pytest.fixture(scope="module")
async def targets(service: Service, redis: Redis) -> dict[str, Target]:
    a, b = await new_campaign(service), await new_campaign(service)
    merchant_a, merchant_b = unique_id("m"), unique_id("m")

    async def claim_state() -> Any:
        return await campaign_state(redis, a), await campaign_state(redis, b)

    async def merchant_state() -> Any:
        return await redis.hgetall(keys.MERCHANTS)

    async def nothing() -> None:
        return None

    def merchant_body() -> bytes:
        return ENC(
            {"name": f"shop {next(SEQ)}", "county_code": "141029", "categories": ["appliance"]}
        )

    return {
        "claim": Target(
            "app",
            "POST",
            f"/v1/campaigns/{a}/claims",
            f"/v1/campaigns/{b}/claims",
            201,
            lambda: ENC(claim(50_000 + next(SEQ))),
            claim_state,
        ),
        "get_campaign": Target(
            "ops", "GET", f"/v1/campaigns/{a}", f"/v1/campaigns/{b}", 200, lambda: b"", nothing
        ),
        "put_merchant": Target(
            "ops",
            "PUT",
            f"/v1/merchants/{merchant_a}",
            f"/v1/merchants/{merchant_b}",
            201,
            merchant_body,
            merchant_state,
        ),
    }


def bad_request(case: str, key: ApiKey, t: Target) -> tuple[str, bytes, dict[str, str]]:
    """(path to send to, body to send, headers) for one way of getting it wrong."""
    path, body = t.path, t.body()
    other_body = t.body()
    if other_body == body:  # a GET: any body at all differs from the empty one signed
        other_body = b'{"x": 1}'

    def sign(p: str = path, b: bytes = body, **kw: Any) -> dict[str, str]:
        return signed_headers(key, t.method, p, b, **kw)

    def without(header: str) -> dict[str, str]:
        headers = sign()
        del headers[header]
        return headers

    stranger = ApiKey(id="dev-stranger", secret=key.secret, role=key.role)
    impostor = msgspec.structs.replace(key, secret="0" * 48)
    ts = str(int(time.time()))
    nonce = "n" * 24
    cases: dict[str, Callable[[], tuple[str, bytes, dict[str, str]]]] = {
        "missing X-Api-Key": lambda: (path, body, without("X-Api-Key")),
        "missing X-Timestamp": lambda: (path, body, without("X-Timestamp")),
        "missing X-Nonce": lambda: (path, body, without("X-Nonce")),
        "missing X-Signature": lambda: (path, body, without("X-Signature")),
        "no headers at all": lambda: (path, body, {"Content-Type": "application/json"}),
        "unknown key": lambda: (path, body, signed_headers(stranger, t.method, path, body)),
        "signed with another secret": lambda: (
            path,
            body,
            signed_headers(impostor, t.method, path, body),
        ),
        "garbage signature": lambda: (path, body, {**sign(), "X-Signature": "0" * 64}),
        "body tampered": lambda: (path, other_body, sign()),
        "path tampered": lambda: (t.other_path, body, sign()),
        "query tampered": lambda: (path + "?x=2", body, sign(path + "?x=1")),
        "query added": lambda: (path + "?x=1", body, sign()),
        "query removed": lambda: (path, body, sign(path + "?x=1")),
        "timestamp 305 s in the past": lambda: (path, body, sign(timestamp=int(time.time()) - 305)),
        "timestamp 305 s in the future": lambda: (
            path,
            body,
            sign(timestamp=math.ceil(time.time()) + 305),
        ),
        "timestamp not a number": lambda: (
            path,
            body,
            sign_raw(key, t.method, path, body, "yesterday", nonce),
        ),
        "timestamp negative": lambda: (
            path,
            body,
            sign_raw(key, t.method, path, body, "-" + ts, nonce),
        ),
        "timestamp with 5000 digits": lambda: (
            path,
            body,
            sign_raw(key, t.method, path, body, "9" * 5000, nonce),
        ),
        "timestamp in superscript digits": lambda: (
            path,
            body,
            sign_raw(key, t.method, path, body, "²", nonce),
        ),
        "signature with non-ASCII characters": lambda: (
            path,
            body,
            {**sign(), "X-Signature": "é" * 64},
        ),
        "nonce 15 chars": lambda: (path, body, sign(nonce="a" * 15)),
        "nonce 65 chars": lambda: (path, body, sign(nonce="a" * 65)),
        "nonce with bad characters": lambda: (path, body, sign(nonce="abcdefgh.ijklmnop")),
        "nonce with a space": lambda: (path, body, sign(nonce="abcdefgh ijklmnop")),
    }
    return cases[case]()


BAD_CASES = [
    "missing X-Api-Key",
    "missing X-Timestamp",
    "missing X-Nonce",
    "missing X-Signature",
    "no headers at all",
    "unknown key",
    "signed with another secret",
    "garbage signature",
    "body tampered",
    "path tampered",
    "query tampered",
    "query added",
    "query removed",
    "timestamp 305 s in the past",
    "timestamp 305 s in the future",
    "timestamp not a number",
    "timestamp negative",
    "timestamp with 5000 digits",
    "timestamp in superscript digits",
    "signature with non-ASCII characters",
    "nonce 15 chars",
    "nonce 65 chars",
    "nonce with bad characters",
    "nonce with a space",
]
TARGETS = ["claim", "get_campaign", "put_merchant"]


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("target", TARGETS)
async def test_bad_signature_is_401_and_writes_nothing(
    service: Service, targets: dict[str, Target], target: str, case: str
) -> None:
    t = targets[target]
    before = await t.state()
    path, body, headers = bad_request(case, service.key(t.role), t)
    resp = await send(service, t.method, path, body, headers)
    assert_error(resp, 401, "UNAUTHENTICATED")
    assert await t.state() == before


@pytest.mark.parametrize("target", TARGETS)
async def test_timestamp_within_the_window_is_accepted(
    service: Service, targets: dict[str, Target], target: str
) -> None:
    t = targets[target]
    key = service.key(t.role)
    for ts in (math.ceil(time.time()) - 295, int(time.time()) + 295, None):
        body = t.body()
        resp = await send(
            service,
            t.method,
            t.path,
            body,
            signed_headers(key, t.method, t.path, body, timestamp=ts),
        )
        assert resp.status in (t.ok_status, 200), (ts, resp.body)


async def test_replayed_claim_is_401_and_changes_nothing(service: Service, redis: Redis) -> None:
    campaign_id = await new_campaign(service)
    path, body = f"/v1/campaigns/{campaign_id}/claims", ENC(claim(60_000))
    headers = signed_headers(service.key("app"), "POST", path, body)
    first = await send(service, "POST", path, body, headers)
    assert first.status == 201, first.body
    after_first = await campaign_state(redis, campaign_id)
    again = await send(service, "POST", path, body, headers)
    assert_error(again, 401, "UNAUTHENTICATED")
    assert await campaign_state(redis, campaign_id) == after_first
    assert len(after_first[0]) == 1, "exactly one voucher"


async def spent(redis: Redis, campaign_id: str, headers: dict[str, str]) -> bool:
    """Whether a claim's nonce is spent in its campaign's nonce bucket."""
    bucket = keys.nonce_bucket(int(headers["X-Timestamp"]))
    (hash_key,) = CampaignKeys(campaign_id).nonces(bucket, bucket)
    return bool(await redis.hexists(hash_key, headers["X-Nonce"]))


async def test_a_refused_claim_replayed_before_its_nonce_is_spent_gets_the_same_refusal(
    service: Service, redis: Redis
) -> None:
    """A refusal before the gate is answered at once, its nonce spent in a background
    batch: the same signed claim sent again at once is refused the same way, not 401 (it
    can only resubmit the same person's claim); the nonce is spent all the same."""
    campaign_id = await new_campaign(service, opens_in_s=600)
    path, body = f"/v1/campaigns/{campaign_id}/claims", ENC(claim(60_100))
    headers = signed_headers(service.key("app"), "POST", path, body)
    answers = await asyncio.gather(*(send(service, "POST", path, body, headers) for _ in range(4)))
    for resp in answers:
        assert_error(resp, 409, "NOT_OPEN")
    for _ in range(100):
        if await spent(redis, campaign_id, headers):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the refused claim's nonce was not spent")


async def test_a_refused_claim_replayed_once_the_round_opened_is_401_and_changes_nothing(
    service: Service, redis: Redis
) -> None:
    """The nonce a refusal spent in the background is refused by the gate once the answer
    would change (here: the round has opened)."""
    opens_in_s = 2.5
    campaign_id = await new_campaign(service, opens_in_s=opens_in_s)
    opens_at = time.monotonic() + opens_in_s
    path, body = f"/v1/campaigns/{campaign_id}/claims", ENC(claim(60_200))
    headers = signed_headers(service.key("app"), "POST", path, body)
    assert_error(await send(service, "POST", path, body, headers), 409, "NOT_OPEN")
    before = await campaign_state(redis, campaign_id)
    await asyncio.sleep(opens_at - time.monotonic() + 0.2)
    assert await spent(redis, campaign_id, headers)
    assert_error(await send(service, "POST", path, body, headers), 401, "UNAUTHENTICATED")
    assert await campaign_state(redis, campaign_id) == before, "nothing issued"
    fresh = await service.call("POST", path, claim(60_201), "app")
    assert fresh.status == 201, fresh.body  # the round is open indeed


async def test_replayed_get_is_401(service: Service) -> None:
    campaign_id = await new_campaign(service)
    path = f"/v1/campaigns/{campaign_id}"
    headers = signed_headers(service.key("ops"), "GET", path, b"")
    assert (await send(service, "GET", path, b"", headers)).status == 200
    assert_error(await send(service, "GET", path, b"", headers), 401, "UNAUTHENTICATED")


async def test_replayed_merchant_put_is_401_and_changes_nothing(service: Service) -> None:
    merchant_id = unique_id("m")
    path = f"/v1/merchants/{merchant_id}"
    active = ENC({"name": "五金店", "county_code": "141029", "categories": ["hardware"]})
    headers = signed_headers(service.key("ops"), "PUT", path, active)
    assert (await send(service, "PUT", path, active, headers)).status == 201
    suspended = {
        "name": "五金店",
        "county_code": "141029",
        "categories": ["hardware"],
        "status": "suspended",
    }
    assert (await service.call("PUT", path, suspended)).status == 200
    assert_error(await send(service, "PUT", path, active, headers), 401, "UNAUTHENTICATED")
    assert (await service.call("GET", path)).body["status"] == "suspended"


async def test_same_signed_claim_on_both_workers_succeeds_once(
    service: Service, redis: Redis
) -> None:
    campaign_id = await new_campaign(service)
    path, body = f"/v1/campaigns/{campaign_id}/claims", ENC(claim(61_000))
    headers = signed_headers(service.key("app"), "POST", path, body)
    responses = await asyncio.gather(
        *(send(service, "POST", path, body, headers) for _ in range(60))
    )
    assert sorted(r.status for r in responses) == [201] + [401] * 59
    for resp in responses:
        if resp.status == 401:
            assert_error(resp, 401, "UNAUTHENTICATED")
    assert await redis.hlen(CampaignKeys(campaign_id).vouchers) == 1


async def test_same_signed_get_on_both_workers_succeeds_once(service: Service) -> None:
    campaign_id = await new_campaign(service)
    path = f"/v1/campaigns/{campaign_id}"
    headers = signed_headers(service.key("ops"), "GET", path, b"")
    responses = await asyncio.gather(*(send(service, "GET", path, b"", headers) for _ in range(60)))
    assert sorted(r.status for r in responses) == [200] + [401] * 59


async def test_same_signed_merchant_put_on_both_workers_applies_once(
    service: Service, pg: asyncpg.Pool
) -> None:
    merchant_id = unique_id("m")
    path = f"/v1/merchants/{merchant_id}"
    body = ENC({"name": "家具城", "county_code": "141029", "categories": ["furniture"]})
    headers = signed_headers(service.key("ops"), "PUT", path, body)
    responses = await asyncio.gather(
        *(send(service, "PUT", path, body, headers) for _ in range(60))
    )
    assert sorted(r.status for r in responses) == [201] + [401] * 59
    await service.drained()
    written = await pg.fetchval(
        "SELECT count(*) FROM events WHERE type = 'merchant' AND data->>'merchant_id' = $1",
        merchant_id,
    )
    assert written == 1


# ------------------------------------------------------------------ roles


@pytest.fixture(scope="module")
async def role_world(service: Service) -> dict[str, str]:
    other = unique_id("m")
    resp = await service.call(
        "PUT",
        f"/v1/merchants/{other}",
        {"name": "别家店", "county_code": "141029", "categories": ["bed"]},
    )
    assert resp.status == 201
    return {
        "self": await new_campaign(service),
        "staff": await new_campaign(service, mode="staff"),
        "new": unique_id(),
        "other_merchant": other,
    }


STAFF_CLAIM = claim(62_000, staff_id="clerk-7")
FORBIDDEN = {
    "payment key claims": ("payment", "POST", "/v1/campaigns/{self}/claims", claim(62_001)),
    "ops key claims": ("ops", "POST", "/v1/campaigns/{self}/claims", claim(62_002)),
    "merchant key claims in a self-mode campaign": (
        "merchant",
        "POST",
        "/v1/campaigns/{self}/claims",
        STAFF_CLAIM,
    ),
    "app key claims in a staff-mode campaign": (
        "app",
        "POST",
        "/v1/campaigns/{staff}/claims",
        STAFF_CLAIM,
    ),
    "app key puts a campaign": ("app", "PUT", "/v1/campaigns/{new}", campaign()),
    "merchant key puts a campaign": ("merchant", "PUT", "/v1/campaigns/{new}", campaign()),
    "app key pauses": ("app", "POST", "/v1/campaigns/{self}/pause", {"request_id": "pause-001"}),
    "merchant key reads another merchant": (
        "merchant",
        "GET",
        "/v1/merchants/{other_merchant}",
        None,
    ),
    "payment key puts a merchant": (
        "payment",
        "PUT",
        "/v1/merchants/{other_merchant}",
        {"name": "x", "county_code": "141029", "categories": ["bed"], "status": "blacklisted"},
    ),
    "app key reads a campaign": ("app", "GET", "/v1/campaigns/{self}", None),
    "payment key registers": (
        "payment",
        "POST",
        "/v1/campaigns/{staff}/registrations",
        {
            "request_id": "reg-00001",
            "user_id": "u1",
            "person": {
                "id_number": STAFF_CLAIM["person"]["id_number"],
                "name": "张三",
                "phone": "13912345678",
            },
        },
    ),
}


@pytest.mark.parametrize("case", list(FORBIDDEN))
async def test_wrong_role_is_forbidden_and_writes_nothing(
    service: Service, redis: Redis, role_world: dict[str, str], case: str
) -> None:
    role, method, template, payload = FORBIDDEN[case]
    before = [await campaign_state(redis, role_world[m]) for m in ("self", "staff")]
    merchants_before = await redis.hgetall(keys.MERCHANTS)
    resp = await service.call(method, template.format(**role_world), payload, role=role)
    assert_error(resp, 403, "FORBIDDEN")
    assert [await campaign_state(redis, role_world[m]) for m in ("self", "staff")] == before
    assert await redis.hgetall(keys.MERCHANTS) == merchants_before
    assert await redis.hgetall(CampaignKeys(role_world["staff"]).registrations) == {}
    assert (await service.call("GET", f"/v1/campaigns/{role_world['new']}")).status == 404
    ledger = (await service.call("GET", f"/v1/campaigns/{role_world['self']}")).body
    assert ledger["status"] == "active"


async def test_right_roles_are_let_through(service: Service, role_world: dict[str, str]) -> None:
    """The controls of the refusals above."""
    ok = await service.call(
        "POST", f"/v1/campaigns/{role_world['self']}/claims", claim(62_100), role="app"
    )
    assert ok.status == 201, ok.body
    other = await service.call(
        "GET", f"/v1/merchants/{role_world['other_merchant']}", role="auditor"
    )
    assert other.status == 200
