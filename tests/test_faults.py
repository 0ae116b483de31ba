"""Faults and hostile load on real processes: shedding when the claim queue is full or the
event loop late, Redis going away and coming back mid-surge, acknowledgements that survive
Redis's SIGKILL, and rate limits per account, device and client IP decided in the claim
script."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import aiohttp
import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from issuer import embedded, keys
from issuer.auth import load_keys
from issuer.client import Response, signed_headers
from issuer.reconcile import reconcile
from loadtest.verify import verify
from tests.conftest import (
    Keyspace,
    Service,
    running_service,
    start_service,
    stop_service,
    unique_id,
    wait_drained,
    worker_pids,
)
from tests.money import ledger
from tests.people import campaign, claim

pytestmark = pytest.mark.solo  # shedding at a lag bound, kills, outages: alone on the machine


@pytest.fixture(scope="module")
async def shedding(keyspace: Keyspace, workdir: Path) -> AsyncIterator[Service]:
    """One worker that holds at most 20 claims at a time."""
    data_dir = workdir / f"data-{keyspace.name}-shedding"
    env = {"ISSUER_CLAIM_QUEUE_MAX": "20"}
    async with running_service(keyspace, data_dir, 1, env, connections=1000) as service:
        yield service


@pytest.fixture(scope="module")
async def late(keyspace: Keyspace, workdir: Path) -> AsyncIterator[Service]:
    """One worker that sheds once its event loop runs 5 ms late (and never for its queue)."""
    data_dir = workdir / f"data-{keyspace.name}-late"
    env = {"ISSUER_SHED_LAG_MS": "5"}
    async with running_service(keyspace, data_dir, 1, env, connections=1000) as service:
        yield service


Signed = tuple[bytes, dict[str, str]]


async def post_signed(service: Service, path: str, signed: Signed) -> Response:
    """POST bytes signed beforehand, so that the same signature can be sent again."""
    body, headers = signed
    async with service.session.post(service.url + path, data=body, headers=headers) as resp:
        return Response(resp.status, await resp.json(), dict(resp.headers))


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """Process `pid` stopped (SIGSTOP) for the block, then let go (SIGCONT)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def unread_connections(port: int) -> int:
    """Connections to the local `port` holding bytes its server has not read (the kernel's
    table: accepted or not yet)."""
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            local, queues = fields[1], fields[4]
            if int(local.rsplit(":", 1)[1], 16) == port and int(queues.split(":")[1], 16):
                waiting += 1
    return waiting


async def held_while_sent(service: Service, path: str, signed: list[Signed]) -> list[Response]:
    """The answers to `signed`, sent at once while the service's one worker is stopped,
    until every connection this client can open holds a request the worker has not read."""
    (worker,) = worker_pids(service)
    port = int(service.url.rsplit(":", 1)[1])
    connections = min(len(signed), cast(aiohttp.TCPConnector, service.session.connector).limit)
    with paused(worker):
        sending = asyncio.gather(*(post_signed(service, path, s) for s in signed))
        async with asyncio.timeout(30):
            while True:
                if unread_connections(port) >= connections:
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # a request's last bytes, written after its first
    return await sending


async def burst_then_resend_the_shed(
    service: Service, first_n: int, count: int, hold: bool = False
) -> tuple[str, list[Response]]:
    """`count` claims at once to a new campaign; every one shed is sent again, the very same
    signed bytes, until it is served. With `hold`, the service's one worker is stopped until
    every connection of the burst has its request in the kernel: it finds them all waiting
    at once, however fast this client sends. Returns (campaign, the first answers)."""
    campaign_id = unique_id()
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(quota=None))
    assert resp.status == 201, resp.body
    path = f"/v1/campaigns/{campaign_id}/claims"
    app = service.key("app")
    signed: list[Signed] = []
    for n in range(first_n, first_n + count):
        body = msgspec.json.encode(claim(n))
        signed.append((body, signed_headers(app, "POST", path, body)))
    if hold:
        first = await held_while_sent(service, path, signed)
    else:
        first = await asyncio.gather(*(post_signed(service, path, s) for s in signed))
    assert {r.status for r in first} <= {201, 503}
    for shed in (r for r in first if r.status == 503):
        assert shed.body["error"]["code"] == "OVERLOADED"
        assert shed.body["error"]["retryable"] is True
        assert shed.headers["Retry-After"] == "1"
    # a shed claim was refused before it was read: it changed nothing and spent nothing,
    # not even its nonce, so the same signed request is served once the worker has room
    waiting = [s for s, r in zip(signed, first, strict=True) if r.status == 503]
    async with asyncio.timeout(60):
        while waiting:
            again = [await post_signed(service, path, s) for s in waiting[:15]]
            assert {r.status for r in again} <= {201, 503}, [r.body for r in again]
            served = {id(s) for s, r in zip(waiting, again, strict=False) if r.status == 201}
            waiting = [s for s in waiting if id(s) not in served]
    state = await service.call("GET", f"/v1/campaigns/{campaign_id}")
    assert state.body["current_round"]["issued"] == count
    await ledger(service, campaign_id)
    return campaign_id, first


