"""After a surge: prove from Redis and PostgreSQL that nothing was over-issued.

`python -m loadtest.verify --campaign ID [--told DIR_OR_FILE ...]` waits until the flusher
has written the campaign's claims to PostgreSQL, then prints one `PASS name: detail` or
`FAIL name: detail` line per invariant and a final verdict; the exit code is 0 only if
every check passes. Told files list the voucher ids that clients received, one per line
(a directory stands for every `*.txt` in it); ids of other campaigns are ignored.

A lottery round adds `--draw FILE` (the published draw document) and `--applications FILE`
(a JSON list of `GET /v1/applications/{id}` answers after the draw, one per application a
client was told about): the document verifies, the winners are min(quota, applications)
or fewer only where money binds, every application is in the draw, and every winner's
application says won with its voucher (the told ids are then those vouchers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from issuer import draw_rules, keys, money, store, topology
from issuer.campaigns import hash_keys
from issuer.config import Settings
from issuer.errors import ApiError
from issuer.flusher import stream_lag
from issuer.ids import campaign_of
from issuer.reconcile import (
    Vouchers,
    events_in_flight,
    ledger_problems,
    project,
    read_ledger,
    round_ids,
)

POLL_S = 0.2
PROGRESS_EVERY_S = 5.0
EXAMPLES = 3  # ids shown when sets differ
QUOTA = "issued ≤ quota per round"
ISSUANCE = "claims' reservations ≤ round budget"
LEDGER = "reserved + spent ≤ round budget + overdrawn"
# per round, from PostgreSQL: each redemption's discount, its voucher's reservation and the
# subsidy its refunds returned
REDEMPTIONS = """
SELECT r.round_id, r.discount_fen, v.reserve_fen, r.subsidy_returned_fen
FROM redemptions r JOIN vouchers v USING (voucher_id) WHERE r.campaign_id = $1
"""


class Check(msgspec.Struct):
    """One invariant's verdict; `line` is how it is printed."""

    name: str
    ok: bool
    detail: str

    @property
    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def load_told(paths: Iterable[str | Path]) -> set[str]:
    """Voucher ids from told files, or from every `*.txt` of a directory; blank lines skipped."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.txt")) if path.is_dir() else [path]
    return {line.strip() for f in files for line in f.read_text().splitlines() if line.strip()}


def _of_campaign(voucher_id: str, campaign_id: str) -> bool:
    try:
        return campaign_of(voucher_id) == campaign_id
    except ApiError:  # not a voucher id at all
        return False


def _examples(ids: Iterable[str]) -> str:
    return ", ".join(sorted(ids)[:EXAMPLES])


async def wait_drained(redis: Redis, campaign_id: str, drain_timeout: float) -> Check:
    """Poll until no stream entry waits for PostgreSQL, or at least none of this campaign's
    events; progress goes to stderr every few seconds."""
    stream = keys.CampaignKeys(campaign_id).events
    start = last_note = time.monotonic()
    while True:
        lag, age = await stream_lag(redis)
        flying = len(await events_in_flight(redis, stream)) if lag else 0
        waited = time.monotonic() - start
        if not flying:
            detail = f"no event of {campaign_id} waits for PostgreSQL (after {waited:.1f} s)"
            return Check("flusher drained", True, detail)
        if waited >= drain_timeout:
            detail = (
                f"{flying} events of {campaign_id} still not in PostgreSQL after"
                f" {drain_timeout:g} s ({lag} entries waiting in all streams, oldest {age:.0f} s)"
            )
            return Check("flusher drained", False, detail)
        if time.monotonic() - last_note >= PROGRESS_EVERY_S:
            last_note = time.monotonic()
            print(
                f"waiting for the flusher: {flying} events of {campaign_id} not yet in"
                f" PostgreSQL, {lag} entries in all streams ({waited:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        await asyncio.sleep(POLL_S)


async def _hash(redis: Redis, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() async for k, v in redis.hscan_iter(key, count=1000)}


def _one_each(
    name: str, what: str, column: list[str], index: dict[str, str], vouchers: set[str]
) -> Check:
    """At most one voucher per `what`: in PostgreSQL's column, and in Redis where the index
    (`what` -> voucher id) must map one to one onto the vouchers hash."""
    problems = []
    if twice := [k for k, n in Counter(column).items() if n > 1]:
        problems.append(f"PostgreSQL: {len(twice)} {what}s hold more than one voucher")
    indexed = set(index.values())
    if unindexed := vouchers - indexed:
        problems.append(
            f"Redis: {len(unindexed)} vouchers missing from the {what} index"
            f" (e.g. {_examples(unindexed)})"
        )
    if dangling := indexed - vouchers:
        problems.append(f"Redis: {len(dangling)} {what} index entries name no voucher")
    if len(indexed) != len(index):
        problems.append(f"Redis: {len(index) - len(indexed)} {what}s share a voucher")
    if problems:
        return Check(name, False, "; ".join(problems))
    detail = (
        f"PostgreSQL {len(column)} vouchers of {len(column)} {what}s,"
        f" Redis {len(index)} {what}s -> {len(vouchers)} vouchers"
    )
    return Check(name, True, detail)


def _told_checks(told: set[str], in_redis: set[str], in_pg: set[str]) -> list[Check]:
    """What clients were told against what was issued (in both Redis and PostgreSQL)."""
    issued = in_redis & in_pg
    unknown, untold = told - issued, (in_redis | in_pg) - told
    exists = Check(
        "every voucher told to a client exists",
        not unknown,
        f"{len(unknown)} of {len(told)} told ids not in Redis and PostgreSQL"
        f" (e.g. {_examples(unknown)})"
        if unknown
        else f"all {len(told)} told ids in Redis and PostgreSQL",
    )
    all_told = Check(
        "no voucher that no client was told about",
        not untold,
        f"{len(untold)} vouchers no client was told about (e.g. {_examples(untold)})"
        if untold
        else f"every one of {len(in_redis | in_pg)} vouchers was told to a client",
    )
    return [exists, all_told]


def _verdict_of(name: str, notes: list[tuple[bool, str]]) -> Check:
    """One check from (ok, note) pairs: the failed notes if any, else them all."""
    bad = [note for ok, note in notes if not ok]
    return Check(name, not bad, "; ".join(bad or [note for _, note in notes]))


class RoundMoney(msgspec.Struct):
    """A round's money as PostgreSQL's rows and the rules account for it: `held` by its
    issued vouchers' reservations, `used` (spent from reservations), `overdrawn` (taken
    from the campaign pool above them, not yet returned: issuer/money.py)."""

    held: int = 0
    used: int = 0
    overdrawn: int = 0


async def round_money(
    pool: asyncpg.Pool, campaign_id: str, record: Vouchers
) -> dict[str, RoundMoney]:
    """Each round's RoundMoney, the overdraw worked out from each discount and its voucher's
    reservation, never read from what the scripts recorded."""
    rounds: dict[str, RoundMoney] = {}
    for status, reserve, round_id in record.state.values():
        if status == "issued":
            rounds.setdefault(round_id, RoundMoney()).held += reserve
    for r in await pool.fetch(REDEMPTIONS, campaign_id):
        returned = r["subsidy_returned_fen"]
        over = money.overdraw_left(max(0, r["discount_fen"] - r["reserve_fen"]), returned)
        got = rounds.setdefault(r["round_id"], RoundMoney())
        got.used += r["discount_fen"] - returned - over
        got.overdrawn += over
    return rounds


async def _round_checks(
    redis: Redis, ck: keys.CampaignKeys, pg_issued: Counter[str], pg_money: dict[str, RoundMoney]
) -> list[Check]:
    """Per round: vouchers issued (the Redis counter and the PostgreSQL rows) within the
    quota; what its claims reserved (held by issued vouchers, spent from reservations, as
    PostgreSQL's rows account for it) within the round budget; and its ledger in Redis,
    reserved + spent ≤ budget + overdrawn, with overdrawn what the rules make of the rows
    (a discount above the reservation comes from the campaign pool). -1 in Redis means no
    limit."""
    rounds = await round_ids(redis, ck)
    if not rounds:
        missing = f"campaign {ck.campaign_id} has no definition in Redis"
        return [Check(name, False, missing) for name in (QUOTA, ISSUANCE, LEDGER)]
    quotas: list[tuple[bool, str]] = []
    issuance: list[tuple[bool, str]] = []
    ledgers: list[tuple[bool, str]] = []
    for round_id in rounds:
        fields = await redis.hmget(
            ck.round(round_id), "issued", "quota", "reserved", "budget", "spent", "overdrawn"
        )
        if None in fields[:5]:
            missing_round = (False, f"round {round_id} missing in Redis")
            quotas.append(missing_round)
            issuance.append(missing_round)
            ledgers.append(missing_round)
            continue
        issued, quota, reserved, budget, spent, overdrawn = (int(v or 0) for v in fields)
        counts = f"{round_id}: Redis {issued}, PostgreSQL {pg_issued[round_id]}"
        if quota < 0:
            quotas.append((True, f"{counts}, no quota"))
        else:
            over = max(issued, pg_issued[round_id]) > quota
            quotas.append((not over, f"{counts}, quota {quota}"))
        pg = pg_money.get(round_id, RoundMoney())
        claimed = f"{round_id}: {pg.held} held + {pg.used} spent from reservations"
        led = f"{round_id}: {reserved} reserved + {spent} spent, {overdrawn} overdrawn"
        same = overdrawn == pg.overdrawn
        if not same:
            led += f" (the rules make {pg.overdrawn} of PostgreSQL's rows)"
        if budget < 0:
            issuance.append((True, f"{claimed}, no round budget"))
            ledgers.append((same, f"{led}, no round budget"))
        else:
            issuance.append((pg.held + pg.used <= budget, f"{claimed} of {budget}"))
            ok = same and reserved + spent <= budget + overdrawn
            ledgers.append((ok, f"{led} of {budget}"))
    return [
        _verdict_of(QUOTA, quotas),
        _verdict_of(ISSUANCE, issuance),
        _verdict_of(LEDGER, ledgers),
    ]


def _money_check(record: Vouchers, ledger: dict[str, int]) -> Check:
    """The ledger's reserved, spent and clawback_due against what the vouchers,
    redemptions and refunds recorded in PostgreSQL account for."""
    held = sum(reserve for status, reserve, _ in record.state.values() if status == "issued")
    recorded = {"reserved": held, "spent": record.spent, "clawback_due": record.clawback_due}
    notes = [f"{field} Redis {ledger[field]}, PostgreSQL {v}" for field, v in recorded.items()]
    same = all(ledger[field] == v for field, v in recorded.items())
    return Check("Redis money == PostgreSQL money", same, ", ".join(notes))


async def verify(
    redis: Redis,
    pool: asyncpg.Pool,
    campaign_id: str,
    told: set[str] | None,
    drain_timeout: float = 60,
) -> list[Check]:
    """Every invariant of one campaign, after waiting for the flusher; the told checks only
    when `told` (voucher ids clients received) is given."""
    ck = keys.CampaignKeys(campaign_id)
    checks = [await wait_drained(redis, campaign_id, drain_timeout)]
    rows = await pool.fetch(
        "SELECT voucher_id, round_id, person_ref, user_id FROM vouchers WHERE campaign_id = $1",
        campaign_id,
    )
    in_pg = {r["voucher_id"] for r in rows}
    in_redis = await hash_keys(redis, ck.vouchers)

    record = await project(pool, campaign_id, [])
    pg_money = await round_money(pool, campaign_id, record)
    checks += await _round_checks(redis, ck, Counter(r["round_id"] for r in rows), pg_money)

    checks.append(
        _one_each(
            "one voucher per person",
            "person",
            [r["person_ref"] for r in rows],
            await _hash(redis, ck.persons),
            in_redis,
        )
    )
    checks.append(
        _one_each(
            "one voucher per account",
            "account",
            [r["user_id"] for r in rows],
            await _hash(redis, ck.accounts),
            in_redis,
        )
    )

    ledger = await read_ledger(redis, ck)
    if ledger is None:
        checks.append(Check("ledger balances", False, "ledger missing in Redis"))
    else:
        problems = ledger_problems(ledger)
        values = ", ".join(f"{field} {value}" for field, value in ledger.items())
        checks.append(Check("ledger balances", not problems, "; ".join([*problems, values])))
        checks.append(_money_check(record, ledger))

    only_redis, only_pg = in_redis - in_pg, in_pg - in_redis
    same = f"{len(in_redis)} in Redis, {len(in_pg)} in PostgreSQL"
    if only_redis:
        same += f"; {len(only_redis)} only in Redis (e.g. {_examples(only_redis)})"
    if only_pg:
        same += f"; {len(only_pg)} only in PostgreSQL (e.g. {_examples(only_pg)})"
    checks.append(Check("Redis vouchers == PostgreSQL vouchers", in_redis == in_pg, same))

    if told is not None:
        mine = {vid for vid in told if _of_campaign(vid, campaign_id)}
        checks += _told_checks(mine, in_redis, in_pg)
    return checks


async def lottery_checks(
    redis: Redis,
    pool: asyncpg.Pool,
    campaign_id: str,
    doc: dict[str, Any],
    reads: list[dict[str, Any]],
) -> list[Check]:
    """A drawn lottery round: the published document checks, as many winners as the quota
    and the applications allow (fewer only where the round's or campaign's money binds),
    every application a client was told about in the draw, and every winner's application
    won with a voucher that exists."""
    checks = []
    problems = draw_rules.verify(msgspec.convert(doc, draw_rules.DrawDocument))
    detail = (
        "; ".join(problems) if problems else f"{len(doc['applications'])} refs, ranks, outcomes"
    )
    checks.append(Check("draw document verifies", not problems, detail))
    entries = doc["applications"]
    won = sum(1 for e in entries if e.get("outcome") == "won")
    quota = doc.get("quota")
    expected = len(entries) if quota is None else min(quota, len(entries))
    ck = keys.CampaignKeys(campaign_id)
    reserved, budget = await redis.hmget(ck.round(doc["round_id"]), "reserved", "budget")
    ledger = await read_ledger(redis, ck) or {}
    unit = await pool.fetchval(
        "SELECT coalesce(max(reserve_fen), 0) FROM vouchers WHERE campaign_id = $1", campaign_id
    )
    round_left = int(budget or -1) - int(reserved or 0) if int(budget or -1) >= 0 else None
    binds = (round_left is not None and round_left < unit) or ledger.get("available", unit) < unit
    counted = f"{won} won (document says {doc.get('winners')}) of {len(entries)} applications"
    counted += f", quota {quota}"
    ok = won == doc.get("winners") and (won == expected or (won < expected and binds))
    if won < expected:
        counted += ", money binds" if binds else f", {expected} expected"
    checks.append(Check("winners == min(quota, applications)", ok, counted))
    told = {r.get("application_id") for r in reads}
    notes = [
        (
            len(told) == len(entries),
            f"{len(told)} applications told to clients, {len(entries)} in the draw",
        ),
    ]
    statuses = Counter(str(r.get("status")) for r in reads)
    notes.append((statuses["won"] == won, f"{statuses['won']} read as won, {won} won in the draw"))
    notes.append((statuses["applied"] == 0, f"{statuses['applied']} still applied"))
    voucherless = [
        r["application_id"] for r in reads if r.get("status") == "won" and not r.get("voucher_id")
    ]
    notes.append((not voucherless, f"{len(voucherless)} winners without a voucher"))
    checks.append(_verdict_of("every winner's application says won with its voucher", notes))
    return checks


def won_vouchers(reads: list[dict[str, Any]]) -> set[str]:
    """The voucher ids the winners' applications name: what clients of a lottery are told."""
    return {str(r["voucher_id"]) for r in reads if r.get("status") == "won" and r.get("voucher_id")}


def verdict(campaign_id: str, checks: list[Check]) -> str:
    """The final line: PASS, or FAIL with the names of the failed checks."""
    failed = [c.name for c in checks if not c.ok]
    if failed:
        return f"FAIL {len(failed)} of {len(checks)} checks of {campaign_id}: " + ", ".join(failed)
    return f"PASS all {len(checks)} checks of {campaign_id}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.verify", description=__doc__)
    p.add_argument("--campaign", required=True)
    p.add_argument(
        "--told",
        nargs="+",
        action="extend",
        metavar="DIR_OR_FILE",
        help="voucher ids clients received: files, or directories of *.txt",
    )
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S")
    p.add_argument("--draw", type=Path, help="lottery: the published draw document (JSON)")
    p.add_argument(
        "--applications", type=Path, help="lottery: the applications read after the draw (JSON)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print them; 0 if all pass, 1 if any fails (2 on bad arguments)."""
    p = parser()
    args = p.parse_args(argv)
    if not args.redis_url:
        p.error("no Redis: give --redis-url or set REDIS_URL")
    if not args.database_url:
        p.error("no PostgreSQL: give --database-url or set DATABASE_URL")
    try:
        told = load_told(args.told) if args.told is not None else None
    except OSError as exc:
        p.error(f"cannot read told ids: {exc}")
    if (args.draw is None) != (args.applications is None):
        p.error("--draw and --applications go together")
    doc: dict[str, Any] | None = None
    reads: list[dict[str, Any]] = []
    if args.draw is not None:
        try:
            doc = json.loads(args.draw.read_text())
            reads = json.loads(args.applications.read_text())
        except (OSError, ValueError) as exc:
            p.error(f"cannot read the draw: {exc}")
        told = (told or set()) | won_vouchers(reads)

    async def run() -> list[Check]:
        redis = topology.connect(Settings.from_env(redis_url=args.redis_url))  # or a cluster
        pool = await store.connect(args.database_url)
        try:
            checks = await verify(redis, pool, args.campaign, told, args.drain_timeout)
            if doc is not None:
                checks += await lottery_checks(redis, pool, args.campaign, doc, reads)
            return checks
        finally:
            await redis.aclose()
            await pool.close()

    checks = asyncio.run(run())
    for check in checks:
        print(check.line)
    print(verdict(args.campaign, checks), flush=True)
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
