"""`issuer rebuild`: after a Redis loss (FLUSHDB of this module's database under the running
service), campaigns rebuilt from PostgreSQL hold exactly what Redis held, reconcile, and the
service carries on with them; through the function and through the command."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from issuer import carry, expiry, keys
from issuer.rebuild import RebuildRefused, TextBar, rebuild, restore_global
from issuer.reconcile import reconcile
from issuer.redemptions import mark_paid
from issuer.schedule import to_millis
from issuer.scripts import Scripts
from tests.conftest import ROOT, Keyspace, Service, unique_id
from tests.money import gather, issue, ledger, new_campaign, new_merchant, payment, redeem, refund
from tests.people import campaign, claim, id_number, iso

TOPOLOGIES = ("standalone", "cluster")  # issuer rebuild --all on one server and a cluster
PERSONS = itertools.count(600_000)  # this module's persons: 600,000 and up
SELF_CLAIMS = 150
ROUND_BUDGET = 10**9
OVERDRAWING = 800_000  # an order whose discount (80,000) is above a 50,000 reservation
# a claim's event as releases before vouchers carried their request recorded it
AS_OLDER_RELEASES = """
UPDATE events SET data = data - 'request' WHERE type = 'claim' AND data->>'voucher_id' = $1
"""


@dataclass
class Workload:
    active: str  # self mode; paused then resumed; its round budget compare-and-set
    paused: str  # staff mode, carry-over, expired vouchers; left paused
    small: str  # a few claims, for the events-in-flight test
    merchant: str
    claimed: list[int]  # persons holding a voucher of `active`
    unrefunded: list[dict[str, Any]]  # redemptions of `active` never refunded
    clawback_due: str  # a refund of `active` whose clawback is not repaid
    first_claim: dict[str, Any]  # the request of the first claim, and its answer
    first_payment: dict[str, Any]  # the request of the first redemption, and its answer
    first_refund: dict[str, Any]  # the same for the first refund (a third of the order)

    @property
    def campaigns(self) -> list[str]:
        return [self.active, self.paused, self.small]


def ok(resp: Any, status: int = 201) -> Any:
    assert resp.status == status, resp.body
    return resp.body


async def put_campaign(service: Service, body: dict[str, Any]) -> str:
    campaign_id = unique_id("rb")
    ok(await service.call("PUT", f"/v1/campaigns/{campaign_id}", body))
    return campaign_id


async def status_change(service: Service, campaign_id: str, action: str) -> None:
    body = {"request_id": f"rb-{action}-{campaign_id}", "reason": "drill"}
    ok(await service.call("POST", f"/v1/campaigns/{campaign_id}/{action}", body), 200)


async def refund_ok(service: Service, redemption: dict[str, Any], share: int, tag: str) -> Any:
    amount = redemption["order_amount_fen"] // share
    return ok(await refund(service, redemption["redemption_id"], amount, f"rb-{tag}"))


async def active_campaign(service: Service, redis: Redis, merchant: str) -> dict[str, Any]:
    """150 claims at once, 40 redemptions, partial and full refunds, a reimbursement mark
    and refunds after it (clawbacks, one repaid), a pause and resume, a round budget CAS."""
    campaign_id = await put_campaign(service, campaign(quota=1000, round_budget_fen=ROUND_BUDGET))
    claimed = [next(PERSONS) for _ in range(SELF_CLAIMS)]
    first_claim = claim(claimed[0], request_id="rb-claim-first")
    path = f"/v1/campaigns/{campaign_id}/claims"
    first = ok(await service.call("POST", path, first_claim, "app"))
    others = await asyncio.gather(*(issue(service, campaign_id, n) for n in claimed[1:]))
    vouchers = [first, *others]
    payments = [payment(v, merchant, 500_000 + 79_193 * i) for i, v in enumerate(vouchers[:40])]
    paid = await asyncio.gather(*(redeem(service, body) for body in payments))
    redemptions = [ok(resp) for resp in paid]
    refunded = await asyncio.gather(
        *(refund_ok(service, r, 3, f"part-{i}") for i, r in enumerate(redemptions[:10])),
        *(refund_ok(service, r, 1, f"full-{i}") for i, r in enumerate(redemptions[10:15])),
    )
    reimbursed = [r["redemption_id"] for r in redemptions[15:25]]
    assert await mark_paid(Scripts(redis), campaign_id, "rb-batch-1", reimbursed) == reimbursed
    clawbacks = await asyncio.gather(
        *(refund_ok(service, r, 2, f"claw-{i}") for i, r in enumerate(redemptions[15:20]))
    )
    assert {c["status"] for c in clawbacks} == {"clawback_due"}
    repaid = {"request_id": "rb-repaid-0001", "reason": "merchant paid back"}
    path = f"/v1/clawbacks/{clawbacks[0]['refund_id']}/repaid"
    ok(await service.call("POST", path, repaid, "auditor"), 200)
    await status_change(service, campaign_id, "pause")
    await status_change(service, campaign_id, "resume")
    cas = {"request_id": "rb-budget-0001", "expected_budget_fen": ROUND_BUDGET}
    cas |= {"budget_fen": ROUND_BUDGET - 10**8, "quota": 900}
    path = f"/v1/campaigns/{campaign_id}/rounds/r1/budget"
    ok(await service.call("POST", path, cas), 200)
    return {
        "active": campaign_id,
        "claimed": claimed,
        "unrefunded": redemptions[25:],
        "clawback_due": clawbacks[1]["refund_id"],
        "first_claim": {"request": first_claim, "answer": first},
        "first_payment": {"request": payments[0], "answer": redemptions[0]},
        "first_refund": {"of": redemptions[0], "answer": refunded[0]},
    }


def two_rounds(now: datetime) -> list[dict[str, Any]]:
    """r1 open now, r2 from when r1 closes; each 100 vouchers and 20,000 CNY."""
    hour = timedelta(hours=1)
    starts = [(now - timedelta(seconds=5), now + hour), (now + hour, now + 3 * hour)]
    return [
        {
            "round_id": f"r{i}",
            "opens_at": iso(opens),
            "closes_at": iso(closes),
            "valid_until": iso(closes + hour),
            "quota": 100,
            "budget_fen": 2_000_000,
        }
        for i, (opens, closes) in enumerate(starts, start=1)
    ]


async def register(service: Service, campaign_id: str, n: int) -> None:
    person = {"id_number": id_number(n), "name": "测试", "phone": f"1391234{n % 10**4:04d}"}
    body = {"request_id": f"rb-reg-{n}", "user_id": f"u{n}", "person": person}
    ok(await service.call("POST", f"/v1/campaigns/{campaign_id}/registrations", body, "app"))


async def staff_claim(service: Service, campaign_id: str, n: int) -> Any:
    """Person n registers and claims at the counter."""
    await register(service, campaign_id, n)
    body = claim(n, request_id=f"rb-staff-{n}", staff_id="clerk-rb")
    return ok(await service.call("POST", f"/v1/campaigns/{campaign_id}/claims", body, "merchant"))


async def paused_campaign(service: Service, redis: Redis, merchant: str) -> str:
    """Staff mode: 30 registrations, 25 counter claims, 5 redemptions (3 with a discount
    above the reservation, which overdraws r1; a third of one of those refunded); r1's
    unused budget carried to r2 once r1 closed, its vouchers expired and the freed budget
    carried too; left paused."""
    now = datetime.now(UTC)
    body = campaign(mode="staff", reserve_fen=50_000)
    campaign_id = await put_campaign(
        service, body | {"carry_over": True, "rounds": two_rounds(now)}
    )
    persons = [next(PERSONS) for _ in range(30)]
    vouchers = await asyncio.gather(*(staff_claim(service, campaign_id, n) for n in persons[:25]))
    await asyncio.gather(*(register(service, campaign_id, n) for n in persons[25:]))
    paid = [
        ok(await redeem(service, payment(v, merchant, amount)))
        for v, amount in zip(vouchers[:5], (300_000, 300_000, *[OVERDRAWING] * 3), strict=True)
    ]
    await refund_ok(service, paid[-1], 3, f"overdraw-{campaign_id}")
    scripts = Scripts(redis)
    r1_closes = to_millis(now + timedelta(hours=1))
    assert await carry.carry_over(redis, scripts, campaign_id, r1_closes + 1) > 0
    r1_expires = to_millis(now + timedelta(hours=2))
    assert await expiry.sweep(redis, scripts, campaign_id, r1_expires + 1) == 20
    assert await carry.carry_over(redis, scripts, campaign_id, r1_expires + 1) == 20 * 50_000
    await status_change(service, campaign_id, "pause")
    return campaign_id


@pytest.fixture(scope="module")
async def workload(service: Service, redis: Redis) -> Workload:
    merchant = await new_merchant(service)
    active = await active_campaign(service, redis, merchant)
    paused = await paused_campaign(service, redis, merchant)
    small = await put_campaign(service, campaign())
    for _ in range(3):
        await issue(service, small, next(PERSONS))
    await service.drained()
    return Workload(paused=paused, small=small, merchant=merchant, **active)


# ---------------------------------------------------------------- Redis, as compared


def decoded(raw: bytes) -> Any:
    """A JSON value as an object (field order does not matter), anything else as it is."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw


