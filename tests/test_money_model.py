"""Model-based test of the money path: a hypothesis state machine drives the real service
(`issuer serve` on loopback, signed calls) and, in step, a plain-Python model of the money
rules (API.md, PROGRAM.md, the check order of lua/claim_batch.lua, redeem.lua, refund.lua,
clawback_repaid.lua, round_budget.lua). After every step the service must answer exactly
what the model predicts (HTTP status and error code, or the success body's money) and hold
the model's ledger and round, the ledger must balance:
`available + reserved + spent + clawback_due == budget + adjustments`, all >= 0, and so
must the round's: `reserved + spent <= budget + overdrawn`, where `overdrawn` is what the
campaign pool paid of discounts above reservations, less what refunds returned (they repay
it first), and what the round's claims reserved stays within its budget.
At the end of each example the vouchers and redemptions read over HTTP and the rows in
PostgreSQL (once the flusher has drained) must match the model, and reconcile must pass.

Steps: claims (new people; people again, also with a voucher holder's account), payments
(orders below, at and above the one where the cap binds; someone else's voucher, a used or
expired one, an order id already paid, no voucher), refunds (all, part, more than is left,
of a fully refunded order), reimbursement (issuer.redemptions.mark_paid, as settlement
does), clawback repayments, time passing, pause and resume, the round budget
compare-and-set, and any earlier write sent again: with its body (the first answer and
`Idempotent-Replay: true` if it had an effect, else decided again) or with another body
(IDEMPOTENCY_MISMATCH).

Each example gets a fresh campaign (generated budget, voucher terms, round quota and round
budget) with one round open now whose vouchers are valid for two hours: the service's own
clock (Redis TIME) never reaches that, so vouchers expire only when the "time passes" rule
sweeps with a clock past the round's `valid_until` (issuer.expiry.sweep takes the clock).

The service runs one worker: the GET of the campaign after every step reloads that worker's
cached campaign, which drops any locally repeated refusal ("Cheap refusals" in
docs/design/gate.md), so every claim is decided by Redis and the model can be exact.

About half a minute with the defaults; `-s` prints how often each outcome came up. A
longer run (examples per run, at most steps per example):
    ISSUER_MODEL_EXAMPLES=300 ISSUER_MODEL_STEPS=80 \
        .venv/bin/python -m pytest -q tests/test_money_model.py
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from issuer import expiry, keys
from issuer.auth import load_keys
from issuer.client import Client, Response
from issuer.reconcile import reconcile
from issuer.redemptions import mark_paid
from issuer.scripts import Scripts
from tests.conftest import Keyspace, start_service, stop_service, unique_id, wait_drained
from tests.money import fridge
from tests.people import campaign, claim

EXAMPLES = int(os.environ.get("ISSUER_MODEL_EXAMPLES", "60"))
STEPS = int(os.environ.get("ISSUER_MODEL_STEPS", "80"))
PERSONS = itertools.count(900_000)  # this module's persons: 900,000 and up
SEQ = itertools.count(1)
LEDGER_KEYS = ("available_fen", "reserved_fen", "spent_fen", "clawback_due_fen")
T = TypeVar("T")
OUTCOMES: Counter[str] = Counter()  # what the steps ran into, printed at the end


def seq(prefix: str) -> str:
    """A fresh request or order id."""
    return f"{prefix}-{next(SEQ):08d}"


# ---------------------------------------------------------------- the model


def discount(order_fen: int, rate_bp: int, cap_fen: int) -> int:
    """`min(floor(order × rate), cap)` (API.md, PROGRAM.md "Voucher value")."""
    return min(order_fen * rate_bp // 10_000, cap_fen)


def subsidy_returned(discount_fen: int, order_fen: int, before_fen: int, amount_fen: int) -> int:
    """The refunded share of the discount, floored on cumulative amounts (issuer/money.py)."""
    if order_fen == 0:
        return 0
    return discount_fen * (before_fen + amount_fen) // order_fen - (
        discount_fen * before_fen // order_fen
    )


@dataclass
class Config:
    """What an example's campaign is made of."""

    budget_fen: int
    rate_bp: int
    cap_fen: int
    reserve_fen: int | None  # None: the cap
    quota: int | None
    round_budget_fen: int | None

    @property
    def reserve(self) -> int:
        return self.cap_fen if self.reserve_fen is None else self.reserve_fen


@dataclass
class Voucher:
    voucher_id: str
    person: int
    user_id: str
    reserve_fen: int
    status: str = "issued"  # issued | redeemed | expired | refunded
    redemption_id: str | None = None


@dataclass
class Redemption:
    redemption_id: str
    voucher_id: str
    order_id: str
    order_fen: int
    discount_fen: int
    overdrawn_fen: int  # the discount above the voucher's reservation
    refunded_fen: int = 0
    subsidy_returned_fen: int = 0
    paid_to_merchant: bool = False

    @property
    def status(self) -> str:
        if self.refunded_fen == 0:
            return "redeemed"
        return "refunded" if self.refunded_fen == self.order_fen else "partially_refunded"


