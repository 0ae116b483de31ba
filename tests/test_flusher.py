"""The flusher (stream -> PostgreSQL) under crashes, cancellation and outages, driven
in-process on real Valkey and PostgreSQL. No `issuer serve` here: its own flusher would
race with the ones these tests start and stop."""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from issuer import keys, store
from issuer.auth import ApiKey, Verified
from issuer.campaigns import Campaigns
from issuer.claims import Claims
from issuer.embedded import free_port
from issuer.errors import ApiError
from issuer.events import decoded_events
from issuer.flusher import Flusher, stream_lag
from issuer.model import CampaignDef, ClaimIn, StatusChangeIn
from issuer.reconcile import reconcile
from issuer.scripts import Scripts
from issuer.vouchers import VOUCHER
from tests.conftest import Keyspace, unique_id
from tests.people import campaign, claim

APP = ApiKey(id="app-flusher-test", secret="s" * 48, role="app")
OPS_KEY_ID = "ops-flusher-test"
_nonces = itertools.count()
_requests = itertools.count()


@dataclass
class Env:
    keyspace: Keyspace
    redis: Redis
    pool: asyncpg.Pool
    campaigns: Campaigns
    claims: Claims

    async def new_campaign(self, **kwargs: Any) -> str:
        campaign_id = unique_id("fl")
        body = campaign(**{"quota": None, **kwargs})
        assert await self.campaigns.put(campaign_id, msgspec.convert(body, CampaignDef))
        return campaign_id

    async def claim_many(self, campaign_id: str, numbers: range) -> list[str]:
        """Concurrent claims of distinct people; every one must win a voucher."""

        async def one(n: int) -> str:
            verified = Verified(
                APP, f"nonce-{next(_nonces):012d}-{secrets.token_hex(6)}", int(time.time())
            )
            claimed = await self.claims.claim(
                campaign_id, msgspec.convert(claim(n), ClaimIn), verified
            )
            assert not isinstance(claimed, ApiError), claimed  # a refusal is returned
            voucher, replayed = claimed
            assert not replayed
            return voucher.voucher_id

        return list(await asyncio.gather(*(one(n) for n in numbers)))

    async def set_status(self, campaign_id: str, status: str) -> None:
        body = StatusChangeIn(request_id=f"st-{next(_requests):08d}", reason="test")
        await self.campaigns.set_status(campaign_id, body, OPS_KEY_ID, status, time.time())

    def redis_client(self) -> Redis:
        """A client of its own for one flusher (so it can be broken or patched alone)."""
        return Redis.from_url(self.keyspace.redis_url)


@pytest.fixture(scope="module")
async def env(keyspace: Keyspace, redis: Redis) -> AsyncIterator[Env]:
    pool = await store.connect(keyspace.database_url)
    await store.migrate(pool)
    scripts = Scripts(redis)
    campaigns = Campaigns(redis, scripts)
    claims = Claims(redis, scripts, campaigns, person_key=b"k", batch_max=100)
    yield Env(keyspace, redis, pool, campaigns, claims)
    await pool.close()


# ------------------------------------------------------------------ helpers


async def redis_vouchers(redis: Redis, campaign_id: str) -> dict[str, dict[str, Any]]:
    ck = keys.CampaignKeys(campaign_id)
    out = {}
    async for vid, raw in redis.hscan_iter(ck.vouchers, count=1000):
        rec = VOUCHER.decode(raw)
        out[vid.decode()] = {
            "round_id": rec.round_id,
            "user_id": rec.user_id,
            "person_ref": rec.person_ref,
            "status": rec.status,
            "issued_at": rec.issued_at,
            "expires_at": rec.expires_at,
            "reserve_fen": rec.reserve_fen,
            "discount_rate_bp": rec.discount_rate_bp,
            "cap_fen": rec.cap_fen,
        }
    return out


async def pg_vouchers(pool: asyncpg.Pool, campaign_id: str) -> dict[str, dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT voucher_id, round_id, user_id, person_ref, status,"
        " round(extract(epoch FROM issued_at) * 1000)::bigint AS issued_at,"
        " round(extract(epoch FROM expires_at) * 1000)::bigint AS expires_at,"
        " reserve_fen, discount_rate_bp, cap_fen FROM vouchers WHERE campaign_id = $1",
        campaign_id,
    )
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        assert r["voucher_id"] not in out, f"duplicate voucher row {r['voucher_id']}"
        out[r["voucher_id"]] = {k: v for k, v in r.items() if k != "voucher_id"}
    return out


