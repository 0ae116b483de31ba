"""Fen arithmetic of the programme: the discount at payment, the subsidy a refund
returns and how much of it repays a round's overdraw. Integers only; Python does it
because Lua's numbers are doubles."""

from __future__ import annotations


def discount(order_amount_fen: int, rate_bp: int, cap_fen: int) -> int:
    """`min(floor(order × rate / 10000), cap)`: 10% off, capped at 2,000 CNY by default."""
    return min(order_amount_fen * rate_bp // 10_000, cap_fen)


def subsidy_returned(
    discount_fen: int, order_amount_fen: int, refunded_before_fen: int, amount_fen: int
) -> int:
    """The subsidy a refund of `amount_fen` gives back: the refunded share of the order's
    discount, on cumulative amounts, floored, so that partial refunds never return more
    than the discount in total and a full refund returns it exactly."""
    if order_amount_fen == 0:
        return 0
    after = discount_fen * (refunded_before_fen + amount_fen) // order_amount_fen
    before = discount_fen * refunded_before_fen // order_amount_fen
    return after - before


def overdraw_left(overdrawn_fen: int, returned_fen: int) -> int:
    """What a redemption still owes the campaign pool: the part of its discount above the
    reservation (`overdrawn_fen`, paid from `available`) less the subsidy its refunds
    returned (`returned_fen`), which repays that part first."""
    return max(0, overdrawn_fen - returned_fen)


def overdraw_repaid(overdrawn_fen: int, returned_before_fen: int, returned_fen: int) -> int:
    """How much of a refund's returned subsidy repays the redemption's overdraw."""
    return overdraw_left(overdrawn_fen, returned_before_fen) - overdraw_left(
        overdrawn_fen, returned_before_fen + returned_fen
    )