@dataclass
class Refund:
    refund_id: str
    redemption_id: str
    amount_fen: int
    subsidy_returned_fen: int
    after_reimbursement: bool  # the merchant had been paid a subsidy it now owes back
    repaid: bool = False

    @property
    def clawback_due_fen(self) -> int:
        return self.subsidy_returned_fen if self.after_reimbursement else 0

    @property
    def status(self) -> str:
        if self.repaid:
            return "repaid"
        return "clawback_due" if self.after_reimbursement else "returned"


@dataclass
class Round:
    quota: int | None
    budget_fen: int | None
    issued: int = 0
    reserved_fen: int = 0
    spent_fen: int = 0
    overdrawn_fen: int = 0  # discounts above reservations, from `available`, not repaid

    @property
    def held_fen(self) -> int:
        """What the round's budget holds: reservations and the spending they covered."""
        return self.reserved_fen + self.spent_fen - self.overdrawn_fen


@dataclass
class Write:
    """One write request as sent (kept so that it can be sent again)."""

    kind: str
    method: str
    path: str
    role: str
    body: dict[str, Any]
    person: int = -1  # a claim's person number (the body holds only the ID number)

    @property
    def fingerprint(self) -> str:
        return json.dumps([self.method, self.path, self.body], sort_keys=True)


@dataclass(frozen=True)
class Expect:
    status: int
    code: str | None = None  # error code; None for a success
    voucher_id: str | None = None  # ALREADY_CLAIMED names the voucher held


OK_201, OK_200 = Expect(201), Expect(200)


def refused(code: str, status: int = 409, voucher_id: str | None = None) -> Expect:
    return Expect(status, code, voucher_id)


