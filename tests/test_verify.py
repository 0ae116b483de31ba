"""`loadtest.verify` against a real little surge: every check passes, then each invariant is
broken on purpose, the verifier names the check that fails, and the damage is undone."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from issuer import keys
from loadtest.verify import Check, load_told, main, verify
from tests.conftest import Keyspace, Service, unique_id
from tests.money import issue, new_campaign, new_merchant, payment, redeem, refund
from tests.people import campaign, claim

QUOTA = 20
CLAIMS = 60
SAME = "Redis vouchers == PostgreSQL vouchers"
MONEY = "Redis money == PostgreSQL money"
QUOTA_CHECK = "issued ≤ quota per round"
ISSUANCE = "claims' reservations ≤ round budget"
LEDGER = "reserved + spent ≤ round budget + overdrawn"
UNTOLD = "no voucher that no client was told about"
UNKNOWN = "every voucher told to a client exists"


@dataclass(frozen=True)
class Surge:
    campaign_id: str
    told: frozenset[str]


@pytest.fixture(scope="module")
async def surge(service: Service) -> Surge:
    """A campaign of QUOTA vouchers claimed by CLAIMS people at once; told = the 201s."""
    campaign_id = unique_id("vf")
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(quota=QUOTA))
    assert resp.status == 201, resp.body
    app = service.client("app")
    path = f"/v1/campaigns/{campaign_id}/claims"
    answers = await asyncio.gather(*(app.call("POST", path, claim(n)) for n in range(CLAIMS)))
    told = frozenset(a.body["voucher_id"] for a in answers if a.status == 201)
    assert len(told) == QUOTA
    await service.drained()  # the forged rows below copy recorded ones
    return Surge(campaign_id, told)


def failing(checks: list[Check]) -> set[str]:
    return {c.name for c in checks if not c.ok}


async def run(redis: Redis, pg: asyncpg.Pool, s: Surge, told: set[str] | None = None) -> set[str]:
    """Names of the failed checks, with the surge's told set unless another is given."""
    checks = await verify(redis, pg, s.campaign_id, set(s.told) if told is None else told)
    return failing(checks)


async def test_clean_surge_passes(redis: Redis, pg: asyncpg.Pool, surge: Surge) -> None:
    checks = await verify(redis, pg, surge.campaign_id, set(surge.told))
    assert not failing(checks), [c.line for c in checks]
    assert [c.name for c in checks] == [
        "flusher drained",
        QUOTA_CHECK,
        ISSUANCE,
        LEDGER,
        "one voucher per person",
        "one voucher per account",
        "ledger balances",
        MONEY,
        SAME,
        UNKNOWN,
        UNTOLD,
    ]
    assert checks[1].detail == f"r1: Redis {QUOTA}, PostgreSQL {QUOTA}, quota {QUOTA}"
    without_told = await verify(redis, pg, surge.campaign_id, None)
    assert [c.name for c in without_told] == [c.name for c in checks[:-2]]


