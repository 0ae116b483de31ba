"""Carry-over (Xi County): a closed round's unused budget moves to the next open round,
again whenever expiries free more of it; ops can still set the budget afterwards."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from issuer import carry, expiry, keys
from issuer.scripts import Scripts
from tests.conftest import Service, unique_id
from tests.money import issue, new_merchant, payment, redeem
from tests.people import campaign, iso


def two_rounds(carry_over: bool, reserve_fen: int | None = None) -> tuple[dict[str, Any], int]:
    """r1 open now (budget 1,000,000 fen), r2 later (budget 0); returns (body, r1 closes ms)."""
    now = datetime.now(UTC)
    r1_closes = now + timedelta(hours=1)
    body = campaign(reserve_fen=reserve_fen)
    body["carry_over"] = carry_over
    body["rounds"] = [
        {
            "round_id": "r1",
            "opens_at": iso(now - timedelta(seconds=5)),
            "closes_at": iso(r1_closes),
            "valid_until": iso(r1_closes + timedelta(hours=1)),
            "budget_fen": 1_000_000,
        },
        {
            "round_id": "r2",
            "opens_at": iso(r1_closes),
            "closes_at": iso(r1_closes + timedelta(hours=5)),
            "valid_until": iso(r1_closes + timedelta(hours=6)),
            "budget_fen": 0,
        },
    ]
    return body, int(r1_closes.timestamp() * 1000)


async def budgets(redis: Redis, campaign_id: str) -> tuple[int, int]:
    ck = keys.CampaignKeys(campaign_id)
    r1, r2 = [int(await redis.hget(ck.round(r), "budget")) for r in ("r1", "r2")]
    return r1, r2


async def test_unused_round_budget_moves_on_and_again_after_expiry(
    service: Service, redis: Redis
) -> None:
    scripts = Scripts(redis)
    campaign_id = unique_id()
    body, r1_closes = two_rounds(carry_over=True)
    assert (await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)).status == 201
    for n in range(2):
        await issue(service, campaign_id, 500 + n)  # 2 x 200,000 fen reserved in r1
    assert await carry.carry_over(redis, scripts, campaign_id, r1_closes - 1) == 0  # still open
    assert await carry.carry_over(redis, scripts, campaign_id, r1_closes + 1) == 600_000
    assert await carry.carry_over(redis, scripts, campaign_id, r1_closes + 2) == 0  # once
    assert await budgets(redis, campaign_id) == (400_000, 600_000)
    # the vouchers expire: their reservations are unused budget of r1 now, and move on too
    after_expiry = r1_closes + 3600_000 + 1
    assert await expiry.sweep(redis, scripts, campaign_id, after_expiry) == 2
    assert await carry.carry_over(redis, scripts, campaign_id, after_expiry) == 400_000
    assert await budgets(redis, campaign_id) == (0, 1_000_000)
    # ops can still set r2's budget with the compare-and-set call
    cas = {"request_id": "cas-after-carry", "expected_budget_fen": 1_000_000, "budget_fen": 5}
    resp = await service.call("POST", f"/v1/campaigns/{campaign_id}/rounds/r2/budget", cas)
    assert resp.status == 200, resp.body
    ledger = (await service.call("GET", f"/v1/campaigns/{campaign_id}")).body["ledger"]
    assert ledger["reserved_fen"] == 0 and ledger["available_fen"] == ledger["budget_fen"]


async def test_no_carry_unless_the_campaign_says_so(service: Service, redis: Redis) -> None:
    campaign_id = unique_id()
    body, r1_closes = two_rounds(carry_over=False)
    assert (await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)).status == 201
    assert await carry.carry_over(redis, Scripts(redis), campaign_id, r1_closes + 1) == 0
    assert await budgets(redis, campaign_id) == (1_000_000, 0)


async def test_what_the_pool_paid_above_reservations_is_not_carried(
    service: Service, redis: Redis
) -> None:
    """Reservations of 100,000: a discount of 200,000 overdraws r1 by 100,000, which came
    from the campaign pool, so r1's unused budget is 1,000,000 - 100,000 reserved - 100,000
    spent from its reservation."""
    campaign_id = unique_id()
    body, r1_closes = two_rounds(carry_over=True, reserve_fen=100_000)
    assert (await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)).status == 201
    vouchers = [await issue(service, campaign_id, 510 + n) for n in range(2)]
    merchant = await new_merchant(service)
    assert (await redeem(service, payment(vouchers[0], merchant, 2_000_000))).status == 201
    rnd = keys.CampaignKeys(campaign_id).round("r1")
    assert await redis.hmget(rnd, "reserved", "spent", "overdrawn") == [
        b"100000",
        b"200000",
        b"100000",
    ]
    assert await carry.carry_over(redis, Scripts(redis), campaign_id, r1_closes + 1) == 800_000
    assert await budgets(redis, campaign_id) == (200_000, 800_000)
