"""Admission decides from a full claim queue or a late event loop, and sees the loop late
while one long pass is still running (the case of a backlog of requests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from issuer.admission import TICK_S, Admission, LoopLag
from issuer.errors import ApiError


@pytest.fixture
async def lag() -> AsyncIterator[LoopLag]:
    lag = LoopLag()
    lag.start()
    await asyncio.sleep(3 * TICK_S)
    yield lag
    lag.stop()


def refusal(admission: Admission, waiting: int) -> ApiError | None:
    try:
        admission.check(waiting)
    except ApiError as exc:
        return exc
    return None


async def test_a_full_queue_is_refused_with_retry_after(lag: LoopLag) -> None:
    admission = Admission(queue_max=20, lag_max_s=10, lag=lag)
    assert refusal(admission, 19) is None
    shed = refusal(admission, 20)
    assert shed is not None
    assert (shed.code, shed.status, shed.retry_after) == ("OVERLOADED", 503, 1)
    assert "20 claims queued" in str(shed)


async def test_a_late_loop_is_seen_mid_pass_and_refused_until_the_timer_runs_again(
    lag: LoopLag,
) -> None:
    admission = Admission(queue_max=10**6, lag_max_s=0.2, lag=lag)
    assert refusal(admission, 0) is None
    time.sleep(0.3)  # noqa: ASYNC251 -- one pass of the loop busy 300 ms, as with a backlog
    assert lag.seconds() >= 0.3 - TICK_S
    shed = refusal(admission, 0)
    assert shed is not None and shed.code == "OVERLOADED" and "late" in str(shed)
    await asyncio.sleep(3 * TICK_S)  # the loop is free again: the timer fires on time
    assert lag.seconds() < 0.2
    assert refusal(admission, 0) is None