async def shed_counts(service: Service) -> dict[str, float]:
    async with service.session.get(service.url + "/metrics") as resp:
        text = await resp.text()
    found = re.findall(r'^issuer_claims_shed_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(n) for reason, n in found}


async def test_a_full_queue_sheds_with_retry_after_and_the_same_request_is_served_later(
    shedding: Service,
) -> None:
    _, first = await burst_then_resend_the_shed(shedding, 80_000, 600)
    assert Counter(r.status for r in first)[503] > 0
    assert all("claims queued" in r.body["error"]["message"] for r in first if r.status == 503)
    counts = await shed_counts(shedding)
    assert counts.get("queue", 0) > 0 and counts.get("lag", 0) == 0, counts


async def test_a_late_event_loop_sheds_before_reading_and_changes_nothing(late: Service) -> None:
    # a burst that merely arrives fast was late on some machines, not on others: held, the
    # worker finds it all waiting at once
    _, first = await burst_then_resend_the_shed(late, 82_000, 1500, hold=True)
    assert Counter(r.status for r in first)[503] > 0
    assert all("late" in r.body["error"]["message"] for r in first if r.status == 503)
    counts = await shed_counts(late)
    assert counts.get("lag", 0) > 0 and counts.get("queue", 0) == 0, counts


@pytest.fixture(scope="module")
async def own_redis(
    keyspace: Keyspace, workdir: Path
) -> AsyncIterator[tuple[Service, embedded.EmbeddedServer]]:
    """The service on a Valkey of its own (AOF on), which the tests stop and restart."""
    server = await asyncio.to_thread(embedded.start_redis, workdir / f"redis-{keyspace.name}")
    data_dir = workdir / f"data-{keyspace.name}-own-redis"
    try:
        async with running_service(keyspace, data_dir, 2, {"REDIS_URL": server.url}) as service:
            yield service, server
    finally:
        server.stop()


async def readiness(service: Service, query: str = "") -> int:
    async with service.session.get(service.url + "/readyz" + query) as resp:
        return resp.status


async def test_redis_down_answers_unavailable_and_issues_nothing_then_recovers(
    own_redis: tuple[Service, embedded.EmbeddedServer], pg: asyncpg.Pool
) -> None:
    service, server = own_redis
    campaign_id = unique_id()
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(quota=None))
    assert resp.status == 201, resp.body
    path = f"/v1/campaigns/{campaign_id}/claims"
    before = await asyncio.gather(
        *(service.call("POST", path, claim(81_000 + n), "app") for n in range(100))
    )
    assert {r.status for r in before} == {201}
    await asyncio.to_thread(server.stop)  # a clean stop: the AOF has every write
    down = await asyncio.gather(
        *(service.call("POST", path, claim(81_100 + n), "app") for n in range(50))
    )
    assert {r.status for r in down} == {503}
    assert {r.body["error"]["code"] for r in down} == {"UNAVAILABLE"}
    assert await readiness(service) == 503
    assert await readiness(service, "?scope=gate") == 503  # no claim without the gate
    async with service.session.get(service.url + "/readyz?scope=nope") as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "INVALID_REQUEST"
    await asyncio.to_thread(server.restart)  # same port, same data; no scripts loaded
    async with asyncio.timeout(30):
        while True:
            if await readiness(service) == 200:
                break
            await asyncio.sleep(0.2)
    # the claims refused while Redis was down were never issued: retried as an app would
    # (503 is retryable; a pooled connection from before the restart fails once), they are
    todo = list(range(50))
    async with asyncio.timeout(20):
        while todo:
            after = await asyncio.gather(
                *(service.call("POST", path, claim(81_100 + n), "app") for n in todo)
            )
            assert {r.status for r in after} <= {201, 503}
            todo = [n for n, r in zip(todo, after, strict=True) if r.status == 503]
    replay = await service.call("POST", path, claim(81_000), "app")  # issued before the stop
    assert replay.status == 201 and replay.headers.get("Idempotent-Replay") == "true"
    await service.drained()
    state = await service.call("GET", f"/v1/campaigns/{campaign_id}")
    assert state.body["current_round"]["issued"] == 150
    await ledger(service, campaign_id)
    recorded = await pg.fetchval(
        "SELECT count(*) FROM vouchers WHERE campaign_id = $1", campaign_id
    )
    assert recorded == 150


