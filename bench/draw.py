"""`python -m bench.draw`: how long a lottery draw holds Redis. Draws a round of N synthetic
applications (default 100,000, written straight to an embedded Valkey) and prints the
time of each `draw_batch` script call as the client saw it (the most a batch can have
blocked Valkey), the Python ranking time and the whole draw's, for R repetitions."""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import uvloop
from redis.asyncio import Redis

from issuer import draw_rules, draws, embedded
from issuer.campaigns import Campaigns
from issuer.keys import CampaignKeys
from issuer.model import CampaignDef
from issuer.protocol import Call
from issuer.scripts import Scripts
from tests.people import applications, campaign, iso, write_applications

SEED = "d7" * 32
LABELS = {
    "median_ms": "ms per batch, median",
    "p99_ms": "ms per batch, p99",
    "max_ms": "ms per batch, max",
    "valkey_ms": "Valkey ms per batch, mean (its own count)",
    "ranking_s": "s to rank the applications (Python)",
    "draw_s": "s for the whole draw",
}


def lottery_round(quota: int) -> CampaignDef:
    """A campaign whose lottery round was drawable a minute ago."""
    body = campaign(quota=quota, opens_in_s=-3600, open_for_s=7200)
    now = datetime.now(UTC)
    body["rounds"][0] |= {
        "allocation": "lottery",
        "applications_close_at": iso(now - timedelta(minutes=2)),
        "draws_at": iso(now - timedelta(minutes=1)),
        "commitment": hashlib.sha256(bytes.fromhex(SEED)).hexdigest(),
    }
    return msgspec.convert(body, CampaignDef)


async def script_usec(redis: Redis) -> int:
    """Microseconds Valkey spent in EVALSHA so far (INFO commandstats)."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("usec", 0))


async def one_draw(redis: Redis, n: int, quota: int, rep: int) -> dict[str, Any]:
    scripts = Scripts(redis)
    campaigns = Campaigns(redis, scripts)
    campaign_id = f"draw-bench-{rep}"
    await campaigns.put(campaign_id, lottery_round(quota))
    records = applications(campaign_id, "r1", n)
    for i in range(0, n, 10_000):
        await write_applications(redis, CampaignKeys(campaign_id), records[i : i + 10_000])
    took: list[float] = []
    run = scripts.run

    async def timed(call: Call) -> Any:
        started = time.perf_counter()
        try:
            return await run(call)
        finally:
            took.append(time.perf_counter() - started)

    scripts.run = timed  # type: ignore[method-assign]
    refs = [r["application_ref"] for r in records]
    started = time.perf_counter()
    draw_rules.order(SEED, draw_rules.applications_root(refs), refs)
    ranking = time.perf_counter() - started
    before = await script_usec(redis)
    started = time.perf_counter()
    out = await draws.draw(redis, scripts, campaigns, campaign_id, "r1", SEED)
    total = time.perf_counter() - started
    valkey_ms = (await script_usec(redis) - before) / 1000 / len(took)
    await scripts.aclose()
    assert out.winners == min(quota, n) and out.applications == n
    ms = sorted(t * 1000 for t in took)
    return {
        "batches": len(ms),
        "median_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "max_ms": ms[-1],
        "valkey_ms": valkey_ms,
        "ranking_s": ranking,
        "draw_s": total,
    }


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="issuer-draw-") as tmp:
        server = embedded.start_redis(Path(tmp))
        redis = Redis.from_url(server.url)
        try:
            runs = []
            for rep in range(1, args.repeat + 1):
                figures = await one_draw(redis, args.applications, args.quota, rep)
                runs.append(figures)
                print(
                    f"run {rep}: {args.applications:,} applications, {figures['batches']} batches"
                    f" of {draws.DRAW_BATCH} (winners) or {draws.NOT_DRAWN_BATCH}:"
                    f" median {figures['median_ms']:.1f} ms,"
                    f" p99 {figures['p99_ms']:.1f} ms, max {figures['max_ms']:.1f} ms a batch;"
                    f" ranking {figures['ranking_s']:.2f} s, whole draw {figures['draw_s']:.2f} s",
                    flush=True,
                )
            print("\n| figure | median of runs |\n| --- | ---: |")
            for key, label in LABELS.items():
                print(f"| {label} | {statistics.median(r[key] for r in runs):.2f} |")
        finally:
            await redis.aclose()
            server.stop()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.draw", description=__doc__)
    parser.add_argument("--applications", type=int, default=100_000)
    parser.add_argument("--quota", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse()))
