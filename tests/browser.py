"""What the browser tests of the signed pages (/ops, /audit) share: Debian's Chromium
driven by Playwright (which never downloads a browser here), one browser per module, and
a fresh context per test that records every request and fails the test on a script
error. A pytest plugin (tests/conftest.py), so its fixtures need no import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Request, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
# The network is closed: without these Chromium keeps calling home and floods refusals.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    # launch() gives every browser a fresh temporary profile (user data dir), removed on close
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


class Watched:
    """A page in its own browser context (fresh sessionStorage), with every request it
    made and every script error it hit."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.expected = ["status of 401"]  # console errors a test provokes on purpose
        page.on("request", lambda request: self.requests.append(request))
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: self.errors.append(msg.text) if msg.type == "error" else None,
        )

    def leaked(self, secret: str) -> list[str]:
        """Requests that carried the secret anywhere: URL, headers or body."""
        return [
            r.url
            for r in self.requests
            if secret in r.url
            or any(secret in v for v in r.headers.values())
            or secret in (r.post_data or "")
        ]


@pytest.fixture
async def watched(browser: Browser) -> AsyncIterator[Watched]:
    context = await browser.new_context(
        viewport={"width": 1280, "height": 1100}, device_scale_factor=1, locale="zh-CN"
    )
    try:
        watched = Watched(await context.new_page())
        yield watched
    finally:
        await context.close()
    # a refused call a test provokes is logged by Chromium as a failed resource load;
    # anything else (a script error, a missing resource) is a bug of the page
    unexpected = [e for e in watched.errors if not any(x in e for x in watched.expected)]
    assert not unexpected, unexpected


def close_to(pixel: Any, rgb: tuple[int, int, int], tolerance: int = 24) -> bool:
    """Whether a screenshot's pixel is the colour `rgb`, give or take `tolerance`."""
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, rgb, strict=False))
