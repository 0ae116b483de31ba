"""Staff mode (register first, then a merchant key claims face to face), registration
idempotency, merchants, and the PII rule: no ID number, name or phone is ever stored in
clear, in Redis or in PostgreSQL."""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from issuer.client import Response
from issuer.keys import CampaignKeys
from tests.conftest import Service, unique_id
from tests.people import XIANGNING_SEAT, campaign, id_number

# (ID number, name, phone as sent); every one of them is sent in this module
PEOPLE = [
    (id_number(80_001), "张三", "13912340001"),
    (id_number(80_002), "李四", "13912340002"),
    (id_number(80_003), "王五", "+8613912340003"),
    (id_number(80_004), "欧阳·娜娜", "13912340004"),
    (id_number(80_005), "赵六", "13912340005"),
    (id_number(80_006), "钱七", "13912340006"),
]


def assert_error(resp: Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body)
    err = resp.body["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and isinstance(err["retryable"], bool)
    return err  # type: ignore[no-any-return]


def registration(i: int, user: str, request_id: str | None = None) -> dict[str, Any]:
    number, name, phone = PEOPLE[i]
    return {
        "request_id": request_id or f"reg-{i:06d}-1",
        "user_id": user,
        "person": {"id_number": number, "name": name, "phone": phone},
    }


def staff_claim(
    user: str,
    request_id: str,
    *,
    i: int | None = None,
    ref: str | None = None,
    staff_id: str | None = "clerk-001",
) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": request_id, "user_id": user, "location": XIANGNING_SEAT}
    if i is not None:
        body["person"] = {"id_number": PEOPLE[i][0]}
    if ref is not None:
        body["person_ref"] = ref
    if staff_id is not None:
        body["staff_id"] = staff_id
    return body


@pytest.fixture(scope="module")
async def staff(service: Service) -> str:
    campaign_id = unique_id("staff")
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(mode="staff"))
    assert resp.status == 201, resp.body
    return campaign_id


async def register(service: Service, campaign_id: str, body: dict[str, Any]) -> Response:
    return await service.call(
        "POST", f"/v1/campaigns/{campaign_id}/registrations", body, role="app"
    )


async def merchant_claim(service: Service, campaign_id: str, body: dict[str, Any]) -> Response:
    return await service.call("POST", f"/v1/campaigns/{campaign_id}/claims", body, role="merchant")


async def test_unregistered_person_is_not_registered(
    service: Service, redis: Redis, staff: str
) -> None:
    resp = await merchant_claim(service, staff, staff_claim("u-zhang", "claim-zhang-0", i=0))
    assert_error(resp, 403, "NOT_REGISTERED")
    assert await redis.hlen(CampaignKeys(staff).vouchers) == 0


async def test_register_then_claim_at_the_counter(service: Service, staff: str) -> None:
    first = await register(service, staff, registration(0, "u-zhang"))
    assert first.status == 201, first.body
    assert set(first.body) == {"registration_id", "person_ref"}
    assert re.fullmatch(r"[0-9a-f]{64}", first.body["person_ref"])
    by_ref = await merchant_claim(
        service, staff, staff_claim("u-zhang", "claim-zhang-1", ref=first.body["person_ref"])
    )
    assert by_ref.status == 201, by_ref.body
    assert by_ref.body["user_id"] == "u-zhang" and by_ref.body["status"] == "issued"

    second = await register(service, staff, registration(1, "u-li"))
    assert second.status == 201
    assert second.body["person_ref"] != first.body["person_ref"]
    by_number = await merchant_claim(service, staff, staff_claim("u-li", "claim-li-0001", i=1))
    assert by_number.status == 201, by_number.body


