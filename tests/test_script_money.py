"""The money scripts on fakeredis: redeem, refund, clawback_repaid, mark_paid, expire and
carry_over; their refusals and the ledger arithmetic, whose four parts always add up to
the budget."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from issuer.protocol import (
    CarryOver,
    ClawbackRepaid,
    Due,
    Expire,
    MarkPaid,
    MerchantVersion,
    RedeemBatch,
    Redemption,
    Refund,
)
from tests.fake import BUDGET, CK, NONCE_BUCKET, RESERVE, Fake, claim, ms, request, settings

pytestmark = pytest.mark.fast

VOUCHER = claim(1).candidate
ORDER = 1_000_000  # fen: a 10,000 CNY order
RATE_BP, CAP = 1500, 200_000  # the vouchers' terms (tests.fake.EXTRA)


def redeem(
    n: int,
    discount: int,
    voucher_id: str = VOUCHER,
    user_id: str = "user-1",
    order_id: str = "order-1",
    refusal: str = "",
    fingerprint: str = "fp",
    nonce: str = "",
) -> Redemption:
    """Redemption number `n` of `voucher_id` for an order of ORDER fen."""
    record = {
        "redemption_id": f"c-fake.d{n}",
        "campaign_id": "c-fake",
        "voucher_id": voucher_id,
        "round_id": "",
        "user_id": user_id,
        "order_id": order_id,
        "order_amount_fen": ORDER,
        "discount_fen": discount,
        "refunded_fen": 0,
        "subsidy_returned_fen": 0,
        "paid_to_merchant": False,
        "status": "redeemed",
    }
    return Redemption(
        idem_field=request(n).idem_field,
        fingerprint=fingerprint,
        nonce_bucket=NONCE_BUCKET,
        nonce=nonce or f"pay-nonce-{n:012d}-{fingerprint}",
        voucher_id=voucher_id,
        user_id=user_id,
        order_id=order_id,
        redemption=json.dumps(record).encode(),
        discount_fen=discount,
        refusal=refusal,
    )


def batch(
    *payments: Redemption,
    rate_bp: int = RATE_BP,
    rounds: tuple[str, ...] = ("r1",),
    merchants_read: int = 0,
) -> RedeemBatch:
    """One `redeem` call of these payments, on the campaign's terms."""
    current, previous = CK.idempotency(time.time())
    return RedeemBatch(
        idem_current=current,
        idem_previous=previous,
        ledger=CK.ledger,
        vouchers=CK.vouchers,
        redemptions=CK.redemptions,
        orders=CK.orders,
        expiry=CK.expiry,
        events=CK.events,
        merchant_version=CK.merchant_version,
        rounds=[CK.round(r) for r in rounds],
        nonce_buckets=CK.nonces(NONCE_BUCKET, NONCE_BUCKET),
        discount_rate_bp=rate_bp,
        cap_fen=CAP,
        first_nonce_bucket=NONCE_BUCKET,
        merchants_read=merchants_read,
        round_count=len(rounds),
        round_ids=list(rounds),
        payments=list(payments),
    )


async def paid(fake: Fake, payment: Redemption) -> tuple[str, Any]:
    """A payment alone in its batch: the code and its payload decoded from JSON."""
    return await run(fake, batch(payment))


def refund(
    n: int, amount: int, returned: int, refunded: int = 0, repaid: int = 0, redemption: int = 1
) -> Refund:
    """Refund number `n` of `amount` fen of redemption number `redemption`."""
    record = {
        "refund_id": f"c-fake.f{n}",
        "redemption_id": f"c-fake.d{redemption}",
        "amount_fen": amount,
        "reason": "returned goods",
        "by": "k-pay",
    }
    return Refund(
        request=request(100 + n),
        ledger=CK.ledger,
        round=CK.round("r1"),
        vouchers=CK.vouchers,
        redemptions=CK.redemptions,
        refunds=CK.refunds,
        events=CK.events,
        redemption_id=f"c-fake.d{redemption}",
        refunded_fen=refunded,
        amount_fen=amount,
        subsidy_returned_fen=returned,
        overdraw_repaid_fen=repaid,
        refund=json.dumps(record).encode(),
    )


def repaid(n: int, refund_id: str) -> ClawbackRepaid:
    return ClawbackRepaid(
        request=request(200 + n),
        ledger=CK.ledger,
        refunds=CK.refunds,
        events=CK.events,
        refund_id=refund_id,
        by="k-ops",
        reason="merchant paid",
    )


def mark_paid(*redemption_ids: str) -> MarkPaid:
    return MarkPaid(
        redemptions=CK.redemptions,
        events=CK.events,
        batch_id="batch-1",
        redemption_ids=list(redemption_ids),
    )


