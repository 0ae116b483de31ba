"""The claim path end to end: `issuer serve` (2 workers) on real Valkey and PostgreSQL,
real HTTP on loopback, thousands of concurrent requests."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from issuer.auth import Verified
from issuer.claims import Batcher, Claims, _client_ip, _window
from issuer.errors import ApiError
from issuer.keys import CampaignKeys
from issuer.model import ClaimIn, RateLimit, RateLimits, Round
from issuer.protocol import Claim
from tests.conftest import Keyspace, Service, campaign_primaries, unique_id
from tests.people import BEIJING, XI_SEAT, YUNCHENG, campaign, claim

TOPOLOGIES = ("standalone", "cluster")  # the same tests on one server and a cluster
RESERVE = 200_000
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def new_campaign(service: Service, **kwargs: Any) -> str:
    campaign_id = unique_id()
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(**kwargs))
    assert resp.status == 201, resp.body
    return campaign_id


async def post_claims(
    service: Service, campaign_id: str, bodies: list[dict[str, Any]]
) -> list[Any]:
    app = service.client("app")
    path = f"/v1/campaigns/{campaign_id}/claims"
    return await asyncio.gather(*(app.call("POST", path, b) for b in bodies))


async def ledger(service: Service, campaign_id: str) -> dict[str, Any]:
    resp = await service.call("GET", f"/v1/campaigns/{campaign_id}")
    assert resp.status == 200
    return resp.body  # type: ignore[no-any-return]


async def assert_ledger_balances(service: Service, campaign_id: str, issued: int) -> None:
    state = await ledger(service, campaign_id)
    led = state["ledger"]
    assert led["reserved_fen"] == issued * RESERVE
    assert led["available_fen"] == led["budget_fen"] - issued * RESERVE
    assert (
        led["available_fen"] + led["reserved_fen"] + led["spent_fen"] + led["clawback_due_fen"]
    ) == led["budget_fen"] + led["adjustments_fen"]
    assert state["current_round"]["issued"] == issued


async def assert_postgres_matches(
    service: Service, pg: asyncpg.Pool, redis: Redis, campaign_id: str, expected: set[str]
) -> None:
    await service.drained()
    rows = await pg.fetch(
        "SELECT voucher_id, person_ref, user_id FROM vouchers WHERE campaign_id = $1",
        campaign_id,
    )
    assert {r["voucher_id"] for r in rows} == expected
    assert len({r["person_ref"] for r in rows}) == len(rows)
    assert len({r["user_id"] for r in rows}) == len(rows)
    in_redis = await redis.hkeys(CampaignKeys(campaign_id).vouchers)
    assert {v.decode() for v in in_redis} == expected


def surge_requests(
    persons: int, second_accounts: int, retries: int
) -> tuple[list[dict[str, Any]], int]:
    """Claims of `persons` people, some on a second account, some sent twice (same
    request_id), shuffled. Returns (requests, index where retries start)."""
    bodies = [claim(n) for n in range(persons)]
    bodies += [
        claim(n, user=f"u{n}-second", request_id=f"req2-{n:08d}") for n in range(second_accounts)
    ]
    rng = random.Random(7)
    rng.shuffle(bodies)
    first = len(bodies)
    bodies += rng.sample(bodies, retries)
    return bodies, first


async def run_surge(service: Service, campaign_id: str) -> tuple[list[Any], list[dict[str, Any]]]:
    bodies, _ = surge_requests(persons=2200, second_accounts=300, retries=600)
    assert len(bodies) >= 3000
    responses = await post_claims(service, campaign_id, bodies)
    assert not [r for r in responses if r.status >= 500], "no 5xx under surge"
    return responses, bodies


def check_one_per_person_and_retries(
    responses: list[Any], bodies: list[dict[str, Any]]
) -> set[str]:
    winners: dict[str, str] = {}
    by_request: dict[str, list[Any]] = {}
    for body, resp in zip(bodies, responses, strict=True):
        by_request.setdefault(body["request_id"], []).append(resp)
        if resp.status == 201:
            person = body["person"]["id_number"]
            vid = resp.body["voucher_id"]
            assert winners.setdefault(person, vid) == vid, "one voucher per person"
    for answers in by_request.values():
        first = answers[0]
        for again in answers[1:]:
            assert again.status == first.status
            if first.status == 201:
                assert again.body == first.body, "a retry gets the identical voucher"
            else:
                assert again.body["error"]["code"] == first.body["error"]["code"]
    return set(winners.values())


async def test_surge_issues_exactly_the_quota(
    service: Service, pg: asyncpg.Pool, redis: Redis
) -> None:
    campaign_id = await new_campaign(service, quota=500)
    responses, bodies = await run_surge(service, campaign_id)
    codes = Counter(r.body["error"]["code"] if r.status >= 400 else r.status for r in responses)
    vouchers = check_one_per_person_and_retries(responses, bodies)
    assert len(vouchers) == 500, codes
    assert codes["ROUND_QUOTA_EXHAUSTED"] > 0
    assert set(codes) <= {201, "ROUND_QUOTA_EXHAUSTED", "ALREADY_CLAIMED"}, codes
    users = [r.body["user_id"] for r in responses if r.status == 201]
    assert len(set(users)) == 500, "one voucher per account"
    await assert_ledger_balances(service, campaign_id, 500)
    await assert_postgres_matches(service, pg, redis, campaign_id, vouchers)


async def test_surge_with_round_budget_below_quota(
    service: Service, pg: asyncpg.Pool, redis: Redis
) -> None:
    campaign_id = await new_campaign(service, quota=500, round_budget_fen=321 * RESERVE + 5)
    responses, bodies = await run_surge(service, campaign_id)
    vouchers = check_one_per_person_and_retries(responses, bodies)
    assert len(vouchers) == 321
    codes = Counter(r.body["error"]["code"] for r in responses if r.status >= 400)
    assert codes["ROUND_BUDGET_EXHAUSTED"] > 0
    await assert_ledger_balances(service, campaign_id, 321)
    await assert_postgres_matches(service, pg, redis, campaign_id, vouchers)


async def test_quota_edge_n_plus_one(service: Service) -> None:
    campaign_id = await new_campaign(service, quota=7)
    responses = await post_claims(service, campaign_id, [claim(10_000 + n) for n in range(8)])
    assert sorted(r.status for r in responses) == [201] * 7 + [409]
    assert [r.body["error"]["code"] for r in responses if r.status == 409] == [
        "ROUND_QUOTA_EXHAUSTED"
    ]


async def test_budget_edge_less_than_one_reservation(service: Service) -> None:
    campaign_id = await new_campaign(service, quota=None, budget_fen=2 * RESERVE + RESERVE - 1)
    responses = await post_claims(service, campaign_id, [claim(20_000 + n) for n in range(3)])
    assert sorted(r.status for r in responses) == [201, 201, 409]
    refused = next(r for r in responses if r.status == 409)
    assert refused.body["error"]["code"] == "BUDGET_EXHAUSTED"
    state = await ledger(service, campaign_id)
    assert state["ledger"]["available_fen"] == RESERVE - 1


async def test_before_opening_is_not_open(service: Service) -> None:
    campaign_id = await new_campaign(service, opens_in_s=600)
    (resp,) = await post_claims(service, campaign_id, [claim(30_000)])
    assert resp.status == 409
    assert resp.body["error"]["code"] == "NOT_OPEN"
    assert resp.body["error"]["retryable"] is True
    # the detail, written once per campaign version, names the round and its opening
    assert "round " in resp.body["error"]["message"]
    assert " opens at 20" in resp.body["error"]["message"]


async def test_before_opening_an_invalid_person_is_still_invalid(service: Service) -> None:
    """The person's reference is made only once the round is open, but what makes it is
    checked before NOT_OPEN: a bad ID number or a claim naming no person is a 400 then too."""
    campaign_id = await new_campaign(service, opens_in_s=600)
    good = claim(30_050)
    bad_digit = good["person"]["id_number"][:17] + (
        "0" if good["person"]["id_number"][17] != "0" else "1"
    )
    bodies = [
        claim(30_051, person={"id_number": bad_digit}),
        {k: v for k, v in claim(30_052).items() if k != "person"},
    ]
    responses = await post_claims(service, campaign_id, bodies)
    assert [r.status for r in responses] == [400, 400]
    assert [r.body["error"]["code"] for r in responses] == ["INVALID_REQUEST"] * 2
    assert "person.id_number" in responses[0].body["error"]["message"]
    assert "person" in responses[1].body["error"]["message"]


async def test_opening_second_lets_claims_in(service: Service) -> None:
    campaign_id = await new_campaign(service, opens_in_s=1.5)
    (early,) = await post_claims(service, campaign_id, [claim(30_100)])
    assert early.body["error"]["code"] == "NOT_OPEN"
    await asyncio.sleep(2)
    (late,) = await post_claims(service, campaign_id, [claim(30_101)])
    assert late.status == 201


async def test_after_closing_is_ended(service: Service) -> None:
    campaign_id = await new_campaign(service, opens_in_s=-10, open_for_s=5)
    (resp,) = await post_claims(service, campaign_id, [claim(30_200)])
    assert resp.status == 409
    assert resp.body["error"]["code"] == "CAMPAIGN_ENDED"


async def test_pause_and_resume(service: Service) -> None:
    campaign_id = await new_campaign(service)
    path = f"/v1/campaigns/{campaign_id}"
    paused = await service.call(
        "POST", f"{path}/pause", {"request_id": "pause-0001", "reason": "drill"}
    )
    assert paused.status == 200 and paused.body["status"] == "paused"
    responses = await post_claims(service, campaign_id, [claim(30_300 + n) for n in range(20)])
    assert {r.body["error"]["code"] for r in responses} == {"CAMPAIGN_PAUSED"}
    assert (await ledger(service, campaign_id))["status"] == "paused"
    resumed = await service.call("POST", f"{path}/resume", {"request_id": "resume-001"})
    assert resumed.body["status"] == "active"
    await asyncio.sleep(1.1)  # the other worker trusts its "paused" hint for at most 1 s
    responses = await post_claims(service, campaign_id, [claim(30_400 + n) for n in range(20)])
    assert {r.status for r in responses} == {201}
    again = await service.call(
        "POST", f"{path}/pause", {"request_id": "pause-0001", "reason": "drill"}
    )
    assert again.status == 200 and again.headers.get("Idempotent-Replay") == "true"
    assert (await ledger(service, campaign_id))["status"] == "active", "a replay changes nothing"


async def test_idempotent_replay_and_mismatch(service: Service) -> None:
    campaign_id = await new_campaign(service)
    body = claim(40_000)
    (first,) = await post_claims(service, campaign_id, [body])
    (again,) = await post_claims(service, campaign_id, [body])
    assert first.status == again.status == 201
    assert again.body == first.body
    assert again.headers.get("Idempotent-Replay") == "true"
    other = dict(body, location=XI_SEAT)
    (mismatch,) = await post_claims(service, campaign_id, [other])
    assert mismatch.status == 422
    assert mismatch.body["error"]["code"] == "IDEMPOTENCY_MISMATCH"


async def test_already_claimed_names_the_voucher(service: Service) -> None:
    campaign_id = await new_campaign(service)
    (first,) = await post_claims(service, campaign_id, [claim(41_000)])
    second_account = claim(41_000, user="other-account", request_id="req-other-acct")
    same_account = claim(41_001, user="u41000", request_id="req-same-acct")
    responses = await post_claims(service, campaign_id, [second_account, same_account])
    for resp in responses:
        assert resp.status == 409
        assert resp.body["error"]["code"] == "ALREADY_CLAIMED"
        assert resp.body["voucher_id"] == first.body["voucher_id"]


async def test_geofence(service: Service) -> None:
    campaign_id = await new_campaign(service)
    outside = [claim(42_000 + i, location=loc) for i, loc in enumerate((YUNCHENG, BEIJING))]
    outside.append(claim(42_002, location={"region_code": "140800"}))  # Yuncheng
    for resp in await post_claims(service, campaign_id, outside):
        assert resp.status == 403
        assert resp.body["error"]["code"] == "OUTSIDE_GEOFENCE"
    inside = [
        claim(42_010, location=XI_SEAT),
        claim(42_011, location={"region_code": "141031"}),
        claim(42_012, location={"lat": 35.9750, "lon": 110.8395, "crs": "wgs84"}),
    ]
    assert [r.status for r in await post_claims(service, campaign_id, inside)] == [201] * 3


async def test_voucher_reads(service: Service) -> None:
    campaign_id = await new_campaign(service)
    (won,) = await post_claims(service, campaign_id, [claim(43_000)])
    app = service.client("app")
    got = await app.call("GET", f"/v1/vouchers/{won.body['voucher_id']}")
    assert got.status == 200 and got.body == won.body
    listed = await app.call("GET", f"/v1/users/u43000/vouchers?campaign_id={campaign_id}")
    assert listed.body == {"vouchers": [won.body]}
    everywhere = await app.call("GET", "/v1/users/u43000/vouchers")
    assert won.body in everywhere.body["vouchers"]
    missing = await app.call("GET", f"/v1/vouchers/{campaign_id}.nosuchvoucher")
    assert missing.status == 404 and missing.body["error"]["code"] == "NOT_FOUND"


async def test_round_budget_compare_and_set(service: Service) -> None:
    campaign_id = await new_campaign(service, quota=10, round_budget_fen=2 * RESERVE)
    path = f"/v1/campaigns/{campaign_id}/rounds/r1/budget"
    responses = await post_claims(service, campaign_id, [claim(44_000 + n) for n in range(3)])
    assert sorted(r.status for r in responses) == [201, 201, 409]
    stale = await service.call(
        "POST",
        path,
        {"request_id": "budget-01", "expected_budget_fen": 1, "budget_fen": 5 * RESERVE},
    )
    assert stale.status == 409 and stale.body["error"]["code"] == "BUDGET_CONFLICT"
    too_low = await service.call(
        "POST",
        path,
        {"request_id": "budget-02", "expected_budget_fen": 2 * RESERVE, "budget_fen": RESERVE},
    )
    assert too_low.status == 409 and too_low.body["error"]["code"] == "BUDGET_CONFLICT"
    below_issued = await service.call(
        "POST",
        path,
        {
            "request_id": "budget-03",
            "expected_budget_fen": 2 * RESERVE,
            "budget_fen": 5 * RESERVE,
            "quota": 1,
        },
    )
    assert below_issued.body["error"]["code"] == "BUDGET_CONFLICT"
    ok = await service.call(
        "POST",
        path,
        {"request_id": "budget-04", "expected_budget_fen": 2 * RESERVE, "budget_fen": 5 * RESERVE},
    )
    assert ok.status == 200 and ok.body["budget_fen"] == 5 * RESERVE
    replay = await service.call(
        "POST",
        path,
        {"request_id": "budget-04", "expected_budget_fen": 2 * RESERVE, "budget_fen": 5 * RESERVE},
    )
    assert replay.headers.get("Idempotent-Replay") == "true"
    await asyncio.sleep(1.1)  # workers may repeat "round budget used up" for up to 1 s
    responses = await post_claims(service, campaign_id, [claim(44_100 + n) for n in range(5)])
    assert sorted(r.status for r in responses) == [201, 201, 201, 409, 409]
    state = await ledger(service, campaign_id)
    assert state["current_round"]["issued"] == 5
    assert state["current_round"]["budget_fen"] == 5 * RESERVE


async def test_running_campaign_cannot_be_replaced(service: Service) -> None:
    campaign_id = await new_campaign(service)
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", campaign())
    assert resp.status == 409 and resp.body["error"]["code"] == "CAMPAIGN_RUNNING"


async def test_campaign_before_opening_can_be_replaced(service: Service) -> None:
    campaign_id = await new_campaign(service, opens_in_s=3600, quota=5)
    resp = await service.call(
        "PUT", f"/v1/campaigns/{campaign_id}", campaign(opens_in_s=3600, quota=9)
    )
    assert resp.status == 200
    assert resp.body["current_round"]["quota"] == 9


@pytest.mark.parametrize("example", ["xiangning-2024", "xixian-2024", "demo"])
async def test_example_campaigns_load_over_http(service: Service, example: str) -> None:
    import msgspec

    from issuer.campaign_file import load_campaign_file
    from issuer.model import DEFAULT_TENANT, CampaignDef

    _, definition = load_campaign_file(EXAMPLES / f"{example}.toml")
    body = msgspec.to_builtins(definition)
    campaign_id = unique_id(example)
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)
    assert resp.status == 201, resp.body
    # served with its tenant: the file's, else the default one
    served = msgspec.structs.replace(definition, tenant=definition.tenant or DEFAULT_TENANT)
    assert msgspec.convert(resp.body["definition"], CampaignDef) == served


async def test_campaigns_landed_on_several_primaries(service: Service, keyspace: Keyspace) -> None:
    """On a cluster, this module's campaigns were spread over more than one primary (so the
    tests above crossed nodes); on one server there is one."""
    found = await campaign_primaries(keyspace)
    assert len(found) >= (2 if keyspace.topology == "cluster" else 1), found


@pytest.mark.fast
def test_a_batch_s_rate_limit_windows_made_once_a_second_are_those_of_its_time() -> None:
    ck = CampaignKeys("c-windows")
    limits = RateLimits(
        per_account=RateLimit(limit=2, window_s=60), per_device=RateLimit(limit=5, window_s=7)
    )
    cached: Any = SimpleNamespace(keys=ck, definition=SimpleNamespace(rate_limits=limits))
    rnd: Any = SimpleNamespace(allocation="first_come")
    batcher = Batcher(SimpleNamespace(batch_max=10), cached, rnd)  # type: ignore[arg-type]
    for second in (1_800_000_000, 1_800_000_006, 1_800_000_007, 1_800_000_059):
        for fraction in (0.0, 0.001, 0.5, 0.999):
            now = second + fraction
            account, device, ip = (
                _window(ck, dimension, limit, now)
                for dimension, limit in (
                    ("account", limits.per_account),
                    ("device", limits.per_device),
                    ("ip", limits.per_ip),
                )
            )
            made = (account[0], device[0], ip[0]), (account[1], device[1], ip[1])
            assert batcher._rate_windows(now) == made, now


@pytest.mark.fast
async def test_a_claim_that_names_no_client_ip_is_limited_by_the_caller_s_address() -> None:
    """As the gate is sent it: the caller's address, "" if unknown, or the one it names."""
    sent: list[Claim] = []

    async def run(batch: Any) -> list[bytes]:
        sent.extend(batch.claims)
        return [b"OK", b"v1", b"", b""] + [b"OK", b"1800000000000"] * len(batch.claims)

    now = datetime.now(UTC)
    rnd = Round(round_id="r1", opens_at=now, closes_at=now, valid_until=now)
    voucher = SimpleNamespace(reserve=1, discount_rate_bp=1000, cap_fen=1)
    definition = SimpleNamespace(
        voucher=voucher, mode="self", rate_limits=RateLimits(), timezone="Asia/Shanghai"
    )
    cached: Any = SimpleNamespace(
        keys=CampaignKeys("c-client-ip"), definition=definition, lottery=False, staff=False
    )
    scripts: Any = SimpleNamespace(ack="none", run=run)
    campaigns: Any = SimpleNamespace(note_version=lambda *_: False)
    claims = Claims(None, scripts, campaigns, person_key=b"k", batch_max=10)
    verified = Verified(None, "nonce", 1_800_000_000)  # type: ignore[arg-type]
    for n, (given, remote) in enumerate(
        ((None, "10.0.0.9"), (None, None), ("1.2.3.4", "10.0.0.9"))
    ):
        body = msgspec.convert(claim(n, client_ip=given), ClaimIn)
        await claims.submit(cached, body, verified, remote, (rnd, f"k|{n}", "ref"))
    assert [c.client_ip for c in sent] == ["10.0.0.9", "", "1.2.3.4"]


@pytest.mark.fast
def test_a_client_ip_is_written_as_ipaddress_writes_it() -> None:
    given = ["1.2.3.4", "0.0.0.0", "255.255.255.255", "2001:DB8:0::1", "::ffff:1.2.3.4"]
    octets = (0, 9, 10, 99, 100, 199, 200, 249, 250, 255)
    given += [f"{a}.{b}.1.{d}" for a in octets for b in (0, 255) for d in (0, 7)]
    for ip in given:
        assert _client_ip(ip) == str(ipaddress.ip_address(ip)), ip
    for bad in ("256.1.1.1", "01.2.3.4", "1.2.3", "1.2.3.4.", "1..2.3", "1.2.3.4\n", "１.2.3.4"):
        with pytest.raises(ApiError):
            _client_ip(bad)