@dataclass
class Model:
    """The money rules in plain Python: one campaign with one round `r1`. Steps pick
    vouchers, redemptions and refunds by creation order, never by their (random) ids, so
    that hypothesis can replay and shrink a run."""

    cfg: Config
    campaign_id: str
    valid_until_ms: int  # of the round, as Redis holds it
    available: int = field(init=False)
    reserved: int = 0
    spent: int = 0
    clawback_due: int = 0
    paused: bool = False
    round: Round = field(init=False)
    persons: dict[int, str] = field(default_factory=dict)  # person -> voucher id
    accounts: dict[str, str] = field(default_factory=dict)  # user id -> voucher id
    vouchers: dict[str, Voucher] = field(default_factory=dict)
    redemptions: dict[str, Redemption] = field(default_factory=dict)
    orders: list[str] = field(default_factory=list)  # order ids redeemed
    refunds: dict[str, Refund] = field(default_factory=dict)
    # idempotency: (role, request_id) -> (fingerprint, first response); effects only
    idem: dict[tuple[str, str], tuple[str, Response]] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    people: list[int] = field(default_factory=list)  # every person who tried
    clock_ms: int = field(init=False)  # the clock the expiry sweep is given

    def __post_init__(self) -> None:
        self.available = self.cfg.budget_fen
        self.round = Round(self.cfg.quota, self.cfg.round_budget_fen)
        self.clock_ms = self.valid_until_ms

    # -- claims: lua/claim_batch.lua after nonce and idempotency
    def decide_claim(self, person: int, user_id: str) -> Expect:
        r, reserve = self.round, self.cfg.reserve
        if self.paused:
            return refused("CAMPAIGN_PAUSED")
        held = self.persons.get(person) or self.accounts.get(user_id)
        if held:
            return refused("ALREADY_CLAIMED", voucher_id=held)
        if r.quota is not None and r.issued >= r.quota:
            return refused("ROUND_QUOTA_EXHAUSTED")
        if r.budget_fen is not None and r.held_fen + reserve > r.budget_fen:
            return refused("ROUND_BUDGET_EXHAUSTED")
        if self.available < reserve:
            return refused("BUDGET_EXHAUSTED")
        return OK_201

    def issue(self, voucher_id: str, person: int, user_id: str) -> None:
        reserve = self.cfg.reserve
        self.vouchers[voucher_id] = Voucher(voucher_id, person, user_id, reserve)
        self.persons[person] = self.accounts[user_id] = voucher_id
        self.available -= reserve
        self.reserved += reserve
        self.round.issued += 1
        self.round.reserved_fen += reserve

    # -- redemptions: issuer/redemptions.py then lua/redeem.lua after idempotency
    def decide_redeem(self, voucher_id: str, user_id: str, order_id: str, order_fen: int) -> Expect:
        v = self.vouchers.get(voucher_id)
        if v is None:
            return refused("NOT_FOUND", 404)
        if v.user_id != user_id:
            return refused("VOUCHER_NOT_OWNED")
        if v.status == "expired":
            return refused("VOUCHER_EXPIRED")
        if v.status != "issued":
            return refused("VOUCHER_USED")
        if order_id in self.orders:
            return refused("ORDER_ALREADY_REDEEMED")
        d = discount(order_fen, self.cfg.rate_bp, self.cfg.cap_fen)
        if d > v.reserve_fen and self.available < d - v.reserve_fen:
            return refused("BUDGET_EXHAUSTED")
        return OK_201

    def redeem(self, redemption_id: str, voucher_id: str, order_id: str, order_fen: int) -> None:
        v = self.vouchers[voucher_id]
        d = discount(order_fen, self.cfg.rate_bp, self.cfg.cap_fen)
        over = max(0, d - v.reserve_fen)  # from `available`, whatever the round budget
        self.redemptions[redemption_id] = Redemption(
            redemption_id, voucher_id, order_id, order_fen, d, over
        )
        self.orders.append(order_id)
        v.status, v.redemption_id = "redeemed", redemption_id
        self.reserved -= v.reserve_fen
        self.spent += d
        self.available += v.reserve_fen - d
        self.round.reserved_fen -= v.reserve_fen
        self.round.spent_fen += d
        self.round.overdrawn_fen += over
        OUTCOMES["redeem: overdrew the round"] += over > 0

    # -- refunds: lua/refund.lua after idempotency
    def decide_refund(self, redemption_id: str, amount_fen: int) -> Expect:
        r = self.redemptions[redemption_id]
        if r.refunded_fen >= r.order_fen:
            return refused("ALREADY_REFUNDED")
        if amount_fen > r.order_fen - r.refunded_fen:
            return refused("INVALID_REQUEST", 400)
        return OK_201

    def refund(self, refund_id: str, redemption_id: str, amount_fen: int) -> Refund:
        r = self.redemptions[redemption_id]
        returned = subsidy_returned(r.discount_fen, r.order_fen, r.refunded_fen, amount_fen)
        owed = r.paid_to_merchant and returned > 0  # a share that floors to 0 is owed by nobody
        f = Refund(refund_id, redemption_id, amount_fen, returned, owed)
        self.refunds[refund_id] = f
        # the returned subsidy repays the redemption's overdraw first
        repaid = min(returned, max(0, r.overdrawn_fen - r.subsidy_returned_fen))
        self.round.overdrawn_fen -= repaid
        OUTCOMES["refund: repaid an overdraw"] += repaid > 0
        r.refunded_fen += amount_fen
        r.subsidy_returned_fen += returned
        self.spent -= returned
        self.round.spent_fen -= returned
        if f.after_reimbursement:
            self.clawback_due += returned
        else:
            self.available += returned
        if r.status == "refunded":
            self.vouchers[r.voucher_id].status = "refunded"
        return f

    # -- reimbursement (lua/mark_paid.lua) and clawbacks (lua/clawback_repaid.lua)
    def mark_paid(self, redemption_ids: list[str]) -> list[str]:
        marked = []
        for rid in redemption_ids:
            r = self.redemptions[rid]
            if not r.paid_to_merchant and r.status != "refunded":
                r.paid_to_merchant = True
                marked.append(rid)
        return marked

    def decide_repaid(self, refund_id: str) -> Expect:
        f = self.refunds[refund_id]
        if f.repaid:
            return refused("ALREADY_REPAID")
        if not f.after_reimbursement:
            return refused("NO_CLAWBACK_DUE")
        return OK_200

    def repaid(self, refund_id: str) -> None:
        f = self.refunds[refund_id]
        f.repaid = True
        self.clawback_due -= f.clawback_due_fen
        self.available += f.clawback_due_fen

    # -- time passes past valid_until: lua/expire.lua for every issued voucher
    def expire_all(self) -> int:
        due = [v for v in self.vouchers.values() if v.status == "issued"]
        for v in due:
            v.status = "expired"
            self.reserved -= v.reserve_fen
            self.available += v.reserve_fen
            self.round.reserved_fen -= v.reserve_fen
        return len(due)

    # -- round budget compare-and-set: lua/round_budget.lua after idempotency
    def decide_round_budget(self, expected: int | None, budget: int, quota: int | None) -> Expect:
        r = self.round
        new_quota = r.quota if quota is None else quota
        if (
            expected != r.budget_fen
            or budget < r.held_fen
            or (new_quota is not None and new_quota < r.issued)
        ):
            return refused("BUDGET_CONFLICT")
        return OK_200

    def issued(self) -> list[str]:
        return [v.voucher_id for v in self.vouchers.values() if v.status == "issued"]

    def ledger(self) -> dict[str, int]:
        return {
            "budget_fen": self.cfg.budget_fen,
            "adjustments_fen": 0,
            "available_fen": self.available,
            "reserved_fen": self.reserved,
            "spent_fen": self.spent,
            "clawback_due_fen": self.clawback_due,
        }


# ---------------------------------------------------------------- the service


