"""The live ops page (GET /ops) in a real browser: Debian's Chromium driven by Playwright
against `issuer serve`. Login through the form and through a bookmarked fragment token,
signing in the browser (the secret is never sent), live updates every second, the paused
status, and a screenshot whose pixels prove the round's progress bar was really drawn."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from PIL import Image
from playwright.async_api import Locator, Page, expect

from tests.browser import CHROMIUM, Watched, close_to
from tests.conftest import Service
from tests.money import issue, new_campaign

# the bars' colours in ops.html (--issued, --money, --reserved, --available)
COLOURS = {
    "issued": (0x25, 0x63, 0xEB),
    "money": (0x7C, 0x3A, 0xED),
    "reserved": (0xE0, 0xA1, 0x00),
    "available": (0x2E, 0x9E, 0x5B),
}
UPDATE_MS = 3000  # the page polls every second; a change must show within this
POSITIVE = re.compile(r"^(?!0(\.0*)?$)\d+(\.\d+)?(e[-+]?\d+)?$")  # a data-value > 0

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed (/usr/bin/chromium); .ci/run installs it",
    ),
    pytest.mark.solo,  # a change must show within UPDATE_MS, as on the audit desk
]


async def log_in(page: Page, service: Service, secret: str | None = None) -> None:
    key = service.key("ops")
    await page.goto(service.url + "/ops")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#login .note code")).to_have_text("ops")  # console.js's form
    await page.get_by_label("API key id").fill(key.id)
    await page.get_by_label("secret").fill(secret or key.secret)
    await page.get_by_role("button", name="log in").click()


async def width_percent(bar: Locator) -> float:
    """The bar's inline style width, a percentage of its track."""
    width: str = await bar.evaluate("el => el.style.width")
    assert width.endswith("%"), width
    return float(width[:-1])


