"""What a replica acknowledgement (ISSUER_DURABLE_ACK=replica) waits for, and whether a
primary's own settings keep that promise.

The promise: a claim answered 201 survives any failover. A failover may promote any
replica the failover authority knows, so a batch is confirmed only once each of them has
it: the replicas the Sentinels' majority lists for the primary (less `replica-priority
0`), the replicas in a cluster primary's own CLUSTER NODES (less `nofailover`), or, on one
server, every replica attached (at least one); ISSUER_ACK_REPLICAS sets the count instead.
A replica that dropped out still counts: the batch is refused rather than confirmed by the
replicas left, which is how a primary cut off with one of its replicas used to confirm
claims that the promotion of another then wiped.

Per batch, on the connection that runs the script: `admit` before it (the server is the
primary the authority names, and every replica that could be promoted is attached: INFO
lists it with an acknowledgement under ATTACHED_LAG_S old), `confirm` after it (the same,
then WAIT for every replica INFO lists: WAIT counts, it cannot name, so a replica that
could not be promoted is waited for too). Short of that: NotDurable, a RedisError, so the
claim answers 503 UNAVAILABLE and its client retries; what the script wrote stays on that
server and the retry is decided wherever the primary is by then. What the authority says
and INFO lists is read at most every VIEW_TTL_S per primary.

The guard: on each primary it sees, the rule reads `min-replicas-to-write` and
`min-replicas-max-lag` (a primary that lost its replicas should refuse writes: what no
acknowledgement covers, redemptions and the rest, would otherwise go on there) and
counts what could be promoted; a problem is logged once as an error, counted in
`issuer_durable_ack_unguarded` and given by `problem()` for /readyz.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from issuer import metrics

log = logging.getLogger("issuer.durability")

Address = tuple[str, int]
ACK_TIMEOUT_MS = 2000  # longest wait for the replicas (or an fsync, in aof mode)
VIEW_TTL_S = 1.0  # how long what the authority and INFO said of a primary is trusted
ATTACHED_LAG_S = 3  # a replica whose last acknowledgement is older is not attached
CURRENT_S = 10.0  # a primary read this recently counts in the guard's gauge
GUARD_SETTINGS = ("min-replicas-to-write", "min-replicas-max-lag")


class NotDurable(RedisError):  # type: ignore[misc]  # redis-py is untyped here
    """The batch cannot be confirmed as held by every replica that could be promoted."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # not_primary, replica_missing, wait_short


