"""Government reports and the daily reconciliation file, on real servers: after a mixed
workload (two merchants, items of two categories, partial and full refunds, a clawback)
every grouping adds up to the total, the total agrees with the ledger, and the CSV and
XLSX forms say what the JSON says."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import openpyxl
import pytest
from redis.asyncio import Redis

from issuer.client import RawResponse
from issuer.redemptions import mark_paid
from issuer.reports import COLUMNS, split
from issuer.scripts import Scripts
from tests.conftest import Keyspace, Service
from tests.money import (
    assert_report_agrees,
    fridge,
    gather,
    issue,
    new_campaign,
    new_merchant,
    payment,
    redeem,
    refund,
    report_rows,
)

ADDITIVE = (
    "order_amount_fen",
    "redeemed_amount_fen",
    "refunded_amount_fen",
    "subsidy_returned_fen",
    "net_subsidy_fen",
    "clawback_due_fen",
)
TZ = ZoneInfo("Asia/Shanghai")


def sofa(amount_fen: int) -> dict[str, Any]:
    return {"category": "sofa", "name": "布艺沙发", "amount_fen": amount_fen, "quantity": 1}


async def fetch(service: Service, path: str, role: str = "auditor") -> RawResponse:
    return await service.client(role).request("GET", path)


@pytest.mark.fast
def test_split_adds_up_and_follows_the_weights() -> None:
    assert split(100, [1, 1, 1]) == [34, 33, 33]
    assert split(7, [0, 5, 0]) == [0, 7, 0]
    assert split(0, [3, 4]) == [0, 0]
    assert split(5, [0, 0]) == [5, 0]
    assert split(199_999, [300_001, 1_699_999]) == [30_000, 169_999]
    for total in (0, 1, 99, 200_000, 123_457):
        for weights in ([1], [2, 3], [10, 0, 7, 1], [999_999, 1]):
            assert sum(split(total, weights)) == total


@pytest.fixture(scope="module")
async def workload(service: Service, redis: Redis) -> dict[str, Any]:
    """Ten vouchers; seven redeemed at two merchants; refunds partial, full, and after the
    merchant was reimbursed (a clawback)."""
    campaign_id = await new_campaign(service)
    both = await new_merchant(service, categories=["appliance", "furniture"])
    furniture = await new_merchant(service, name="乡宁家具城", categories=["furniture"])
    vouchers = await gather(*(issue(service, campaign_id, 40_000 + n) for n in range(10)))
    bodies = []
    for n, v in enumerate(vouchers[:4]):  # a fridge and a sofa in one order
        a, b = 300_000 + 10_000 * n, 150_001 + n
        items = [fridge(a), sofa(b)]
        bodies.append(payment(v, both, a + b, items=items, order_amount_fen=a + b))
    bodies.append(payment(vouchers[4], furniture, 3_000_000, items=[sofa(3_000_000)]))
    for v in vouchers[5:7]:
        bodies.append(payment(v, furniture, 88_888, items=[sofa(88_888)]))
    answers = await gather(*(redeem(service, b) for b in bodies))
    assert all(a.status == 201 for a in answers), answers
    redemptions = [a.body for a in answers]
    rid = [r["redemption_id"] for r in redemptions]
    await mark_paid(Scripts(redis), campaign_id, "batch-report-test", [rid[2]])
    refunds = [
        await refund(service, rid[0], bodies[0]["order_amount_fen"] // 3, "rpt-refund-0"),
        await refund(service, rid[1], bodies[1]["order_amount_fen"], "rpt-refund-1"),
        await refund(service, rid[4], 1_000_001, "rpt-refund-4a"),
        await refund(service, rid[4], 999_999, "rpt-refund-4b"),
        await refund(service, rid[2], bodies[2]["order_amount_fen"] // 2, "rpt-refund-2"),
    ]
    assert all(f.status == 201 for f in refunds), refunds
    assert refunds[-1].body["clawback_due_fen"] > 0
    return {
        "campaign_id": campaign_id,
        "merchants": (both, furniture),
        "bodies": bodies,
        "redemptions": redemptions,
        "refunds": [f.body for f in refunds],
    }


async def test_total_agrees_with_the_ledger_and_the_requests(
    service: Service, workload: dict[str, Any]
) -> None:
    campaign_id = workload["campaign_id"]
    led = await assert_report_agrees(service, campaign_id)
    (total,) = await report_rows(service, campaign_id)
    redemptions, refunds = workload["redemptions"], workload["refunds"]
    discounts = sum(r["discount_fen"] for r in redemptions)
    returned = sum(f["subsidy_returned_fen"] for f in refunds)
    assert total == {
        "key": "total",
        "issued": 10,
        "redeemed": 7,
        "redemption_rate": 0.7,
        "order_amount_fen": sum(b["order_amount_fen"] for b in workload["bodies"]),
        "redeemed_amount_fen": discounts,
        "refunded_amount_fen": sum(f["amount_fen"] for f in refunds),
        "subsidy_returned_fen": returned,
        "net_subsidy_fen": discounts - returned,
        "clawback_due_fen": refunds[-1]["clawback_due_fen"],
        "merchants": 2,
        "overdrawn_fen": 0,  # every voucher reserved its cap
    }
    assert led["spent_fen"] == discounts - returned


@pytest.mark.parametrize("by", ["round", "day", "merchant", "category"])
async def test_every_grouping_adds_up_to_the_total(
    service: Service, workload: dict[str, Any], by: str
) -> None:
    campaign_id = workload["campaign_id"]
    await service.drained()
    (total,) = await report_rows(service, campaign_id)
    rows = await report_rows(service, campaign_id, by)
    for column in ADDITIVE:
        assert sum(r[column] for r in rows) == total[column], (by, column, rows)
    keys = {r["key"] for r in rows}
    both, furniture = workload["merchants"]
    if by == "round":
        assert rows == [{**total, "key": "r1"}]
    elif by == "day":
        today = datetime.now(TZ).date()
        assert keys <= {today.isoformat(), (today - timedelta(days=1)).isoformat()}
        assert sum(r["issued"] for r in rows) == total["issued"]
    elif by == "merchant":
        assert {r["key"]: r["redeemed"] for r in rows} == {both: 4, furniture: 3}
        assert all(r["issued"] is None and r["redemption_rate"] is None for r in rows)
        assert all(r["overdrawn_fen"] is None for r in rows)
        assert all(r["merchants"] == 1 for r in rows)
    else:  # a redemption with a fridge and a sofa counts in both categories
        by_key = {r["key"]: r for r in rows}
        assert {k: r["redeemed"] for k, r in by_key.items()} == {"refrigerator": 4, "sofa": 7}
        fridges = sum(b["items"][0]["amount_fen"] for b in workload["bodies"][:4])
        assert by_key["refrigerator"]["order_amount_fen"] == fridges
        assert by_key["refrigerator"]["merchants"] == 1 and by_key["sofa"]["merchants"] == 2


async def test_round_rows_carry_what_the_pool_paid_above_reservations(
    service: Service,
) -> None:
    """Reservations of 50,000: discounts of 100,000 and 30,000; a fifth of the first order
    refunded returns 20,000, which repays its overdraw first (50,000 -> 30,000)."""
    campaign_id = await new_campaign(service, reserve_fen=50_000)
    merchant = await new_merchant(service)
    first, second = [await issue(service, campaign_id, 46_000 + n) for n in range(2)]
    paid = await redeem(service, payment(first, merchant, 1_000_000))
    assert (await redeem(service, payment(second, merchant, 300_000))).status == 201
    rid = paid.body["redemption_id"]
    assert (await refund(service, rid, 200_000, f"rpt-od-{rid[-8:]}")).status == 201
    await assert_report_agrees(service, campaign_id)  # with the round's overdrawn_fen
    (row,) = await report_rows(service, campaign_id, "round")
    assert (row["key"], row["overdrawn_fen"]) == ("r1", 30_000)
    assert all(r["overdrawn_fen"] is None for r in await report_rows(service, campaign_id, "day"))


async def test_csv_and_xlsx_say_what_the_json_says(
    service: Service, workload: dict[str, Any]
) -> None:
    campaign_id = workload["campaign_id"]
    await service.drained()
    rows = await report_rows(service, campaign_id, "category")
    base = f"/v1/campaigns/{campaign_id}/report?by=category"
    header = [f"{zh} {en}" for zh, en in COLUMNS]
    expected = [[r[en] for _, en in COLUMNS] for r in rows]

    got_csv = await fetch(service, base + "&format=csv")
    assert got_csv.status == 200 and got_csv.headers["Content-Type"].startswith("text/csv")
    assert got_csv.headers["X-Content-SHA256"] == hashlib.sha256(got_csv.body).hexdigest()
    assert "attachment" in got_csv.headers["Content-Disposition"]
    assert got_csv.body.startswith("\ufeff".encode())  # Excel reads it as UTF-8
    table = list(csv.reader(io.StringIO(got_csv.body.decode("utf-8-sig"))))
    assert table[0] == header
    assert table[1:] == [["" if c is None else str(c) for c in row] for row in expected]

    got_xlsx = await fetch(service, base + "&format=xlsx")
    assert got_xlsx.status == 200
    sheet = openpyxl.load_workbook(io.BytesIO(got_xlsx.body)).active
    assert sheet is not None
    values = [list(r) for r in sheet.iter_rows(values_only=True)]
    assert values[0] == header
    assert values[1:] == expected


async def test_the_daily_reconciliation_file(service: Service, workload: dict[str, Any]) -> None:
    campaign_id = workload["campaign_id"]
    await service.drained()
    today = datetime.now(TZ).date()
    path = f"/v1/campaigns/{campaign_id}/reconciliation?date="
    days = [today, today - timedelta(days=1)]  # the workload may have straddled midnight
    files = [await fetch(service, path + d.isoformat()) for d in days]
    for got in files:
        assert got.status == 200, got.body
        assert got.headers["X-Content-SHA256"] == hashlib.sha256(got.body).hexdigest()
    records = [row for got in files for row in csv.DictReader(io.StringIO(got.body.decode()))]
    redemptions, refunds = workload["redemptions"], workload["refunds"]
    assert sorted(r["record_id"] for r in records if r["record_type"] == "redemption") == sorted(
        r["redemption_id"] for r in redemptions
    )
    by_refund = {r["record_id"]: r for r in records if r["record_type"] == "refund"}
    assert by_refund.keys() == {f["refund_id"] for f in refunds}
    for f in refunds:
        line = by_refund[f["refund_id"]]
        assert int(line["subsidy_returned_fen"]) == f["subsidy_returned_fen"]
        assert int(line["clawback_due_fen"]) == f["clawback_due_fen"]
    assert sum(int(r["discount_fen"] or 0) for r in records) == sum(
        r["discount_fen"] for r in redemptions
    )
    # the same day twice: the same bytes, so both sides can compare digests
    again = await fetch(service, path + today.isoformat())
    assert again.body == files[0].body
    empty = await fetch(service, path + "2024-07-05")
    assert empty.body.decode().count("\r\n") == 1  # the header only


async def test_bad_report_queries_are_refused(service: Service, workload: dict[str, Any]) -> None:
    campaign_id = workload["campaign_id"]
    base = f"/v1/campaigns/{campaign_id}"
    for query in (
        "/report?by=week",
        "/report?format=pdf",
        "/report?by=total&extra=1",
        "/reconciliation",
        "/reconciliation?date=yesterday",
        "/reconciliation?date=2024-02-30",
    ):
        got = await service.call("GET", base + query, role="auditor")
        assert got.status == 400, (query, got.body)
        assert got.body["error"]["code"] == "INVALID_REQUEST"
    assert (await service.call("GET", base + "/report", role="app")).status == 403
    assert (await service.call("GET", base + "/report", role="merchant")).status == 403
    missing = await service.call("GET", "/v1/campaigns/no-such-campaign/report", role="ops")
    assert missing.status == 404


async def test_cli_writes_the_file_and_its_digest(
    service: Service, workload: dict[str, Any], keyspace: Keyspace, workdir: Path, tmp_path: Path
) -> None:
    campaign_id = workload["campaign_id"]
    await service.drained()
    day = datetime.now(TZ).date().isoformat()
    env = {**os.environ, "ISSUER_DATA_DIR": str(workdir / f"data-{keyspace.name}")}
    for args in (
        ["reconciliation", campaign_id, day],
        ["report", campaign_id, "--by", "merchant", "--format", "xlsx"],
    ):
        cmd = [sys.executable, "-m", "issuer.cli", *args, "--out", str(tmp_path)]
        done = await asyncio.to_thread(
            subprocess.run, [*cmd, "--url", service.url], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    data = (tmp_path / f"{campaign_id}-{day}.csv").read_bytes()
    served = await fetch(service, f"/v1/campaigns/{campaign_id}/reconciliation?date={day}")
    assert data == served.body
    digest = (tmp_path / f"{campaign_id}-{day}.csv.sha256").read_text()
    assert digest == f"{hashlib.sha256(data).hexdigest()}  {campaign_id}-{day}.csv\n"
    book = openpyxl.load_workbook(tmp_path / f"{campaign_id}-report-merchant.xlsx")
    assert book.active is not None and book.active.max_row == 3  # header + two merchants
