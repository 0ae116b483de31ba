"""The operations' scripts on fakeredis: ready, trim_acked, rebuild_commit and draw_batch;
how a script is called (a script the server lost, a transport closed under a write)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from issuer import keys
from issuer.protocol import DrawBatch, DrawPick, Ready, RebuildCommit, TrimAcked
from issuer.scripts import Scripts
from tests.fake import BUDGET, CK, EXTRA, RESERVE, Fake, settings

pytestmark = pytest.mark.fast


async def test_ready_counts_the_campaigns(fake: Fake) -> None:
    await fake.redis.sadd(keys.CAMPAIGNS, "c-1", "c-2")
    assert await fake.scripts.run(Ready(campaigns=keys.CAMPAIGNS)) == 2


async def test_a_stream_is_trimmed_below_what_its_group_still_needs(fake: Fake) -> None:
    stream, group = CK.events, keys.FLUSH_GROUP
    ids = [await fake.redis.xadd(stream, {"n": n}) for n in range(5)]
    await fake.redis.xgroup_create(stream, group, id="0")
    trim = TrimAcked(stream=stream, group=group)
    assert await fake.scripts.run(trim) == 0  # nothing delivered yet
    await fake.redis.xreadgroup(group, "c1", {stream: ">"}, count=3)
    await fake.redis.xack(stream, group, ids[0])
    assert await fake.scripts.run(trim) == 1  # the oldest pending entry stays
    await fake.redis.xack(stream, group, ids[1], ids[2])
    assert await fake.scripts.run(trim) == 2  # all delivered were acknowledged
    assert [e[0] for e in await fake.redis.xrange(stream)] == ids[3:]


async def test_a_script_the_server_lost_is_loaded_again(fake: Fake) -> None:
    """After a restart or a failover to a server that never loaded it (NOSCRIPT), a call
    loads the script and runs it: the caller sees its answer."""
    await fake.redis.sadd(keys.CAMPAIGNS, "c-1")
    assert await fake.scripts.run(Ready(campaigns=keys.CAMPAIGNS)) == 1
    await fake.redis.script_flush()
    assert await fake.scripts.run(Ready(campaigns=keys.CAMPAIGNS)) == 1


async def test_a_transport_closed_under_a_write_is_a_connection_error() -> None:
    """uvloop's RuntimeError from a closed transport (redis-py issue 4287) goes up as the
    ConnectionError it is (the claim answers 503 UNAVAILABLE)."""

    class Closed:
        async def execute_command(self, *args: Any) -> Any:
            raise RuntimeError("the handler is closed")

    with pytest.raises(RedisConnectionError, match="the handler is closed"):
        await Scripts(Closed()).run(Ready(campaigns=keys.CAMPAIGNS))


def commit(live: list[str], buckets: list[str]) -> RebuildCommit:
    return RebuildCommit(
        winners=CK.winners,
        staged_winners=CK.staged(CK.winners),
        live=live,
        staged=[CK.staged(k) for k in live],
        buckets=buckets,
        staged_buckets=[CK.staged(k) for k in buckets],
        moves=len(live),
    )


async def test_a_rebuild_moves_its_keys_in_and_merges_the_requests(fake: Fake) -> None:
    bucket = CK.idempotency(0)[0]
    await fake.redis.set(CK.staged(CK.definition), "def")
    await fake.redis.hset(CK.staged(CK.ledger), "budget", 1)
    await fake.redis.hset(CK.staged(bucket), mapping={"k|a": "fp\nv-a", "k|b": "fp\nv-b"})
    await fake.redis.sadd(CK.staged(CK.winners), "k|a")
    await fake.redis.hset(bucket, "k|a", "fp\nkept")  # answered since the loss: kept
    await fake.redis.sadd(CK.winners, "k|z")
    moved = commit([CK.definition, CK.ledger, CK.persons], [bucket])
    assert await fake.scripts.run(moved) == 1
    assert await fake.redis.get(CK.definition) == b"def"
    assert not await fake.redis.exists(CK.staged(CK.definition), CK.persons)
    assert await fake.redis.hgetall(bucket) == {b"k|a": b"fp\nkept", b"k|b": b"fp\nv-b"}
    assert await fake.redis.ttl(bucket) > 0
    assert await fake.redis.smembers(CK.winners) == {b"k|a", b"k|z"}


async def test_a_rebuild_finding_the_campaign_back_writes_nothing(fake: Fake) -> None:
    await fake.redis.set(CK.staged(CK.definition), "def")
    await fake.redis.hset(CK.ledger, "version", 1)  # a campaign PUT meanwhile
    assert await fake.scripts.run(commit([CK.definition, CK.ledger], [])) == 0
    assert not await fake.redis.exists(CK.definition)


async def lottery(fake: Fake, applications: int, **rnd: Any) -> list[str]:
    """A drawn lottery round's applications, ids c-fake.a1 ... (their rank order)."""
    await fake.put_campaign(settings(-60, 3600, applications_close_in_s=-1, **rnd))
    await fake.redis.hset(CK.round("r1"), "apps_close", 1)  # closed long ago
    ids = []
    for n in range(1, applications + 1):
        record = json.loads(EXTRA) | {
            "application_id": f"c-fake.a{n}",
            "application_ref": f"ref-{n}",
            "round_id": "r1",
            "user_id": f"user-{n}",
            "person_ref": f"person-{n}",
            "status": "applied",
            "applied_at": 1,
        }
        compact = json.dumps(record, separators=(",", ":"))  # as msgspec and cjson write
        await fake.redis.hset(CK.applications, record["application_id"], compact)
        ids.append(record["application_id"])
    return ids