async def test_login_live_updates_and_screenshot(
    service: Service, watched: Watched, tmp_path: Path
) -> None:
    page = watched.page
    # each voucher reserves its cap, 2,000.00 yuan: five of them hold 20 % of the budget
    # and half of the round's budget
    campaign_id = await new_campaign(
        service, quota=10, budget_fen=5_000_000, round_budget_fen=2_000_000
    )
    for n in (1, 2):
        await issue(service, campaign_id, n)
    await log_in(page, service)

    card = page.locator(f'[data-campaign="{campaign_id}"]')
    await expect(card).to_be_visible()
    await expect(page.locator("#login")).to_be_hidden()
    await expect(card.locator('[data-field="name"]')).to_have_text("test campaign")
    await expect(card).to_have_attribute("data-status", "active")
    await expect(card.locator('[data-field="status"]')).to_contain_text("active")
    await expect(card.locator('[data-field="issued"]')).to_have_attribute("data-value", "2")
    bar = card.locator('[data-bar="round-issued"]')
    track = card.locator('[data-track="round-issued"]')
    await expect(bar).to_have_attribute("data-ratio", "0.2")
    assert await width_percent(bar) == 20
    await expect(track).to_have_attribute("role", "progressbar")
    await expect(track).to_have_attribute("aria-valuenow", "2")
    await expect(track).to_have_attribute("aria-valuemax", "10")
    await expect(card.locator('[data-bar="round-money"]')).to_have_attribute("data-ratio", "0.2")
    # the ledger in yuan, two decimals, thousands separators
    await expect(card.locator('[data-field="budget"]')).to_have_text("¥50,000.00")
    await expect(card.locator('[data-field="reserved"]')).to_have_text("¥4,000.00")
    await expect(card.locator('[data-field="available"]')).to_have_text("¥46,000.00")
    await expect(card.locator('[data-field="spent"]')).to_have_text("¥0.00")
    await expect(card.locator('[data-field="round-overdrawn"]')).to_have_text("¥0.00")
    await expect(card.locator('[data-code="OK"]')).to_have_attribute("data-value", "2")
    first_update = await page.locator("#updated").get_attribute("data-generated-at")

    # three more vouchers through the API: the page shows them within a few seconds
    for n in (3, 4, 5):
        await issue(service, campaign_id, n)
    await expect(card.locator('[data-field="issued"]')).to_have_attribute(
        "data-value", "5", timeout=UPDATE_MS
    )
    await expect(bar).to_have_attribute("data-ratio", "0.5", timeout=UPDATE_MS)
    assert await width_percent(bar) == 50
    await expect(track).to_have_attribute("aria-valuenow", "5")
    await expect(card.locator('[data-field="round-issued-text"]')).to_have_text("5 / 10 (50.00%)")
    await expect(card.locator('[data-bar="round-money"]')).to_have_attribute("data-ratio", "0.5")
    await expect(card.locator('[data-bar="ledger-reserved"]')).to_have_attribute(
        "data-ratio", "0.2"
    )
    await expect(card.locator('[data-field="available"]')).to_have_text("¥40,000.00")
    await expect(card.locator('[data-field="claims-total"]')).to_have_attribute("data-value", "5")
    # rates over the last 5 s (polls a second apart) saw those three claims
    for field in ("claim-rate-5s", "issued-rate-5s"):
        rate = card.locator(f'[data-field="{field}"]')
        await expect(rate).to_have_attribute("data-value", POSITIVE, timeout=UPDATE_MS)
    assert await page.locator("#updated").get_attribute("data-generated-at") != first_update
    await expect(page.locator("#error")).to_be_hidden()

    # every call was signed in the browser, and the secret never left it
    overview = [r for r in watched.requests if r.url.endswith("/v1/ops/overview")]
    assert len(overview) >= 2
    headers = overview[-1].headers
    assert headers["x-api-key"] == service.key("ops").id
    assert re.fullmatch(r"[0-9a-f]{64}", headers["x-signature"])
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,64}", headers["x-nonce"])
    assert len({r.headers["x-nonce"] for r in overview}) == len(overview)
    assert watched.leaked(service.key("ops").secret) == []

    # the screenshot: the bars were really drawn, in their colours, over the right share
    shot = tmp_path / "ops.png"
    await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=str(shot), full_page=True, scale="css", animations="disabled")
    with Image.open(shot) as png:
        image = png.convert("RGB")
    issued = await drawn(image, track, COLOURS["issued"])
    assert all(abs(share - 0.5) < 0.03 for share in issued), (shot, issued)
    money = await drawn(image, card.locator('[data-track="round-money"]'), COLOURS["money"])
    assert all(abs(share - 0.5) < 0.03 for share in money), (shot, money)
    stack = card.locator('[data-bar="ledger"]')
    reserved = await drawn(image, stack, COLOURS["reserved"], from_left=False)
    assert all(abs(share - 0.2) < 0.03 for share in reserved), (shot, reserved)
    available = await drawn(image, stack, COLOURS["available"])
    assert all(abs(share - 0.8) < 0.03 for share in available), (shot, available)
    print(f"screenshot: {shot}")


async def drawn(
    image: Image.Image, element: Locator, rgb: tuple[int, int, int], from_left: bool = True
) -> list[float]:
    """The share of the element's width painted in `rgb`, on three rows around its middle;
    with from_left, the painted pixels must also start at its left edge, in one run."""
    box = await element.bounding_box()
    assert box is not None and box["width"] > 100, box
    left, right = round(box["x"]), round(box["x"] + box["width"])
    middle = round(box["y"] + box["height"] / 2)
    shares = []
    for y in (middle - 2, middle, middle + 2):
        painted = [close_to(image.getpixel((x, y)), rgb) for x in range(left, right)]
        shares.append(sum(painted) / len(painted))
        if from_left:
            edge = painted.index(False) if False in painted else len(painted)
            assert edge > 0 and not any(painted[edge + 2 :]), (y, edge)
    return shares