async def test_person_ref_is_the_one_a_self_mode_claim_uses(
    service: Service, redis: Redis, staff: str
) -> None:
    reg = await register(service, staff, registration(2, "u-wang"))
    assert reg.status == 201
    ref = reg.body["person_ref"]
    self_mode = unique_id("self")
    assert (await service.call("PUT", f"/v1/campaigns/{self_mode}", campaign())).status == 201
    path = f"/v1/campaigns/{self_mode}/claims"
    won = await service.call(
        "POST", path, staff_claim("u-wang", "self-wang-01", i=2, staff_id=None), role="app"
    )
    assert won.status == 201, won.body
    record = json.loads(await redis.hget(CampaignKeys(self_mode).vouchers, won.body["voucher_id"]))
    assert record["person_ref"] == ref
    again = await service.call(
        "POST", path, staff_claim("u-other", "self-wang-02", ref=ref, staff_id=None), role="app"
    )
    assert_error(again, 409, "ALREADY_CLAIMED")
    assert again.body["voucher_id"] == won.body["voucher_id"]


async def test_registered_person_under_another_account_is_not_registered(
    service: Service, redis: Redis, staff: str
) -> None:
    assert (await register(service, staff, registration(3, "u-ouyang"))).status == 201
    vouchers = await redis.hlen(CampaignKeys(staff).vouchers)
    wrong = await merchant_claim(service, staff, staff_claim("u-not-ouyang", "claim-oy-01", i=3))
    assert_error(wrong, 403, "NOT_REGISTERED")
    assert await redis.hlen(CampaignKeys(staff).vouchers) == vouchers
    right = await merchant_claim(service, staff, staff_claim("u-ouyang", "claim-oy-02", i=3))
    assert right.status == 201, right.body


async def test_staff_claim_needs_a_staff_id(service: Service, staff: str) -> None:
    assert (await register(service, staff, registration(4, "u-zhao"))).status == 201
    resp = await merchant_claim(
        service, staff, staff_claim("u-zhao", "claim-zhao-1", i=4, staff_id=None)
    )
    assert "staff_id" in assert_error(resp, 400, "INVALID_REQUEST")["message"]


QIAN = registration(5, "u-qian", request_id="reg-qian-0001")


async def test_registration_replay_returns_the_first_response(service: Service, staff: str) -> None:
    first = await register(service, staff, QIAN)
    assert first.status == 201, first.body
    assert first.headers.get("Idempotent-Replay") != "true"
    replay = await register(service, staff, QIAN)
    assert (replay.status, replay.body) == (first.status, first.body), "the first response again"
    assert replay.headers.get("Idempotent-Replay") == "true"


async def test_registration_request_id_reused_with_another_body(
    service: Service, redis: Redis, staff: str
) -> None:
    ref = (await register(service, staff, QIAN)).body["person_ref"]
    stored = await redis.hget(CampaignKeys(staff).registrations, ref)
    other = dict(QIAN, person={**QIAN["person"], "phone": "13900000000"})
    assert_error(await register(service, staff, other), 422, "IDEMPOTENCY_MISMATCH")
    assert_error(
        await register(service, staff, dict(QIAN, user_id="u-qian-2")), 422, "IDEMPOTENCY_MISMATCH"
    )
    assert await redis.hget(CampaignKeys(staff).registrations, ref) == stored


async def test_registering_the_same_person_again_returns_the_registration(
    service: Service, staff: str
) -> None:
    first = await register(service, staff, QIAN)
    again = await register(service, staff, dict(QIAN, request_id="reg-qian-0002"))
    assert again.status == 200, again.body
    assert again.body == first.body
    assert again.headers.get("Idempotent-Replay") != "true", "a new request_id is no replay"


async def test_registration_for_unknown_campaign_is_404(service: Service) -> None:
    resp = await register(service, unique_id("none"), registration(0, "u-zhang"))
    assert_error(resp, 404, "NOT_FOUND")


# ------------------------------------------------------------------ merchants


