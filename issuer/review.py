"""The reviewer's reads (API.md v1.2): one settlement record with its order and voucher,
the record's files, disbursement batches with their records, and the audit log. All from
PostgreSQL and the document store: a reviewer's desk never touches the gate."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec

from issuer import integrity
from issuer.auth import ApiKey
from issuer.documents import DocumentStore
from issuer.errors import ApiError
from issuer.model import (
    AuditEntry,
    AuditLog,
    AuditQuery,
    DisbursementOut,
    DisbursementQuery,
    ItemOut,
    RedemptionFacts,
    SettlementOut,
    StoredFile,
)
from issuer.settlement import SELECT, disbursement_out, settlement_out

ITEMS = msgspec.json.Decoder(list[ItemOut])
DETAILS = msgspec.json.Decoder(dict[str, Any])
BATCHES_SHOWN = 200

FACTS = """
SELECT r.order_id, r.order_amount_fen, r.discount_fen, r.paid_at, r.redeemed_at,
       r.refunded_fen, r.subsidy_returned_fen, r.items, r.voucher_id, r.round_id,
       v.issued_at, v.expires_at, v.cap_fen, v.device_id, v.staff_id
FROM redemptions r JOIN vouchers v USING (voucher_id)
WHERE r.redemption_id = $1
"""


def own(key: ApiKey, merchant_id: str, what: str) -> None:
    """FORBIDDEN for a merchant key reading another merchant's `what`."""
    if key.role == "merchant" and key.merchant_id != merchant_id:
        raise ApiError("FORBIDDEN", f"a merchant reads its own {what} only")


async def record(pool: asyncpg.Pool, redemption_id: str, key: ApiKey) -> SettlementOut:
    """One record as the list gives it, with its order, items and voucher."""
    row = await pool.fetchrow(SELECT + " WHERE s.redemption_id = $1", redemption_id)
    if row is None:
        raise ApiError("NOT_FOUND", f"no documents for redemption {redemption_id}")
    own(key, row["merchant_id"], "records")
    (out,) = await integrity.seen_by(pool, key.tenants, [settlement_out(row)])
    facts = await pool.fetchrow(FACTS, redemption_id)
    if facts is None:  # not yet recorded by the flusher
        return out
    fields = dict(facts)
    fields["items"] = ITEMS.decode(facts["items"])
    return msgspec.structs.replace(out, redemption=RedemptionFacts(**fields))


async def file(
    pool: asyncpg.Pool, store: DocumentStore, redemption_id: str, sha256: str, key: ApiKey
) -> tuple[StoredFile, bytes]:
    """A file of the record, with the type its bytes were found to be."""
    merchant_id = await pool.fetchval(
        "SELECT merchant_id FROM settlements WHERE redemption_id = $1", redemption_id
    )
    if merchant_id is None:
        raise ApiError("NOT_FOUND", f"no documents for redemption {redemption_id}")
    own(key, merchant_id, "records")
    row = await pool.fetchrow(
        "SELECT part, sha256, content_type, size FROM settlement_files"
        " WHERE redemption_id = $1 AND sha256 = $2 ORDER BY seq LIMIT 1",
        redemption_id,
        sha256,
    )
    if row is None:
        raise ApiError("NOT_FOUND", f"file {sha256} is not on redemption {redemption_id}")
    try:
        data = await asyncio.to_thread(store.get, sha256)
    except FileNotFoundError:
        raise ApiError("NOT_FOUND", f"file {sha256} is missing from the store") from None
    return StoredFile(**dict(row)), data


BATCHES = """
SELECT d.*, coalesce(array_agg(s.redemption_id ORDER BY s.redemption_id)
                     FILTER (WHERE s.redemption_id IS NOT NULL), '{}') AS redemption_ids
FROM disbursements d LEFT JOIN settlements s USING (disbursement_id)
WHERE ($1::text IS NULL OR d.merchant_id = $1)
  AND ($2::text IS NULL OR (d.paid_at IS NOT NULL) = ($2 = 'paid'))
  AND ($3::text IS NULL OR d.disbursement_id = $3)
  AND ($5::text[] IS NULL OR d.tenant = ANY($5::text[]))
GROUP BY d.disbursement_id
ORDER BY d.created_at DESC, d.disbursement_id
LIMIT $4
"""