async def run(fake: Fake, call: Any) -> tuple[str, Any]:
    """The code of a {code, payload} answer, and its payload decoded from JSON."""
    code, payload = await fake.scripts.run(call)
    return code.decode(), json.loads(payload) if payload.startswith(b"{") else payload


async def issued(fake: Fake, *rnd: Any, vouchers: int = 1, budget_fen: int = BUDGET) -> None:
    await fake.put_campaign(*(rnd or (settings(),)), budget_fen=budget_fen)
    answers = await fake.claimed(*(claim(n) for n in range(1, vouchers + 1)))
    assert answers == ["OK"] * vouchers


async def test_a_discount_within_the_reservation_returns_the_rest(fake: Fake) -> None:
    await issued(fake)
    code, redemption = await paid(fake, redeem(1, 150_000))
    assert code == "OK" and redemption["overdrawn_fen"] == 0 and redemption["redeemed_at"] > 0
    led = await fake.balanced()
    assert (led["available"], led["reserved"], led["spent"]) == (BUDGET - 150_000, 0, 150_000)
    rnd = await fake.round()
    assert (rnd["reserved"], rnd["spent"], rnd["overdrawn"]) == (0, 150_000, 0)
    voucher = json.loads(await fake.redis.hget(CK.vouchers, VOUCHER))
    assert voucher["status"] == "redeemed" and voucher["redemption_id"] == "c-fake.d1"
    assert await fake.redis.hget(CK.orders, "order-1") == b"c-fake.d1"
    assert await fake.redis.zscore(CK.expiry, VOUCHER) is None
    assert (await fake.events())[-1] == "redemption"


async def test_a_discount_above_the_reservation_overdraws_the_pool(fake: Fake) -> None:
    await issued(fake)
    code, redemption = await paid(fake, redeem(1, RESERVE + 30_000))
    assert code == "OK" and redemption["overdrawn_fen"] == 30_000
    led = await fake.balanced()
    assert (led["available"], led["spent"]) == (BUDGET - RESERVE - 30_000, RESERVE + 30_000)
    assert (await fake.round())["overdrawn"] == 30_000


async def test_an_overdraw_the_pool_cannot_pay_is_refused_untouched(fake: Fake) -> None:
    await issued(fake, budget_fen=RESERVE + 10_000)
    before = await fake.ledger(), await fake.round()
    assert await paid(fake, redeem(1, RESERVE + 10_001)) == ("BUDGET_EXHAUSTED", b"")
    assert (await fake.ledger(), await fake.round()) == before
    assert (await paid(fake, redeem(2, RESERVE + 10_000)))[0] == "OK"
    assert (await fake.balanced())["available"] == 0


async def test_a_retried_redemption_is_answered_once(fake: Fake) -> None:
    await issued(fake)
    first = await paid(fake, redeem(1, 150_000))
    assert await paid(fake, redeem(1, 150_000, nonce="another-nonce-001")) == ("REPLAY", first[1])
    assert await paid(fake, redeem(1, 150_000, fingerprint="other")) == (
        "IDEMPOTENCY_MISMATCH",
        b"",
    )
    assert (await fake.balanced())["spent"] == 150_000


async def test_redemption_refusals(fake: Fake) -> None:
    await issued(fake, vouchers=2)
    assert await paid(fake, redeem(1, 1, refusal="MERCHANT_NOT_ELIGIBLE")) == (
        "MERCHANT_NOT_ELIGIBLE",
        b"",
    )
    assert await paid(fake, redeem(2, 1, voucher_id="c-fake.v9")) == ("NOT_FOUND", b"")
    assert await paid(fake, redeem(3, 1, user_id="user-2")) == ("VOUCHER_NOT_OWNED", b"")
    assert (await paid(fake, redeem(4, 1)))[0] == "OK"
    assert await paid(fake, redeem(5, 1, order_id="order-2")) == ("VOUCHER_USED", b"")
    other = claim(2).candidate
    assert await paid(fake, redeem(6, 1, voucher_id=other, user_id="user-2")) == (
        "ORDER_ALREADY_REDEEMED",
        b"",
    )
    await fake.balanced()


async def test_a_used_nonce_is_refused_before_anything_else(fake: Fake) -> None:
    await issued(fake)
    first = redeem(1, 150_000)
    assert (await paid(fake, first))[0] == "OK"
    again = first._replace(idem_field="k-ops|req-other", order_id="order-2")
    assert await paid(fake, again) == ("UNAUTHENTICATED", b"")
    assert (await fake.balanced())["spent"] == 150_000


