"""Which Redis the gate runs on, and the client for it: one server (`standalone`), a
Redis/Valkey Cluster (`cluster`), or a primary with replicas behind Sentinel (`sentinel`).

Routing, MOVED/ASK and failover discovery are redis-py's (`RedisCluster`, `Sentinel`),
behind Sentinel through `issuer.sentinel` (a majority names the primary, and a connection
is refused unless ROLE says primary); this module chooses, checks what it was given, and
finds the node that owns a slot for the few commands that must share one connection with
a script (WAIT and WAITAOF count the writes of their own connection only).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any, Literal

import msgspec
import redis
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from issuer.config import Settings
from issuer.packing import packing
from issuer.sentinel import (
    MajoritySentinel,
    PrimaryConnection,
    PrimaryPool,
    RoleConfirmedConnection,
)

Mode = Literal["standalone", "cluster", "sentinel"]
SLOTS = 16384
SOCKET_TIMEOUT_S = 5
CONNECT_TIMEOUT_S = 2
# Once more after 20 ms, then fail: during a failover a claim answers 503 at once (its
# client retries with the same request_id) rather than holding a connection for seconds
QUICK_RETRY = Retry(ExponentialBackoff(cap=0.2, base=0.02), 1)
CLUSTER_CONNECTIONS_FACTOR = 16  # a cluster pool cannot make a burst wait: allow more
REFRESH_EVERY_S = 0.1  # at most this often a failed owner lookup re-reads the slot map


# What a lost, unreachable or partly covered Redis raises: redis-py's cluster client raises
# RedisClusterException (not a RedisError) when it finds slots without a primary
REDIS_ERRORS = (RedisError, RedisClusterException)


class TopologyError(Exception):
    """The Redis settings do not describe a reachable, whole service (names the setting)."""


def resolve_mode(settings: Settings) -> Mode:
    """The mode to run in: ISSUER_REDIS_MODE when given; else `sentinel` when sentinels
    are named; else `cluster` if REDIS_URL's server is a cluster node, `standalone` if not."""
    if settings.redis_mode is not None:
        return settings.redis_mode
    if settings.sentinels:
        return "sentinel"
    if not settings.redis_url:
        return "standalone"
    try:
        with redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
        ) as probe:
            enabled = probe.info("cluster").get("cluster_enabled")
    except RedisError as exc:
        raise TopologyError(f"REDIS_URL {settings.redis_url}: unreachable ({exc})") from None
    return "cluster" if str(enabled) == "1" else "standalone"


def resolved(settings: Settings) -> Settings:
    """`settings` with the mode decided and its settings complete; SystemExit naming the
    setting otherwise."""
    try:
        mode = resolve_mode(settings)
        if mode == "sentinel":
            if not settings.sentinels or not settings.sentinel_master:
                raise TopologyError(
                    "ISSUER_REDIS_MODE=sentinel needs ISSUER_SENTINELS and ISSUER_SENTINEL_MASTER"
                )
            sentinel_addresses(settings.sentinels)
        elif not settings.redis_url:
            raise TopologyError(f"ISSUER_REDIS_MODE={mode} needs REDIS_URL")
    except TopologyError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    return msgspec.structs.replace(settings, redis_mode=mode)


def sentinel_addresses(value: str) -> list[tuple[str, int]]:
    """`host:port,host:port` as pairs; TopologyError naming ISSUER_SENTINELS if malformed."""
    found = []
    for item in value.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TopologyError(f"ISSUER_SENTINELS: {item.strip()!r} is not host:port")
        found.append((host.strip("[]"), int(port)))
    return found


def connect(settings: Settings, max_connections: int = 64) -> Any:
    """The client of the configured topology (`Redis` or `RedisCluster`: the same commands).
    A standalone pool makes bursts wait for a connection instead of failing."""
    settings = resolved(settings)  # probes REDIS_URL only if the mode is not given
    mode = settings.redis_mode
    timeouts: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
    }
    if mode == "sentinel":
        assert settings.sentinels and settings.sentinel_master
        sentinel = MajoritySentinel(sentinel_addresses(settings.sentinels), **timeouts)
        return sentinel.master_for(
            settings.sentinel_master,
            max_connections=max_connections,
            retry=QUICK_RETRY,
            connection_pool_class=PrimaryPool,
            connection_class=PrimaryConnection,
            **timeouts,
        )
    assert settings.redis_url
    if mode == "cluster":
        # A failover takes about cluster-node-timeout: retry briefly, then let the claim
        # answer 503 (the client retries with the same request_id) instead of hanging.
        return RedisCluster.from_url(
            settings.redis_url,
            # per node, and not blocking: past it a command fails (MaxConnectionsError)
            max_connections=max_connections * CLUSTER_CONNECTIONS_FACTOR,
            retry=QUICK_RETRY,
            **timeouts,
        )
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections,
        timeout=5,
        health_check_interval=5,
        **timeouts,
    )
    pool.connection_class = packing(pool.connection_class)  # the URL's class, in C
    return Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


