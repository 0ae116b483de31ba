"""Above capacity: what shedding does for the claims that are served. Two `issuer serve`s
on the same embedded Valkey and PostgreSQL, one that never sheds (a claim queue and a loop
lag bound too large to reach) and one that sheds (the defaults, or `--queue-max` and
`--lag-ms`), get closed-loop claims from more and more connections (each one request in
flight, as many users pressing "claim" at once; a connection answered 503 waits 1-2 times
`--retry-after` seconds, as the header asks). Printed per connection count: req/s, p50/p99
of the answers served (below 500), how many were shed (503 OVERLOADED), and from the
service's own histograms over the run, warm-up included: the claim route's p99 from its
middleware on, and its event loop's lag p99 (both as bucket upper bounds). Without
shedding, served latency grows with the crowd; with it, it stays bounded and the rest are
refused at once."""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import uvloop

from bench import scrape
from bench.loadgen import Clients, Merged, Target
from bench.procs import Service
from bench.signing import FIRST_N, Plan
from issuer import embedded
from issuer.auth import ApiKey, load_keys
from issuer.client import Client
from issuer.config import Settings
from tests.people import campaign

QUOTA = 10**7
GUESS_RATE = 20_000  # req/s assumed when sizing the requests built per run ...
PER_CONNECTION_RATE = 40  # ... or this per connection, for a small crowd


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.overload", description=__doc__)
    parser.add_argument("--connections", default="128,512,2048", help="comma-separated")
    parser.add_argument(
        "--queue-max", type=int, help="ISSUER_CLAIM_QUEUE_MAX of the shedding service"
    )
    parser.add_argument("--lag-ms", type=int, help="ISSUER_SHED_LAG_MS of the shedding service")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument(
        "--retry-after",
        type=float,
        default=1.0,
        help="seconds a connection answered 503 waits before its next claim (the service"
        " says Retry-After: 1); 0: retry at once",
    )
    return parser.parse_args(argv)


async def create_campaign(url: str, ops: ApiKey, campaign_id: str) -> None:
    async with aiohttp.ClientSession() as session:
        body = campaign(quota=QUOTA, budget_fen=QUOTA * 200_000, open_for_s=7200)
        got = await Client(url, ops, session).call("PUT", f"/v1/campaigns/{campaign_id}", body)
        if got.status not in (200, 201):
            raise RuntimeError(f"PUT {campaign_id}: {got.status} {got.body}")


def row(
    label: str,
    connections: int,
    merged: Merged,
    before: tuple[scrape.Buckets, scrape.Buckets],
    after: tuple[scrape.Buckets, scrape.Buckets],
) -> str:
    shed = merged.statuses.get(503, 0)
    inside, lag = (scrape.since(a, b) for a, b in zip(after, before, strict=True))
    return (
        f"| {label} | {connections:,} | {merged.rate:,.0f} |"
        f" {merged.percentile_ms(0.5, merged.served):.0f} |"
        f" {merged.percentile_ms(0.99, merged.served):.0f} | {shed:,} |"
        f" {scrape.quantile_ms(inside, 0.99):g} | {scrape.quantile_ms(lag, 0.99):g} |"
    )


@dataclass(frozen=True)
class Crowd:
    """How hard, and against which shedding bounds (None: the service's defaults)."""

    connections: tuple[int, ...]
    workers: int = 2
    clients: int = 2
    seconds: float = 6
    warmup: float = 1
    retry_after: float = 1.0
    queue_max: int | None = None
    lag_ms: int | None = None


def shedding_env(queue_max: int | None, lag_ms: int | None) -> dict[str, str]:
    """The settings of a service's shedding bounds (None: its default)."""
    env = {}
    if queue_max is not None:
        env["ISSUER_CLAIM_QUEUE_MAX"] = str(queue_max)
    if lag_ms is not None:
        env["ISSUER_SHED_LAG_MS"] = str(lag_ms)
    return env


