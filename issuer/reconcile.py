"""Compare a campaign's live state in Redis with its record in PostgreSQL."""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from issuer import keys, money
from issuer.campaigns import STORED, hash_keys
from issuer.events import decoded_events

LEDGER_FIELDS = ("budget", "available", "reserved", "spent", "clawback_due", "adjustments")


class Report(msgspec.Struct, kw_only=True):
    campaign_id: str
    redis_vouchers: int
    postgres_vouchers: int
    in_stream: int  # events still on their way to PostgreSQL
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def entry_order(raw: bytes | str) -> tuple[int, int]:
    """A stream entry id as (ms, seq), which sorts in stream order."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, seq = text.split("-")
    return int(ms), int(seq)


InFlight = list[tuple[str, dict[str, Any]]]  # (type, data) in stream order


async def events_in_flight(redis: Redis, stream: str) -> InFlight:
    """The events not yet written to PostgreSQL, oldest first: entries still pending in the
    flusher group or not delivered yet. Acknowledged entries that linger in the stream
    until the next trim do not count. (A pending entry may already be committed: callers
    skip what PostgreSQL already holds.)"""
    last_delivered = (0, 0)
    pending: set[tuple[int, int]] = set()
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no stream yet
        return []
    group = next((g for g in groups if g["name"].decode() == keys.FLUSH_GROUP), None)
    if group is not None:
        last_delivered = entry_order(group["last-delivered-id"])
        for p in await redis.xpending_range(stream, keys.FLUSH_GROUP, "-", "+", 1 << 30):
            pending.add(entry_order(p["message_id"]))
    found: InFlight = []
    start = "-"
    while entries := await redis.xrange(stream, min=start, count=1000):
        for raw_id, fields in entries:
            entry = entry_order(raw_id)
            if entry in pending or entry > last_delivered:
                found += decoded_events(fields)
        start = "(" + entries[-1][0].decode()
    return found


def claims_of(flying: InFlight) -> dict[str, dict[str, Any]]:
    """voucher id -> claim event, of the claims in flight."""
    return {data["voucher_id"]: data for kind, data in flying if kind == "claim"}


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


class Vouchers(msgspec.Struct, kw_only=True):
    """Each voucher's (status, reserve, round) as PostgreSQL holds it with the events in
    flight applied on top, and the money PostgreSQL plus those events account for: per
    round, spent (discounts less subsidy returned) and overdrawn (issuer/money.py)."""

    state: dict[str, tuple[str, int, str]]
    spent_by_round: Counter[str]
    overdrawn: Counter[str]
    clawback_due: int

    @property
    def spent(self) -> int:
        return self.spent_by_round.total()


async def project(pool: asyncpg.Pool, campaign_id: str, flying: InFlight) -> Vouchers:
    rows = await pool.fetch(
        "SELECT voucher_id, round_id, status, reserve_fen FROM vouchers WHERE campaign_id = $1",
        campaign_id,
    )
    state = {r["voucher_id"]: (r["status"], r["reserve_fen"], r["round_id"]) for r in rows}
    redeemed = {  # redemption id -> (round, discount, overdrawn at payment)
        r["redemption_id"]: (r["round_id"], r["discount_fen"], r["overdrawn_fen"])
        for r in await pool.fetch(
            "SELECT redemption_id, round_id, discount_fen, overdrawn_fen FROM redemptions"
            " WHERE campaign_id = $1",
            campaign_id,
        )
    }
    refunds = {
        r["refund_id"]: r
        for r in await pool.fetch(
            "SELECT refund_id, redemption_id, subsidy_returned_fen, clawback_due_fen,"
            " repaid_at IS NOT NULL AS repaid FROM refunds WHERE campaign_id = $1",
            campaign_id,
        )
    }
    returned: Counter[str] = Counter()  # per redemption
    for f in refunds.values():
        returned[f["redemption_id"]] += f["subsidy_returned_fen"]
    clawback = sum(r["clawback_due_fen"] for r in refunds.values() if not r["repaid"])
    for kind, data in flying:
        vid = data.get("voucher_id", "")
        if kind == "claim" and vid not in state:
            state[vid] = ("issued", data["reserve_fen"], data["round_id"])
        elif kind in ("redemption", "expiry", "refund") and vid in state:
            status = {"redemption": "redeemed", "expiry": "expired"}.get(kind)
            _, reserve, round_id = state[vid]
            state[vid] = (status or data["voucher_status"], reserve, round_id)
        if kind == "redemption" and data["redemption_id"] not in redeemed:
            over = data.get("overdrawn_fen", 0)
            redeemed[data["redemption_id"]] = (data["round_id"], data["discount_fen"], over)
        elif kind == "refund" and data["refund_id"] not in refunds:
            returned[data["redemption_id"]] += data["subsidy_returned_fen"]
            clawback += data["clawback_due_fen"]
        elif kind == "clawback_repaid":
            recorded = refunds.get(data["refund_id"])
            if recorded is None or not recorded["repaid"]:
                clawback -= data["clawback_fen"]
    spent: Counter[str] = Counter()
    overdrawn: Counter[str] = Counter()
    for rid, (round_id, discount, over) in redeemed.items():
        spent[round_id] += discount - returned[rid]
        overdrawn[round_id] += money.overdraw_left(over, returned[rid])
    return Vouchers(state=state, spent_by_round=spent, overdrawn=overdrawn, clawback_due=clawback)


async def reconcile(redis: Redis, pool: asyncpg.Pool, campaign_id: str) -> Report:
    ck = keys.CampaignKeys(campaign_id)
    problems: list[str] = []
    in_redis = await hash_keys(redis, ck.vouchers)
    flying = await events_in_flight(redis, ck.events)
    rows = await pool.fetch(
        "SELECT voucher_id, round_id, person_ref, user_id FROM vouchers WHERE campaign_id = $1",
        campaign_id,
    )
    in_pg = {r["voucher_id"] for r in rows}
    claims = {vid: e for vid, e in claims_of(flying).items() if vid not in in_pg}
    if missing := in_redis - in_pg - claims.keys():
        problems.append(f"{len(missing)} vouchers in Redis but not in PostgreSQL nor in flight")
    if extra := in_pg - in_redis:
        problems.append(f"{len(extra)} vouchers in PostgreSQL but not in Redis")
    for column in ("person_ref", "user_id"):
        if len({r[column] for r in rows}) != len(rows):
            problems.append(f"PostgreSQL holds two vouchers for one {column}")
    record = await project(pool, campaign_id, flying)
    held_by_round: Counter[str] = Counter()
    for status, reserve, round_id in record.state.values():
        if status == "issued":
            held_by_round[round_id] += reserve
    ledger = await read_ledger(redis, ck)
    if ledger is None:
        problems.append("ledger missing in Redis")
    else:
        problems += ledger_problems(ledger)
        recorded = {
            "reserved": held_by_round.total(),
            "spent": record.spent,
            "clawback_due": record.clawback_due,
        }
        for field, value in recorded.items():
            if ledger[field] != value:
                problems.append(
                    f"{field} {ledger[field]} fen in Redis, PostgreSQL (with the events in"
                    f" flight) accounts for {value} fen"
                )
    per_round = Counter(r["round_id"] for r in rows)
    per_round.update(e["round_id"] for e in claims.values())
    for round_id in await round_ids(redis, ck):
        issued, quota, reserved, spent, overdrawn = await redis.hmget(
            ck.round(round_id), "issued", "quota", "reserved", "spent", "overdrawn"
        )
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
        if int(reserved) != held_by_round[round_id]:
            problems.append(
                f"round {round_id}: {int(reserved)} fen reserved in Redis, its issued"
                f" vouchers hold {held_by_round[round_id]} fen"
            )
        money_of_round = {
            "spent": (int(spent or 0), record.spent_by_round[round_id]),
            "overdrawn": (int(overdrawn or 0), record.overdrawn[round_id]),
        }
        for name, (in_redis_fen, recorded_fen) in money_of_round.items():
            if in_redis_fen != recorded_fen:
                problems.append(
                    f"round {round_id}: {name} {in_redis_fen} fen in Redis, PostgreSQL (with"
                    f" the events in flight) accounts for {recorded_fen} fen"
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
