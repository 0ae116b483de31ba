"""Reimbursement end to end on real servers: claim → redeem → documents (one passing, one
with a wrong buyer name, one with an amount mismatch, one appliance without its label) →
audit → disbursement → refund after payment → clawback → repaid; the report and the
ledger agree at each step. Then upload limits and malformed bodies: 4xx, nothing stored."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import msgspec
import pytest

from issuer.auth import ApiKey
from issuer.client import Response, signed_headers
from issuer.documents import MAX_PART_BYTES
from issuer.workdays import Calendar
from tests.conftest import Keyspace, Service, running_service
from tests.money import (
    GB_CODE,
    assert_report_agrees,
    issue,
    new_campaign,
    payment,
    redeem,
    refund,
)
from tests.people import id_number

MERCHANT = "demo-merchant"  # the merchant of the development merchant key
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
JPEG = b"\xff\xd8\xff\xe0" + os.urandom(3000)
PDF = b"%PDF-1.4\n" + os.urandom(1000)
NAME = "张 三"


def body_of(parts: list[tuple[str, bytes]], meta: dict[str, Any] | None) -> tuple[bytes, str]:
    boundary = "issuer-test-" + os.urandom(8).hex()
    out = bytearray()
    for name, data in [*parts, *([("meta", msgspec.json.encode(meta))] if meta else [])]:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        out += f'; filename="{name}.bin"\r\n'.encode() if name != "meta" else b"\r\n"
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


async def upload(
    service: Service,
    redemption_id: str,
    raw: bytes,
    content_type: str,
    role: str = "merchant",
    key: ApiKey | None = None,
) -> Response:
    path = f"/v1/redemptions/{redemption_id}/documents"
    headers = signed_headers(key or service.key(role), "POST", path, raw)
    headers["Content-Type"] = content_type
    async with service.session.post(
        service.url + path, data=io.BytesIO(raw), headers=headers
    ) as resp:
        return Response(resp.status, await resp.json(content_type=None), dict(resp.headers))


def fresh(data: bytes) -> bytes:
    """The file with bytes of its own: papers shared between records fail their checks."""
    return data + os.urandom(16)


def papers(
    amount: int,
    *,
    name: str = NAME,
    paid: int | None = None,
    label: bool = True,
    invoice_no: str | None = None,
    files: dict[str, bytes] | None = None,
) -> tuple[bytes, str]:
    """A redemption's papers, each file of its own (`files`: these, as they are)."""
    parts = [("confirmation", PDF), ("invoice", PDF), ("payment_proof", JPEG), ("photo", PNG)]
    if label:
        parts.append(("energy_label", JPEG))
    given = files or {}
    parts = [(kind, given[kind] if kind in given else fresh(data)) for kind, data in parts]
    meta = {
        "invoice_no": invoice_no or f"No.{os.urandom(6).hex()}",
        "invoice_buyer_name": name,
        "invoice_amount_fen": amount,
        "paid_amount_fen": amount if paid is None else paid,
        "gb_codes": [GB_CODE],
    }
    return body_of(parts, meta)


def checks_of(resp: Response) -> dict[str, bool]:
    return {c["name"]: c["passed"] for c in resp.body["checks"]}


# chinese-calendar knows the years up to 2026; due dates of approvals from mid-November
# 2026 fall in 2027, so the service gets that year from a holidays file, as ops would.
HOLIDAYS = "[[year]]\nyear = 2027\nholidays = [2027-01-01]\n"


@pytest.fixture(scope="module")
def holidays(workdir: Path, keyspace: Keyspace) -> Path:
    path = workdir / f"holidays-{keyspace.name}.toml"
    path.write_text(HOLIDAYS)
    return path


@pytest.fixture(scope="module")
async def service(keyspace: Keyspace, workdir: Path, holidays: Path) -> AsyncIterator[Service]:
    data_dir = workdir / f"data-{keyspace.name}"
    env = {"ISSUER_HOLIDAYS_FILE": str(holidays)}
    async with running_service(keyspace, data_dir, 2, env) as running:
        yield running


@pytest.fixture(scope="module")
def documents_dir(keyspace: Keyspace, workdir: Path) -> Path:
    return workdir / f"data-{keyspace.name}" / "documents"


