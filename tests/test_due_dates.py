"""Due dates that wait for a calendar (API.md v1.1), with a controlled clock: an approval
on 2026-12-02, whose 30 working days reach 2027 (no source knows it), is provisional and
counts weekends only; an approval on 2026-10-09 never is. The settlement list, /metrics
and the ops overview show it; once the 2027 holidays file is given and `issuer serve`
reloads it (SIGHUP), the date moves later and the recompute is in the audit log. A
malformed holidays file stops start-up, naming it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from issuer import store
from issuer.auth import ApiKey
from issuer.due_dates import BUREAU_TZ, batch_due
from issuer.model import DecisionIn, DisbursementIn
from issuer.settlement import Settlement
from issuer.workdays import Calendar, Due
from tests.conftest import ROOT, Keyspace, Service, running_service

AUDITOR = ApiKey(id="auditor-test", secret="s", role="auditor", merchant_id=None)
# The test's 2027: New Year's Day (a Friday) off; the Spring Festival Feb 6-12 off with
# make-up Sundays on Jan 31 and Feb 20, as the State Council's notices usually go.
HOLIDAYS_2027 = """
[[year]]
year = 2027
holidays = [2027-01-01, 2027-02-08, 2027-02-09, 2027-02-10, 2027-02-11, 2027-02-12]
workdays = [2027-01-31, 2027-02-20]
"""


def at(day: date) -> float:
    return datetime(day.year, day.month, day.day, 10, tzinfo=BUREAU_TZ).timestamp()


async def submitted(pg: asyncpg.Pool, redemption_id: str, merchant_id: str) -> None:
    """A record whose documents passed their checks (how they got there is not the
    concern here: test_settlement uploads them)."""
    await pg.execute(
        "INSERT INTO settlements (redemption_id, campaign_id, merchant_id, status, meta,"
        " checks, checks_passed, submitted_at) VALUES ($1, 'dd', $2, 'submitted', '{}',"
        " '[]', true, now())",
        redemption_id,
        merchant_id,
    )


async def in_process(pg: asyncpg.Pool, redis: Redis, clock: Callable[[], float]) -> Settlement:
    """Settlement on the package's calendar alone, dating approvals by `clock`."""
    await store.migrate(pg)
    nothing = cast(Any, None)  # parts of settlement that approvals and batches never use
    return Settlement(pg, redis, nothing, nothing, nothing, b"k", Calendar(), clock=clock)


async def approve(settlement: Settlement, redemption_id: str) -> dict[str, Any]:
    body = DecisionIn(request_id=f"approve-{redemption_id}", decision="approve", reason="ok")
    status, out, _ = await settlement.decide(redemption_id, body, AUDITOR)
    assert status == 200
    answer: dict[str, Any] = json.loads(out)
    return answer


async def scraped(service: Service) -> dict[str, float]:
    async with service.session.get(service.url + "/metrics") as resp:
        text = await resp.text()
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("issuer_due_date")
    }


