"""The money path end to end on real servers: redemption, its refusals (none of which
changes the ledger), refunds before and after reimbursement, clawbacks, expiry, and the
record in PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from issuer import expiry, keys
from issuer.auth import ApiKey, Verified
from issuer.campaigns import HINT_TTL_S, Campaigns
from issuer.client import signed_headers
from issuer.model import RedemptionIn
from issuer.reconcile import reconcile
from issuer.redemptions import Redemptions, mark_paid
from issuer.scripts import Scripts
from tests.conftest import Keyspace, Service, campaign_primaries
from tests.money import (
    fridge,
    gather,
    issue,
    ledger,
    new_campaign,
    new_merchant,
    payment,
    redeem,
    refund,
)
from tests.people import claim

TOPOLOGIES = ("standalone", "cluster")  # the same tests on one server and a cluster
RESERVE = 200_000
FAR_FUTURE_MS = int((time.time() + 30 * 86400) * 1000)


@pytest.fixture(scope="module")
async def scripts(redis: Redis) -> Scripts:
    return Scripts(redis)


async def voucher_status(service: Service, voucher_id: str) -> str:
    resp = await service.call("GET", f"/v1/vouchers/{voucher_id}", role="payment")
    assert resp.status == 200, resp.body
    return str(resp.body["status"])


async def test_redemption_applies_ten_percent_and_moves_the_money(service: Service) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    voucher = await issue(service, campaign_id, 1)
    before = await ledger(service, campaign_id)
    body = payment(voucher, merchant, 1_234_567)
    resp = await redeem(service, body)
    assert resp.status == 201, resp.body
    assert resp.body["discount_fen"] == 123_456  # floor of 10 %
    assert resp.body["payable_fen"] == 1_234_567 - 123_456
    assert resp.body["status"] == "redeemed"
    after = await ledger(service, campaign_id)
    assert after["reserved_fen"] == before["reserved_fen"] - RESERVE
    assert after["spent_fen"] == before["spent_fen"] + 123_456
    assert after["available_fen"] == before["available_fen"] + RESERVE - 123_456
    v = await service.call("GET", f"/v1/vouchers/{voucher['voucher_id']}", role="payment")
    assert v.body["status"] == "redeemed"
    assert v.body["redemption_id"] == resp.body["redemption_id"]
    # the same request again: the first answer, nothing changes
    again = await redeem(service, body)
    assert again.status == 201 and again.headers.get("Idempotent-Replay") == "true"
    assert again.body == resp.body
    assert await ledger(service, campaign_id) == after
    # the same request_id with another body
    other = await redeem(service, {**body, "order_amount_fen": 5, "items": [fridge(5)]})
    assert other.status == 422 and other.body["error"]["code"] == "IDEMPOTENCY_MISMATCH"
    # readable by the payment platform and the merchant that took it, not another merchant
    got = await service.call("GET", f"/v1/redemptions/{resp.body['redemption_id']}", role="payment")
    assert got.status == 200 and got.body == resp.body


async def test_a_replayed_payment_is_401_and_changes_nothing(service: Service) -> None:
    """A payment's nonce is spent in its campaign's batch script, as a claim's is."""
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    voucher = await issue(service, campaign_id, 2)
    body = msgspec.json.encode(payment(voucher, merchant, 100_000))
    headers = signed_headers(service.key("payment"), "POST", "/v1/redemptions", body)

    async def send() -> tuple[int, Any]:
        url = service.url + "/v1/redemptions"
        async with service.session.post(url, data=body, headers=headers) as resp:
            return resp.status, await resp.json()

    assert (await send())[0] == 201
    after = await ledger(service, campaign_id)
    status, answer = await send()
    assert (status, answer["error"]["code"]) == (401, "UNAUTHENTICATED")
    assert await ledger(service, campaign_id) == after


