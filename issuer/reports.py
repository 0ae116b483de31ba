"""Government reports (核销数据报表) from PostgreSQL, and the daily reconciliation file.

Grouping rules: `round`, `merchant` and `category` attribute a refund to its redemption;
`day` counts each event on the day it happened (issues by issue day, redemptions by
redemption day, refunds by refund day) in the campaign's time zone. A redemption with items
of several categories counts once in each; its amounts are split over the categories in
proportion to the item amounts (largest remainder), so that the category rows add up to
the total. `overdrawn_fen` (what the campaign pool paid above reservations, less what
refunds returned) is given by total and by round only: it is a round's account.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Literal

import asyncpg
import msgspec

from issuer import money
from issuer.model import Strict
from issuer.schedule import zone

GroupBy = Literal["total", "round", "day", "merchant", "category"]


class ReportQuery(Strict, kw_only=True):
    by: GroupBy = "total"
    format: Literal["json", "csv", "xlsx"] = "json"


class ReportRow(msgspec.Struct, kw_only=True):
    """One group's figures; `issued` and `redemption_rate` are None where vouchers do not
    belong to the group (merchant, category)."""

    key: str  # "total", a round id, a date (YYYY-MM-DD, campaign time zone), ...
    issued: int | None
    redeemed: int
    redemption_rate: float | None  # redeemed / issued, 4 decimals; None without issues
    order_amount_fen: int
    redeemed_amount_fen: int  # subsidy granted at payment (the discounts)
    refunded_amount_fen: int  # order money refunded
    subsidy_returned_fen: int  # subsidy that refunds took back
    net_subsidy_fen: int  # redeemed_amount_fen - subsidy_returned_fen
    clawback_due_fen: int  # returned subsidy the merchants still owe (paid out, not repaid)
    merchants: int  # merchants with redemptions
    # discounts above reservations that the campaign pool paid, less what refunds returned
    # (they repay it first); None where the grouping is not by rounds (day, merchant, category)
    overdrawn_fen: int | None = None


class ReportOut(msgspec.Struct, kw_only=True):
    campaign_id: str
    by: str
    generated_at: datetime
    rows: list[ReportRow]


class ReconciliationQuery(Strict, kw_only=True):
    date: date


# (Chinese, English) column headers of the CSV and XLSX forms, in ReportRow order
COLUMNS: tuple[tuple[str, str], ...] = (
    ("分组", "key"),
    ("发放数量", "issued"),
    ("核销数量", "redeemed"),
    ("核销率", "redemption_rate"),
    ("订单金额(分)", "order_amount_fen"),
    ("核销补贴金额(分)", "redeemed_amount_fen"),
    ("退货金额(分)", "refunded_amount_fen"),
    ("退回补贴金额(分)", "subsidy_returned_fen"),
    ("净补贴金额(分)", "net_subsidy_fen"),
    ("待追回补贴(分)", "clawback_due_fen"),
    ("核销商户数", "merchants"),
    ("超出预留由资金池垫付(分)", "overdrawn_fen"),
)


@dataclass
class _Group:
    issued: int = 0
    redeemed: int = 0
    order: int = 0
    discount: int = 0
    refunded: int = 0
    returned: int = 0
    owed: int = 0
    overdrawn: int = 0
    merchants: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Share:
    """The part of one redemption (and of its refunds) that falls in one group."""

    key: str
    order: int
    discount: int
    refunded: int
    returned: int
    owed: int


def split(total: int, weights: Sequence[int]) -> list[int]:
    """`total` split in proportion to `weights`, in integers that add up to `total`
    (largest remainder; ties to the earlier weight)."""
    whole = sum(weights)
    if whole == 0:
        return [total] + [0] * (len(weights) - 1) if weights else []
    parts = [total * w // whole for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: -(total * weights[i] % whole))
    for i in remainders[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _category_shares(rec: asyncpg.Record, refunds: tuple[int, int, int]) -> list[_Share]:
    by_category: dict[str, int] = defaultdict(int)
    for item in msgspec.json.decode(rec["items"]):
        by_category[item["category"]] += int(item["amount_fen"])
    names = sorted(by_category)
    weights = [by_category[c] for c in names]
    columns = [split(v, weights) for v in (rec["discount_fen"], *refunds)]
    return [_Share(name, weights[i], *(c[i] for c in columns)) for i, name in enumerate(names)]


REDEMPTIONS = """
SELECT redemption_id, round_id, merchant_id, order_amount_fen, discount_fen, redeemed_at,
       items::text AS items, overdrawn_fen
