"""The reviewer's reads, evidence integrity and the merchant risk report (API.md v1.2) on
real servers: each read with its roles (a merchant reading another's record or file is
refused, a file of another record is not found, the bytes are those uploaded); the same
invoice under other spacing, full-width digits and case, the same file and a near copy of
a photo flag both records, naming each other, until one is paid; the override; an
approval withdrawn when a later upload flags its record, out of its batch, also while the
batch is being paid; the risk report's signals checked by hand; the checks given at
migration to earlier records."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import numpy as np
import pytest

from bench.photos import COPIES, jpeg, render_appliance
from issuer import integrity, store
from issuer.client import Client, Response
from issuer.documents import LocalStore
from tests.conftest import Keyspace, Servers, Service, database_at, running_service, unique_id
from tests.money import new_merchant, payment, redeem, refund
from tests.people import campaign, claim, id_number, iso
from tests.test_settlement import NAME, papers, upload

MERCHANT = "demo-merchant"  # of the first merchant key
OTHER = "other-merchant"  # of the second
KEYS = {
    "app": ("app", None),
    "payment": ("payment", None),
    "ops": ("ops", None),
    "auditor": ("auditor", None),
    "merchant": ("merchant", MERCHANT),
    "merchant-2": ("merchant", OTHER),
}
INTEGRITY = set(integrity.NAMES)
_people = iter(range(3000, 100_000))


def keys_toml() -> str:
    lines = []
    for key_id, (role, merchant) in KEYS.items():
        lines += ["[[key]]", f'id = "{key_id}"', f'secret = "{secrets.token_hex(24)}"']
        lines.append(f'role = "{role}"')
        if merchant:
            lines.append(f'merchant_id = "{merchant}"')
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def data_dir(keyspace: Keyspace, workdir: Path) -> Path:
    path = workdir / f"data-{keyspace.name}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "keys.toml").write_text(keys_toml())
    return path


@pytest.fixture(scope="module")
async def service(keyspace: Keyspace, data_dir: Path) -> AsyncIterator[Service]:
    async with running_service(keyspace, data_dir, 2) as running:
        for merchant_id in (MERCHANT, OTHER):
            body = {"name": "乡宁家电城", "county_code": "141029", "categories": ["appliance"]}
            resp = await running.call("PUT", f"/v1/merchants/{merchant_id}", body)
            assert resp.status in (200, 201), resp.body
        yield running


def as_key(service: Service, key_id: str) -> Client:
    return Client(service.url, service.keys[key_id], service.session)


async def new_campaign_with(service: Service, body: dict[str, Any]) -> str:
    campaign_id = unique_id()
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)
    assert resp.status == 201, resp.body
    return campaign_id


async def sale(
    service: Service, campaign_id: str, merchant_id: str, amount: int, **claimed: Any
) -> dict[str, Any]:
    """A registered buyer claims a voucher and pays `amount` at the merchant."""
    n = next(_people)
    person = {"id_number": id_number(n), "name": NAME, "phone": "13800000000"}
    reg = {"request_id": f"reg-{n:08d}", "user_id": f"u{n}", "person": person}
    resp = await service.call("POST", f"/v1/campaigns/{campaign_id}/registrations", reg, "app")
    assert resp.status == 201, resp.body
    got = await service.call(
        "POST", f"/v1/campaigns/{campaign_id}/claims", claim(n, **claimed), "app"
    )
    assert got.status == 201, got.body
    paid = await redeem(service, payment(got.body, merchant_id, amount))
    assert paid.status == 201, paid.body
    return paid.body  # type: ignore[no-any-return]


async def submit(
    service: Service, rid: str, amount: int, key_id: str = "merchant", **kwargs: Any
) -> Response:
    resp = await upload(service, rid, *papers(amount, **kwargs), key=service.keys[key_id])
    assert resp.status == 201, resp.body
    return resp


async def record(service: Service, rid: str, role: str = "auditor") -> Response:
    return await service.call("GET", f"/v1/settlements/{rid}", role=role)


def failed(body: dict[str, Any]) -> dict[str, set[str]]:
    """The integrity checks a record fails, with the redemptions each names."""
    return {
        c["name"]: set(c.get("redemption_ids", []))
        for c in body["checks"]
        if c["name"] in INTEGRITY and not c["passed"]
    }


async def decide(service: Service, rid: str, **body: Any) -> Response:
    payload = {"request_id": unique_id("decide"), "decision": "approve", "reason": "ok", **body}
    return await service.call("POST", f"/v1/settlements/{rid}/decision", payload, "auditor")


async def disburse(service: Service, merchant_id: str) -> dict[str, Any]:
    """Batch the merchant's approved records; returns the batch."""
    made = await service.call(
        "POST",
        "/v1/disbursements",
        {"request_id": unique_id("disb"), "merchant_id": merchant_id},
        "auditor",
    )
    assert made.status == 201, made.body
    (batch,) = made.body["disbursements"]
    return batch  # type: ignore[no-any-return]


