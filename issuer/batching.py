"""Micro-batching: requests that arrive while one Redis call is in flight wait for the next,
and go together in one round trip. One batch in flight per batcher; each item's caller
awaits its result."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, TypeVar

from issuer import topology
from issuer.errors import ApiError

Item = TypeVar("Item")
Result = TypeVar("Result")


class TickBatcher(ABC, Generic[Item, Result]):
    def __init__(self, batch_max: int) -> None:
        self.batch_max = batch_max
        self.queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self.running = False  # a drain is under way

    def submit(self, item: Item) -> asyncio.Future[Result]:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return future

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
                        if not future.done():
                            future.set_exception(self.failure(exc))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
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
