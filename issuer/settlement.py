"""Reimbursing merchants: document submissions, the auditor's decisions, disbursement
batches due 30 working days after approval, and marking them paid. Kept in PostgreSQL
(not the surge path); every auditor action is an append-only audit log entry; marking a
batch paid also tells the gate (Redis), so that later refunds become clawbacks."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from issuer import documents, due_dates, integrity, keys
from issuer.audit import audit
from issuer.auth import ApiKey
from issuer.errors import ApiError
from issuer.idempotency import fingerprint
from issuer.identity import name_ref
from issuer.model import (
    CheckResult,
    DecisionIn,
    DisbursementIn,
    DisbursementList,
    DisbursementOut,
    PaidIn,
    SettlementOut,
    SettlementQuery,
    StoredFile,
)
from issuer.redemptions import REDEMPTION, RedemptionRecord, Redemptions, mark_paid
from issuer.registrations import REGISTRATION
from issuer.schedule import to_millis
from issuer.scripts import Scripts
from issuer.vouchers import VOUCHER
from issuer.workdays import Calendar, Due, HolidaysFileError

log = logging.getLogger("issuer.settlement")
ENCODE = msgspec.json.Encoder()
CHECKS = msgspec.json.Decoder(list[CheckResult])
Action = Callable[[asyncpg.Connection], Awaitable[tuple[int, Any]]]

SELECT = """
SELECT s.*, coalesce(r.discount_fen - r.subsidy_returned_fen, 0) AS subsidy_fen,
       coalesce((SELECT jsonb_agg(jsonb_build_object('part', f.part, 'sha256', f.sha256,
                     'content_type', f.content_type, 'size', f.size) ORDER BY f.seq)
                 FROM settlement_files f WHERE f.redemption_id = s.redemption_id),
                '[]'::jsonb) AS files