async def pay(service: Service, batch_id: str) -> Response:
    path = f"/v1/disbursements/{batch_id}/paid"
    return await service.call("POST", path, {"request_id": unique_id("paid")}, "auditor")


async def pay_out(service: Service, merchant_id: str) -> dict[str, Any]:
    """Batch the merchant's approved records and mark the batch paid; returns the batch."""
    batch = await disburse(service, merchant_id)
    done = await pay(service, batch["disbursement_id"])
    assert done.status == 200, done.body
    return batch


def photo_bytes(seed: int) -> bytes:
    return jpeg(render_appliance(seed, "refrigerator"), 90)


# ------------------------------------------------------------------ the reads


async def test_reads_with_their_roles(service: Service, pg: asyncpg.Pool) -> None:
    campaign_id = await new_campaign_with(service, campaign())
    mine = await sale(service, campaign_id, MERCHANT, 600_000)
    theirs = await sale(service, campaign_id, OTHER, 700_000)
    photo = photo_bytes(1)
    sent = await submit(service, mine["redemption_id"], 600_000, files={"photo": photo})
    await submit(service, theirs["redemption_id"], 700_000, "merchant-2")
    rid, other_rid = mine["redemption_id"], theirs["redemption_id"]
    await service.drained()

    # one record: auditor, ops and its own merchant; not another merchant, nor app/payment
    one = await record(service, rid)
    assert one.status == 200, one.body
    assert {k: one.body[k] for k in ("redemption_id", "merchant_id", "status")} == {
        "redemption_id": rid,
        "merchant_id": MERCHANT,
        "status": "submitted",
    }
    listed = await service.call("GET", f"/v1/settlements?campaign_id={campaign_id}", role="auditor")
    as_listed = next(s for s in listed.body["settlements"] if s["redemption_id"] == rid)
    assert {k: v for k, v in one.body.items() if k != "redemption"} == as_listed
    order = one.body["redemption"]
    order_id = await pg.fetchval("SELECT order_id FROM redemptions WHERE redemption_id = $1", rid)
    assert order["order_id"] == order_id
    assert order["order_amount_fen"] == 600_000 and order["discount_fen"] == mine["discount_fen"]
    assert order["voucher_id"] == mine["voucher_id"] and order["cap_fen"] == 200_000
    assert [i["category"] for i in order["items"]] == ["refrigerator"]
    assert (await record(service, rid, "ops")).status == 200
    assert (await record(service, rid, "merchant")).status == 200
    refused = await as_key(service, "merchant-2").call("GET", f"/v1/settlements/{rid}")
    assert refused.status == 403 and refused.body["error"]["code"] == "FORBIDDEN"
    for role in ("app", "payment"):
        assert (await record(service, rid, role)).status == 403
    assert (await record(service, f"{campaign_id}.ffff")).status == 404

    # a file: its bytes as uploaded, typed by its bytes, inline
    files = {f["part"]: f for f in one.body["files"]}
    assert files["photo"]["sha256"] == sent.body["files"][3]["sha256"]
    path = f"/v1/settlements/{rid}/files/{files['photo']['sha256']}"
    got = await service.client("auditor").request("GET", path)
    assert got.status == 200 and got.body == photo
    assert got.headers["Content-Type"] == "image/jpeg"
    assert got.headers["Content-Disposition"].startswith("inline")
    assert (await service.client("ops").request("GET", path)).status == 200
    assert (await service.client("merchant").request("GET", path)).status == 200
    assert (await as_key(service, "merchant-2").request("GET", path)).status == 403
    pdf = await service.client("auditor").request(
        "GET", f"/v1/settlements/{rid}/files/{files['invoice']['sha256']}"
    )
    assert pdf.status == 200 and pdf.body.startswith(b"%PDF-")
    assert pdf.headers["Content-Type"] == "application/pdf"
    theirs_file = (await record(service, other_rid)).body["files"][0]["sha256"]
    not_here = await service.call(
        "GET", f"/v1/settlements/{rid}/files/{theirs_file}", role="auditor"
    )
    assert not_here.status == 404 and not_here.body["error"]["code"] == "NOT_FOUND"
    bad = await service.call("GET", f"/v1/settlements/{rid}/files/not-a-sha", role="auditor")
    assert bad.status == 400

    # disbursement batches: pending, then paid; a merchant sees its own only
    assert (await decide(service, rid)).status == 200
    assert (await decide(service, other_rid)).status == 200
    made = await service.call(
        "POST", "/v1/disbursements", {"request_id": unique_id("disb")}, "auditor"
    )
    batches = {d["merchant_id"]: d for d in made.body["disbursements"]}
    ours, other_batch = batches[MERCHANT]["disbursement_id"], batches[OTHER]["disbursement_id"]
    assert batches[MERCHANT]["status"] == "pending"
    listing = await service.call("GET", f"/v1/disbursements?merchant_id={MERCHANT}", role="auditor")
    (shown,) = [d for d in listing.body["disbursements"] if d["disbursement_id"] == ours]
    assert shown["status"] == "pending" and rid in shown["redemption_ids"]
    assert [r["redemption_id"] for r in shown["records"]] == shown["redemption_ids"]
    assert shown["records"][shown["redemption_ids"].index(rid)]["status"] == "approved"
    assert (await service.call("GET", f"/v1/disbursements/{ours}", role="ops")).body == shown
    own = await service.call("GET", "/v1/disbursements", role="merchant")
    assert {d["merchant_id"] for d in own.body["disbursements"]} == {MERCHANT}
    theirs_batch = await service.call("GET", f"/v1/disbursements/{other_batch}", role="merchant")
    assert theirs_batch.status == 403
    missing = await service.call("GET", "/v1/disbursements/d-0000", role="auditor")
    assert missing.status == 404
    path = f"/v1/disbursements/{ours}/paid"
    assert (
        await service.call("POST", path, {"request_id": unique_id("paid")}, "auditor")
    ).status == 200
    paid = await service.call("GET", "/v1/disbursements?status=paid", role="auditor")
    assert ours in {d["disbursement_id"] for d in paid.body["disbursements"]}
    pending = await service.call("GET", "/v1/disbursements?status=pending", role="auditor")
    assert ours not in {d["disbursement_id"] for d in pending.body["disbursements"]}
    assert (await service.call("GET", "/v1/disbursements", role="app")).status == 403

    # the audit log of the record: its own entries and its batch's, oldest first, paged
    log = await service.call("GET", f"/v1/audit-log?redemption_id={rid}", role="auditor")
    assert log.status == 200, log.body
    actions = [
        (e["action"], e.get("redemption_id"), e.get("disbursement_id")) for e in log.body["entries"]
    ]
    assert actions == [
        ("documents_submitted", rid, None),
        ("approved", rid, None),
        ("disbursement_created", None, ours),
        ("disbursement_paid", None, ours),
    ]
    approved = log.body["entries"][1]
    assert approved["actor"] == "auditor" and approved["detail"]["reason"] == "ok"
    ids = [int(e["entry_id"]) for e in log.body["entries"]]
    assert ids == sorted(ids)
    first = await service.call("GET", f"/v1/audit-log?redemption_id={rid}&limit=1", role="auditor")
    assert [e["entry_id"] for e in first.body["entries"]] == [str(ids[0])]
    after = first.body["next_after"]
    rest = await service.call(
        "GET", f"/v1/audit-log?redemption_id={rid}&after={after}&limit=10", role="auditor"
    )
    assert [int(e["entry_id"]) for e in rest.body["entries"]] == ids[1:]
    assert "next_after" not in rest.body
    by_campaign = await service.call(
        "GET", f"/v1/audit-log?campaign_id={campaign_id}", role="auditor"
    )
    subjects = {
        e.get("redemption_id") or e.get("disbursement_id") for e in by_campaign.body["entries"]
    }
    assert {rid, other_rid, ours, other_batch} <= subjects
    by_actor = await service.call(
        "GET", "/v1/audit-log?actor=merchant-2&limit=1000", role="auditor"
    )
    assert {e["actor"] for e in by_actor.body["entries"]} == {"merchant-2"}
    for role in ("ops", "merchant"):
        assert (await service.call("GET", "/v1/audit-log", role=role)).status == 403
    assert (await service.call("GET", "/v1/audit-log?limit=0", role="auditor")).status == 400