async def entries_added(redis: Redis, stream: str) -> int:
    info = await redis.xinfo_stream(stream)
    return int(info["entries-added"])


async def stream_events(redis: Redis, stream: str, ids: list[bytes] | None = None) -> list[str]:
    """The ids of the events that the stream's entries (those of `ids`) hold, in order: an
    entry's own, or for each document of a gathered entry the entry's and its place."""
    entries = [
        found
        for entry_id in ids or [None]
        for found in await redis.xrange(stream, *((entry_id, entry_id) if entry_id else ()))
    ]
    return [
        f"{entry_id.decode()}-{i}" if fields[b"d"].startswith(b"[") else entry_id.decode()
        for entry_id, fields in entries
        for i, _ in enumerate(decoded_events(fields))
    ]


async def pending_ids(redis: Redis, stream: str) -> list[bytes]:
    rows = await redis.xpending_range(stream, keys.FLUSH_GROUP, "-", "+", 1_000_000)
    return [r["message_id"] for r in rows]


async def assert_exact(env: Env, campaign_id: str) -> None:
    """PostgreSQL holds exactly Redis's vouchers, one event row per event of each stream
    entry, with nothing left pending or unread."""
    stream = keys.CampaignKeys(campaign_id).events
    in_redis = await redis_vouchers(env.redis, campaign_id)
    in_pg = await pg_vouchers(env.pool, campaign_id)
    missing = in_redis.keys() - in_pg.keys()
    extra = in_pg.keys() - in_redis.keys()
    assert not missing and not extra, f"{len(missing)} missing, {len(extra)} extra in PostgreSQL"
    assert in_pg == in_redis
    row = await env.pool.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT entry_id) AS d,"
        " count(DISTINCT split_part(entry_id, '-', 1) || '-' || split_part(entry_id, '-', 2))"
        " AS entries, count(*) FILTER (WHERE type = 'claim') AS claims"
        " FROM events WHERE stream = $1",
        stream,
    )
    assert row["n"] == row["d"]
    assert row["entries"] == await entries_added(env.redis, stream)
    assert row["claims"] == len(in_pg)
    per_person = await env.pool.fetchval(
        "SELECT count(DISTINCT person_ref) FROM vouchers WHERE campaign_id = $1", campaign_id
    )
    assert per_person == len(in_pg)
    assert await pending_ids(env.redis, stream) == []
    assert await env.redis.xlen(stream) == 0  # everything acknowledged is trimmed


def fail_once(redis: Redis, name: str, exc: BaseException, on_call: int = 1) -> Callable[[], int]:
    """Make `redis.<name>` raise `exc` on its `on_call`-th call; returns a call counter."""
    original = getattr(redis, name)
    calls = 0

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == on_call:
            raise exc
        return await original(*args, **kwargs)

    setattr(redis, name, wrapper)
    return lambda: calls


