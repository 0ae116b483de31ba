"""The money path: a voucher applied at payment, refunds (and clawbacks), reimbursement
marks. Each state change is one script in the campaign's slot that checks everything
before its first write and appends its event to the campaign stream. Payments are
micro-batched like claims: per batch, one `redeem` call that spends each signature's nonce
in the campaign's buckets and decides each payment in order, its merchants' verdicts
decided from the worker's copy of them (merchants.Cache: read again only for a merchant
it lacks, or when the script finds the copy older than a change)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
from redis.asyncio import Redis

from issuer import idempotency, keys, merchants, money
from issuer.auth import Verified
from issuer.batching import TickBatcher
from issuer.campaigns import CachedCampaign, Campaigns, read_record
from issuer.errors import ApiError, GateRefusal
from issuer.ids import new_id
from issuer.model import (
    Eligibility,
    ItemIn,
    ItemOut,
    MerchantOut,
    RedemptionIn,
    RedemptionOut,
    RefundIn,
    RefundOut,
    RepaidIn,
)
from issuer.products import expand_categories, is_appliance, valid_gb_code
from issuer.protocol import ClawbackRepaid, MarkPaid, RedeemBatch, Redemption, Refund
from issuer.schedule import from_millis, to_millis
from issuer.scripts import Scripts

STALE_RETRIES = 8  # concurrent refunds of one redemption, or merchant changes: try again


class RedemptionRecord(msgspec.Struct, kw_only=True):
    """A redemption as Redis keeps it (times in epoch ms)."""

    redemption_id: str
    campaign_id: str
    voucher_id: str
    round_id: str
    user_id: str
    merchant_id: str
    order_id: str
    order_amount_fen: int
    discount_fen: int
    payable_fen: int
    paid_at: int
    items: list[ItemOut]
    status: str = "redeemed"
    refunded_fen: int = 0
    subsidy_returned_fen: int = 0
    paid_to_merchant: bool = False
    redeemed_at: int = 0
    overdrawn_fen: int = 0  # discount above the reservation, from `available` (the script)
    by: str = ""
    # the request that made it (idempotency field and body fingerprint), recorded so that
    # `issuer rebuild` can restore its idempotency record after a Redis loss
    request_key: str = ""
    request_fingerprint: str = ""


class RefundRecord(msgspec.Struct, kw_only=True):
    refund_id: str
    redemption_id: str
    amount_fen: int
    reason: str
    by: str
    subsidy_returned_fen: int = 0
    clawback_due_fen: int = 0
    status: str = ""
    request_key: str = ""  # as in RedemptionRecord
    request_fingerprint: str = ""


REDEMPTION = msgspec.json.Decoder(RedemptionRecord)
REFUND = msgspec.json.Decoder(RefundRecord)
ENCODE = msgspec.json.Encoder()


def check_items(eligibility: Eligibility, body: RedemptionIn) -> None:
    """Refuse a payment whose items are not all subsidised, or do not add up."""
    allowed = expand_categories(eligibility.categories)
    for n, item in enumerate(body.items):
        where = f"items[{n}] {item.category}"
        if item.category not in allowed:
            raise ApiError("PRODUCT_NOT_ELIGIBLE", where)
        if not is_appliance(item.category):
            continue
        needs_code = item.gb_code is not None or eligibility.require_gb_code
        if needs_code and (item.gb_code is None or not valid_gb_code(item.gb_code)):
            raise ApiError("INVALID_GB_CODE", where)
        if item.energy_grade is None or item.energy_grade > eligibility.appliance_min_grade:
            raise ApiError("ENERGY_GRADE_TOO_LOW", f"{where}: grade {item.energy_grade}")
    total = sum(item.amount_fen for item in body.items)
    if total != body.order_amount_fen:
        raise ApiError(
            "AMOUNT_MISMATCH", f"order_amount_fen {body.order_amount_fen}, items sum to {total}"
        )


def merchant_refusal(
    cached: CachedCampaign, merchant: MerchantOut | None, items: list[ItemIn]
) -> str:
    """Why this merchant may not take the voucher now ("" if it may)."""
    if merchant is None or merchant.status != "active":
        return "MERCHANT_NOT_ELIGIBLE"
    if merchant.tenant != cached.tenant:  # another programme's merchant
        return "MERCHANT_NOT_ELIGIBLE"
    if not cached.region.contains_code(merchant.county_code):
        return "MERCHANT_NOT_ELIGIBLE"
    sells = expand_categories(merchant.categories)
    if any(item.category not in sells for item in items):
        return "MERCHANT_NOT_ELIGIBLE"
    return ""


def redemption_out(rec: RedemptionRecord, tz: str) -> RedemptionOut:
    return RedemptionOut(
        redemption_id=rec.redemption_id,
        voucher_id=rec.voucher_id,
        campaign_id=rec.campaign_id,
        user_id=rec.user_id,
        merchant_id=rec.merchant_id,
        order_id=rec.order_id,
        order_amount_fen=rec.order_amount_fen,
        discount_fen=rec.discount_fen,
        payable_fen=rec.payable_fen,
        status=rec.status,
        paid_at=from_millis(rec.paid_at, tz),
        redeemed_at=from_millis(rec.redeemed_at, tz),
        refunded_fen=rec.refunded_fen,
        subsidy_returned_fen=rec.subsidy_returned_fen,
        paid_to_merchant=rec.paid_to_merchant,
        items=rec.items,
    )


def refund_out(rec: RefundRecord) -> RefundOut:
    return RefundOut(
        refund_id=rec.refund_id,
        redemption_id=rec.redemption_id,
        amount_fen=rec.amount_fen,
        subsidy_returned_fen=rec.subsidy_returned_fen,
        clawback_due_fen=rec.clawback_due_fen,
        status=rec.status,
    )


@dataclass(frozen=True, slots=True)
class Pending:
    """A redemption waiting for its batch: what the script takes, but the merchant's verdict,
    which the batch decides from the merchant it reads."""

    redemption: Redemption
    merchant_id: str
    items: list[ItemIn]


class Batcher(TickBatcher[Pending, tuple[str, bytes]]):
    """Sends the payments of one campaign as one `redeem` script call."""

    def __init__(
        self, owner: Redemptions, cached: CachedCampaign, key: tuple[str, str], batch_max: int
    ) -> None:
        super().__init__(batch_max)
        self.owner = owner
        self.cached = cached
        self.key = key

    async def send(self, items: list[Pending]) -> list[tuple[str, bytes]]:
        owner = self.owner
        copy = owner.merchants
        ids = sorted({p.merchant_id for p in items})
        for _ in range(STALE_RETRIES):
            await copy.fill(ids)  # after a raise too: a read of a newer version drops the copy
            result = await owner.scripts.run(self.batch(items))
            if result[0] != b"STALE":
                return [(result[2 * i].decode(), result[2 * i + 1]) for i in range(len(items))]
            await self.catch_up(ids, int(result[1]))
        raise ApiError("UNAVAILABLE", "the merchants kept changing, retry")

    async def catch_up(self, ids: list[str], held: int) -> None:
        """After a STALE (a merchant changed since the copy was read, or the campaign is new
        to the merchants' version or lost it): read the merchants again and raise the
        campaign's version to theirs (a change under way raises it no lower). A campaign
        ahead of the merchants' own (a failover lost a change): that one first past it."""
        copy, scripts = self.owner.merchants, self.owner.scripts
        await copy.read(ids)
        if copy.version < held:
            await merchants.raise_version(scripts, [keys.MERCHANT_VERSION], held + 1)
            await copy.read(ids)
        await merchants.raise_version(scripts, [self.cached.keys.merchant_version], copy.version)

    def batch(self, items: list[Pending]) -> RedeemBatch:
        """The `redeem` call of these payments, their merchants' verdicts from the copy."""
        cached = self.cached
        ck = cached.keys
        found = self.owner.merchants.found
        first_nonce_bucket, nonce_buckets = ck.nonce_range(
            {p.redemption.nonce_bucket for p in items}
        )
        current, previous = ck.idempotency(time.time())
        rounds = [r.round_id for r in cached.stored.rounds]
        terms = cached.definition.voucher
        return RedeemBatch(
            idem_current=current,
            idem_previous=previous,
            ledger=ck.ledger,
            vouchers=ck.vouchers,
            redemptions=ck.redemptions,
            orders=ck.orders,
            expiry=ck.expiry,
            events=ck.events,
            merchant_version=ck.merchant_version,
            rounds=[ck.round(r) for r in rounds],
            nonce_buckets=nonce_buckets,
            discount_rate_bp=terms.discount_rate_bp,
            cap_fen=terms.cap_fen,
            first_nonce_bucket=first_nonce_bucket,
            merchants_read=self.owner.merchants.version,
            round_count=len(rounds),
            round_ids=rounds,
            payments=[
                p.redemption._replace(
                    refusal=merchant_refusal(cached, found[p.merchant_id], p.items)
                )
                for p in items
            ],
        )

    def idle(self) -> None:
        self.owner.retire(self)


class Redemptions:
    """Entry point of the Payment endpoints and of reimbursement marks."""

    def __init__(
        self, redis: Redis, scripts: Scripts, campaigns: Campaigns, batch_max: int
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.campaigns = campaigns
        self.batch_max = batch_max
        self.merchants = merchants.Cache(redis)
        self._batchers: dict[tuple[str, str], Batcher] = {}

    async def redeem(
        self, body: RedemptionIn, verified: Verified, now_s: float
    ) -> tuple[RedemptionOut, bool]:
        """Apply the voucher to the payment; returns (redemption, replayed). Refusals the
        script decides are GateRefusals: its nonce is spent there."""
        cached = await self.campaigns.of_entity(body.voucher_id, "voucher")
        check_items(cached.definition.eligibility, body)
        ck = cached.keys
        key_id = verified.key.id
        terms = cached.definition.voucher
        discount = money.discount(body.order_amount_fen, terms.discount_rate_bp, terms.cap_fen)
        record = RedemptionRecord(
            redemption_id=new_id(ck.campaign_id),
            campaign_id=ck.campaign_id,
            voucher_id=body.voucher_id,
            round_id="",  # the voucher's: the script knows it
            user_id=body.user_id,
            merchant_id=body.merchant_id,
            order_id=body.order_id,
            order_amount_fen=body.order_amount_fen,
            discount_fen=discount,
            payable_fen=body.order_amount_fen - discount,
            paid_at=to_millis(body.paid_at),
            items=[ItemOut(**msgspec.structs.asdict(item)) for item in body.items],
            by=key_id,
            request_key=idempotency.idem_field(key_id, body.request_id),
            request_fingerprint=idempotency.fingerprint(body),
        )
        pending = Pending(
            Redemption(
                idem_field=record.request_key,
                fingerprint=record.request_fingerprint,
                nonce_bucket=keys.nonce_bucket(verified.timestamp),
                nonce=verified.nonce,
                voucher_id=body.voucher_id,
                user_id=body.user_id,
                order_id=body.order_id,
                redemption=ENCODE.encode(record),
                discount_fen=discount,
                refusal="",
            ),
            body.merchant_id,
            body.items,
        )
        code, payload = await self._batcher(cached).submit(pending)
        if code not in idempotency.OK_OR_REPLAY:
            raise GateRefusal(code, f"voucher {body.voucher_id}" if code == "NOT_FOUND" else None)
        rec = REDEMPTION.decode(payload)
        if code == "REPLAY":  # the first answer, before any refund or reimbursement
            rec = msgspec.structs.replace(
                rec,
                status="redeemed",
                refunded_fen=0,
                subsidy_returned_fen=0,
                paid_to_merchant=False,
            )
        return redemption_out(rec, cached.definition.timezone), code == "REPLAY"

    def _batcher(self, cached: CachedCampaign) -> Batcher:
        key = (cached.keys.campaign_id, cached.version)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = self._batchers[key] = Batcher(self, cached, key, self.batch_max)
        return batcher

    def retire(self, batcher: Batcher) -> None:
        """Drop an idle batcher (a new one is made on the next payment)."""
        if not batcher.queue and self._batchers.get(batcher.key) is batcher:
            del self._batchers[batcher.key]

    async def record(self, redemption_id: str) -> tuple[CachedCampaign, RedemptionRecord]:
        """The redemption as Redis holds it, with its campaign; NOT_FOUND if none."""
        cached = await self.campaigns.of_entity(redemption_id, "redemption")
        raw = await read_record(self.redis, cached.keys.redemptions, redemption_id, "redemption")
        return cached, REDEMPTION.decode(raw)

    async def get(self, redemption_id: str) -> RedemptionOut:
        cached, rec = await self.record(redemption_id)
        return redemption_out(rec, cached.definition.timezone)

    async def refund(
        self, redemption_id: str, body: RefundIn, key_id: str, now_s: float
    ) -> tuple[RefundOut, bool]:
        """Refund part or all of a redeemed order; returns (refund, replayed)."""
        cached = await self.campaigns.of_entity(redemption_id, "redemption")
        ck = cached.keys
        refund_id = new_id(ck.campaign_id)
        request = idempotency.request(ck, now_s, key_id, body.request_id, (redemption_id, body))
        for _ in range(STALE_RETRIES):
            raw = await read_record(self.redis, ck.redemptions, redemption_id, "redemption")
            rec = REDEMPTION.decode(raw)
            returned = money.subsidy_returned(
                rec.discount_fen, rec.order_amount_fen, rec.refunded_fen, body.amount_fen
            )
            record = RefundRecord(
                refund_id=refund_id,
                redemption_id=redemption_id,
                amount_fen=body.amount_fen,
                reason=body.reason,
                by=key_id,
                request_key=request.idem_field,
                request_fingerprint=request.fingerprint,
            )
            refund = Refund(
                request=request,
                ledger=ck.ledger,
                round=ck.round(rec.round_id),
                vouchers=ck.vouchers,
                redemptions=ck.redemptions,
                refunds=ck.refunds,
                events=ck.events,
                redemption_id=redemption_id,
                refunded_fen=rec.refunded_fen,
                amount_fen=body.amount_fen,
                subsidy_returned_fen=returned,
                overdraw_repaid_fen=money.overdraw_repaid(
                    rec.overdrawn_fen, rec.subsidy_returned_fen, returned
                ),
                refund=ENCODE.encode(record),
            )
            answer = await idempotency.write(
                self.scripts, refund, accept=(*idempotency.OK_OR_REPLAY, "STALE", "TOO_MUCH")
            )
            if answer.code == "STALE":
                continue
            if answer.code == "TOO_MUCH":
                left = answer.payload[0].decode()
                raise ApiError("INVALID_REQUEST", f"amount_fen: only {left} fen left to refund")
            refund_rec = REFUND.decode(answer.payload[0])
            if answer.replayed and refund_rec.status == "repaid":  # answered before repayment
                refund_rec = msgspec.structs.replace(refund_rec, status="clawback_due")
            return refund_out(refund_rec), answer.replayed
        raise ApiError("UNAVAILABLE", "the redemption kept changing, retry")

    async def clawback_repaid(
        self, refund_id: str, body: RepaidIn, key_id: str, now_s: float
    ) -> tuple[RefundOut, bool]:
        """The merchant paid a clawback back; returns (refund, replayed)."""
        ck = (await self.campaigns.of_entity(refund_id, "refund")).keys
        repaid = ClawbackRepaid(
            request=idempotency.request(ck, now_s, key_id, body.request_id, (refund_id, body)),
            ledger=ck.ledger,
            refunds=ck.refunds,
            events=ck.events,
            refund_id=refund_id,
            by=key_id,
            reason=body.reason,
        )
        answer = await idempotency.write(self.scripts, repaid, f"refund {refund_id}")
        return refund_out(REFUND.decode(answer.payload[0])), answer.replayed


async def mark_paid(
    scripts: Scripts, campaign_id: str, batch_id: str, redemption_ids: list[str]
) -> list[str]:
    """Record that the merchants were reimbursed (settlement); returns the ids marked."""
    ck = keys.CampaignKeys(campaign_id)
    marked = await scripts.run(
        MarkPaid(
            redemptions=ck.redemptions,
            events=ck.events,
            batch_id=batch_id,
            redemption_ids=redemption_ids,
        )
    )
    return [m.decode() for m in marked]
