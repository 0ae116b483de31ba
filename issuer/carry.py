"""Carry-over (Xi County): once a round closes, the budget it did not use moves to the
next round that is still open, for campaigns whose definition says `carry_over`. Unused is
`budget + overdrawn - reserved - spent`: discount money above reservations came from the
campaign pool, not from the round's budget."""

from __future__ import annotations

from redis.asyncio import Redis

from issuer import keys
from issuer.campaigns import STORED
from issuer.protocol import CarryOver
from issuer.schedule import to_millis
from issuer.scripts import Scripts


async def carry_over(redis: Redis, scripts: Scripts, campaign_id: str, now_ms: int) -> int:
    """Move every closed round's unused budget on; returns the fen moved."""
    ck = keys.CampaignKeys(campaign_id)
    raw = await redis.get(ck.definition)
    if raw is None:
        return 0
    stored = STORED.decode(raw)
    if not stored.definition.carry_over:
        return 0
    rounds = sorted(stored.rounds, key=lambda r: r.opens_at)
    closed = [r for r in rounds if to_millis(r.closes_at) <= now_ms]
    following = [r for r in rounds if to_millis(r.closes_at) > now_ms]
    if not closed or not following:
        return 0
    nxt = following[0]
    async with redis.pipeline(transaction=False) as pipe:
        for r in closed:
            pipe.hmget(ck.round(r.round_id), "budget", "reserved", "spent", "overdrawn")
        states = await pipe.execute()
    moved = 0
    for r, (budget, reserved, spent, overdrawn) in zip(closed, states, strict=True):
        if (
            budget is None
            or int(budget) + int(overdrawn or 0) - int(reserved) - int(spent or 0) <= 0
        ):
            continue  # nothing unused (or no round budget): no script call
        carry = CarryOver(
            closed_round=ck.round(r.round_id),
            next_round=ck.round(nxt.round_id),
            events=ck.events,
            now_ms=now_ms,
            closed_round_id=r.round_id,
            next_round_id=nxt.round_id,
        )
        moved += int(await scripts.run(carry))
    return moved
