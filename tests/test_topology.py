"""Choosing and checking the Redis topology: a bad mode, missing Sentinel settings, an
unreachable server or a cluster with uncovered slots stop `issuer serve` with the setting
named; a cluster node is detected from REDIS_URL; a cluster that loses a slot's primary
makes /readyz false with the reason."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from issuer import embedded, topology
from issuer.config import Settings
from tests.conftest import ROOT, Keyspace, running_service


def serve_fails(tmp_path: Path, **env: str) -> str:
    """`issuer serve` with `env`: it must exit non-zero; returns its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "issuer.cli", "serve", "--port", "0"],
        env={**os.environ, "ISSUER_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode != 0, done.stderr
    return done.stderr


def test_a_bad_mode_is_refused_naming_it(tmp_path: Path) -> None:
    err = serve_fails(tmp_path, ISSUER_REDIS_MODE="ring", REDIS_URL="redis://127.0.0.1:1/0")
    assert "configuration error" in err and "redis_mode" in err


@pytest.mark.fast
def test_sentinel_mode_needs_its_settings() -> None:
    with pytest.raises(SystemExit, match="ISSUER_SENTINELS and ISSUER_SENTINEL_MASTER"):
        topology.resolved(Settings(redis_mode="sentinel", sentinels="127.0.0.1:26379"))
    with pytest.raises(SystemExit, match="ISSUER_SENTINELS: 'nowhere' is not host:port"):
        topology.resolved(Settings(sentinels="nowhere", sentinel_master="issuer"))


def test_an_unreachable_server_is_refused_naming_redis_url(tmp_path: Path) -> None:
    err = serve_fails(tmp_path, REDIS_URL="redis://127.0.0.1:1/0", DATABASE_URL="postgresql://x")
    assert "REDIS_URL redis://127.0.0.1:1/0: unreachable" in err


async def test_the_mode_is_detected_and_an_explicit_one_wins(
    keyspace: Keyspace, cluster: embedded.EmbeddedGroup
) -> None:
    def mode(url: str, given: str | None = None) -> str:
        settings = Settings(redis_url=url, redis_mode=given)  # type: ignore[arg-type]
        return topology.resolved(settings).redis_mode or ""

    assert await asyncio.to_thread(mode, cluster.url) == "cluster"
    assert await asyncio.to_thread(mode, keyspace.redis_url) == "standalone"
    assert await asyncio.to_thread(mode, cluster.url, "standalone") == "standalone"
    found = topology.resolved(Settings(sentinels="127.0.0.1:26379", sentinel_master="m"))
    assert found.redis_mode == "sentinel"


async def slot_owner(cluster: embedded.EmbeddedGroup, slot: int) -> embedded.EmbeddedServer:
    client = RedisCluster.from_url(cluster.url)
    try:
        await client.initialize()
        return cluster.node(int(client.nodes_manager.get_node_from_slot(slot).port))
    finally:
        await client.aclose()


@pytest.fixture
async def small_cluster(workdir: Path) -> AsyncIterator[embedded.EmbeddedGroup]:
    """Three primaries, no replicas: a slot given up stays uncovered."""
    group = await asyncio.to_thread(embedded.start_cluster, workdir / "cluster-uncovered", 3, 0)
    try:
        yield group
    finally:
        await asyncio.to_thread(group.stop)


async def test_uncovered_slots_stop_the_start_and_fail_readiness(
    keyspace: Keyspace, workdir: Path, small_cluster: embedded.EmbeddedGroup, tmp_path: Path
) -> None:
    env = {"REDIS_URL": small_cluster.url, "ISSUER_REDIS_MODE": "cluster"}
    async with running_service(keyspace, workdir / "data-uncovered", 1, env) as service:
        async with service.session.get(service.url + "/readyz") as resp:
            assert resp.status == 200
        # a slot nobody serves, as when a primary without a replica is lost
        slot = key_slot(b"{c:elsewhere}")
        owner = await slot_owner(small_cluster, slot)
        # the owner first: another node that dropped it first could learn it back by gossip
        for node in sorted(small_cluster.nodes, key=lambda n: n is not owner):
            async with Redis.from_url(node.url) as each:
                await each.execute_command("CLUSTER DELSLOTS", slot)
        async with service.session.get(service.url + "/readyz") as resp:
            checks = await resp.json()
            assert resp.status == 503, checks
        assert checks["redis_ok"] is False and "16383 of 16384" in str(checks["redis_error"])
    err = await asyncio.to_thread(
        serve_fails,
        tmp_path,
        REDIS_URL=small_cluster.url,
        DATABASE_URL=keyspace.database_url,
        ISSUER_PERSON_KEY="k",
    )
    assert f"REDIS_URL {small_cluster.url}: " in err and "16383 of 16384" in err
