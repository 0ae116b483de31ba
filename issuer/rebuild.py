"""Rebuild a campaign's Redis state from PostgreSQL after Redis lost it (`issuer rebuild`).

Meant for after a Redis data loss, when the campaign's stream is gone with the rest:
PostgreSQL then holds every event the campaign produced, and the Redis state is what those
events left. A campaign whose state is still in Redis is refused, unless `force`, which
deletes that state first (not its idempotency records and nonces, still true); then, while
the stream holds events PostgreSQL lacks, it is refused too: run it again once the flusher
has recorded them (`issuer flush --once`).

Rebuilt exactly as the scripts would have left it:
- `def` (the recorded StoredCampaign, with its explicit rounds) and the campaign registry;
- each round hash: times, quota and budget as the definition set them, then every recorded
  round budget edit and carry-over in stream order; issued (its vouchers), reserved
  (reserve_fen of those still issued), spent (their discounts less subsidy returned),
  overdrawn (what each redemption's discount took from the pool above its reservation,
  less the subsidy its refunds returned: issuer/money.py overdraw_left);
- the ledger: status and version as last recorded, budget, adjustments (0: no operation
  changes them), reserved, spent, clawback_due (subsidy returned after reimbursement and
  not repaid) and available = budget + adjustments - reserved - spent - clawback_due;
- each record as first recorded, with the fields later events changed: vouchers (status,
  redemption), persons and accounts (so one-per-person holds), the expiry set (vouchers
  still issued), registrations, redemptions (refund totals, status, reimbursement) and
  orders, refunds (repayment); and the merchants Redis lacks (global);
- the applications to lottery rounds as last recorded (applied, won or not_drawn), each
  person's and account's latest one, and each round's entries (application_ref -> id);
  not a draw's state: a draw run again counts what was decided and decides the rest;
- the stream, empty, with the flusher's group (a running flusher creates a group only once
  per stream) and its ids following the last one recorded (the flusher would skip an entry
  whose id PostgreSQL already holds).

- the idempotency records of the claims, applications, redemptions and refunds made in
  the last two idempotency buckets (24-48 h), from the request each one recorded, so that a
  client retrying across the loss gets its first answer (a replay of the voucher, not
  ALREADY_CLAIMED; not a second refund); those claims' requests in the winners set, which
  exempts them from a worker's local sold-out refusal; both merged into any still there
  (--force) without replacing them.

Not rebuilt, being short-lived and never recorded: the other idempotency records, claim
and call nonces, rate-limit windows (they start again from zero). Until the idempotency
window (24-48 h) has passed, a retried clawback repayment answers ALREADY_REPAID instead of
a replay; a claim, redemption or refund recorded before its request was (older releases)
is decided again (a claim: ALREADY_CLAIMED with its voucher id); and a signature seen just
before the loss is not known as a replay.

The records are written to staging keys in the campaign's slot (~1000 fields per HSET,
pipelined) and moved in place by one script (`lua/rebuild_commit.lua`), so a running
service sees all of the campaign or none of it; until then, each script answers NOT_FOUND
and changes nothing (a campaign PUT meanwhile creates it anew, and the rebuild refuses).
A worker keeps a definition it cached before the loss (a claim or a campaign read while
the keys are gone makes it drop it); that definition is still current afterwards, since
the ledger comes back with its recorded version.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from issuer import keys, merchants, money
from issuer.campaigns import ENCODE, STORED, round_settings
from issuer.model import StoredCampaign
from issuer.protocol import RebuildCommit
from issuer.reconcile import entry_order, events_in_flight, round_ids
from issuer.scripts import Scripts

CHUNK = 1000  # rows per read from PostgreSQL, fields per HSET
DOCUMENT = msgspec.json.Decoder(dict[str, Any])
Progress = Callable[[int, int], None]  # (records done, records in all)

# The events that set up a campaign, in stream order: its definition, status and version,
# round budget edits and carry-overs.
SETUP_EVENTS = """
SELECT type, data FROM events
WHERE campaign_id = $1 AND type IN ('campaign', 'status', 'round_budget', 'carry_over')
ORDER BY split_part(entry_id, '-', 1)::bigint, split_part(entry_id, '-', 2)::bigint
"""
# the id of the last stream entry recorded (an event of a gathered entry adds its place to
# it: issuer/events.py)
LAST_ENTRY = """
SELECT split_part(entry_id, '-', 1) || '-' || split_part(entry_id, '-', 2) FROM events
WHERE stream = $1
ORDER BY split_part(entry_id, '-', 1)::bigint DESC, split_part(entry_id, '-', 2)::bigint DESC
LIMIT 1
"""
RECORD_COUNT = """
SELECT (SELECT count(*) FROM vouchers WHERE campaign_id = $1)
     + (SELECT count(*) FROM events WHERE campaign_id = $1 AND type = 'registration')
     + (SELECT count(*) FROM redemptions WHERE campaign_id = $1)
     + (SELECT count(*) FROM refunds WHERE campaign_id = $1)
     + (SELECT count(DISTINCT data->>'application_id') FROM events
        WHERE campaign_id = $1 AND type = 'application')
