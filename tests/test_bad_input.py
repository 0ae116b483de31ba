"""Bad input on every write (API.md "Errors"): a documented 4xx in the error format, the
field named in `message`, never a 5xx, never the ID number echoed, and nothing written."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis
from stdnum.cn import ric

from issuer import keys
from issuer.client import Response, signed_headers
from issuer.keys import CampaignKeys
from tests.conftest import Service, unique_id
from tests.people import XIANGNING_SEAT, campaign, claim, id_number

ENC = msgspec.json.encode
DROP = object()
HUGE = "x" * (64 * 1024 + 1)


def with_id(prefix17: str) -> str:
    return prefix17 + ric.calc_check_digit(prefix17 + "0")


GOOD_ID = id_number(70_000)
WRONG_CHECK_DIGIT = GOOD_ID[:-1] + ("0" if GOOD_ID[-1] != "0" else "1")
MONTH_13 = with_id("14102919501301123")
BORN_TOMORROW_CENTURY = with_id("14102921000101123")
FIFTEEN_DIGITS = "141029500101123"
NINETEEN_CHARS = GOOD_ID + "1"
LETTERS = "14102919500101ABCD"
UNKNOWN_PROVINCE = with_id("99102919500101123")
SENT_IDS = [
    GOOD_ID,
    WRONG_CHECK_DIGIT,
    MONTH_13,
    BORN_TOMORROW_CENTURY,
    FIFTEEN_DIGITS,
    NINETEEN_CHARS,
    LETTERS,
    UNKNOWN_PROVINCE,
    id_number(70_001),
]
NAME, PHONE = "张三丰", "13912345678"


def edit(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with dotted paths set (or removed with DROP)."""
    out = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node: Any = out
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is DROP:
            del node[last]
        else:
            node[last] = value
    return out


CLAIM = claim(70_000)
REGISTRATION = {
    "request_id": "reg-00070001",
    "user_id": "u70001",
    "person": {"id_number": id_number(70_001), "name": NAME, "phone": PHONE},
}
CAMPAIGN = campaign(opens_in_s=3600)
MERCHANT = {"name": "电器城", "county_code": "141029", "categories": ["appliance"]}
PAUSE = {"request_id": "pause-0001", "reason": "drill"}
BUDGET = {"request_id": "budget-0001", "expected_budget_fen": None, "budget_fen": 10**9}

CLAIMS = ("app", "POST", "/v1/campaigns/{cid}/claims")
REGISTER = ("app", "POST", "/v1/campaigns/{cid}/registrations")
PUT_CAMPAIGN = ("ops", "PUT", "/v1/campaigns/{future}")
PUT_MERCHANT = ("ops", "PUT", "/v1/merchants/{merchant}")
PAUSE_CALL = ("ops", "POST", "/v1/campaigns/{cid}/pause")
RESUME_CALL = ("ops", "POST", "/v1/campaigns/{cid}/resume")
BUDGET_CALL = ("ops", "POST", "/v1/campaigns/{cid}/rounds/r1/budget")