async def test_durable_ack_survives_kill_9_of_redis(keyspace: Keyspace, workdir: Path) -> None:
    """ISSUER_DURABLE_ACK=aof: every voucher a client was told about is still in Redis after
    Redis is killed with SIGKILL right after the answers (the AOF is fsynced every second,
    so without WAITAOF the last second of claims could vanish)."""
    server = await asyncio.to_thread(embedded.start_redis, workdir / f"redis-{keyspace.name}-aof")
    data_dir = workdir / f"data-{keyspace.name}-durable"
    env = {"REDIS_URL": server.url, "ISSUER_DURABLE_ACK": "aof"}
    proc, url = await asyncio.to_thread(start_service, keyspace, data_dir, 2, env)
    try:
        async with aiohttp.ClientSession() as session:
            service = Service(proc, url, load_keys(data_dir / "keys.toml"), session)
            campaign_id = unique_id()
            resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(quota=None))
            assert resp.status == 201
            path = f"/v1/campaigns/{campaign_id}/claims"
            answers = await asyncio.gather(
                *(service.call("POST", path, claim(82_000 + n), "app") for n in range(300))
            )
            await asyncio.to_thread(server.kill)
        told = {r.body["voucher_id"] for r in answers if r.status == 201}
        assert len(told) == 300
        await asyncio.to_thread(server.restart)
        client = Redis.from_url(server.url)
        try:
            kept = await client.hmget(keys.CampaignKeys(campaign_id).vouchers, sorted(told))
        finally:
            await client.aclose()
        assert all(v is not None for v in kept)
    finally:
        await asyncio.to_thread(stop_service, proc)
        server.stop()


# ------------------------------------------------------------------ rate limits


async def limited_campaign(service: Service, **limits: dict[str, int]) -> str:
    campaign_id = unique_id()
    body = {**campaign(quota=None), "rate_limits": limits}
    resp = await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)
    assert resp.status == 201, resp.body
    return campaign_id


async def fresh_window(window_s: int, need_s: float = 5.0) -> None:
    """Wait for the next rate window when less than `need_s` of this one is left: windows
    are fixed, aligned to the clock (issuer/keys.py), and counts start again at the next."""
    left = window_s - time.time() % window_s
    if left < need_s:
        await asyncio.sleep(left + 0.05)


