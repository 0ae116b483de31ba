"""Evidence integrity (API.md v1.2): papers used for two redemptions.

Three checks join a record's others: `unique_invoice` (the invoice number, compared by a
normalised key that PostgreSQL indexes: one look-up), `unique_documents` (any file's
SHA-256, indexed) and `distinct_photos` (each photo's perceptual hashes against those of
every other redemption's photos, found by index look-ups on bands of the hash). A
record's checks are run again when a later upload elsewhere shares its papers (or stops
sharing them), unless the record is paid. Every step runs under one advisory lock, so two
uploads of the same papers at once cannot both pass.

The checks span every tenant (an invoice is reimbursed once, whichever county pays it), and
a record keeps the ids of all the redemptions it shares papers with; a key scoped to
tenants sees another tenant's only as OTHER_TENANT (`seen_by`; the audit log likewise).
"""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import asyncpg
import msgspec

from issuer.audit import audit
from issuer.documents import DocumentStore
from issuer.model import CheckResult, SettlementOut

log = logging.getLogger("issuer.integrity")
NAMES = ("unique_invoice", "unique_documents", "distinct_photos")
LOCK = 7262023  # pg_advisory_xact_lock key of the integrity checks
SHOWN = 20  # other redemptions a check names at most
# what a key scoped to tenants reads in place of a redemption of another tenant, and of the
# key that uploaded its papers
OTHER_TENANT = "a redemption of another tenant"
OTHER_TENANT_KEY = "a key acting in another tenant"

# Photos: reduced to SIDE pixels on their long side, then the 64-bit pHash (imagehash) of
# the whole and of five crops keeping 1 - CROP of each side (centre, four corners). Two
# photos are near copies when one's whole is within PHOTO_DISTANCE bits of any of the
# other's six. Measured on bench/photos.py's set (docs: catch and false-flag counts).
SIDE = 128
CROP = 0.05
PHOTO_DISTANCE = 6
MAX_PIXELS = 64_000_000  # larger images are not decoded (a 5 MiB PNG can hold billions)
HASHED_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})

# full-width ASCII (U+FF01-U+FF5E) and the ideographic space, folded to ASCII
FULL_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
CHECKS = msgspec.json.Decoder(list[CheckResult])
ENCODE = msgspec.json.Encoder()


def invoice_key(number: str) -> str | None:
    """The invoice number as compared: full-width folded to ASCII, without any whitespace,
    lower case (" No.０１２３ 4567" and "no.01234567" are one invoice). A blank number has
    none (None): it is the same invoice as no other."""
    return "".join(number.translate(FULL_WIDTH).split()).lower() or None


def _signed(value: int) -> int:
    """A 64-bit hash as PostgreSQL's bigint holds it (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def photo_hashes(data: bytes) -> list[int]:
    """The perceptual hashes of a photo, its whole first; none if Pillow cannot read it."""
    # imported here: numpy and scipy stay out of the processes that never hash a photo
    import imagehash
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    return []
                img.draft("L", (SIDE, SIDE))  # JPEG: decode at a fraction of the size
                small = ImageOps.exif_transpose(img).convert("L")
        small.thumbnail((SIDE, SIDE))
    # an uploaded file is untrusted input to a decoder that may raise many kinds of error
    # (truncated, malformed, a bomb): each means "no hash", never a failed upload
    except Exception as exc:
        log.debug("photo not hashed", extra={"error": repr(exc)})
        return []
    w, h = small.size
    dx, dy = round(w * CROP), round(h * CROP)
    boxes = [
        (0, 0, w, h),
        (dx // 2, dy // 2, w - dx + dx // 2, h - dy + dy // 2),
        (dx, dy, w, h),
        (0, 0, w - dx, h - dy),
        (dx, 0, w, h - dy),
        (0, dy, w - dx, h),
    ]
    return [_signed(int(str(imagehash.phash(small.crop(box))), 16)) for box in boxes]


def distance(a: list[int], b: list[int]) -> int:
    """What NEAR_PHOTO compares with PHOTO_DISTANCE: the fewest bits that differ between
    one photo's whole and any hash of the other, either way round."""
    pairs = [(a[0], y) for y in b] + [(x, b[0]) for x in a]
    return min(((x ^ y) & 0xFFFF_FFFF_FFFF_FFFF).bit_count() for x, y in pairs)


async def lock(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK)


async def save_photo_hashes(conn: asyncpg.Connection, sha256: str, hashes: list[int]) -> None:
    await conn.executemany(
        "INSERT INTO photo_hashes (sha256, crop, phash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        [(sha256, n, h) for n, h in enumerate(hashes)],
    )