# (endpoint, body: bytes or JSON, field the message must name or None)
INVALID: dict[str, tuple[tuple[str, str, str], Any, str | None]] = {
    # ---- claims
    "claim: malformed JSON": (CLAIMS, b'{"request_id": "req-00070000",', "JSON"),
    "claim: empty body": (CLAIMS, b"", None),
    "claim: an array": (CLAIMS, b"[]", None),
    "claim: user_id a number": (CLAIMS, edit(CLAIM, {"user_id": 7}), "user_id"),
    "claim: location a string": (CLAIMS, edit(CLAIM, {"location": "here"}), "location"),
    "claim: lat a string": (CLAIMS, edit(CLAIM, {"location.lat": "35.97"}), "lat"),
    "claim: request_id missing": (CLAIMS, edit(CLAIM, {"request_id": DROP}), "request_id"),
    "claim: user_id missing": (CLAIMS, edit(CLAIM, {"user_id": DROP}), "user_id"),
    "claim: location missing": (CLAIMS, edit(CLAIM, {"location": DROP}), "location"),
    "claim: unknown field": (CLAIMS, edit(CLAIM, {"coupon": 1}), "coupon"),
    "claim: unknown person field": (CLAIMS, edit(CLAIM, {"person.name": NAME}), "name"),
    "claim: request_id 7 chars": (CLAIMS, edit(CLAIM, {"request_id": "req-123"}), "request_id"),
    "claim: request_id 65 chars": (CLAIMS, edit(CLAIM, {"request_id": "r" * 65}), "request_id"),
    "claim: request_id with a space": (
        CLAIMS,
        edit(CLAIM, {"request_id": "req 000700"}),
        "request_id",
    ),
    "claim: user_id with a space": (CLAIMS, edit(CLAIM, {"user_id": "u 7"}), "user_id"),
    "claim: device_id empty": (CLAIMS, edit(CLAIM, {"device_id": ""}), "device_id"),
    "claim: ID wrong check digit": (
        CLAIMS,
        edit(CLAIM, {"person.id_number": WRONG_CHECK_DIGIT}),
        "id_number",
    ),
    "claim: ID birth month 13": (CLAIMS, edit(CLAIM, {"person.id_number": MONTH_13}), "id_number"),
    "claim: ID born in 2100": (
        CLAIMS,
        edit(CLAIM, {"person.id_number": BORN_TOMORROW_CENTURY}),
        "id_number",
    ),
    "claim: ID 15 digits": (CLAIMS, edit(CLAIM, {"person.id_number": FIFTEEN_DIGITS}), "id_number"),
    "claim: ID 19 chars": (CLAIMS, edit(CLAIM, {"person.id_number": NINETEEN_CHARS}), "id_number"),
    "claim: ID with letters": (CLAIMS, edit(CLAIM, {"person.id_number": LETTERS}), "id_number"),
    "claim: ID unknown province": (
        CLAIMS,
        edit(CLAIM, {"person.id_number": UNKNOWN_PROVINCE}),
        "id_number",
    ),
    "claim: ID a number": (CLAIMS, edit(CLAIM, {"person.id_number": 141029}), "id_number"),
    "claim: region_code and lat/lon": (
        CLAIMS,
        edit(CLAIM, {"location": {**XIANGNING_SEAT, "region_code": "141029"}}),
        "location",
    ),
    "claim: lat without lon": (CLAIMS, edit(CLAIM, {"location": {"lat": 35.97}}), "location"),
    "claim: empty location": (CLAIMS, edit(CLAIM, {"location": {}}), "location"),
    "claim: lat 90.5": (CLAIMS, edit(CLAIM, {"location.lat": 90.5}), "lat"),
    "claim: lat -91": (CLAIMS, edit(CLAIM, {"location.lat": -91}), "lat"),
    "claim: lon 181": (CLAIMS, edit(CLAIM, {"location.lon": 181}), "lon"),
    "claim: crs bd09": (CLAIMS, edit(CLAIM, {"location.crs": "bd09"}), "crs"),
    "claim: region_code letters": (
        CLAIMS,
        edit(CLAIM, {"location": {"region_code": "14a0"}}),
        "region_code",
    ),
    "claim: neither person nor person_ref": (CLAIMS, edit(CLAIM, {"person": DROP}), "person"),
    "claim: both person and person_ref": (CLAIMS, edit(CLAIM, {"person_ref": "a" * 64}), "person"),
    "claim: person_ref not hex": (
        CLAIMS,
        edit(CLAIM, {"person": DROP, "person_ref": "Z" * 64}),
        "person_ref",
    ),
    "claim: person_ref 63 chars": (
        CLAIMS,
        edit(CLAIM, {"person": DROP, "person_ref": "a" * 63}),
        "person_ref",
    ),
    "claim: body over 64 KiB": (CLAIMS, edit(CLAIM, {"device_id": HUGE}), "body"),
    # ---- registrations
    "registration: malformed JSON": (REGISTER, b'{"person": {', "JSON"),
    "registration: person missing": (REGISTER, edit(REGISTRATION, {"person": DROP}), "person"),
    "registration: user_id missing": (REGISTER, edit(REGISTRATION, {"user_id": DROP}), "user_id"),
    "registration: phone missing": (REGISTER, edit(REGISTRATION, {"person.phone": DROP}), "phone"),
    "registration: phone not a number": (
        REGISTER,
        edit(REGISTRATION, {"person.phone": "call me"}),
        "phone",
    ),
    "registration: phone an int": (
        REGISTER,
        edit(REGISTRATION, {"person.phone": 13912345678}),
        "phone",
    ),
    "registration: name empty": (REGISTER, edit(REGISTRATION, {"person.name": ""}), "name"),
    "registration: name only spaces": (
        REGISTER,
        edit(REGISTRATION, {"person.name": "   "}),
        "name",
    ),
    "registration: name 65 chars": (
        REGISTER,
        edit(REGISTRATION, {"person.name": "张" * 65}),
        "name",
    ),
    "registration: unknown person field": (
        REGISTER,
        edit(REGISTRATION, {"person.gender": "m"}),
        "gender",
    ),
    "registration: unknown field": (REGISTER, edit(REGISTRATION, {"vip": True}), "vip"),
    "registration: request_id 7 chars": (
        REGISTER,
        edit(REGISTRATION, {"request_id": "reg-123"}),
        "request_id",
    ),
    "registration: request_id 65 chars": (
        REGISTER,
        edit(REGISTRATION, {"request_id": "r" * 65}),
        "request_id",
    ),
    "registration: ID wrong check digit": (
        REGISTER,
        edit(REGISTRATION, {"person.id_number": WRONG_CHECK_DIGIT}),
        "person",
    ),
    "registration: ID birth month 13": (
        REGISTER,
        edit(REGISTRATION, {"person.id_number": MONTH_13}),
        "person",
    ),
    "registration: ID 15 digits": (
        REGISTER,
        edit(REGISTRATION, {"person.id_number": FIFTEEN_DIGITS}),
        "person",
    ),
    "registration: ID 19 chars": (
        REGISTER,
        edit(REGISTRATION, {"person.id_number": NINETEEN_CHARS}),
        "id_number",
    ),
    "registration: body over 64 KiB": (REGISTER, edit(REGISTRATION, {"person.name": HUGE}), "body"),
    # ---- campaign PUT (the target has not opened: a wrongly accepted PUT would replace it)
    "campaign: malformed JSON": (PUT_CAMPAIGN, b"{'name': 'single quotes'}", "JSON"),
    "campaign: budget_fen negative": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"budget_fen": -1}),
        "budget_fen",
    ),
    "campaign: budget_fen a string": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"budget_fen": "1000"}),
        "budget_fen",
    ),
    "campaign: budget_fen a float": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"budget_fen": 10.5}),
        "budget_fen",
    ),
    "campaign: name missing": (PUT_CAMPAIGN, edit(CAMPAIGN, {"name": DROP}), "name"),
    "campaign: geofence missing": (PUT_CAMPAIGN, edit(CAMPAIGN, {"geofence": DROP}), "geofence"),
    "campaign: rounds missing": (PUT_CAMPAIGN, edit(CAMPAIGN, {"rounds": DROP}), "rounds"),
    "campaign: unknown field": (PUT_CAMPAIGN, edit(CAMPAIGN, {"owner": "me"}), "owner"),
    "campaign: quota negative": (PUT_CAMPAIGN, edit(CAMPAIGN, {"rounds.0.quota": -1}), "quota"),
    "campaign: round budget negative": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"rounds.0.budget_fen": -5}),
        "budget_fen",
    ),
    "campaign: cap_fen 0": (PUT_CAMPAIGN, edit(CAMPAIGN, {"voucher.cap_fen": 0}), "cap_fen"),
    "campaign: reserve_fen negative": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"voucher.reserve_fen": -1}),
        "reserve_fen",
    ),
    "campaign: discount over 100 %": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"voucher.discount_rate_bp": 10_001}),
        "discount_rate_bp",
    ),
    "campaign: mode both": (PUT_CAMPAIGN, edit(CAMPAIGN, {"mode": "both"}), "mode"),
    "campaign: per_person 2": (PUT_CAMPAIGN, edit(CAMPAIGN, {"per_person": 2}), "per_person"),
    "campaign: unknown timezone": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"timezone": "Mars/Olympus_Mons"}),
        "timezone",
    ),
    "campaign: unknown category": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"eligibility.categories": ["spaceship"]}),
        "categories",
    ),
    "campaign: no categories": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"eligibility.categories": []}),
        "categories",
    ),
    "campaign: no rounds": (PUT_CAMPAIGN, edit(CAMPAIGN, {"rounds": []}), "round"),
    "campaign: round closes before it opens": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"rounds.0.closes_at": "2020-01-01T00:00:00+08:00"}),
        "closes_at",
    ),
    "campaign: naive opens_at": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"rounds.0.opens_at": "2030-01-01T10:00:00"}),
        "opens_at",
    ),
    "campaign: round_id with a space": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"rounds.0.round_id": "r 1"}),
        "round_id",
    ),
    "campaign: no region codes": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"geofence.region_codes": []}),
        "region_codes",
    ),
    "campaign: region code letters": (
        PUT_CAMPAIGN,
        edit(CAMPAIGN, {"geofence.region_codes": ["shanxi"]}),
        "region_codes",
    ),
    "campaign: rule ends before it starts": (
        PUT_CAMPAIGN,
        edit(
            CAMPAIGN,
            {
                "rounds": {
                    "every": "friday",
                    "at": "10:00",
                    "valid_until": "22:00",
                    "from": "2030-02-01",
                    "to": "2030-01-01",
                }
            },
        ),
        "rounds.to",
    ),
    "campaign: rule at 25:00": (
        PUT_CAMPAIGN,
        edit(
            CAMPAIGN,
            {
                "rounds": {
                    "every": "day",
                    "at": "25:00",
                    "valid_until": "22:00",
                    "from": "2030-01-01",
                    "to": "2030-01-02",
                }
            },
        ),
        "rounds.at",
    ),
    "campaign: body over 64 KiB": (PUT_CAMPAIGN, edit(CAMPAIGN, {"name": HUGE}), "body"),
    # ---- merchant PUT
    "merchant: malformed JSON": (PUT_MERCHANT, b"name=shop", "JSON"),
    "merchant: name missing": (PUT_MERCHANT, edit(MERCHANT, {"name": DROP}), "name"),
    "merchant: name empty": (PUT_MERCHANT, edit(MERCHANT, {"name": ""}), "name"),
    "merchant: county_code letters": (
        PUT_MERCHANT,
        edit(MERCHANT, {"county_code": "14a029"}),
        "county_code",
    ),
    "merchant: county_code a number": (
        PUT_MERCHANT,
        edit(MERCHANT, {"county_code": 141029}),
        "county_code",
    ),
    "merchant: no categories": (PUT_MERCHANT, edit(MERCHANT, {"categories": []}), "categories"),
    "merchant: categories a string": (
        PUT_MERCHANT,
        edit(MERCHANT, {"categories": "appliance"}),
        "categories",
    ),
    "merchant: unknown category": (
        PUT_MERCHANT,
        edit(MERCHANT, {"categories": ["spaceship"]}),
        "categories",
    ),
    "merchant: status closed": (PUT_MERCHANT, edit(MERCHANT, {"status": "closed"}), "status"),
    "merchant: unknown field": (PUT_MERCHANT, edit(MERCHANT, {"owner": "me"}), "owner"),
    "merchant: body over 64 KiB": (PUT_MERCHANT, edit(MERCHANT, {"name": HUGE}), "body"),
    "merchant: id with a dot": (("ops", "PUT", "/v1/merchants/bad.id"), MERCHANT, "merchant_id"),
    # ---- pause / resume
    "pause: malformed JSON": (PAUSE_CALL, b"{", "JSON"),
    "pause: empty body": (PAUSE_CALL, b"", None),
    "pause: request_id missing": (PAUSE_CALL, edit(PAUSE, {"request_id": DROP}), "request_id"),
    "pause: request_id 7 chars": (PAUSE_CALL, edit(PAUSE, {"request_id": "pause-1"}), "request_id"),
    "pause: request_id 65 chars": (PAUSE_CALL, edit(PAUSE, {"request_id": "p" * 65}), "request_id"),
    "pause: reason 501 chars": (PAUSE_CALL, edit(PAUSE, {"reason": "r" * 501}), "reason"),
    "pause: reason a number": (PAUSE_CALL, edit(PAUSE, {"reason": 5}), "reason"),
    "pause: unknown field": (PAUSE_CALL, edit(PAUSE, {"until": "tomorrow"}), "until"),
    "pause: body over 64 KiB": (PAUSE_CALL, edit(PAUSE, {"reason": HUGE}), "body"),
    "resume: request_id missing": (RESUME_CALL, {"reason": "go"}, "request_id"),
    # ---- round budget
    "budget: malformed JSON": (BUDGET_CALL, b'{"budget_fen": }', "JSON"),
    "budget: expected_budget_fen missing": (
        BUDGET_CALL,
        edit(BUDGET, {"expected_budget_fen": DROP}),
        "expected_budget_fen",
    ),
    "budget: expected_budget_fen a string": (
        BUDGET_CALL,
        edit(BUDGET, {"expected_budget_fen": "none"}),
        "expected_budget_fen",
    ),
    "budget: budget_fen missing": (BUDGET_CALL, edit(BUDGET, {"budget_fen": DROP}), "budget_fen"),
    "budget: budget_fen negative": (BUDGET_CALL, edit(BUDGET, {"budget_fen": -1}), "budget_fen"),
    "budget: quota negative": (BUDGET_CALL, edit(BUDGET, {"quota": -1}), "quota"),
    "budget: quota too big": (BUDGET_CALL, edit(BUDGET, {"quota": 10**9}), "quota"),
    "budget: request_id 7 chars": (
        BUDGET_CALL,
        edit(BUDGET, {"request_id": "budget1"}),
        "request_id",
    ),
    "budget: unknown field": (BUDGET_CALL, edit(BUDGET, {"campaign": "x"}), "campaign"),
    "budget: body over 64 KiB": (BUDGET_CALL, edit(BUDGET, {"request_id": HUGE}), "body"),
    # ---- ids in the path
    "claim: campaign id with a dot": (
        ("app", "POST", "/v1/campaigns/bad.id/claims"),
        CLAIM,
        "campaign_id",
    ),
    "claim: campaign id 41 chars": (
        ("app", "POST", "/v1/campaigns/" + "c" * 41 + "/claims"),
        CLAIM,
        "campaign_id",
    ),
    "budget: round id with a dot": (
        ("ops", "POST", "/v1/campaigns/{cid}/rounds/r.1/budget"),
        BUDGET,
        "round_id",
    ),
}