async def test_a_batch_decided_at_another_merchants_version_is_stale_untouched(
    fake: Fake,
) -> None:
    await issued(fake)
    before = (await fake.ledger(), await fake.round())
    payment = redeem(1, 150_000)
    assert await fake.scripts.run(batch(payment, merchants_read=1)) == [b"STALE", 0]
    raised = MerchantVersion(held=CK.merchant_version, version=2)
    assert await fake.scripts.run(raised) == [2]
    assert await fake.scripts.run(batch(payment, merchants_read=1)) == [b"STALE", 2]
    assert (await fake.ledger(), await fake.round()) == before
    # nor its nonce spent: at the campaign's version, the same payment goes through
    assert (await run(fake, batch(payment, merchants_read=2)))[0] == "OK"


async def test_a_campaigns_merchants_version_is_never_lowered(fake: Fake) -> None:
    def raised(version: int) -> MerchantVersion:
        return MerchantVersion(held=CK.merchant_version, version=version)

    assert await fake.scripts.run(raised(3)) == [3]
    assert await fake.scripts.run(raised(2)) == [3]
    assert await fake.scripts.run(raised(4)) == [4]


async def test_a_batch_decides_its_payments_in_order(fake: Fake) -> None:
    await issued(fake, vouchers=2)
    other = claim(2).candidate
    answer = await fake.scripts.run(
        batch(
            redeem(1, 150_000),
            redeem(2, 1, order_id="order-2"),  # the same voucher, already used by the first
            redeem(3, 100_000, voucher_id=other, user_id="user-2", order_id="order-3"),
            redeem(1, 150_000, nonce="pay-nonce-000000000003-fp"),  # the third's nonce
        )
    )
    assert answer[0::2] == [b"OK", b"VOUCHER_USED", b"OK", b"UNAUTHENTICATED"]
    assert json.loads(answer[1])["round_id"] == "r1"  # the voucher's, as the script knows
    led = await fake.balanced()
    assert (led["spent"], led["reserved"]) == (250_000, 0)


async def test_a_voucher_on_other_terms_than_its_campaign_is_refused_untouched(
    fake: Fake,
) -> None:
    await issued(fake)
    before = await fake.ledger()
    assert await run(fake, batch(redeem(1, 150_000), rate_bp=RATE_BP + 1)) == ("INTERNAL", b"")
    assert await run(fake, batch(redeem(2, 150_000), rounds=("r2",))) == ("INTERNAL", b"")
    assert await fake.ledger() == before


async def test_a_voucher_past_its_time_is_expired_by_the_redemption(fake: Fake) -> None:
    await issued(fake, settings(valid_for_s=-1))
    assert await paid(fake, redeem(1, 150_000)) == ("VOUCHER_EXPIRED", b"")
    voucher = json.loads(await fake.redis.hget(CK.vouchers, VOUCHER))
    assert voucher["status"] == "expired"
    led = await fake.balanced()
    assert (led["available"], led["reserved"]) == (BUDGET, 0)
    assert (await fake.events())[-1] == "expiry"
    assert await paid(fake, redeem(2, 150_000)) == ("VOUCHER_EXPIRED", b"")


async def test_a_refund_before_reimbursement_returns_the_subsidy(fake: Fake) -> None:
    await issued(fake)
    await paid(fake, redeem(1, 150_000))
    code, record = await run(fake, refund(1, 400_000, 60_000))
    assert code == "OK" and record["status"] == "returned" and record["clawback_due_fen"] == 0
    assert record["voucher_status"] == "redeemed"
    led = await fake.balanced()
    assert (led["available"], led["spent"]) == (BUDGET - 90_000, 90_000)
    assert (await fake.round())["spent"] == 90_000
    redemption = json.loads(await fake.redis.hget(CK.redemptions, "c-fake.d1"))
    assert redemption["status"] == "partially_refunded"
    assert (redemption["refunded_fen"], redemption["subsidy_returned_fen"]) == (400_000, 60_000)


async def test_a_refund_after_reimbursement_is_a_clawback_until_repaid(fake: Fake) -> None:
    await issued(fake)
    await paid(fake, redeem(1, 150_000))
    assert await fake.scripts.run(mark_paid("c-fake.d1", "c-fake.d9")) == [b"c-fake.d1"]
    assert await fake.scripts.run(mark_paid("c-fake.d1")) == []  # paid once
    code, record = await run(fake, refund(1, 400_000, 60_000))
    assert code == "OK" and record["status"] == "clawback_due"
    led = await fake.balanced()
    assert (led["available"], led["clawback_due"]) == (BUDGET - 150_000, 60_000)
    code, record = await run(fake, repaid(1, "c-fake.f1"))
    assert code == "OK" and record["status"] == "repaid"
    led = await fake.balanced()
    assert (led["available"], led["clawback_due"]) == (BUDGET - 90_000, 0)
    assert (await run(fake, repaid(1, "c-fake.f1")))[0] == "REPLAY"
    assert await run(fake, repaid(2, "c-fake.f1")) == ("ALREADY_REPAID", b"")
    assert await run(fake, repaid(3, "c-fake.f9")) == ("NOT_FOUND", b"")
    await fake.balanced()