SAME_INVOICE = """
SELECT o.redemption_id FROM settlements s
JOIN settlements o ON o.invoice_key = s.invoice_key AND o.redemption_id <> s.redemption_id
WHERE s.redemption_id = $1 ORDER BY o.redemption_id
"""
SAME_FILE = """
SELECT DISTINCT o.redemption_id FROM settlement_files f
JOIN settlement_files o ON o.sha256 = f.sha256 AND o.redemption_id <> f.redemption_id
WHERE f.redemption_id = $1 ORDER BY o.redemption_id
"""
# The other photos near this record's: candidates share one of the seven bands of a hash
# (store.py: by the pigeonhole principle, two hashes within BANDS - 1 bits share one), each
# an index look-up; then the exact distance, one side being a whole photo (crop 0).
BANDS = 7  # so PHOTO_DISTANCE may be at most 6; a larger one needs more bands (a migration)
NEAR_PHOTO = """
WITH mine AS (
    SELECT q.* FROM settlement_files f JOIN photo_hashes q ON q.sha256 = f.sha256
    WHERE f.redemption_id = $1 AND f.part = 'photo'
), candidates AS (
    {}
), near AS (
    SELECT DISTINCT sha256 FROM candidates
    WHERE (crop = 0 OR my_crop = 0) AND bit_count((phash # my_phash)::bit(64)) <= $2
)
SELECT DISTINCT o.redemption_id FROM near JOIN settlement_files o ON o.sha256 = near.sha256
WHERE o.part = 'photo' AND o.redemption_id <> $1
ORDER BY o.redemption_id
""".format(
    "\n    UNION\n    ".join(
        "SELECT h.sha256, h.crop, h.phash, m.crop AS my_crop, m.phash AS my_phash"
        f" FROM mine m JOIN photo_hashes h ON h.b{band} = m.b{band}"
        for band in range(BANDS)
    )
)


async def twins(conn: asyncpg.Connection, redemption_id: str) -> dict[str, list[str]]:
    """Per integrity check, the other redemptions that share this record's papers."""
    return {
        "unique_invoice": [r[0] for r in await conn.fetch(SAME_INVOICE, redemption_id)],
        "unique_documents": [r[0] for r in await conn.fetch(SAME_FILE, redemption_id)],
        "distinct_photos": [
            r[0] for r in await conn.fetch(NEAR_PHOTO, redemption_id, PHOTO_DISTANCE)
        ],
    }


SAME = {
    "unique_invoice": "same invoice number as",
    "unique_documents": "a file identical to one of",
    "distinct_photos": f"a photo within {PHOTO_DISTANCE} bits (pHash) of a photo of",
}
ALONE = {
    "unique_invoice": "no other redemption has this invoice number",
    "unique_documents": "no other redemption has any of these files",
    "distinct_photos": "no photo is a near copy of another redemption's",
}


def _naming(name: str, others: list[str]) -> str:
    return f"{SAME[name]} {', '.join(others)}"


def results(found: dict[str, list[str]]) -> list[CheckResult]:
    out = []
    for name in NAMES:
        others = found[name]
        if not others:
            out.append(CheckResult(name=name, passed=True, detail=ALONE[name]))
            continue
        more = f" and {len(others) - SHOWN} more" if len(others) > SHOWN else ""
        detail = _naming(name, others[:SHOWN]) + more
        out.append(
            CheckResult(name=name, passed=False, detail=detail, redemption_ids=others[:SHOWN])
        )
    return out


def hide(check: CheckResult, foreign: set[str]) -> CheckResult:
    """The check without the ids of `foreign`, counted in its detail instead."""
    kept = [rid for rid in check.redemption_ids if rid not in foreign]
    hidden = len(check.redemption_ids) - len(kept)
    if not hidden:
        return check
    more = check.detail.removeprefix(_naming(check.name, check.redemption_ids))
    counted = OTHER_TENANT if hidden == 1 else f"{hidden} redemptions of other tenants"
    detail = _naming(check.name, [*kept, counted]) + more
    return msgspec.structs.replace(check, detail=detail, redemption_ids=kept)


async def seen_by(
    db: asyncpg.Pool | asyncpg.Connection,
    tenants: frozenset[str] | None,
    records: list[SettlementOut],
) -> list[SettlementOut]:
    """The records as a key of these tenants may read them (None: a platform-wide key,
    all of it): a redemption of another tenant that a check names is only counted."""
    named = sorted({rid for r in records for c in r.checks for rid in c.redemption_ids})
    if tenants is None or not named:
        return records
    foreign = {
        row[0]
        for row in await db.fetch(
            "SELECT redemption_id FROM settlements"
            " WHERE redemption_id = ANY($1::text[]) AND tenant <> ALL($2::text[])",
            named,
            sorted(tenants),
        )
    }
    if not foreign:
        return records
    return [
        msgspec.structs.replace(r, checks=[hide(c, foreign) for c in r.checks]) for r in records
    ]