async def disbursements(
    pool: asyncpg.Pool,
    query: DisbursementQuery,
    key: ApiKey,
    tenants: frozenset[str] | None,
    batch_id: str | None = None,
) -> list[DisbursementOut]:
    """Batches (newest first, at most BATCHES_SHOWN) with their records, of these tenants
    (None: all); a merchant's own."""
    merchant_id = key.merchant_id if key.role == "merchant" else query.merchant_id
    rows = await pool.fetch(
        BATCHES,
        merchant_id,
        query.status,
        batch_id,
        BATCHES_SHOWN,
        None if tenants is None else sorted(tenants),
    )
    ids = [rid for row in rows for rid in row["redemption_ids"]]
    found = await pool.fetch(SELECT + " WHERE s.redemption_id = ANY($1::text[])", ids)
    seen = await integrity.seen_by(pool, tenants, [settlement_out(r) for r in found])
    records = {r.redemption_id: r for r in seen}
    return [
        disbursement_out(
            row,
            list(row["redemption_ids"]),
            row["paid_at"],
            [records[rid] for rid in row["redemption_ids"]],
        )
        for row in rows
    ]


async def disbursement(pool: asyncpg.Pool, batch_id: str, key: ApiKey) -> DisbursementOut:
    merchant_id = await pool.fetchval(
        "SELECT merchant_id FROM disbursements WHERE disbursement_id = $1", batch_id
    )
    if merchant_id is None:
        raise ApiError("NOT_FOUND", f"disbursement {batch_id}")
    own(key, merchant_id, "disbursements")
    (batch,) = await disbursements(pool, DisbursementQuery(), key, key.tenants, batch_id)
    return batch


# An entry is about a disbursement when its subject is one; else about a redemption. A
# redemption's log holds its own entries and those of the batch that holds it; a
# campaign's, those of its redemptions and of the batches holding any of them. An entry
# belongs to the tenant of what it is about; a rerun of its checks may be caused by an
# upload in another tenant, whose key and redemption a key scoped to $6 does not see (nor
# find by `actor`).
AUDIT = """
SELECT a.id, a.at, a.actor, a.action, a.subject, a.reason, a.details,
       d.disbursement_id IS NOT NULL AS of_batch, x.elsewhere
FROM audit_log a
LEFT JOIN disbursements d ON d.disbursement_id = a.subject
LEFT JOIN settlements c ON c.redemption_id = a.details->>'cause'
CROSS JOIN LATERAL (SELECT coalesce(c.tenant <> ALL($6::text[]), false) AS elsewhere) x
WHERE a.id > $1
  AND ($6::text[] IS NULL OR a.tenant = ANY($6::text[]))
  AND ($2::text IS NULL OR a.actor = $2 AND NOT x.elsewhere)
  AND ($3::text IS NULL OR a.subject = $3 OR a.subject = (
        SELECT disbursement_id FROM settlements WHERE redemption_id = $3))
  AND ($4::text IS NULL
       OR (d.disbursement_id IS NULL AND left(a.subject, length($4) + 1) = $4 || '.')
       OR EXISTS (SELECT 1 FROM settlements s
                  WHERE s.disbursement_id = d.disbursement_id AND s.campaign_id = $4))
ORDER BY a.id
LIMIT $5
"""


async def audit_log(
    pool: asyncpg.Pool, query: AuditQuery, tenants: frozenset[str] | None
) -> AuditLog:
    """Entries of these tenants (None: all) oldest first, a page of `limit` after the
    entry `after`; a cause in another tenant is named as integrity.OTHER_TENANT."""
    rows = await pool.fetch(
        AUDIT,
        int(query.after or 0),
        query.actor,
        query.redemption_id,
        query.campaign_id,
        query.limit + 1,
        None if tenants is None else sorted(tenants),
    )
    entries = []
    for row in rows[: query.limit]:
        detail = {"reason": row["reason"], **DETAILS.decode(row["details"])}
        if row["elsewhere"]:
            detail["cause"] = integrity.OTHER_TENANT
        entries.append(
            AuditEntry(
                entry_id=str(row["id"]),
                at=row["at"],
                actor=integrity.OTHER_TENANT_KEY if row["elsewhere"] else row["actor"],
                action=row["action"],
                redemption_id=None if row["of_batch"] else row["subject"],
                disbursement_id=row["subject"] if row["of_batch"] else None,
                detail=detail,
            )
        )
    more = len(rows) > query.limit
    return AuditLog(entries=entries, next_after=entries[-1].entry_id if more else None)