async def test_several_items_share_one_cap(service: Service) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    voucher = await issue(service, campaign_id, 2)
    sofa = {"category": "sofa", "name": "真皮沙发", "amount_fen": 1_500_000, "quantity": 1}
    body = payment(voucher, merchant, 3_500_000, items=[fridge(2_000_000), sofa])
    resp = await redeem(service, body)
    assert resp.status == 201, resp.body
    assert resp.body["discount_fen"] == 200_000  # 350,000 would be 10 %; the cap is 2,000 CNY
    led = await ledger(service, campaign_id)
    assert led["spent_fen"] == 200_000 and led["reserved_fen"] == 0


async def refusal_cases(
    service: Service, redis: Redis, scripts: Scripts
) -> list[tuple[str, int, dict[str, Any]]]:
    """(code, HTTP status, payment body) for every refusal of a redemption."""
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    voucher = await issue(service, campaign_id, 10)
    used = await issue(service, campaign_id, 11)
    taken = payment(used, merchant, 100_000)
    assert (await redeem(service, taken)).status == 201
    expired_campaign = await new_campaign(service)
    expired = await issue(service, expired_campaign, 12)
    assert await expiry.sweep(redis, scripts, expired_campaign, FAR_FUTURE_MS) == 1
    suspended = await new_merchant(service, status="suspended")
    blacklisted = await new_merchant(service, status="blacklisted")
    furniture_only = await new_merchant(service, categories=["furniture"])
    elsewhere = await new_merchant(service, county_code="140106")  # Taiyuan
    curtain = {"category": "curtain", "name": "窗帘", "amount_fen": 100_000, "quantity": 1}
    ok = payment(voucher, merchant, 100_000)
    return [
        ("NOT_FOUND", 404, {**ok, "voucher_id": f"{campaign_id}.0000"}),
        ("NOT_FOUND", 404, {**ok, "voucher_id": "nocampaign.0000"}),
        ("VOUCHER_NOT_OWNED", 409, {**ok, "user_id": "someone-else"}),
        ("VOUCHER_USED", 409, payment(used, merchant, 100_000)),
        ("VOUCHER_EXPIRED", 409, payment(expired, merchant, 100_000)),
        ("MERCHANT_NOT_ELIGIBLE", 403, {**ok, "merchant_id": suspended}),
        ("MERCHANT_NOT_ELIGIBLE", 403, {**ok, "merchant_id": blacklisted}),
        ("MERCHANT_NOT_ELIGIBLE", 403, {**ok, "merchant_id": furniture_only}),
        ("MERCHANT_NOT_ELIGIBLE", 403, {**ok, "merchant_id": elsewhere}),
        ("MERCHANT_NOT_ELIGIBLE", 403, {**ok, "merchant_id": "no-such-merchant"}),
        ("PRODUCT_NOT_ELIGIBLE", 422, {**ok, "items": [curtain]}),
        ("INVALID_GB_CODE", 422, {**ok, "items": [fridge(100_000, gb_code="6901234567890")]}),
        ("INVALID_GB_CODE", 422, {**ok, "items": [fridge(100_000, gb_code=None)]}),
        ("ENERGY_GRADE_TOO_LOW", 422, {**ok, "items": [fridge(100_000, energy_grade=3)]}),
        ("ENERGY_GRADE_TOO_LOW", 422, {**ok, "items": [fridge(100_000, energy_grade=None)]}),
        ("AMOUNT_MISMATCH", 422, {**ok, "order_amount_fen": 100_001}),
        ("ORDER_ALREADY_REDEEMED", 409, {**ok, "order_id": taken["order_id"]}),
        ("INVALID_REQUEST", 400, {**ok, "order_amount_fen": -1}),
        ("INVALID_REQUEST", 400, {**ok, "items": []}),
        ("INVALID_REQUEST", 400, {**ok, "paid_at": "2026-11-24T10:00:00"}),
        ("INVALID_REQUEST", 400, {**ok, "surprise": 1}),
    ]