async def test_main_prints_and_exits(
    keyspace: Keyspace, surge: Surge, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = sorted(surge.told)
    (tmp_path / "told-1.txt").write_text("\n".join(ids[:5]) + "\n\n")
    (tmp_path / "told-2.txt").write_text("\n".join([*ids[5:], "other-campaign.abc"]) + "\n")
    argv = [
        "--campaign",
        surge.campaign_id,
        "--redis-url",
        keyspace.redis_url,
        "--database-url",
        keyspace.database_url,
        "--told",
    ]
    assert await asyncio.to_thread(main, [*argv, str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12 and all(line.startswith("PASS ") for line in lines), lines

    assert await asyncio.to_thread(main, [*argv, str(tmp_path / "told-1.txt")]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {UNTOLD}: {QUOTA - 5} vouchers" in out
    assert out.splitlines()[-1].startswith(f"FAIL 1 of 11 checks of {surge.campaign_id}")


@pytest.mark.fast
def test_load_told(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("c.1\n\n  c.2  \n")
    (tmp_path / "b.txt").write_text("c.2\nd.3\n")
    (tmp_path / "notes.csv").write_text("c.9\n")
    extra = tmp_path / "extra.list"
    extra.write_text("c.4\n")
    assert load_told([tmp_path, extra]) == {"c.1", "c.2", "d.3", "c.4"}


@pytest.mark.fast
def test_main_needs_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--campaign", "x"])
    assert exc.value.code == 2


@pytest.fixture
async def forged(
    pg: asyncpg.Pool, surge: Surge, request: pytest.FixtureRequest
) -> AsyncIterator[None]:
    """One more voucher row in PostgreSQL: a stranger's, or a second for someone who has one."""
    person, user = {
        "stranger": ("'forged-person'", "'forged-user'"),
        "same person": ("person_ref", "'forged-user'"),
        "same account": ("'forged-person'", "user_id"),
    }[request.param]
    fake = f"{surge.campaign_id}.forged{secrets.token_hex(4)}"
    await pg.execute(
        "INSERT INTO vouchers (voucher_id, campaign_id, round_id, user_id, person_ref, status,"
        " issued_at, expires_at, reserve_fen, discount_rate_bp, cap_fen, entry_id)"
        f" SELECT $2, campaign_id, round_id, {user}, {person}, status,"
        " issued_at, expires_at, reserve_fen, discount_rate_bp, cap_fen, '0-1'"
        " FROM vouchers WHERE campaign_id = $1 LIMIT 1",
        surge.campaign_id,
        fake,
    )
    yield
    await pg.execute("DELETE FROM vouchers WHERE voucher_id = $1", fake)


@pytest.mark.parametrize(
    ("forged", "also"),
    [
        ("stranger", set()),
        ("same person", {"one voucher per person"}),
        ("same account", {"one voucher per account"}),
    ],
    indirect=["forged"],
)
async def test_extra_voucher_in_postgres(
    redis: Redis, pg: asyncpg.Pool, surge: Surge, forged: None, also: set[str]
) -> None:
    # one row over the quota, in PostgreSQL only, that no client heard of
    # its reservation is money Redis never held
    assert await run(redis, pg, surge) == {SAME, QUOTA_CHECK, UNTOLD, MONEY, *also}


async def test_round_issued_over_quota(redis: Redis, pg: asyncpg.Pool, surge: Surge) -> None:
    rnd = keys.CampaignKeys(surge.campaign_id).round("r1")
    await redis.hincrby(rnd, "issued", 1)
    try:
        assert await run(redis, pg, surge) == {QUOTA_CHECK}
    finally:
        await redis.hincrby(rnd, "issued", -1)
    assert await run(redis, pg, surge) == set()


async def test_round_reserved_over_budget(redis: Redis, pg: asyncpg.Pool, surge: Surge) -> None:
    rnd = keys.CampaignKeys(surge.campaign_id).round("r1")
    reserved = int(await redis.hget(rnd, "reserved"))
    await redis.hset(rnd, "budget", reserved - 1)
    try:
        assert await run(redis, pg, surge) == {ISSUANCE, LEDGER}
    finally:
        await redis.hset(rnd, "budget", -1)
    assert await run(redis, pg, surge) == set()


async def test_ledger_available_changed(redis: Redis, pg: asyncpg.Pool, surge: Surge) -> None:
    ledger = keys.CampaignKeys(surge.campaign_id).ledger
    await redis.hincrby(ledger, "available", 1)
    try:
        assert await run(redis, pg, surge) == {"ledger balances"}
    finally:
        await redis.hincrby(ledger, "available", -1)
    assert await run(redis, pg, surge) == set()


async def test_money_moved_without_a_record(redis: Redis, pg: asyncpg.Pool, surge: Surge) -> None:
    """A balanced ledger that claims a spend PostgreSQL never saw."""
    ledger = keys.CampaignKeys(surge.campaign_id).ledger
    await redis.hincrby(ledger, "spent", 5)
    await redis.hincrby(ledger, "available", -5)
    try:
        assert await run(redis, pg, surge) == {MONEY}
    finally:
        await redis.hincrby(ledger, "spent", -5)
        await redis.hincrby(ledger, "available", 5)
    assert await run(redis, pg, surge) == set()


@pytest.mark.parametrize(
    ("index", "check"),
    [("persons", "one voucher per person"), ("accounts", "one voucher per account")],
)
async def test_index_entry_lost_in_redis(
    redis: Redis, pg: asyncpg.Pool, surge: Surge, index: str, check: str
) -> None:
    key = getattr(keys.CampaignKeys(surge.campaign_id), index)
    field, voucher_id = next(iter((await redis.hgetall(key)).items()))
    await redis.hdel(key, field)
    try:
        assert await run(redis, pg, surge) == {check}
    finally:
        await redis.hset(key, field, voucher_id)
    assert await run(redis, pg, surge) == set()


async def test_voucher_nobody_was_told_about(redis: Redis, pg: asyncpg.Pool, surge: Surge) -> None:
    told = set(surge.told)
    dropped = told.pop()
    checks = await verify(redis, pg, surge.campaign_id, told)
    assert failing(checks) == {UNTOLD}
    assert dropped in checks[-1].detail


async def test_told_voucher_that_does_not_exist(
    redis: Redis, pg: asyncpg.Pool, surge: Surge
) -> None:
    unknown = f"{surge.campaign_id}.{secrets.token_hex(10)}"
    other_campaign = f"{unique_id('vf')}.{secrets.token_hex(10)}"
    assert await run(redis, pg, surge, {*surge.told, other_campaign}) == set()
    checks = await verify(redis, pg, surge.campaign_id, {*surge.told, unknown})
    assert failing(checks) == {UNKNOWN}
    assert unknown in checks[-2].detail


async def test_flusher_not_drained(redis: Redis, pg: asyncpg.Pool) -> None:
    """A claim held by a dead consumer: the flusher takes it over only after a minute."""
    campaign_id = unique_id("vf")
    stream = keys.CampaignKeys(campaign_id).events
    await redis.xgroup_create(stream, keys.FLUSH_GROUP, id="0", mkstream=True)
    event = {"voucher_id": f"{campaign_id}.{secrets.token_hex(10)}", "round_id": "r1"}
    await redis.xadd(stream, {"t": "claim", "d": msgspec.json.encode(event)})
    await redis.xreadgroup(keys.FLUSH_GROUP, "dead-host", {stream: ">"}, count=1)
    await redis.sadd(keys.CAMPAIGNS, campaign_id)
    try:
        checks = await verify(redis, pg, campaign_id, None, drain_timeout=0.3)
    finally:
        await redis.srem(keys.CAMPAIGNS, campaign_id)
        await redis.delete(stream)
    assert checks[0].name == "flusher drained" and not checks[0].ok
    assert "1 events of" in checks[0].detail and "after 0.3 s" in checks[0].detail


RESERVE = 50_000  # below the cap (200,000): a discount above it comes from the pool


@pytest.fixture(scope="module")
async def overdrawn(service: Service) -> str:
    """A round whose claims reserved all of its budget (3 x RESERVE), then a discount of
    100,000 on one voucher (50,000 above its reservation, from the campaign pool) and a
    refund of a fifth of that order (its 20,000 of subsidy repay the overdraw first)."""
    campaign_id = await new_campaign(
        service, quota=None, reserve_fen=RESERVE, round_budget_fen=3 * RESERVE
    )
    vouchers = [await issue(service, campaign_id, 7_000 + n) for n in range(3)]
    resp = await service.call("POST", f"/v1/campaigns/{campaign_id}/claims", claim(7_003), "app")
    assert resp.body["error"]["code"] == "ROUND_BUDGET_EXHAUSTED", resp.body
    merchant = await new_merchant(service)
    paid = await redeem(service, payment(vouchers[0], merchant, 1_000_000))
    assert paid.status == 201 and paid.body["discount_fen"] == 100_000, paid.body
    assert (
        await refund(service, paid.body["redemption_id"], 200_000, "vf-overdraw-1")
    ).status == 201
    rnd = (await service.call("GET", f"/v1/campaigns/{campaign_id}")).body["current_round"]
    assert (rnd["reserved_fen"], rnd["spent_fen"], rnd["overdrawn_fen"]) == (
        100_000,
        80_000,
        30_000,
    )
    assert rnd["reserved_fen"] + rnd["spent_fen"] > rnd["budget_fen"]  # what FAILed before
    return campaign_id


async def overdrawn_failures(redis: Redis, pg: asyncpg.Pool, campaign_id: str) -> set[str]:
    return failing(await verify(redis, pg, campaign_id, None))


async def test_a_round_overdrawn_by_the_rules_passes(
    redis: Redis, pg: asyncpg.Pool, overdrawn: str
) -> None:
    checks = {c.name: c for c in await verify(redis, pg, overdrawn, None)}
    assert not failing(list(checks.values())), [c.line for c in checks.values()]
    assert checks[ISSUANCE].detail == "r1: 100000 held + 50000 spent from reservations of 150000"
    assert checks[LEDGER].detail == "r1: 100000 reserved + 80000 spent, 30000 overdrawn of 150000"


@pytest.mark.parametrize(
    ("overdraw", "budget", "fails"),
    [
        # the round took the discount above the reservation from its own budget (no
        # overdraw recorded): it holds more than its budget
        (-30_000, 0, {LEDGER}),
        # an overdraw the rules do not make of the rows, hiding money the round lacks
        (10_000, -10_000, {LEDGER, ISSUANCE}),
        # claims reserved more than the round budget
        (0, -1, {LEDGER, ISSUANCE}),
    ],
)
async def test_a_round_overdrawn_against_the_rules_fails(
    redis: Redis, pg: asyncpg.Pool, overdrawn: str, overdraw: int, budget: int, fails: set[str]
) -> None:
    rnd = keys.CampaignKeys(overdrawn).round("r1")
    await redis.hincrby(rnd, "overdrawn", overdraw)
    await redis.hincrby(rnd, "budget", budget)
    try:
        assert await overdrawn_failures(redis, pg, overdrawn) == fails
    finally:
        await redis.hincrby(rnd, "overdrawn", -overdraw)
        await redis.hincrby(rnd, "budget", -budget)
    assert await overdrawn_failures(redis, pg, overdrawn) == set()
