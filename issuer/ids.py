"""Ids of what a campaign creates (vouchers, redemptions, refunds): `<campaign_id>.<random>`,
so that any of them leads to its campaign, and so to its keys, without an index."""

from __future__ import annotations

import os

from issuer.errors import ApiError

_DRAWN = 256  # tokens drawn from the OS at once: one getrandom per 256 ids, not per id
_tokens: list[str] = []  # drawn, not yet given out (each given out once)


def new_id(campaign_id: str) -> str:
    """A new id of `campaign_id`: its token 10 random bytes from the OS, in hex."""
    if not _tokens:
        drawn = os.urandom(10 * _DRAWN).hex()
        _tokens.extend(drawn[at : at + 20] for at in range(0, len(drawn), 20))
    return f"{campaign_id}.{_tokens.pop()}"


# a forked child draws its own: tokens left from its parent would be given out twice
os.register_at_fork(after_in_child=_tokens.clear)


def campaign_prefix(entity_id: str) -> str | None:
    """The campaign id an id starts with, or None (for logs and metrics labels)."""
    return entity_id.rpartition(".")[0] or None


def campaign_of(entity_id: str, what: str = "voucher") -> str:
    """The campaign id inside an id; NOT_FOUND naming `what` if it holds none."""
    campaign_id, dot, token = entity_id.rpartition(".")
    if not dot or not campaign_id or not token:
        raise ApiError("NOT_FOUND", f"{what} {entity_id}")
    return campaign_id
