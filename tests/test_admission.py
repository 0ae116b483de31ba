"""Admission decides from the claims in hand or a late event loop, sees the loop late while
one long pass is still running and after it until the timer fires on time again (a
backlog of requests is worked through in several passes), and the lateness timer keeps
running."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from issuer import metrics
from issuer.admission import TICK_S, Admission, LoopLag
from issuer.app import make_app
from issuer.config import Settings
from issuer.errors import ApiError
from issuer.http import MAX_BODY, Ctx
from issuer.keyring import Keyring

pytestmark = pytest.mark.fast


@contextlib.asynccontextmanager
async def ticking(max_late_s: float) -> AsyncIterator[LoopLag]:
    """A LoopLag whose timer has been firing for a few ticks."""
    lag = LoopLag(max_late_s)
    lag.start()
    try:
        await asyncio.sleep(3 * TICK_S)
        yield lag
    finally:
        lag.stop()


@pytest.fixture
async def lag() -> AsyncIterator[LoopLag]:
    async with ticking(10.0) as lag:
        yield lag


@contextlib.contextmanager
def held(admission: Admission) -> Iterator[None]:
    """One claim taken and let go, as the endpoint does (issuer/app.py)."""
    full = admission.in_hand >= admission.queue_max
    if full or time.monotonic() > admission.lag.behind_from:
        raise admission.refusal(full)
    admission.in_hand += 1
    try:
        yield
    finally:
        admission.in_hand -= 1


def late(lag: LoopLag) -> float:
    """How late the loop is now, mid-pass (the timer's last firing aside: `lag.late()`)."""
    return time.monotonic() - lag.due


def refusal(admission: Admission) -> ApiError | None:
    """The refusal of one more claim, or None (the claim is let in and answered at once)."""
    try:
        with held(admission):
            return None
    except ApiError as exc:
        return exc


async def test_claims_in_hand_up_to_the_bound_then_refused_with_retry_after(
    lag: LoopLag,
) -> None:
    admission = Admission(queue_max=20, lag=lag)
    with ExitStack() as claims:
        for _ in range(19):
            claims.enter_context(held(admission))
        assert admission.in_hand == 19
        assert refusal(admission) is None
        claims.enter_context(held(admission))
        shed = refusal(admission)
        assert shed is not None
        assert (shed.code, shed.status, shed.retry_after) == ("OVERLOADED", 503, 1)
        assert "20 claims queued" in str(shed)
        assert admission.in_hand == 20  # a refused claim is not counted
    assert admission.in_hand == 0  # answered: each one is let go


@pytest.mark.solo  # the loop must be under 200 ms late 3 ticks after a stall
async def test_a_late_loop_is_seen_mid_pass_and_refused_until_the_timer_runs_on_time() -> None:
    async with ticking(0.2) as lag:
        admission = Admission(queue_max=10**6, lag=lag)
        assert refusal(admission) is None
        time.sleep(0.3)  # noqa: ASYNC251 -- one pass of the loop busy 300 ms, a backlog's
        assert late(lag) >= 0.3 - TICK_S
        shed = refusal(admission)
        assert shed is not None and shed.code == "OVERLOADED" and "late" in str(shed)
        # the timer fired 300 ms late: the next pass starts on time and is still behind, as
        # a backlog's next stage would be
        for _ in range(3):  # a pass or two: until the timer has fired
            await asyncio.sleep(0)
        assert lag.last_late >= 0.3 - TICK_S and late(lag) < 0.2
        shed = refusal(admission)
        assert shed is not None and f"{lag.last_late * 1000:.0f} ms late" in str(shed)
        await asyncio.sleep(3 * TICK_S)  # the loop is free again: the timer fires on time
        assert late(lag) < 0.2 and lag.last_late < 0.2
        assert refusal(admission) is None


@pytest.mark.solo  # the loop must be less than 5 ticks late
async def test_the_timer_keeps_running_when_recording_fails(
    lag: LoopLag, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timer that stopped would read as a loop ever later: every claim would be shed."""

    def broken(_: float) -> None:
        raise OSError("metrics file")

    monkeypatch.setattr(metrics.LOOP_LAG, "observe", broken)
    loop = asyncio.get_running_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        await asyncio.sleep(10 * TICK_S)
    finally:
        loop.set_exception_handler(None)
    assert errors  # the failing tick was reported ...
    assert late(lag) < 5 * TICK_S  # ... and ticking went on


async def test_claims_are_shed_before_they_are_read_or_checked_and_nothing_else_is() -> None:
    """Through the real app: with a worker that takes no claim, an unsigned claim and an
    oversized one get 503 OVERLOADED, not 401 or 400; a payment, which is never shed, is
    checked as usual. A claim taken and refused is let go."""
    nothing = cast(Any, None)  # parts of the worker these requests never reach
    ctx = Ctx(
        settings=Settings(),
        redis=nothing,
        pg=None,
        scripts=nothing,
        campaigns=nothing,
        claims=nothing,
        redemptions=nothing,
        settlement=nothing,
        keys=Keyring(Path("no-keys.toml"), {}),
        person_key=b"k",
        admission=Admission(queue_max=0, lag=LoopLag(10.0)),
        owners=nothing,
    )

    async def ready() -> dict[str, Any]:
        return {}

    async with TestServer(make_app(ctx, ready)) as server, aiohttp.ClientSession() as session:
        claims = server.make_url("/v1/campaigns/demo/claims")
        async with session.post(claims, data=b"not json") as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "OVERLOADED"
        async with session.post(claims, data=b"x" * (MAX_BODY + 1)) as resp:
            assert (await resp.json())["error"]["code"] == "OVERLOADED"
        async with session.post(server.make_url("/v1/redemptions"), data=b"{}") as resp:
            assert (await resp.json())["error"]["code"] == "UNAUTHENTICATED"
        ctx.admission.queue_max = 1
        async with session.post(claims, data=b"not json") as resp:
            assert (await resp.json())["error"]["code"] == "UNAUTHENTICATED"
        assert ctx.admission.in_hand == 0
