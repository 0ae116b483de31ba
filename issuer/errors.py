"""Error codes of the HTTP contract (API.md "Errors") and the exception that carries them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import msgspec

# code -> (HTTP status, message "中文 / English", retryable)
ERRORS: dict[str, tuple[int, str, bool]] = {
    "INVALID_REQUEST": (400, "请求无效 / invalid request", False),
    "UNAUTHENTICATED": (401, "签名无效 / missing or invalid signature", False),
    "FORBIDDEN": (403, "无权访问 / this key may not call this endpoint", False),
    "OUTSIDE_GEOFENCE": (403, "当前位置不在活动区域 / location outside the campaign region", False),
    "NOT_REGISTERED": (403, "请先报名 / the person has not registered", False),
    "MERCHANT_NOT_ELIGIBLE": (403, "商户不可参与 / merchant not eligible", False),
    "NOT_FOUND": (404, "未找到 / not found", False),
    "NOT_OPEN": (409, "本轮尚未开始 / the round is not open", True),
    "CAMPAIGN_PAUSED": (409, "活动已暂停 / the campaign is paused", True),
    "CAMPAIGN_ENDED": (409, "活动已结束 / the campaign has ended", False),
    "CAMPAIGN_RUNNING": (
        409,
        "活动已开始，只能暂停、恢复或调整预算 / campaign already started",
        False,
    ),
    "ALREADY_CLAIMED": (409, "已领取过消费券 / already claimed in this campaign", False),
    "ROUND_QUOTA_EXHAUSTED": (409, "本轮消费券已领完 / this round is sold out", False),
    "ROUND_BUDGET_EXHAUSTED": (409, "本轮资金已用完 / this round's budget is used up", False),
    "BUDGET_EXHAUSTED": (409, "活动资金已用完 / the campaign budget is used up", False),
    "VOUCHER_EXPIRED": (409, "消费券已过期 / voucher expired", False),
    "VOUCHER_USED": (409, "消费券已使用 / voucher already used", False),
    "VOUCHER_NOT_OWNED": (409, "消费券不属于该用户 / voucher belongs to another user", False),
    "ALREADY_REFUNDED": (409, "已退款 / already refunded", False),
    "ORDER_ALREADY_REDEEMED": (
        409,
        "该订单已使用消费券 / this order already has a redemption",
        False,
    ),
    "ALREADY_REPAID": (409, "追回款已到账 / this clawback is already repaid", False),
    "SETTLEMENT_CLOSED": (
        409,
        "该笔核销已审核或已结算 / already decided or paid",
        False,
    ),
    "NO_CLAWBACK_DUE": (409, "该退款无需追回 / nothing is due back for this refund", False),
    "BUDGET_CONFLICT": (409, "预算已被修改或低于已占用 / stale or too low budget", False),
    "TENANT_CONFLICT": (
        409,
        "记录已属于另一租户，租户不可更改 / the record belongs to another tenant, which is fixed",
        False,
    ),
    "IDEMPOTENCY_MISMATCH": (
        422,
        "request_id 已用于不同请求 / request_id reused with another body",
        False,
    ),
    "PRODUCT_NOT_ELIGIBLE": (422, "商品不在补贴范围 / product not eligible", False),
    "INVALID_GB_CODE": (422, "国标码无效 / invalid 13-digit product code", False),
    "ENERGY_GRADE_TOO_LOW": (422, "能效等级不足 / energy grade too low", False),
    "AMOUNT_MISMATCH": (422, "金额不一致 / order amount differs from items", False),
    "RATE_LIMITED": (429, "请求过于频繁 / too many requests", True),
    "OVERLOADED": (503, "系统繁忙 / overloaded, retry later", True),
    "UNAVAILABLE": (503, "服务暂不可用 / service unavailable", True),
    "INTERNAL": (500, "服务内部错误 / internal error, logged", True),
}


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    code: str
    message: str
    retryable: bool
    voucher_id: str | None = None


class ErrorEnvelope(msgspec.Struct, kw_only=True, omit_defaults=True):
    error: ErrorBody
    voucher_id: str | None = None


class ApiError(Exception):
    """A refusal with one of the contract's codes; the API layer turns it into JSON. Its
    fields are slots: an exception's own attributes live in a dict whose reads the
    interpreter does not specialise (each `err.code` was a generic lookup; a refusal's
    answer, count and log read its fields a dozen times), a slot's it does. `body` is its
    answer's encoded body once answered (`http.error_response`): the claim path answers
    the same refusal objects again and again (the hint's, a round's not-open one)."""

    # and __weakref__, which an exception class without __slots__ has
    __slots__ = ("__weakref__", "body", "code", "detail", "retry_after", "status", "voucher_id")

    def __init__(
        self,
        code: str,
        detail: str | None = None,
        *,
        voucher_id: str | None = None,
        retry_after: int | None = None,
        status: int | None = None,
    ) -> None:
        usual, message, _ = ERRORS[code]
        super().__init__(f"{code}: {detail or message}")
        self.code = code
        self.status = status or usual  # the contract gives a few refusals their own
        self.detail = detail
        self.voucher_id = voucher_id
        self.retry_after = retry_after
        self.body: bytes | None = None

    def envelope(self) -> ErrorEnvelope:
        _, message, retryable = ERRORS[self.code]
        if self.detail:
            message = f"{message}: {self.detail}"
        # ALREADY_CLAIMED carries the voucher id both inside the error and at the top level.
        return ErrorEnvelope(
            error=ErrorBody(
                code=self.code, message=message, retryable=retryable, voucher_id=self.voucher_id
            ),
            voucher_id=self.voucher_id,
        )


class GateRefusal(ApiError):
    """A refusal decided by the claim script, which has already spent the request's nonce."""


@contextmanager
def invalid_field(field: str) -> Iterator[None]:
    """Turn a ValueError from checking `field` into INVALID_REQUEST naming it."""
    try:
        yield
    except ValueError as exc:
        raise ApiError("INVALID_REQUEST", f"{field}: {exc}") from None
