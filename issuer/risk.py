"""The merchant risk report (API.md v1.2): per merchant of a campaign, named signals of
the frauds both county documents name (恶意套现, 虚假交易), and a score to sort by.

Read from PostgreSQL in one statement (redemptions, the vouchers' claims, refunds and
settlement records as the flusher and the desk recorded them), never from the gate.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import asyncpg
import msgspec
from msgspec import Meta

from issuer import integrity
from issuer.model import Strict
from issuer.reports import excel_csv

# weights of the score (they add up to 100): each multiplies a share in [0, 1]
WEIGHTS = {
    "at_cap_share": 25,
    "refunded_after_reimbursement_share": 25,
    "last_hour_share": 15,
    "device_concentration": 15,
    "integrity_failed_share": 20,
}
SCORE = (
    "score = 25 × at_cap_share + 25 × refunded_after_reimbursement_share"
    " + 15 × last_hour_share + 15 × device_concentration + 20 × integrity_failed_share,"
    " where device_concentration = 1 − 1 / redemptions_per_device (0 without devices) and"
    " integrity_failed_share = integrity_failed_records / redemptions: 0 to 100, 1 decimal"
)


class RiskQuery(Strict, kw_only=True):
    format: Literal["json", "csv"] = "json"


class RiskRow(msgspec.Struct, kw_only=True):
    """One merchant's signals in the campaign; shares are of its redemptions, 4 decimals."""

    merchant_id: str
    redemptions: Annotated[int, Meta(description="redemptions at this merchant")]
    flagged_records: Annotated[
        int, Meta(description="its settlement records that fail any automatic check")
    ]
    at_cap_share: Annotated[
        float, Meta(description="share of redemptions whose discount is exactly the cap")
    ]
    refunded_after_reimbursement_share: Annotated[
        float,
        Meta(
            description="share of redemptions refunded after the merchant was reimbursed"
            " (a refund that became a clawback)"
        ),
    ]
    last_hour_share: Annotated[
        float,
        Meta(
            description="share of redemptions made in the last hour of the voucher's"
            " validity (expires_at - redeemed_at <= 1 h)"
        ),
    ]
    redemptions_per_device: Annotated[
        float,
        Meta(
            description="redemptions whose claim named a device_id, per distinct device"
            " (0 when none did); 1 is one phone per buyer"
        ),
    ]
    redemptions_per_staff: Annotated[
        float,
        Meta(
            description="redemptions whose claim named a staff_id, per distinct staff"
            " member (0 when none did); staff mode hands out many per staff member, so it"
            " is reported, not scored"
        ),
    ]
    integrity_failed_records: Annotated[
        int,
        Meta(
            description="its settlement records failing unique_invoice, unique_documents"
            " or distinct_photos"
        ),
    ]
    score: Annotated[float, Meta(description=SCORE)]


class RiskOut(msgspec.Struct, kw_only=True):
    campaign_id: str
    generated_at: datetime
    rows: list[RiskRow]  # highest score first, then most redemptions, then merchant id


SIGNALS = """
SELECT r.merchant_id,
       count(*) AS redemptions,
       count(*) FILTER (WHERE r.discount_fen = v.cap_fen) AS at_cap,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM refunds f
                                      WHERE f.redemption_id = r.redemption_id
                                        AND f.clawback_due_fen > 0)) AS refunded_after,
       count(*) FILTER (WHERE v.expires_at - r.redeemed_at <= interval '1 hour') AS last_hour,
       count(v.device_id) AS with_device, count(DISTINCT v.device_id) AS devices,
       count(v.staff_id) AS with_staff, count(DISTINCT v.staff_id) AS staff,
       count(*) FILTER (WHERE NOT s.checks_passed) AS flagged,
       count(*) FILTER (WHERE EXISTS (
           SELECT 1 FROM jsonb_array_elements(s.checks) c
           WHERE c->>'name' = ANY($2::text[]) AND NOT (c->>'passed')::boolean)) AS integrity
FROM redemptions r
LEFT JOIN vouchers v ON v.voucher_id = r.voucher_id
LEFT JOIN settlements s ON s.redemption_id = r.redemption_id
WHERE r.campaign_id = $1
GROUP BY r.merchant_id
"""


def _per(count: int, distinct: int) -> float:
    return round(count / distinct, 2) if distinct else 0.0


def row_of(rec: asyncpg.Record) -> RiskRow:
    n = rec["redemptions"]
    per_device = _per(rec["with_device"], rec["devices"])
    shares = {
        "at_cap_share": rec["at_cap"] / n,
        "refunded_after_reimbursement_share": rec["refunded_after"] / n,
        "last_hour_share": rec["last_hour"] / n,
        "device_concentration": 1 - 1 / per_device if per_device >= 1 else 0.0,
        "integrity_failed_share": rec["integrity"] / n,
    }
    return RiskRow(
        merchant_id=rec["merchant_id"],
        redemptions=n,
        flagged_records=rec["flagged"],
        at_cap_share=round(shares["at_cap_share"], 4),
        refunded_after_reimbursement_share=round(shares["refunded_after_reimbursement_share"], 4),
        last_hour_share=round(shares["last_hour_share"], 4),
        redemptions_per_device=per_device,
        redemptions_per_staff=_per(rec["with_staff"], rec["staff"]),
        integrity_failed_records=rec["integrity"],
        score=round(sum(WEIGHTS[k] * v for k, v in shares.items()), 1),
    )


async def build(pool: asyncpg.Pool, campaign_id: str, now: datetime) -> RiskOut:
    rows = [row_of(r) for r in await pool.fetch(SIGNALS, campaign_id, list(integrity.NAMES))]
    rows.sort(key=lambda r: (-r.score, -r.redemptions, r.merchant_id))
    return RiskOut(campaign_id=campaign_id, generated_at=now, rows=rows)


# (Chinese, English) CSV headers, in RiskRow order
COLUMNS: tuple[tuple[str, str], ...] = (
    ("商户", "merchant_id"),
    ("核销笔数", "redemptions"),
    ("未通过检查的材料", "flagged_records"),
    ("封顶优惠占比", "at_cap_share"),
    ("结算后退货占比", "refunded_after_reimbursement_share"),
    ("券到期前一小时内核销占比", "last_hour_share"),
    ("每设备核销笔数", "redemptions_per_device"),
    ("每发券专员核销笔数", "redemptions_per_staff"),
    ("材料重复的记录", "integrity_failed_records"),
    ("风险分", "score"),
)


def risk_csv(report: RiskOut) -> bytes:
    header = [f"{zh} {en}" for zh, en in COLUMNS]
    return excel_csv([header, *([getattr(r, en) for _, en in COLUMNS] for r in report.rows)])