class Refreshed(NamedTuple):
    others: set[str]  # the redemptions this record shares papers with
    changed: bool  # whether its checks changed
    failed: list[str]  # the integrity checks it fails


async def refresh(conn: asyncpg.Connection, redemption_id: str) -> Refreshed:
    """Run the integrity checks of one record again and store them with its others."""
    stored = await conn.fetchval(
        "SELECT checks FROM settlements WHERE redemption_id = $1 FOR UPDATE", redemption_id
    )
    found = await twins(conn, redemption_id)
    checks = [c for c in CHECKS.decode(stored) if c.name not in NAMES] + results(found)
    changed = checks != CHECKS.decode(stored)
    if changed:
        await conn.execute(
            "UPDATE settlements SET checks = $2::jsonb, checks_passed = $3"
            " WHERE redemption_id = $1",
            redemption_id,
            ENCODE.encode(checks).decode(),
            all(c.passed for c in checks),
        )
    return Refreshed(
        {rid for ids in found.values() for rid in ids},
        changed,
        [name for name in NAMES if found[name]],
    )


async def recheck(
    conn: asyncpg.Connection, redemption_ids: Iterable[str], actor: str, cause: str
) -> None:
    """Run again the checks of records whose papers `cause` now shares or no longer shares,
    except paid ones; each change is an audit log entry."""
    unpaid = await conn.fetch(
        "SELECT redemption_id, tenant FROM settlements"
        " WHERE redemption_id = ANY($1::text[]) AND status <> 'paid' ORDER BY redemption_id",
        sorted(set(redemption_ids) - {cause}),
    )
    for row in unpaid:
        done = await refresh(conn, row["redemption_id"])
        if done.changed:
            await audit(
                conn,
                actor,
                "checks_rerun",
                row["redemption_id"],
                "",
                tenant=row["tenant"],
                cause=cause,
                failed=done.failed,
            )


async def backfill(pool: asyncpg.Pool, store: DocumentStore) -> int:
    """Give the records marked integrity_pending (store.py, migration 9: those stored before
    these checks existed, and those given the key "" for a blank invoice number) their
    invoice key, photo hashes and the three checks, paid ones included; returns how many.
    A record that fails one, or whose earlier checks change, gets an audit entry."""
    rows = await pool.fetch(
        "SELECT s.redemption_id, s.tenant, s.meta->>'invoice_no' AS invoice_no,"
        ' s.checks @> \'[{"name": "unique_invoice"}]\' AS checked_before,'
        " coalesce(array_agg(f.sha256) FILTER (WHERE f.part = 'photo'"
        "   AND f.content_type = ANY($1::text[])), '{}') AS photos"
        " FROM settlements s LEFT JOIN settlement_files f USING (redemption_id)"
        " WHERE s.integrity_pending GROUP BY s.redemption_id ORDER BY s.redemption_id",
        sorted(HASHED_TYPES),
    )
    if not rows:
        return 0
    hashes: dict[str, list[int]] = {}
    for sha256 in {sha for row in rows for sha in row["photos"]}:
        try:
            data = await asyncio.to_thread(store.get, sha256)
        except OSError as exc:  # a file lost from the store: its photo cannot be compared
            log.warning("stored photo unreadable", extra={"sha256": sha256, "error": repr(exc)})
            continue
        hashes[sha256] = await asyncio.to_thread(photo_hashes, data)
    async with pool.acquire() as conn, conn.transaction():
        await lock(conn)
        # another replica starting at the same time may have done them while we hashed
        still = await conn.fetch(
            "SELECT redemption_id FROM settlements"
            " WHERE integrity_pending AND redemption_id = ANY($1::text[])",
            [row["redemption_id"] for row in rows],
        )
        left = {r["redemption_id"] for r in still}
        rows = [row for row in rows if row["redemption_id"] in left]
        for row in rows:
            await conn.execute(
                "UPDATE settlements SET invoice_key = $2, integrity_pending = false"
                " WHERE redemption_id = $1",
                row["redemption_id"],
                invoice_key(row["invoice_no"] or ""),
            )
        for sha256, found in hashes.items():
            await save_photo_hashes(conn, sha256, found)
        for row in rows:
            done = await refresh(conn, row["redemption_id"])
            if done.failed or (row["checked_before"] and done.changed):
                await audit(
                    conn,
                    "migration",
                    "checks_rerun",
                    row["redemption_id"],
                    "",
                    tenant=row["tenant"],
                    failed=done.failed,
                )
    log.info("integrity checks added to earlier records", extra={"records": len(rows)})
    return len(rows)