FROM redemptions WHERE campaign_id = $1
"""
REFUNDS = """
SELECT redemption_id, amount_fen, subsidy_returned_fen, created_at,
       CASE WHEN repaid_at IS NULL THEN clawback_due_fen ELSE 0 END AS owed
FROM refunds WHERE campaign_id = $1
"""
ISSUED = """
SELECT round_id, (issued_at AT TIME ZONE $2)::date AS day, count(*) AS n
FROM vouchers WHERE campaign_id = $1 GROUP BY 1, 2
"""


async def build_report(
    pool: asyncpg.Pool, campaign_id: str, by: GroupBy, tz: str, now: datetime
) -> ReportOut:
    """The campaign's figures grouped `by`, from what PostgreSQL has recorded."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        redemptions = await conn.fetch(REDEMPTIONS, campaign_id)
        refunds = await conn.fetch(REFUNDS, campaign_id)
        issued = await conn.fetch(ISSUED, campaign_id, tz)
    local = zone(tz)
    refund_totals: dict[str, tuple[int, int, int]] = defaultdict(lambda: (0, 0, 0))
    for f in refunds:
        refunded, returned, owed = refund_totals[f["redemption_id"]]
        refund_totals[f["redemption_id"]] = (
            refunded + f["amount_fen"],
            returned + f["subsidy_returned_fen"],
            owed + f["owed"],
        )

    def day_of(at: datetime) -> str:
        return at.astimezone(local).date().isoformat()

    key_of: dict[str, Callable[[asyncpg.Record], str]] = {
        "total": lambda r: "total",
        "round": lambda r: r["round_id"],
        "day": lambda r: day_of(r["redeemed_at"]),
        "merchant": lambda r: r["merchant_id"],
    }
    groups: dict[str, _Group] = defaultdict(_Group)
    if by == "total":
        groups["total"] = _Group()  # a campaign with no activity still has its row
    for rec in redemptions:
        refund = refund_totals[rec["redemption_id"]]
        if by == "category":
            shares = _category_shares(rec, refund)
        else:
            shares = [
                _Share(key_of[by](rec), rec["order_amount_fen"], rec["discount_fen"], *refund)
            ]
        for share in shares:
            g = groups[share.key]
            g.redeemed += 1
            g.overdrawn += money.overdraw_left(rec["overdrawn_fen"], refund[1])
            g.merchants.add(rec["merchant_id"])
            g.order += share.order
            g.discount += share.discount
            if by != "day":
                g.refunded += share.refunded
                g.returned += share.returned
                g.owed += share.owed
    if by == "day":  # refunds on the day they were made
        for f in refunds:
            g = groups[day_of(f["created_at"])]
            g.refunded += f["amount_fen"]
            g.returned += f["subsidy_returned_fen"]
            g.owed += f["owed"]
    counts_issues = by in ("total", "round", "day")
    by_rounds = by in ("total", "round")
    if counts_issues:
        for row in issued:
            key = {"total": "total", "round": row["round_id"], "day": str(row["day"])}[by]
            groups[key].issued += row["n"]
    rows = [_row(key, g, counts_issues, by_rounds) for key, g in sorted(groups.items())]
    return ReportOut(campaign_id=campaign_id, by=by, generated_at=now.astimezone(local), rows=rows)