def compare(redis_url: str, database_url: str, work: Path, crowd: Crowd) -> Iterator[str]:
    """Start a service that never sheds and one that does on the given servers, and yield
    the lines of the table as they are measured; both are stopped at the end."""
    services: list[Service] = []
    clients = Clients(crowd.clients)
    stamp = time.strftime("%H%M%S")
    try:
        env = {
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "ISSUER_DATA_DIR": str(work / f"plain-{stamp}"),
            "ISSUER_PERSON_KEY": "overload-person-key",
            "ISSUER_LOG_LEVEL": "WARNING",
        }
        log = work / "services.log"
        never = {"ISSUER_CLAIM_QUEUE_MAX": str(10**6), "ISSUER_SHED_LAG_MS": str(60_000)}
        services.append(Service(crowd.workers, {**env, **never}, log))
        keys_file = work / f"plain-{stamp}" / "keys.toml"
        shedding = {
            **env,
            "ISSUER_DATA_DIR": str(work / f"shedding-{stamp}"),
            "ISSUER_KEYS_FILE": str(keys_file),
            "ISSUER_RUN_FLUSHER": "false",
            **shedding_env(crowd.queue_max, crowd.lag_ms),
        }
        bounds = Settings.from_env(shedding)
        services.append(Service(crowd.workers, shedding, log))
        keys = load_keys(keys_file)
        app = next(k for k in keys.values() if k.role == "app")
        ops = next(k for k in keys.values() if k.role == "ops")
        campaign_id = f"overload-{stamp}"
        asyncio.run(create_campaign(services[0].url, ops, campaign_id))
        labels = (
            "never sheds",
            f"sheds (queue {bounds.claim_queue_max:,}, lag {bounds.shed_lag_ms} ms)",
        )
        yield (
            "| service | connections | req/s | served p50 ms | served p99 ms | shed (503) |"
            " p99 ms inside (≤) | loop lag p99 ms (≤) |"
        )
        yield "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        first_n = FIRST_N
        path = f"/v1/campaigns/{campaign_id}/claims"
        for connections in crowd.connections:
            rate = min(GUESS_RATE, PER_CONNECTION_RATE * connections)
            per = math.ceil(rate * (crowd.seconds + crowd.warmup) / crowd.clients)
            for label, service in zip(labels, services, strict=True):
                plans = []
                for i in range(crowd.clients):
                    tag = f"ov{stamp}-{connections}-{service.port}-{i}"
                    plans.append(Plan(path, app.id, app.secret, tag, first_n, per))
                    first_n += per
                clients.build(plans, "127.0.0.1")
                target = Target(
                    "127.0.0.1",
                    service.port,
                    max(1, connections // crowd.clients),
                    crowd.warmup,
                    crowd.seconds,
                    retry_after_s=crowd.retry_after,
                )
                # read before the crowd comes: a service that never sheds answers a scrape
                # under its crowd only once the crowd has gone (or after the timeout), so its
                # histograms' window includes the warm-up second
                before = asyncio.run(scrape.claim_histograms(service.url))
                start_at = time.monotonic() + 0.2
                clients.go(target, start_at)
                merged = clients.collect()
                after = asyncio.run(scrape.claim_histograms(service.url))
                yield row(label, connections, merged, before, after)
                time.sleep(1.0)
    finally:
        clients.close()
        for service in reversed(services):
            service.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="issuer-overload-", dir="/tmp"))
    work.chmod(0o755)  # postgres runs as its own user when we are root
    redis = embedded.start_redis(work)
    pg = embedded.start_postgres(work)
    crowd = Crowd(
        connections=tuple(int(c) for c in args.connections.split(",")),
        workers=args.workers,
        clients=args.clients,
        seconds=args.seconds,
        warmup=args.warmup,
        retry_after=args.retry_after,
        queue_max=args.queue_max,
        lag_ms=args.lag_ms,
    )
    try:
        for line in compare(redis.url, pg.url, work, crowd):
            print(line, flush=True)
        return 0
    finally:
        pg.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    uvloop.install()
    sys.exit(main())
