"""Micro-batching: requests that arrive while one Redis call is in flight wait for the next,
and go together in one round trip. One batch in flight per batcher. An item is submitted
(its caller awaits its result) or posted (nobody waits: a failed round trip is logged).
A batcher with a linger holds the first item of an idle batcher that long for others."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, TypeVar

from issuer import topology
from issuer.errors import ApiError

Item = TypeVar("Item")
Result = TypeVar("Result")
log = logging.getLogger("issuer.batching")


class TickBatcher(ABC, Generic[Item, Result]):
    def __init__(self, batch_max: int, linger_s: float = 0.0) -> None:
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.queue: list[tuple[Item, asyncio.Future[Result] | None]] = []
        self.running = False  # a drain is due or under way
        self._lingering: asyncio.TimerHandle | None = None

    # submit and post queue their item themselves: a helper would be one more Python frame
    # for every claim, and for every refusal's nonce
    def submit(self, item: Item) -> asyncio.Future[Result]:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        if not self.running:
            self._due()
        return future

    def post(self, item: Item) -> None:
        """Send `item` with the next batch; nobody waits for its result."""
        self.queue.append((item, None))
        if not self.running:
            self._due()

    def _due(self) -> None:
        """A drain is due: now, or once the linger has passed."""
        self.running = True
        if self.linger_s:
            self._lingering = asyncio.get_running_loop().call_later(self.linger_s, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._lingering = None
        asyncio.get_running_loop().create_task(self._drain())

    async def flush(self) -> None:
        """Send what lingers now (a worker stopping)."""
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
            await self._drain()

    async def _drain(self) -> None:
        try:
            while self.queue:
                batch = self.queue[: self.batch_max]
                del self.queue[: self.batch_max]
                items = [item for item, _ in batch]
                try:
                    results = await self.send(items)
                except BaseException as exc:
                    for _, future in batch:
                        if future is not None and not future.done():
                            future.set_exception(self.failure(exc))
                    if not isinstance(exc, Exception):
                        raise
                    posted = sum(future is None for _, future in batch)
                    if posted:
                        log.warning(
                            "a batch failed",
                            extra={
                                "batcher": type(self).__name__,
                                "posted": posted,
                                "error": repr(exc),
                            },
                        )
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future is not None and not future.done():
                        future.set_result(result)
        finally:
            self.running = False
            self.idle()

    @abstractmethod
    async def send(self, items: list[Item]) -> Sequence[Result]:
        """One round trip for the whole batch; one result per item, in order."""

    def failure(self, exc: BaseException) -> BaseException:
        """What the waiting requests get when the round trip fails. A Redis error is 503
        UNAVAILABLE, not a refusal: the batch may or may not have been applied, and a retry
        with the same request_id gets the true answer. Anything else as it is."""
        if isinstance(exc, topology.REDIS_ERRORS):
            return ApiError("UNAVAILABLE", type(exc).__name__)
        return exc

    def idle(self) -> None:
        """Called when the queue has run dry."""