def _row(key: str, g: _Group, counts_issues: bool, by_rounds: bool) -> ReportRow:
    return ReportRow(
        key=key,
        issued=g.issued if counts_issues else None,
        redeemed=g.redeemed,
        redemption_rate=round(g.redeemed / g.issued, 4) if counts_issues and g.issued else None,
        order_amount_fen=g.order,
        redeemed_amount_fen=g.discount,
        refunded_amount_fen=g.refunded,
        subsidy_returned_fen=g.returned,
        net_subsidy_fen=g.discount - g.returned,
        clawback_due_fen=g.owed,
        merchants=len(g.merchants),
        overdrawn_fen=g.overdrawn if by_rounds else None,
    )


def _table(report: ReportOut) -> Iterable[list[object]]:
    """Header row, then one row per group, as the CSV and XLSX forms show them."""
    yield [f"{zh} {en}" for zh, en in COLUMNS]
    for row in report.rows:
        yield [getattr(row, en) for _, en in COLUMNS]


def report_csv(report: ReportOut) -> bytes:
    return excel_csv(_table(report))


def excel_csv(table: Iterable[Sequence[object]]) -> bytes:
    """Rows as CSV in UTF-8 with a byte-order mark, so that Excel shows Chinese headers;
    None is an empty cell."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    for cells in table:
        writer.writerow(["" if c is None else c for c in cells])
    return ("\ufeff" + out.getvalue()).encode()


def report_xlsx(report: ReportOut) -> bytes:
    from openpyxl import Workbook
    from openpyxl.styles import Font

    book = Workbook()
    sheet = book.active
    sheet.title = f"by {report.by}"
    for cells in _table(report):
        sheet.append(cells)
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    sheet.freeze_panes = "A2"
    for column in sheet.columns:
        sheet.column_dimensions[column[0].column_letter].width = 18
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


# ------------------------------------------------------------------ reconciliation file

RECONCILIATION_HEADER = (
    "record_type",
    "record_id",
    "redemption_id",
    "voucher_id",
    "merchant_id",
    "order_id",
    "at",
    "order_amount_fen",
    "discount_fen",
    "payable_fen",
    "refund_amount_fen",
    "subsidy_returned_fen",
    "clawback_due_fen",
)
RECONCILIATION = """
SELECT 'redemption' AS record_type, r.redemption_id AS record_id, r.redemption_id,
       r.voucher_id, r.merchant_id, r.order_id, r.redeemed_at AS at, r.order_amount_fen,
       r.discount_fen, r.payable_fen, NULL::bigint AS refund_amount_fen,
       NULL::bigint AS subsidy_returned_fen, NULL::bigint AS clawback_due_fen
FROM redemptions r
WHERE r.campaign_id = $1 AND r.redeemed_at >= $2 AND r.redeemed_at < $3
UNION ALL
SELECT 'refund', f.refund_id, f.redemption_id, f.voucher_id, r.merchant_id, r.order_id,
       f.created_at, r.order_amount_fen, NULL, NULL, f.amount_fen, f.subsidy_returned_fen,
       f.clawback_due_fen
FROM refunds f JOIN redemptions r USING (redemption_id)
WHERE f.campaign_id = $1 AND f.created_at >= $2 AND f.created_at < $3
ORDER BY at, record_id
"""


async def reconciliation_file(pool: asyncpg.Pool, campaign_id: str, day: date, tz: str) -> bytes:
    """Every redemption and refund of `day` (campaign time zone) as CSV, in a stable order,
    so that the platform and the bureau can compare files by their SHA-256."""
    local = zone(tz)
    start = datetime.combine(day, time(), local)
    rows = await pool.fetch(RECONCILIATION, campaign_id, start, start + timedelta(days=1))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(RECONCILIATION_HEADER)
    for row in rows:
        cells = [row[name] for name in RECONCILIATION_HEADER]
        cells[6] = row["at"].astimezone(local).isoformat(timespec="milliseconds")
        writer.writerow(["" if c is None else c for c in cells])
    return out.getvalue().encode()
