"""`python -m bench.integrity`: what the evidence checks cost an upload at a programme's
scale. Fills an embedded PostgreSQL with N settlement records (default 30,000: a county
programme's whole run), each with five files and one photo's six perceptual hashes, all
random, then times the three look-ups of one record (`integrity.twins`, median of R) and
prints the plans of the invoice and file look-ups (index scans, not table scans). Also
times `photo_hashes` on a 12-megapixel phone JPEG and on a 5 MiB PNG."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import numpy as np
import uvloop
from PIL import Image

from bench.photos import jpeg, render_appliance
from issuer import embedded, integrity, store

CHECKS = '[{"name": "required_parts", "passed": true, "detail": "all present"}]'


def _random_hex(n: int) -> list[str]:
    return [os.urandom(32).hex() for _ in range(n)]


async def fill(pool: asyncpg.Pool, n: int) -> list[str]:
    rng = np.random.default_rng(1)
    ids = [f"bench.{i:020x}" for i in range(n)]
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(
            "settlements",
            columns=[
                "redemption_id",
                "campaign_id",
                "merchant_id",
                "status",
                "meta",
                "checks",
                "checks_passed",
                "submitted_at",
                "invoice_key",
            ],
            records=[
                (rid, "bench", f"m{i % 200}", "submitted", "{}", CHECKS, True, now, f"{i:020d}")
                for i, rid in enumerate(ids)
            ],
        )
        parts = ("confirmation", "invoice", "payment_proof", "photo", "energy_label")
        shas = _random_hex(n * len(parts))
        await conn.copy_records_to_table(
            "settlement_files",
            records=[
                (rid, k, part, shas[i * len(parts) + k], "image/jpeg", 100_000)
                for i, rid in enumerate(ids)
                for k, part in enumerate(parts)
            ],
        )
        hashes = rng.integers(-(2**63), 2**63 - 1, size=(n, 6), dtype=np.int64)
        await conn.copy_records_to_table(
            "photo_hashes",
            columns=["sha256", "crop", "phash"],
            records=[
                (shas[i * len(parts) + 3], crop, int(hashes[i, crop]))
                for i in range(n)
                for crop in range(6)
            ],
        )
        await conn.execute("ANALYZE")
    return ids


async def look_ups(pool: asyncpg.Pool, ids: list[str], repeat: int) -> None:
    took = []
    async with pool.acquire() as conn:
        for rid in ids[:: max(1, len(ids) // repeat)][:repeat]:
            started = time.perf_counter()
            await integrity.twins(conn, rid)
            took.append(time.perf_counter() - started)
        for name, sql in (("invoice", integrity.SAME_INVOICE), ("files", integrity.SAME_FILE)):
            plan = await conn.fetch("EXPLAIN " + sql, ids[0])
            print(f"\nplan of the {name} look-up:")
            for row in plan:
                print("  " + row[0])
        started = time.perf_counter()
        await conn.fetch(integrity.NEAR_PHOTO, ids[0], integrity.PHOTO_DISTANCE)
        photo_ms = (time.perf_counter() - started) * 1000
    ms = sorted(t * 1000 for t in took)
    print(
        f"\nthe three look-ups of one record: median {statistics.median(ms):.1f} ms,"
        f" max {ms[-1]:.1f} ms over {len(ms)} records; of which the photo scan"
        f" {photo_ms:.1f} ms"
    )


def hashing(repeat: int) -> None:
    phone = render_appliance(7, "refrigerator").resize((4000, 3000), Image.Resampling.BILINEAR)
    big_jpeg = jpeg(phone, 90)
    out = io.BytesIO()
    noisy = np.random.default_rng(2).integers(0, 256, size=(1100, 1600, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(out, "PNG")
    for name, data in (("12 MP JPEG", big_jpeg), ("PNG", out.getvalue())):
        took = []
        for _ in range(repeat):
            started = time.perf_counter()
            assert integrity.photo_hashes(data)
            took.append(time.perf_counter() - started)
        print(
            f"photo_hashes of a {name} ({len(data) / 2**20:.1f} MiB):"
            f" median {statistics.median(took) * 1000:.0f} ms"
        )


async def main(args: argparse.Namespace) -> None:
    hashing(args.repeat)
    with tempfile.TemporaryDirectory(prefix="issuer-integrity-") as tmp:
        server = embedded.start_postgres(Path(tmp), settings={"fsync": "off"})
        try:
            pool = await store.connect(server.url)
            await store.migrate(pool)
            started = time.perf_counter()
            ids = await fill(pool, args.records)
            print(f"{args.records:,} records filled in {time.perf_counter() - started:.1f} s")
            await look_ups(pool, ids, args.repeat)
            await pool.close()
        finally:
            await asyncio.to_thread(server.stop)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.integrity", description=__doc__)
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=20)
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse()))