async def wait_until(predicate: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def cancel(task: asyncio.Task[Any]) -> int:
    """Cancel `task` and wait for it to end; returns how many cancel() calls it took.

    On Python 3.11, `asyncio.wait_for` (which redis-py wraps around each socket write
    when a socket timeout is set) swallows a cancellation that arrives just as the write
    completes, so one cancel() is not always enough (fixed in Python 3.12)."""
    calls = 0
    while not task.done():
        calls += 1
        assert calls <= 20, f"{task} ignores cancellation"
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
    with suppress(asyncio.CancelledError):
        await task
    return calls


# ------------------------------------------------------------------ tests


async def test_flush_thousands_exactly(env: Env) -> None:
    campaign_id = await env.new_campaign()
    stream = keys.CampaignKeys(campaign_id).events
    await env.claim_many(campaign_id, range(0, 1500))
    await env.set_status(campaign_id, "paused")
    await env.set_status(campaign_id, "active")
    await env.claim_many(campaign_id, range(1500, 3000))
    ids = await stream_events(env.redis, stream)
    assert len(ids) == 3000 + 3  # campaign, pause, resume
    assert await env.redis.xlen(stream) < 100  # the claims of a batch are one entry

    r = env.redis_client()
    try:
        flusher = Flusher(r, env.pool, consumer="flusher-1", batch=5)
        assert await flusher.drain() >= len(ids)
    finally:
        await r.aclose()

    recorded = await env.pool.fetch("SELECT entry_id FROM events WHERE stream = $1", stream)
    assert sorted(x["entry_id"] for x in recorded) == sorted(ids)
    types = dict(
        await env.pool.fetch(
            "SELECT type, count(*) FROM events WHERE stream = $1 GROUP BY type", stream
        )
    )
    assert types == {"campaign": 1, "status": 2, "claim": 3000}
    await assert_exact(env, campaign_id)
    assert len(await pg_vouchers(env.pool, campaign_id)) == 3000
    status = await env.redis.hget(keys.CampaignKeys(campaign_id).ledger, "status")
    in_pg = await env.pool.fetchval(
        "SELECT status FROM campaigns WHERE campaign_id = $1", campaign_id
    )
    assert in_pg == status.decode() == "active"
    assert await stream_lag(env.redis) == (0, 0.0)
    report = await reconcile(env.redis, env.pool, campaign_id)
    assert report.ok, report.problems


async def test_crash_between_commit_and_ack(env: Env) -> None:
    campaign_id = await env.new_campaign()
    stream = keys.CampaignKeys(campaign_id).events
    await env.claim_many(campaign_id, range(1200))

    r1 = env.redis_client()
    try:
        first = Flusher(r1, env.pool, consumer="flusher-1", batch=500)
        fail_once(r1, "xack", RedisConnectionError("connection lost before XACK"))
        with pytest.raises(RedisConnectionError):
            await first.drain()
    finally:
        await r1.aclose()
    # the batch is committed in PostgreSQL but still pending in Redis
    committed = await env.pool.fetchval("SELECT count(*) FROM events WHERE stream = $1", stream)
    pending = await pending_ids(env.redis, stream)
    assert committed > 0
    assert len(pending) > 0
    assert await env.redis.xlen(stream) == await entries_added(env.redis, stream)

    r2 = env.redis_client()  # the restarted process, same consumer name
    try:
        await Flusher(r2, env.pool, consumer="flusher-1", batch=500).drain()
    finally:
        await r2.aclose()
    await assert_exact(env, campaign_id)
    assert len(await pg_vouchers(env.pool, campaign_id)) == 1200


async def test_other_consumer_takes_over(env: Env) -> None:
    campaign_id = await env.new_campaign()
    stream = keys.CampaignKeys(campaign_id).events
    await env.claim_many(campaign_id, range(1000))

    ra = env.redis_client()
    try:
        a = Flusher(ra, env.pool, consumer="host-a", batch=3)
        streams = await a.streams()
        # batch 1: committed, never acknowledged
        fail_once(ra, "xack", RedisConnectionError("host-a died after COMMIT"))
        with pytest.raises(RedisConnectionError):
            await a.flush_once(block_ms=None)
        # batch 2: read, never written (died before COMMIT)
        await a.read(streams, ">", None)
    finally:
        await ra.aclose()
    left = await pending_ids(env.redis, stream)
    assert len(left) >= 3
    await env.claim_many(campaign_id, range(1000, 1500))  # traffic goes on meanwhile

    await asyncio.sleep(0.1)
    rb = env.redis_client()
    try:
        b = Flusher(rb, env.pool, consumer="host-b", batch=3, claim_idle_ms=50)
        rescued = await b.rescue(await b.streams())
        assert rescued >= len(await stream_events(env.redis, stream, left))
        consumers = {
            c["name"].decode(): c["pending"]
            for c in await env.redis.xinfo_consumers(stream, keys.FLUSH_GROUP)
        }
        assert consumers.get("host-a", 0) == 0
        await b.drain()
    finally:
        await rb.aclose()
    await assert_exact(env, campaign_id)
    assert len(await pg_vouchers(env.pool, campaign_id)) == 1500


async def test_status_order_survives_takeover(env: Env) -> None:
    """A pause read by a consumer that died, then a resume flushed by its successor: the
    late rescue of the pause must not overwrite the newer status in PostgreSQL."""
    campaign_id = await env.new_campaign()
    ck = keys.CampaignKeys(campaign_id)
    r0 = env.redis_client()
    try:
        await Flusher(r0, env.pool, consumer="host-a").drain()
        await env.set_status(campaign_id, "paused")
        a = Flusher(r0, env.pool, consumer="host-a")
        read = await a.read(await a.streams(), ">", None)  # then host-a dies
        assert any(s == ck.events and entries for s, entries in read)
    finally:
        await r0.aclose()
    await env.set_status(campaign_id, "active")

    rb = env.redis_client()
    try:
        b = Flusher(rb, env.pool, consumer="host-b", claim_idle_ms=400)
        stop = asyncio.Event()
        task = asyncio.create_task(b.run(stop))

        async def rescued() -> bool:
            return await pending_ids(env.redis, ck.events) == []

        await wait_until(rescued, 20, "host-a's entries were not rescued")
        stop.set()
        await asyncio.wait_for(task, 20)
    finally:
        await rb.aclose()
    assert await pending_ids(env.redis, ck.events) == []
    status = (await env.redis.hget(ck.ledger, "status")).decode()
    in_pg = await env.pool.fetchval(
        "SELECT status FROM campaigns WHERE campaign_id = $1", campaign_id
    )
    assert status == "active"
    assert in_pg == status, f"PostgreSQL says {in_pg!r}, Redis says {status!r}"


async def test_cancel_mid_batch(env: Env) -> None:
    campaign_id = await env.new_campaign()
    rng = random.Random(20240611)

    async def traffic() -> None:
        for start in range(0, 3000, 150):
            await env.claim_many(campaign_id, range(start, start + 150))
            await asyncio.sleep(rng.uniform(0, 0.03))

    producer = asyncio.create_task(traffic())
    cancels = 0
    while not producer.done() or cancels < 6:
        r = env.redis_client()
        flusher = Flusher(r, env.pool, consumer="flusher-1", batch=2)
        task = asyncio.create_task(flusher.run(asyncio.Event()))
        await asyncio.sleep(rng.uniform(0.005, 0.25))
        assert not task.done(), task  # it must not have crashed on its own
        await cancel(task)
        await r.aclose()
        cancels += 1
    await producer

    r = env.redis_client()
    try:
        await Flusher(r, env.pool, consumer="flusher-1", batch=2).drain()
    finally:
        await r.aclose()
    await assert_exact(env, campaign_id)
    assert len(await pg_vouchers(env.pool, campaign_id)) == 3000
    report = await reconcile(env.redis, env.pool, campaign_id)
    assert report.ok, report.problems


async def test_postgres_unavailable(env: Env) -> None:
    campaign_id = await env.new_campaign()
    stream = keys.CampaignKeys(campaign_id).events
    # drain what earlier tests left, so that this test's counts are its own
    r0 = env.redis_client()
    try:
        await Flusher(r0, env.pool, consumer="flusher-1").drain()
    finally:
        await r0.aclose()

    dead = await asyncpg.create_pool(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none", min_size=0, max_size=1
    )
    r = env.redis_client()
    stop = asyncio.Event()
    flusher = Flusher(r, dead, consumer="flusher-1", batch=200)
    task = asyncio.create_task(flusher.run(stop))
    try:
        await env.claim_many(campaign_id, range(1000))
        await asyncio.sleep(1.5)
        assert not task.done(), "the flusher died while PostgreSQL was down"
        # nothing acknowledged, nothing trimmed, everything counted as lag
        assert len(await stream_events(env.redis, stream)) == 1000
        assert (
            await env.pool.fetchval(
                "SELECT count(*) FROM events WHERE stream = $1 AND type = 'claim'", stream
            )
            == 0
        )
        pending = await pending_ids(env.redis, stream)
        assert len(pending) > 0  # read, but not acknowledged
        lag, age = await stream_lag(env.redis)  # in entries
        assert lag == await env.redis.xlen(stream) and age > 0

        flusher.pool = env.pool  # PostgreSQL is back
        await env.claim_many(campaign_id, range(1000, 1500))

        async def caught_up() -> bool:
            return (await stream_lag(env.redis))[0] == 0

        await wait_until(caught_up, 20, "flusher did not catch up after the outage")

        # PostgreSQL drops every connection a few times while traffic goes on
        async def kill_backends() -> None:
            async with env.pool.acquire() as conn:
                await conn.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )

        for start in range(1500, 2500, 250):
            claims = asyncio.create_task(env.claim_many(campaign_id, range(start, start + 250)))
            await asyncio.sleep(0.02)
            await kill_backends()
            await claims
            assert not task.done(), "the flusher died when PostgreSQL dropped connections"
        await wait_until(caught_up, 20, "flusher did not catch up after the disconnects")
        stop.set()
        await asyncio.wait_for(task, 20)
    finally:
        await cancel(task)
        await r.aclose()
        await dead.close()
    await assert_exact(env, campaign_id)
    assert len(await pg_vouchers(env.pool, campaign_id)) == 2500