# ------------------------------------------------------------------ evidence integrity


async def test_same_invoice_file_or_photo_flags_both_until_paid(
    service: Service, pg: asyncpg.Pool
) -> None:
    campaign_id = await new_campaign_with(service, campaign())
    sales = [await sale(service, campaign_id, MERCHANT, 500_000 + n) for n in range(9)]
    ids = [s["redemption_id"] for s in sales]

    # one invoice number, written three ways
    first = await submit(service, ids[0], 500_000, invoice_no=" No. 2024-0001 ")
    assert failed(first.body) == {}
    second = await submit(service, ids[1], 500_001, invoice_no="ｎｏ．２０２４－０００１")
    third = await submit(service, ids[2], 500_002, invoice_no="NO.2024-0001")
    assert failed(second.body) == {"unique_invoice": {ids[0]}}
    assert failed(third.body) == {"unique_invoice": {ids[0], ids[1]}}
    assert ids[0] in next(
        c["detail"] for c in third.body["checks"] if c["name"] == "unique_invoice"
    )
    assert not third.body["checks_passed"]
    # the earlier records are flagged too, naming the later ones (their audit says why)
    assert failed((await record(service, ids[0])).body) == {"unique_invoice": {ids[1], ids[2]}}
    assert failed((await record(service, ids[1])).body) == {"unique_invoice": {ids[0], ids[2]}}
    rerun = await pg.fetch(
        "SELECT subject, details FROM audit_log WHERE action = 'checks_rerun' AND subject = $1",
        ids[0],
    )
    assert [msgspec.json.decode(r["details"])["cause"] for r in rerun] == [ids[1], ids[2]]

    # the very same file on two records (an energy label), whatever the invoice
    label = jpeg(render_appliance(77, "air_conditioner"), 85)
    await submit(service, ids[3], 500_003, files={"energy_label": label})
    same = await submit(service, ids[4], 500_004, files={"energy_label": label})
    assert failed(same.body) == {"unique_documents": {ids[3]}}
    assert failed((await record(service, ids[3])).body) == {"unique_documents": {ids[4]}}

    # a photo, then a copy of it cropped 5 % (and re-encoded): both flagged; a photo of
    # another fridge is not
    original = photo_bytes(5)
    copy = COPIES["cropped5"](original, np.random.default_rng(5))
    near_hashes = integrity.photo_hashes(copy), integrity.photo_hashes(original)
    assert integrity.distance(*near_hashes) <= integrity.PHOTO_DISTANCE
    await submit(service, ids[5], 500_005, files={"photo": original})
    near = await submit(service, ids[6], 500_006, files={"photo": copy})
    assert failed(near.body) == {"distinct_photos": {ids[5]}}
    assert failed((await record(service, ids[5])).body) == {"distinct_photos": {ids[6]}}
    other = await submit(service, ids[7], 500_007, files={"photo": photo_bytes(6)})
    assert failed(other.body) == {}

    # a flagged record is approved only with an override reason, which the log keeps
    refused = await decide(service, ids[6])
    assert refused.status == 400 and "override_reason" in refused.body["error"]["message"]
    assert (await record(service, ids[6])).body["status"] == "submitted"
    overridden = await decide(service, ids[6], override_reason="同一台冰箱两次购买 two fridges")
    assert overridden.status == 200 and overridden.body["override_reason"]
    entry = await pg.fetchrow(
        "SELECT actor, details FROM audit_log WHERE action = 'override_approved' AND subject = $1",
        ids[6],
    )
    assert entry["actor"] == "auditor"
    assert (
        msgspec.json.decode(entry["details"])["override_reason"] == "同一台冰箱两次购买 two fridges"
    )

    # papers replaced: the twin passes again
    fixed = await submit(service, ids[1], 500_001, invoice_no="No.2024-0002")
    assert failed(fixed.body) == {}
    assert failed((await record(service, ids[0])).body) == {"unique_invoice": {ids[2]}}

    # a paid record is not flagged again; the later duplicate still names it
    await submit(service, ids[8], 500_008, invoice_no="INV-PAID-1")
    assert (await decide(service, ids[8])).status == 200
    await pay_out(service, MERCHANT)
    before = await record(service, ids[8])
    assert before.body["status"] == "paid" and before.body["checks_passed"]
    late = await sale(service, campaign_id, OTHER, 500_009)
    dup = await submit(
        service, late["redemption_id"], 500_009, "merchant-2", invoice_no="inv-paid-1"
    )
    assert failed(dup.body) == {"unique_invoice": {ids[8]}}
    after = await record(service, ids[8])
    assert after.body["checks"] == before.body["checks"] and after.body["checks_passed"]
    assert not await pg.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'checks_rerun' AND subject = $1", ids[8]
    )
    # the queue filters on failed checks, by campaign
    queue = await service.call(
        "GET", f"/v1/settlements?campaign_id={campaign_id}&checks_passed=false", role="auditor"
    )
    flagged = {s["redemption_id"] for s in queue.body["settlements"]}
    assert flagged == {ids[0], ids[2], ids[3], ids[4], ids[5], ids[6], late["redemption_id"]}


