"""Government reports (核销数据报表) from PostgreSQL, and the daily reconciliation file."""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

import asyncpg
import msgspec

from issuer.model import Strict

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
    redemption_rate: float | None
    order_amount_fen: int
    redeemed_amount_fen: int
    refunded_amount_fen: int
    subsidy_returned_fen: int
    merchants: int


class ReportOut(msgspec.Struct, kw_only=True):
    campaign_id: str
    by: str
    generated_at: datetime
    rows: list[ReportRow]


class ReconciliationQuery(Strict, kw_only=True):
    date: date


async def build_report(pool: asyncpg.Pool, campaign_id: str, by: GroupBy, tz: str) -> ReportOut:
    raise NotImplementedError


def report_csv(report: ReportOut) -> bytes:
    raise NotImplementedError


def report_xlsx(report: ReportOut) -> bytes:
    raise NotImplementedError


async def reconciliation_file(pool: asyncpg.Pool, campaign_id: str, day: date, tz: str) -> bytes:
    raise NotImplementedError
