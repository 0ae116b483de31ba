"""The crowd of the fault drills: people pressing "claim" as an app would, each a distinct
person, a 5xx (or no answer at all) retried with the same body and `request_id` until the
claim is decided; every 201 is written down with its time.

`press` stops starting new claims once `stop` is set but finishes the ones it started, so
that every voucher in Redis was told to someone (the verifier checks both ways); a claim
still undecided after `settle_s` is counted in `undecided` instead."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp

from issuer.client import Client
from tests.people import claim

RETRY_S = 0.05  # pause before a claim answered 5xx is sent again
SETTLE_S = 30.0  # after `stop`, how long a started claim is retried before it is given up
NO_ANSWER = 599  # the status recorded when the service did not answer at all
DECIDED_GAP_S = 0.25  # a stretch this long without a decided claim counts as unavailable


@dataclass
class Crowd:
    """What the clients saw: every answer with its time, and the vouchers they were told."""

    campaign_id: str
    people: Iterator[int]
    told: dict[str, str] = field(default_factory=dict)  # voucher id -> request id
    told_at: list[float] = field(default_factory=list)  # time.time() of each 201
    # (sent, answered, status, code), times from time.time()
    answers: list[tuple[float, float, int, str]] = field(default_factory=list)
    undecided: int = 0  # claims given up after `stop` without a decision
    sold_out: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def of(cls, campaign_id: str, first_person: int) -> Crowd:
        return cls(campaign_id, itertools.count(first_person))

    def statuses(self) -> Counter[tuple[int, str]]:
        return Counter((status, code) for _, _, status, code in self.answers)

    def unavailable_s(self, start: float, end: float) -> float:
        """Seconds of [start, end] in stretches longer than DECIDED_GAP_S in which no claim
        was decided (answered other than 5xx): the gate had no usable primary."""
        decided = sorted(a for _, a, status, _ in self.answers if status < 500 and start <= a)
        end = min(end, max((a for _, a, _, _ in self.answers), default=end))  # while pressing
        marks = [start, *(t for t in decided if t <= end), end]
        gaps = (b - a for a, b in itertools.pairwise(marks))
        return sum(g for g in gaps if g > DECIDED_GAP_S)

    async def press(self, client: Client, stop: asyncio.Event, settle_s: float = SETTLE_S) -> None:
        """One person after another until `stop`: claim, and on 5xx or no answer send the
        same body again (a fresh signature, the same request_id) until it is decided."""
        path = f"/v1/campaigns/{self.campaign_id}/claims"
        while not stop.is_set():
            body = claim(next(self.people))
            give_up = float("inf")
            while True:
                sent = time.time()
                try:
                    resp = await client.call("POST", path, body)
                    status = resp.status
                    code = "issued" if status == 201 else resp.body["error"]["code"]
                    if status >= 500:  # what the service says failed, e.g. "NotDurable"
                        code += f": {resp.body['error'].get('message', '').rsplit(': ', 1)[-1]}"
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    status, code = NO_ANSWER, "NO_ANSWER"
                self.answers.append((sent, time.time(), status, code))
                if status == 201:
                    self.told[resp.body["voucher_id"]] = body["request_id"]
                    self.told_at.append(time.time())
                if status < 500:
                    break
                if stop.is_set():
                    give_up = min(give_up, time.monotonic() + settle_s)
                    if time.monotonic() > give_up:
                        self.undecided += 1
                        break
                await asyncio.sleep(RETRY_S)
            if code == "ROUND_QUOTA_EXHAUSTED":
                self.sold_out.set()


def crowd_of(
    client: Client, crowd: Crowd, clients: int, stop: asyncio.Event
) -> list[asyncio.Task[None]]:
    """`clients` people pressing at once (tasks; await them after setting `stop`)."""
    return [asyncio.create_task(crowd.press(client, stop)) for _ in range(clients)]