NOT_FOUND: dict[str, tuple[tuple[str, str, str], Any]] = {
    "claim": (("app", "POST", "/v1/campaigns/{missing}/claims"), CLAIM),
    "registration": (("app", "POST", "/v1/campaigns/{missing}/registrations"), REGISTRATION),
    "get campaign": (("ops", "GET", "/v1/campaigns/{missing}"), None),
    "pause": (("ops", "POST", "/v1/campaigns/{missing}/pause"), PAUSE),
    "resume": (("ops", "POST", "/v1/campaigns/{missing}/resume"), PAUSE),
    "round budget": (("ops", "POST", "/v1/campaigns/{missing}/rounds/r1/budget"), BUDGET),
    "round budget of an unknown round": (
        ("ops", "POST", "/v1/campaigns/{cid}/rounds/r9/budget"),
        BUDGET,
    ),
    "get merchant": (("ops", "GET", "/v1/merchants/{merchant}"), None),
    "get voucher": (("app", "GET", "/v1/vouchers/{cid}.nosuchvoucher"), None),
}


async def send(service: Service, role: str | None, method: str, path: str, body: bytes) -> Response:
    headers = signed_headers(service.key(role), method, path, body) if role else {}
    async with service.session.request(
        method, service.url + path, data=body, headers=headers
    ) as resp:
        raw = await resp.read()
        json = resp.headers.get("Content-Type", "").startswith("application/json")
        decoded = msgspec.json.decode(raw) if raw and json else raw.decode("utf-8", "replace")
        return Response(resp.status, decoded, dict(resp.headers))


