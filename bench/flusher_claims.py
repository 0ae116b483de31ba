"""The flusher's work per issued claim, apart from the HTTP service and the load:
`python -m bench.flusher_claims [--single]` (about a minute).

Valkey and PostgreSQL as `make bench` runs them (fsync on); one campaign whose round is
open with money to spare. Each round is CYCLES cycles of: `--batches` claim batches of
`--batch` claims through the gate's script (tests/fake.py's `Fake`, the claim path's
batcher), then `Flusher.drain()` of what they wrote, as one linger of the running flusher
would find it (200 ms of 3,000 claims/s: 600 claims). Only the drains are measured: this
process's CPU (the flusher), PostgreSQL's (every process of the server, from
/proc/<pid>/schedstat, in ns) and Valkey's (INFO cpu), per claim. `--single` rewrites each
cycle's claims as one stream entry per claim first (the stream as written before entries
were gathered), to compare the two formats.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path

import msgspec
from redis.asyncio import Redis

from bench.cpu import tree
from bench.stack import bench_dir
from bench.valkey_claims import BUDGET, claims, used
from issuer import embedded, keys, store
from issuer.events import decoded_events
from issuer.flusher import Flusher
from issuer.scripts import Scripts
from tests.fake import CK, Fake, settings

ROUNDS = 3
CYCLES = 10


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.flusher_claims", description=__doc__)
    parser.add_argument("--batch", type=int, default=30, help="claims per script call")
    parser.add_argument("--batches", type=int, default=20, help="per drain")
    parser.add_argument("--single", action="store_true", help="one stream entry per claim")
    return parser.parse_args(argv)


def cpu_ns(pids: list[int]) -> int:
    """CPU time so far of these processes (each single-threaded), in ns."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except OSError:
            continue  # gone
    return total


async def one_per_claim(redis: Redis, stream: str, since: str) -> None:
    """Replace the entries after `since` with one entry per event they hold."""
    entries = await redis.xrange(stream, min=f"({since}")
    await redis.xdel(stream, *[entry_id for entry_id, _ in entries])
    async with redis.pipeline(transaction=False) as pipe:
        for _, fields in entries:
            for _, doc in decoded_events(fields):
                pipe.xadd(stream, {b"t": fields[b"t"], b"d": msgspec.json.encode(doc)})
        await pipe.execute()


async def run(args: argparse.Namespace) -> None:
    directory = bench_dir("issuer-flusher-claims-")
    valkey = embedded.start_redis(directory)
    postgres = embedded.start_postgres(directory)
    redis = Redis.from_url(valkey.url)
    pool = await store.connect(postgres.url)
    try:
        await store.migrate(pool)
        fake = Fake(redis, Scripts(redis))
        await fake.put_campaign(settings(), budget_fen=BUDGET)
        await redis.sadd(keys.CAMPAIGNS, CK.campaign_id)  # the registry the flusher reads
        flusher = Flusher(redis, pool, consumer="bench")
        await flusher.drain()
        sent = 0

        async def cycle() -> tuple[int, int, int, float]:
            """One cycle; (claims, flusher ns, PostgreSQL ns, Valkey s) of its drain."""
            nonlocal sent
            last = (await redis.xinfo_stream(CK.events))["last-generated-id"].decode()
            for _ in range(args.batches):
                answers = await fake.claimed(*claims(sent, args.batch))
                sent += args.batch
                if set(answers) != {"OK"}:
                    raise RuntimeError(f"a claim was refused: {answers}")
            if args.single:
                await one_per_claim(redis, CK.events, last)
            pg_pids, info = tree(postgres.pid), await redis.info("cpu")
            pg, own = cpu_ns(pg_pids), time.process_time_ns()
            done = await flusher.drain()
            own, pg = time.process_time_ns() - own, cpu_ns(pg_pids) - pg
            return done, own, pg, used(info, await redis.info("cpu"), "")

        await cycle()  # statements prepared, caches warm
        for n in range(1, ROUNDS + 1):
            totals = [0, 0, 0, 0.0]
            for _ in range(CYCLES):
                for i, value in enumerate(await cycle()):
                    totals[i] += value
            done, own, pg, vk = totals
            entries = "one per claim" if args.single else f"one per batch of {args.batch}"
            print(
                f"round {n}: {int(done):,} claims ({entries}); per claim: flusher"
                f" {own / done / 1000:.1f} µs, PostgreSQL {pg / done / 1000:.1f} µs, both"
                f" {(own + pg) / done / 1000:.1f} µs; Valkey {vk / done * 1e6:.1f} µs",
                flush=True,
            )
        recorded = await pool.fetchval(
            "SELECT count(*) FROM vouchers WHERE campaign_id = $1", CK.campaign_id
        )
        if recorded != sent:
            raise RuntimeError(f"{sent} claims issued, {recorded} recorded")
    finally:
        await pool.close()
        await redis.aclose()
        postgres.stop()
        valkey.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    asyncio.run(run(parse(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
