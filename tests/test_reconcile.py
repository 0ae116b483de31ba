"""`issuer.reconcile`: Redis (the gate) against PostgreSQL (the record), in-process and
through `issuer reconcile`. Each drift is made, detected by name, then undone."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from issuer import expiry, keys, merchants, store
from issuer.auth import ApiKey, Verified
from issuer.campaigns import Campaigns
from issuer.claims import Claims
from issuer.errors import ApiError
from issuer.flusher import Flusher
from issuer.model import CampaignDef, ClaimIn, MerchantDef, RedemptionIn, RefundIn, RepaidIn
from issuer.reconcile import Report, reconcile
from issuer.redemptions import Redemptions, mark_paid
from issuer.scripts import Scripts
from issuer.vouchers import VOUCHER
from tests.conftest import ROOT, Keyspace, unique_id
from tests.money import payment
from tests.people import campaign, claim

APP = ApiKey(id="app-reconcile-test", secret="s" * 48, role="app")
_nonces = itertools.count()


@dataclass
class Env:
    keyspace: Keyspace
    redis: Redis
    pool: asyncpg.Pool
    campaigns: Campaigns
    claims: Claims

    async def new_campaign(self, claims: int, reserve_fen: int | None = None) -> str:
        campaign_id = unique_id("rc")
        body = msgspec.convert(campaign(quota=5000, reserve_fen=reserve_fen), CampaignDef)
        assert await self.campaigns.put(campaign_id, body)

        async def one(n: int) -> None:
            verified = Verified(
                APP, f"nonce-{next(_nonces):012d}-{secrets.token_hex(6)}", int(time.time())
            )
            claimed = await self.claims.claim(
                campaign_id, msgspec.convert(claim(n), ClaimIn), verified
            )
            assert not isinstance(claimed, ApiError), claimed  # a refusal is returned

        await asyncio.gather(*(one(n) for n in range(claims)))
        return campaign_id

    async def flush(self, consumer: str = "flusher-1") -> None:
        r = Redis.from_url(self.keyspace.redis_url)
        try:
            await Flusher(r, self.pool, consumer=consumer).drain()
        finally:
            await r.aclose()

    async def report(self, campaign_id: str) -> Report:
        return await reconcile(self.redis, self.pool, campaign_id)


@pytest.fixture(scope="module")
async def env(keyspace: Keyspace, redis: Redis) -> AsyncIterator[Env]:
    pool = await store.connect(keyspace.database_url)
    await store.migrate(pool)
    scripts = Scripts(redis)
    campaigns = Campaigns(redis, scripts)
    claims = Claims(redis, scripts, campaigns, person_key=b"k", batch_max=100)
    yield Env(keyspace, redis, pool, campaigns, claims)
    await pool.close()


@pytest.fixture(scope="module")
async def flushed(env: Env) -> str:
    """A campaign with 400 vouchers, fully flushed."""
    campaign_id = await env.new_campaign(400)
    await env.flush()
    return campaign_id


def has(report: Report, fragment: str) -> bool:
    return any(fragment in p for p in report.problems)


async def assert_clean(env: Env, campaign_id: str) -> None:
    report = await env.report(campaign_id)
    assert report.ok, report.problems
    assert report.redis_vouchers == report.postgres_vouchers
    assert report.in_stream == 0


async def test_clean_after_flush(env: Env, flushed: str) -> None:
    await assert_clean(env, flushed)
    report = await env.report(flushed)
    assert report.redis_vouchers == 400


async def test_claims_in_flight_are_not_drift(env: Env) -> None:
    campaign_id = await env.new_campaign(150)  # nothing flushed yet
    report = await env.report(campaign_id)
    assert report.ok, report.problems
    assert report.in_stream == 151 and report.postgres_vouchers == 0  # + the campaign itself
    await env.flush()
    await assert_clean(env, campaign_id)


async def test_voucher_missing_in_postgres(env: Env, flushed: str) -> None:
    row = await env.pool.fetchrow(
        "DELETE FROM vouchers WHERE voucher_id ="
        " (SELECT min(voucher_id) FROM vouchers WHERE campaign_id = $1) RETURNING *",
        flushed,
    )
    try:
        report = await env.report(flushed)
        assert has(report, "1 vouchers in Redis but not in PostgreSQL"), report.problems
        assert report.postgres_vouchers == 399
    finally:
        columns = list(row.keys())
        await env.pool.execute(
            f"INSERT INTO vouchers ({', '.join(columns)}) VALUES"
            f" ({', '.join(f'${i}' for i in range(1, len(columns) + 1))})",
            *row.values(),
        )
    await assert_clean(env, flushed)


async def test_extra_voucher_in_postgres(env: Env, flushed: str) -> None:
    fake = f"{flushed}.forged{secrets.token_hex(4)}"
    await env.pool.execute(
        "INSERT INTO vouchers (voucher_id, campaign_id, round_id, user_id, person_ref, status,"
        " issued_at, expires_at, reserve_fen, discount_rate_bp, cap_fen, entry_id)"
        " SELECT $2, campaign_id, round_id, 'forged-user', 'forged-person', status,"
        " issued_at, expires_at, reserve_fen, discount_rate_bp, cap_fen, '0-1'"
        " FROM vouchers WHERE campaign_id = $1 LIMIT 1",
        flushed,
        fake,
    )
    try:
        report = await env.report(flushed)
        assert has(report, "1 vouchers in PostgreSQL but not in Redis"), report.problems
    finally:
        await env.pool.execute("DELETE FROM vouchers WHERE voucher_id = $1", fake)
    await assert_clean(env, flushed)


async def test_ledger_available_bumped(env: Env, flushed: str) -> None:
    ledger = keys.CampaignKeys(flushed).ledger
    await env.redis.hincrby(ledger, "available", 1)
    try:
        report = await env.report(flushed)
        assert has(report, "ledger does not balance"), report.problems
    finally:
        await env.redis.hincrby(ledger, "available", -1)
    await assert_clean(env, flushed)


async def test_round_issued_bumped(env: Env, flushed: str) -> None:
    rnd = keys.CampaignKeys(flushed).round("r1")
    await env.redis.hincrby(rnd, "issued", 1)
    try:
        report = await env.report(flushed)
        assert has(report, "round r1: Redis counts 401 issued, PostgreSQL holds 400"), (
            report.problems
        )
    finally:
        await env.redis.hincrby(rnd, "issued", -1)
    await assert_clean(env, flushed)


async def test_drift_seen_while_acknowledged_entries_linger(env: Env) -> None:
    """A consumer died holding the oldest entries, so the stream keeps everything after them,
    acknowledged or not. A voucher whose entry was acknowledged but whose row is gone is
    drift, not "in flight": nothing will ever write it again."""
    campaign_id = await env.new_campaign(60)
    stream = keys.CampaignKeys(campaign_id).events
    r = Redis.from_url(env.keyspace.redis_url)
    try:
        dead = Flusher(r, env.pool, consumer="dead-host", batch=1)
        await dead.read(await dead.streams(), ">", None)  # holds the oldest, never writes
    finally:
        await r.aclose()
    await env.flush(consumer="live-host")  # the other entries: written and acknowledged
    pending = await env.redis.xpending(stream, keys.FLUSH_GROUP)
    assert pending["pending"] == 1
    added = (await env.redis.xinfo_stream(stream))["entries-added"]
    assert added > 1
    assert await env.redis.xlen(stream) == added  # trimming stops at the oldest pending entry

    acked = await env.pool.fetchval(
        "SELECT voucher_id FROM vouchers WHERE campaign_id = $1 ORDER BY entry_id DESC LIMIT 1",
        campaign_id,
    )
    await env.pool.execute("DELETE FROM vouchers WHERE voucher_id = $1", acked)
    report = await env.report(campaign_id)
    assert has(report, "1 vouchers in Redis but not in PostgreSQL"), (
        f"acknowledged voucher {acked} lost from PostgreSQL, reconcile says {report}"
    )


async def run_cli(env: Env, *args: str) -> tuple[int, str]:
    environ = {
        **os.environ,
        "REDIS_URL": env.keyspace.redis_url,
        "DATABASE_URL": env.keyspace.database_url,
        "ISSUER_LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "issuer.cli",
        "reconcile",
        *args,
        env=environ,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_cli(env: Env, flushed: str) -> None:
    code, out = await run_cli(env, flushed)
    assert code == 0, out
    report: dict[str, Any] = msgspec.json.decode(out.strip().splitlines()[-1])
    assert report["campaign_id"] == flushed and report["problems"] == []

    ledger = keys.CampaignKeys(flushed).ledger
    await env.redis.hincrby(ledger, "available", 1)
    try:
        code, out = await run_cli(env, flushed)
    finally:
        await env.redis.hincrby(ledger, "available", -1)
    assert code != 0, out
    assert "ledger does not balance" in out

    other = await env.new_campaign(20)  # unflushed, in flight: fine
    code, out = await run_cli(env, flushed, other)
    assert code == 0, out
    await env.flush()


async def money_moves(env: Env, campaign_id: str) -> None:
    """Redeem two vouchers, refund one after reimbursement, expire the rest."""
    scripts = Scripts(env.redis)
    merchant = unique_id("m")
    await merchants.put(
        env.redis,
        scripts,
        merchant,
        MerchantDef(name="m", county_code="141029", categories=["appliance"]),
    )
    redemptions = Redemptions(env.redis, scripts, env.campaigns, batch_max=10)
    paying = ApiKey(id="payment-key", secret="s", role="payment")
    raw = await env.redis.hgetall(keys.CampaignKeys(campaign_id).vouchers)
    held = sorted((VOUCHER.decode(v) for v in raw.values()), key=lambda v: v.voucher_id)
    done = []
    for n, voucher in enumerate(held[:2]):
        pay = msgspec.convert(
            payment(
                {"voucher_id": voucher.voucher_id, "user_id": voucher.user_id},
                merchant,
                500_000 + n,
            ),
            RedemptionIn,
        )
        verified = Verified(paying, f"pay-nonce-{secrets.token_hex(8)}", int(time.time()))
        done.append((await redemptions.redeem(pay, verified, time.time()))[0])
    await mark_paid(scripts, campaign_id, "b1", [done[0].redemption_id])
    body = RefundIn(request_id="refund-rc-1", amount_fen=250_000)
    refund, _ = await redemptions.refund(done[0].redemption_id, body, "payment-key", time.time())
    assert refund.clawback_due_fen == 25_000
    repaid = RepaidIn(request_id="repaid-rc-1")
    await redemptions.clawback_repaid(refund.refund_id, repaid, "auditor-key", time.time())
    await redemptions.refund(
        done[1].redemption_id, RefundIn(request_id="refund-rc-2", amount_fen=1), "p", time.time()
    )
    await expiry.sweep(env.redis, scripts, campaign_id, int(time.time() * 1000) + 86_400_000)


async def test_money_in_flight_is_not_drift(env: Env) -> None:
    campaign_id = await env.new_campaign(6)
    await env.flush()
    await money_moves(env, campaign_id)
    report = await env.report(campaign_id)  # redemptions, refunds, expiries not flushed
    assert report.ok, report.problems
    assert report.in_stream > 0
    await env.flush()
    await assert_clean(env, campaign_id)


async def test_money_drift_is_named(env: Env) -> None:
    campaign_id = await env.new_campaign(6)
    await money_moves(env, campaign_id)
    await env.flush()
    await assert_clean(env, campaign_id)
    ledger = keys.CampaignKeys(campaign_id).ledger
    for field in ("spent", "clawback_due", "reserved"):
        await env.redis.hincrby(ledger, field, 7)
        await env.redis.hincrby(ledger, "available", -7)
        try:
            report = await env.report(campaign_id)
            assert has(report, f"{field} ") and has(report, "accounts for"), report.problems
        finally:
            await env.redis.hincrby(ledger, field, -7)
            await env.redis.hincrby(ledger, "available", 7)
    await assert_clean(env, campaign_id)


async def test_round_overdraw_in_flight_recorded_and_drifted(env: Env) -> None:
    """Reservations of 10,000: money_moves' discounts of 50,000 overdraw the round by
    40,000 each; the refund of half the first order returns 25,000, which repays its
    overdraw first; the 1 fen refund of the second returns nothing."""
    campaign_id = await env.new_campaign(6, reserve_fen=10_000)
    await env.flush()
    await money_moves(env, campaign_id)
    rnd = keys.CampaignKeys(campaign_id).round("r1")
    assert int(await env.redis.hget(rnd, "overdrawn")) == 15_000 + 40_000
    report = await env.report(campaign_id)  # in flight
    assert report.ok, report.problems
    await env.flush()
    await assert_clean(env, campaign_id)
    for field in ("overdrawn", "spent"):
        await env.redis.hincrby(rnd, field, 7)
        try:
            report = await env.report(campaign_id)
            assert has(report, f"round r1: {field} "), report.problems
        finally:
            await env.redis.hincrby(rnd, field, -7)
    await assert_clean(env, campaign_id)