def assert_error(resp: Response, status: int, code: str | None) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body)
    assert isinstance(resp.body, dict) and set(resp.body) >= {"error"}, resp.body
    err = resp.body["error"]
    assert isinstance(err["code"], str) and (code is None or err["code"] == code), err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["retryable"], bool)
    return err  # type: ignore[no-any-return]


def assert_no_pii(resp: Response, sent: bytes) -> None:
    text = ENC(resp.body).decode() if isinstance(resp.body, dict) else str(resp.body)
    for secret in [*SENT_IDS, NAME, PHONE]:
        if secret.encode() in sent:
            assert secret not in text and secret.lower() not in text, text


@pytest.fixture(scope="module")
async def world(service: Service, redis: Redis) -> dict[str, Any]:
    cid, future = unique_id(), unique_id()
    assert (await service.call("PUT", f"/v1/campaigns/{cid}", campaign())).status == 201
    assert (await service.call("PUT", f"/v1/campaigns/{future}", CAMPAIGN)).status == 201
    names = {"cid": cid, "future": future, "missing": unique_id(), "merchant": unique_id("m")}
    return {**names, "before": {c: await snapshot(redis, names[c]) for c in ("cid", "future")}}


async def snapshot(redis: Redis, campaign_id: str) -> dict[str, Any]:
    ck = CampaignKeys(campaign_id)
    return {
        "definition": await redis.get(ck.definition),
        "ledger": await redis.hgetall(ck.ledger),
        "round": await redis.hgetall(ck.round("r1")),
        "vouchers": await redis.hgetall(ck.vouchers),
        "persons": await redis.hgetall(ck.persons),
        "accounts": await redis.hgetall(ck.accounts),
        "registrations": await redis.hgetall(ck.registrations),
    }