def stored_files(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


async def test_claim_to_clawback_with_audit(
    service: Service, pg: asyncpg.Pool, holidays: Path
) -> None:
    merchant = {"name": "乡宁家电城", "county_code": "141029", "categories": ["appliance"]}
    assert (await service.call("PUT", f"/v1/merchants/{MERCHANT}", merchant)).status in (200, 201)
    campaign_id = await new_campaign(service)
    redemptions = []
    for n in range(700, 704):
        person = {"id_number": id_number(n), "name": NAME, "phone": "13800000000"}
        reg = {"request_id": f"reg-{n:08d}", "user_id": f"u{n}", "person": person}
        path = f"/v1/campaigns/{campaign_id}/registrations"
        assert (await service.call("POST", path, reg, "app")).status == 201
        voucher = await issue(service, campaign_id, n)
        paid = await redeem(service, payment(voucher, MERCHANT, 1_000_000 + n))
        assert paid.status == 201, paid.body
        redemptions.append(paid.body)
    good, wrong_name, wrong_amount, no_label = (r["redemption_id"] for r in redemptions)
    amounts = [r["order_amount_fen"] for r in redemptions]
    await assert_report_agrees(service, campaign_id)

    # documents: the automatic checks name what is wrong
    sent = {
        good: papers(amounts[0]),
        wrong_name: papers(amounts[1], name="李四"),
        wrong_amount: papers(amounts[2], paid=amounts[2] - 1),
        no_label: papers(amounts[3], label=False),
    }
    answers = {rid: await upload(service, rid, *sent[rid]) for rid in sent}
    for resp in answers.values():
        assert resp.status == 201, resp.body
    failed = {rid: {k for k, ok in checks_of(a).items() if not ok} for rid, a in answers.items()}
    assert failed == {
        good: set(),
        wrong_name: {"buyer_name"},
        wrong_amount: {"amounts"},
        no_label: {"energy_labels"},
    }
    assert answers[good].body["subsidy_fen"] == redemptions[0]["discount_fen"]
    assert [f["part"] for f in answers[good].body["files"]][:2] == ["confirmation", "invoice"]
    # the buyer's name is kept only as a keyed hash
    meta = await pg.fetchval("SELECT meta::text FROM settlements WHERE redemption_id = $1", good)
    assert NAME not in meta and "李四" not in meta

    # the auditor's queue; a merchant key sees its own
    queue = await service.call("GET", "/v1/settlements?status=submitted", role="auditor")
    assert set(sent) <= {s["redemption_id"] for s in queue.body["settlements"]}
    mine = await service.call("GET", "/v1/settlements", role="merchant")
    assert {s["merchant_id"] for s in mine.body["settlements"]} == {MERCHANT}
    assert (await service.call("GET", "/v1/settlements", role="app")).status == 403

    async def decide(rid: str, request_id: str, **body: Any) -> Response:
        payload = {"request_id": request_id, "decision": "approve", "reason": "ok", **body}
        return await service.call("POST", f"/v1/settlements/{rid}/decision", payload, "auditor")

    approved = await decide(good, "decide-good-1")
    assert approved.status == 200 and approved.body["status"] == "approved"
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    due = Calendar.from_file(holidays).add_working_days(today, 30)
    assert approved.body["due_date"] == due.day.isoformat()
    assert approved.body["due_date_provisional"] is (due.provisional_until_year is not None)
    replay = await decide(good, "decide-good-1")
    assert replay.headers.get("Idempotent-Replay") == "true" and replay.body == approved.body
    again = await decide(good, "decide-good-2")
    assert again.status == 409 and again.body["error"]["code"] == "SETTLEMENT_CLOSED"
    refused = await decide(wrong_name, "decide-name-1")
    assert refused.status == 400 and "override_reason" in refused.body["error"]["message"]
    overridden = await decide(wrong_name, "decide-name-2", override_reason="户口本证明同一人")
    assert overridden.status == 200
    rejected = await decide(wrong_amount, "decide-amount-1", decision="reject", reason="金额不符")
    assert rejected.body["status"] == "rejected"
    fixed = await upload(service, no_label, *papers(amounts[3]))  # re-upload replaces the set
    assert fixed.status == 201 and fixed.body["checks_passed"]
    assert (await decide(no_label, "decide-label-1")).status == 200
    closed = await upload(service, good, *papers(amounts[0]))
    assert closed.status == 409 and closed.body["error"]["code"] == "SETTLEMENT_CLOSED"

    # disbursement: one batch for the merchant, due with the earliest approval
    batch = await service.call("POST", "/v1/disbursements", {"request_id": "disb-0001"}, "auditor")
    assert batch.status == 201, batch.body
    (mine_batch,) = [d for d in batch.body["disbursements"] if d["merchant_id"] == MERCHANT]
    paid_ids = {good, wrong_name, no_label}
    assert paid_ids <= set(mine_batch["redemption_ids"]) and wrong_amount not in paid_ids
    expected_total = sum(r["discount_fen"] for r in redemptions if r["redemption_id"] in paid_ids)
    own = [r for r in mine_batch["redemption_ids"] if r.startswith(campaign_id + ".")]
    assert set(own) == paid_ids
    if len(own) == len(mine_batch["redemption_ids"]):
        assert mine_batch["total_fen"] == expected_total
    path = f"/v1/disbursements/{mine_batch['disbursement_id']}/paid"
    done = await service.call("POST", path, {"request_id": "paid-0001"}, "auditor")
    assert done.status == 200 and done.body["status"] == "paid"
    twice = await service.call("POST", path, {"request_id": "paid-0002"}, "auditor")
    assert twice.status == 409
    before = await assert_report_agrees(service, campaign_id)

    # a refund after payment: a clawback until the merchant pays it back
    back = await refund(service, good, amounts[0], "refund-after-disbursement")
    assert back.status == 201 and back.body["clawback_due_fen"] == redemptions[0]["discount_fen"]
    owed = await assert_report_agrees(service, campaign_id)
    assert owed["clawback_due_fen"] == before["clawback_due_fen"] + redemptions[0]["discount_fen"]
    repaid_path = f"/v1/clawbacks/{back.body['refund_id']}/repaid"
    assert (
        await service.call("POST", repaid_path, {"request_id": "repaid-e2e-1"}, "auditor")
    ).status == 200
    settled = await assert_report_agrees(service, campaign_id)
    assert settled["clawback_due_fen"] == before["clawback_due_fen"]
    assert settled["available_fen"] == owed["available_fen"] + redemptions[0]["discount_fen"]
    # a refund of a record never paid out returns the subsidy at once
    early = await refund(service, wrong_amount, amounts[2], "refund-before-disbursement")
    assert early.body["clawback_due_fen"] == 0
    await assert_report_agrees(service, campaign_id)

    # every auditor action is in the append-only log, the override with its reason
    actions = {
        (r["action"], r["subject"]) for r in await pg.fetch("SELECT action, subject FROM audit_log")
    }
    assert ("override_approved", wrong_name) in actions
    assert ("rejected", wrong_amount) in actions
    assert ("disbursement_paid", mine_batch["disbursement_id"]) in actions
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pg.execute("UPDATE audit_log SET reason = 'rewritten'")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pg.execute("DELETE FROM audit_log")


async def test_bad_uploads_are_refused_and_store_nothing(
    service: Service, pg: asyncpg.Pool, documents_dir: Path
) -> None:
    merchant = {"name": "乡宁家电城", "county_code": "141029", "categories": ["appliance"]}
    await service.call("PUT", f"/v1/merchants/{MERCHANT}", merchant)
    campaign_id = await new_campaign(service)
    voucher = await issue(service, campaign_id, 800)
    rid = (await redeem(service, payment(voucher, MERCHANT, 500_000))).body["redemption_id"]
    files_before = stored_files(documents_dir)
    good_raw, good_type = papers(500_000)
    text = b"just some text, not an image"
    cases: list[tuple[str, bytes, str]] = [
        ("not multipart", b'{"meta": 1}', "application/json"),
        ("no boundary", good_raw, "multipart/form-data"),
        ("wrong boundary", good_raw, "multipart/form-data; boundary=nothing-like-it"),
        ("truncated", good_raw[: len(good_raw) // 2], good_type),
        ("text as invoice", *body_of([("invoice", text)], {"invoice_no": "1"})),
        ("unknown part", *body_of([("selfie", PNG)], None)),
        ("no meta", *body_of([("invoice", PDF)], None)),
        ("bad meta", *body_of([("invoice", PDF)], {"invoice_no": 5})),
        ("blank invoice number", *papers(500_000, invoice_no="\u3000 \t")),
        ("part too big", *body_of([("photo", PNG + bytes(MAX_PART_BYTES))], None)),
    ]
    for label, raw, content_type in cases:
        resp = await upload(service, rid, raw, content_type)
        assert resp.status == 400, (label, resp.body)
        assert resp.body["error"]["code"] == "INVALID_REQUEST", label
    huge = bytes(20 * 1024 * 1024 + 1)
    assert (await upload(service, rid, huge, good_type)).status == 400
    assert (await upload(service, rid, good_raw, good_type, role="auditor")).status == 403
    assert (await upload(service, f"{campaign_id}.ffff", good_raw, good_type)).status == 404
    assert stored_files(documents_dir) == files_before
    count = await pg.fetchval("SELECT count(*) FROM settlements WHERE redemption_id = $1", rid)
    assert count == 0
    # the claim route still holds its small limit
    big_claim = await service.call(
        "POST", f"/v1/campaigns/{campaign_id}/claims", {"pad": "x" * 70_000}, "app"
    )
    assert big_claim.status == 400
    async with aiohttp.ClientSession() as session, session.get(service.url + "/healthz") as r:
        assert r.status == 200
