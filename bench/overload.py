"""Above capacity: what shedding does for the claims that are served. Two `issuer serve`s
on the same embedded Valkey and PostgreSQL, one with the default claim queue (2,000 per
worker) and one with `ISSUER_CLAIM_QUEUE_MAX` small, get closed-loop claims from more and
more connections (each one request in flight, as many users pressing "claim" at once; a
connection answered 503 waits 1-2 times `--retry-after` seconds, as the header asks).
Printed per connection count: req/s, p50/p99 of the answers served (below 500) and how
many were shed (503 OVERLOADED). Without shedding, served latency grows with the crowd;
with it, it stays near the cost of one full queue and the rest are refused at once."""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from bench.loadgen import Clients, Merged, Target
from bench.procs import Service
from bench.signing import FIRST_N, Plan
from issuer import embedded
from issuer.auth import ApiKey, load_keys
from issuer.client import Client
from tests.people import campaign

CAMPAIGN = "overload"
QUOTA = 10**7
GUESS_RATE = 20_000  # req/s assumed when sizing the requests built per run


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.overload", description=__doc__)
    parser.add_argument("--connections", default="128,512,2048", help="comma-separated")
    parser.add_argument("--queue-max", type=int, default=64, help="of the shedding service")
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


async def create_campaign(url: str, ops: ApiKey) -> None:
    async with aiohttp.ClientSession() as session:
        body = campaign(quota=QUOTA, budget_fen=QUOTA * 200_000, open_for_s=7200)
        got = await Client(url, ops, session).call("PUT", f"/v1/campaigns/{CAMPAIGN}", body)
        if got.status not in (200, 201):
            raise RuntimeError(f"PUT {CAMPAIGN}: {got.status} {got.body}")


def row(label: str, connections: int, merged: Merged) -> str:
    shed = merged.statuses.get(503, 0)
    return (
        f"| {label} | {connections:,} | {merged.rate:,.0f} |"
        f" {merged.percentile_ms(0.5, merged.served):.1f} |"
        f" {merged.percentile_ms(0.99, merged.served):.1f} | {shed:,} |"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="issuer-overload-", dir="/tmp"))
    work.chmod(0o755)  # postgres runs as its own user when we are root
    redis = embedded.start_redis(work)
    pg = embedded.start_postgres(work)
    services: list[Service] = []
    clients = Clients(args.clients)
    try:
        env = {
            "REDIS_URL": redis.url,
            "DATABASE_URL": pg.url,
            "ISSUER_DATA_DIR": str(work / "plain"),
            "ISSUER_PERSON_KEY": "overload-person-key",
            "ISSUER_LOG_LEVEL": "WARNING",
        }
        log = work / "services.log"
        services.append(Service(args.workers, env, log))
        keys_file = work / "plain" / "keys.toml"
        shedding = {
            **env,
            "ISSUER_DATA_DIR": str(work / "shedding"),
            "ISSUER_KEYS_FILE": str(keys_file),
            "ISSUER_CLAIM_QUEUE_MAX": str(args.queue_max),
            "ISSUER_RUN_FLUSHER": "false",
        }
        services.append(Service(args.workers, shedding, log))
        keys = load_keys(keys_file)
        app = next(k for k in keys.values() if k.role == "app")
        ops = next(k for k in keys.values() if k.role == "ops")
        asyncio.run(create_campaign(services[0].url, ops))
        labels = ("default queue (2,000)", f"queue {args.queue_max}")
        print("| service | connections | req/s | served p50 ms | served p99 ms | shed (503) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        first_n = FIRST_N
        per = math.ceil(GUESS_RATE * (args.seconds + args.warmup) / args.clients)
        for connections in (int(c) for c in args.connections.split(",")):
            for label, service in zip(labels, services, strict=True):
                path = f"/v1/campaigns/{CAMPAIGN}/claims"
                plans = []
                for i in range(args.clients):
                    tag = f"ov{connections}-{service.port}-{i}"
                    plans.append(Plan(path, app.id, app.secret, tag, first_n, per))
                    first_n += per
                clients.build(plans, "127.0.0.1")
                target = Target(
                    "127.0.0.1",
                    service.port,
                    max(1, connections // args.clients),
                    args.warmup,
                    args.seconds,
                    retry_after_s=args.retry_after,
                )
                clients.go(target, time.monotonic() + 0.2)
                print(row(label, connections, clients.collect()), flush=True)
                time.sleep(1.0)
        return 0
    finally:
        clients.close()
        for service in reversed(services):
            service.stop()
        pg.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    uvloop.install()
    sys.exit(main())
