"""The expiry sweeper: vouchers past `expires_at` become `expired` and their reservation
returns to the pool (it also runs the round carry-over). Every worker runs one; the scripts
make concurrent sweeps safe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis

from issuer import carry, keys, metrics, topology
from issuer.protocol import Due, Expire
from issuer.scripts import Scripts
from issuer.vouchers import VOUCHER

log = logging.getLogger("issuer.expiry")
SWEEP_BATCH = 500  # vouchers per script call
SWEEP_INTERVAL_S = 1.0


async def sweep(redis: Redis, scripts: Scripts, campaign_id: str, now_ms: int) -> int:
    """Expire every voucher of the campaign due at `now_ms`; returns how many."""
    ck = keys.CampaignKeys(campaign_id)
    expired = 0
    while due := await redis.zrangebyscore(ck.expiry, 0, now_ms, start=0, num=SWEEP_BATCH):
        records = await redis.hmget(ck.vouchers, due)
        rounds: list[str] = []
        vouchers: list[Due] = []
        for voucher_id, raw in zip(due, records, strict=True):
            key = ck.round(VOUCHER.decode(raw).round_id) if raw else ck.round("")
            if key not in rounds:
                rounds.append(key)
            vouchers.append(Due(voucher_id.decode(), rounds.index(key)))
        done = await scripts.run(
            Expire(
                ledger=ck.ledger,
                vouchers=ck.vouchers,
                expiry=ck.expiry,
                events=ck.events,
                rounds=rounds,
                now_ms=now_ms,
                due=vouchers,
            )
        )
        expired += int(done)
        if len(due) < SWEEP_BATCH:
            break
    if expired:
        metrics.child(metrics.EXPIRED, campaign_id).inc(expired)
    return expired


async def run(redis: Redis, scripts: Scripts, stop: asyncio.Event) -> None:
    """Once a second until `stop` is set: expire what is due, carry unused round budgets."""
    while not stop.is_set():
        try:
            now_ms = int(time.time() * 1000)
            for campaign_id in sorted(m.decode() for m in await redis.smembers(keys.CAMPAIGNS)):
                await sweep(redis, scripts, campaign_id, now_ms)
                await carry.carry_over(redis, scripts, campaign_id, now_ms)
        except topology.REDIS_ERRORS as exc:
            log.warning("expiry sweep failed, retrying: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SWEEP_INTERVAL_S)
