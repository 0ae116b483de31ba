"""The reviewer's desk (GET /audit) in a real browser: Debian's Chromium driven by
Playwright against `issuer serve`, as the ops page's test. Log in with an auditor key, the
queue with the flagged records first, a flagged record whose duplicate links to its twin,
the invoice image really drawn (pixels of the screenshot), a rejection with its reason, an
approval, the override the page asks for, a disbursement batch created and paid; then the
audit log, read through the API, holds each of those actions under the auditor's key.

With ISSUER_DOCS_SCREENSHOTS=1 the screenshots of the queue and of a record are written to
docs/ (audit-queue.png, audit-record.png)."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont
from playwright.async_api import Page, expect

from bench.photos import jpeg, render_appliance
from tests.browser import CHROMIUM, Watched, close_to
from tests.conftest import ROOT, Service
from tests.money import new_campaign, payment, redeem
from tests.people import id_number
from tests.test_settlement import NAME, papers, upload

MERCHANT = "demo-merchant"  # the development merchant key's
KINDS = ("refrigerator", "washing_machine", "television", "air_conditioner")
# the invoice image's colours, which the screenshot must show where they were painted
RED, BLUE, WHITE = (0xC0, 0x39, 0x2B), (0x25, 0x63, 0xEB), (0xFF, 0xFF, 0xFF)
PAINTED = (((0.5, 0.05), RED), ((0.1, 0.9), BLUE), ((0.5, 0.55), WHITE), ((0.97, 0.05), RED))
SHOTS = ROOT / "docs" if os.environ.get("ISSUER_DOCS_SCREENSHOTS") == "1" else None

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed (/usr/bin/chromium); .ci/run installs it",
    ),
    pytest.mark.solo,  # a browser's 5 s expectations: in parallel, the desk once missed one
]


def invoice_png(number: str) -> bytes:
    """An invoice as a photo of it: a red header band, a blue buyer box, white paper."""
    img = Image.new("RGB", (600, 400), WHITE)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=22)
    draw.rectangle((0, 0, 600, 70), fill=RED)
    draw.text((20, 20), f"VAT INVOICE  No. {number}", fill=WHITE, font=font)
    for y in range(100, 260, 32):
        draw.line((20, y, 580, y), fill=(200, 200, 200), width=2)
    draw.rectangle((20, 290, 260, 380), fill=BLUE)
    draw.text((35, 320), "BUYER", fill=WHITE, font=font)
    draw.ellipse((440, 280, 560, 390), outline=RED, width=6)
    return encoded(img, "PNG")


def receipt_jpeg(amount_fen: int) -> bytes:
    img = Image.new("RGB", (360, 480), (246, 246, 240))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=20)
    draw.text((30, 40), "PAYMENT RECEIPT", fill=(30, 30, 30), font=font)
    draw.text((30, 100), f"CNY {amount_fen / 100:,.2f}", fill=(30, 30, 30), font=font)
    for y in range(160, 440, 28):
        draw.line((30, y, 330, y), fill=(190, 190, 190), width=2)
    return encoded(img, "JPEG")


def label_png(model: str) -> bytes:
    """A grade-1 energy label of a model: five bars, green to red."""
    img = Image.new("RGB", (240, 320), WHITE)
    draw = ImageDraw.Draw(img)
    draw.text((20, 20), model, fill=(30, 30, 30), font=ImageFont.load_default(size=18))
    bars = ((0, 160, 60), (120, 190, 40), (240, 200, 0), (240, 120, 0), (220, 30, 30))
    for k, colour in enumerate(bars):
        draw.rectangle((20, 60 + k * 45, 90 + k * 28, 95 + k * 45), fill=colour)
    draw.rectangle((5, 5, 235, 315), outline=(30, 30, 30), width=3)
    return encoded(img, "PNG")


def confirmation_pdf(text: str) -> bytes:
    """A one-page PDF of one line of text (Helvetica: ASCII)."""
    content = f"BT /F1 18 Tf 40 240 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 420 297] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (n, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return out


def encoded(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


async def seeded(service: Service) -> tuple[str, dict[str, str]]:
    """A campaign with four submitted records: twins (one invoice number on both), one to
    approve and one to reject."""
    merchant = {"name": "乡宁家电城", "county_code": "141029", "categories": ["appliance"]}
    assert (await service.call("PUT", f"/v1/merchants/{MERCHANT}", merchant)).status in (200, 201)
    campaign_id = await new_campaign(service)
    ids = {}
    for n, (name, amount) in enumerate(
        (("twin", 1_200_000), ("other_twin", 900_000), ("clean", 650_000), ("wrong", 480_000))
    ):
        person = {"id_number": id_number(9000 + n), "name": NAME, "phone": "13800000000"}
        reg = {"request_id": f"reg-desk-{n:04d}", "user_id": f"desk{n}", "person": person}
        path = f"/v1/campaigns/{campaign_id}"
        assert (await service.call("POST", f"{path}/registrations", reg, "app")).status == 201
        claim = {
            "request_id": f"claim-desk-{n:04d}",
            "user_id": f"desk{n}",
            "person": {"id_number": id_number(9000 + n)},
            "location": {"region_code": "141029"},
            "device_id": f"phone-{n}",
        }
        voucher = await service.call("POST", f"{path}/claims", claim, "app")
        assert voucher.status == 201, voucher.body
        paid = await redeem(service, payment(voucher.body, MERCHANT, amount))
        assert paid.status == 201, paid.body
        rid = paid.body["redemption_id"]
        number = "4401 2024 0001" if "twin" in name else f"4401 2024 {n:04d}"
        files = {
            "confirmation": confirmation_pdf(f"Subsidy confirmation {rid}"),
            "invoice": invoice_png(number),
            "payment_proof": receipt_jpeg(amount),
            "photo": jpeg(render_appliance(40 + n, KINDS[n]), 90),
            "energy_label": label_png(f"BCD-{470 + n * 30}W"),
        }
        sent = await upload(service, rid, *papers(amount, invoice_no=number, files=files))
        assert sent.status == 201, sent.body
        ids[name] = rid
    await service.drained()
    return campaign_id, ids


async def log_in(page: Page, service: Service) -> None:
    key = service.key("auditor")
    await page.goto(service.url + "/audit")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#login .note code")).to_have_text("auditor")  # console.js's form
    await page.get_by_label("API key id").fill(key.id)
    await page.get_by_label("secret").fill(key.secret)
    await page.get_by_role("button", name="log in").click()
    await expect(page.locator("#queue-view")).to_be_visible()


async def shot(page: Page, path: Path, name: str) -> Image.Image:
    """A full-page screenshot (also into docs/ when asked); returns it."""
    await page.screenshot(path=str(path), full_page=True, scale="css", animations="disabled")
    if SHOTS is not None:
        shutil.copyfile(path, SHOTS / name)
    with Image.open(path) as png:
        return png.convert("RGB")


async def open_record(page: Page, rid: str) -> None:
    await page.locator(f'a[href="#record/{rid}"]').first.click()
    await expect(page.locator("#record-view")).to_have_attribute("data-record", rid)


async def decide(page: Page, action: str, reason: str, override: str | None = None) -> None:
    await page.locator("#d-reason").fill(reason)
    if override is not None:
        await page.locator("#d-override").fill(override)
    await page.locator(f'[data-action="{action}"]').click()


async def test_the_desk(service: Service, watched: Watched, tmp_path: Path) -> None:
    page = watched.page
    campaign_id, ids = await seeded(service)
    twin, other_twin, clean, wrong = (ids[k] for k in ("twin", "other_twin", "clean", "wrong"))
    await log_in(page, service)

    # the queue: the two flagged records first, marked
    rows = page.locator("#queue-rows tr")
    await expect(rows).to_have_count(4)
    flags = [await rows.nth(i).get_attribute("data-flagged") for i in range(4)]
    assert flags == ["true", "true", "false", "false"], flags
    first_two = {await rows.nth(i).get_attribute("data-record") for i in range(2)}
    assert first_two == {twin, other_twin}
    await expect(rows.nth(0).locator('[data-field="flag"]')).to_contain_text("发票未重复")
    await shot(page, tmp_path / "queue.png", "audit-queue.png")
    await page.locator("#f-failed").check()
    await page.get_by_role("button", name="filter").click()
    await expect(rows).to_have_count(2)

    # a flagged record: the failed check names its twin, whose page names it back
    await open_record(page, twin)
    check = page.locator('[data-check="unique_invoice"]')
    await expect(check).to_have_attribute("data-passed", "false")
    await expect(page.locator('[data-check="buyer_name"]')).to_have_attribute("data-passed", "true")
    await expect(page.locator('[data-field="order-amount"]')).to_have_text("¥12,000.00")
    await check.locator(f'a[data-twin="{other_twin}"]').click()
    await expect(page.locator("#record-view")).to_have_attribute("data-record", other_twin)
    back = page.locator(f'[data-check="unique_invoice"] a[data-twin="{twin}"]')
    await back.click()
    await expect(page.locator("#record-view")).to_have_attribute("data-record", twin)

    # the invoice image is drawn: each quadrant's colour where it belongs
    invoice = page.locator('img[data-part="invoice"]')
    await expect(invoice).to_be_visible()
    await page.wait_for_function(
        "document.querySelector('img[data-part=\"invoice\"]').naturalWidth === 600"
    )
    await invoice.scroll_into_view_if_needed()
    image = await shot(page, tmp_path / "record.png", "audit-record.png")
    box = await invoice.bounding_box()  # in the viewport; the screenshot is the page
    assert box is not None and box["width"] > 200, box
    left, top = await page.evaluate("[window.scrollX, window.scrollY]")
    for (fx, fy), colour in PAINTED:
        x = round(left + box["x"] + fx * box["width"])
        y = round(top + box["y"] + fy * box["height"])
        assert close_to(image.getpixel((x, y)), colour), (x, y, image.getpixel((x, y)), colour)
    pdf = page.locator('iframe[data-part="confirmation"]')
    await expect(pdf).to_have_attribute("src", re.compile(r"^blob:"))

    # approving a flagged record without an override reason: the page asks, sends nothing
    await decide(page, "approve", "材料已核对 papers checked")
    problem = page.locator("#d-problem")
    await expect(problem).to_be_visible()
    await expect(problem).to_contain_text("override reason")
    await expect(page.locator("#d-override")).to_be_focused()
    assert not [r for r in watched.requests if r.url.endswith(f"/settlements/{twin}/decision")]
    state = await service.call("GET", f"/v1/settlements/{twin}", role="auditor")
    assert state.body["status"] == "submitted"

    # reject one with a reason, approve a clean one
    await page.goto(f"{service.url}/audit#record/{wrong}")
    await expect(page.locator("#record-view")).to_have_attribute("data-record", wrong)
    await decide(page, "reject", "付款凭证与发票不符 proof does not match")
    await expect(page.locator('#record-view [data-field="status"]')).to_contain_text("rejected")
    await page.goto(f"{service.url}/audit#record/{clean}")
    await expect(page.locator("#record-view")).to_have_attribute("data-record", clean)
    await decide(page, "approve", "材料齐全 papers complete")
    await expect(page.locator('#record-view [data-field="status"]')).to_contain_text("approved")
    await expect(page.locator('#record-view [data-field="due-date"]')).to_have_text(
        re.compile(r"^\d{4}-\d{2}-\d{2}")
    )

    # a disbursement batch for the merchant: created, due date shown, then paid
    await page.locator('[data-nav="disbursements"]').click()
    await page.locator("#d-merchant").fill(MERCHANT)
    await page.locator("#disburse").click()
    await expect(page.locator("#notice")).to_contain_text("d-")
    batch = page.locator(f'#batch-rows tr[data-merchant="{MERCHANT}"]').first
    await expect(batch.locator(f'a[href="#record/{clean}"]')).to_be_visible()
    await expect(batch.locator('[data-field="due-date"]')).to_have_text(
        re.compile(r"^\d{4}-\d{2}-\d{2}")
    )
    batch_id = await batch.get_attribute("data-batch")
    await batch.locator('[data-action="paid"]').click()
    await expect(page.locator(f'#batch-rows tr[data-batch="{batch_id}"]')).to_contain_text("paid")

    # the risk table links each merchant to its records
    await page.goto(f"{service.url}/audit#risk/{campaign_id}")
    merchant_row = page.locator(f'#risk-rows tr[data-merchant="{MERCHANT}"]')
    await expect(merchant_row).to_be_visible()
    await merchant_row.locator('[data-field="merchant-records"]').click()
    await expect(page.locator("#queue-view")).to_be_visible()
    await expect(page.locator("#f-merchant")).to_have_value(MERCHANT)
    await expect(rows).to_have_count(4)

    # the audit log, through the API: each action, under the auditor's key
    auditor = service.key("auditor").id
    log = await service.call("GET", f"/v1/audit-log?campaign_id={campaign_id}", role="auditor")
    mine = [
        (e["action"], e.get("redemption_id") or e.get("disbursement_id"))
        for e in log.body["entries"]
        if e["actor"] == auditor
    ]
    assert ("rejected", wrong) in mine and ("approved", clean) in mine
    assert ("disbursement_created", batch_id) in mine and ("disbursement_paid", batch_id) in mine
    assert not [a for a in mine if a[1] == twin]
    reasons = {e["action"]: e["detail"]["reason"] for e in log.body["entries"]}
    assert reasons["rejected"] == "付款凭证与发票不符 proof does not match"
    assert watched.leaked(service.key("auditor").secret) == []