"""
# Each record's first document (its event) and what later events made of it; $1 campaign,
# $2 its stream.
VOUCHERS = """
SELECT e.data, v.status, v.redemption_id FROM vouchers v
JOIN events e ON e.stream = $2 AND e.entry_id = v.entry_id
WHERE v.campaign_id = $1
"""
REGISTRATIONS = """
SELECT data FROM events WHERE campaign_id = $1 AND stream = $2 AND type = 'registration'
"""
REDEMPTIONS = """
SELECT e.data, r.refunded_fen, r.subsidy_returned_fen, r.paid_to_merchant_at IS NOT NULL AS paid
FROM redemptions r JOIN events e ON e.stream = $2 AND e.entry_id = r.entry_id
WHERE r.campaign_id = $1
"""
REFUNDS = """
SELECT e.data, (SELECT min((c.data->>'repaid_at')::bigint) FROM events c
                WHERE c.type = 'clawback_repaid' AND c.data->>'refund_id' = f.refund_id)
               AS repaid_at
FROM refunds f JOIN events e ON e.stream = $2 AND e.entry_id = f.entry_id
WHERE f.campaign_id = $1
"""
# each application as its latest record left it (applied, or won) or as not_drawn if a draw
# said so, oldest application first, so that a person's and an account's latest one is
# staged last
APPLICATIONS = """
SELECT CASE WHEN lost.id IS NULL THEN latest.data
            ELSE jsonb_set(latest.data, '{status}', '"not_drawn"') END AS data