async def test_a_record_flagged_after_its_approval_leaves_its_pending_batch(
    service: Service, pg: asyncpg.Pool
) -> None:
    """API.md: approving a record that failed a check needs an override reason, and a later
    upload elsewhere makes a check fail while the record is not yet paid: an approval given
    while the checks passed is withdrawn, the record leaves its pending batch."""
    campaign_id = await new_campaign_with(service, campaign())
    kept, flagged = [await sale(service, campaign_id, MERCHANT, 600_000 + n) for n in range(2)]
    kept_id, flagged_id = kept["redemption_id"], flagged["redemption_id"]
    invoice = f"INV-{campaign_id}"
    await submit(service, kept_id, 600_000)
    await submit(service, flagged_id, 600_001, invoice_no=invoice)
    for rid in (kept_id, flagged_id):
        assert (await decide(service, rid)).status == 200
    batch = await disburse(service, MERCHANT)
    batch_id = batch["disbursement_id"]
    assert {kept_id, flagged_id} <= set(batch["redemption_ids"])

    # another merchant's later upload carries the same invoice number
    late = await sale(service, campaign_id, OTHER, 600_002)
    dup = await submit(service, late["redemption_id"], 600_002, "merchant-2", invoice_no=invoice)
    assert failed(dup.body) == {"unique_invoice": {flagged_id}}
    withdrawn = (await record(service, flagged_id)).body
    assert failed(withdrawn) == {"unique_invoice": {late["redemption_id"]}}
    assert withdrawn["status"] == "submitted"
    assert withdrawn.get("disbursement_id") is None and withdrawn.get("due_date") is None
    left = (await service.call("GET", f"/v1/disbursements/{batch_id}", role="auditor")).body
    assert left["redemption_ids"] == sorted(set(batch["redemption_ids"]) - {flagged_id})
    assert left["total_fen"] == batch["total_fen"] - flagged["discount_fen"]
    entries = {
        (r["action"], r["subject"]): msgspec.json.decode(r["details"])
        for r in await pg.fetch(
            "SELECT action, subject, details FROM audit_log"
            " WHERE action IN ('approval_withdrawn', 'disbursement_changed')"
            " AND subject = ANY($1::text[])",
            [flagged_id, batch_id],
        )
    }
    assert entries["approval_withdrawn", flagged_id] == {
        "cause": late["redemption_id"],
        "failed": ["unique_invoice"],
        "disbursement_id": batch_id,
    }
    changed = entries["disbursement_changed", batch_id]
    assert changed["removed"] == [flagged_id] and changed["cause"] == late["redemption_id"]
    assert changed["redemptions"] == left["redemption_ids"]
    assert changed["total_fen"] == left["total_fen"]

    # deciding again needs an override reason; the batch pays what is left in it
    assert (await decide(service, flagged_id)).status == 400
    done = await pay(service, batch_id)
    assert done.status == 200, done.body
    assert (await record(service, kept_id)).body["status"] == "paid"
    assert (await record(service, flagged_id)).body["status"] == "submitted"
    overridden = await decide(service, flagged_id, override_reason="发票号重复录入 typed twice")
    assert overridden.status == 200 and overridden.body["status"] == "approved"