async def value(redis: Redis, key: bytes) -> Any:
    kind = (await redis.type(key)).decode()
    if kind == "string":
        return decoded(await redis.get(key))
    if kind == "hash":
        return {f: decoded(v) for f, v in (await redis.hgetall(key)).items()}
    if kind == "zset":
        return dict(await redis.zrange(key, 0, -1, withscores=True))
    assert kind == "set", kind
    return await redis.smembers(key)


def short_lived(ck: keys.CampaignKeys, key: str) -> bool:
    """Keys the rebuild cannot restore (nonces, rate windows), restores in part
    (idempotency, winners: `record_requests`) or starts empty (the stream, the merchants'
    version: the campaign's first redemption raises it)."""

    def kind(name: str) -> str:  # "{c:id}:idem:20000" -> "idem"
        return name.removeprefix(f"{ck.tag}:").partition(":")[0]

    buckets = (ck.idempotency(0)[0], ck.nonces(0, 0)[0], ck.rate_window("account", 1, 0))
    return key in (ck.events, ck.winners, ck.merchant_version) or kind(key) in {
        kind(b) for b in buckets
    }


async def snapshot(redis: Redis, campaign_ids: list[str]) -> dict[str, Any]:
    """Every key of the campaigns that a rebuild restores, and the merchants and registry."""
    found = {keys.MERCHANTS: await value(redis, keys.MERCHANTS.encode())}
    found[keys.CAMPAIGNS] = await value(redis, keys.CAMPAIGNS.encode())
    for campaign_id in campaign_ids:
        ck = keys.CampaignKeys(campaign_id)
        async for raw in redis.scan_iter(match=f"{ck.tag}:*", count=1000):
            if not short_lived(ck, raw.decode()):
                found[raw.decode()] = await value(redis, raw)
    return found


