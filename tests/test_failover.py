"""Failover drills on real processes: the primary that owns a hot campaign is killed with
SIGKILL while claims flow, on an embedded Valkey Cluster (3 primaries, 3 replicas) and
behind Sentinel; a replica is promoted and the service goes on without a restart.

Half a second before the kill the replica that will be promoted is stopped (SIGSTOP), as
a replica that fell behind, and with the kill the sockets between the two are destroyed
(`ss -K`), so what the primary had sent but the replica not yet read is lost as in a
machine loss. With `ISSUER_DURABLE_ACK=replica` no claim is answered 201 in that window,
so nothing a client was told is lost; with `none` the claims answered in it vanish with
the primary, and `issuer reconcile` names what PostgreSQL holds that Redis lost."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from issuer import embedded, keys
from issuer.embedded import EmbeddedGroup, EmbeddedServer
from issuer.reconcile import reconcile
from loadtest.verify import verify
from tests.conftest import Keyspace, Service, running_service, unique_id
from tests.people import campaign, claim

CLIENTS = 48  # concurrent people pressing "claim"
QUOTA = 4000
KILL_AFTER = 600  # vouchers issued before the primary is killed
LAG_S = 0.5  # how long the replica is cut off before the kill
DRILL_S = 30  # the whole drill's bound
_people = itertools.count(900_000)


@dataclass
class Drill:
    """What the clients saw: every answer with its time, and the vouchers they were told."""

    told: dict[str, str] = field(default_factory=dict)  # voucher id -> request id
    # (sent, answered, status, code), times from time.monotonic()
    answers: list[tuple[float, float, int, str]] = field(default_factory=list)
    killed_at: float | None = None

    def gap(self) -> tuple[float, Counter[str]]:
        """Seconds from the kill to the first 201 of a claim sent after it, and by code the
        answers received before that to claims sent after the kill."""
        assert self.killed_at is not None
        after = [a for a in self.answers if a[0] >= self.killed_at]
        first_ok = next(answered for _, answered, status, _ in after if status == 201)
        during = Counter(c for _, answered, _, c in after if answered < first_ok)
        return first_ok - self.killed_at, during


async def press_claim(
    service: Service, campaign_id: str, drill: Drill, stop: asyncio.Event
) -> None:
    """One person after another: claim, and on 503 send the same body again (a fresh
    signature, the same request_id) until it is decided."""
    app = service.client("app")
    path = f"/v1/campaigns/{campaign_id}/claims"
    while not stop.is_set():
        body = claim(next(_people))
        while True:
            sent = time.monotonic()
            resp = await app.call("POST", path, body)
            code = "issued" if resp.status == 201 else resp.body["error"]["code"]
            drill.answers.append((sent, time.monotonic(), resp.status, code))
            if resp.status == 201:
                drill.told[resp.body["voucher_id"]] = body["request_id"]
            if resp.status != 503 or stop.is_set():
                break
            await asyncio.sleep(0.05)
        if code == "ROUND_QUOTA_EXHAUSTED":
            stop.set()


async def run_drill(service: Service, campaign_id: str, cluster: EmbeddedGroup) -> Drill:
    """Claims flow; after KILL_AFTER vouchers the replica of the campaign's primary stops
    for LAG_S, then the primary is killed (SIGKILL) with its replication sockets, and the
    replica resumes; once it was promoted the killed server is started again, as its
    supervisor would, and rejoins as a replica. The drill runs until the quota is sold out
    or DRILL_S pass."""
    primary = await hot_primary(cluster, campaign_id)
    async with Redis.from_url(primary.url) as client:
        replica = cluster.node(int((await client.info("replication"))["slave0"]["port"]))
    drill, stop = Drill(), asyncio.Event()
    clients = [
        asyncio.create_task(press_claim(service, campaign_id, drill, stop)) for _ in range(CLIENTS)
    ]
    try:
        async with asyncio.timeout(DRILL_S):
            while len(drill.told) < KILL_AFTER:  # noqa: ASYNC110 (counted by the clients)
                await asyncio.sleep(0.02)
            os.kill(replica.pid, signal.SIGSTOP)
            await asyncio.sleep(LAG_S)
            await asyncio.to_thread(primary.kill)
            drill.killed_at = time.monotonic()
            port = primary.url.rsplit(":", 1)[1].split("/")[0]
            await asyncio.to_thread(drop_sockets, port)
            os.kill(replica.pid, signal.SIGCONT)
            await promoted(replica.url)
            await asyncio.to_thread(primary.restart)
            await stop.wait()
    except TimeoutError:
        pass
    finally:
        os.kill(replica.pid, signal.SIGCONT)
        stop.set()
        await asyncio.gather(*clients)
    return drill


def drop_sockets(port: str) -> None:
    """Destroy every TCP socket to or from `port`, with the data still in its buffers."""
    for side in ("sport", "dport"):
        subprocess.run(["ss", "-K", side, "=", f":{port}"], capture_output=True, check=True)


async def promoted(url: str) -> None:
    """Until the server at `url` says it is a primary."""
    async with Redis.from_url(url) as client:
        while (await client.info("replication"))["role"] != "master":  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def hot_primary(cluster: EmbeddedGroup, campaign_id: str) -> EmbeddedServer:
    """The primary that owns the campaign's slot."""
    client = RedisCluster.from_url(cluster.url)
    try:
        await client.initialize()
        return cluster.node(
            int(client.get_node_from_key(keys.CampaignKeys(campaign_id).ledger).port)
        )
    finally:
        await client.aclose()