async def test_only_a_clawback_can_be_repaid(fake: Fake) -> None:
    await issued(fake)
    await paid(fake, redeem(1, 150_000))
    await run(fake, refund(1, 400_000, 60_000))
    assert await run(fake, repaid(1, "c-fake.f1")) == ("NO_CLAWBACK_DUE", b"")


async def test_a_full_refund_ends_the_voucher_and_repays_its_overdraw(fake: Fake) -> None:
    await issued(fake)
    await paid(fake, redeem(1, RESERVE + 30_000))
    code, record = await run(fake, refund(1, ORDER, RESERVE + 30_000, repaid=30_000))
    assert code == "OK" and record["voucher_status"] == "refunded"
    voucher = json.loads(await fake.redis.hget(CK.vouchers, VOUCHER))
    assert voucher["status"] == "refunded"
    rnd = await fake.round()
    assert (rnd["spent"], rnd["overdrawn"]) == (0, 0)
    assert (await fake.balanced())["available"] == BUDGET
    assert await run(fake, refund(2, 1, 0, refunded=ORDER)) == ("ALREADY_REFUNDED", b"")
    assert await fake.scripts.run(mark_paid("c-fake.d1")) == []  # nothing left to pay


async def test_refund_refusals(fake: Fake) -> None:
    await issued(fake)
    await paid(fake, redeem(1, 150_000))
    assert await run(fake, refund(1, 1, 0, redemption=9)) == ("NOT_FOUND", b"")
    assert await run(fake, refund(2, 1, 0, refunded=5)) == ("STALE", b"")
    assert await run(fake, refund(3, ORDER + 1, 0)) == ("TOO_MUCH", str(ORDER).encode())
    first = await run(fake, refund(4, 1_000, 150))
    assert await run(fake, refund(4, 1_000, 150)) == ("REPLAY", first[1])
    assert (await fake.balanced())["spent"] == 150_000 - 150


def expire(now_ms: int, *due: Due, rounds: tuple[str, ...] = ("r1",)) -> Expire:
    return Expire(
        ledger=CK.ledger,
        vouchers=CK.vouchers,
        expiry=CK.expiry,
        events=CK.events,
        rounds=[CK.round(r) for r in rounds],
        now_ms=now_ms,
        due=list(due),
    )


async def test_expiry_returns_the_reservations_of_vouchers_due(fake: Fake) -> None:
    await issued(fake, vouchers=3)
    await paid(fake, redeem(1, 150_000))
    due = [Due(claim(n).candidate, 0) for n in (1, 2, 3)]
    assert await fake.scripts.run(expire(ms(60), *due)) == 0  # not due yet
    assert await fake.scripts.run(expire(ms(2 * 86_400), *due)) == 2  # the redeemed one stays
    led = await fake.balanced()
    assert (led["available"], led["reserved"]) == (BUDGET - 150_000, 0)
    assert (await fake.round())["reserved"] == 0
    assert await fake.redis.zcard(CK.expiry) == 0
    assert await fake.scripts.run(expire(ms(2 * 86_400), *due)) == 0  # once


def carry(now_ms: int) -> CarryOver:
    return CarryOver(
        closed_round=CK.round("r1"),
        next_round=CK.round("r2"),
        events=CK.events,
        now_ms=now_ms,
        closed_round_id="r1",
        next_round_id="r2",
    )


async def test_carry_over_moves_what_a_closed_round_left_unused(fake: Fake) -> None:
    closed = settings(-7200, -3600, budget=500_000)
    await fake.put_campaign(closed, settings(budget=100_000))
    await fake.redis.hset(
        CK.round("r1"), mapping={"reserved": 200_000, "spent": 50_000, "overdrawn": 10_000}
    )
    assert await fake.scripts.run(carry(ms(0))) == 260_000  # 500 + 10 - 200 - 50 thousand
    assert ((await fake.round("r1"))["budget"], (await fake.round("r2"))["budget"]) == (
        240_000,
        360_000,
    )
    assert await fake.scripts.run(carry(ms(0))) == 0
    assert (await fake.events())[-1] == "carry_over"


@pytest.mark.parametrize(
    ("closes_in_s", "budgets"),
    [
        (60, (500_000, 100_000)),  # r1 still open
        (-3600, (500_000, -1)),  # r2 has no budget of its own
        (-3600, (-1, 100_000)),  # r1 had none
    ],
)
async def test_carry_over_needs_a_closed_round_and_an_open_one_with_budgets(
    fake: Fake, closes_in_s: int, budgets: tuple[int, int]
) -> None:
    first, second = settings(-7200, closes_in_s, budget=budgets[0]), settings(budget=budgets[1])
    assert await fake.put_campaign(first, second) == [b"OK", b"1"]
    assert await fake.scripts.run(carry(ms(0))) == 0