async def record_requests(redis: Redis, campaign_ids: list[str], now: float) -> dict[str, Any]:
    """The idempotency records (in the buckets looked in at `now`) of the requests that made
    the campaigns' vouchers, redemptions and refunds, and the winners set: what a rebuild
    restores of them."""
    found: dict[str, Any] = {}
    for campaign_id in campaign_ids:
        ck = keys.CampaignKeys(campaign_id)
        made = {decoded(raw)["request"][0] for raw in await redis.hvals(ck.vouchers)}
        for key in (ck.redemptions, ck.refunds):
            made |= {decoded(raw)["request_key"] for raw in await redis.hvals(key)}
        for bucket in ck.idempotency(now):
            held = await redis.hgetall(bucket)
            found[bucket] = {k: v for k, v in held.items() if k.decode() in made}
        found[ck.winners] = await redis.smembers(ck.winners)
    return found


def assert_same(after: dict[str, Any], before: dict[str, Any]) -> None:
    assert sorted(after) == sorted(before)
    for key, held in before.items():
        assert after[key] == held, key


async def assert_reconciled(redis: Redis, pg: asyncpg.Pool, campaign_ids: list[str]) -> None:
    for campaign_id in campaign_ids:
        report = await reconcile(redis, pg, campaign_id)
        assert report.ok, (campaign_id, report.problems)


async def lose_redis(redis: Redis) -> None:
    """The loss: everything in this module's database, under the running service."""
    await redis.flushdb()


async def unread(redis: Redis, campaign_id: str) -> None:
    """Wait until no flusher has read the campaign's stream for a second: none lists it any
    more (a blocking read lasts 200 ms; a fixed wait was too short on a busy machine)."""
    stream = keys.CampaignKeys(campaign_id).events
    async with asyncio.timeout(30):
        while True:
            consumers = await redis.xinfo_consumers(stream, keys.FLUSH_GROUP)
            if all(consumer["idle"] >= 1000 for consumer in consumers):
                return
            await asyncio.sleep(0.1)


