"""Claim and redemption requests as raw HTTP/1.1 bytes, each signed with its own nonce (API.md
"Authentication"), built before the timed phase so the load generator only writes them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec

from issuer.auth import signature
from tests.people import XIANGNING_SEAT, id_number

FIRST_N = 1_000_000
# id_number(n) is born 1950-01-01 + n // 900 days: below this bound the birth date stays
# before 2011, so every number is valid (and in the past) for the service.
MAX_N = 20_000_000
ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Plan:
    """The requests of one client process: claims for persons first_n .. first_n+count-1,
    or, given their vouchers (one per person, in order), payments with them."""

    path: str
    key_id: str
    secret: str
    tag: str  # scenario and repetition: keeps request ids and nonces unique
    first_n: int
    count: int
    cycle: bool = False  # send the requests round and round (only for the empty handler)
    vouchers: tuple[str, ...] = ()
    merchant_id: str = ""


def claim_body(n: int, tag: str) -> bytes:
    """A claim by person n, from account u<n>, inside the Xiangning geofence."""
    return ENCODER.encode(
        {
            "request_id": f"{tag}-{n}",
            "user_id": f"u{n}",
            "person": {"id_number": id_number(n)},
            "location": XIANGNING_SEAT,
        }
    )


def redemption_body(n: int, tag: str, voucher_id: str, merchant_id: str) -> bytes:
    """Person n pays 5,000 CNY for a grade-1 refrigerator with their voucher."""
    amount = 500_000
    item = {
        "category": "refrigerator",
        "name": "冰箱",
        "amount_fen": amount,
        "quantity": 1,
        "gb_code": "6901234567892",
        "energy_grade": 1,
    }
    return ENCODER.encode(
        {
            "request_id": f"{tag}-{n}",
            "voucher_id": voucher_id,
            "user_id": f"u{n}",
            "merchant_id": merchant_id,
            "order_id": f"{tag}-order-{n}",
            "order_amount_fen": amount,
            "paid_at": "2026-11-24T10:00:00+08:00",
            "items": [item],
        }
    )


def build(plan: Plan, host: str) -> list[bytes]:
    """Every request of the plan, signed now (the server accepts them for 300 s)."""
    if plan.first_n + plan.count > MAX_N:
        raise ValueError(f"person numbers past {MAX_N:,} would be born too late")
    ts = str(int(time.time()))
    head = (
        f"POST {plan.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-Api-Key: {plan.key_id}\r\nX-Timestamp: {ts}\r\n"
    )
    out: list[bytes] = []
    for n in range(plan.first_n, plan.first_n + plan.count):
        if plan.vouchers:
            voucher_id = plan.vouchers[n - plan.first_n]
            body = redemption_body(n, plan.tag, voucher_id, plan.merchant_id)
        else:
            body = claim_body(n, plan.tag)
        nonce = f"{plan.tag}-nonce-{n:010d}"
        sig = signature(plan.secret, "POST", plan.path, ts, nonce, body)
        out.append(
            f"{head}Content-Length: {len(body)}\r\nX-Nonce: {nonce}\r\nX-Signature: {sig}"
            f"\r\n\r\n".encode()
            + body
        )
    return out