@pytest.fixture
async def drill_cluster(
    workdir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[EmbeddedGroup]:
    """A cluster of its own (a drill kills one of its primaries)."""
    directory = workdir / f"drill-{request.node.name}"
    cluster = await asyncio.to_thread(embedded.start_cluster, directory)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


async def drill_service_campaigns(service: Service) -> str:
    """The hot campaign, and a few others so the cluster's primaries all hold one."""
    hot = unique_id()
    resp = await service.call("PUT", f"/v1/campaigns/{hot}", campaign(quota=QUOTA))
    assert resp.status == 201, resp.body
    for _ in range(3):
        resp = await service.call("PUT", f"/v1/campaigns/{unique_id()}", campaign(quota=10))
        assert resp.status == 201
    return hot


@pytest.mark.parametrize("ack", ["replica", "none"])
async def test_cluster_failover_mid_surge(
    ack: str, keyspace: Keyspace, workdir: Path, drill_cluster: EmbeddedGroup, pg: asyncpg.Pool
) -> None:
    env = {"REDIS_URL": drill_cluster.url, "ISSUER_DURABLE_ACK": ack}
    data_dir = workdir / f"data-{keyspace.name}-failover-{ack}"
    async with running_service(keyspace, data_dir, 2, env, connections=CLIENTS * 2) as service:
        campaign_id = await drill_service_campaigns(service)
        drill = await run_drill(service, campaign_id, drill_cluster)
        gap_s, during = drill.gap()
        await service.drained()
        redis = RedisCluster.from_url(drill_cluster.url)
        try:
            checks = {c.name: c for c in await verify(redis, pg, campaign_id, set(drill.told))}
            report = await reconcile(redis, pg, campaign_id)
            in_redis = {
                k.decode() for k in await redis.hkeys(keys.CampaignKeys(campaign_id).vouchers)
            }
        finally:
            await redis.aclose()
    lost = set(drill.told) - in_redis
    statuses = Counter(s for _, _, s, _ in drill.answers)
    print(
        f"\nfailover drill ack={ack}: {len(drill.told)} told, gap {gap_s:.2f} s,"
        f" answers in the gap {dict(during)}, lost acknowledgements {len(lost)},"
        f" statuses {dict(statuses)}, reconcile problems {report.problems[:3]}"
    )
    assert set(during) <= {"UNAVAILABLE"}, during  # never a refusal while there is no primary
    assert gap_s < 15
    assert drill.killed_at is not None
    assert any(t > drill.killed_at and s == 201 for t, _, s, _ in drill.answers)  # no restart
    assert checks["ledger balances"].ok, checks["ledger balances"].line
    if ack == "replica":
        assert not lost
        assert all(c.ok for c in checks.values()), [c.line for c in checks.values() if not c.ok]
        assert report.ok, report.problems
    else:
        # the replica missed what the primary acknowledged while it was behind: those
        # vouchers vanished, the quota was sold again, and reconcile names the drift
        assert lost, "the lagging replica should have lost acknowledged claims"
        assert not report.ok and report.problems, "reconcile must name the drift"