async def close(client: Any) -> None:
    """Close a client of `connect` and, behind Sentinel, its connections to the Sentinels."""
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in manager.sentinels if manager is not None else ():
        await sentinel.aclose()


async def health(client: Any) -> str | None:
    """None when every slot has a primary that answers; else why not, in a few words."""
    if not isinstance(client, RedisCluster):
        return None
    try:
        info = await client.cluster_info()
    except REDIS_ERRORS as exc:  # redis-py says which slots lack a primary
        return f"cluster unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    assigned = int(info.get("cluster_slots_assigned", 0))
    if assigned < SLOTS:
        return f"cluster covers {assigned} of {SLOTS} slots"
    if info.get("cluster_state") != "ok":
        return f"cluster_state {info.get('cluster_state')}"
    return None


async def check(settings: Settings, client: Any) -> None:
    """At start: the service is reachable and whole; TopologyError naming the setting."""
    where = (
        f"ISSUER_SENTINELS {settings.sentinels} (master {settings.sentinel_master})"
        if settings.redis_mode == "sentinel"
        else f"REDIS_URL {settings.redis_url}"
    )
    try:
        if isinstance(client, RedisCluster):
            await client.initialize()
        await client.ping()
    except REDIS_ERRORS as exc:
        raise TopologyError(f"{where}: unreachable ({type(exc).__name__}: {exc})") from None
    problem = await health(client)
    if problem is not None:
        raise TopologyError(f"{where}: {problem}")


def slot_groups(client: Any, keys: Iterable[str]) -> list[list[str]]:
    """`keys` grouped so that each group may go in one multi-key command: all together on
    one server, by hash slot on a cluster (CROSSSLOT otherwise)."""
    keys = list(keys)
    if not isinstance(client, RedisCluster):
        return [keys] if keys else []
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(key_slot(key.encode()), []).append(key)
    return list(groups.values())


class Owners:
    """The client of the primary that owns a key's slot: the client itself on one server or
    behind Sentinel; on a cluster a plain client per primary, from redis-py's slot map,
    whose connections confirm their server is a primary."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._nodes: dict[str, Redis] = {}
        self._pinned: dict[int, Any] = {}  # id of an owner -> its pinned connection
        self._refreshed = 0.0

    def pinned(self, key: str) -> Any:
        """One connection to the owner of `key`'s slot, the same on every call (until
        `unpin`): WAIT on it covers what was read or written on it before."""
        owner = self.of(key)
        conn = self._pinned.get(id(owner))
        if conn is None:
            conn = self._pinned[id(owner)] = owner.client()
        return conn

    async def unpin(self) -> None:
        """Drop the pinned connections (after an error: their node may be gone)."""
        for conn in self._pinned.values():
            await conn.aclose()
        self._pinned.clear()

    def of(self, key: str) -> Any:
        if not isinstance(self.client, RedisCluster):
            return self.client
        node = self.client.get_node_from_key(key)
        if node is None:
            raise redis.exceptions.SlotNotCoveredError(f"no primary for the slot of {key}")
        return self._owner(node.host, node.port)

    def primaries(self) -> list[Any]:
        """A client of each primary of the gate (on a cluster: those of the slot map)."""
        if not isinstance(self.client, RedisCluster):
            return [self.client]
        return [self._owner(n.host, n.port) for n in self.client.get_primaries()]

    def _owner(self, host: str, port: int) -> Redis:
        name = f"{host}:{port}"
        owner = self._nodes.get(name)
        if owner is None:
            pool = ConnectionPool(
                connection_class=RoleConfirmedConnection,
                host=host,
                port=port,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                retry=QUICK_RETRY,  # a gone primary: 503 at once, the client retries
            )
            owner = self._nodes[name] = Redis.from_pool(pool)
        return owner

    @staticmethod
    def name(owner: Any) -> str | None:
        """host:port of a cluster owner (None behind Sentinel or on one server)."""
        kwargs = owner.connection_pool.connection_kwargs
        return f"{kwargs['host']}:{kwargs['port']}" if "host" in kwargs else None

    async def refresh(self, failed: str | None = None) -> None:
        """Learn where the primaries are now (at most every REFRESH_EVERY_S): on a cluster
        re-read the slot map, from nodes other than `failed` first (redis-py's own
        deferral: a cut-off primary still gives its stale map, and answers CLUSTERDOWN);
        behind Sentinel ask their majority again, which drops the connections to a
        primary they no longer name."""
        now = time.monotonic()
        if now - self._refreshed < REFRESH_EVERY_S:
            return
        self._refreshed = now
        with contextlib.suppress(*REDIS_ERRORS):  # no node answers yet: the next failure retries
            if isinstance(self.client, RedisCluster):
                await self.client.nodes_manager.initialize(last_failed_node_name=failed)
            elif hasattr(self.client.connection_pool, "get_master_address"):
                await self.client.connection_pool.get_master_address()

    async def aclose(self) -> None:
        await self.unpin()
        for owner in self._nodes.values():
            await owner.aclose()
        self._nodes.clear()
