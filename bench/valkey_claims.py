"""Valkey's work per issued claim in the gate's script alone, apart from the HTTP service
and the load: `python -m bench.valkey_claims [--instructions]` (a minute; five with
`--instructions`).

A primary (AOF fsynced every second) with a replica attached, as in `make bench`; one
campaign whose round is open with quota and money to spare, set up by its own script;
ROUNDS rounds of BATCHES batches of `--batch` claims, each batch built by the claim path's
batcher (`claims.Batcher`) with the service's id, hash and nonce lengths and sent once the
previous one is answered, by one client. For each round: the primary's CPU per issued claim
(INFO cpu: main thread, and every thread), its commands per claim (INFO commandstats) and,
with `--instructions`, the instructions per claim counted by callgrind (the primary runs
under it; its counters are zeroed before each round and read after): those repeat to about
a per cent on a shared machine, where CPU seconds vary by tens of per cent. `--keep DIR`
keeps callgrind's profile of each round there (`callgrind_annotate --inclusive=yes`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

from redis.asyncio import Redis

from bench import profile
from bench.stack import bench_dir
from issuer import embedded, keys
from issuer.ids import new_id
from issuer.protocol import Claim
from issuer.scripts import Scripts
from tests.fake import CAMPAIGN, Fake, claim, settings

ROUNDS = 3
BUDGET = 10**15  # fen: never runs out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.valkey_claims", description=__doc__)
    parser.add_argument("--batch", type=int, default=30, help="claims per script call")
    parser.add_argument("--batches", type=int, default=300, help="per round")
    parser.add_argument("--instructions", action="store_true", help="count them (callgrind)")
    parser.add_argument("--keep", metavar="DIR", help="with --instructions: each round's profile")
    return parser.parse_args(argv)


def claims(first: int, count: int) -> list[Claim]:
    """Claims first .. first+count-1 with the service's field sizes: a 64-hex person
    reference and fingerprint, a 24-hex nonce, a campaign-prefixed voucher id."""
    now = int(time.time())
    return [
        claim(
            n,
            person_ref=hashlib.sha256(b"person %d" % n).hexdigest(),
            fingerprint=hashlib.sha256(b"body %d" % n).hexdigest(),
            nonce=os.urandom(12).hex(),
            nonce_bucket=keys.nonce_bucket(now),
            candidate=new_id(CAMPAIGN),
        )
        for n in range(first, first + count)
    ]


def used(before: dict[str, float], after: dict[str, float], part: str) -> float:
    """CPU seconds (user + system) between two INFO cpu readings; `part`: "" for the whole
    process, "_main_thread" for its main thread."""
    return sum(
        after[f"used_cpu_{k}{part}"] - before[f"used_cpu_{k}{part}"] for k in ("user", "sys")
    )


def keep(directory: Path, into: Path) -> None:
    """Copy callgrind's files from the run's `directory` into `into`."""
    into.mkdir(parents=True, exist_ok=True)
    for made in directory.glob("callgrind.out.*"):
        shutil.copy(made, into)


async def run(args: argparse.Namespace) -> None:
    directory = bench_dir("issuer-valkey-claims-")
    out = directory / "callgrind.out.%p"
    under = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    if args.keep:  # each round's file names its functions itself, not by an earlier file's ids
        under.append("--compress-strings=no")
    primary = embedded.start_redis(directory, under=under if args.instructions else ())
    replica = embedded.start_replica(directory, primary)
    redis = Redis.from_url(primary.url)
    try:
        fake = Fake(redis, Scripts(redis))
        await fake.put_campaign(settings(), budget_fen=BUDGET)
        sent = 0

        async def batches(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                answers = await fake.claimed(*claims(sent, args.batch))
                sent += args.batch
                if set(answers) != {"OK"}:
                    raise RuntimeError(f"a claim was refused: {answers}")

        await batches(20)  # scripts loaded, hashes past their first sizes
        for n in range(1, ROUNDS + 1):
            if args.instructions:
                await asyncio.to_thread(profile.callgrind_control, primary.pid, "-z")
            cpu, commands = await redis.info("cpu"), await redis.info("commandstats")
            started = time.monotonic()
            await batches(args.batches)
            took = time.monotonic() - started
            instructions = 0
            if args.instructions:
                instructions = await asyncio.to_thread(profile.instructions, primary.pid)
                if args.keep:
                    await asyncio.to_thread(profile.callgrind_control, primary.pid, "-d")
            cpu_now, commands_now = await redis.info("cpu"), await redis.info("commandstats")
            issued = args.batches * args.batch

            calls = sum(
                v["calls"] - commands.get(k, {"calls": 0})["calls"]
                for k, v in commands_now.items()
                if k != "cmdstat_info"
            )
            line = (
                f"round {n}: {issued:,} claims in {took:.1f} s; valkey CPU per claim"
                f" {used(cpu, cpu_now, '') / issued * 1e6:.1f} µs (main thread"
                f" {used(cpu, cpu_now, '_main_thread') / issued * 1e6:.1f}),"
                f" {calls / issued:.2f} commands"
            )
            if args.instructions:
                line += f", {instructions / issued:,.0f} instructions"
            print(line, flush=True)
    finally:
        await redis.aclose()
        replica.stop()
        primary.stop()
        if args.keep:
            keep(directory, Path(args.keep))
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.instructions and not profile.installed():
        print("valgrind is not installed (apt-get install valgrind)")
        return 1
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