async def lose_campaign(redis: Redis, campaign_id: str) -> None:
    """The loss of one campaign's keys, the flusher first made to leave its stream (it
    reads only registered campaigns)."""
    await redis.srem(keys.CAMPAIGNS, campaign_id)
    await unread(redis, campaign_id)
    tag = keys.CampaignKeys(campaign_id).tag
    await redis.unlink(*[key async for key in redis.scan_iter(match=f"{tag}:*", count=1000)])


def run_rebuild(keyspace: Keyspace, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": keyspace.redis_url, "DATABASE_URL": keyspace.database_url}
    return subprocess.run(
        [sys.executable, "-m", "issuer.cli", "rebuild", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ---------------------------------------------------------------- tests


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.fast
def test_progress_bar_redraws_on_a_terminal_and_prints_tenths_otherwise() -> None:
    log, terminal = io.StringIO(), Terminal()
    steps = range(0, 1001, 5)
    for out in (log, terminal):
        bar = TextBar("c-1", out)
        for done in steps:
            bar(done, 1000)
    lines = log.getvalue().splitlines()
    assert lines[0] == "c-1 [..............................]   0% 0/1000"
    assert lines[-1] == "c-1 [##############################] 100% 1000/1000"
    shares = [line.split("] ")[1].split("%")[0].strip() for line in lines]
    assert shares == [str(10 * i) for i in range(11)]
    drawn = terminal.getvalue()
    assert drawn.count("\r") == len(steps) and drawn.count("\n") == 1 and drawn.endswith("\n")


async def test_rebuild_restores_what_redis_held(
    service: Service, redis: Redis, pg: asyncpg.Pool, workload: Workload
) -> None:
    await assert_reconciled(redis, pg, workload.campaigns)
    before = await snapshot(redis, workload.campaigns)
    now = time.time()
    requests = await record_requests(redis, workload.campaigns, now)
    claims, payments = SELF_CLAIMS + 25 + 3, 40 + 5 + 21  # vouchers; redemptions and refunds
    assert sum(map(len, requests.values())) == 2 * claims + payments  # claims: in winners too
    active, paused = keys.CampaignKeys(workload.active), keys.CampaignKeys(workload.paused)
    refunds = {doc["status"] for doc in before[active.refunds].values()}
    assert refunds == {"returned", "clawback_due", "repaid"}
    statuses = {doc["status"] for doc in before[paused.vouchers].values()}
    assert statuses == {"redeemed", "expired"}
    assert before[paused.ledger][b"status"] == b"paused"
    assert before[paused.round("r2")][b"budget"] > 2_000_000  # carried over
    # 3 x 30,000 above the reservations, less the 26,666 the refund returned
    assert before[paused.round("r1")][b"overdrawn"] == 3 * 30_000 - 26_666
    assert before[active.round("r1")][b"budget"] == ROUND_BUDGET - 10**8

    await lose_redis(redis)
    # the workers answer NOT_FOUND while the campaign is missing, and write nothing
    body = claim(next(PERSONS))
    path = f"/v1/campaigns/{workload.active}"
    assert (await service.call("POST", f"{path}/claims", body, "app")).status == 404
    assert (await service.call("GET", path)).status == 404

    assert await restore_global(redis, pg) == 1
    calls: list[tuple[int, int]] = []
    started = time.perf_counter()
    summaries = [
        await rebuild(redis, pg, c, progress=lambda d, t: calls.append((d, t)))
        for c in workload.campaigns
    ]
    elapsed = time.perf_counter() - started
    assert_same(await snapshot(redis, workload.campaigns), before)
    assert await record_requests(redis, workload.campaigns, now) == requests
    await assert_reconciled(redis, pg, workload.campaigns)

    records = [tuple(s.records.values()) for s in summaries]  # vouchers, registrations, ...
    assert records == [(SELF_CLAIMS, 0, 40, 20, 0), (25, 30, 5, 1, 0), (3, 0, 0, 0, 0)]
    assert summaries[1].status == "paused"
    led = summaries[0].ledger
    assert led["available"] + led["reserved"] + led["spent"] + led["clawback_due"] == led["budget"]
    assert calls[0] == (0, SELF_CLAIMS + 40 + 20) and calls[-1] == (3, 3)
    assert all(done <= total for done, total in calls)
    print(f"rebuilt 3 campaigns, {sum(map(sum, records))} records, in {elapsed:.2f} s")


async def test_a_campaign_still_in_redis_is_refused_unless_forced(
    keyspace: Keyspace, redis: Redis, pg: asyncpg.Pool, workload: Workload
) -> None:
    with pytest.raises(RebuildRefused, match="still in Redis"):
        await rebuild(redis, pg, workload.active)
    refused = await asyncio.to_thread(run_rebuild, keyspace, workload.active)
    assert refused.returncode == 1 and "still in Redis (--force replaces it)" in refused.stderr
    before = await snapshot(redis, workload.campaigns)
    forced = await asyncio.to_thread(run_rebuild, keyspace, "--force", workload.active)
    assert forced.returncode == 0, forced.stderr
    assert_same(await snapshot(redis, workload.campaigns), before)
    unknown = await asyncio.to_thread(run_rebuild, keyspace, "rb-never-was")
    assert unknown.returncode == 1 and "holds no definition" in unknown.stderr


async def test_the_command_rebuilds_every_campaign_after_another_loss(
    service: Service, keyspace: Keyspace, redis: Redis, pg: asyncpg.Pool, workload: Workload
) -> None:
    before = await snapshot(redis, workload.campaigns)
    await lose_redis(redis)
    done = await asyncio.to_thread(run_rebuild, keyspace, "--all")
    assert done.returncode == 0, done.stderr
    lines = [msgspec.json.decode(line) for line in done.stdout.splitlines()]
    assert lines[0] == {"merchants_restored": 1}
    assert sorted(line["campaign_id"] for line in lines[1:]) == sorted(workload.campaigns)
    progress = done.stderr.splitlines()  # not a terminal: a line per tenth
    for campaign_id in workload.campaigns:
        mine = [line for line in progress if line.startswith(f"{campaign_id} [")]
        assert mine[0].split("] ")[1].startswith("  0%") and "100%" in mine[-1], progress
    assert_same(await snapshot(redis, workload.campaigns), before)
    await assert_reconciled(redis, pg, workload.campaigns)


async def test_payments_and_refunds_retried_across_the_loss_get_their_first_answer(
    service: Service, workload: Workload
) -> None:
    """After the loss and the rebuild (the tests above), a payment platform that never got
    its answers retries the same requests: the same redemption and refund come back as
    replays, and no money moves a second time."""
    before = await ledger(service, workload.active)
    paid = await redeem(service, workload.first_payment["request"])
    assert paid.status == 201 and paid.headers.get("Idempotent-Replay") == "true", paid.body
    assert paid.body["redemption_id"] == workload.first_payment["answer"]["redemption_id"]
    again = await refund_ok(service, workload.first_refund["of"], 3, "part-0")
    assert again["refund_id"] == workload.first_refund["answer"]["refund_id"]
    assert await ledger(service, workload.active) == before


async def test_a_claim_retried_across_the_loss_gets_its_first_answer(
    service: Service, workload: Workload
) -> None:
    """After the loss and the rebuild, an app that never got its claim's answer retries the
    same body, signed anew: its voucher comes back as a replay of the first answer (issued,
    although redeemed since); another body under the same request_id is refused."""
    path = f"/v1/campaigns/{workload.active}/claims"
    first = workload.first_claim
    again = await service.call("POST", path, first["request"], "app")
    assert again.status == 201 and again.headers.get("Idempotent-Replay") == "true", again.body
    assert again.body == first["answer"]
    other = first["request"] | {"user_id": "u-someone-else"}
    refused = await service.call("POST", path, other, "app")
    assert refused.status == 422, refused.body
    assert refused.body["error"]["code"] == "IDEMPOTENCY_MISMATCH"


async def test_claims_with_no_request_restored_are_decided_again(
    service: Service, redis: Redis, pg: asyncpg.Pool
) -> None:
    """Retried across a loss, a claim recorded before vouchers carried their request (an
    older release), and any claim once its idempotency buckets are past, answers
    ALREADY_CLAIMED with its voucher: the rebuild restores no record of its request."""
    campaign_id = await put_campaign(service, campaign())
    path = f"/v1/campaigns/{campaign_id}/claims"
    older, recent = (claim(n, request_id=f"rb-decided-{n}") for n in (next(PERSONS), next(PERSONS)))
    vouchers = [ok(await service.call("POST", path, body, "app")) for body in (older, recent)]
    await service.drained()
    assert await pg.execute(AS_OLDER_RELEASES, vouchers[0]["voucher_id"]) == "UPDATE 1"

    async def decided_again(body: dict[str, Any], voucher: dict[str, Any]) -> None:
        resp = await service.call("POST", path, body, "app")
        assert resp.status == 409 and resp.body["error"]["code"] == "ALREADY_CLAIMED", resp.body
        assert resp.body["voucher_id"] == voucher["voucher_id"]

    await lose_campaign(redis, campaign_id)
    await rebuild(redis, pg, campaign_id)
    await decided_again(older, vouchers[0])
    replay = await service.call("POST", path, recent, "app")
    assert replay.status == 201 and replay.headers.get("Idempotent-Replay") == "true", replay.body
    await lose_campaign(redis, campaign_id)
    two_days_on = time.time() + 2 * keys.IDEMPOTENCY_BUCKET_S
    await rebuild(redis, pg, campaign_id, clock=lambda: two_days_on)
    await decided_again(recent, vouchers[1])


async def test_the_service_carries_on_after_the_rebuild(
    service: Service, redis: Redis, pg: asyncpg.Pool, workload: Workload
) -> None:
    path = f"/v1/campaigns/{workload.active}/claims"
    again = claim(workload.claimed[7], request_id="rb-again-0007")
    resp = await service.call("POST", path, again, "app")
    assert resp.status == 409 and resp.body["error"]["code"] == "ALREADY_CLAIMED", resp.body
    fresh = await service.call("POST", path, claim(next(PERSONS)), "app")
    assert fresh.status == 201, fresh.body
    counter = claim(next(PERSONS), staff_id="clerk-rb")
    paused = await service.call(
        "POST", f"/v1/campaigns/{workload.paused}/claims", counter, "merchant"
    )
    assert paused.status == 409 and paused.body["error"]["code"] == "CAMPAIGN_PAUSED", paused.body
    redemption = workload.unrefunded[0]
    returned = await refund_ok(service, redemption, 2, "after-rebuild")
    assert returned["status"] == "returned" and returned["subsidy_returned_fen"] > 0
    repaid = {"request_id": "rb-repaid-0002", "reason": "merchant paid back"}
    resp = await service.call(
        "POST", f"/v1/clawbacks/{workload.clawback_due}/repaid", repaid, "auditor"
    )
    assert resp.status == 200 and resp.body["status"] == "repaid", resp.body
    after = await ledger(service, workload.active)  # asserts the identity and no negative
    assert after["clawback_due_fen"] >= 0
    await service.drained()  # the flusher writes the new events: the stream group is back
    await assert_reconciled(redis, pg, workload.campaigns)
    vouchers = await pg.fetchval(
        "SELECT count(*) FROM vouchers WHERE campaign_id = $1", workload.active
    )
    assert vouchers == SELF_CLAIMS + 1


async def test_events_not_yet_recorded_are_waited_for(
    service: Service, redis: Redis, pg: asyncpg.Pool, workload: Workload
) -> None:
    # the flusher reads only registered campaigns: while this one is not, its claim waits
    await redis.srem(keys.CAMPAIGNS, workload.small)
    await unread(redis, workload.small)
    await issue(service, workload.small, next(PERSONS))
    before = await snapshot(redis, workload.campaigns)
    before[keys.CAMPAIGNS].add(workload.small.encode())  # as the rebuild will register it
    with pytest.raises(RebuildRefused, match="still in Redis"):
        await rebuild(redis, pg, workload.small)
    with pytest.raises(RebuildRefused, match="1 events not yet in PostgreSQL"):
        await rebuild(redis, pg, workload.small, force=True)  # deletes, then waits
    await redis.sadd(keys.CAMPAIGNS, workload.small)
    await service.drained()
    summary = await rebuild(redis, pg, workload.small)
    assert summary.records["vouchers"] == 4
    assert_same(await snapshot(redis, workload.campaigns), before)
    await assert_reconciled(redis, pg, workload.campaigns)


async def test_a_merchant_restored_is_seen_by_the_workers_that_read_it_missing(
    service: Service, redis: Redis, pg: asyncpg.Pool
) -> None:
    campaign_id = await new_campaign(service)
    merchant = await new_merchant(service)
    vouchers = [await issue(service, campaign_id, n) for n in range(1, 17)]
    await service.drained()
    await redis.hdel(keys.MERCHANTS, merchant)  # its loss
    # the workers read it missing (payments spread over the connections)
    refused = await gather(*(redeem(service, payment(v, merchant, 100_000)) for v in vouchers[::2]))
    assert {r.body["error"]["code"] for r in refused} == {"MERCHANT_NOT_ELIGIBLE"}
    assert await restore_global(redis, pg) == 1
    paid = await gather(*(redeem(service, payment(v, merchant, 100_000)) for v in vouchers[1::2]))
    assert [r.status for r in paid] == [201] * 8
