"""The replica acknowledgement's rule and guard, and the discovery it rests on: a majority
of the Sentinels names the primary (the highest config epoch breaking a tie), a
connection to a replica is refused, a replica that dropped out still counts (the batch is
refused, not confirmed by the replica left), and a primary whose guard is off is named
once in the log, in issuer_durable_ack_unguarded and in /readyz."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.sentinel import MasterNotFoundError

from issuer import embedded, metrics, topology
from issuer.config import Settings
from issuer.durability import AckRule, NotDurable, cluster_replicas, replicas_in
from issuer.embedded import EmbeddedGroup
from issuer.sentinel import MajoritySentinel, NotPrimaryError, RoleConfirmedConnection
from tests.conftest import Keyspace, running_service

A, B, C = ("10.0.0.1", 6379), ("10.0.0.2", 6379), ("10.0.0.3", 6379)


def state(address: tuple[str, int], epoch: int, down: bool = False) -> dict[str, Any]:
    """A Sentinel's SENTINEL MASTER answer, as redis-py parses it."""
    return {
        "ip": address[0],
        "port": address[1],
        "config-epoch": epoch,
        "is_master": True,
        "is_sdown": down,
        "is_odown": False,
        "num-other-sentinels": 2,
    }


class Told(MajoritySentinel):
    """Three Sentinels whose answers are given: a state (or None: no answer) each, and
    the replicas each lists as (host, port, priority)."""

    def __init__(self, states: list[Any], replicas: list[list[tuple[str, int, int]]]) -> None:
        super().__init__([("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)])
        self.states = dict(zip(self.sentinels, states, strict=True))
        self.lists = dict(zip(self.sentinels, replicas, strict=True))

    async def _state(self, sentinel: Any, service_name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.states[sentinel]
        return found

    async def _promotable(self, sentinel: Any, service_name: str) -> set[tuple[str, int]]:
        return {(h, p) for h, p, priority in self.lists[sentinel] if priority != 0}


@pytest.mark.fast
async def test_the_primary_is_the_one_a_majority_names() -> None:
    both = [("10.0.0.2", 6379, 100), ("10.0.0.3", 6379, 100)]
    # two Sentinels have not heard of a failover the third made: the majority wins
    told = Told([state(A, 1), state(A, 1), state(C, 2)], [both, both, []])
    assert (await told.authority("issuer")).primary == A
    # one Sentinel each, the third silent: the newer config epoch wins the tie
    told = Told([state(A, 1), None, state(C, 2)], [both, [], [("10.0.0.1", 6379, 100)]])
    found = await told.authority("issuer")
    assert found.primary == C and found.epoch == 2 and found.promotable == {A}
    # fewer than a majority answer, or none sees its primary up: no primary
    with pytest.raises(MasterNotFoundError, match="1 of 3 Sentinels answered"):
        await Told([state(A, 1), None, None], [[], [], []]).authority("issuer")
    with pytest.raises(MasterNotFoundError, match="no Sentinel sees a primary up"):
        await Told([state(A, 1, down=True)] * 3, [[], [], []]).authority("issuer")


@pytest.mark.fast
async def test_what_could_be_promoted_is_every_replica_named_less_priority_0() -> None:
    lists = [
        [("10.0.0.2", 6379, 100), ("10.0.0.9", 6379, 0)],
        [("10.0.0.3", 6379, 100), ("10.0.0.1", 6379, 100)],  # the primary listed: not it
        [("10.0.0.4", 6379, 100)],  # names another primary: not counted
    ]
    told = Told([state(A, 3), state(A, 3), state(B, 1)], lists)
    assert (await told.authority("issuer")).promotable == {B, C}


@pytest.mark.fast
def test_a_cluster_primary_counts_every_replica_it_knows_but_nofailover() -> None:
    nodes = {
        "10.0.0.1:7000": {"node_id": "p", "flags": "myself,master", "master_id": "-"},
        "10.0.0.2:7000": {"node_id": "r1", "flags": "slave,fail", "master_id": "p"},
        "10.0.0.3:7000": {"node_id": "r2", "flags": "slave,nofailover", "master_id": "p"},
        "10.0.0.4:7000": {"node_id": "q", "flags": "master", "master_id": "-"},
        "10.0.0.5:7000": {"node_id": "r3", "flags": "slave", "master_id": "q"},
    }
    assert cluster_replicas(nodes) == (True, {("10.0.0.2", 7000)})
    nodes["10.0.0.1:7000"]["flags"] = "myself,slave"
    assert cluster_replicas(nodes)[0] is False


@pytest.mark.fast
def test_attached_means_online_with_a_recent_acknowledgement() -> None:
    info = {
        "role": "master",
        "connected_slaves": 3,
        "slave0": {"ip": "10.0.0.2", "port": 6379, "state": "online", "lag": 0},
        "slave1": {"ip": "10.0.0.3", "port": 6379, "state": "online", "lag": 30},
        "slave2": {"ip": "10.0.0.4", "port": 6379, "state": "wait_bgsave", "lag": 0},
    }
    assert replicas_in(info) == (3, {("10.0.0.2", 6379)})


async def test_a_connection_to_a_replica_is_refused(tmp_path: Path) -> None:
    primary = await asyncio.to_thread(embedded.start_redis, tmp_path)
    replica = await asyncio.to_thread(embedded.start_replica, tmp_path, primary)
    try:
        for server, refused in ((primary, False), (replica, True)):
            pool = ConnectionPool(
                connection_class=RoleConfirmedConnection,
                host=server.host,
                port=server.port,
                retry=topology.QUICK_RETRY,
            )
            async with Redis.from_pool(pool) as client:
                if refused:
                    with pytest.raises(NotPrimaryError, match="is a slave, not the primary"):
                        await client.ping()
                else:
                    assert await client.ping()
    finally:  # killed: just synced, it refuses SIGTERM while it writes its first AOF
        await asyncio.to_thread(replica.kill)
        await asyncio.to_thread(primary.stop)


@pytest.fixture(scope="module")
async def sentinel_set(workdir: Path) -> AsyncIterator[EmbeddedGroup]:
    group = await asyncio.to_thread(embedded.start_sentinel_set, workdir / "durability-sentinel", 2)
    try:
        yield group
    finally:
        await asyncio.to_thread(group.stop)


def sentinel_settings(group: EmbeddedGroup) -> Settings:
    return Settings(
        redis_mode="sentinel",
        sentinels=",".join(n.address for n in group.nodes[3:]),
        sentinel_master=embedded.SENTINEL_MASTER,
    )


async def confirmed(rule: AckRule, client: Any) -> None:
    """One write confirmed by the rule as a batch would be, or NotDurable."""
    async with client.client() as conn:
        await rule.admit(conn)
        await conn.set("durability-probe", "1")
        await rule.confirm(conn)


async def test_a_replica_that_dropped_out_still_counts(sentinel_set: EmbeddedGroup) -> None:
    client = topology.connect(sentinel_settings(sentinel_set))
    rule = AckRule(client)
    replica = sentinel_set.nodes[2]
    try:
        await confirmed(rule, client)
        await asyncio.to_thread(replica.stop)
        # the other replica is still attached and would confirm a WAIT 1: refused anyway,
        # at once when the rule reads the primary again (the first batch may wait for it)
        with pytest.raises(NotDurable):
            await confirmed(rule, client)
        with pytest.raises(NotDurable, match=f"{replica.address} could be promoted") as err:
            await confirmed(rule, client)
        assert err.value.reason == "replica_missing"
        # ISSUER_ACK_REPLICAS sets the count instead: one replica left, one waited for
        await confirmed(AckRule(client, replicas=1), client)
        await asyncio.to_thread(replica.restart)
        async with asyncio.timeout(20):
            while True:
                try:
                    await confirmed(rule, client)
                    break
                except NotDurable:
                    await asyncio.sleep(0.2)
    finally:
        await topology.close(client)


async def test_an_unguarded_primary_is_named_once_in_the_log_metric_and_readyz(
    sentinel_set: EmbeddedGroup,
    keyspace: Keyspace,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    primary = sentinel_set.nodes[0]
    async with Redis(host=primary.host, port=primary.port) as direct:
        await direct.config_set("min-replicas-to-write", 0)
        try:
            client = topology.connect(sentinel_settings(sentinel_set))
            rule = AckRule(client)
            try:
                with caplog.at_level(logging.ERROR, "issuer.durability"):
                    for _ in range(3):
                        rule._views.clear()  # read again, as every second
                        await confirmed(rule, client)
            finally:
                await topology.close(client)
            said = [r for r in caplog.records if "cannot keep its promise" in r.getMessage()]
            assert len(said) == 1 and "min-replicas-to-write 0" in str(said[0].problems)
            assert "min-replicas-to-write 0" in str(rule.problem())
            assert metrics.ACK_UNGUARDED._value.get() == 1

            env = {
                "ISSUER_REDIS_MODE": "sentinel",
                "ISSUER_SENTINELS": sentinel_settings(sentinel_set).sentinels or "",
                "ISSUER_SENTINEL_MASTER": embedded.SENTINEL_MASTER,
                "ISSUER_DURABLE_ACK": "replica",
            }
            data_dir = workdir / f"data-{keyspace.name}-unguarded"
            async with running_service(keyspace, data_dir, 1, env) as service:
                async with asyncio.timeout(10):
                    while True:
                        async with service.session.get(service.url + "/readyz") as resp:
                            checks = await resp.json()
                        if "durable_ack_problem" in checks:
                            break
                        await asyncio.sleep(0.2)
                assert resp.status == 200  # said, not a reason to take claims away
                assert "min-replicas-to-write 0" in checks["durable_ack_problem"]
                async with service.session.get(service.url + "/metrics") as resp:
                    assert "issuer_durable_ack_unguarded 1.0" in await resp.text()
        finally:
            await direct.config_set("min-replicas-to-write", embedded.MIN_REPLICAS_TO_WRITE)
