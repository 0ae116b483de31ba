"""Compare a campaign's live state in Redis with its record in PostgreSQL."""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from issuer import keys
from issuer.campaigns import STORED, hash_keys

LEDGER_FIELDS = ("budget", "available", "reserved", "spent", "clawback_due", "adjustments")


class Report(msgspec.Struct, kw_only=True):
    campaign_id: str
    redis_vouchers: int
    postgres_vouchers: int
    in_stream: int  # claims still on their way to PostgreSQL
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _entry_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, seq = text.split("-")
    return int(ms), int(seq)


async def claims_in_flight(redis: Redis, stream: str) -> dict[str, dict[str, Any]]:
    """The claims (voucher id -> event) not yet written to PostgreSQL: entries still
    pending in the flusher group or not delivered yet. Acknowledged entries that linger
    in the stream until the next trim do not count."""
    last_delivered = (0, 0)
    pending: set[tuple[int, int]] = set()
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no stream yet
        return {}
    group = next((g for g in groups if g["name"].decode() == keys.FLUSH_GROUP), None)
    if group is not None:
        last_delivered = _entry_id(group["last-delivered-id"])
        for p in await redis.xpending_range(stream, keys.FLUSH_GROUP, "-", "+", 1 << 30):
            pending.add(_entry_id(p["message_id"]))
    found: dict[str, dict[str, Any]] = {}
    start = "-"
    while entries := await redis.xrange(stream, min=start, count=1000):
        for raw_id, fields in entries:
            entry = _entry_id(raw_id)
            if fields.get(b"t") == b"claim" and (entry in pending or entry > last_delivered):
                event = msgspec.json.decode(fields[b"d"])
                found[event["voucher_id"]] = event
        start = "(" + entries[-1][0].decode()
    return found


async def read_ledger(redis: Redis, ck: keys.CampaignKeys) -> dict[str, int] | None:
    """The ledger's LEDGER_FIELDS, None if any of them is missing in Redis."""
    values = await redis.hmget(ck.ledger, *LEDGER_FIELDS)
    if None in values:
        return None
    return {field: int(v) for field, v in zip(LEDGER_FIELDS, values, strict=True)}


def ledger_problems(ledger: dict[str, int]) -> list[str]:
    """What is wrong with a ledger: money that does not balance, or a negative balance."""
    problems = []
    balances = [ledger[f] for f in ("available", "reserved", "spent", "clawback_due")]
    if sum(balances) != ledger["budget"] + ledger["adjustments"]:
        problems.append(
            "ledger does not balance: available + reserved + spent +"
            " clawback_due != budget + adjustments"
        )
    if min(balances) < 0:
        problems.append("ledger has a negative balance")
    return problems


async def round_ids(redis: Redis, ck: keys.CampaignKeys) -> list[str]:
    """The campaign's rounds as its definition in Redis lists them ([] without one)."""
    raw = await redis.get(ck.definition)
    return [rnd.round_id for rnd in STORED.decode(raw).rounds] if raw else []


async def reconcile(redis: Redis, pool: asyncpg.Pool, campaign_id: str) -> Report:
    ck = keys.CampaignKeys(campaign_id)
    problems: list[str] = []
    in_redis = await hash_keys(redis, ck.vouchers)
    flying = await claims_in_flight(redis, ck.events)
    rows = await pool.fetch(
        "SELECT voucher_id, round_id, person_ref, user_id, status, reserve_fen"
        " FROM vouchers WHERE campaign_id = $1",
        campaign_id,
    )
    in_pg = {r["voucher_id"] for r in rows}
    flying = {vid: event for vid, event in flying.items() if vid not in in_pg}
    if missing := in_redis - in_pg - flying.keys():
        problems.append(f"{len(missing)} vouchers in Redis but not in PostgreSQL nor in flight")
    if extra := in_pg - in_redis:
        problems.append(f"{len(extra)} vouchers in PostgreSQL but not in Redis")
    for column in ("person_ref", "user_id"):
        if len({r[column] for r in rows}) != len(rows):
            problems.append(f"PostgreSQL holds two vouchers for one {column}")
    ledger = await read_ledger(redis, ck)
    if ledger is None:
        problems.append("ledger missing in Redis")
    else:
        problems += ledger_problems(ledger)
        reserved = ledger["reserved"]
        held = sum(r["reserve_fen"] for r in rows if r["status"] == "issued")
        held += sum(e["reserve_fen"] for e in flying.values())
        if held != reserved:
            problems.append(f"reserved {reserved} fen in Redis, vouchers hold {held} fen")
    per_round = Counter(r["round_id"] for r in rows)
    per_round.update(e["round_id"] for e in flying.values())
    for round_id in await round_ids(redis, ck):
        issued, quota = await redis.hmget(ck.round(round_id), "issued", "quota")
        if issued is None:
            problems.append(f"round {round_id} missing in Redis")
            continue
        if int(quota) >= 0 and int(issued) > int(quota):
            problems.append(f"round {round_id} issued {int(issued)} over its quota")
        if int(issued) != per_round[round_id]:
            problems.append(
                f"round {round_id}: Redis counts {int(issued)} issued,"
                f" PostgreSQL holds {per_round[round_id]} (with those in flight)"
            )
    if len(await hash_keys(redis, ck.persons)) != len(in_redis):
        problems.append("person index and vouchers differ in Redis")
    return Report(
        campaign_id=campaign_id,
        redis_vouchers=len(in_redis),
        postgres_vouchers=len(in_pg),
        in_stream=len(flying),
        problems=problems,
    )
