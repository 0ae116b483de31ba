"""The contract's route table: what the app serves and the OpenAPI document describes."""

from __future__ import annotations

from issuer.http import Route
from issuer.routes_claims import CLAIM_ROUTES
from issuer.routes_lottery import LOTTERY_ROUTES
from issuer.routes_money import MONEY_ROUTES
from issuer.routes_ops import OPS_ROUTES
from issuer.routes_review import REVIEW_ROUTES
from issuer.routes_settlement import SETTLEMENT_ROUTES

ROUTES: tuple[Route, ...] = (
    OPS_ROUTES + CLAIM_ROUTES + LOTTERY_ROUTES + MONEY_ROUTES + SETTLEMENT_ROUTES + REVIEW_ROUTES
)
