"""Failover drills on real processes that the nemesis harness (tests/test_chaos.py,
`make chaos`) does not cover: a primary killed with SIGKILL while claims flow on an
embedded Valkey Cluster with ISSUER_DURABLE_ACK=none (what that mode loses, and what
`issuer reconcile` names of it), and a slot moved to another primary mid-surge.

Half a second before the kill the replica that will be promoted is stopped (SIGSTOP), as
a replica that fell behind, and with the kill the sockets between the two are destroyed
(`ss -K`), so what the primary had sent but the replica not yet read is lost as in a
machine loss: the claims answered in that window vanish with the primary."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from issuer import embedded, keys
from issuer.campaigns import hash_keys
from issuer.embedded import EmbeddedGroup, EmbeddedServer
from issuer.reconcile import reconcile
from loadtest.crowd import Crowd, crowd_of
from loadtest.nemesis import drop_sockets
from loadtest.verify import verify
from tests.conftest import Keyspace, Service, running_service, unique_id
from tests.people import campaign

CLIENTS = 48  # concurrent people pressing "claim"
QUOTA = 4000
KILL_AFTER = 600  # vouchers issued before the primary is killed (or the slot moved)
LAG_S = 0.5  # how long the replica is cut off before the kill
DRILL_S = 30  # the whole drill's bound


async def hot_primary(
    cluster: EmbeddedGroup, campaign_id: str
) -> tuple[EmbeddedServer, EmbeddedServer]:
    """The primary that owns the campaign's slot, and its replica."""
    client = RedisCluster.from_url(cluster.url)
    try:
        await client.initialize()
        port = int(client.get_node_from_key(keys.CampaignKeys(campaign_id).ledger).port)
    finally:
        await client.aclose()
    async with Redis(port=port) as primary:
        replica_port = int((await primary.info("replication"))["slave0"]["port"])
    return cluster.node(port), cluster.node(replica_port)


async def promoted(url: str) -> None:
    """Until the server at `url` says it is a primary."""
    async with Redis.from_url(url) as client:
        while True:
            with contextlib.suppress(RedisConnectionError):
                if (await client.info("replication"))["role"] == "master":
                    return
            await asyncio.sleep(0.05)


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


@contextlib.asynccontextmanager
async def pressing(service: Service, campaign_id: str) -> AsyncIterator[Crowd]:
    """CLIENTS people claim until the block ends (each started claim decided)."""
    crowd, stop = Crowd.of(campaign_id, 900_000), asyncio.Event()
    tasks = crowd_of(service.client("app"), crowd, CLIENTS, stop)
    try:
        yield crowd
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def sold_out_or_timeout(crowd: Crowd) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRILL_S):
            await crowd.sold_out.wait()


async def until_told(crowd: Crowd, count: int) -> None:
    async with asyncio.timeout(DRILL_S):
        while len(crowd.told) < count:  # noqa: ASYNC110 (counted by the crowd)
            await asyncio.sleep(0.02)