async def test_wrong_secret_shows_login_error(service: Service, watched: Watched) -> None:
    page = watched.page
    await new_campaign(service, quota=10)
    wrong = secrets.token_hex(24)
    await log_in(page, service, secret=wrong)
    error = page.locator("#login-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("401")
    await expect(error).to_contain_text("UNAUTHENTICATED")
    await expect(page.locator("#dashboard")).to_be_hidden()
    await expect(page.locator("[data-campaign]")).to_have_count(0)
    assert await page.evaluate("sessionStorage.length") == 0
    assert watched.leaked(wrong) == []

    # a valid key of another role: 403, back to the form with a message
    watched.expected.append("status of 403")
    app = service.key("app")
    await page.get_by_label("API key id").fill(app.id)
    await page.get_by_label("secret").fill(app.secret)
    await page.get_by_role("button", name="log in").click()
    await expect(error).to_contain_text("403")
    await expect(error).to_contain_text("FORBIDDEN")
    await expect(page.locator("#dashboard")).to_be_hidden()
    assert watched.leaked(app.secret) == []


async def open_by_token_link(page: Page, service: Service) -> Locator:
    """A new campaign, the page opened by the ops key's #key= link; the campaign's card."""
    key = service.key("ops")
    campaign_id = await new_campaign(service, quota=10)
    await page.goto(f"{service.url}/ops#key={key.id}:{key.secret}")
    card = page.locator(f'[data-campaign="{campaign_id}"]')
    await expect(card).to_be_visible()
    return card


async def test_failed_call_shows_banner_and_keeps_polling(
    service: Service, watched: Watched
) -> None:
    page = watched.page
    card = await open_by_token_link(page, service)
    banner = page.locator("#error")
    await expect(banner).to_be_hidden()

    # the service answers 503 for a while: a banner, the last figures stay on screen
    watched.expected.append("status of 503")
    unavailable = '{"error": {"code": "UNAVAILABLE", "message": "redis down", "retryable": true}}'
    await page.route(
        "**/v1/ops/overview",
        lambda route: route.fulfill(status=503, body=unavailable, content_type="application/json"),
    )
    await expect(banner).to_be_visible(timeout=UPDATE_MS)
    await expect(banner).to_contain_text("503 UNAVAILABLE")
    await expect(card).to_be_visible()
    await expect(page.locator("#login")).to_be_hidden()
    # and it recovers by itself
    await page.unroute("**/v1/ops/overview")
    await expect(banner).to_be_hidden(timeout=UPDATE_MS)


async def test_fragment_token_logs_in_and_leaves_the_url(
    service: Service, watched: Watched
) -> None:
    page = watched.page
    card = await open_by_token_link(page, service)
    await expect(page.locator("#login")).to_be_hidden()
    assert page.url == service.url + "/ops"
    assert await page.evaluate("location.hash") == ""
    assert watched.leaked(service.key("ops").secret) == []
    # the session survives a reload (sessionStorage), without the fragment
    await page.reload()
    await expect(card).to_be_visible()
    # logging out forgets the key
    await page.get_by_role("button", name="log out").click()
    await expect(page.locator("#login")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0


async def test_pause_shows_in_status(service: Service, watched: Watched) -> None:
    page = watched.page
    key = service.key("ops")
    campaign_id = await new_campaign(service, quota=10)
    await page.goto(f"{service.url}/ops#key={key.id}:{key.secret}")
    card = page.locator(f'[data-campaign="{campaign_id}"]')
    await expect(card).to_have_attribute("data-status", "active")

    body = {"request_id": f"pause-{campaign_id}", "reason": "巡检 ops drill"}
    resp = await service.call("POST", f"/v1/campaigns/{campaign_id}/pause", body)
    assert resp.status == 200, resp.body
    await expect(card).to_have_attribute("data-status", "paused", timeout=UPDATE_MS)
    status = card.locator('[data-field="status"]')
    await expect(status).to_have_text("已暂停 paused")
    await expect(status).to_have_class("badge paused")

    body = {"request_id": f"resume-{campaign_id}", "reason": "巡检结束 drill over"}
    resp = await service.call("POST", f"/v1/campaigns/{campaign_id}/resume", body)
    assert resp.status == 200, resp.body
    await expect(card).to_have_attribute("data-status", "active", timeout=UPDATE_MS)
