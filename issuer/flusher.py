"""Moves stream events from Redis to PostgreSQL, idempotently, losing nothing.

Each campaign stream (and the global one) is read through the consumer group `flusher`.
A batch is written in one PostgreSQL transaction (events keyed by stream and event id: the
entry id, with its place for an entry of several events, issuer/events.py and
store.events_of_entries; `ON CONFLICT DO NOTHING`), and only then acknowledged. A crash
between the two re-delivers the batch, which the conflict clause turns into a no-op.
Entries left pending by a dead consumer are taken over with XAUTOCLAIM. Only acknowledged
entries are trimmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from issuer import keys, metrics, topology
from issuer.config import DurableAck
from issuer.events import entry_data
from issuer.protocol import TrimAcked
from issuer.scripts import Scripts
from issuer.store import PROJECT_MONEY, RECORD_BATCH, RECORD_CLAIMS, RECORD_STATUS

log = logging.getLogger("issuer.flusher")
# (entry id, fields); fields are empty or None for an entry deleted while pending
Entry = tuple[bytes, dict[bytes, bytes] | None]
CAMPAIGN_PREFIX = "{c:"
STREAM_SUFFIX = "}:events"
# run(): after a batch that was not full, the next read waits until this long after the
# previous one, so that under steady traffic a transaction carries LINGER_MS of entries
# rather than a few: its statement, commit, XACK and trim cost the same for 10 entries as
# for 300. An entry reaches PostgreSQL up to this much later; a full batch goes at once.
LINGER_MS = 200
LAG_EVERY_S = 1.0  # run(): how often it exports the lag metrics (a few calls per stream)
# run(): how often it reads its own pending entries again. A read whose answer was lost
# (a timeout that redis-py's retry then covered, on a partition or a failover) leaves
# what it delivered pending for this consumer with no error to say so; the rescue of
# idle entries would take them only after claim_idle_ms (60 s).
PENDING_EVERY_S = 5.0


def stream_campaign(stream: str) -> str:
    """The campaign id of a campaign stream, '' for the global stream."""
    if stream.startswith(CAMPAIGN_PREFIX) and stream.endswith(STREAM_SUFFIX):
        return stream[len(CAMPAIGN_PREFIX) : -len(STREAM_SUFFIX)]
    return ""


async def stream_names(redis: Redis) -> list[str]:
    ids = sorted(m.decode() for m in await redis.smembers(keys.CAMPAIGNS))
    return [keys.GLOBAL_EVENTS] + [keys.CampaignKeys(c).events for c in ids]


async def stream_lag(redis: Redis) -> tuple[int, float]:
    """(entries not yet in PostgreSQL, age in seconds of the oldest of them); exported as
    metrics too."""
    total, oldest_ms = 0, 0
    for stream in await stream_names(redis):
        try:
            groups = await redis.xinfo_groups(stream)
        except ResponseError:  # stream not created yet: nothing to flush
            continue
        group = next((g for g in groups if g["name"].decode() == keys.FLUSH_GROUP), None)
        if group is None:
            waiting = await redis.xlen(stream)
        else:
            waiting = int(group.get("lag") or 0) + int(group["pending"])
        metrics.FLUSH_LAG_BY_CAMPAIGN.labels(stream_campaign(stream)).set(waiting)
        total += waiting
        if group is not None and waiting:
            first = await redis.xrange(stream, count=1)
            if first:
                ms = int(first[0][0].decode().split("-")[0])
                oldest_ms = ms if not oldest_ms else min(oldest_ms, ms)
    age = max(0.0, time.time() - oldest_ms / 1000) if oldest_ms else 0.0
    metrics.FLUSH_LAG.set(total)
    metrics.FLUSH_LAG_SECONDS.set(age)
    return total, age


class Flusher:
    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool,
        *,
        consumer: str = "",
        batch: int = 2000,
        claim_idle_ms: int = 60_000,
        ack: DurableAck = "none",
        ack_replicas: int | None = None,
        linger_ms: int = LINGER_MS,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.scripts = Scripts(redis, ack_replicas=ack_replicas)
        # "replica": record only entries a replica has too, so that PostgreSQL never holds
        # a voucher that a failover took back (and that a retried claim would issue again)
        self.ack = ack
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.linger_ms = linger_ms
        self._groups: set[str] = set()

    async def streams(self) -> list[str]:
        """Every event stream, each with its consumer group created (from the start)."""
        names = await stream_names(self.redis)
        for name in names:
            if name not in self._groups:
                try:
                    await self.redis.xgroup_create(name, keys.FLUSH_GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self._groups.add(name)
        return names

    async def record(self, batches: Sequence[tuple[str, list[Entry]]]) -> int:
        """Write entries to PostgreSQL in one transaction, then acknowledge and trim them;
        returns how many events they held.

        A batch of claims only (most of them under load) is one statement, RECORD_CLAIMS,
        which needs no transaction around it; any other runs RECORD_BATCH and then only
        the projections that the batch's event types concern."""
        streams: list[str] = []
        ids: list[str] = []
        campaigns: list[str] = []
        types: list[str] = []
        docs: list[str] = []
        for stream, entries in batches:
            campaign = stream_campaign(stream)
            for entry_id, fields in entries:
                if not fields:
                    continue  # deleted before it was recorded: nothing left to record
                streams.append(stream)
                ids.append(entry_id.decode())
                campaigns.append(campaign)
                types.append(fields[b"t"].decode())
                docs.append(entry_data(fields))
        done = 0  # events: an entry of a claim batch holds each of its claims
        if ids:
            kinds = set(types)
            if kinds == {"claim"}:
                done = await self.pool.fetchval(RECORD_CLAIMS, streams, ids, campaigns, docs)
            else:
                async with self.pool.acquire() as conn, conn.transaction():
                    done = await conn.fetchval(RECORD_BATCH, streams, ids, campaigns, types, docs)
                    # the entries these project are of one event each (gathered entries
                    # hold claims only), so their ids are their events' ids
                    if "status" in kinds:
                        await conn.execute(RECORD_STATUS, streams, ids)
                    for concerns, statement in PROJECT_MONEY:
                        if kinds & concerns:
                            await conn.execute(statement, streams, ids)
        for stream, entries in batches:
            if entries:
                # replica mode: on the server the entries were read from, the primary the
                # rule confirmed, not wherever the client's own map points (a paused old
                # primary that woke up would take the acknowledgements and drop them)
                acker = self.scripts.owners.pinned(stream) if self.ack == "replica" else self.redis
                await acker.xack(stream, keys.FLUSH_GROUP, *[e[0] for e in entries])
                await self._trim(stream)
        if ids:  # in entries, as the metrics say
            metrics.FLUSHED.inc(len(ids))
            metrics.FLUSH_BATCH_SIZE.observe(len(ids))
        return int(done)

    async def _trim(self, stream: str) -> None:
        """Drop entries that are delivered and acknowledged, never anything pending."""
        await self.scripts.run(TrimAcked(stream=stream, group=keys.FLUSH_GROUP))

    async def read(
        self, streams: list[str], start: str, block_ms: int | None
    ) -> list[tuple[str, list[Entry]]]:
        """Up to `batch` entries of each stream after `start` ('>': new ones, '0': this
        consumer's pending ones). One XREADGROUP for all streams on one server, blocking up
        to `block_ms`; on a cluster one per hash slot, pipelined (one round trip per node),
        and a pause of `block_ms` instead of blocking when none had anything."""
        groups = topology.slot_groups(self.redis, streams)
        if self.ack == "replica":
            return await self._read_replicated(groups, start, block_ms)
        if len(groups) == 1:
            replies = [await self.redis.xreadgroup(**self._read_args(groups[0], start, block_ms))]
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for group in groups:
                    pipe.xreadgroup(**self._read_args(group, start, None))
                replies = await pipe.execute()
            if block_ms and not any(replies):
                await asyncio.sleep(block_ms / 1000)
        return [(s.decode(), entries) for reply in replies for s, entries in reply or []]

    async def _read_replicated(
        self, groups: list[list[str]], start: str, block_ms: int | None
    ) -> list[tuple[str, list[Entry]]]:
        """Read each slot's streams on one pinned connection to its primary, then wait on
        it for every replica that could be promoted (`AckRule.confirm`): XREADGROUP
        propagates its deliveries, so a replica that confirms them has every entry read
        too. Unconfirmed: RedisError, and the entries stay pending. They are acknowledged
        on that connection too, and a failure drops it: the next read (of what is pending
        first) goes to the primary of that moment, which holds the deliveries."""
        found: list[tuple[str, list[Entry]]] = []
        try:
            for group in groups:
                conn = self.scripts.owners.pinned(group[0])
                wait = block_ms if len(groups) == 1 else None
                reply = await conn.xreadgroup(**self._read_args(group, start, wait))
                entries = [(s.decode(), e) for s, e in reply or []]
                if any(e for _, e in entries):
                    await self.scripts.rule.confirm(conn)
                found += entries
        except topology.REDIS_ERRORS:
            await self.scripts.owners.unpin()
            await self.scripts.owners.refresh()
            raise
        if block_ms and len(groups) > 1 and not found:
            await asyncio.sleep(block_ms / 1000)
        return found

    def _read_args(self, streams: list[str], start: str, block_ms: int | None) -> dict[str, Any]:
        return {
            "groupname": keys.FLUSH_GROUP,
            "consumername": self.consumer,
            "streams": {s: start for s in streams},
            "count": self.batch,
            "block": block_ms,
        }

    async def rescue(self, streams: list[str]) -> int:
        """Take over entries another (dead) consumer left pending, and record them."""
        done = 0
        for stream in streams:
            cursor = "0-0"
            while True:
                cursor_b, entries, _deleted = await self.redis.xautoclaim(
                    stream,
                    keys.FLUSH_GROUP,
                    self.consumer,
                    self.claim_idle_ms,
                    start_id=cursor,
                    count=self.batch,
                )
                done += await self.record([(stream, entries)])
                cursor = cursor_b.decode()
                if cursor == "0-0":
                    break
        return done

    async def drain_pending(self, streams: list[str]) -> int:
        """Record what this consumer read before a crash and never acknowledged."""
        done = 0
        while batches := [b for b in await self.read(streams, "0", None) if b[1]]:
            done += await self.record(batches)
        return done

    async def flush_once(self, block_ms: int | None = 200) -> int:
        """One read-write-ack cycle over new entries; returns how many were recorded."""
        streams = await self.streams()
        return await self.record(await self.read(streams, ">", block_ms))

    async def drain(self) -> int:
        """Flush until no new entry is waiting (pending ones first)."""
        streams = await self.streams()
        done = await self.drain_pending(streams)
        while n := await self.flush_once(block_ms=None):
            done += n
        return done

    async def run(self, stop: asyncio.Event) -> None:
        """Flush until `stop` is set, then drain what is left. Survives PostgreSQL or Redis
        outages by retrying: nothing is acknowledged that was not committed."""
        rescued_at = lag_at = pending_at = 0.0
        first = True
        while not stop.is_set():
            try:
                if first or time.monotonic() - pending_at > PENDING_EVERY_S:
                    await self.drain_pending(await self.streams())
                    first, pending_at = False, time.monotonic()
                if time.monotonic() - rescued_at > self.claim_idle_ms / 1000:
                    await self.rescue(await self.streams())
                    rescued_at = time.monotonic()
                started = time.monotonic()
                done = await self.flush_once()
                if started - lag_at >= LAG_EVERY_S:
                    await stream_lag(self.redis)
                    lag_at = started
                if 0 < done < self.batch:
                    wait = self.linger_ms / 1000 - (time.monotonic() - started)
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), wait)
            except Exception as exc:  # whatever failed, nothing unrecorded was acknowledged
                log.warning("flush failed, retrying: %r", exc)
                first = True  # what was read but not recorded is pending: re-read it
                # and every group made again: a replica promoted in a failover may lack
                # one (its stream's writes were not all replicated), answering NOGROUP
                self._groups.clear()
                await asyncio.sleep(0.5)
        await self.drain()