async def test_withdrawals_racing_the_batch_payment_pay_only_what_the_batch_holds(
    service: Service, pg: asyncpg.Pool
) -> None:
    """Duplicates of a pending batch's papers uploaded while the batch is paid: each record
    ends either paid in the batch or withdrawn out of it, the batch's total is what its
    records are reimbursed, and nothing deadlocks or answers 5xx."""
    campaign_id = await new_campaign_with(service, campaign())
    sales = [await sale(service, campaign_id, MERCHANT, 610_000 + n) for n in range(6)]
    invoices = [f"INV-RACE-{campaign_id}-{n}" for n in range(len(sales))]
    for n, paid in enumerate(sales):
        await submit(service, paid["redemption_id"], 610_000 + n, invoice_no=invoices[n])
        assert (await decide(service, paid["redemption_id"])).status == 200
    batch_id = (await disburse(service, MERCHANT))["disbursement_id"]
    late = [await sale(service, campaign_id, OTHER, 620_000 + n) for n in range(len(sales))]

    async def duplicate(n: int) -> Response:
        body, content_type = papers(620_000 + n, invoice_no=invoices[n])
        return await upload(
            service, late[n]["redemption_id"], body, content_type, key=service.keys["merchant-2"]
        )

    answers = await asyncio.gather(
        *(duplicate(n) for n in range(len(sales))), pay(service, batch_id)
    )
    assert [a.status for a in answers] == [201] * len(sales) + [200], [a.body for a in answers]
    held = (await service.call("GET", f"/v1/disbursements/{batch_id}", role="auditor")).body
    assert held["status"] == "paid"
    for rid in (p["redemption_id"] for p in sales):
        status = (await record(service, rid)).body["status"]
        assert status == ("paid" if rid in held["redemption_ids"] else "submitted"), rid
    assert sorted(r["redemption_id"] for r in held["records"]) == held["redemption_ids"]
    assert held["total_fen"] == sum(r["subsidy_fen"] for r in held["records"])
    assert await pg.fetchval(
        "SELECT count(*) FROM settlements WHERE status = 'paid' AND disbursement_id = $1",
        batch_id,
    ) == len(held["redemption_ids"])