async def test_a_group_lost_in_a_failover_is_made_again(env: Env) -> None:
    """A replica promoted before it had a stream's consumer group answers NOGROUP to every
    read of that stream: the running flusher makes the group again and catches up."""
    campaign_id = await env.new_campaign()
    stream = keys.CampaignKeys(campaign_id).events
    r = env.redis_client()
    stop = asyncio.Event()
    task = asyncio.create_task(Flusher(r, env.pool, consumer="flusher-1").run(stop))

    async def caught_up() -> bool:
        return (await stream_lag(env.redis))[0] == 0

    try:
        await env.claim_many(campaign_id, range(100))
        await wait_until(caught_up, 20, "flusher did not catch up")
        await env.redis.xgroup_destroy(stream, keys.FLUSH_GROUP)  # what the failover lost
        await env.claim_many(campaign_id, range(100, 300))
        await wait_until(caught_up, 20, "flusher did not make the lost group again")
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 20)
    finally:
        await cancel(task)
        await r.aclose()
    await assert_exact(env, campaign_id)
    assert len(await pg_vouchers(env.pool, campaign_id)) == 300


async def test_trim_keeps_unacknowledged_after_partial_failure(env: Env) -> None:
    campaign_id = await env.new_campaign()
    stream = keys.CampaignKeys(campaign_id).events
    await env.claim_many(campaign_id, range(600))

    ra = env.redis_client()
    try:
        a = Flusher(ra, env.pool, consumer="host-a", batch=1)
        await a.streams()
        # two batches go through (acknowledged and trimmed), the third is left pending
        fail_once(ra, "xack", RedisConnectionError("lost"), on_call=3)
        with pytest.raises(RedisConnectionError):
            await a.drain()
    finally:
        await ra.aclose()
    stuck = await pending_ids(env.redis, stream)
    assert stuck
    assert await env.redis.xlen(stream) >= len(stuck)

    rb = env.redis_client()
    try:
        b = Flusher(rb, env.pool, consumer="host-b", batch=1, claim_idle_ms=60_000)
        # host-b flushes newer entries and trims behind itself, around host-a's leftovers
        while await b.flush_once(block_ms=None):
            pending = await pending_ids(env.redis, stream)
            assert await env.redis.xlen(stream) >= len(pending)
            for mid in pending:
                assert await env.redis.xrange(stream, min=mid, max=mid), (
                    f"pending entry {mid!r} was trimmed"
                )
        assert await pending_ids(env.redis, stream) == stuck
        b.claim_idle_ms = 0
        held = await stream_events(env.redis, stream, stuck)
        assert await b.rescue(await b.streams()) == len(held)
    finally:
        await rb.aclose()
    await assert_exact(env, campaign_id)


