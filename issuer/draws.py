"""Running a lottery round's draw in Redis, in batches from the revealed seed, and reading
its published document back.

The applications of a round are frozen when applications close (the claim script takes
none after). The draw orders their refs by rank (issuer/draw_rules.py) and hands them to the
`draw_batch` script a batch at a time; each batch moves the draw's cursor in Redis in
the same step as its vouchers, so a draw that crashed, or runs twice at once, resumes at
the cursor with the same order and decides every application once. A winner's voucher id
is derived from its application, so a voucher issued again after a Redis loss is the same
voucher to PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from redis.asyncio import Redis

from issuer import applications
from issuer.campaigns import CachedCampaign, Campaigns
from issuer.draw_rules import (
    DrawDocument,
    DrawEntry,
    Outcome,
    applications_root,
    commits,
    order,
    rank,
)
from issuer.errors import ApiError
from issuer.model import DrawOut, Round
from issuer.protocol import DrawBatch, DrawPick
from issuer.scripts import Scripts

# applications per script call, a few ms of Redis each (bench.draw): fewer while winners
# are drawn (a voucher each), more once the rest are only marked not drawn
DRAW_BATCH = 50
NOT_DRAWN_BATCH = 300
READ_BATCH = 1000  # applications read per HMGET


def winner_voucher_id(application_id: str) -> str:
    campaign_id, _, token = application_id.rpartition(".")
    return f"{campaign_id}.w{hashlib.sha256(token.encode()).hexdigest()[:19]}"


async def entries(redis: Redis, cached: CachedCampaign, round_id: str) -> dict[str, str]:
    """application_ref -> application_id of a round, read with HSCAN (never blocking)."""
    key = cached.keys.entries(round_id)
    return {k.decode(): v.decode() async for k, v in redis.hscan_iter(key, count=READ_BATCH)}


def _closed(rnd: Round) -> bool:
    assert rnd.applications_close_at is not None
    return datetime.now(UTC) >= rnd.applications_close_at


async def draw(
    redis: Redis, scripts: Scripts, campaigns: Campaigns, campaign_id: str, round_id: str, seed: str
) -> DrawOut:
    """Draw the round's winners with `seed` (hex), or finish a draw begun with it."""
    cached = await campaigns.cached(campaign_id)
    rnd = applications.round_of(cached.stored.rounds, round_id)
    assert rnd.draws_at is not None and rnd.commitment is not None
    if datetime.now(UTC) < rnd.draws_at:
        raise ApiError("NOT_OPEN", f"round {round_id} is drawn at {rnd.draws_at.isoformat()}")
    seed = seed.lower()
    if not commits(seed, rnd.commitment):
        raise ApiError(
            "INVALID_REQUEST", "seed: its SHA-256 is not the round's commitment", status=422
        )
    status = await redis.hget(cached.keys.ledger, "status")
    if status in (b"paused", b"ended"):
        raise ApiError("CAMPAIGN_PAUSED" if status == b"paused" else "CAMPAIGN_ENDED")
    found = await entries(redis, cached, round_id)
    root = applications_root(found)
    ranked = [found[ref] for ref in order(seed, root, found)]
    ck = cached.keys
    reserve = cached.definition.voucher.reserve
    cursor, winners, full = 0, 0, False
    while True:
        batch = ranked[cursor : cursor + (NOT_DRAWN_BATCH if full else DRAW_BATCH)]
        picks = DrawBatch(
            ledger=ck.ledger,
            round=ck.round(round_id),
            persons=ck.persons,
            accounts=ck.accounts,
            vouchers=ck.vouchers,
            events=ck.events,
            expiry=ck.expiry,
            applications=ck.applications,
            draw=ck.draw(round_id),
            seed=seed,
            root=root,
            reserve_fen=reserve,
            start=cursor,
            round_id=round_id,
            picks=[DrawPick(a, winner_voucher_id(a)) for a in batch],
        )
        code, at, won, no_more = await scripts.run(picks)
        if code == b"MISMATCH":  # the frozen list cannot change, nor the committed seed
            raise RuntimeError(f"draw of {campaign_id}/{round_id} began from other applications")
        cursor, winners, full = int(at), int(won), no_more == 1
        if code == b"OK" and cursor >= len(ranked):
            break
    return DrawOut(
        round_id=round_id, winners=winners, applications=len(ranked), applications_root=root
    )


async def document(
    redis: Redis, campaigns: Campaigns, campaign_id: str, round_id: str
) -> DrawDocument:
    """The published draw: commitment; once applications close, the root and every ref;
    once drawn, the seed, each rank and outcome."""
    cached = await campaigns.cached(campaign_id)
    rnd = applications.round_of(cached.stored.rounds, round_id)
    assert rnd.commitment is not None
    doc = DrawDocument(
        campaign_id=campaign_id,
        round_id=round_id,
        commitment=rnd.commitment,
        quota=rnd.quota,
        applications=[],
    )
    if not _closed(rnd):
        return doc
    found = await entries(redis, cached, round_id)
    doc.applications_root = root = applications_root(found)
    state = await redis.hmget(cached.keys.draw(round_id), "seed", "cursor", "winners")
    done = state[0] is not None and int(state[1]) >= len(found)
    refs = sorted(found)
    if not done:
        doc.applications = [DrawEntry(application_ref=ref) for ref in refs]
        return doc
    seed = doc.seed = state[0].decode()
    doc.winners = int(state[2])
    outcomes: dict[str, Outcome | None] = {}
    for i in range(0, len(refs), READ_BATCH):
        chunk = refs[i : i + READ_BATCH]
        raws = await redis.hmget(cached.keys.applications, [found[r] for r in chunk])
        for ref, raw in zip(chunk, raws, strict=True):
            status = applications.APPLICATION.decode(raw).status
            outcomes[ref] = None if status == "applied" else status
    doc.applications = [
        DrawEntry(application_ref=ref, rank=rank(seed, root, ref), outcome=outcomes[ref])
        for ref in refs
    ]
    return doc