async def test_earlier_records_get_the_checks_at_migration(
    service: Service, pg: asyncpg.Pool, data_dir: Path
) -> None:
    """Records stored before the checks existed (no key, six checks, marked pending by
    migration 9): the backfill `issuer serve` runs after migrating gives them the three,
    duplicates flagged."""
    campaign_id = await new_campaign_with(service, campaign())
    ids = [
        (await sale(service, campaign_id, MERCHANT, 400_000 + n))["redemption_id"] for n in range(3)
    ]
    photo = photo_bytes(9)
    await submit(service, ids[0], 400_000, invoice_no="OLD-1", files={"photo": photo})
    await submit(service, ids[1], 400_001, invoice_no="old - 1")
    await submit(service, ids[2], 400_002, files={"photo": photo})
    # as an older release left them: no key, no hashes, only the six checks
    await pg.execute(
        "UPDATE settlements SET invoice_key = NULL, integrity_pending = true, checks_passed = true,"
        " checks = (SELECT jsonb_agg(c) FROM jsonb_array_elements(checks) c"
        "           WHERE c->>'name' <> ALL($2::text[]))"
        " WHERE redemption_id = ANY($1::text[])",
        ids,
        list(integrity.NAMES),
    )
    await pg.execute(
        "DELETE FROM photo_hashes WHERE sha256 IN (SELECT sha256 FROM settlement_files"
        " WHERE redemption_id = ANY($1::text[]))",
        ids,
    )
    for rid in ids:
        assert failed((await record(service, rid)).body) == {}
    assert await integrity.backfill(pg, LocalStore(data_dir / "documents")) == 3
    assert failed((await record(service, ids[0])).body) == {
        "unique_invoice": {ids[1]},
        "unique_documents": {ids[2]},
        "distinct_photos": {ids[2]},
    }
    assert failed((await record(service, ids[1])).body) == {"unique_invoice": {ids[0]}}
    assert {c["name"] for c in (await record(service, ids[1])).body["checks"]} >= INTEGRITY
    assert await integrity.backfill(pg, LocalStore(data_dir / "documents")) == 0  # once
    migrated = await pg.fetch(
        "SELECT subject FROM audit_log WHERE actor = 'migration' AND subject = ANY($1::text[])",
        ids,
    )
    assert {r["subject"] for r in migrated} == set(ids)


