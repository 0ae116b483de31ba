"""Lottery rounds end to end: applications through the claim call, the draw revealed by
ops and checked from its published document alone, resumed after a crash mid-draw.

The rounds race wall-clock windows. So that their waits overlap instead of adding up, every
test's round is opened and applied to at once as the module starts (`opened`); each test
awaits its own, then its draw. The windows are wide enough for a loaded machine: the module
runs in make test's parallel phase."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from issuer import draw_rules, draws
from issuer.campaigns import Campaigns
from issuer.keys import CampaignKeys
from issuer.protocol import Call
from issuer.rebuild import rebuild
from issuer.scripts import Scripts
from tests.conftest import Keyspace, Service, unique_id, worker_pids
from tests.people import applications, campaign, claim, iso, write_applications
from tests.test_rebuild import lose_campaign

TOPOLOGIES = ("standalone", "cluster")
pytestmark = pytest.mark.long  # two topologies, each ~40 s waiting for its draws
SEED = "5eed" * 16
COMMITMENT = hashlib.sha256(bytes.fromhex(SEED)).hexdigest()
# applications are taken for this long from the module's start: ~650 of them at once took 5-6 s
# at load average 10 (in parallel, 320 once missed an 8 s window)
WINDOW_S = 30.0
DRAW_GAP_S = 5.0  # from applications closing to the draw: a few calls in between
RESERVE = 200_000


async def lottery_campaign(
    service: Service, *, quota: int, window_s: float = WINDOW_S, **kwargs: Any
) -> tuple[str, datetime]:
    """A campaign whose one round is a lottery taking applications for `window_s`; returns
    it and its draw time (DRAW_GAP_S after applications close)."""
    body = campaign(quota=quota, opens_in_s=-1, **kwargs)
    now = datetime.now(UTC)
    closes = now + timedelta(seconds=window_s)
    draws = closes + timedelta(seconds=DRAW_GAP_S)
    body["rounds"][0] |= {
        "allocation": "lottery",
        "applications_close_at": iso(closes),
        "draws_at": iso(draws),
        "commitment": COMMITMENT,
    }
    campaign_id = unique_id()
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)
    assert resp.status == 201, resp.body
    return campaign_id, draws


async def apply_all(service: Service, campaign_id: str, bodies: list[dict[str, Any]]) -> list[Any]:
    app = service.client("app")
    path = f"/v1/campaigns/{campaign_id}/claims"
    return await asyncio.gather(*(app.call("POST", path, b) for b in bodies))


async def until(when: datetime) -> None:
    await asyncio.sleep(max(0.0, (when - datetime.now(UTC)).total_seconds()) + 0.05)


def verify_draw_cli(doc: Any, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "draw.json"
    path.write_text(json.dumps(doc))
    return subprocess.run(
        [sys.executable, "-m", "issuer.cli", "verify-draw", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def open_three_hundred(service: Service) -> tuple[str, datetime, list[Any]]:
    """300 applications for 100 vouchers, 20 of them sent twice at once."""
    campaign_id, draws_at = await lottery_campaign(service, quota=100)
    bodies = [claim(n) for n in range(300)]
    return campaign_id, draws_at, await apply_all(service, campaign_id, bodies + bodies[:20])


async def open_applied(
    service: Service, *, applicants: int, quota: int, **kwargs: Any
) -> tuple[str, datetime]:
    """A lottery round of `quota` vouchers to which `applicants` apply, each accepted."""
    opened = await lottery_campaign(service, quota=quota, **kwargs)
    answers = await apply_all(service, opened[0], [claim(n) for n in range(applicants)])
    assert {a.status for a in answers} == {202}
    return opened


FIRST_COME_S = 20.0  # the first-come round, then the lottery takes applications till WINDOW_S


async def open_after_first_come(service: Service) -> tuple[str, datetime, list[Any], list[Any]]:
    """A first-come round of 100 vouchers claimed by 10 people, then a lottery round to which
    20 apply, those 10 among them: returns the campaign, its draw time, the claims and the
    applications."""
    body = campaign(quota=100, opens_in_s=-1, open_for_s=FIRST_COME_S)
    first = body["rounds"][0]
    opens = datetime.fromisoformat(first["closes_at"])
    closes = opens + timedelta(seconds=WINDOW_S - FIRST_COME_S)
    draws = closes + timedelta(seconds=DRAW_GAP_S)
    body["rounds"] = [
        first | {"valid_until": iso(draws + timedelta(hours=1))},
        {
            "round_id": "r2",
            "opens_at": iso(opens),
            "closes_at": iso(draws + timedelta(minutes=5)),
            "valid_until": iso(draws + timedelta(hours=1)),
            "quota": 100,
            "allocation": "lottery",
            "applications_close_at": iso(closes),
            "draws_at": iso(draws),
            "commitment": COMMITMENT,
        },
    ]
    campaign_id = unique_id()
    assert (await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)).status == 201
    claimed = await apply_all(service, campaign_id, [claim(n) for n in range(10)])
    await until(opens)
    answers = await apply_all(
        service, campaign_id, [claim(n, request_id=f"lottery-{n:06d}") for n in range(20)]
    )
    return campaign_id, draws, claimed, answers


Opened = dict[str, asyncio.Task[Any]]
OPENINGS: dict[str, Callable[[Service], Awaitable[Any]]] = {
    "a draw anyone can check": open_three_hundred,
    # 60 applications for 50 vouchers, the round's budget enough for 20
    "the budget binds": partial(
        open_applied, applicants=60, quota=50, round_budget_fen=20 * RESERVE
    ),
    # 120 applications for 40 vouchers (`half_drawn` crashes its draw)
    "crashed half way": partial(open_applied, applicants=120, quota=40),
    "redis lost half way": partial(open_applied, applicants=120, quota=40),
    "after first come": open_after_first_come,
}


@pytest.fixture(scope="module")
async def opened(service: Service) -> AsyncIterator[Opened]:
    """Every test's round, opened and applied to at once as the module starts: a test
    awaits its own by name."""
    tasks = {name: asyncio.ensure_future(open_(service)) for name, open_ in OPENINGS.items()}
    yield tasks
    for task in tasks.values():  # those of tests not run
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


async def test_applications_then_a_draw_anyone_can_check(
    service: Service, opened: Opened, pg: asyncpg.Pool, tmp_path: Path
) -> None:
    campaign_id, draws_at, answers = await opened["a draw anyone can check"]
    path = f"/v1/campaigns/{campaign_id}/claims"
    assert Counter(a.status for a in answers) == {202: 320}, [a.body for a in answers[:3]]
    for n in range(20):  # sent at once: either one is the replay of the other
        pair = (answers[n], answers[300 + n])
        assert pair[0].body == pair[1].body
        assert sorted(a.headers.get("Idempotent-Replay", "") for a in pair) == ["", "true"]
    one = answers[0].body
    assert one["status"] == "applied" and one["round_id"] == "r1"
    assert (
        datetime.fromisoformat(one["draws_at"]) == draws_at.replace(microsecond=0)
        or one["draws_at"]
    )
    app = service.client("app")
    refused = {
        "same person again": claim(0, request_id="again-00000000", user="uother"),
        "same account, other person": claim(400, user="u1"),
    }
    for why, body in refused.items():
        resp = await app.call("POST", path, body)
        assert resp.status == 409 and resp.body["error"]["code"] == "ALREADY_CLAIMED", why
        assert "voucher_id" not in resp.body, why
    mismatch = await app.call("POST", path, claim(0) | {"device_id": "d-other"})
    assert mismatch.body["error"]["code"] == "IDEMPOTENCY_MISMATCH"
    read = await app.call("GET", f"/v1/applications/{one['application_id']}")
    assert read.status == 200 and read.body == one
    listed = await app.call("GET", f"/v1/users/u0/vouchers?campaign_id={campaign_id}")
    assert listed.body == {"vouchers": [], "applications": [one]}

    await until(draws_at - timedelta(seconds=DRAW_GAP_S))  # applications closed, not drawn yet
    late = await app.call("POST", path, claim(500))
    assert late.status == 409 and late.body["error"]["code"] == "NOT_OPEN"
    draw_path = f"/v1/campaigns/{campaign_id}/rounds/r1/draw"
    early = await service.call("POST", draw_path, {"request_id": "draw-0001", "seed": SEED})
    assert early.status == 409 and early.body["error"]["code"] == "NOT_OPEN"
    frozen = (await service.call("GET", draw_path, role="app")).body
    assert frozen["seed"] is None and len(frozen["applications"]) == 300
    assert frozen["applications_root"] == draw_rules.applications_root(
        e["application_ref"] for e in frozen["applications"]
    )

    await until(draws_at)
    wrong = await service.call("POST", draw_path, {"request_id": "draw-0002", "seed": "ab" * 32})
    assert wrong.status == 422 and wrong.body["error"]["code"] == "INVALID_REQUEST"
    done = await service.call("POST", draw_path, {"request_id": "draw-0003", "seed": SEED})
    assert done.status == 200, done.body
    assert done.body == {
        "round_id": "r1",
        "winners": 100,
        "applications": 300,
        "applications_root": frozen["applications_root"],
    }
    again = await service.call("POST", draw_path, {"request_id": "draw-0004", "seed": SEED.upper()})
    assert again.body == done.body  # idempotent: the same draw, nothing issued twice

    doc = (await service.call("GET", draw_path, role="auditor")).body
    assert doc["seed"] == SEED and doc["winners"] == 100 and doc["quota"] == 100
    assert draw_rules.verify(msgspec.convert(doc, draw_rules.DrawDocument)) == []
    checked = verify_draw_cli(doc, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    ranked = draw_rules.order(
        SEED, doc["applications_root"], (e["application_ref"] for e in doc["applications"])
    )
    won = {e["application_ref"] for e in doc["applications"] if e["outcome"] == "won"}
    assert won == set(ranked[:100])
    other_seed = draw_rules.order("00" * 32, doc["applications_root"], ranked)
    assert set(other_seed[:100]) != won  # another seed, other winners
    tampered = doc | {"applications": doc["applications"][1:]}
    assert verify_draw_cli(tampered, tmp_path).returncode == 1

    outcomes = [
        (await app.call("GET", f"/v1/applications/{a.body['application_id']}")).body
        for a in answers[:300]
    ]
    assert Counter(o["status"] for o in outcomes) == {"won": 100, "not_drawn": 200}
    vouchers = [
        (await app.call("GET", f"/v1/vouchers/{o['voucher_id']}")).body
        for o in outcomes
        if o["status"] == "won"
    ]
    assert {v["status"] for v in vouchers} == {"issued"}
    assert len({v["user_id"] for v in vouchers}) == 100
    state = (await service.call("GET", f"/v1/campaigns/{campaign_id}")).body
    assert state["current_round"]["issued"] == 100
    assert state["ledger"]["reserved_fen"] == 100 * RESERVE
    winner = next(o for o in outcomes if o["status"] == "won")
    listed = await app.call(
        "GET", f"/v1/users/{winner['user_id']}/vouchers?campaign_id={campaign_id}"
    )
    assert listed.body["applications"] == [winner]
    assert [v["voucher_id"] for v in listed.body["vouchers"]] == [winner["voucher_id"]]
    # a winner holds the campaign's voucher: no second one from a later claim
    held = await app.call("POST", path, claim(999, user=winner["user_id"]))
    assert held.status == 409

    await service.drained()
    async with pg.acquire() as conn:
        in_pg = await conn.fetchval(
            "SELECT count(*) FROM vouchers WHERE campaign_id = $1", campaign_id
        )
        events = await conn.fetch(
            "SELECT data->>'status' AS status, count(*) AS n FROM events"
            " WHERE campaign_id = $1 AND type = 'application' GROUP BY 1",
            campaign_id,
        )
        lost = await conn.fetchval(
            "SELECT count(*) FROM events, jsonb_array_elements(data->'application_ids')"
            " WHERE campaign_id = $1 AND type = 'not_drawn'",
            campaign_id,
        )
    assert in_pg == 100
    assert {r["status"]: r["n"] for r in events} == {"applied": 300, "won": 100}
    assert lost == 200


async def test_the_round_budget_binds_before_the_quota(service: Service, opened: Opened) -> None:
    campaign_id, draws_at = await opened["the budget binds"]
    await until(draws_at)
    done = await service.call(
        "POST",
        f"/v1/campaigns/{campaign_id}/rounds/r1/draw",
        {"request_id": "draw-0001", "seed": SEED},
    )
    assert done.body["winners"] == 20
    doc = (await service.call("GET", f"/v1/campaigns/{campaign_id}/rounds/r1/draw")).body
    assert draw_rules.verify(msgspec.convert(doc, draw_rules.DrawDocument)) == []


async def half_drawn(
    opening: Awaitable[tuple[str, datetime]], redis: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, list[str]]:
    """The round `opening` opened (120 applications for 40) whose draw crashed after 3
    batches of 7: the campaign, and the application ids that must win (the 40 lowest
    ranks)."""
    campaign_id, draws_at = await opening
    await until(draws_at)
    scripts = Scripts(redis)
    campaigns = Campaigns(redis, scripts)
    cached = await campaigns.cached(campaign_id)
    found = await draws.entries(redis, cached, "r1")
    ranked = draw_rules.order(SEED, draw_rules.applications_root(found), found)
    monkeypatch.setattr(draws, "DRAW_BATCH", 7)
    run = scripts.run
    calls = 0

    async def crash_after_three(call: Call) -> Any:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise ConnectionError("the worker died")
        return await run(call)

    monkeypatch.setattr(scripts, "run", crash_after_three)
    with pytest.raises(ConnectionError):
        await draws.draw(redis, scripts, campaigns, campaign_id, "r1", SEED)
    await scripts.aclose()
    ck = CampaignKeys(campaign_id)
    assert int(await redis.hget(ck.draw("r1"), "cursor")) == 21
    assert await redis.hlen(ck.vouchers) == 21
    return campaign_id, [found[ref] for ref in ranked[:40]]


async def assert_drawn_once(
    service: Service, redis: Any, campaign_id: str, winners: list[str]
) -> None:
    """The draw is complete and checks, its winners are `winners`, each with one voucher."""
    doc = (await service.call("GET", f"/v1/campaigns/{campaign_id}/rounds/r1/draw")).body
    assert draw_rules.verify(msgspec.convert(doc, draw_rules.DrawDocument)) == []
    assert doc["winners"] == 40
    ck = CampaignKeys(campaign_id)
    records = [msgspec.json.decode(r) for r in await redis.hvals(ck.applications)]
    assert sorted(r["application_id"] for r in records if r["status"] == "won") == sorted(winners)
    assert await redis.hlen(ck.vouchers) == 40
    assert await redis.hlen(ck.persons) == 40
    state = (await service.call("GET", f"/v1/campaigns/{campaign_id}")).body
    assert state["current_round"]["issued"] == 40
    assert state["ledger"]["reserved_fen"] == 40 * RESERVE


async def test_a_draw_that_crashed_half_way_finishes_with_the_same_winners(
    service: Service, opened: Opened, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    campaign_id, winners = await half_drawn(opened["crashed half way"], redis, monkeypatch)
    # two callers finish it at once (a retry while another worker still runs)
    monkeypatch.setattr(draws, "DRAW_BATCH", 7)
    scripts = Scripts(redis)
    campaigns = Campaigns(redis, scripts)
    path = f"/v1/campaigns/{campaign_id}/rounds/r1/draw"
    finished = await asyncio.gather(
        draws.draw(redis, scripts, campaigns, campaign_id, "r1", SEED),
        service.call("POST", path, {"request_id": "draw-0001", "seed": SEED}),
    )
    await scripts.aclose()
    assert finished[0].winners == 40 and finished[1].body["winners"] == 40
    await assert_drawn_once(service, redis, campaign_id, winners)


async def test_a_draw_whose_redis_was_lost_half_way_finishes_after_the_rebuild(
    service: Service,
    opened: Opened,
    redis: Redis,
    pg: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    campaign_id, winners = await half_drawn(opened["redis lost half way"], redis, monkeypatch)
    await service.drained()
    await lose_campaign(redis, campaign_id)
    summary = await rebuild(redis, pg, campaign_id)
    assert summary.records["applications"] == 120 and summary.records["vouchers"] == 21
    # a retried application is answered as first, across the loss
    replay = await service.call("POST", f"/v1/campaigns/{campaign_id}/claims", claim(5), "app")
    assert replay.status == 202 and replay.headers.get("Idempotent-Replay") == "true"
    path = f"/v1/campaigns/{campaign_id}/rounds/r1/draw"
    done = await service.call("POST", path, {"request_id": "draw-0001", "seed": SEED})
    assert done.status == 200 and done.body["winners"] == 40, done.body
    await assert_drawn_once(service, redis, campaign_id, winners)
    await service.drained()
    async with pg.acquire() as conn:
        in_pg = await conn.fetchval(
            "SELECT count(*) FROM vouchers WHERE campaign_id = $1", campaign_id
        )
    assert in_pg == 40


async def test_one_voucher_per_person_across_first_come_and_lottery_rounds(
    service: Service, opened: Opened
) -> None:
    campaign_id, draws, claimed, answers = await opened["after first come"]
    assert {c.status for c in claimed} == {201}
    assert [a.status for a in answers] == [409] * 10 + [202] * 10
    assert {a.body["error"]["voucher_id"] for a in answers[:10]} == {
        c.body["voucher_id"] for c in claimed
    }
    await until(draws)
    done = await service.call(
        "POST",
        f"/v1/campaigns/{campaign_id}/rounds/r2/draw",
        {"request_id": "draw-0001", "seed": SEED},
    )
    assert done.body["winners"] == 10 and done.body["applications"] == 10
    state = (await service.call("GET", f"/v1/campaigns/{campaign_id}")).body
    assert state["ledger"]["reserved_fen"] == 20 * RESERVE


async def test_a_worker_killed_mid_draw_of_a_large_round(
    service: Service, redis: Redis, keyspace: Keyspace
) -> None:
    """20,000 applications, drawn 500 at a time; both workers are killed once the draw has
    begun, and the draw, posted again, finishes with the same winners, each issued once."""
    n, quota = 20_000, 2_000  # applications written directly: only the draw is under test
    campaign_id, draws_at = await lottery_campaign(service, quota=quota, window_s=1)
    ck = CampaignKeys(campaign_id)
    refs = await write_applications(redis, ck, applications(campaign_id, "r1", n))
    ranked = draw_rules.order(SEED, draw_rules.applications_root(refs), refs)
    await until(draws_at)
    path = f"/v1/campaigns/{campaign_id}/rounds/r1/draw"
    posted = asyncio.ensure_future(
        service.call("POST", path, {"request_id": "draw-0001", "seed": SEED})
    )
    async with asyncio.timeout(30):
        while True:  # the first batch is in
            if await redis.hget(ck.draw("r1"), "cursor"):
                break
            await asyncio.sleep(0.001)
    for pid in worker_pids(service):
        os.kill(pid, signal.SIGKILL)
    killed_at = int(await redis.hget(ck.draw("r1"), "cursor"))
    assert 0 < killed_at < n, "the workers died mid-draw"
    with contextlib.suppress(aiohttp.ClientError):
        await posted
    async with asyncio.timeout(60):  # the supervisor starts new workers
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                done = await service.call("POST", path, {"request_id": "draw-0002", "seed": SEED})
                if done.status == 200:
                    break
            await asyncio.sleep(0.2)
    assert done.body["winners"] == quota and done.body["applications"] == n
    records = [msgspec.json.decode(r) for r in await redis.hvals(ck.applications)]
    won = {r["application_id"] for r in records if r["status"] == "won"}
    assert won == {refs[ref] for ref in ranked[:quota]}
    assert await redis.hlen(ck.vouchers) == quota
    state = (await service.call("GET", f"/v1/campaigns/{campaign_id}")).body
    assert state["current_round"]["issued"] == quota
    assert state["ledger"]["reserved_fen"] == quota * RESERVE
    print(f"workers killed at cursor {killed_at} of {n}; finished with {quota} winners")