class Harness:
    """`issuer serve` (one worker) and the clients a step needs, on a private event loop."""

    def __init__(self, keyspace: Keyspace, data_dir: Path) -> None:
        self.keyspace = keyspace
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.proc: subprocess.Popen[str] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.redis: Redis | None = None
        self.pool: asyncpg.Pool | None = None

    def start(self) -> None:
        self.proc, self.url = start_service(self.keyspace, self.data_dir, workers=1)
        self.run(self._connect())
        assert self.session is not None and self.redis is not None
        self.scripts = Scripts(self.redis)
        self.clients = {
            k.role: Client(self.url, k, self.session)
            for k in sorted(load_keys(self.data_dir / "keys.toml").values(), key=lambda k: k.id)
        }
        body = {"name": "乡宁家电城", "county_code": "141029", "categories": ["appliance"]}
        self.merchant = unique_id("m")
        resp = self.call("PUT", f"/v1/merchants/{self.merchant}", body)
        assert resp.status == 201, resp.body

    async def _connect(self) -> None:
        # created inside the private loop: each binds to the loop it is made in
        self.session = aiohttp.ClientSession()
        self.redis = Redis.from_url(self.keyspace.redis_url)
        self.pool = await asyncpg.create_pool(self.keyspace.database_url, min_size=1, max_size=2)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def call(self, method: str, path: str, payload: Any = None, role: str = "ops") -> Response:
        return self.run(self.clients[role].call(method, path, payload))

    async def drained(self) -> None:
        assert self.session is not None
        await wait_drained(self.session, self.url)

    async def _disconnect(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.pool is not None:
            await self.pool.close()

    def close(self) -> None:
        try:
            self.run(self._disconnect())
        finally:
            self.loop.close()
            if self.proc is not None:
                stop_service(self.proc)


def order_amounts(cfg: Config) -> st.SearchStrategy[int]:
    """Orders below, at and above the one where the cap starts to bind."""
    edge = -(-cfg.cap_fen * 10_000 // cfg.rate_bp)
    share = st.sampled_from([1, 10, 33, 50, 80, 99, 120, 200, 300])  # % of the edge
    return st.one_of(
        st.builds(lambda pct, jitter: edge * pct // 100 + jitter, share, st.integers(0, 999)),
        st.sampled_from([0, 1, edge - 1, edge, edge + 1]),
    )


@st.composite
def configs(draw: st.DrawFn) -> Config:
    """A campaign's money: with a reservation below the cap, budgets are kept small so that
    a discount above the reservation sometimes finds `available` short."""
    cap = draw(st.sampled_from([997, 20_000, 200_000]))
    reserve = draw(st.sampled_from([None, 0, cap // 3, cap]))
    caps = [1, 2, 3, 5, 8, 15, 0] if reserve in (None, cap) else [1, 2, 0, 1, 0, 3, 8]
    some_money = st.builds(
        lambda k, extra: k * cap + extra, st.sampled_from(caps), st.sampled_from([0, 1, cap // 2])
    )
    return Config(
        budget_fen=draw(some_money),
        rate_bp=draw(st.sampled_from([500, 1000, 3333, 10_000])),
        cap_fen=cap,
        reserve_fen=reserve,
        quota=draw(st.sampled_from([None, 1, 2, 3, 5, 8, 12, 0])),
        round_budget_fen=draw(st.none() | some_money),
    )


def pick_by_kind(data: st.DataObject, writes: list[Write]) -> Write:
    """One of `writes`, its kind first (else the many pauses and resumes would dominate)."""
    kinds = list(dict.fromkeys(w.kind for w in writes))
    kind = data.draw(st.sampled_from(kinds), "kind")
    return data.draw(st.sampled_from([w for w in writes if w.kind == kind]), "write")


class MoneyMachine(RuleBasedStateMachine):
    """Steps against the service and the model; each step checks they agree."""

    def __init__(self, harness: Harness) -> None:
        super().__init__()
        self.h = harness
        self.m: Model
        self.kind = ""  # of the write being checked

    # ------------------------------------------------------------ plumbing

    def send(self, w: Write) -> Response | None:
        """Send a write. A request_id the model holds an effect for must be answered with
        the first response (same body) or IDEMPOTENCY_MISMATCH: None is returned then."""
        resp = self.h.call(w.method, w.path, w.body, w.role)
        prior = self.m.idem.get((w.role, w.body["request_id"]))
        if prior is None:
            assert "Idempotent-Replay" not in resp.headers, (w, resp)
            return resp
        fp, first = prior
        if fp == w.fingerprint:
            OUTCOMES[f"{w.kind}: replayed"] += 1
            assert resp.headers.get("Idempotent-Replay") == "true", (w, resp)
            assert (resp.status, resp.body) == (first.status, first.body), (w, first, resp)
        else:
            self.expect(resp, refused("IDEMPOTENCY_MISMATCH", 422))
        return None

    def expect(self, resp: Response, exp: Expect) -> bool:
        """The answer is the expected one; True if it is a success."""
        OUTCOMES[f"{self.kind}: {exp.code or exp.status}"] += 1
        if exp.code is None:
            assert resp.status == exp.status, (exp, resp)
            return True
        assert resp.status == exp.status, (exp, resp)
        assert resp.body["error"]["code"] == exp.code, (exp, resp)
        if exp.voucher_id is not None:
            assert resp.body["voucher_id"] == exp.voucher_id, (exp, resp)
        return False

    def effect(self, w: Write, resp: Response) -> None:
        self.m.idem[(w.role, w.body["request_id"])] = (w.fingerprint, resp)

    def write(self, w: Write) -> None:
        """Send `w` and check it against the model."""
        self.m.writes.append(w)
        self.kind = w.kind
        getattr(self, f"_{w.kind}")(w)

    # ------------------------------------------------------------ one campaign per example

    @initialize(cfg=configs(), claims=st.integers(1, 6), payments=st.integers(0, 2), data=st.data())
    def create_campaign(self, cfg: Config, claims: int, payments: int, data: st.DataObject) -> None:
        """A new campaign, its first claims and payments (hypothesis's swarm testing turns
        some rules off for a whole example: without these, often nothing would happen)."""
        body = campaign(
            quota=cfg.quota,
            budget_fen=cfg.budget_fen,
            round_budget_fen=cfg.round_budget_fen,
            reserve_fen=cfg.reserve_fen,
        )
        body["voucher"].update(discount_rate_bp=cfg.rate_bp, cap_fen=cfg.cap_fen)
        campaign_id = unique_id()
        resp = self.h.call("PUT", f"/v1/campaigns/{campaign_id}", body)
        assert resp.status == 201, resp.body
        ck = keys.CampaignKeys(campaign_id)
        valid_until = int(self.h.run(self.h.redis.hget(ck.round("r1"), "valid_until")))
        assert valid_until > (datetime.now(UTC) + timedelta(minutes=30)).timestamp() * 1000
        self.m = Model(cfg, campaign_id, valid_until)
        self.claim_new_people(claims)
        for _ in range(payments):
            if self.m.issued():
                self.redeem(data)

    # ------------------------------------------------------------ claims

    def claim_write(self, person: int, user_id: str) -> Write:
        body = claim(person, user=user_id, request_id=seq("claim"))
        path = f"/v1/campaigns/{self.m.campaign_id}/claims"
        return Write("claim", "POST", path, "app", body, person)

    def _claim(self, w: Write) -> None:
        resp = self.send(w)
        if resp is None:
            return
        person, user_id = w.person, w.body["user_id"]
        if self.expect(resp, self.m.decide_claim(person, user_id)):
            b = resp.body
            assert b["status"] == "issued" and b["user_id"] == user_id, b
            assert (b["campaign_id"], b["round_id"]) == (self.m.campaign_id, "r1"), b
            terms = (self.m.cfg.rate_bp, self.m.cfg.cap_fen)
            assert (b["discount_rate_bp"], b["cap_fen"]) == terms, b
            expires = round(datetime.fromisoformat(b["expires_at"]).timestamp() * 1000)
            assert expires == self.m.valid_until_ms, b
            self.m.issue(b["voucher_id"], person, user_id)
            self.effect(w, resp)

    @rule(n=st.integers(1, 3))
    def claim_new_people(self, n: int) -> None:
        """People who never tried claim, one after the other, each with their own account."""
        for _ in range(n):
            person = next(PERSONS)
            self.m.people.append(person)
            self.write(self.claim_write(person, f"u{person}"))

    @precondition(lambda self: self.m.people)
    @rule(data=st.data())
    def claim_again(self, data: st.DataObject) -> None:
        """A person who tried before (or a newcomer) claims, with their own account or with
        the account of someone who holds a voucher."""
        people = self.m.people
        person = data.draw(st.sampled_from(people) | st.builds(lambda: next(PERSONS)), "person")
        if person not in people:
            people.append(person)
        holders = list(self.m.accounts)
        user_id = f"u{person}"
        if holders and data.draw(st.booleans(), "borrowed account"):
            user_id = data.draw(st.sampled_from(holders), "account")
        self.write(self.claim_write(person, user_id))

    # ------------------------------------------------------------ redemptions

    def redeem_write(self, voucher_id: str, user_id: str, order_id: str, order_fen: int) -> Write:
        body = {
            "request_id": seq("pay"),
            "voucher_id": voucher_id,
            "user_id": user_id,
            "merchant_id": self.h.merchant,
            "order_id": order_id,
            "order_amount_fen": order_fen,
            "paid_at": datetime.now(UTC).isoformat(),
            "items": [fridge(order_fen)],
        }
        return Write("redeem", "POST", "/v1/redemptions", "payment", body)

    def _redeem(self, w: Write) -> None:
        resp = self.send(w)
        if resp is None:
            return
        b = w.body
        vid, order_id, order_fen = b["voucher_id"], b["order_id"], b["order_amount_fen"]
        if self.expect(resp, self.m.decide_redeem(vid, b["user_id"], order_id, order_fen)):
            out = resp.body
            d = discount(order_fen, self.m.cfg.rate_bp, self.m.cfg.cap_fen)
            assert (out["discount_fen"], out["payable_fen"]) == (d, order_fen - d), (b, out)
            assert (out["voucher_id"], out["order_id"], out["status"]) == (
                vid,
                order_id,
                "redeemed",
            ), out
            assert out["refunded_fen"] == out["subsidy_returned_fen"] == 0, out
            assert out["paid_to_merchant"] is False, out
            self.m.redeem(out["redemption_id"], vid, order_id, order_fen)
            self.effect(w, resp)

    @precondition(lambda self: self.m.issued())
    @rule(data=st.data())
    def redeem(self, data: st.DataObject) -> None:
        """The owner pays with an issued voucher for an order of some amount (sometimes with
        the id of an order already paid with a voucher)."""
        v = self.m.vouchers[data.draw(st.sampled_from(self.m.issued()), "voucher")]
        order_id = seq("order")
        if self.m.orders and data.draw(st.sampled_from([False, False, True]), "order paid"):
            order_id = data.draw(st.sampled_from(self.m.orders), "order")
        order_fen = data.draw(order_amounts(self.m.cfg), "order_amount_fen")
        self.write(self.redeem_write(v.voucher_id, v.user_id, order_id, order_fen))

    @precondition(lambda self: self.m.vouchers)
    @rule(data=st.data())
    def redeem_wrongly(self, data: st.DataObject) -> None:
        """Any voucher (used, expired or issued) by its owner, by someone else or by another
        holder, or a voucher that does not exist."""
        how = data.draw(st.sampled_from(["any", "stranger", "holder", "unknown"]), "how")
        v = self.m.vouchers[data.draw(st.sampled_from(list(self.m.vouchers)), "voucher")]
        vid, user_id, order_id = v.voucher_id, v.user_id, seq("order")
        if how == "stranger":
            user_id = f"stranger-{next(SEQ)}"
        elif how == "holder":
            user_id = data.draw(st.sampled_from(list(self.m.accounts)), "user")
        elif how == "unknown":
            vid = f"{self.m.campaign_id}.{'0' * 20}"
        order_fen = data.draw(order_amounts(self.m.cfg), "order_amount_fen")
        self.write(self.redeem_write(vid, user_id, order_id, order_fen))

    # ------------------------------------------------------------ refunds

    def _refund(self, w: Write) -> None:
        resp = self.send(w)
        if resp is None:
            return
        rid, amount = w.path.split("/")[3], w.body["amount_fen"]
        if self.expect(resp, self.m.decide_refund(rid, amount)):
            f = self.m.refund(resp.body["refund_id"], rid, amount)
            got = {k: resp.body[k] for k in ("redemption_id", "amount_fen", "status")}
            assert got == {"redemption_id": rid, "amount_fen": amount, "status": f.status}, (
                f,
                resp.body,
            )
            assert resp.body["subsidy_returned_fen"] == f.subsidy_returned_fen, (f, resp.body)
            assert resp.body["clawback_due_fen"] == f.clawback_due_fen, (f, resp.body)
            self.effect(w, resp)

    @precondition(lambda self: self.m.redemptions)
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        """Refund all that is left, part of it, or more than is left."""
        open_ = [r for r in self.m.redemptions.values() if r.status != "refunded"]
        pools = {
            "any": list(self.m.redemptions.values()),
            "open": open_,
            "reimbursed": [r for r in open_ if r.paid_to_merchant],
        }
        which = data.draw(st.sampled_from(["reimbursed", "open", "any"]), "which")
        r = data.draw(st.sampled_from(pools[which] or pools["open"] or pools["any"]), "redemption")
        left = r.order_fen - r.refunded_fen
        amount = data.draw(
            st.one_of(
                st.just(max(left, 1)),
                st.integers(1, max(left, 1)),
                st.integers(left + 1, left + 1000),
            ),
            "amount_fen",
        )
        body = {"request_id": seq("refund"), "amount_fen": amount, "reason": "退货"}
        path = f"/v1/redemptions/{r.redemption_id}/refunds"
        self.write(Write("refund", "POST", path, "payment", body))

    # ------------------------------------------------------------ reimbursement, clawbacks

    @precondition(lambda self: self.m.redemptions)
    @rule(data=st.data())
    def reimburse(self, data: st.DataObject) -> None:
        """Settlement paid the merchants of some redemptions (issuer.redemptions.mark_paid)."""
        unpaid = [
            r.redemption_id
            for r in self.m.redemptions.values()
            if not r.paid_to_merchant and r.status != "refunded"
        ]
        pool = unpaid if unpaid and data.draw(st.booleans(), "unpaid") else None
        ids = data.draw(
            st.lists(st.sampled_from(pool or list(self.m.redemptions)), min_size=1, unique=True),
            "ids",
        )
        batch = seq("batch")
        marked = self.h.run(mark_paid(self.h.scripts, self.m.campaign_id, batch, ids))
        expected = self.m.mark_paid(ids)
        assert marked == expected, (ids, marked, expected)
        OUTCOMES["reimburse: some marked" if marked else "reimburse: none marked"] += 1

    def _repaid(self, w: Write) -> None:
        resp = self.send(w)
        if resp is None:
            return
        refund_id = w.path.split("/")[3]
        if self.expect(resp, self.m.decide_repaid(refund_id)):
            self.m.repaid(refund_id)
            f = self.m.refunds[refund_id]
            assert resp.body["status"] == "repaid", resp.body
            assert resp.body["clawback_due_fen"] == f.clawback_due_fen, (f, resp.body)
            self.effect(w, resp)

    @precondition(lambda self: self.m.refunds)
    @rule(data=st.data())
    def clawback_repaid(self, data: st.DataObject) -> None:
        """The auditor records that a merchant paid a refund's subsidy back."""
        due = [f.refund_id for f in self.m.refunds.values() if f.status == "clawback_due"]
        pool = due if due and data.draw(st.booleans(), "due") else list(self.m.refunds)
        refund_id = data.draw(st.sampled_from(pool), "refund_id")
        body = {"request_id": seq("repaid"), "reason": "商户已退回"}
        self.write(Write("repaid", "POST", f"/v1/clawbacks/{refund_id}/repaid", "auditor", body))

    # ------------------------------------------------------------ time passes

    @precondition(lambda self: self.m.issued())
    @rule()
    def time_passes(self) -> None:
        """The clock moves past the round's valid_until: every issued voucher expires."""
        self.m.clock_ms += 1_000
        n = self.h.run(
            expiry.sweep(self.h.redis, self.h.scripts, self.m.campaign_id, self.m.clock_ms)
        )
        assert n == self.m.expire_all()
        OUTCOMES["time passes: vouchers expired"] += 1

    # ------------------------------------------------------------ ops

    def _status(self, w: Write) -> None:
        resp = self.send(w)
        if resp is None:
            return
        assert self.expect(resp, OK_200)
        status = "paused" if w.path.endswith("/pause") else "active"
        assert resp.body == {"campaign_id": self.m.campaign_id, "status": status}, resp.body
        self.m.paused = status == "paused"
        self.effect(w, resp)

    def status_write(self, action: str) -> Write:
        body = {"request_id": seq("status"), "reason": "演练"}
        return Write("status", "POST", f"/v1/campaigns/{self.m.campaign_id}/{action}", "ops", body)

    @precondition(lambda self: not self.m.paused and self.m.vouchers)
    @rule()
    def pause(self) -> None:
        """Ops pause the campaign, once something was issued (pausing a paused campaign
        again is left to the replays)."""
        self.write(self.status_write("pause"))

    @precondition(lambda self: self.m.paused)
    @rule()
    def resume(self) -> None:
        """Ops resume it."""
        self.write(self.status_write("resume"))

    def _round_budget(self, w: Write) -> None:
        resp = self.send(w)
        if resp is None:
            return
        b, r = w.body, self.m.round
        if self.expect(
            resp,
            self.m.decide_round_budget(b["expected_budget_fen"], b["budget_fen"], b.get("quota")),
        ):
            r.budget_fen = b["budget_fen"]
            r.quota = r.quota if b.get("quota") is None else b["quota"]
            assert resp.body == {
                "campaign_id": self.m.campaign_id,
                "round_id": "r1",
                "budget_fen": r.budget_fen,
                "quota": r.quota,
                "issued": r.issued,
                "reserved_fen": r.reserved_fen,
            }, resp.body
            self.effect(w, resp)

    @precondition(lambda self: self.m.people)
    @rule(data=st.data())
    def round_budget(self, data: st.DataObject) -> None:
        """Compare-and-set the round's budget (and maybe quota): current or stale expected,
        a budget above or below what the round holds, a quota above or below issued."""
        r, cap = self.m.round, self.m.cfg.cap_fen
        held = r.held_fen
        expected = data.draw(
            st.sampled_from([r.budget_fen, r.budget_fen, None, (r.budget_fen or 0) + 1]),
            "expected",
        )
        budget = data.draw(st.integers(held, held + 6 * cap) | st.integers(0, held), "budget")
        quota = data.draw(
            st.none() | st.integers(r.issued, r.issued + 5) | st.integers(0, r.issued), "quota"
        )
        body: dict[str, Any] = {
            "request_id": seq("budget"),
            "expected_budget_fen": expected,
            "budget_fen": budget,
        }
        if quota is not None:
            body["quota"] = quota
        path = f"/v1/campaigns/{self.m.campaign_id}/rounds/r1/budget"
        self.write(Write("round_budget", "POST", path, "ops", body))

    # ------------------------------------------------------------ the same request again

    @precondition(lambda self: self.m.writes)
    @rule(data=st.data())
    def send_again(self, data: st.DataObject) -> None:
        """A write repeated with its request_id and body: its first answer if it had an
        effect, else decided again."""
        self.write(pick_by_kind(data, self.m.writes))

    @precondition(lambda self: self.m.idem)
    @rule(data=st.data())
    def reuse_request_id(self, data: st.DataObject) -> None:
        """A request_id that had an effect, with another body: IDEMPOTENCY_MISMATCH."""
        w = pick_by_kind(
            data, [w for w in self.m.writes if (w.role, w.body["request_id"]) in self.m.idem]
        )
        body = dict(w.body)
        if w.kind == "claim":
            body["device_id"] = f"device-{next(SEQ)}"
        elif w.kind == "redeem":
            body["paid_at"] = (datetime.now(UTC) - timedelta(seconds=next(SEQ))).isoformat()
        elif w.kind == "round_budget":
            body["budget_fen"] += 1
        else:
            body["reason"] = f"{body.get('reason', '')}!"
        self.write(Write(w.kind, w.method, w.path, w.role, body, w.person))

    # ------------------------------------------------------------ after every step

    @invariant()
    def service_holds_the_model_ledger(self) -> None:
        resp = self.h.call("GET", f"/v1/campaigns/{self.m.campaign_id}")
        assert resp.status == 200, resp.body
        led = resp.body["ledger"]
        assert sum(led[k] for k in LEDGER_KEYS) == led["budget_fen"] + led["adjustments_fen"], led
        assert min(led[k] for k in LEDGER_KEYS) >= 0, led
        assert led == self.m.ledger(), (led, self.m.ledger())
        assert resp.body["status"] == ("paused" if self.m.paused else "active"), resp.body
        got = resp.body["current_round"]
        r = self.m.round
        assert (got["round_id"], got["issued"], got.get("quota")) == ("r1", r.issued, r.quota), got
        money = ("reserved_fen", "spent_fen", "overdrawn_fen")
        assert (*(got[k] for k in money), got.get("budget_fen")) == (
            r.reserved_fen,
            r.spent_fen,
            r.overdrawn_fen,
            r.budget_fen,
        ), (got, r)
        if r.quota is not None:
            assert r.issued <= r.quota
        assert 0 <= r.overdrawn_fen <= r.spent_fen, r
        if r.budget_fen is not None:
            # the round ledger: its claims' reservations (held, or spent) within the budget;
            # a discount above the reservation came from the campaign pool (overdrawn)
            assert r.held_fen <= r.budget_fen, r
            assert r.reserved_fen + r.spent_fen <= r.budget_fen + r.overdrawn_fen, r

    # ------------------------------------------------------------ at the end of an example

    def teardown(self) -> None:
        # hypothesis calls teardown from a `finally`: after a failed step, only report that
        if sys.exc_info()[0] is not None or not hasattr(self, "m"):
            return
        OUTCOMES["examples"] += 1
        OUTCOMES["examples: no voucher issued"] += not self.m.vouchers
        OUTCOMES["examples: no payment"] += not self.m.redemptions
        for v in self.m.vouchers.values():
            got = self.h.call("GET", f"/v1/vouchers/{v.voucher_id}", role="payment").body
            assert (got["status"], got.get("redemption_id")) == (v.status, v.redemption_id), (
                v,
                got,
            )
        for r in self.m.redemptions.values():
            got = self.h.call("GET", f"/v1/redemptions/{r.redemption_id}", role="auditor").body
            assert (
                got["status"],
                got["discount_fen"],
                got["refunded_fen"],
                got["subsidy_returned_fen"],
                got["paid_to_merchant"],
            ) == (
                r.status,
                r.discount_fen,
                r.refunded_fen,
                r.subsidy_returned_fen,
                r.paid_to_merchant,
            ), (r, got)
        self.h.run(self.h.drained())
        self.h.run(self.compare_postgres())

    async def compare_postgres(self) -> None:
        pool, cid = self.h.pool, self.m.campaign_id
        assert pool is not None
        rows = await pool.fetch(
            "SELECT voucher_id, status, redemption_id FROM vouchers WHERE campaign_id = $1", cid
        )
        assert {r["voucher_id"]: (r["status"], r["redemption_id"]) for r in rows} == {
            v.voucher_id: (v.status, v.redemption_id) for v in self.m.vouchers.values()
        }
        rows = await pool.fetch(
            "SELECT redemption_id, voucher_id, order_amount_fen, discount_fen, overdrawn_fen,"
            " refunded_fen, subsidy_returned_fen, paid_to_merchant_at IS NOT NULL AS paid"
            " FROM redemptions WHERE campaign_id = $1",
            cid,
        )
        assert {r["redemption_id"]: tuple(r.values())[1:] for r in rows} == {
            r.redemption_id: (
                r.voucher_id,
                r.order_fen,
                r.discount_fen,
                r.overdrawn_fen,
                r.refunded_fen,
                r.subsidy_returned_fen,
                r.paid_to_merchant,
            )
            for r in self.m.redemptions.values()
        }
        rows = await pool.fetch(
            "SELECT refund_id, redemption_id, amount_fen, subsidy_returned_fen, clawback_due_fen,"
            " repaid_at IS NOT NULL AS repaid FROM refunds WHERE campaign_id = $1",
            cid,
        )
        assert {r["refund_id"]: tuple(r.values())[1:] for r in rows} == {
            f.refund_id: (
                f.redemption_id,
                f.amount_fen,
                f.subsidy_returned_fen,
                f.clawback_due_fen,
                f.repaid,
            )
            for f in self.m.refunds.values()
        }
        report = await reconcile(self.h.redis, pool, cid)
        assert report.ok, report.problems


def test_money_path_agrees_with_the_model(keyspace: Keyspace, workdir: Path) -> None:
    harness = Harness(keyspace, workdir / f"data-{keyspace.name}")
    try:
        harness.start()
        run_state_machine_as_test(
            lambda: MoneyMachine(harness),
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        harness.close()
        print("\noutcomes:", *(f"{n:6d}  {k}" for k, n in sorted(OUTCOMES.items())), sep="\n")
