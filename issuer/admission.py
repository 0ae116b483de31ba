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
    """How late this process's event loop runs, and from when it counts as behind.

    A timer fires every TICK_S and notes when it is due next (`due`); while one pass of the
    loop works through a backlog of callbacks, the timer cannot fire, and the time past
    `due` grows: the loop is `time.monotonic() - due` late at any moment, mid-pass included.
    A backlog of requests is mostly worked through in several short passes (accepted, read,
    handled, answered: one stage each), each one shorter than the bound, so a loop whose
    timer last fired more than `max_late_s` late stays behind until it fires on time again:
    it is behind from `behind_from` on (the endpoint reads it, in one comparison)."""

    def __init__(self, max_late_s: float) -> None:
        self.max_late_s = max_late_s
        self.last_late = 0.0  # how late the timer fired last
        self.due = time.monotonic() + TICK_S
        self.behind_from = self.due + max_late_s
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.due = time.monotonic() + TICK_S
        self.behind_from = self.due + self.max_late_s
        self._timer = asyncio.get_running_loop().call_later(TICK_S, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def late(self) -> float:
        """How late the loop is: now, or at the timer's last firing if that was later."""
        return max(self.last_late, time.monotonic() - self.due)

    def _tick(self) -> None:
        now = time.monotonic()
        late = max(0.0, now - self.due)
        self.last_late = late
        self.due = now + TICK_S
        self.behind_from = now if late > self.max_late_s else self.due + self.max_late_s
        # the next tick first: a timer that stopped would read as a loop ever later, and
        # every claim would be shed
        self._timer = asyncio.get_running_loop().call_later(TICK_S, self._tick)
        metrics.LOOP_LAG.observe(late)


class Admission:
    """Whether this worker can take a claim, before it is read (tested by the endpoint),
    the refusal of one it cannot, and the claims it took until they are answered."""

    def __init__(self, queue_max: int, lag: LoopLag) -> None:
        self.queue_max = queue_max  # claims in hand: admitted, not yet answered
        self.lag = lag
        self.in_hand = 0

    def refusal(self, full: bool) -> ApiError:
        """The refusal of a claim this worker cannot take, counted by why: `full`,
        queue_max claims are in hand, else the loop is behind (LoopLag)
        (OVERLOADED, Retry-After: 1). Whether it can take one is tested by the endpoint, in
        its own frame (every claim passes there; a method of this class was one frame
        more), which hands it what it found: it takes a claim into `in_hand` and lets it go
        once answered or failed (`in_hand -= 1`, in a `finally`: a context manager would be
        two Python frames more)."""
        if full:
            metrics.child(metrics.SHED, "queue").inc()
            return ApiError("OVERLOADED", f"{self.in_hand} claims queued", retry_after=1)
        late = self.lag.late()
        metrics.child(metrics.SHED, "lag").inc()
        return ApiError("OVERLOADED", f"event loop {late * 1000:.0f} ms late", retry_after=1)
