"""The scripts on fakeredis with Lua, for the fast tier: no server is started.

A campaign is set up by its own script (campaign_put) and claims go through the claim
path's batch builder (claims.Batcher), so these tests check what Python sends as much as
what each script decides. Times are relative to now: fakeredis answers TIME from the clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import chain
from types import SimpleNamespace
from typing import Any

from issuer import keys
from issuer.claims import Batcher, NonceSpender
from issuer.events import decoded_events
from issuer.model import RateLimits
from issuer.protocol import CampaignPut, Claim, Request, RoundSettings, SpentNonce
from issuer.scripts import Scripts

CAMPAIGN = "c-fake"
CK = keys.CampaignKeys(CAMPAIGN)
RESERVE = 200_000  # fen reserved per voucher
BUDGET = 1_000_000  # fen: five vouchers
# the campaign's fields a record starts with, as the batcher encodes them from the terms
# below (its `record_head` is this less its "}")
EXTRA = '{"campaign_id":"c-fake","discount_rate_bp":1500,"cap_fen":200000}'
# the claims' nonce bucket, one for the session: a test that sends a nonce twice must not
# see it land in two buckets because a bucket's ten minutes ended in between
NONCE_BUCKET = keys.nonce_bucket(int(time.time()))


def ms(in_s: float) -> int:
    """Epoch ms `in_s` seconds from now."""
    return int((time.time() + in_s) * 1000)


def settings(
    opens_in_s: float = -60,
    closes_in_s: float = 3600,
    *,
    quota: int = -1,
    budget: int = -1,
    applications_close_in_s: float | None = None,
    valid_for_s: float = 86_400,
) -> RoundSettings:
    """A round that opened a minute ago and closes in an hour, unless told otherwise."""
    close = applications_close_in_s
    return RoundSettings(
        opens=ms(opens_in_s),
        closes=ms(closes_in_s),
        valid_until=ms(valid_for_s),
        quota=quota,
        budget=budget,
        apps_close=-1 if close is None else ms(close),
    )


def claim(n: int, **fields: Any) -> Claim:
    """Claim number `n`: its own request, nonce, person, account and voucher id."""
    made = Claim(
        idem_field=f"k-app|req-{n}",
        fingerprint=f"fp-{n}",
        nonce_bucket=NONCE_BUCKET,
        nonce=f"nonce-{n:016d}",
        person_ref=f"person-{n}",
        user_id=f"user-{n}",
        candidate=f"{CAMPAIGN}.v{n:019d}",
        extra="",  # none of its own
        device_id="",
        client_ip="",
    )
    return made._replace(**fields)


def request(n: int, fingerprint: str = "fp", now_s: float | None = None) -> Request:
    """Request number `n` of an idempotent write, with this body fingerprint."""
    current, previous = CK.idempotency(time.time() if now_s is None else now_s)
    return Request(
        idem_current=current,
        idem_previous=previous,
        idem_field=f"k-ops|req-{n}",
        fingerprint=fingerprint,
    )


def decoded(mapping: dict[bytes, bytes]) -> dict[str, Any]:
    """A hash read from Redis: numbers as int, the rest as str."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        text = v.decode()
        out[k.decode()] = int(text) if text.lstrip("-").isdigit() else text
    return out


@dataclass
class Fake:
    """A fresh fakeredis and the scripts registered on it."""

    redis: Any
    scripts: Scripts

    async def put_campaign(
        self, *rounds: RoundSettings, budget_fen: int = BUDGET, expected_version: str = ""
    ) -> list[bytes]:
        """Create (or replace) the campaign with rounds r1, r2, ... as given."""
        ids = [f"r{i + 1}" for i in range(len(rounds))]
        old = [k.decode() for k in await self.redis.keys(f"{CK.tag}:round:*")]
        put = CampaignPut(
            definition=CK.definition,
            ledger=CK.ledger,
            events=CK.events,
            new_rounds=[CK.round(r) for r in ids],
            old_rounds=old,
            stored_campaign=b'{"campaign_id":"c-fake"}',
            budget_fen=budget_fen,
            expected_version=expected_version,
            rounds=list(rounds),
        )
        answer: list[bytes] = await self.scripts.run(put)
        return answer

    async def claim(
        self,
        *claims: Claim,
        round_id: str = "r1",
        mode: str = "self",
        allocation: str = "first_come",
        lottery: bool = False,
        limits: RateLimits | None = None,
    ) -> list[tuple[str, bytes]]:
        """Send `claims` as one batch, as the claim path does; (code, payload) of each."""
        definition = SimpleNamespace(
            voucher=SimpleNamespace(reserve=RESERVE, discount_rate_bp=1500, cap_fen=200_000),
            mode=mode,
            rate_limits=limits or RateLimits(),
        )
        # stand-ins for what the batcher reads of the claim path's objects
        cached: Any = SimpleNamespace(keys=CK, definition=definition, lottery=lottery)
        rnd: Any = SimpleNamespace(round_id=round_id, allocation=allocation)
        owner: Any = SimpleNamespace(
            scripts=self.scripts, batch_max=len(claims), after_batch=lambda *_: None
        )
        codes, payloads = await Batcher(owner, cached, rnd).run(list(claims))
        return [(code.decode(), payload) for code, payload in zip(codes, payloads, strict=True)]

    async def claimed(self, *claims: Claim, **batch: Any) -> list[str]:
        """The codes that `claim` answers."""
        return [code for code, _ in await self.claim(*claims, **batch)]

    async def spend(self, *nonces: SpentNonce) -> list[bool]:
        """Spend nonces refused before the gate, as the claim path does."""
        spender = NonceSpender(self.scripts, len(nonces))
        answers = await spender.spend(CAMPAIGN, list(chain.from_iterable(nonces)))
        return [answer == 1 for answer in answers]

    async def ledger(self) -> dict[str, Any]:
        return decoded(await self.redis.hgetall(CK.ledger))

    async def round(self, round_id: str = "r1") -> dict[str, Any]:
        return decoded(await self.redis.hgetall(CK.round(round_id)))

    async def balanced(self) -> dict[str, Any]:
        """The ledger, once checked: its four parts add up to the budget, none below 0."""
        led = await self.ledger()
        parts = [led[k] for k in ("available", "reserved", "spent", "clawback_due")]
        assert min(parts) >= 0 and sum(parts) == led["budget"] + led["adjustments"], led
        return led

    async def events(self) -> list[str]:
        """The types of the campaign's events, in order (each of a gathered entry's)."""
        entries = await self.redis.xrange(CK.events)
        return [kind for _, fields in entries for kind, _ in decoded_events(fields)]