async def test_trim_with_two_live_flushers(env: Env) -> None:
    """Two flushers (two `issuer serve` hosts) share the group. Host A trims after its
    XACK while host B has just read newer entries: B's unacknowledged entries must stay in
    the stream, so that if B dies they can still be rescued. (The trim floor is read and
    applied in one script, so no interleaving can slip between the two.)"""
    campaign_id = await env.new_campaign()
    stream = keys.CampaignKeys(campaign_id).events
    r0 = env.redis_client()
    try:
        await Flusher(r0, env.pool, consumer="host-a").drain()
    finally:
        await r0.aclose()
    await env.claim_many(campaign_id, range(200))

    ra, rb = env.redis_client(), env.redis_client()
    try:
        a = Flusher(ra, env.pool, consumer="host-a", batch=1000)
        b = Flusher(rb, env.pool, consumer="host-b", batch=1000)
        streams = await a.streams()
        await b.streams()
        batch_a = await a.read(streams, ">", None)
        await env.claim_many(campaign_id, range(200, 400))

        # B reads the newer entries before A trims: A's trim must leave them in the stream
        got = await b.read(streams, ">", None)
        read_b = [entry_id for s, e in got if s == stream for entry_id, _ in e]
        assert len(await stream_events(env.redis, stream, read_b)) == 200
        await a.record(batch_a)
        # host B dies here, before writing its batch to PostgreSQL
    finally:
        await ra.aclose()
        await rb.aclose()

    pending = await pending_ids(env.redis, stream)
    assert pending == read_b
    present = [m for m in pending if await env.redis.xrange(stream, min=m, max=m)]
    assert len(present) == len(pending), (
        f"{len(pending) - len(present)} of {len(pending)} unacknowledged entries were trimmed"
    )

    await asyncio.sleep(0.1)
    rc = env.redis_client()
    try:
        c = Flusher(rc, env.pool, consumer="host-c", claim_idle_ms=50)
        await c.rescue(await c.streams())
        await c.drain()
    finally:
        await rc.aclose()
    await assert_exact(env, campaign_id)