async def test_every_refusal_has_its_code_and_changes_nothing(
    service: Service, redis: Redis, scripts: Scripts
) -> None:
    cases = await refusal_cases(service, redis, scripts)
    for code, status, body in cases:
        campaign_id = str(body["voucher_id"]).rpartition(".")[0]
        known = (await service.call("GET", f"/v1/campaigns/{campaign_id}")).status == 200
        before = await ledger(service, campaign_id) if known else None
        resp = await redeem(service, body)
        assert resp.status >= 400, (code, resp.body)
        assert (resp.status, resp.body["error"]["code"]) == (status, code), (code, resp.body)
        if before is not None:
            assert await ledger(service, campaign_id) == before, code
    # the voucher the refusals were aimed at is still good
    code, _, ok = cases[0]
    resp = await redeem(service, {**ok, "voucher_id": cases[2][2]["voucher_id"]})
    assert resp.status == 201, resp.body


async def test_merchant_blacklisted_after_issue_is_refused_at_once(service: Service) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    voucher = await issue(service, campaign_id, 20)
    body = {"name": "乡宁家电城", "county_code": "141029", "categories": ["appliance"]}
    resp = await service.call("PUT", f"/v1/merchants/{merchant}", {**body, "status": "blacklisted"})
    assert resp.status == 200
    refused = await redeem(service, payment(voucher, merchant, 100_000))
    assert refused.body["error"]["code"] == "MERCHANT_NOT_ELIGIBLE"
    await service.call("PUT", f"/v1/merchants/{merchant}", {**body, "status": "active"})
    assert (await redeem(service, payment(voucher, merchant, 100_000))).status == 201


async def test_a_merchant_changed_after_the_workers_read_it_is_refused_at_once(
    service: Service,
) -> None:
    """The workers decide merchants' verdicts from their copies: a change answered is seen
    by every payment after it, on a campaign made before the merchant and one after."""
    before = await new_campaign(service)
    merchant = await new_merchant(service)
    after = await new_campaign(service)
    vouchers = [await issue(service, c, n) for c in (before, after) for n in range(1, 13)]
    body = {"name": "乡宁家电城", "county_code": "141029", "categories": ["appliance"]}
    # both workers read the merchant active (payments spread over the connections)
    paid = await gather(*(redeem(service, payment(v, merchant, 100_000)) for v in vouchers[::2]))
    assert [r.status for r in paid] == [201] * 12
    resp = await service.call("PUT", f"/v1/merchants/{merchant}", {**body, "status": "suspended"})
    assert resp.status == 200
    refused = await gather(
        *(redeem(service, payment(v, merchant, 100_000)) for v in vouchers[1::2])
    )
    assert {r.body["error"]["code"] for r in refused} == {"MERCHANT_NOT_ELIGIBLE"}
    await service.call("PUT", f"/v1/merchants/{merchant}", {**body, "status": "active"})
    again = await gather(*(redeem(service, payment(v, merchant, 100_000)) for v in vouchers[1::2]))
    assert [r.status for r in again] == [201] * 12


