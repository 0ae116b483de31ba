"""Ids of what a campaign creates (vouchers, redemptions, refunds): `<campaign_id>.<random>`,
so that any of them leads to its campaign, and so to its keys, without an index."""

from __future__ import annotations

import os

from issuer.errors import ApiError


def new_id(campaign_id: str) -> str:
    return f"{campaign_id}.{os.urandom(10).hex()}"


def campaign_prefix(entity_id: str) -> str | None:
    """The campaign id an id starts with, or None (for logs and metrics labels)."""
    return entity_id.rpartition(".")[0] or None


def campaign_of(entity_id: str, what: str = "voucher") -> str:
    """The campaign id inside an id; NOT_FOUND naming `what` if it holds none."""
    campaign_id, dot, token = entity_id.rpartition(".")
    if not dot or not campaign_id or not token:
        raise ApiError("NOT_FOUND", f"{what} {entity_id}")
    return campaign_id