def named(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def address_of(conn: Any) -> Address:
    """host and port of the server a single-connection client is connected to."""
    connection = conn.connection
    return str(connection.host), int(connection.port)


@dataclass(frozen=True)
class View:
    """One primary as the rule last read it."""

    server: Address
    primary: bool  # the authority names this server as the primary
    authority: str  # who said so, for messages
    promotable: frozenset[Address] | None  # None: no authority (one server)
    listed: int  # replicas INFO lists
    attached: frozenset[Address]  # of those, online with a recent acknowledgement
    read_at: float


def replicas_in(info: dict[str, Any]) -> tuple[int, frozenset[Address]]:
    """From INFO replication: how many replicas are listed, and which are attached."""
    listed, attached = 0, set()
    for field, value in info.items():
        if field.startswith("slave") and isinstance(value, dict):
            listed += 1
            if value.get("state") == "online" and int(value.get("lag", 0)) <= ATTACHED_LAG_S:
                attached.add((str(value["ip"]), int(value["port"])))
    return listed, frozenset(attached)


def cluster_replicas(nodes: dict[str, Any]) -> tuple[bool, frozenset[Address]]:
    """From the server's CLUSTER NODES: whether it is a primary, and its replicas that may
    be failed over to (every one it knows, failing or not, less `nofailover`)."""
    me = next((n for n in nodes.values() if "myself" in n["flags"]), None)
    if me is None:
        return False, frozenset()
    found = set()
    for address, node in nodes.items():
        if node["master_id"] == me["node_id"] and "nofailover" not in node["flags"]:
            host, _, port = address.rpartition(":")
            found.add((host, int(port)))
    return "master" in me["flags"], frozenset(found)


class AckRule:
    """The replica acknowledgement of one client of the gate (`topology.connect`)."""

    def __init__(self, client: Any, replicas: int | None = None) -> None:
        self.client = client
        self.replicas = replicas  # ISSUER_ACK_REPLICAS: the count, instead of the authority's
        self._views: dict[Address, View] = {}
        self._reading: dict[Address, asyncio.Lock] = {}
        self._settings: dict[Address, list[str]] = {}  # problems of each primary's settings
        self._problems: dict[Address, tuple[float, tuple[str, ...]]] = {}
        self._refusing: dict[Address, str] = {}  # why batches on a server are refused now

    async def admit(self, conn: Any) -> None:
        """Before a script: NotDurable unless a batch run on `conn` could be confirmed."""
        self._check(await self.view(conn))

    async def confirm(self, conn: Any) -> None:
        """After a script: WAIT until every replica has what `conn` wrote (or read from a
        stream); NotDurable if the primary or a replica that could be promoted is wrong."""
        view = await self.view(conn)
        self._check(view)
        if self.replicas is not None:
            need = self.replicas
        elif view.promotable is None:
            need = max(1, view.listed)
        else:
            need = view.listed  # the promotable ones are among them (checked)
        acked = int(await conn.execute_command("WAIT", need, ACK_TIMEOUT_MS))
        if acked < need:
            self._refuse(
                view.server, "wait_short", f"WAIT: {acked} of {need} replica(s) confirmed in time"
            )
        if self._refusing.pop(view.server, None):
            log.warning(
                "replica acknowledgements confirm again", extra={"primary": named(view.server)}
            )

    def _check(self, view: View) -> None:
        if not view.primary:
            self._refuse(
                view.server,
                "not_primary",
                f"{named(view.server)} is not the primary {view.authority}",
            )
        if self.replicas is None and view.promotable is not None:
            missing = view.promotable - view.attached
            if missing:
                who = ", ".join(sorted(map(named, missing)))
                self._refuse(
                    view.server,
                    "replica_missing",
                    f"{who} could be promoted in place of {named(view.server)} but is not"
                    " attached to it",
                )

    def _refuse(self, server: Address, reason: str, detail: str) -> None:
        self._views.pop(server, None)  # read it again on the next batch
        metrics.count(metrics.child(metrics.ACK_REFUSED, reason))
        if self._refusing.get(server) != reason:  # logged when it starts, not per batch
            self._refusing[server] = reason
            log.warning(
                "batches refused: no replica acknowledgement can cover them",
                extra={"primary": named(server), "reason": reason, "detail": detail},
            )
        raise NotDurable(reason, detail)

    async def view(self, conn: Any) -> View:
        """What the authority and INFO say of `conn`'s server, read at most every VIEW_TTL_S
        (one reader at a time per server); also runs the guard."""
        server = address_of(conn)
        seen = self._views.get(server)
        if seen is not None and time.monotonic() - seen.read_at < VIEW_TTL_S:
            return seen
        async with self._reading.setdefault(server, asyncio.Lock()):
            seen = self._views.get(server)
            if seen is None or time.monotonic() - seen.read_at >= VIEW_TTL_S:
                seen = self._views[server] = await self._read(conn, server)
                await self._guard(conn, seen)
        return seen

    async def _read(self, conn: Any, server: Address) -> View:
        listed, attached = replicas_in(await conn.info("replication"))
        manager = getattr(getattr(self.client, "connection_pool", None), "sentinel_manager", None)
        if manager is not None:  # behind Sentinel: what their majority says
            authority = await manager.authority(self.client.connection_pool.service_name)
            is_primary, promotable = authority.primary == server, authority.promotable
            said = f"the Sentinels name ({named(authority.primary)})"
        elif isinstance(self.client, RedisCluster):  # the primary's own view of its shard
            is_primary, promotable = cluster_replicas(await conn.cluster("nodes"))
            said = "of its cluster slots"
        else:
            is_primary, promotable, said = True, None, ""
        return View(server, is_primary, said, promotable, listed, attached, time.monotonic())

    async def _guard(self, conn: Any, view: View) -> None:
        """Whether this primary's settings and replicas can keep the promise; reported
        when that changes."""
        if not view.primary:
            return
        if view.server not in self._settings:
            self._settings[view.server] = await settings_problems(conn, view.server)
        problems = list(self._settings[view.server])
        if self.replicas is None and view.promotable is not None and not view.promotable:
            problems.append(
                f"{named(view.server)} has no replica that could be promoted: an"
                " acknowledgement rests on it alone"
            )
        before = self._problems.get(view.server, (0.0, ()))[1]
        self._problems[view.server] = (time.monotonic(), tuple(problems))
        if problems and tuple(problems) != before:
            log.error(
                "ISSUER_DURABLE_ACK=replica cannot keep its promise",
                extra={"primary": named(view.server), "problems": problems},
            )
        elif before and not problems:
            log.warning(
                "durable acknowledgement guarded again", extra={"primary": named(view.server)}
            )
        metrics.ACK_UNGUARDED.set(len(self._current()))

    def _current(self) -> dict[Address, tuple[str, ...]]:
        """The primaries read lately whose guard has problems."""
        now = time.monotonic()
        return {
            server: problems
            for server, (seen, problems) in self._problems.items()
            if problems and now - seen < CURRENT_S
        }

    def problem(self) -> str | None:
        """The guard's current problems, for /readyz (None: none)."""
        return "; ".join(p for problems in self._current().values() for p in problems) or None


async def settings_problems(conn: Any, server: Address) -> list[str]:
    """What the primary's own guard lacks: a primary cut off from its replicas should
    refuse writes (`min-replicas-to-write` ≥ 1 within `min-replicas-max-lag` s)."""
    try:
        values = {k: int(v) for k, v in (await conn.config_get("min-replicas-*")).items()}
    except (ResponseError, ValueError) as exc:
        return [f"cannot read min-replicas-to-write on {named(server)} ({exc})"]
    to_write, lag = (values.get(name, 0) for name in GUARD_SETTINGS)
    if to_write >= 1 and lag >= 1:
        return []
    return [
        f"{named(server)} has min-replicas-to-write {to_write}, min-replicas-max-lag {lag}:"
        " cut off from its replicas, it goes on taking the writes no acknowledgement covers"
    ]