async def test_cluster_failover_with_ack_none_loses_what_the_replica_lacked(
    keyspace: Keyspace, workdir: Path, drill_cluster: EmbeddedGroup, pg: asyncpg.Pool
) -> None:
    """The campaign's primary is killed mid-surge after its replica fell behind: the
    claims it answered in that window vanish and the quota is sold again. Reconcile names
    the drift where the flusher had copied a lost voucher to PostgreSQL before the kill;
    one that neither holds any more is only in the client's answer."""
    env = {"REDIS_URL": drill_cluster.url, "ISSUER_DURABLE_ACK": "none"}
    data_dir = workdir / f"data-{keyspace.name}-failover-none"
    async with running_service(keyspace, data_dir, 2, env, connections=CLIENTS * 2) as service:
        campaign_id = await drill_service_campaigns(service)
        primary, replica = await hot_primary(drill_cluster, campaign_id)
        async with pressing(service, campaign_id) as crowd:
            await until_told(crowd, KILL_AFTER)
            os.kill(replica.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(LAG_S)
                await asyncio.to_thread(primary.kill)
                killed_at = time.time()
                await asyncio.to_thread(drop_sockets, primary)
            finally:
                os.kill(replica.pid, signal.SIGCONT)
            await promoted(replica.url)
            await asyncio.to_thread(primary.restart)
            await sold_out_or_timeout(crowd)
        await service.drained()
        client = RedisCluster.from_url(drill_cluster.url)
        try:
            checks = {c.name: c for c in await verify(client, pg, campaign_id, set(crowd.told))}
            report = await reconcile(client, pg, campaign_id)
            in_redis = await hash_keys(client, keys.CampaignKeys(campaign_id).vouchers)
        finally:
            await client.aclose()
    lost = set(crowd.told) - in_redis
    print(
        f"\nfailover drill cluster ack=none: {len(crowd.told)} told, {len(lost)} lost,"
        f" answers {dict(crowd.statuses())}, reconcile problems {report.problems[:3]}"
    )
    assert any(a > killed_at and s == 201 for _, a, s, _ in crowd.answers)  # no restart
    assert all(c.startswith("UNAVAILABLE") for _, _, s, c in crowd.answers if s >= 500)
    assert checks["ledger balances"].ok, checks["ledger balances"].line
    assert lost, "the lagging replica should have lost acknowledged claims"
    rows = await pg.fetch(
        "SELECT voucher_id FROM vouchers WHERE voucher_id = ANY($1::text[])", sorted(lost)
    )
    print(f"lost acknowledgements that PostgreSQL holds: {len(rows)}")
    assert report.ok == (not rows), report.problems


async def move_slot(cluster: EmbeddedGroup, key: str) -> tuple[str, str]:
    """Move `key`'s hash slot to another primary the way `valkey-cli --cluster reshard`
    does: IMPORTING on the target, MIGRATING on the source, MIGRATE the keys in batches,
    then SETSLOT NODE everywhere. Returns (source, target) addresses."""
    client = RedisCluster.from_url(cluster.url)
    try:
        await client.initialize()
        slot = client.keyslot(key)
        source = client.get_node_from_key(key)
        target = next(n for n in client.get_primaries() if n.name != source.name)
    finally:
        await client.aclose()
    src, dst = Redis(port=int(source.port)), Redis(port=int(target.port))
    try:
        src_id = (await src.execute_command("CLUSTER MYID")).decode()
        dst_id = (await dst.execute_command("CLUSTER MYID")).decode()
        await dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        await src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while moving := await src.execute_command("CLUSTER GETKEYSINSLOT", slot, 50):
            await src.execute_command(
                "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *moving
            )
            await asyncio.sleep(0.01)  # claims go on between the batches
        for node in cluster.nodes:
            async with Redis.from_url(node.url) as each:
                if (await each.info("replication"))["role"] == "master":
                    await each.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    finally:
        await src.aclose()
        await dst.aclose()
    return source.name, target.name


async def test_slot_move_while_claims_flow(
    keyspace: Keyspace, workdir: Path, drill_cluster: EmbeddedGroup, pg: asyncpg.Pool
) -> None:
    """The hot campaign's slot moves to another primary mid-surge: MOVED and ASK are the
    client's job, a claim caught between keys of both nodes answers 503 and is retried,
    and the campaign keeps issuing exactly, nothing lost."""
    data_dir = workdir / f"data-{keyspace.name}-slot-move"
    env = {"REDIS_URL": drill_cluster.url}
    async with running_service(keyspace, data_dir, 2, env, connections=CLIENTS * 2) as service:
        campaign_id = await drill_service_campaigns(service)
        async with pressing(service, campaign_id) as crowd:
            await until_told(crowd, KILL_AFTER)
            moved_at = time.monotonic()
            source, target = await move_slot(drill_cluster, keys.CampaignKeys(campaign_id).ledger)
            moved_s = time.monotonic() - moved_at
            await sold_out_or_timeout(crowd)
        await service.drained()
        client = RedisCluster.from_url(drill_cluster.url)
        try:
            await client.initialize()
            owner = client.get_node_from_key(keys.CampaignKeys(campaign_id).ledger).name
            checks = await verify(client, pg, campaign_id, set(crowd.told))
            report = await reconcile(client, pg, campaign_id)
        finally:
            await client.aclose()
    print(
        f"\nslot move {source} -> {target} in {moved_s:.2f} s: {len(crowd.told)} told,"
        f" answers {dict(crowd.statuses())}"
    )
    assert owner == target
    assert len(crowd.told) == QUOTA
    assert all(c.startswith("UNAVAILABLE") for _, _, s, c in crowd.answers if s >= 500)
    failed = [c.line for c in checks if not c.ok]
    assert not failed, failed
    assert report.ok, report.problems
