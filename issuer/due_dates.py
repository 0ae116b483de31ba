"""Due dates of reimbursement: 30 working days after approval. A date that reaches a year
whose official holidays no source knows yet is provisional (that year counted weekends
only) until the year becomes known; then it is recomputed, and the change audited."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import asyncpg
from prometheus_client.core import GaugeMetricFamily, Metric

from issuer.audit import audit
from issuer.model import ProvisionalDueDates
from issuer.workdays import Calendar, Due

log = logging.getLogger("issuer.due_dates")
PAY_WITHIN_WORKING_DAYS = 30  # Xiangning: approved records are paid within 30 working days
BUREAU_TZ = ZoneInfo("Asia/Shanghai")
# How much earlier than its weekends-only estimate a due date turned out, at most, over
# every approval day of the years chinese-calendar knows (2004-2026; test_workdays
# checks it): a make-up workday in the window whose holidays fall after it.
MAY_MOVE_EARLIER_DAYS = 3
LOCK = 7262016  # advisory lock: a recompute holds it alone, approvals share it
ACTOR = "calendar"  # the audit log's actor of recomputes


def due_after(calendar: Calendar, approved_at: datetime) -> Due:
    """The due date of a record approved at `approved_at` (the bureau's day counts)."""
    day = approved_at.astimezone(BUREAU_TZ).date()
    return calendar.add_working_days(day, PAY_WITHIN_WORKING_DAYS)


def earliest(due: date, provisional_until_year: int | None) -> date:
    """The soonest a due date may still turn out to be once its year is known."""
    if provisional_until_year is None:
        return due
    return due - timedelta(days=MAY_MOVE_EARLIER_DAYS)


def batch_due(records: Iterable[tuple[date, int | None]]) -> Due:
    """A batch is due with its earliest record, and provisional while one of its
    provisional records may still turn out due on or before that day."""
    dues = list(records)
    day = min(d for d, _ in dues)
    waiting = [y for d, y in dues if y is not None and earliest(d, y) <= day]
    return Due(day, min(waiting, default=None))


async def hold(conn: asyncpg.Connection) -> None:
    """Taken by an approval's transaction: a recompute waits for approvals in flight (made
    with the calendar before a reload) and sees them."""
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", LOCK)


async def recompute(pool: asyncpg.Pool, calendar: Calendar) -> int:
    """Recompute the provisional due dates whose year `calendar` now knows, and the
    batches holding them; each change is an audit log entry. Returns the records changed."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
        rows = await conn.fetch(
            "SELECT redemption_id, decided_at, due_date, provisional_until_year, disbursement_id,"
            " tenant FROM settlements WHERE provisional_until_year IS NOT NULL"
            " ORDER BY redemption_id"
        )
        known = [r for r in rows if calendar.knows(r["provisional_until_year"])]
        for row in known:
            due = due_after(calendar, row["decided_at"])
            await conn.execute(
                "UPDATE settlements SET due_date = $2, provisional_until_year = $3"
                " WHERE redemption_id = $1",
                row["redemption_id"],
                *due,
            )
            await _audit(conn, row["redemption_id"], row, due)
        for batch_id in sorted({r["disbursement_id"] for r in known} - {None}):
            batch = await conn.fetchrow(
                "SELECT due_date, provisional_until_year, tenant FROM disbursements"
                " WHERE disbursement_id = $1",
                batch_id,
            )
            records = await conn.fetch(
                "SELECT due_date, provisional_until_year FROM settlements"
                " WHERE disbursement_id = $1",
                batch_id,
            )
            due = batch_due((r["due_date"], r["provisional_until_year"]) for r in records)
            await conn.execute(
                "UPDATE disbursements SET due_date = $2, provisional_until_year = $3"
                " WHERE disbursement_id = $1",
                batch_id,
                *due,
            )
            await _audit(conn, batch_id, batch, due)
    if known:
        log.info("provisional due dates recomputed", extra={"records": len(known)})
    return len(known)


async def _audit(conn: asyncpg.Connection, subject: str, was: asyncpg.Record, due: Due) -> None:
    await audit(
        conn,
        ACTOR,
        "due_date_recomputed",
        subject,
        f"official holidays of {was['provisional_until_year']} known",
        tenant=was["tenant"],
        was=was["due_date"],
        due_date=due.day,
        provisional_until_year=due.provisional_until_year,
    )


async def provisional(
    pool: asyncpg.Pool, tenants: frozenset[str] | None = None
) -> ProvisionalDueDates:
    """Approved records not yet paid whose due date is provisional, and the soonest (of
    these tenants only, if given)."""
    row = await pool.fetchrow(
        "SELECT count(*) AS n, min(due_date) AS soonest,"
        " (array_agg(provisional_until_year ORDER BY due_date))[1] AS year"
        " FROM settlements WHERE status = 'approved' AND provisional_until_year IS NOT NULL"
        " AND ($1::text[] IS NULL OR tenant = ANY($1::text[]))",
        None if tenants is None else sorted(tenants),
        timeout=2,
    )
    return ProvisionalDueDates(
        provisional=row["n"], soonest_due_date=row["soonest"], soonest_until_year=row["year"]
    )


def families(found: ProvisionalDueDates) -> list[Metric]:
    """Prometheus families of the provisional due dates (read at scrape)."""
    count = GaugeMetricFamily(
        "issuer_due_dates_provisional",
        "Approved records not yet paid whose due date waits for a year's official holidays",
    )
    count.add_metric([], found.provisional)
    soonest = GaugeMetricFamily(
        "issuer_due_date_provisional_soonest_seconds",
        "Seconds until the soonest provisional due date begins, in the bureau's time zone"
        " (+Inf when there is none)",
    )
    day = found.soonest_due_date
    soonest.add_metric([], math.inf if day is None else seconds_until(day))
    return [count, soonest]


def seconds_until(day: date) -> float:
    """Seconds from now until `day` begins in the bureau's time zone (negative once begun)."""
    begins = datetime.combine(day, time(), BUREAU_TZ)
    return (begins - datetime.now(BUREAU_TZ)).total_seconds()