FROM settlements s LEFT JOIN redemptions r USING (redemption_id)
"""


def disbursement_out(
    batch: asyncpg.Record,
    redemption_ids: list[str],
    paid_at: datetime | None,
    records: list[SettlementOut] | None = None,
) -> DisbursementOut:
    """A batch as served, from its row of `disbursements`; paid once `paid_at` is set."""
    return DisbursementOut(
        disbursement_id=batch["disbursement_id"],
        merchant_id=batch["merchant_id"],
        due_date=batch["due_date"],
        due_date_provisional=batch["provisional_until_year"] is not None,
        provisional_until_year=batch["provisional_until_year"],
        total_fen=batch["total_fen"],
        redemption_ids=redemption_ids,
        status="pending" if paid_at is None else "paid",
        paid_at=paid_at,
        records=records or [],
    )


def settlement_out(row: asyncpg.Record, subsidy_fen: int | None = None) -> SettlementOut:
    return SettlementOut(
        redemption_id=row["redemption_id"],
        campaign_id=row["campaign_id"],
        merchant_id=row["merchant_id"],
        status=row["status"],
        subsidy_fen=row["subsidy_fen"] if subsidy_fen is None else subsidy_fen,
        checks=CHECKS.decode(row["checks"]),
        checks_passed=row["checks_passed"],
        files=msgspec.json.decode(row["files"], type=list[StoredFile]),
        submitted_at=row["submitted_at"],
        decided_at=row["decided_at"],
        decided_by=row["decided_by"],
        reason=row["reason"],
        override_reason=row["override_reason"],
        due_date=row["due_date"],
        due_date_provisional=row["provisional_until_year"] is not None,
        provisional_until_year=row["provisional_until_year"],
        disbursement_id=row["disbursement_id"],
    )


async def lock_batches(conn: asyncpg.Connection, redemption_ids: set[str]) -> None:
    """Lock the pending batches of these records before the records themselves: a batch's
    payment (`Settlement.paid`) locks its batch, then its records."""
    await conn.execute(
        "SELECT 1 FROM disbursements WHERE paid_at IS NULL AND disbursement_id IN"
        " (SELECT disbursement_id FROM settlements WHERE redemption_id = ANY($1::text[]))"
        " ORDER BY disbursement_id FOR UPDATE",
        sorted(redemption_ids),
    )


def batch_due(records: list[asyncpg.Record]) -> Due:
    """The due date of a batch of these settlement rows (`due_dates.batch_due`)."""
    return due_dates.batch_due((r["due_date"], r["provisional_until_year"]) for r in records)


def subsidy(rec: RedemptionRecord) -> int:
    """What the merchant is reimbursed for a redemption: its discount, less what refunds
    returned."""
    return rec.discount_fen - rec.subsidy_returned_fen


class Settlement:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        scripts: Scripts,
        redemptions: Redemptions,
        store: documents.DocumentStore,
        person_key: bytes,
        calendar: Calendar,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` (epoch s) dates approvals, hence due dates."""
        self.pool = pool
        self.redis = redis
        self.scripts = scripts
        self.redemptions = redemptions
        self.store = store
        self.person_key = person_key
        self.calendar = calendar
        self.clock = clock

    # ------------------------------------------------------------ merchant

    async def submit(
        self, redemption_id: str, key: ApiKey, content_type: str, raw: bytes
    ) -> SettlementOut:
        """Store a redemption's documents (replacing any earlier set) and check them."""
        cached, rec = await self.redemptions.record(redemption_id)
        if key.merchant_id != rec.merchant_id:
            raise ApiError("FORBIDDEN", "a merchant submits documents for its own redemptions")
        meta, parts = documents.parse_upload(content_type, raw)
        invoice = integrity.invoice_key(meta.invoice_no)
        if not invoice:
            raise ApiError("INVALID_REQUEST", "meta.invoice_no: blank")
        ck = cached.keys
        raw_voucher = await self.redis.hget(ck.vouchers, rec.voucher_id)
        person = VOUCHER.decode(raw_voucher).person_ref if raw_voucher else ""
        raw_registration = await self.redis.hget(ck.registrations, person)
        days = cached.definition.document_deadline_days
        rnd = next((r for r in cached.stored.rounds if r.round_id == rec.round_id), None)
        deadline = None
        if days is not None and rnd is not None:
            deadline = to_millis(rnd.closes_at) + days * 86_400_000
        codes = documents.appliance_codes([(i.category, i.gb_code) for i in rec.items])
        facts = documents.Facts(
            order_amount_fen=rec.order_amount_fen,
            gb_codes=codes,
            appliances=len(codes),
            buyer_name_ref=REGISTRATION.decode(raw_registration).name_ref
            if raw_registration
            else None,
            deadline_ms=deadline,
            submitted_ms=int(time.time() * 1000),
        )
        checks = documents.run_checks(meta, parts, facts, self.person_key)
        photos = {
            p.sha256: await asyncio.to_thread(integrity.photo_hashes, p.data)
            for p in parts
            if p.kind == "photo" and p.content_type in integrity.HASHED_TYPES
        }
        for part in parts:  # content-addressed: writing before the record is harmless
            await asyncio.to_thread(self.store.put, part.sha256, part.data)
        kept = msgspec.structs.replace(
            meta, invoice_buyer_name=name_ref(self.person_key, meta.invoice_buyer_name)
        )
        async with self.pool.acquire() as conn, conn.transaction():
            await integrity.lock(conn)
            status = await conn.fetchval(
                "SELECT status FROM settlements WHERE redemption_id = $1 FOR UPDATE",
                redemption_id,
            )
            if status in ("approved", "paid"):
                raise ApiError("SETTLEMENT_CLOSED", f"redemption {redemption_id} is {status}")
            # the records the replaced papers matched: they may pass again
            shared_before = await integrity.twins(conn, redemption_id)
            await conn.execute(
                """
                INSERT INTO settlements (redemption_id, campaign_id, merchant_id, status, meta,
                                         checks, checks_passed, submitted_at, invoice_key,
                                         tenant)
                VALUES ($1, $2, $3, 'submitted', $4::jsonb, $5::jsonb, $6, now(), $7, $8)
                ON CONFLICT (redemption_id) DO UPDATE
                SET status = 'submitted', meta = excluded.meta, checks = excluded.checks,
                    checks_passed = excluded.checks_passed, submitted_at = now(),
                    decided_at = NULL, decided_by = NULL, reason = NULL, override_reason = NULL,
                    invoice_key = excluded.invoice_key
                """,
                redemption_id,
                ck.campaign_id,
                rec.merchant_id,
                ENCODE.encode(kept).decode(),
                ENCODE.encode(checks).decode(),
                all(c.passed for c in checks),
                invoice,
                cached.tenant,
            )
            await conn.execute(
                "DELETE FROM settlement_files WHERE redemption_id = $1", redemption_id
            )
            await conn.executemany(
                "INSERT INTO settlement_files VALUES ($1, $2, $3, $4, $5, $6)",
                [
                    (redemption_id, n, p.kind, p.sha256, p.content_type, len(p.data))
                    for n, p in enumerate(parts)
                ],
            )
            for sha256, hashes in photos.items():
                await integrity.save_photo_hashes(conn, sha256, hashes)
            mine = await integrity.refresh(conn, redemption_id)
            row = await conn.fetchrow(SELECT + " WHERE s.redemption_id = $1", redemption_id)
            await audit(
                conn,
                key,
                "documents_submitted",
                redemption_id,
                "",
                tenant=cached.tenant,
                files=len(parts),
                checks_passed=row["checks_passed"],
            )
            shared = mine.others.union(*shared_before.values())
            await lock_batches(conn, shared)
            await integrity.recheck(conn, shared, key.id, redemption_id)
            await self._withdraw(conn, shared, key.id, redemption_id)
        (out,) = await integrity.seen_by(
            self.pool, key.tenants, [settlement_out(row, subsidy(rec))]
        )
        return out

    # ------------------------------------------------------------ auditor

    async def queue(
        self, query: SettlementQuery, tenants: frozenset[str] | None
    ) -> list[SettlementOut]:
        """The records (of these tenants; None: all) in the order they are to be paid: by
        the soonest their due date may turn out to be (a provisional one as if it moved
        earlier by the most it may), then those without a due date in the order they were
        submitted."""
        rows = await self.pool.fetch(
            SELECT + " WHERE ($1::text IS NULL OR s.status = $1)"
            " AND ($2::text IS NULL OR s.merchant_id = $2)"
            " AND ($4::text IS NULL OR s.campaign_id = $4)"
            " AND ($5::boolean IS NULL OR s.checks_passed = $5)"
            " AND ($6::text[] IS NULL OR s.tenant = ANY($6::text[]))"
            " ORDER BY s.due_date - CASE WHEN s.provisional_until_year IS NULL THEN 0 ELSE $3 END,"
            " s.submitted_at LIMIT 1000",
            query.status,
            query.merchant_id,
            due_dates.MAY_MOVE_EARLIER_DAYS,
            query.campaign_id,
            query.checks_passed,
            None if tenants is None else sorted(tenants),
        )
        return await integrity.seen_by(self.pool, tenants, [settlement_out(r) for r in rows])

    async def once(self, key_id: str, request_id: str, payload: object, action: Action) -> Any:
        """Run `action` in one transaction, once per request_id: (status, JSON bytes,
        replayed). A refusal (ApiError) records nothing."""
        print_ = fingerprint(payload)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"{key_id}|{request_id}"
            )
            row = await conn.fetchrow(
                "SELECT fingerprint, status, response FROM settlement_requests"
                " WHERE key_id = $1 AND request_id = $2",
                key_id,
                request_id,
            )
            if row is not None:
                if row["fingerprint"] != print_:
                    raise ApiError("IDEMPOTENCY_MISMATCH")
                return row["status"], row["response"], True
            status, out = await action(conn)
            body = ENCODE.encode(out)
            await conn.execute(
                "INSERT INTO settlement_requests VALUES ($1, $2, $3, $4, $5)",
                key_id,
                request_id,
                print_,
                status,
                body,
            )
            return status, body, False

    async def decide(
        self, redemption_id: str, body: DecisionIn, key: ApiKey
    ) -> tuple[int, bytes, bool]:
        async def action(conn: asyncpg.Connection) -> tuple[int, SettlementOut]:
            row = await conn.fetchrow(
                "SELECT status, checks_passed, tenant FROM settlements"
                " WHERE redemption_id = $1 FOR UPDATE",
                redemption_id,
            )
            if row is None:
                raise ApiError("NOT_FOUND", f"no documents for redemption {redemption_id}")
            if row["status"] != "submitted":
                raise ApiError(
                    "SETTLEMENT_CLOSED", f"redemption {redemption_id} is {row['status']}"
                )
            approve = body.decision == "approve"
            if approve and not row["checks_passed"] and body.override_reason is None:
                raise ApiError(
                    "INVALID_REQUEST",
                    "override_reason: required to approve a record that failed a check",
                )
            at = datetime.fromtimestamp(self.clock(), UTC)
            await due_dates.hold(conn)
            due = due_dates.due_after(self.calendar, at) if approve else None
            await conn.execute(
                "UPDATE settlements SET status = $2, decided_at = $3, decided_by = $4,"
                " reason = $5, override_reason = $6, due_date = $7,"
                " provisional_until_year = $8 WHERE redemption_id = $1",
                redemption_id,
                "approved" if approve else "rejected",
                at,
                key.id,
                body.reason,
                body.override_reason if approve else None,
                *(due or (None, None)),
            )
            overridden = approve and not row["checks_passed"]
            await audit(
                conn,
                key,
                "override_approved" if overridden else "approved" if approve else "rejected",
                redemption_id,
                body.reason,
                tenant=row["tenant"],
                override_reason=body.override_reason if overridden else None,
                due_date=due.day if due else None,
                provisional_until_year=due.provisional_until_year if due else None,
            )
            out = await conn.fetchrow(SELECT + " WHERE s.redemption_id = $1", redemption_id)
            (seen,) = await integrity.seen_by(conn, key.tenants, [settlement_out(out)])
            return 200, seen

        result: tuple[int, bytes, bool] = await self.once(
            key.id, body.request_id, (redemption_id, body), action
        )
        return result

    async def disburse(self, body: DisbursementIn, key: ApiKey) -> tuple[int, bytes, bool]:
        """One batch per merchant (of the key's tenants) of its approved records not yet in
        a batch."""

        async def action(conn: asyncpg.Connection) -> tuple[int, DisbursementList]:
            rows = await conn.fetch(
                "SELECT redemption_id, merchant_id, due_date, provisional_until_year, tenant"
                " FROM settlements"
                " WHERE status = 'approved' AND disbursement_id IS NULL"
                " AND ($1::text IS NULL OR merchant_id = $1)"
                " AND ($2::text[] IS NULL OR tenant = ANY($2::text[]))"
                " ORDER BY merchant_id, redemption_id FOR UPDATE",
                body.merchant_id,
                None if key.tenants is None else sorted(key.tenants),
            )
            # a merchant's records share its tenant (a redemption needs both in one)
            by_merchant: dict[tuple[str, str], list[asyncpg.Record]] = defaultdict(list)
            for row in rows:
                by_merchant[row["merchant_id"], row["tenant"]].append(row)
            batches = []
            for (merchant_id, tenant), mine in by_merchant.items():
                ids = [r["redemption_id"] for r in mine]
                total = await self._reimbursed(ids)
                due = batch_due(mine)
                batch_id = f"d-{secrets.token_hex(10)}"
                await conn.execute(
                    "INSERT INTO disbursements (disbursement_id, merchant_id, created_by,"
                    " due_date, provisional_until_year, total_fen, tenant)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    batch_id,
                    merchant_id,
                    key.id,
                    *due,
                    total,
                    tenant,
                )
                await conn.execute(
                    "UPDATE settlements SET disbursement_id = $1"
                    " WHERE redemption_id = ANY($2::text[])",
                    batch_id,
                    ids,
                )
                await audit(
                    conn, key, "disbursement_created", batch_id, "", tenant=tenant, redemptions=ids
                )
                batches.append(
                    DisbursementOut(
                        disbursement_id=batch_id,
                        merchant_id=merchant_id,
                        due_date=due.day,
                        due_date_provisional=due.provisional_until_year is not None,
                        provisional_until_year=due.provisional_until_year,
                        total_fen=total,
                        redemption_ids=ids,
                        status="pending",
                    )
                )
            return 201, DisbursementList(disbursements=batches)

        result: tuple[int, bytes, bool] = await self.once(key.id, body.request_id, body, action)
        return result

    async def paid(
        self, disbursement_id: str, body: PaidIn, key: ApiKey
    ) -> tuple[int, bytes, bool]:
        """Record the payment; the gate learns the redemptions were reimbursed."""

        async def action(conn: asyncpg.Connection) -> tuple[int, DisbursementOut]:
            batch = await conn.fetchrow(
                "SELECT * FROM disbursements WHERE disbursement_id = $1 FOR UPDATE",
                disbursement_id,
            )
            if batch is None:
                raise ApiError("NOT_FOUND", f"disbursement {disbursement_id}")
            if batch["paid_at"] is not None:
                raise ApiError("SETTLEMENT_CLOSED", f"disbursement {disbursement_id} is paid")
            rows = await conn.fetch(
                "SELECT redemption_id, campaign_id FROM settlements WHERE disbursement_id = $1"
                " ORDER BY redemption_id",
                disbursement_id,
            )
            by_campaign: dict[str, list[str]] = defaultdict(list)
            for row in rows:
                by_campaign[row["campaign_id"]].append(row["redemption_id"])
            for campaign_id, ids in by_campaign.items():  # idempotent: safe to redo on retry
                await mark_paid(self.scripts, campaign_id, disbursement_id, ids)
            paid_at = await conn.fetchval(
                "UPDATE disbursements SET paid_at = now(), paid_by = $2"
                " WHERE disbursement_id = $1 RETURNING paid_at",
                disbursement_id,
                key.id,
            )
            await conn.execute(
                "UPDATE settlements SET status = 'paid' WHERE disbursement_id = $1",
                disbursement_id,
            )
            await audit(
                conn, key, "disbursement_paid", disbursement_id, body.reason, tenant=batch["tenant"]
            )
            return 200, disbursement_out(batch, [r["redemption_id"] for r in rows], paid_at)

        result: tuple[int, bytes, bool] = await self.once(
            key.id, body.request_id, (disbursement_id, body), action
        )
        return result

    async def reload_calendar(self, path: Path | None) -> None:
        """Read the holidays file again (a bad one is logged and the calendar kept) and
        recompute the provisional due dates whose year it now knows."""
        try:
            self.calendar = Calendar.from_file(path)
            await due_dates.recompute(self.pool, self.calendar)
        except HolidaysFileError as exc:
            log.error("holidays file not reloaded", extra={"error": str(exc)})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.error("due dates not recomputed", extra={"error": repr(exc)})

    async def _withdraw(
        self, conn: asyncpg.Connection, redemption_ids: set[str], actor: str, cause: str
    ) -> None:
        """Withdraw the approvals that a check failed since undoes: a record approved while
        its checks passed (no override reason), not yet paid, goes back to `submitted` and
        out of its pending batch, whose total and due date are recomputed. The reviewer
        decides again, and approving it now needs an override reason (API.md)."""
        undone = await conn.fetch(
            "WITH undone AS (SELECT redemption_id, disbursement_id FROM settlements"
            " WHERE redemption_id = ANY($1::text[]) AND status = 'approved'"
            " AND NOT checks_passed AND override_reason IS NULL FOR UPDATE)"
            " UPDATE settlements s SET status = 'submitted', decided_at = NULL,"
            " decided_by = NULL, reason = NULL, due_date = NULL,"
            " provisional_until_year = NULL, disbursement_id = NULL"
            " FROM undone WHERE s.redemption_id = undone.redemption_id"
            " RETURNING s.redemption_id, s.tenant, s.checks, undone.disbursement_id",
            sorted(redemption_ids),
        )
        batches: dict[tuple[str, str], list[str]] = defaultdict(list)
        for row in sorted(undone, key=lambda r: str(r["redemption_id"])):
            await audit(
                conn,
                actor,
                "approval_withdrawn",
                row["redemption_id"],
                "",
                tenant=row["tenant"],
                cause=cause,
                failed=[c.name for c in integrity.CHECKS.decode(row["checks"]) if not c.passed],
                disbursement_id=row["disbursement_id"],
            )
            if row["disbursement_id"] is not None:
                batches[row["disbursement_id"], row["tenant"]].append(row["redemption_id"])
        for (batch_id, tenant), removed in batches.items():
            await self._recount(conn, batch_id, tenant, removed, actor, cause)

    async def _recount(
        self,
        conn: asyncpg.Connection,
        batch_id: str,
        tenant: str,
        removed: list[str],
        actor: str,
        cause: str,
    ) -> None:
        """A pending batch's total and due date, from the records left in it (none left:
        a total of 0, the due date kept; paying it marks nothing). Its log entry names the
        `cause`, as the records' do: a key of another tenant sees neither it nor `actor`."""
        left = await conn.fetch(
            "SELECT redemption_id, due_date, provisional_until_year FROM settlements"
            " WHERE disbursement_id = $1 ORDER BY redemption_id",
            batch_id,
        )
        ids = [r["redemption_id"] for r in left]
        total = await self._reimbursed(ids)
        if left:
            due = batch_due(left)
            await conn.execute(
                "UPDATE disbursements SET total_fen = $2, due_date = $3,"
                " provisional_until_year = $4 WHERE disbursement_id = $1",
                batch_id,
                total,
                *due,
            )
        else:
            await conn.execute(
                "UPDATE disbursements SET total_fen = 0 WHERE disbursement_id = $1", batch_id
            )
        await audit(
            conn,
            actor,
            "disbursement_changed",
            batch_id,
            "",
            tenant=tenant,
            cause=cause,
            removed=removed,
            redemptions=ids,
            total_fen=total,
        )

    async def _reimbursed(self, redemption_ids: list[str]) -> int:
        """What a batch of these records pays its merchant."""
        return sum(subsidy(rec) for rec in await self._records(redemption_ids))

    async def _records(self, redemption_ids: list[str]) -> list[RedemptionRecord]:
        """The redemptions as Redis holds them now (refunds included)."""
        by_campaign: dict[str, list[str]] = defaultdict(list)
        for rid in redemption_ids:
            by_campaign[rid.rpartition(".")[0]].append(rid)
        found = []
        for campaign_id, ids in by_campaign.items():
            raws = await self.redis.hmget(keys.CampaignKeys(campaign_id).redemptions, ids)
            found += [REDEMPTION.decode(raw) for raw in raws if raw is not None]
        return found