# ------------------------------------------------------------------ what keeps a batch cheap


class StatementLog:
    """The flusher's pool, logging every statement its connections run (BEGIN and COMMIT
    included), so that a test sees which statements a batch costs."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.statements: list[str] = []

    def _log(self, query: Any) -> None:
        self.statements.append(query.query)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire() as conn:
            conn.add_query_logger(self._log)
            try:
                yield conn
            finally:
                conn.remove_query_logger(self._log)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args)

    def take(self) -> list[str]:
        """The statements since the last take, each named as issuer.store names it."""
        names = {store.RECORD_BATCH: "RECORD_BATCH", store.RECORD_CLAIMS: "RECORD_CLAIMS"}
        names[store.RECORD_STATUS] = "RECORD_STATUS"
        for i, (_, statement) in enumerate(store.PROJECT_MONEY):
            names[statement] = f"PROJECT_MONEY[{i}]"
        taken = [names.get(s, s.strip().rstrip(";").upper()) for s in self.statements]
        self.statements.clear()
        return taken


_entry_ms = itertools.count(int(time.time() * 1000))


def entry(kind: str, doc: dict[str, Any]) -> tuple[bytes, dict[bytes, bytes]]:
    return f"{next(_entry_ms)}-0".encode(), {b"t": kind.encode(), b"d": msgspec.json.encode(doc)}


def claim_doc(campaign_id: str, n: int) -> dict[str, Any]:
    now = int(time.time() * 1000)
    return {
        "campaign_id": campaign_id,
        "discount_rate_bp": 1000,
        "cap_fen": 200_000,
        "voucher_id": f"{campaign_id}.{n:020x}",
        "round_id": "r1",
        "user_id": f"u-{n}",
        "person_ref": f"p-{n}",
        "status": "issued",
        "issued_at": now,
        "expires_at": now + 86_400_000,
        "reserve_fen": 200_000,
        "request": [f"k:{n}", "f"],
    }


def redemption_doc(claim: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time() * 1000)
    return {
        "redemption_id": f"{claim['voucher_id']}.r",
        "voucher_id": claim["voucher_id"],
        "round_id": claim["round_id"],
        "user_id": claim["user_id"],
        "merchant_id": "m-1",
        "order_id": f"o-{claim['voucher_id']}",
        "order_amount_fen": 1_000_000,
        "discount_fen": 100_000,
        "payable_fen": 900_000,
        "paid_at": now,
        "redeemed_at": now,
        "items": [],
        "overdrawn_fen": 0,
    }


async def voucher_states(pool: asyncpg.Pool, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    rows = await pool.fetch(
        "SELECT voucher_id, status, redemption_id FROM vouchers WHERE voucher_id = ANY($1)", ids
    )
    return {r["voucher_id"]: (r["status"], r["redemption_id"]) for r in rows}


async def test_claim_only_batch_is_one_statement_and_rescues_late_claims(env: Env) -> None:
    """A batch of claims alone is one statement (RECORD_CLAIMS: no transaction, no money
    projection), yet a claim recorded after its voucher's redemption, expiry or refund (a
    batch rescued late) starts in the state those events left; a re-delivered batch
    changes nothing. Mixed batches run only the projections their event types concern."""
    campaign_id = unique_id("fl")
    stream = keys.CampaignKeys(campaign_id).events
    await env.redis.xgroup_create(stream, keys.FLUSH_GROUP, id="0", mkstream=True)
    log = StatementLog(env.pool)
    r = env.redis_client()
    try:
        flusher = Flusher(r, cast(asyncpg.Pool, log), consumer="statements")
        claims = [claim_doc(campaign_id, n) for n in range(6)]
        redeemed, expired, refunded, together = claims[1], claims[2], claims[3], claims[4]
        refund = {
            "refund_id": f"{refunded['voucher_id']}.f",
            "redemption_id": f"{refunded['voucher_id']}.r",
            "voucher_id": refunded["voucher_id"],
            "amount_fen": 1_000_000,
            "subsidy_returned_fen": 100_000,
            "clawback_due_fen": 0,
            "reason": "test",
            "created_at": int(time.time() * 1000),
            "voucher_status": "refunded",
        }
        expiry = {"voucher_id": expired["voucher_id"], "round_id": "r1", "reserve_fen": 200_000}
        # the money events of three vouchers arrive first (their claims were rescued late)
        early = [
            entry("redemption", redemption_doc(redeemed)),
            entry("expiry", {**expiry, "expired_at": int(time.time() * 1000)}),
            entry("redemption", redemption_doc(refunded)),
            entry("refund", refund),
        ]
        assert await flusher.record([(stream, early)]) == 4
        assert log.take() == [
            "BEGIN",
            "RECORD_BATCH",
            "PROJECT_MONEY[0]",
            "PROJECT_MONEY[1]",
            "PROJECT_MONEY[2]",
            "COMMIT",
        ]

        late = [entry("claim", c) for c in claims[:4]]
        assert await flusher.record([(stream, late)]) == 4
        assert log.take() == ["RECORD_CLAIMS"]
        want = {
            claims[0]["voucher_id"]: ("issued", None),
            redeemed["voucher_id"]: ("redeemed", redemption_doc(redeemed)["redemption_id"]),
            expired["voucher_id"]: ("expired", None),
            refunded["voucher_id"]: ("refunded", refund["redemption_id"]),
        }
        ids = list(want)
        assert await voucher_states(env.pool, ids) == want

        # re-delivered: the same statement, nothing changes
        assert await flusher.record([(stream, late)]) == 4
        assert log.take() == ["RECORD_CLAIMS"]
        assert await voucher_states(env.pool, ids) == want
        assert await env.pool.fetchval(
            "SELECT count(*) FROM events WHERE stream = $1", stream
        ) == len(early) + len(late)

        # a claim and its redemption in one batch, with a status change: the voucher
        # projection runs after RECORD_BATCH; refunds are not concerned
        mixed = [
            entry("claim", together),
            entry("redemption", redemption_doc(together)),
            entry("claim", claims[5]),
            entry("status", {"status": "paused", "version": 2}),
        ]
        assert await flusher.record([(stream, mixed)]) == 4
        assert log.take() == [
            "BEGIN",
            "RECORD_BATCH",
            "RECORD_STATUS",
            "PROJECT_MONEY[0]",
            "PROJECT_MONEY[1]",
            "COMMIT",
        ]
        assert await voucher_states(
            env.pool, [together["voucher_id"], claims[5]["voucher_id"]]
        ) == {
            together["voucher_id"]: ("redeemed", redemption_doc(together)["redemption_id"]),
            claims[5]["voucher_id"]: ("issued", None),
        }
        assert await pending_ids(env.redis, stream) == []
    finally:
        await r.aclose()


async def test_run_gathers_a_trickle_into_few_batches(env: Env) -> None:
    """Under steady traffic run() lets `linger_ms` pass between reads, so that each
    transaction carries many entries rather than one or two; nothing waits longer than
    that, and everything arrives exactly once."""
    campaign_id = await env.new_campaign()
    r = env.redis_client()
    try:
        await Flusher(r, env.pool, consumer="trickle").drain()
        flusher = Flusher(r, env.pool, consumer="trickle", linger_ms=300)
        sizes: list[int] = []
        record = flusher.record

        async def counted(batches: Any) -> int:
            done = await record(batches)
            if done:
                sizes.append(done)
            return done

        flusher.record = counted  # type: ignore[method-assign]
        stop = asyncio.Event()
        task = asyncio.create_task(flusher.run(stop))
        for start in range(0, 60, 2):  # 60 claims over about 1.5 s
            await env.claim_many(campaign_id, range(start, start + 2))
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 20)
    finally:
        await r.aclose()
    assert sum(sizes) == 60
    assert len(sizes) <= 15, f"{len(sizes)} batches for 60 claims: {sizes}"
    await assert_exact(env, campaign_id)


# ------------------------------------------------------------------ the stream's two formats


async def test_a_stream_of_both_formats_flushes_each_claim_once(env: Env) -> None:
    """A stream written before the claims of a batch were gathered (an entry per claim)
    and after (an entry per batch, `d` the JSON array of its vouchers): each claim is
    recorded once, a gathered one under its entry's id and place, also when a batch is
    committed, not acknowledged, and delivered again."""
    campaign_id = unique_id("fl")
    stream = keys.CampaignKeys(campaign_id).events
    await env.redis.xgroup_create(stream, keys.FLUSH_GROUP, id="0", mkstream=True)
    claims = [claim_doc(campaign_id, n) for n in range(7)]

    async def add(docs: Any) -> str:
        entry_id = await env.redis.xadd(stream, {"t": "claim", "d": msgspec.json.encode(docs)})
        return str(entry_id.decode())

    old = [await add(claims[0]), await add(claims[1])]
    gathered = await add(claims[2:5])
    alone = await add(claims[5:6])
    last = await add(claims[6])
    want = {
        old[0]: claims[0],
        old[1]: claims[1],
        **{f"{gathered}-{i}": claims[2 + i] for i in range(3)},
        f"{alone}-0": claims[5],
        last: claims[6],
    }
    r = env.redis_client()

    async def flush(flusher: Flusher) -> int:  # this stream only (no campaign registered)
        done = await flusher.drain_pending([stream])
        while batches := [b for b in await flusher.read([stream], ">", None) if b[1]]:
            done += await flusher.record(batches)
        return done

    try:
        # the second batch (the gathered entry and the one after it) is committed, then the
        # connection is lost before its XACK
        fail_once(r, "xack", RedisConnectionError("lost before XACK"), on_call=2)
        with pytest.raises(RedisConnectionError):
            await flush(Flusher(r, env.pool, consumer="formats", batch=2))
        assert await pending_ids(env.redis, stream) == [gathered.encode(), alone.encode()]
        assert await flush(Flusher(r, env.pool, consumer="formats", batch=2)) == 5
    finally:
        await r.aclose()
    rows = await env.pool.fetch(
        "SELECT e.entry_id, e.type, e.data, v.entry_id AS voucher_entry FROM events e"
        " LEFT JOIN vouchers v ON v.voucher_id = e.data->>'voucher_id' WHERE e.stream = $1",
        stream,
    )
    assert len(rows) == len(want)
    assert {r["entry_id"]: msgspec.json.decode(r["data"]) for r in rows} == want
    assert all(r["type"] == "claim" and r["voucher_entry"] == r["entry_id"] for r in rows)
    assert await pending_ids(env.redis, stream) == []
    assert await env.redis.xlen(stream) == 0


# RECORD_CLAIMS before entries were gathered: each entry's `d` one claim (VOUCHERS_NEW is
# unchanged)
OLDER_RECORD_CLAIMS = (
    """
