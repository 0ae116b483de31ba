"""Everything the scenarios run against: embedded Valkey and PostgreSQL under a temp dir,
`issuer serve`, the three baselines, the bench campaigns; stopped by PID in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis

from bench import naive
from bench.cpu import TICKS_PER_S, Groups, children, split, stat, tree
from bench.procs import Service, Workers
from issuer import embedded
from issuer.auth import ApiKey, load_keys
from issuer.client import Client
from tests.people import campaign, claim, iso

PERSON_KEY = "bench-person-key"
# PostgreSQL's defaults, spelled out: every commit waits for its WAL to reach the disk.
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
SHOWN = ("server_version", *DURABLE, "wal_sync_method", "shared_buffers")
OPEN_QUOTA = 10**7
DRAIN_TIMEOUT_S = 120
OPEN, SOLD_OUT, NAIVE, EMPTY = "bench-open", "bench-soldout", "naive", "empty"
REDEEM, MERCHANT = "bench-redeem", "bench-merchant"
NOT_YET = "bench-notopen"  # its round opens in a day: every claim is refused NOT_OPEN
LOTTERY = "bench-lottery"  # a lottery round taking applications for a day: every claim applies
LOTTERY_SEED = "be5c" * 16  # never drawn in the bench; its commitment is in the round
LOTTERY_QUOTA = 100
ISSUE_CONCURRENCY = 64


def fs_type(path: Path) -> str:
    """The file system type of the mount holding `path`."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def bench_dir(prefix: str) -> Path:
    """A fresh temp dir the embedded servers can use (postgres runs as its own user when we
    are root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


async def pg_settings(url: str) -> dict[str, str]:
    """The PostgreSQL settings a bench reports (SHOWN)."""
    conn = await asyncpg.connect(url)
    try:
        return {name: str(await conn.fetchval(f"SHOW {name}")) for name in SHOWN}
    finally:
        await conn.close()


def lottery_campaign() -> dict[str, Any]:
    """A campaign whose one round is a lottery: applications from 5 s ago until tomorrow,
    drawn a minute after they close (never within a bench), open two days."""
    body = campaign(quota=LOTTERY_QUOTA, opens_in_s=-5, open_for_s=2 * 86_400)
    now = datetime.now(UTC)
    body["rounds"][0] |= {
        "allocation": "lottery",
        "applications_close_at": iso(now + timedelta(days=1)),
        "draws_at": iso(now + timedelta(days=1, minutes=1)),
        "commitment": hashlib.sha256(bytes.fromhex(LOTTERY_SEED)).hexdigest(),
    }
    return body


class Stack:
    """Start with `await Stack.start(workers, naive_pool)`; always `stop()`."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.dir = bench_dir("issuer-bench-")
        self.log = self.dir / "servers.log"
        self.redis: embedded.EmbeddedServer | None = None
        # the replica that ISSUER_DURABLE_ACK=replica waits for
        self.replica: embedded.EmbeddedServer | None = None
        self.pg: embedded.EmbeddedServer | None = None
        self.service: Service | None = None
        self.durable: Service | None = None  # the same service with durable acks (aof)
        self.replicated: Service | None = None  # and with ISSUER_DURABLE_ACK=replica
        self.empty: Workers | None = None
        self.floor: Workers | None = None
        self.naive: Workers | None = None
        self.keys: dict[str, ApiKey] = {}
        self.pg_settings: dict[str, str] = {}

    async def start(self, workers: int, naive_pool: int) -> None:
        self.redis = embedded.start_redis(self.dir)
        self.replica = embedded.start_replica(self.dir, self.redis)
        self.pg = embedded.start_postgres(self.dir, settings=DURABLE)
        self.pg_settings = await pg_settings(self.pg.url)
        data_dir = self.dir / "issuer"
        env = {
            "REDIS_URL": self.redis.url,
            "DATABASE_URL": self.pg.url,
            "ISSUER_DATA_DIR": str(data_dir),
            "ISSUER_PERSON_KEY": PERSON_KEY,
            "ISSUER_LOG_LEVEL": "INFO",  # every write logged, as in production
        }
        self.service = Service(workers, env, self.log)
        keys_path = data_dir / "keys.toml"
        durable_env = {
            **env,
            "ISSUER_DATA_DIR": str(self.dir / "issuer-durable"),
            "ISSUER_KEYS_FILE": str(keys_path),
            "ISSUER_DURABLE_ACK": "aof",
            "ISSUER_RUN_FLUSHER": "false",  # the first service's flusher drains every stream
        }
        self.durable = Service(workers, durable_env, self.log)
        replicated_env = {
            **durable_env,
            "ISSUER_DATA_DIR": str(self.dir / "issuer-replicated"),
            "ISSUER_DURABLE_ACK": "replica",
        }
        self.replicated = Service(workers, replicated_env, self.log)
        self.keys = load_keys(keys_path)
        admin = re.sub(r"/[^/]*$", "/postgres", self.pg.url)
        naive_dsn = await naive.setup(admin, "bench_naive", NAIVE)
        self.empty = Workers("empty", "bench.empty", [], workers, self.log)
        self.floor = Workers("floor", "bench.empty", ["--floor", str(keys_path)], workers, self.log)
        args = ["--dsn", naive_dsn, "--keys", str(keys_path), "--person-key", PERSON_KEY]
        self.naive = Workers(
            "naive", "bench.naive", [*args, "--pool", str(naive_pool)], workers, self.log
        )
        await self._campaigns()

    def key(self, role: str) -> ApiKey:
        return next(k for k in self.keys.values() if k.role == role)

    async def _campaigns(self) -> None:
        """One round open for an hour with quota to spare, one already sold out, one for
        payments, one that opens tomorrow and a lottery taking applications all day."""
        assert self.service is not None
        url = self.service.url
        async with aiohttp.ClientSession() as session:
            ops = Client(url, self.key("ops"), session)
            app = Client(url, self.key("app"), session)
            plenty = campaign(quota=OPEN_QUOTA, budget_fen=OPEN_QUOTA * 200_000, open_for_s=7200)
            merchant = {"name": "bench", "county_code": "141029", "categories": ["appliance"]}
            put = await ops.call("PUT", f"/v1/merchants/{MERCHANT}", merchant)
            if put.status not in (200, 201):
                raise RuntimeError(f"PUT {MERCHANT}: {put.status} {put.body}")
            for campaign_id, body in (
                (OPEN, plenty),
                (SOLD_OUT, campaign(quota=1)),
                (REDEEM, plenty),
                (NOT_YET, campaign(quota=OPEN_QUOTA, opens_in_s=86_400)),
                (LOTTERY, lottery_campaign()),
            ):
                put = await ops.call("PUT", f"/v1/campaigns/{campaign_id}", body)
                if put.status not in (200, 201):
                    raise RuntimeError(f"PUT {campaign_id}: {put.status} {put.body}")
            for n, expected in ((999_001, 201), (999_002, 409)):
                got = await app.call("POST", f"/v1/campaigns/{SOLD_OUT}/claims", claim(n))
                if got.status != expected:
                    raise RuntimeError(f"sell-out setup: {got.status} {got.body}")

    async def issue(self, first_n: int, count: int) -> list[str]:
        """Vouchers for persons first_n .. first_n+count-1 in the redemption campaign."""
        assert self.service is not None
        found: list[str] = [""] * count
        todo = iter(range(count))
        async with aiohttp.ClientSession() as session:
            app = Client(self.service.url, self.key("app"), session)

            async def worker() -> None:
                for i in todo:
                    body = claim(first_n + i, request_id=f"bench-issue-{first_n + i}")
                    got = await app.call("POST", f"/v1/campaigns/{REDEEM}/claims", body)
                    while got.status == 503 and got.body["error"]["retryable"]:
                        await asyncio.sleep(0.1)  # shed or unavailable: retry, as a client does
                        got = await app.call("POST", f"/v1/campaigns/{REDEEM}/claims", body)
                    if got.status != 201:
                        raise RuntimeError(f"issuing for the redemption bench: {got.body}")
                    found[i] = got.body["voucher_id"]

            await asyncio.gather(*(worker() for _ in range(ISSUE_CONCURRENCY)))
        return found

    async def drained(self) -> None:
        """Wait until the flusher has written every claim to PostgreSQL."""
        assert self.service is not None
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                async with session.get(self.service.url + "/readyz") as resp:
                    if (await resp.json()).get("flusher_lag_entries") == 0:
                        return
                await asyncio.sleep(0.1)
        raise TimeoutError("the flusher did not drain")

    async def valkey_commands(self) -> dict[str, tuple[float, float]]:
        """(calls, µs) so far of each command the primary ran (INFO commandstats; a
        script's own commands are counted both in it and in EVALSHA)."""
        assert self.redis is not None
        client = Redis.from_url(self.redis.url)
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        return {
            name.removeprefix("cmdstat_"): (float(v["calls"]), float(v["usec"]))
            for name, v in stats.items()
        }

    def valkey_split(self) -> dict[str, int]:
        """The primary's CPU ticks so far: main thread, other threads, forked children."""
        assert self.redis is not None
        return split(self.redis.pid)

    async def valkey_idle(self, seconds: float) -> float:
        """Cores the primary uses with no load: every service's chores (the primaries'
        watch, expiry sweeps, the flusher's polls, the replica's acknowledgements)."""
        assert self.redis is not None
        pid = self.redis.pid
        before, started = stat(pid)[1], time.monotonic()
        await asyncio.sleep(seconds)
        return (stat(pid)[1] - before) / TICKS_PER_S / (time.monotonic() - started)

    async def metrics(self, port: int) -> str:
        """The /metrics text of the service listening on `port`."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            return await resp.text()

    def groups(self, clients: list[int]) -> Groups:
        """CPU groups: pids resolved at each snapshot."""
        service, durable, replicated = self.service, self.durable, self.replicated
        redis, replica, pg = self.redis, self.replica, self.pg
        assert service and durable and replicated and redis and replica and pg
        assert self.empty and self.floor and self.naive
        empty, floor, naive_w = self.empty, self.floor, self.naive
        return {
            "empty": lambda: empty.pids,
            "floor": lambda: floor.pids,
            # the service's workers; the durable-ack services' apart ("acked": they serve only
            # (f) and (r), and their idle timers are not the cost of another scenario)
            "issuer": lambda: children(service.pid, "worker"),
            "acked": lambda: [
                pid for s in (durable, replicated) for pid in children(s.pid, "worker")
            ],
            "flusher": lambda: children(service.pid, "flush"),
            "naive": lambda: naive_w.pids,
            "valkey": lambda: tree(redis.pid),  # with its AOF-rewrite child
            "replica": lambda: tree(replica.pid),
            "postgres": lambda: tree(pg.pid),
            "client": lambda: clients,
        }

    def stop(self) -> None:
        parts = (self.empty, self.floor, self.naive, self.replicated, self.durable, self.service)
        for part in (*parts, self.pg, self.replica, self.redis):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