FROM (
    SELECT DISTINCT ON (data->>'application_id') data FROM events
    WHERE campaign_id = $1 AND stream = $2 AND type = 'application'
    ORDER BY data->>'application_id', split_part(entry_id, '-', 1)::bigint DESC,
             split_part(entry_id, '-', 2)::bigint DESC
) latest
LEFT JOIN (
    SELECT DISTINCT jsonb_array_elements_text(data->'application_ids') AS id FROM events
    WHERE campaign_id = $1 AND stream = $2 AND type = 'not_drawn'
) lost ON lost.id = latest.data->>'application_id'
ORDER BY (latest.data->>'applied_at')::bigint
"""
CAMPAIGNS = "SELECT campaign_id FROM campaigns ORDER BY campaign_id"
DEFINITION = "SELECT definition FROM campaigns WHERE campaign_id = $1"
MERCHANTS = """
SELECT m.merchant_id, e.data FROM merchants m
JOIN events e ON e.stream = $1 AND e.entry_id = m.entry_ms || '-' || m.entry_seq
"""


class RebuildRefused(Exception):
    """The campaign cannot be rebuilt now; the message says why."""


class Summary(msgspec.Struct, kw_only=True):
    """What a rebuild restored."""

    campaign_id: str
    status: str
    version: int
    rounds: int
    records: dict[str, int]  # vouchers, registrations, redemptions, refunds, applications
    ledger: dict[str, Any]
    seconds: float


@dataclass
class Setup:
    """The campaign as its setup events left it."""

    stored: StoredCampaign
    status: str
    version: int
    rounds: dict[str, dict[str, int]]  # round id -> opens, closes, valid_until, quota, budget


@dataclass
class Tally:
    """What the records account for."""

    looked_up: tuple[str, str]  # the idempotency buckets a script looks in (staging began)
    request_buckets: set[str] = field(default_factory=set)  # staged idempotency buckets
    records: Counter[str] = field(default_factory=Counter)
    issued: Counter[str] = field(default_factory=Counter)  # per round
    reserved: Counter[str] = field(default_factory=Counter)  # per round, by issued vouchers
    spent: Counter[str] = field(default_factory=Counter)  # per round, net of subsidy returned
    overdrawn: Counter[str] = field(default_factory=Counter)  # per round, not yet repaid
    clawback_due: int = 0


@dataclass
class Writes:
    """Writes for one round trip: hash key -> fields, and expiry set members -> score."""

    hashes: defaultdict[str, dict[str, Any]] = field(default_factory=lambda: defaultdict(dict))
    expiry: dict[str, int] = field(default_factory=dict)
    winners: list[str] = field(default_factory=list)  # idempotency fields of claims

    async def send(self, redis: Redis, ck: keys.CampaignKeys) -> None:
        """Write them to the staging keys."""
        async with redis.pipeline(transaction=False) as pipe:
            for key, fields in self.hashes.items():
                pipe.hset(ck.staged(key), mapping=fields)
            if self.expiry:
                pipe.zadd(ck.staged(ck.expiry), self.expiry)
            if self.winners:
                pipe.sadd(ck.staged(ck.winners), *self.winners)
            await pipe.execute()


def replay_setup(events: Iterable[asyncpg.Record]) -> Setup:
    """Fold the setup events, oldest first (a campaign's first event defines it)."""
    setup = None
    for row in events:
        data = DOCUMENT.decode(row["data"])
        if row["type"] == "campaign":  # (re)defined: rounds as the new definition says
            stored = STORED.decode(row["data"])
            rounds = {r.round_id: round_settings(r)._asdict() for r in stored.rounds}
            setup = Setup(stored=stored, status="active", version=data["version"], rounds=rounds)
            continue
        assert setup is not None, "a campaign's first event defines it"
        if row["type"] == "status":
            setup.status, setup.version = data["status"], data["version"]
        elif row["type"] == "round_budget":
            setup.rounds[data["round_id"]].update(budget=data["budget"], quota=data["quota"])
            setup.version = data["version"]
        else:  # carry_over
            setup.rounds[data["from_round"]]["budget"] -= data["fen"]
            setup.rounds[data["to_round"]]["budget"] += data["fen"]
    assert setup is not None, "a recorded campaign has its campaign event"
    return setup


def stage_voucher(ck: keys.CampaignKeys, row: asyncpg.Record, tally: Tally, out: Writes) -> None:
    doc = DOCUMENT.decode(row["data"])
    doc["status"] = row["status"]
    if row["redemption_id"] is not None:
        doc["redemption_id"] = row["redemption_id"]
    voucher_id, round_id = doc["voucher_id"], doc["round_id"]
    request = doc.get("request", (None, None))  # [idempotency field, fingerprint]
    if stage_request(ck, request, doc["issued_at"], voucher_id, tally, out):
        out.winners.append(request[0])
    out.hashes[ck.vouchers][voucher_id] = ENCODE.encode(doc)
    out.hashes[ck.persons][doc["person_ref"]] = voucher_id
    out.hashes[ck.accounts][doc["user_id"]] = voucher_id
    tally.issued[round_id] += 1
    if doc["status"] == "issued":
        tally.reserved[round_id] += doc["reserve_fen"]
        out.expiry[voucher_id] = doc["expires_at"]


def stage_registration(
    ck: keys.CampaignKeys, row: asyncpg.Record, tally: Tally, out: Writes
) -> None:
    doc = DOCUMENT.decode(row["data"])
    out.hashes[ck.registrations][doc["person_ref"]] = ENCODE.encode(doc)


def stage_request(
    ck: keys.CampaignKeys,
    request: Sequence[str | None],
    made_at_ms: int,
    result_id: str,
    tally: Tally,
    out: Writes,
) -> bool:
    """The idempotency record of `request` (idempotency field and body fingerprint, None
    in records older than them), if recent enough to be looked up: in its bucket, as the
    script wrote it (fingerprint, newline, result id). True if staged."""
    request_key, request_fingerprint = request
    bucket = ck.idempotency(made_at_ms / 1000)[0]
    if not request_key or bucket not in tally.looked_up:
        return False
    out.hashes[bucket][request_key] = f"{request_fingerprint}\n{result_id}"
    tally.request_buckets.add(bucket)
    return True


def stage_redemption(ck: keys.CampaignKeys, row: asyncpg.Record, tally: Tally, out: Writes) -> None:
    doc = DOCUMENT.decode(row["data"])
    request = doc.get("request_key"), doc.get("request_fingerprint")
    stage_request(ck, request, doc["redeemed_at"], doc["redemption_id"], tally, out)
    refunded, returned = row["refunded_fen"], row["subsidy_returned_fen"]
    doc.update(refunded_fen=refunded, subsidy_returned_fen=returned, paid_to_merchant=row["paid"])
    if refunded:
        doc["status"] = "refunded" if refunded == doc["order_amount_fen"] else "partially_refunded"
    out.hashes[ck.redemptions][doc["redemption_id"]] = ENCODE.encode(doc)
    out.hashes[ck.orders][doc["order_id"]] = doc["redemption_id"]
    tally.spent[doc["round_id"]] += doc["discount_fen"] - returned
    tally.overdrawn[doc["round_id"]] += money.overdraw_left(doc.get("overdrawn_fen", 0), returned)


def stage_refund(ck: keys.CampaignKeys, row: asyncpg.Record, tally: Tally, out: Writes) -> None:
    doc = DOCUMENT.decode(row["data"])
    request = doc.get("request_key"), doc.get("request_fingerprint")
    stage_request(ck, request, doc["created_at"], doc["refund_id"], tally, out)
    if row["repaid_at"] is None:
        tally.clawback_due += doc["clawback_due_fen"]
    else:
        doc.update(status="repaid", repaid_at=row["repaid_at"])
    out.hashes[ck.refunds][doc["refund_id"]] = ENCODE.encode(doc)


def stage_application(
    ck: keys.CampaignKeys, row: asyncpg.Record, tally: Tally, out: Writes
) -> None:
    doc = DOCUMENT.decode(row["data"])
    application_id = doc["application_id"]
    stage_request(
        ck, doc.get("request", (None, None)), doc["applied_at"], f"a:{application_id}", tally, out
    )
    out.hashes[ck.applications][application_id] = ENCODE.encode(doc)
    out.hashes[ck.applicants][doc["person_ref"]] = application_id
    out.hashes[ck.applicant_accounts][doc["user_id"]] = application_id
    out.hashes[ck.entries(doc["round_id"])][doc["application_ref"]] = application_id


Stage = Callable[[keys.CampaignKeys, asyncpg.Record, Tally, Writes], None]
SECTIONS: tuple[tuple[str, str, Stage], ...] = (
    ("vouchers", VOUCHERS, stage_voucher),
    ("registrations", REGISTRATIONS, stage_registration),
    ("redemptions", REDEMPTIONS, stage_redemption),
    ("refunds", REFUNDS, stage_refund),
    ("applications", APPLICATIONS, stage_application),
)


def ledger_fields(setup: Setup, tally: Tally) -> dict[str, Any]:
    budget = setup.stored.definition.budget_fen
    adjustments = 0  # no operation changes them (none records an event for it)
    reserved, spent, clawback_due = tally.reserved.total(), tally.spent.total(), tally.clawback_due
    return {
        "status": setup.status,
        "version": setup.version,
        "opens": min(r["opens"] for r in setup.rounds.values()),
        "budget": budget,
        "available": budget + adjustments - reserved - spent - clawback_due,
        "reserved": reserved,
        "spent": spent,
        "clawback_due": clawback_due,
        "adjustments": adjustments,
    }


def state_keys(ck: keys.CampaignKeys, rounds: Iterable[str]) -> list[str]:
    """The keys a rebuild writes (the stream aside)."""
    fixed = [ck.definition, ck.ledger, ck.persons, ck.accounts, ck.vouchers, ck.registrations]
    fixed += [ck.expiry, ck.redemptions, ck.orders, ck.refunds]
    fixed += [ck.applications, ck.applicants, ck.applicant_accounts]
    # a lottery round's entries, and its draw state: not rebuilt, a draw run again counts
    # what was decided and decides the rest (lua/draw_batch.lua)
    per_round = [[ck.round(r), ck.entries(r), ck.draw(r)] for r in rounds]
    return fixed + [key for keys_of_round in per_round for key in keys_of_round]


async def batches(conn: asyncpg.Connection, query: str, *args: Any) -> AsyncIterator[list[Any]]:
    cursor = await conn.cursor(query, *args)
    while rows := await cursor.fetch(CHUNK):
        yield rows


async def stage_records(
    redis: Redis,
    conn: asyncpg.Connection,
    ck: keys.CampaignKeys,
    looked_up: tuple[str, str],
    progress: Progress,
) -> Tally:
    """Write every record to the staging keys (requests: those of the `looked_up`
    idempotency buckets); returns what they account for."""
    tally = Tally(looked_up=looked_up)
    total = await conn.fetchval(RECORD_COUNT, ck.campaign_id)
    progress(0, total)
    for kind, query, stage in SECTIONS:
        async for rows in batches(conn, query, ck.campaign_id, ck.events):
            out = Writes()
            for row in rows:
                stage(ck, row, tally, out)
            await out.send(redis, ck)
            tally.records[kind] += len(rows)
            progress(tally.records.total(), total)
    return tally


async def resume_stream(redis: Redis, stream: str, last_recorded: str) -> None:
    """The stream with the flusher's group, its next ids after `last_recorded`."""
    try:
        await redis.xgroup_create(stream, keys.FLUSH_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    info = await redis.xinfo_stream(stream)
    if entry_order(info["last-generated-id"]) < entry_order(last_recorded):
        await redis.execute_command("XSETID", stream, last_recorded)


async def clear_the_way(redis: Redis, ck: keys.CampaignKeys, live: list[str], force: bool) -> None:
    """Refuse while the campaign's state is in Redis (with `force`, delete it), then while
    its stream holds events PostgreSQL lacks. In this order, PostgreSQL is then complete:
    without its state, no script adds an event to the campaign."""
    present = list(dict.fromkeys(live + [ck.round(r) for r in await round_ids(redis, ck)]))
    if await redis.exists(*present):
        if not force:
            raise RebuildRefused(
                f"campaign {ck.campaign_id} is still in Redis (--force replaces it)"
            )
        await redis.unlink(*present)
    if flying := await events_in_flight(redis, ck.events):
        raise RebuildRefused(
            f"campaign {ck.campaign_id}: {len(flying)} events not yet in PostgreSQL;"
            " run again once the flusher has recorded them (`issuer flush --once`)"
        )


async def rebuild(
    redis: Redis,
    pool: asyncpg.Pool,
    campaign_id: str,
    *,
    force: bool = False,
    progress: Progress = lambda done, total: None,
    clock: Callable[[], float] = time.time,
) -> Summary:
    """Rebuild one campaign's Redis state from PostgreSQL; RebuildRefused if it may not.
    `clock` (epoch s) says which idempotency buckets a script looks in."""
    started = time.monotonic()
    ck = keys.CampaignKeys(campaign_id)
    recorded = await pool.fetchval(DEFINITION, campaign_id)
    if recorded is None:
        raise RebuildRefused(f"campaign {campaign_id}: PostgreSQL holds no definition")
    rounds = [r.round_id for r in STORED.decode(recorded).rounds]
    await clear_the_way(redis, ck, state_keys(ck, rounds), force)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        setup = replay_setup(await conn.fetch(SETUP_EVENTS, campaign_id))
        live = state_keys(ck, setup.rounds)
        staged = [ck.staged(key) for key in live]
        looked_up = ck.idempotency(clock())
        requests = [*(ck.staged(key) for key in looked_up), ck.staged(ck.winners)]
        # left by an interrupted rebuild
        await redis.delete(*staged, *requests)
        try:
            tally = await stage_records(redis, conn, ck, looked_up, progress)
            ledger = await stage_setup(redis, ck, setup, tally)
            await resume_stream(redis, ck.events, await conn.fetchval(LAST_ENTRY, ck.events))
            # requests in the buckets a script would look in now (one may have rolled over
            # while staging); merged, in the same script that moves the records in place
            merged = sorted(set(ck.idempotency(clock())) & tally.request_buckets)
            commit = RebuildCommit(
                winners=ck.winners,
                staged_winners=ck.staged(ck.winners),
                live=live,
                staged=staged,
                buckets=merged,
                staged_buckets=[ck.staged(key) for key in merged],
                moves=len(live),
            )
            if not await Scripts(redis).run(commit):
                raise RebuildRefused(f"campaign {campaign_id} came back while being rebuilt")
        finally:
            await redis.delete(*staged, *requests)
    await redis.sadd(keys.CAMPAIGNS, campaign_id)
    return Summary(
        campaign_id=campaign_id,
        status=setup.status,
        version=setup.version,
        rounds=len(setup.rounds),
        records={kind: tally.records[kind] for kind, _, _ in SECTIONS},
        ledger=ledger,
        seconds=round(time.monotonic() - started, 3),
    )


async def stage_setup(
    redis: Redis, ck: keys.CampaignKeys, setup: Setup, tally: Tally
) -> dict[str, Any]:
    """Write the definition, the ledger and the rounds to the staging keys; returns the
    ledger."""
    out = Writes()
    out.hashes[ck.ledger] = ledger = ledger_fields(setup, tally)
    for round_id, settings in setup.rounds.items():
        out.hashes[ck.round(round_id)] = settings | {
            "issued": tally.issued[round_id],
            "reserved": tally.reserved[round_id],
            "spent": tally.spent[round_id],
            "overdrawn": tally.overdrawn[round_id],
        }
    await out.send(redis, ck)
    await redis.set(ck.staged(ck.definition), ENCODE.encode(setup.stored))
    return ledger


async def restore_global(redis: Redis, pool: asyncpg.Pool) -> int:
    """Restore the merchants Redis lacks (never one it holds: that one is newer), raising
    the merchants' version, and the global stream's group; returns how many merchants
    were restored."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        last_recorded = await conn.fetchval(LAST_ENTRY, keys.GLOBAL_EVENTS)
        restored = 0
        async for rows in batches(conn, MERCHANTS, keys.GLOBAL_EVENTS):
            async with redis.pipeline(transaction=False) as pipe:
                for row in rows:
                    merchant = merchants.MERCHANT.decode(row["data"])
                    pipe.hsetnx(
                        keys.MERCHANTS, row["merchant_id"], merchants.ENCODE.encode(merchant)
                    )
                restored += sum(await pipe.execute())
    if restored:  # a worker may have read them missing since the loss: its copy is stale
        version = await redis.incr(keys.MERCHANT_VERSION)
        await merchants.raise_everywhere(redis, Scripts(redis), version)
    await resume_stream(redis, keys.GLOBAL_EVENTS, last_recorded or "0-0")
    return restored


async def campaign_ids(pool: asyncpg.Pool) -> list[str]:
    """Every campaign PostgreSQL knows."""
    return [r["campaign_id"] for r in await pool.fetch(CAMPAIGNS)]


class TextBar:
    """A progress bar on a text stream: redrawn in place on a terminal, otherwise one line
    per tenth done."""

    WIDTH = 30

    def __init__(self, label: str, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.in_place = stream.isatty()
        self.tenths_shown = -1

    def __call__(self, done: int, total: int) -> None:
        share = done / total if total else 1.0
        filled = int(share * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        line = f"{self.label} [{bar}] {share:4.0%} {done}/{total}"
        if self.in_place:
            self.stream.write("\r" + line + ("\n" if share >= 1 else ""))
        elif int(share * 10) > self.tenths_shown:
            self.tenths_shown = int(share * 10)
            self.stream.write(line + "\n")
        self.stream.flush()


async def rebuild_campaigns(
    redis: Redis, pool: asyncpg.Pool, names: list[str] | None, force: bool
) -> bool:
    """`issuer rebuild`: the merchants, then each campaign (all of them if `names` is None)
    with a progress bar on stderr; prints one JSON line each. False if any was refused."""
    print(msgspec.json.encode({"merchants_restored": await restore_global(redis, pool)}).decode())
    ok = True
    for campaign_id in names or await campaign_ids(pool):
        try:
            summary = await rebuild(
                redis, pool, campaign_id, force=force, progress=TextBar(campaign_id)
            )
        except RebuildRefused as exc:
            print(f"refused: {exc}", file=sys.stderr)
            ok = False
            continue
        print(msgspec.json.encode(summary).decode())
    return ok
