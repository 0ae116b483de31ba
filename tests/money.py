"""Shared steps of the money-path tests: campaigns, merchants, vouchers and payments."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from tests.conftest import Service, unique_id
from tests.people import campaign, claim

GB_CODE = "6901234567892"  # a valid EAN-13
LEDGER_KEYS = ("available_fen", "reserved_fen", "spent_fen", "clawback_due_fen")


async def new_campaign(service: Service, **kwargs: Any) -> str:
    campaign_id = unique_id()
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(**kwargs))
    assert resp.status == 201, resp.body
    return campaign_id


async def new_merchant(service: Service, **overrides: Any) -> str:
    merchant_id = unique_id("m")
    body = {
        "name": "乡宁家电城",
        "county_code": "141029",
        "categories": ["appliance", "furniture"],
        **overrides,
    }
    resp = await service.call("PUT", f"/v1/merchants/{merchant_id}", body)
    assert resp.status == 201, resp.body
    return merchant_id


async def issue(service: Service, campaign_id: str, n: int) -> dict[str, Any]:
    """Person n claims a voucher; returns it."""
    resp = await service.call(
        "POST", f"/v1/campaigns/{campaign_id}/claims", claim(n, request_id=f"claim-{n:08d}"), "app"
    )
    assert resp.status == 201, resp.body
    return resp.body  # type: ignore[no-any-return]


def fridge(amount_fen: int, **overrides: Any) -> dict[str, Any]:
    return {
        "category": "refrigerator",
        "name": "双开门冰箱",
        "amount_fen": amount_fen,
        "quantity": 1,
        "gb_code": GB_CODE,
        "energy_grade": 1,
        **overrides,
    }


def payment(
    voucher: dict[str, Any], merchant_id: str, amount_fen: int, **overrides: Any
) -> dict[str, Any]:
    """A payment of one appliance for the voucher's owner."""
    order = unique_id("o")
    return {
        "request_id": f"pay-{order}",
        "voucher_id": voucher["voucher_id"],
        "user_id": voucher["user_id"],
        "merchant_id": merchant_id,
        "order_id": order,
        "order_amount_fen": amount_fen,
        "paid_at": datetime.now(UTC).isoformat(),
        "items": [fridge(amount_fen)],
        **overrides,
    }


async def redeem(service: Service, body: dict[str, Any]) -> Any:
    return await service.call("POST", "/v1/redemptions", body, "payment")


async def refund(service: Service, redemption_id: str, amount_fen: int, request_id: str) -> Any:
    body = {"request_id": request_id, "amount_fen": amount_fen, "reason": "退货"}
    return await service.call("POST", f"/v1/redemptions/{redemption_id}/refunds", body, "payment")


async def ledger(service: Service, campaign_id: str) -> dict[str, int]:
    resp = await service.call("GET", f"/v1/campaigns/{campaign_id}")
    assert resp.status == 200, resp.body
    led: dict[str, int] = resp.body["ledger"]
    balances = sum(led[k] for k in LEDGER_KEYS)
    assert balances == led["budget_fen"] + led["adjustments_fen"], led
    assert min(led[k] for k in LEDGER_KEYS) >= 0, led
    return led


async def gather(*calls: Any) -> list[Any]:
    return list(await asyncio.gather(*calls))


async def report_rows(service: Service, campaign_id: str, by: str = "total") -> list[Any]:
    resp = await service.call("GET", f"/v1/campaigns/{campaign_id}/report?by={by}", role="auditor")
    assert resp.status == 200, resp.body
    rows: list[Any] = resp.body["rows"]
    return rows


async def assert_report_agrees(service: Service, campaign_id: str) -> dict[str, int]:
    """Once the flusher has drained, the report (from PostgreSQL) says what the ledger (Redis)
    holds: net subsidy = spent, clawbacks owed = clawback due, issued and overdrawn = the
    round's.
    For one-round campaigns; returns the ledger."""
    await service.drained()
    state = await service.call("GET", f"/v1/campaigns/{campaign_id}")
    led = await ledger(service, campaign_id)
    (total,) = await report_rows(service, campaign_id)
    assert total["net_subsidy_fen"] == led["spent_fen"], (total, led)
    assert total["clawback_due_fen"] == led["clawback_due_fen"], (total, led)
    rnd = state.body["current_round"]
    assert total["issued"] == rnd["issued"], (total, rnd)
    assert total["overdrawn_fen"] == rnd["overdrawn_fen"], (total, rnd)
    return led