def limited(resp: Response) -> bool:
    if resp.status != 429:
        return False
    assert resp.body["error"]["code"] == "RATE_LIMITED" and resp.body["error"]["retryable"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    return True


async def test_per_account_limit_counts_attempts_not_replays(service: Service) -> None:
    campaign_id = await limited_campaign(service, per_account={"limit": 3, "window_s": 60})
    await fresh_window(60)
    path = f"/v1/campaigns/{campaign_id}/claims"
    first = await service.call("POST", path, claim(83_000, user="acct"), "app")
    assert first.status == 201
    replay = await service.call("POST", path, claim(83_000, user="acct"), "app")
    assert replay.status == 201 and replay.headers["Idempotent-Replay"] == "true"
    # one person behind one account trying again and again under new request ids
    tries = [
        await service.call(
            "POST", path, claim(83_001 + n, user="acct", request_id=f"try-{n:06d}"), "app"
        )
        for n in range(4)
    ]
    assert [t.status for t in tries[:2]] == [409, 409]  # ALREADY_CLAIMED, counted
    assert all(limited(t) for t in tries[2:])
    # a replay of the winning request is still answered
    again = await service.call("POST", path, claim(83_000, user="acct"), "app")
    assert again.status == 201 and again.headers["Idempotent-Replay"] == "true"


async def test_concurrent_claims_from_one_device_pass_the_limit_exactly(
    service: Service,
) -> None:
    campaign_id = await limited_campaign(service, per_device={"limit": 5, "window_s": 60})
    await fresh_window(60)
    path = f"/v1/campaigns/{campaign_id}/claims"
    answers = await asyncio.gather(
        *(
            service.call("POST", path, claim(83_100 + n, device_id="shared-phone"), "app")
            for n in range(100)
        )
    )
    assert sum(r.status == 201 for r in answers) == 5
    assert sum(limited(r) for r in answers) == 95
    other = await service.call("POST", path, claim(83_200, device_id="another-phone"), "app")
    assert other.status == 201
    state = await service.call("GET", f"/v1/campaigns/{campaign_id}")
    assert state.body["current_round"]["issued"] == 6


async def test_per_ip_limit_uses_the_reported_client_ip(service: Service) -> None:
    campaign_id = await limited_campaign(service, per_ip={"limit": 2, "window_s": 30})
    await fresh_window(30)
    path = f"/v1/campaigns/{campaign_id}/claims"
    same = [
        await service.call("POST", path, claim(83_300 + n, client_ip="203.0.113.7"), "app")
        for n in range(3)
    ]
    assert [r.status for r in same[:2]] == [201, 201] and limited(same[2])
    spelled = await service.call("POST", path, claim(83_310, client_ip="203.000.113.7"), "app")
    assert spelled.status == 400  # not an address
    v6 = [
        await service.call("POST", path, claim(83_320 + n, client_ip=ip), "app")
        for n, ip in enumerate(["2001:db8::1", "2001:DB8:0::1", "2001:db8::0:1"])
    ]
    assert [r.status for r in v6[:2]] == [201, 201] and limited(v6[2])  # one address
    # without client_ip the caller's own address counts: loopback here
    own = [await service.call("POST", path, claim(83_330 + n), "app") for n in range(3)]
    assert [r.status for r in own[:2]] == [201, 201] and limited(own[2])


# ------------------------------------------------------------------ PostgreSQL and the flusher

# long enough for the flusher's reconnect backoff (0.2 s, doubling) to reach its 5 s cap
PG_OUTAGE_S = float(os.environ.get("ISSUER_TEST_PG_OUTAGE_S", "12"))


def child_pids(parent: int, command: str) -> list[int]:
    found = []
    for task in Path(f"/proc/{parent}/task").glob("*/children"):
        for pid in map(int, task.read_text().split()):
            with contextlib.suppress(FileNotFoundError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if command.encode() in argv:
                    found.append(pid)
    return found


async def lag_in_metrics(service: Service) -> float:
    async with service.session.get(service.url + "/metrics") as resp:
        text = await resp.text()
    match = re.search(r"^issuer_flusher_lag_entries (\S+)$", text, re.M)
    assert match, "no flusher lag gauge"
    return float(match.group(1))


async def test_flusher_killed_and_postgres_down_for_a_while_lose_nothing(
    keyspace: Keyspace, workdir: Path
) -> None:
    """A surge goes on while the flusher is SIGKILLed mid-batch and PostgreSQL is stopped:
    claims keep being issued, the backlog shows in the metrics, and once PostgreSQL is
    back the flusher catches up with every voucher exactly once. Its own Valkey and
    PostgreSQL: no other service's flusher may read these streams."""
    pg_server = await asyncio.to_thread(
        embedded.start_postgres, workdir / f"pg-{keyspace.name}", settings={"fsync": "off"}
    )
    redis_server = await asyncio.to_thread(
        embedded.start_redis, workdir / f"redis-{keyspace.name}-pg-outage"
    )
    redis = Redis.from_url(redis_server.url)
    data_dir = workdir / f"data-{keyspace.name}-pg-outage"
    env = {"DATABASE_URL": pg_server.url, "REDIS_URL": redis_server.url}
    proc, url = await asyncio.to_thread(start_service, keyspace, data_dir, 2, env)
    issued: list[str] = []
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:
            service = Service(proc, url, load_keys(data_dir / "keys.toml"), session)
            campaign_id = unique_id()
            body = campaign(quota=None, budget_fen=10**13)  # money for the whole outage
            assert (await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)).status == 201
            path = f"/v1/campaigns/{campaign_id}/claims"

            async def surge(first: int) -> None:
                n = first
                while not stop.is_set():
                    got = await service.call("POST", path, claim(n), "app")
                    assert got.status == 201, got.body  # PostgreSQL is not on this path
                    issued.append(got.body["voucher_id"])
                    n += 1

            load = [asyncio.create_task(surge(84_000 + 1_000_000 * i)) for i in range(4)]
            await asyncio.sleep(1.0)
            (flusher,) = child_pids(proc.pid, "flush")
            os.kill(flusher, signal.SIGKILL)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(pg_server.stop)
            await asyncio.sleep(PG_OUTAGE_S / 2)
            backlog = await lag_in_metrics(service)
            assert backlog > 0
            # not ready as API.md defines it; ready for claims, which go on
            async with session.get(url + "/readyz") as resp:
                assert resp.status == 503 and (await resp.json())["postgres_ok"] is False
            async with session.get(url + "/readyz?scope=gate") as resp:
                assert resp.status == 200, await resp.text()
            await asyncio.sleep(PG_OUTAGE_S / 2)
            assert await lag_in_metrics(service) > backlog  # it grows while PostgreSQL is away
            await asyncio.to_thread(pg_server.restart)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*load)
            await wait_drained(session, url, within_s=60)
            assert await lag_in_metrics(service) == 0
        conn = await asyncpg.connect(pg_server.url)
        try:
            recorded = await conn.fetch(
                "SELECT voucher_id FROM vouchers WHERE campaign_id = $1", campaign_id
            )
            pool = await asyncpg.create_pool(pg_server.url, min_size=1, max_size=2)
            try:
                report = await reconcile(redis, pool, campaign_id)
            finally:
                await pool.close()
        finally:
            await conn.close()
        assert sorted(r["voucher_id"] for r in recorded) == sorted(issued)
        assert len(set(issued)) == len(issued) > 0
        assert await redis.hlen(keys.CampaignKeys(campaign_id).vouchers) == len(issued)
        assert report.ok, report.problems
    finally:
        stop.set()
        await asyncio.to_thread(stop_service, proc)
        await redis.aclose()
        pg_server.stop()
        redis_server.stop()


