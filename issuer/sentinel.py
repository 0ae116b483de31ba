"""Sentinel discovery that follows a majority, and connections that confirm their server
is the primary before anything runs on them.

redis-py's `Sentinel` asks the Sentinels one after another and takes the first answer, so
a Sentinel that has not heard of a failover yet (or sits on the wrong side of a partition)
hands out the old primary. `MajoritySentinel` is that client asking all of them at once:
the primary is the one the most of them name, the highest config epoch breaking a tie,
and at least a majority of the configured Sentinels must answer. `authority` also says
which replicas those Sentinels would promote in its place (all they know of, down or not,
less those with `replica-priority 0`): what a replica acknowledgement must wait for.

`PrimaryConnection` (a Sentinel-managed connection) and `RoleConfirmedConnection` (a plain
one, for a cluster primary) ask ROLE right after connecting and refuse a server that says
it is a replica (`NotPrimaryError`, a ConnectionError: the command fails, the connection
is dropped, the claim answers 503 and its client retries). A server demoted later answers
writes with READONLY, which redis-py's Sentinel connection turns into a ConnectionError
and a new discovery.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, NamedTuple

from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from issuer.packing import HiredisPacking

Address = tuple[str, int]
_UNANSWERED = (RedisConnectionError, RedisTimeoutError, ResponseError, OSError)


class NotPrimaryError(RedisConnectionError):  # type: ignore[misc]  # redis-py is untyped here
    """The server a connection reached says it is not the primary."""


async def confirm_primary(connection: Connection) -> None:
    """ROLE on a new connection; NotPrimaryError unless its server is a primary."""
    await connection.send_command("ROLE")
    reply = await connection.read_response()
    role = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if role != "master":
        raise NotPrimaryError(f"{connection.host}:{connection.port} is a {role}, not the primary")


class PrimaryConnection(HiredisPacking, SentinelManagedConnection):  # type: ignore[misc]  # redis-py is untyped here
    """A connection to the primary the Sentinels name, refused unless ROLE says primary."""

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health)
        await confirm_primary(self)


class PrimaryPool(SentinelConnectionPool):  # type: ignore[misc]  # redis-py is untyped here
    """redis-py's Sentinel pool, retiring a connection to a server that is no longer the
    primary when it comes back to the pool. redis-py disconnects the idle ones when the
    primary changes, but its asyncio pool has no ownership check on release (its
    `owns_connection` calls a method the base pool lacks): a connection busy with the old
    primary at the change (blocked on a paused server, say) went back to the pool and
    served the next batches there."""

    async def release(self, connection: Connection) -> None:
        if (connection.host, connection.port) != self.master_address:
            connection.mark_for_reconnect()  # disconnected now, reconnected to the primary
        await super().release(connection)


class RoleConfirmedConnection(HiredisPacking, Connection):  # type: ignore[misc]  # redis-py is untyped here
    """A connection to a server we write to as a primary, refused unless ROLE says so."""

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health)
        await confirm_primary(self)


class Authority(NamedTuple):
    """What the Sentinels' majority says: the primary, its config epoch, and the replicas
    that could be promoted in its place."""

    primary: Address
    epoch: int
    promotable: frozenset[Address]


class MajoritySentinel(Sentinel):  # type: ignore[misc]  # redis-py is untyped here
    """redis-py's Sentinel client, discovering the primary from a majority."""

    async def _state(self, sentinel: Any, service_name: str) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = await sentinel.execute_command("SENTINEL MASTER", service_name)
        except _UNANSWERED:
            return None
        return state

    async def _promotable(self, sentinel: Any, service_name: str) -> set[Address] | None:
        try:
            replicas = await sentinel.execute_command("SENTINEL SLAVES", service_name)
        except _UNANSWERED:
            return None
        return {(str(r["ip"]), int(r["port"])) for r in replicas if r.get("slave-priority") != 0}

    async def authority(self, service_name: str) -> Authority:
        """Ask every Sentinel; MasterNotFoundError when fewer than a majority answer or
        none of them names a primary it sees up."""
        states = await asyncio.gather(*(self._state(s, service_name) for s in self.sentinels))
        answered = [s for s in states if s is not None]
        if len(answered) <= len(self.sentinels) // 2:
            raise MasterNotFoundError(
                f"{service_name}: {len(answered)} of {len(self.sentinels)} Sentinels answered"
            )
        valid = [s for s in answered if self.check_master_state(s, service_name)]
        if not valid:
            raise MasterNotFoundError(f"{service_name}: no Sentinel sees a primary up")
        votes = Counter((str(s["ip"]), int(s["port"])) for s in valid)
        epochs: dict[Address, int] = {}
        for s in valid:
            address = (str(s["ip"]), int(s["port"]))
            epochs[address] = max(epochs.get(address, 0), int(s.get("config-epoch", 0)))
        primary = max(votes, key=lambda a: (votes[a], epochs[a]))
        naming = [
            sentinel
            for sentinel, s in zip(self.sentinels, states, strict=True)
            if s is not None and (str(s["ip"]), int(s["port"])) == primary
        ]
        lists = await asyncio.gather(*(self._promotable(s, service_name) for s in naming))
        promotable = set().union(*(found for found in lists if found is not None))
        promotable.discard(primary)
        return Authority(primary, epochs[primary], frozenset(promotable))

    async def discover_master(self, service_name: str) -> Address:
        return (await self.authority(service_name)).primary
