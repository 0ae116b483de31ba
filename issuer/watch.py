"""A worker's watch over the gate's primaries: every WATCH_EVERY_S, does every slot have a
primary this worker can use?

Behind Sentinel it asks their majority again (which drops the connections to a primary
they no longer name: a cut-off primary that keeps a replica answers writes and never
errs, so waiting for an error would keep the workers on it), then ROLE on the primary;
on a cluster, ROLE and `cluster_state` on each primary of the slot map, and a primary
that fails makes the map be read again from the other nodes. With
ISSUER_DURABLE_ACK=replica it also has the acknowledgement rule read each primary
(`AckRule.view`), so a primary's guard is checked even before a claim reaches it.

`missing` says why not (after MISSING_AFTER failed rounds in a row: one slow answer on a
busy machine is not a lost primary); /readyz answers with it at once instead of waiting
on a primary that does not answer, and `issuer_redis_primary_missing` follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio.cluster import RedisCluster

from issuer import metrics, topology
from issuer.scripts import Scripts

WATCH_EVERY_S = 0.5
PROBE_S = 1.0  # longest a primary may take to answer a round's questions
MISSING_AFTER = 2


class PrimaryWatch:
    def __init__(self, redis: Any, scripts: Scripts) -> None:
        self.redis = redis
        self.scripts = scripts
        self.missing: str | None = None
        self._failed = 0

    async def probe(self) -> str | None:
        """None if every primary of the gate answers as a primary; else why not."""
        owners = self.scripts.owners
        cluster = isinstance(self.redis, RedisCluster)
        if not cluster:
            await owners.refresh()  # behind Sentinel: their majority's primary
        primaries = owners.primaries()
        if not primaries:
            await owners.refresh()
            return "no primary in the slot map"
        for owner in primaries:
            try:
                async with asyncio.timeout(PROBE_S), owner.client() as conn:
                    role = (await conn.execute_command("ROLE"))[0]
                    if role != b"master":
                        raise topology.TopologyError(f"it is a {role.decode()}")
                    if cluster and (await conn.cluster("info"))["cluster_state"] != "ok":
                        raise topology.TopologyError("its cluster_state is not ok")
                    if self.scripts.ack == "replica":
                        await self.scripts.rule.view(conn)
            except (*topology.REDIS_ERRORS, topology.TopologyError, OSError) as exc:
                where = owners.name(owner) or "the primary"
                await owners.refresh(failed=owners.name(owner))
                return f"{where}: {type(exc).__name__}: {exc}"[:300]
        return None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            problem = await self.probe()
            self._failed = self._failed + 1 if problem else 0
            if problem is None or self._failed >= MISSING_AFTER:
                self.missing = problem
            metrics.PRIMARY_MISSING.set(1 if self.missing else 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_EVERY_S)