def body_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    return body if isinstance(body, bytes) else ENC(body)


@pytest.mark.parametrize("case", list(INVALID))
async def test_invalid_request(service: Service, world: dict[str, Any], case: str) -> None:
    (role, method, template), body, field = INVALID[case]
    sent = body_bytes(body)
    resp = await send(service, role, method, template.format(**world), sent)
    err = assert_error(resp, 400, "INVALID_REQUEST")
    if field is not None:
        assert field in err["message"], err["message"]
    assert_no_pii(resp, sent)


@pytest.mark.parametrize(
    "codes", [["00"], ["141"], ["1410", "0000"]], ids=["00", "odd length", "all zeros"]
)
async def test_campaign_with_unusable_region_code_is_refused_and_not_stored(
    service: Service, redis: Redis, codes: list[str]
) -> None:
    campaign_id = unique_id()
    body = edit(CAMPAIGN, {"geofence.region_codes": codes})
    resp = await send(service, "ops", "PUT", f"/v1/campaigns/{campaign_id}", ENC(body))
    err = assert_error(resp, 400, "INVALID_REQUEST")
    assert "region_codes" in err["message"]
    assert not await redis.sismember(keys.CAMPAIGNS, campaign_id)
    assert not await redis.exists(CampaignKeys(campaign_id).definition)