async def test_merchant_create_replace_read(service: Service, pg: asyncpg.Pool) -> None:
    merchant_id = unique_id("m")
    path = f"/v1/merchants/{merchant_id}"
    created = await service.call(
        "PUT", path, {"name": "乡宁电器城", "county_code": "141029", "categories": ["appliance"]}
    )
    assert created.status == 201, created.body
    assert created.body == {
        "merchant_id": merchant_id,
        "name": "乡宁电器城",
        "county_code": "141029",
        "categories": ["appliance"],
        "status": "active",
        "tenant": "default",  # a platform-wide key's PUT that names none
    }
    replacement = {
        "name": "乡宁家居城",
        "county_code": "141029",
        "categories": ["furniture", "tile"],
        "status": "suspended",
    }
    replaced = await service.call("PUT", path, replacement)
    assert replaced.status == 200, replaced.body
    read = await service.call("GET", path)
    assert read.status == 200
    assert read.body == {"merchant_id": merchant_id, "tenant": "default", **replacement}

    bad = await service.call("PUT", path, dict(replacement, categories=["spaceship"]))
    assert "categories" in assert_error(bad, 400, "INVALID_REQUEST")["message"]
    assert (await service.call("GET", path)).body == read.body

    own = {"name": "演示商户", "county_code": "141029", "categories": ["textile"]}
    assert (await service.call("PUT", "/v1/merchants/demo-merchant", own)).status in (200, 201)
    mine = await service.call("GET", "/v1/merchants/demo-merchant", role="merchant")
    assert mine.status == 200 and mine.body["name"] == "演示商户"
    theirs = await service.call("GET", path, role="merchant")
    assert_error(theirs, 403, "FORBIDDEN")

    await service.drained()
    row = await pg.fetchrow("SELECT * FROM merchants WHERE merchant_id = $1", merchant_id)
    assert row is not None
    assert (row["name"], row["county_code"], row["categories"], row["status"], row["tenant"]) == (
        "乡宁家居城",
        "141029",
        ["furniture", "tile"],
        "suspended",
        "default",
    )


# ------------------------------------------------------------------ PII


def secrets_sent() -> list[bytes]:
    found: list[bytes] = []
    for number, name, phone in PEOPLE:
        digits = re.sub(r"[^0-9]", "", phone).removeprefix("86")
        for text in (number, number.lower(), name, name.replace("·", ""), digits):
            found += [text.encode(), json.dumps(text)[1:-1].encode()]  # raw and \u-escaped
    return found


async def redis_dump(redis: Redis) -> list[tuple[bytes, bytes]]:
    """(key, everything stored under it) for every key of the module's database."""
    out = []
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            parts = [await redis.get(key)]
        elif kind == "hash":
            parts = [x for kv in (await redis.hgetall(key)).items() for x in kv]
        elif kind == "set":
            parts = list(await redis.smembers(key))
        elif kind == "stream":
            parts = [
                str(e).encode() + b"".join(k + v for k, v in f.items())
                for e, f in await redis.xrange(key)
            ]
        elif kind == "list":
            parts = await redis.lrange(key, 0, -1)
        elif kind == "zset":
            parts = [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        else:
            raise AssertionError(f"unexpected key type {kind} of {key!r}")
        out.append((key, b"\n".join(p or b"" for p in parts)))
    return out


async def test_no_id_number_name_or_phone_is_stored_in_clear(
    service: Service, redis: Redis, pg: asyncpg.Pool, staff: str
) -> None:
    """Runs after every registration and claim above."""
    await service.drained()
    assert await pg.fetchval(
        "SELECT count(*) FROM registrations WHERE campaign_id = $1", staff
    ) == len(PEOPLE)
    needles = secrets_sent()
    dump = await redis_dump(redis)
    assert any(CampaignKeys(staff).registrations.encode() == k for k, _ in dump)
    for key, value in dump:
        for needle in needles:
            assert needle not in key and needle not in value, (key, needle.decode())
    tables = [
        r["table_name"]
        for r in await pg.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    ]
    assert {"events", "vouchers", "registrations"} <= set(tables)
    for table in tables:
        rows = await pg.fetch(f'SELECT t::text AS row FROM "{table}" t')
        for row in rows:
            text = row["row"].encode()
            for needle in needles:
                assert needle not in text, (table, needle.decode())