def draw(ids: list[str], start: int, seed: str = "seed") -> DrawBatch:
    return DrawBatch(
        ledger=CK.ledger,
        round=CK.round("r1"),
        persons=CK.persons,
        accounts=CK.accounts,
        vouchers=CK.vouchers,
        events=CK.events,
        expiry=CK.expiry,
        applications=CK.applications,
        draw=CK.draw("r1"),
        seed=seed,
        root="root",
        reserve_fen=RESERVE,
        start=start,
        round_id="r1",
        picks=[DrawPick(a, a.replace(".a", ".w")) for a in ids],
    )


async def outcomes(fake: Fake) -> dict[str, str]:
    found = await fake.redis.hgetall(CK.applications)
    return {k.decode(): json.loads(v)["status"] for k, v in found.items()}


async def test_a_draw_takes_winners_in_rank_order_until_the_quota(fake: Fake) -> None:
    ids = await lottery(fake, 5, quota=3)
    assert await fake.scripts.run(draw(ids[:2], 0)) == [b"OK", 2, 2, 0]
    assert await fake.scripts.run(draw(ids[2:], 2)) == [b"OK", 5, 3, 1]
    won = await outcomes(fake)
    assert [won[a] for a in ids] == ["won"] * 3 + ["not_drawn"] * 2
    assert await fake.redis.hget(CK.persons, "person-1") == b"c-fake.w1"
    led = await fake.balanced()
    assert (led["reserved"], led["available"]) == (3 * RESERVE, BUDGET - 3 * RESERVE)
    assert (await fake.round())["issued"] == 3
    assert (await fake.events())[1:] == ["claim", "application"] * 3 + ["not_drawn"]


async def test_a_draw_stops_when_the_money_does(fake: Fake) -> None:
    ids = await lottery(fake, 4, budget=2 * RESERVE + 1)
    assert await fake.scripts.run(draw(ids, 0)) == [b"OK", 4, 2, 1]


async def test_a_batch_applies_only_at_the_cursor_and_with_the_same_seed(fake: Fake) -> None:
    ids = await lottery(fake, 4)
    assert await fake.scripts.run(draw(ids[:2], 0)) == [b"OK", 2, 2, 0]
    assert await fake.scripts.run(draw(ids[:2], 0)) == [b"MOVED", 2, 2, 0]  # done already
    assert await fake.scripts.run(draw(ids[2:], 2, seed="other")) == [b"MISMATCH", 2, 2, 0]
    assert (await fake.round())["issued"] == 2


async def test_a_draw_counts_a_voucher_issued_before_its_outcome_was_recorded(
    fake: Fake,
) -> None:
    ids = await lottery(fake, 2)
    await fake.redis.hset(CK.persons, "person-1", "c-fake.w1")  # rebuilt after a loss
    assert await fake.scripts.run(draw(ids, 0)) == [b"OK", 2, 2, 0]
    assert (await fake.round())["issued"] == 1  # only the second is new
