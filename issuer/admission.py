"""Admission of claims: when this worker is behind, shed a claim with 503 OVERLOADED and
`Retry-After` before its body is read or its signature checked, so that the claims it
serves keep a bounded latency and the rest of the crowd is told to come back.

A worker is behind when it holds as many claims as it may (admitted, not yet answered), or
when its event loop runs late: above a few thousand connections the backlog is in the HTTP layer
(requests read and parsed before any handler runs), which no queue of claims can see.
A shed claim changes nothing and spends nothing, not even its nonce: it is refused as a
load balancer would refuse it, and its retry is a new request."""

from __future__ import annotations

import asyncio
import time

from issuer import metrics
from issuer.errors import ApiError

TICK_S = 0.01  # how often the loop's lateness is sampled


class LoopLag:
    """How late this process's event loop runs. A timer fires every TICK_S and notes when
    it is due next (`due`); while one pass of the loop works through a backlog of
    callbacks, the timer cannot fire, and the time past `due` grows: the loop is
    `time.monotonic() - due` late at any moment, mid-pass included."""

    def __init__(self) -> None:
        self.due = time.monotonic() + TICK_S
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.due = time.monotonic() + TICK_S
        self._timer = asyncio.get_running_loop().call_later(TICK_S, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        now = time.monotonic()
        late = max(0.0, now - self.due)
        self.due = now + TICK_S
        # the next tick first: a timer that stopped would read as a loop ever later, and
        # every claim would be shed
        self._timer = asyncio.get_running_loop().call_later(TICK_S, self._tick)
        metrics.LOOP_LAG.observe(late)


class Admission:
    """Decides, before a claim is read, whether this worker can take it, and counts the
    claims it took until they are answered."""

    def __init__(self, queue_max: int, lag_max_s: float, lag: LoopLag) -> None:
        self.queue_max = queue_max  # claims in hand: admitted, not yet answered
        self.lag_max_s = lag_max_s
        self.lag = lag
        self.in_hand = 0

    def admit(self) -> None:
        """Take one more claim into `in_hand`; OVERLOADED (Retry-After: 1) instead if
        queue_max claims are in hand or the loop is more than lag_max_s late. The caller
        lets a claim taken go once it is answered or has failed (`in_hand -= 1`, in a
        `finally`): every claim passes here, and a context manager would be two Python
        frames more per claim. The loop's lateness is read here, not by a method of
        `LoopLag`: one frame less per claim."""
        if self.in_hand >= self.queue_max:
            metrics.child(metrics.SHED, "queue").inc()
            raise ApiError("OVERLOADED", f"{self.in_hand} claims queued", retry_after=1)
        late = time.monotonic() - self.lag.due
        if late > self.lag_max_s:
            metrics.child(metrics.SHED, "lag").inc()
            raise ApiError("OVERLOADED", f"event loop {late * 1000:.0f} ms late", retry_after=1)
        self.in_hand += 1