WITH new AS (
    INSERT INTO events (stream, entry_id, campaign_id, type, data)
    SELECT s, e, nullif(c, ''), 'claim', d::jsonb
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS x(s, e, c, d)
    ON CONFLICT DO NOTHING
    RETURNING entry_id, campaign_id, type, data
), vouchers_new AS ("""
    + store.VOUCHERS_NEW
    + """)
SELECT count(*) FROM new
"""
)


async def test_an_older_flusher_refuses_a_gathered_entry(env: Env) -> None:
    """A flusher of a release before gathered entries (in a rolling deploy) records an
    entry's `d` as one claim: of a gathered entry, a voucher without an id, which its
    statement refuses (NOT NULL), so that the entry stays pending for a newer flusher
    rather than being acknowledged without its vouchers."""
    campaign_id = unique_id("fl")
    stream = keys.CampaignKeys(campaign_id).events
    claims = [claim_doc(campaign_id, n) for n in range(2)]
    args = [stream], ["1-0"], [campaign_id]
    with pytest.raises(asyncpg.NotNullViolationError):
        await env.pool.fetchval(OLDER_RECORD_CLAIMS, *args, [msgspec.json.encode(claims).decode()])
    assert await env.pool.fetchval("SELECT count(*) FROM events WHERE stream = $1", stream) == 0
    # while it records an entry of one claim as this release does
    assert (
        await env.pool.fetchval(
            OLDER_RECORD_CLAIMS, *args, [msgspec.json.encode(claims[0]).decode()]
        )
        == 1
    )