async def test_a_blank_invoice_number_is_the_same_invoice_as_none(
    servers: Servers, keyspace: Keyspace, tmp_path: Path
) -> None:
    """A blank invoice number has no key: it flags no other record (an upload with one is
    refused, tests/test_settlement.py). Records that migration 8's backfill keyed "", each
    then a duplicate of every other blank one, are checked again at migration 9 without a
    key, the change in the audit log; blank ones never checked are given no key."""
    assert integrity.invoice_key("\u3000 \t") is None
    assert integrity.invoice_key(" No.０１ ") == "no.01"
    flagged = {
        rid: integrity.ENCODE.encode(
            integrity.results(
                {"unique_invoice": [twin], "unique_documents": [], "distinct_photos": []}
            )
        ).decode()
        for rid, twin in (("keyed.1", "keyed.2"), ("keyed.2", "keyed.1"))
    }
    async with database_at(servers, f"{keyspace.name}_blank"[:60], 8) as pool:
        await pool.executemany(
            "INSERT INTO settlements (redemption_id, campaign_id, merchant_id, status, meta,"
            " checks, checks_passed, submitted_at, invoice_key)"
            " VALUES ($1, 'c', 'shop', $2, $3::jsonb, $4::jsonb, $5, now(), $6)",
            [
                ("keyed.1", "submitted", '{"invoice_no": ""}', flagged["keyed.1"], False, ""),
                ("keyed.2", "paid", '{"invoice_no": "\u3000"}', flagged["keyed.2"], False, ""),
                ("never.1", "submitted", '{"invoice_no": " "}', "[]", True, None),
                ("never.2", "submitted", "{}", "[]", True, None),
            ],
        )
        assert await store.migrate(pool) == len(store.MIGRATIONS)
        assert await integrity.backfill(pool, LocalStore(tmp_path)) == 4
        rows = await pool.fetch(
            "SELECT redemption_id, invoice_key, checks_passed, checks FROM settlements"
        )
        for row in rows:
            checks = {c["name"]: c for c in msgspec.json.decode(row["checks"])}
            assert row["invoice_key"] is None and row["checks_passed"], row
            assert checks["unique_invoice"]["passed"], row
        audited = await pool.fetch(
            "SELECT subject, details FROM audit_log WHERE actor = 'migration' ORDER BY subject"
        )
        assert [(r["subject"], msgspec.json.decode(r["details"])) for r in audited] == [
            ("keyed.1", {"failed": []}),
            ("keyed.2", {"failed": []}),
        ]
        assert await integrity.backfill(pool, LocalStore(tmp_path)) == 0  # once
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(
                "UPDATE settlements SET invoice_key = '' WHERE redemption_id = 'never.1'"
            )


# ------------------------------------------------------------------ the risk report


def two_rounds(short_s: float) -> dict[str, Any]:
    """A campaign whose first round, open now for `short_s`, gives vouchers valid 40
    minutes; its second opens then and gives vouchers valid 3 hours."""
    body = campaign()
    now = datetime.now(UTC)
    switch = now + timedelta(seconds=short_s)
    body["rounds"] = [
        {
            "round_id": "r1",
            "opens_at": iso(now - timedelta(seconds=5)),
            "closes_at": iso(switch),
            "valid_until": iso(now + timedelta(minutes=40)),
        },
        {
            "round_id": "r2",
            "opens_at": iso(switch),
            "closes_at": iso(switch + timedelta(hours=1)),
            "valid_until": iso(switch + timedelta(hours=3)),
        },
    ]
    return body