async def test_a_worker_killed_mid_surge_tells_no_unrecorded_success(
    service: Service, redis: Redis, pg: asyncpg.Pool
) -> None:
    """Clients retry (same request_id) after an error, as apps do; after a worker is
    SIGKILLed mid-surge every invariant holds and every voucher was told to its client."""
    campaign_id = unique_id()
    body = campaign(quota=300)
    assert (await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)).status == 201
    path = f"/v1/campaigns/{campaign_id}/claims"
    people = iter(range(85_000, 87_000))
    told: set[str] = set()
    errors = Counter[str]()
    midway = asyncio.Event()

    async def client() -> None:
        for n in people:
            while True:
                try:
                    got = await service.call("POST", path, claim(n), "app")
                except aiohttp.ClientError as exc:
                    errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)
                    continue
                if got.status == 503:
                    errors["503"] += 1
                    await asyncio.sleep(0.05)
                    continue
                assert got.status in (201, 409), got.body
                if got.status == 201:
                    told.add(got.body["voucher_id"])
                    if len(told) >= 50:
                        midway.set()
                break

    load = [asyncio.create_task(client()) for _ in range(60)]
    await asyncio.wait_for(midway.wait(), 30)  # mid-surge: some vouchers issued, most not
    victim = child_pids(service.proc.pid, "worker")[0]
    os.kill(victim, signal.SIGKILL)
    await asyncio.gather(*load)
    assert len(told) == 300
    checks = await verify(redis, pg, campaign_id, told)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert sum(errors.values()) > 0  # the kill did hit requests in flight
    async with asyncio.timeout(20):  # the supervisor replaced the worker
        while True:
            if len(child_pids(service.proc.pid, "worker")) == 2:
                break
            await asyncio.sleep(0.1)