async def test_campaign_with_unreadable_polygons_file_is_refused_and_not_stored(
    service: Service, redis: Redis
) -> None:
    campaign_id = unique_id()
    body = edit(CAMPAIGN, {"geofence.polygons_file": "/nonexistent/regions.geojson"})
    resp = await send(service, "ops", "PUT", f"/v1/campaigns/{campaign_id}", ENC(body))
    err = assert_error(resp, 400, "INVALID_REQUEST")
    assert "polygons_file" in err["message"]
    assert not await redis.sismember(keys.CAMPAIGNS, campaign_id)


@pytest.mark.parametrize("case", list(NOT_FOUND))
async def test_unknown_resource_is_404(service: Service, world: dict[str, Any], case: str) -> None:
    (role, method, template), body = NOT_FOUND[case]
    resp = await send(service, role, method, template.format(**world), body_bytes(body))
    assert_error(resp, 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("role", "path"),
    [("ops", "/v1/nope"), (None, "/nope"), ("app", "/v1/campaigns/{cid}/claims/extra")],
)
async def test_unknown_route_is_404_json(
    service: Service, world: dict[str, Any], role: str | None, path: str
) -> None:
    resp = await send(service, role, "GET", path.format(**world), b"")
    assert_error(resp, 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("role", "method", "path"),
    [
        ("ops", "DELETE", "/v1/campaigns/{cid}"),
        ("app", "GET", "/v1/campaigns/{cid}/claims"),
        ("ops", "POST", "/v1/merchants/{merchant}"),
        (None, "POST", "/healthz"),
    ],
)
async def test_wrong_method_is_405_json(
    service: Service, world: dict[str, Any], role: str | None, method: str, path: str
) -> None:
    resp = await send(service, role, method, path.format(**world), b"")
    assert_error(resp, 405, None)


async def test_nothing_was_written(
    service: Service, redis: Redis, pg: asyncpg.Pool, world: dict[str, Any]
) -> None:
    """Runs last: every refusal above left both campaigns and the merchant untouched."""
    for name in ("cid", "future"):
        after = await snapshot(redis, world[name])
        assert after == world["before"][name], name
        assert not after["vouchers"] and not after["registrations"]
    assert not await redis.hexists(keys.MERCHANTS, world["merchant"])
    assert not await redis.exists(CampaignKeys(world["missing"]).ledger)
    await service.drained()
    for name in ("cid", "future"):
        rows = await pg.fetch("SELECT type FROM events WHERE campaign_id = $1", world[name])
        assert Counter(r["type"] for r in rows) == {"campaign": 1}, name
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM merchants WHERE merchant_id = $1", world["merchant"]
        )
        == 0
    )
    assert (
        await pg.fetchval("SELECT count(*) FROM vouchers WHERE campaign_id = $1", world["cid"]) == 0
    )