async def test_risk_report_ranks_the_cap_refund_last_hour_merchant_first(
    service: Service,
) -> None:
    # 8 s for the first round: 4 s was tight in the parallel phase
    campaign_id = await new_campaign_with(service, two_rounds(short_s=8))
    opened = datetime.now(UTC)
    risky = OTHER  # redeems at the cap only, in the vouchers' last hour, from one phone
    vouchers = []
    for _ in range(3):
        n = next(_people)
        person = {"id_number": id_number(n), "name": NAME, "phone": "13800000000"}
        reg = {"request_id": f"reg-{n:08d}", "user_id": f"u{n}", "person": person}
        path = f"/v1/campaigns/{campaign_id}"
        assert (await service.call("POST", f"{path}/registrations", reg, "app")).status == 201
        got = await service.call("POST", f"{path}/claims", claim(n, device_id="phone-1"), "app")
        assert got.status == 201 and got.body["round_id"] == "r1", got.body
        vouchers.append(got.body)
    await asyncio.sleep(max(0.0, 8.5 - (datetime.now(UTC) - opened).total_seconds()))
    # the others' vouchers come from the second round (3 hours of validity)
    clean = await new_merchant(service, categories=["appliance"])
    spread = [
        await sale(service, campaign_id, clean, amount, device_id=f"phone-c{n}")
        for n, amount in enumerate((2_500_000, 300_000, 400_000, 500_000, 600_000))
    ]
    assert all(s["discount_fen"] < 200_000 for s in spread[1:])
    doubled = [await sale(service, campaign_id, MERCHANT, 800_000 + n) for n in range(2)]
    for n, s in enumerate(doubled):  # one invoice for both: both fail unique_invoice
        await submit(service, s["redemption_id"], 800_000 + n, invoice_no="SAME-INVOICE")
    # the risky merchant: at the cap, reimbursed, then refunded
    sold = []
    for v in vouchers:
        paid = await redeem(service, payment(v, risky, 2_500_000))
        assert paid.status == 201 and paid.body["discount_fen"] == 200_000, paid.body
        sold.append(paid.body["redemption_id"])
        await submit(service, paid.body["redemption_id"], 2_500_000, "merchant-2")
        assert (await decide(service, paid.body["redemption_id"])).status == 200
    await pay_out(service, risky)
    for rid in sold:
        back = await refund(service, rid, 2_500_000, unique_id("refund"))
        assert back.status == 201 and back.body["clawback_due_fen"] == 200_000, back.body
    await service.drained()

    report = await service.call("GET", f"/v1/campaigns/{campaign_id}/risk", role="auditor")
    assert report.status == 200, report.body
    rows = {r["merchant_id"]: r for r in report.body["rows"]}
    assert [r["merchant_id"] for r in report.body["rows"]] == [risky, MERCHANT, clean]
    assert rows[risky] == {
        "merchant_id": risky,
        "redemptions": 3,
        "flagged_records": 0,
        "at_cap_share": 1.0,
        "refunded_after_reimbursement_share": 1.0,
        "last_hour_share": 1.0,
        "redemptions_per_device": 3.0,
        "redemptions_per_staff": 0.0,
        "integrity_failed_records": 0,
        "score": 75.0,  # 25 + 25 + 15 + 15 × (1 - 1/3)
    }
    assert rows[clean] == {
        "merchant_id": clean,
        "redemptions": 5,
        "flagged_records": 0,
        "at_cap_share": 0.2,
        "refunded_after_reimbursement_share": 0.0,
        "last_hour_share": 0.0,
        "redemptions_per_device": 1.0,
        "redemptions_per_staff": 0.0,
        "integrity_failed_records": 0,
        "score": 5.0,  # 25 × 0.2
    }
    assert rows[MERCHANT] == {
        "merchant_id": MERCHANT,
        "redemptions": 2,
        "flagged_records": 2,
        "at_cap_share": 0.0,
        "refunded_after_reimbursement_share": 0.0,
        "last_hour_share": 0.0,
        "redemptions_per_device": 0.0,
        "redemptions_per_staff": 0.0,
        "integrity_failed_records": 2,
        "score": 20.0,  # 20 × 2/2
    }
    # the CSV: a byte-order mark and bilingual headers, as the other reports
    csv = await service.client("ops").request("GET", f"/v1/campaigns/{campaign_id}/risk?format=csv")
    assert csv.status == 200 and csv.headers["Content-Type"].startswith("text/csv")
    text = csv.body.decode("utf-8")
    lines = text.lstrip("\ufeff").splitlines()
    assert text.startswith("\ufeff") and lines[0].startswith("商户 merchant_id,")
    assert [line.split(",")[0] for line in lines[1:]] == [risky, MERCHANT, clean]
    assert lines[1].split(",")[-1] == "75.0"
    assert (
        await service.call("GET", f"/v1/campaigns/{campaign_id}/risk", role="merchant")
    ).status == 403
    async with service.session.get(service.url + "/openapi.json") as spec:
        described = (await spec.json())["components"]["schemas"]["RiskRow"]["properties"]
    assert "cap" in described["at_cap_share"]["description"]
    assert "25 × at_cap_share" in described["score"]["description"]