async def test_a_due_date_waits_for_its_year_then_is_recomputed(
    keyspace: Keyspace, workdir: Path, pg: asyncpg.Pool, redis: Redis
) -> None:
    clock = at(date(2026, 12, 2))
    settlement = await in_process(pg, redis, lambda: clock)
    await submitted(pg, "dd.december", "m-december")
    await submitted(pg, "dd.october", "m-october")

    december = await approve(settlement, "dd.december")
    # Dec 3 - 31: 21 weekdays (2026 is known: no holiday left); 2027 counted weekends
    # only: Jan 1 (22), Jan 4-8 (27), Jan 11-13 (30)
    assert december["due_date"] == "2027-01-13"
    assert december["due_date_provisional"] is True
    assert december["provisional_until_year"] == 2027
    clock = at(date(2026, 10, 9))
    october = await approve(settlement, "dd.october")
    # Oct 10 (a make-up Saturday) and 29 weekdays on: a year the package knows
    assert october["due_date"] == "2026-11-19"
    assert october["due_date_provisional"] is False
    assert "provisional_until_year" not in october

    status, out, _ = await settlement.disburse(DisbursementIn(request_id="dd-batch-1"), AUDITOR)
    assert status == 201
    batches = {b["merchant_id"]: b for b in json.loads(out)["disbursements"]}
    assert batches["m-december"]["due_date"] == "2027-01-13"
    assert batches["m-december"]["due_date_provisional"] is True
    assert batches["m-december"]["provisional_until_year"] == 2027
    assert batches["m-october"]["due_date_provisional"] is False

    holidays = workdir / f"holidays-{keyspace.name}.toml"
    holidays.write_text("# the State Council's notice for 2027 is not out yet\n")
    env = {"ISSUER_HOLIDAYS_FILE": str(holidays)}
    async with running_service(keyspace, workdir / f"data-{keyspace.name}", 2, env) as service:
        listed = await service.call("GET", "/v1/settlements?status=approved", role="auditor")
        assert [s["redemption_id"] for s in listed.body["settlements"]] == [
            "dd.october",
            "dd.december",
        ]
        shown = listed.body["settlements"][1]
        assert shown["due_date_provisional"] is True and shown["provisional_until_year"] == 2027
        overview = await service.call("GET", "/v1/ops/overview")
        assert overview.body["due_dates"] == {
            "provisional": 1,
            "soonest_due_date": "2027-01-13",
            "soonest_until_year": 2027,
        }
        before = datetime.now(BUREAU_TZ)
        gauges = await scraped(service)
        after = datetime.now(BUREAU_TZ)
        assert gauges["issuer_due_dates_provisional"] == 1
        due = datetime(2027, 1, 13, tzinfo=BUREAU_TZ)  # the day begins at midnight in Beijing
        soonest = gauges["issuer_due_date_provisional_soonest_seconds"]
        assert (due - after).total_seconds() <= soonest <= (due - before).total_seconds()

        holidays.write_text(HOLIDAYS_2027)
        service.proc.send_signal(signal.SIGHUP)  # the workers reload it and recompute
        async with asyncio.timeout(20):
            while True:
                if (await scraped(service))["issuer_due_dates_provisional"] == 0:
                    break
                await asyncio.sleep(0.1)
        gauges = await scraped(service)
        assert gauges["issuer_due_date_provisional_soonest_seconds"] == float("inf")
        listed = await service.call("GET", "/v1/settlements?merchant_id=m-december", role="auditor")
        (moved,) = listed.body["settlements"]
        # New Year's Day off: one working day later
        assert moved["due_date"] == "2027-01-14" and moved["due_date_provisional"] is False
        assert "provisional_until_year" not in moved

    batch_id = batches["m-december"]["disbursement_id"]
    batch = await pg.fetchrow("SELECT * FROM disbursements WHERE disbursement_id = $1", batch_id)
    assert batch["due_date"] == date(2027, 1, 14) and batch["provisional_until_year"] is None
    logged = await pg.fetch(
        "SELECT actor, subject, reason, details FROM audit_log"
        " WHERE action = 'due_date_recomputed' ORDER BY id"
    )
    assert [(r["actor"], r["subject"]) for r in logged] == [
        ("calendar", "dd.december"),
        ("calendar", batch_id),
    ]
    for row in logged:
        assert row["reason"] == "official holidays of 2027 known"
        assert json.loads(row["details"]) == {
            "was": "2027-01-13",
            "due_date": "2027-01-14",
            "provisional_until_year": None,
        }
    # each worker recomputed on the reload: the second found nothing left
    assert (
        await pg.fetchval("SELECT count(*) FROM settlements WHERE provisional_until_year > 0") == 0
    )


async def test_issuer_serve_recomputes_at_start_up(
    keyspace: Keyspace, workdir: Path, pg: asyncpg.Pool, redis: Redis
) -> None:
    """A newer package or a holidays file given while the service was down: the dates
    are recomputed before the workers start."""
    settlement = await in_process(pg, redis, lambda: at(date(2026, 12, 2)))
    await submitted(pg, "dd.restart", "m-restart")
    assert (await approve(settlement, "dd.restart"))["due_date_provisional"] is True
    holidays = workdir / f"holidays-start-{keyspace.name}.toml"
    holidays.write_text(HOLIDAYS_2027)
    env = {"ISSUER_HOLIDAYS_FILE": str(holidays)}
    async with running_service(keyspace, workdir / f"data-{keyspace.name}", 1, env) as service:
        listed = await service.call("GET", "/v1/settlements?merchant_id=m-restart", role="auditor")
        (record,) = listed.body["settlements"]
        assert record["due_date"] == "2027-01-14" and record["due_date_provisional"] is False
    logged = await pg.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'due_date_recomputed'"
        " AND subject = 'dd.restart'"
    )
    assert logged == 1


@pytest.mark.fast
def test_a_batch_is_provisional_while_a_provisional_record_may_come_first() -> None:
    final, provisional = (date(2026, 11, 19), None), (date(2027, 1, 13), 2027)
    assert batch_due([final, provisional]) == Due(date(2026, 11, 19))
    # a provisional record due a day later may still turn out due days earlier
    assert batch_due([(date(2027, 1, 12), None), provisional]) == Due(date(2027, 1, 12), 2027)
    assert batch_due([provisional]) == Due(date(2027, 1, 13), 2027)


def test_a_malformed_holidays_file_stops_start_up_naming_it(
    keyspace: Keyspace, workdir: Path
) -> None:
    bad = workdir / f"bad-holidays-{keyspace.name}.toml"
    bad.write_text("[[year]]\nyear = 2027\nholidays = ['New Year']\n")
    env = {
        **os.environ,
        "REDIS_URL": keyspace.redis_url,
        "DATABASE_URL": keyspace.database_url,
        "ISSUER_DATA_DIR": str(workdir / f"data-bad-{keyspace.name}"),
        "ISSUER_PERSON_KEY": "test-person-key",
        "ISSUER_HOLIDAYS_FILE": str(bad),
    }
    done = subprocess.run(
        [sys.executable, "-m", "issuer.cli", "serve", "--port", "0", "--workers", "1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"holidays file {bad}" in done.stderr
    assert "issuer ready" not in done.stdout