async def test_a_batch_of_payments_is_one_script_call_once_its_merchants_are_read(
    service: Service, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    vouchers = [await issue(service, campaign_id, n) for n in range(1, 7)]
    scripts = Scripts(redis)
    redemptions = Redemptions(redis, scripts, Campaigns(redis, scripts), batch_max=10)
    calls: list[str] = []  # the merchants' reads and the script calls, in order
    read, run = redemptions.merchants.read, scripts.run

    async def counted_read(merchant_ids: list[str]) -> None:
        calls.append("read")
        await read(merchant_ids)

    async def counted_run(call: Any) -> Any:
        calls.append(call.SCRIPT)
        return await run(call)

    monkeypatch.setattr(redemptions.merchants, "read", counted_read)
    monkeypatch.setattr(scripts, "run", counted_run)
    paying = ApiKey(id="payment-key", secret="s", role="payment")

    async def pay(voucher: dict[str, Any]) -> None:
        body = msgspec.convert(payment(voucher, merchant, 100_000), RedemptionIn)
        verified = Verified(paying, f"pay-nonce-{secrets.token_hex(8)}", int(time.time()))
        await redemptions.redeem(body, verified, time.time())

    await pay(vouchers[0])
    assert calls == ["read", "redeem"]
    await asyncio.gather(*(pay(v) for v in vouchers[1:3]))  # one batch, its merchant known
    assert calls == ["read", "redeem", "redeem"]
    body = {"name": "乡宁家电城", "county_code": "141029", "categories": ["appliance"]}
    assert (await service.call("PUT", f"/v1/merchants/{merchant}", body)).status == 200
    calls.clear()
    await asyncio.gather(*(pay(v) for v in vouchers[3:5]))  # refused STALE, decided again
    assert calls == ["redeem", "read", "merchant_version", "redeem"]
    # a campaign ahead of the merchants' version (a failover lost a change): that one is
    # brought past it first
    ahead = int(await redis.get(keys.MERCHANT_VERSION)) + 1000
    await redis.set(keys.CampaignKeys(campaign_id).merchant_version, ahead)
    calls.clear()
    await pay(vouchers[5])
    assert calls == ["redeem", "read", "merchant_version", "read", "merchant_version", "redeem"]
    assert int(await redis.get(keys.MERCHANT_VERSION)) == ahead + 1


async def test_discount_above_the_reservation_comes_from_available_or_is_refused(
    service: Service,
) -> None:
    # reserve 0: every discount comes from `available`; the budget covers 150,000 fen
    campaign_id = await new_campaign(service, budget_fen=150_000, reserve_fen=0)
    merchant = await new_merchant(service)
    first, second = await issue(service, campaign_id, 30), await issue(service, campaign_id, 31)
    assert (await redeem(service, payment(first, merchant, 1_000_000))).status == 201
    before = await ledger(service, campaign_id)
    assert before["available_fen"] == 50_000 and before["spent_fen"] == 100_000
    resp = await redeem(service, payment(second, merchant, 1_000_000))
    assert resp.status == 409 and resp.body["error"]["code"] == "BUDGET_EXHAUSTED"
    assert await ledger(service, campaign_id) == before
    assert (await redeem(service, payment(second, merchant, 500_000))).status == 201
    assert (await ledger(service, campaign_id))["available_fen"] == 0


async def current_round(service: Service, campaign_id: str) -> dict[str, Any]:
    resp = await service.call("GET", f"/v1/campaigns/{campaign_id}")
    assert resp.status == 200, resp.body
    return resp.body["current_round"]  # type: ignore[no-any-return]


async def test_a_discount_above_the_reservation_overdraws_the_round_until_refunded(
    service: Service, redis: Redis, pg: asyncpg.Pool
) -> None:
    """Two claims reserve the whole round budget (2 x 50,000); a discount of 200,000 takes
    150,000 from the pool: the round is overdrawn, never refused at the till, and still
    issues nothing more; refunds repay the overdraw first, then free the round's budget."""
    reserve = 50_000
    campaign_id = await new_campaign(
        service, quota=None, reserve_fen=reserve, round_budget_fen=2 * reserve
    )
    merchant = await new_merchant(service)
    first, _ = await issue(service, campaign_id, 60), await issue(service, campaign_id, 61)
    path = f"/v1/campaigns/{campaign_id}/claims"

    async def claim_code(n: int) -> Any:
        resp = await service.call("POST", path, claim(n), "app")
        return resp.status if resp.status == 201 else resp.body["error"]["code"]

    assert await claim_code(62) == "ROUND_BUDGET_EXHAUSTED"
    paid = await redeem(service, payment(first, merchant, 3_000_000))
    assert paid.status == 201 and paid.body["discount_fen"] == 200_000, paid.body
    rnd = await current_round(service, campaign_id)
    money = ("reserved_fen", "spent_fen", "overdrawn_fen", "budget_fen")
    assert [rnd[k] for k in money] == [reserve, 200_000, 150_000, 2 * reserve]
    assert await claim_code(62) == "ROUND_BUDGET_EXHAUSTED"  # the pool paid, not the round
    # the budget may go as low as what its claims reserved, whatever the pool paid
    cas = {"request_id": f"cas-{campaign_id}", "expected_budget_fen": 2 * reserve}
    budget_path = f"/v1/campaigns/{campaign_id}/rounds/r1/budget"
    resp = await service.call("POST", budget_path, {**cas, "budget_fen": 2 * reserve})
    assert resp.status == 200, resp.body

    rid = paid.body["redemption_id"]
    before = await ledger(service, campaign_id)
    assert (await refund(service, rid, 750_000, f"od-{rid[-8:]}-1")).status == 201  # 50,000 back
    rnd = await current_round(service, campaign_id)
    assert [rnd[k] for k in money[:3]] == [reserve, 150_000, 100_000]
    assert await claim_code(62) == "ROUND_BUDGET_EXHAUSTED"
    assert (await ledger(service, campaign_id))["available_fen"] == before["available_fen"] + 50_000
    assert (await refund(service, rid, 2_250_000, f"od-{rid[-8:]}-2")).status == 201  # 150,000
    rnd = await current_round(service, campaign_id)
    assert [rnd[k] for k in money[:3]] == [reserve, 0, 0]
    await asyncio.sleep(HINT_TTL_S + 0.1)  # the workers' local "budget used up" lapses
    assert await claim_code(62) == 201  # the first voucher's reservation is free again
    await service.drained()
    report = await reconcile(redis, pg, campaign_id)
    assert report.ok, report.problems


@pytest.mark.solo  # in parallel, one of the 300 once met a Redis timeout (503) instead
async def test_hundreds_redeeming_one_voucher_only_one_wins(service: Service) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    voucher = await issue(service, campaign_id, 40)
    answers = await asyncio.gather(
        *(redeem(service, payment(voucher, merchant, 100_000 + i)) for i in range(300))
    )
    codes = Counter(201 if a.status == 201 else a.body["error"]["code"] for a in answers)
    assert codes == {201: 1, "VOUCHER_USED": 299}
    led = await ledger(service, campaign_id)
    winner = next(a for a in answers if a.status == 201)
    assert led["spent_fen"] == winner.body["discount_fen"]


@pytest.mark.solo  # 150 at once, as its neighbour's 300: a Redis timeout (503) in parallel
async def test_concurrent_redemptions_never_spend_more_than_the_budget(service: Service) -> None:
    budget = 1_000_000
    campaign_id = await new_campaign(service, budget_fen=budget, reserve_fen=0, quota=None)
    merchant = await new_merchant(service)
    vouchers = await asyncio.gather(*(issue(service, campaign_id, 100 + i) for i in range(150)))
    answers = await asyncio.gather(
        *(redeem(service, payment(v, merchant, 300_000 + i)) for i, v in enumerate(vouchers))
    )
    won = [a for a in answers if a.status == 201]
    lost = [a for a in answers if a.status != 201]
    assert {a.body["error"]["code"] for a in lost} == {"BUDGET_EXHAUSTED"}
    led = await ledger(service, campaign_id)
    assert led["spent_fen"] == sum(a.body["discount_fen"] for a in won) <= budget
    assert led["available_fen"] < 30_000  # refused only when the rest could not cover one


async def test_refunds_before_reimbursement_return_the_subsidy_proportionally(
    service: Service,
) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    voucher = await issue(service, campaign_id, 50)
    paid = await redeem(service, payment(voucher, merchant, 1_000_003))
    rid, discount = paid.body["redemption_id"], paid.body["discount_fen"]
    assert discount == 100_000
    before = await ledger(service, campaign_id)
    returned = []
    for n, amount in enumerate((333_334, 333_334, 333_335)):
        resp = await refund(service, rid, amount, f"refund-{rid[-8:]}-{n}")
        assert resp.status == 201, resp.body
        assert resp.body["clawback_due_fen"] == 0 and resp.body["status"] == "returned"
        returned.append(resp.body["subsidy_returned_fen"])
    assert returned == [33_333, 33_333, 33_334] and sum(returned) == discount
    after = await ledger(service, campaign_id)
    assert after["spent_fen"] == before["spent_fen"] - discount
    assert after["available_fen"] == before["available_fen"] + discount
    again = await refund(service, rid, 1, f"refund-{rid[-8:]}-x")
    assert again.status == 409 and again.body["error"]["code"] == "ALREADY_REFUNDED"
    assert await voucher_status(service, voucher["voucher_id"]) == "refunded"
    # the voucher is not given back: the person's one chance stays used
    resp = await service.call(
        "POST", f"/v1/campaigns/{campaign_id}/claims", claim(50, request_id="again-00050"), "app"
    )
    assert resp.body["error"]["code"] == "ALREADY_CLAIMED"
    got = await service.call("GET", f"/v1/redemptions/{rid}", role="auditor")
    assert got.body["status"] == "refunded" and got.body["subsidy_returned_fen"] == discount


async def test_refund_refusals_change_nothing(service: Service) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    voucher = await issue(service, campaign_id, 55)
    rid = (await redeem(service, payment(voucher, merchant, 500_000))).body["redemption_id"]
    before = await ledger(service, campaign_id)
    too_much = await refund(service, rid, 500_001, "refund-too-much")
    assert too_much.status == 400 and "amount_fen" in too_much.body["error"]["message"]
    missing = await refund(service, f"{campaign_id}.ffff", 1, "refund-missing")
    assert missing.status == 404
    zero = await refund(service, rid, 0, "refund-zero-amount")
    assert zero.status == 400
    assert await ledger(service, campaign_id) == before
    first = await refund(service, rid, 100_000, "refund-first-1")
    replay = await refund(service, rid, 100_000, "refund-first-1")
    assert replay.headers.get("Idempotent-Replay") == "true" and replay.body == first.body
    mismatch = await refund(service, rid, 100_001, "refund-first-1")
    assert mismatch.status == 422


async def test_refund_after_reimbursement_becomes_a_clawback_until_repaid(
    service: Service, redis: Redis, scripts: Scripts
) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    voucher = await issue(service, campaign_id, 60)
    paid = await redeem(service, payment(voucher, merchant, 800_000))
    rid = paid.body["redemption_id"]
    assert await mark_paid(scripts, campaign_id, "batch-1", [rid]) == [rid]
    assert await mark_paid(scripts, campaign_id, "batch-2", [rid]) == []  # once
    before = await ledger(service, campaign_id)
    resp = await refund(service, rid, 400_000, "refund-after-paid")
    assert resp.status == 201, resp.body
    assert resp.body["subsidy_returned_fen"] == 40_000
    assert resp.body["clawback_due_fen"] == 40_000 and resp.body["status"] == "clawback_due"
    owed = await ledger(service, campaign_id)
    assert owed["spent_fen"] == before["spent_fen"] - 40_000
    assert owed["clawback_due_fen"] == before["clawback_due_fen"] + 40_000
    assert owed["available_fen"] == before["available_fen"]
    refund_id = resp.body["refund_id"]
    path = f"/v1/clawbacks/{refund_id}/repaid"
    wrong_role = await service.call("POST", path, {"request_id": "repaid-0001"}, "payment")
    assert wrong_role.status == 403
    repaid = await service.call("POST", path, {"request_id": "repaid-0001"}, "auditor")
    assert repaid.status == 200 and repaid.body["status"] == "repaid"
    settled = await ledger(service, campaign_id)
    assert settled["clawback_due_fen"] == before["clawback_due_fen"]
    assert settled["available_fen"] == before["available_fen"] + 40_000
    replay = await service.call("POST", path, {"request_id": "repaid-0001"}, "auditor")
    assert replay.headers.get("Idempotent-Replay") == "true"
    twice = await service.call("POST", path, {"request_id": "repaid-0002"}, "auditor")
    assert twice.status == 409 and twice.body["error"]["code"] == "ALREADY_REPAID"
    assert await ledger(service, campaign_id) == settled
    # a refund made before reimbursement owes nothing back
    other = await issue(service, campaign_id, 61)
    rid2 = (await redeem(service, payment(other, merchant, 800_000))).body["redemption_id"]
    early = await refund(service, rid2, 800_000, "refund-early-61")
    nothing = await service.call(
        "POST",
        f"/v1/clawbacks/{early.body['refund_id']}/repaid",
        {"request_id": "repaid-0003"},
        "auditor",
    )
    assert nothing.status == 409 and nothing.body["error"]["code"] == "NO_CLAWBACK_DUE"


async def test_expiry_returns_the_reservation_and_keeps_the_chance_used(
    service: Service, redis: Redis, scripts: Scripts
) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    vouchers = [await issue(service, campaign_id, 70 + i) for i in range(3)]
    await redeem(service, payment(vouchers[0], merchant, 100_000))
    before = await ledger(service, campaign_id)
    assert await expiry.sweep(redis, scripts, campaign_id, int(time.time() * 1000)) == 0
    sweeps = await asyncio.gather(
        *(expiry.sweep(redis, scripts, campaign_id, FAR_FUTURE_MS) for _ in range(5))
    )
    assert sum(sweeps) == 2  # concurrent sweeps expire each voucher once
    after = await ledger(service, campaign_id)
    assert after["reserved_fen"] == before["reserved_fen"] - 2 * RESERVE
    assert after["available_fen"] == before["available_fen"] + 2 * RESERVE
    assert after["spent_fen"] == before["spent_fen"]
    state = await service.call("GET", f"/v1/campaigns/{campaign_id}")
    assert state.body["current_round"]["reserved_fen"] == 0
    assert state.body["current_round"]["issued"] == 3
    assert [await voucher_status(service, v["voucher_id"]) for v in vouchers] == [
        "redeemed",
        "expired",
        "expired",
    ]
    refused = await redeem(service, payment(vouchers[1], merchant, 100_000))
    assert refused.body["error"]["code"] == "VOUCHER_EXPIRED"
    again = await service.call(
        "POST", f"/v1/campaigns/{campaign_id}/claims", claim(71, request_id="again-00071"), "app"
    )
    assert again.body["error"]["code"] == "ALREADY_CLAIMED"


async def test_postgres_records_the_money_path_and_reconcile_agrees(
    service: Service, redis: Redis, pg: asyncpg.Pool, scripts: Scripts
) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    vouchers = [await issue(service, campaign_id, 90 + i) for i in range(4)]
    r0 = (await redeem(service, payment(vouchers[0], merchant, 600_000))).body
    r1 = (await redeem(service, payment(vouchers[1], merchant, 700_000))).body
    await refund(service, r0["redemption_id"], 600_000, "pg-refund-r0")
    await mark_paid(scripts, campaign_id, "b1", [r1["redemption_id"]])
    claw = (await refund(service, r1["redemption_id"], 350_000, "pg-refund-r1")).body
    await expiry.sweep(redis, scripts, campaign_id, FAR_FUTURE_MS)
    await service.drained()
    rows = {
        r["voucher_id"]: r["status"]
        for r in await pg.fetch(
            "SELECT voucher_id, status FROM vouchers WHERE campaign_id = $1", campaign_id
        )
    }
    statuses = [rows[v["voucher_id"]] for v in vouchers]
    assert statuses == ["refunded", "redeemed", "expired", "expired"]
    red = await pg.fetchrow(
        "SELECT refunded_fen, subsidy_returned_fen, paid_to_merchant_at FROM redemptions"
        " WHERE redemption_id = $1",
        r1["redemption_id"],
    )
    assert red["refunded_fen"] == 350_000 and red["subsidy_returned_fen"] == 35_000
    assert red["paid_to_merchant_at"] is not None
    assert (
        await pg.fetchval(
            "SELECT clawback_due_fen FROM refunds WHERE refund_id = $1", claw["refund_id"]
        )
        == 35_000
    )
    report = await reconcile(redis, pg, campaign_id)
    assert report.ok, report.problems


async def test_campaigns_landed_on_several_primaries(service: Service, keyspace: Keyspace) -> None:
    """On a cluster, this module's campaigns were spread over more than one primary (so the
    tests above crossed nodes); on one server there is one."""
    found = await campaign_primaries(keyspace)
    assert len(found) >= (2 if keyspace.topology == "cluster" else 1), found
