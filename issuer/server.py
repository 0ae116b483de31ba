"""`issuer serve`: embedded servers, migrations, N worker processes on one port
(SO_REUSEPORT), the flusher, and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec
import uvloop
from aiohttp import web
from redis.asyncio import Redis

from issuer import (
    auth,
    due_dates,
    expiry,
    flusher,
    integrity,
    keyfile,
    keys,
    logs,
    metrics,
    store,
    topology,
)
from issuer.children import die_with_parent
from issuer.config import Settings
from issuer.documents import LocalStore
from issuer.workdays import Calendar, HolidaysFileError

if TYPE_CHECKING:
    from issuer.embedded import EmbeddedGroup, EmbeddedServer

log = logging.getLogger("issuer.server")
WORKER_STOP_TIMEOUT_S = 15  # in-flight requests, after the shutdown grace
FLUSHER_STOP_TIMEOUT_S = 60  # draining the streams into PostgreSQL
STABLE_S = 10.0  # a child that ran this long before it died is replaced at once
READY_REDIS_S = 2.0  # longest /readyz waits for Redis before it says it did not answer


LISTEN_BACKLOG = 4096  # connections a worker's kernel queue holds before accept (somaxconn caps)


def reuseport_socket(host: str, port: int, *, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    return sock


async def start_site(runner: web.AppRunner, host: str, port: int) -> socket.socket:
    """Serve `runner` on a shared port; returns the listening socket. The site listens
    again with its own backlog: aiohttp's default (128) drops the SYNs of a crowd that
    connects at once, and their clients retransmit after 1, 3, 7 s."""
    sock = reuseport_socket(host, port, listen=True)
    await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
    return sock


# ------------------------------------------------------------------ worker process


async def worker_main(settings: Settings, port: int) -> None:
    """One HTTP worker: serves until SIGTERM, then stops accepting and finishes in-flight
    requests (their batches included) before closing its connections."""
    from issuer.admission import Admission, LoopLag
    from issuer.app import make_app
    from issuer.campaigns import Campaigns
    from issuer.claims import Claims
    from issuer.http import Ctx
    from issuer.keyring import Keyring
    from issuer.protocol import Ready
    from issuer.redemptions import Redemptions
    from issuer.scripts import Scripts
    from issuer.settlement import Settlement
    from issuer.tenancy import Owners
    from issuer.watch import PrimaryWatch

    assert settings.database_url
    try:
        keyring = Keyring.load(settings.keys_path)
    except auth.KeysFileError as exc:
        raise SystemExit(str(exc)) from None
    redis = topology.connect(settings)
    scripts = Scripts(redis, ack=settings.durable_ack, ack_replicas=settings.ack_replicas)
    watch = PrimaryWatch(redis, scripts)
    metrics.ACK_UNGUARDED.set(0)  # exported from the start, whatever the ack mode
    pg = await store.connect(settings.database_url, min_size=0, max_size=2)
    campaigns = Campaigns(redis, scripts)
    person_key = settings.person_secret()
    redemptions = Redemptions(redis, scripts, campaigns, settings.batch_max)
    loop_lag = LoopLag(settings.shed_lag_ms / 1000)
    ctx = Ctx(
        settings=settings,
        redis=redis,
        pg=pg,
        scripts=scripts,
        campaigns=campaigns,
        claims=Claims(
            redis,
            scripts,
            campaigns,
            person_key,
            settings.batch_max,
        ),
        redemptions=redemptions,
        settlement=Settlement(
            pg,
            redis,
            scripts,
            redemptions,
            LocalStore(settings.documents_path),
            person_key,
            Calendar.from_file(settings.holidays_file),
        ),
        keys=keyring,
        person_key=person_key,
        admission=Admission(settings.claim_queue_max, loop_lag),
        owners=Owners(redis, campaigns, pg),
    )
    stop = asyncio.Event()

    async def ready() -> dict[str, Any]:
        checks: dict[str, Any] = {"draining": stop.is_set()}
        if watch.missing is not None:  # answer at once: the primary may not answer at all
            checks.update(redis_ok=False, redis_error=watch.missing)
        else:
            try:
                async with asyncio.timeout(READY_REDIS_S):
                    await scripts.run(Ready(campaigns=keys.CAMPAIGNS))
                    entries, age = await flusher.stream_lag(redis)
                checks.update(redis_ok=True, flusher_lag_entries=entries, flusher_lag_seconds=age)
                checks["flusher_ok"] = entries <= settings.ready_max_lag
                problem = await topology.health(redis)
                if problem is not None:
                    checks.update(redis_ok=False, redis_error=problem)
            except (*topology.REDIS_ERRORS, OSError) as exc:
                reason = await topology.health(redis)  # on a cluster: which slots lack a primary
                checks.update(redis_ok=False, redis_error=reason or type(exc).__name__)
        if settings.durable_ack == "replica" and (unguarded := scripts.rule.problem()):
            checks["durable_ack_problem"] = unguarded
        try:
            await pg.fetchval("SELECT 1", timeout=2)
            checks["postgres_ok"] = True
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            checks.update(postgres_ok=False, postgres_error=type(exc).__name__)
        checks["serving_ok"] = not stop.is_set()
        return checks

    app = make_app(ctx, ready)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10)
    await runner.setup()
    await start_site(runner, settings.host, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload_files() -> None:
        """SIGHUP: the keys file and the holidays file (recomputing due dates) again."""
        keyring.reload()
        task = asyncio.create_task(ctx.settlement.reload_calendar(settings.holidays_file))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_files)
    settle_heap()
    loop_lag.start()
    log.info("worker up", extra={"pid": os.getpid(), "port": port})
    sweeping = asyncio.create_task(expiry.run(redis, scripts, stop))
    watching_primary = asyncio.create_task(watch.run(stop))
    watching_keys = asyncio.create_task(keyring.watch(stop))
    await stop.wait()
    # not ready from now on; keep serving while load balancers notice, then stop accepting
    await asyncio.sleep(settings.shutdown_grace_s)
    await runner.cleanup()
    await ctx.claims.flush()  # a failed batch is logged, as every posted one
    loop_lag.stop()
    await sweeping
    await watching_primary
    await watching_keys
    await scripts.aclose()
    await topology.close(redis)
    await pg.close()
    metrics.publish()  # the counts of the last tick
    logs.write_batch()
    log.info("worker stopped", extra={"pid": os.getpid()})


def settle_heap() -> None:
    """Put what startup made (modules, geofences, the app: ~66,000 objects) out of the
    garbage collector's sight for good: a full collection then takes ~0 ms instead of
    ~35 ms, a pause the loop-lag shedding would answer with 503s."""
    gc.collect()
    gc.freeze()


def run_worker(settings: Settings, port: int) -> None:
    uvloop.run(worker_main(settings, port))


# ------------------------------------------------------------------ supervisor


@contextlib.contextmanager
def backing_servers(
    settings: Settings,
) -> Iterator[tuple[Settings, list[EmbeddedServer | EmbeddedGroup]]]:
    """Settings with real URLs: the given ones, or embedded servers started (and stopped).
    The embedded module (and its server wheels) is imported only when one is needed."""
    started: list[EmbeddedServer | EmbeddedGroup] = []
    urls: dict[str, str] = {}
    try:
        if not settings.external_redis:
            from issuer import embedded

            if settings.embedded_redis == "cluster":
                started.append(embedded.start_cluster(settings.data_dir))
            else:
                started.append(embedded.start_redis(settings.data_dir))
            urls.update(redis_url=started[-1].url, redis_mode=settings.embedded_redis)
        if not settings.database_url:
            from issuer import embedded

            fast = (
                {"fsync": "off", "synchronous_commit": "off"} if settings.embedded_pg_fast else None
            )
            started.append(embedded.start_postgres(settings.data_dir, settings=fast))
            urls["database_url"] = started[-1].url
        yield topology.resolved(msgspec.structs.replace(settings, **urls)), started
    finally:
        for server in reversed(started):
            server.stop()
            metrics.EMBEDDED_UP.labels(server.name).set(0)


def worker_env(settings: Settings, port: int) -> dict[str, str]:
    """The environment of a child process: ours, with the settings as the supervisor
    resolved them (URLs of embedded servers, the port actually bound)."""
    env = dict(os.environ)
    env.update(settings.to_env())
    env["ISSUER_PORT"] = str(port)
    return env


class Supervisor:
    """Keeps N workers and one flusher running (a child that dies is replaced), watches the
    embedded servers, and on SIGTERM stops workers first, then lets the flusher drain."""

    def __init__(
        self, settings: Settings, port: int, servers: list[EmbeddedServer | EmbeddedGroup]
    ) -> None:
        self.settings = settings
        self.port = port
        self.servers = servers
        self.workers: list[subprocess.Popen[bytes]] = []
        self.flusher: subprocess.Popen[bytes] | None = None
        self.born: dict[int, float] = {}  # pid -> when it was started
        self.delay: dict[str, float] = {}  # slot -> the wait before its last restart
        self.restart_at: dict[str, float] = {}  # slot -> when its dead child is replaced
        self.stopping = False

    def spawn(self, command: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "issuer.cli", command]
        proc = subprocess.Popen(
            cmd,
            env=worker_env(self.settings, self.port),
            preexec_fn=die_with_parent(signal.SIGTERM),  # a killed supervisor leaves no child
        )
        self.born[proc.pid] = time.monotonic()
        return proc

    def replace_dead(self) -> None:
        if self.stopping:
            return
        for i, proc in enumerate(self.workers):
            self.workers[i] = self.replacement(f"worker {i}", proc, "worker")
        if self.flusher is not None:
            self.flusher = self.replacement("flusher", self.flusher, "flush")

    def replacement(
        self, slot: str, proc: subprocess.Popen[bytes], command: str
    ) -> subprocess.Popen[bytes]:
        """`proc` while it runs; once it died, a new child, after a wait that grows while
        the children of this slot keep dying young."""
        if proc.poll() is None:
            return proc
        now = time.monotonic()
        if slot not in self.restart_at:
            lived = now - self.born.pop(proc.pid, now)
            self.delay[slot] = restart_delay(self.delay.get(slot, 0.0), lived)
            self.restart_at[slot] = now + self.delay[slot]
            name = "flusher" if command == "flush" else "worker"
            log.warning(
                f"{name} died, replacing it",
                extra={"pid": proc.pid, "code": proc.returncode, "in_s": self.delay[slot]},
            )
            metrics.process_gone(proc.pid)
        if now < self.restart_at[slot]:
            return proc
        del self.restart_at[slot]
        return self.spawn(command)

    async def watch(self) -> None:
        while not self.stopping:
            self.replace_dead()
            metrics.WORKERS.set(sum(p.poll() is None for p in self.workers))
            for server in self.servers:
                metrics.EMBEDDED_UP.labels(server.name).set(1 if server.running() else 0)
            await asyncio.sleep(0.2)

    def reload(self) -> None:
        """SIGHUP: each worker reads the keys file and the holidays file again (and
        recomputes due dates)."""
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    def terminate(self) -> None:
        """Workers first (they turn unready, finish in-flight requests and exit), then the
        flusher, which drains the streams into PostgreSQL before it exits."""
        self.stopping = True
        _stop_all(self.workers, self.settings.shutdown_grace_s + WORKER_STOP_TIMEOUT_S)
        if self.flusher is not None:
            _stop_all([self.flusher], FLUSHER_STOP_TIMEOUT_S)

    async def run(self, load: list[Path], on_ready: str | None) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            calendar = Calendar.from_file(self.settings.holidays_file)
        except HolidaysFileError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
        assert self.settings.database_url
        redis = topology.connect(self.settings)
        try:
            await topology.check(self.settings, redis)
        except topology.TopologyError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
        pool = await store.connect(self.settings.database_url)
        await store.migrate(pool)
        await integrity.backfill(pool, LocalStore(self.settings.documents_path))
        await due_dates.recompute(pool, calendar)  # a year known since the last start
        await pool.close()
        await load_campaign_files(redis, load)
        if self.settings.durable_ack == "replica":
            await check_guard(self.settings, redis)
        await topology.close(redis)
        if self.settings.run_flusher:
            self.flusher = self.spawn("flush")
        self.workers = [self.spawn("worker") for _ in range(self.settings.workers)]
        watcher = asyncio.create_task(self.watch())
        await wait_ready(self.settings.host, self.port, stop)
        if on_ready and not stop.is_set():
            print(on_ready, flush=True)
        await stop.wait()
        log.info("stopping: workers first, then the flusher drains")
        await asyncio.to_thread(self.terminate)
        watcher.cancel()


async def check_guard(settings: Settings, redis: Any) -> None:
    """At start, with ISSUER_DURABLE_ACK=replica: whether each primary's settings and
    replicas can keep the promise (the acknowledgement rule logs what they lack; every
    worker checks again on each new primary it meets)."""
    from issuer.scripts import Scripts
    from issuer.watch import PrimaryWatch

    scripts = Scripts(redis, ack=settings.durable_ack, ack_replicas=settings.ack_replicas)
    try:
        await PrimaryWatch(redis, scripts).probe()
    finally:
        await scripts.aclose()


def restart_delay(previous_s: float, lived_s: float) -> float:
    """Seconds to wait before replacing a child that lived `lived_s`: none if it had run a
    while; else twice the previous wait, from 0.5 s up to 30 s, so that a child that cannot
    start does not restart in a tight loop."""
    if lived_s >= STABLE_S:
        return 0.0
    return min(max(previous_s * 2, 0.5), 30.0)


def _stop_all(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM each process, wait for all up to `timeout_s`, then SIGKILL stragglers."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("child did not stop in time, killing it", extra={"pid": proc.pid})
            proc.kill()
            proc.wait()


async def wait_ready(host: str, port: int, stop: asyncio.Event, within_s: float = 60) -> None:
    import aiohttp

    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/readyz"
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while not stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    if not stop.is_set():
        raise RuntimeError(f"service not ready after {within_s} s")


async def load_campaign_files(redis: Redis, paths: list[Path]) -> None:
    from issuer.campaign_file import load_campaign_file
    from issuer.campaigns import Campaigns
    from issuer.errors import ApiError
    from issuer.scripts import Scripts

    campaigns = Campaigns(redis, Scripts(redis))
    for path in paths:
        campaign_id, definition = load_campaign_file(path)
        try:
            created = await campaigns.put(campaign_id, definition)
            log.info("campaign loaded", extra={"campaign": campaign_id, "new": created})
        except ApiError as err:
            if err.code != "CAMPAIGN_RUNNING":  # e.g. TENANT_CONFLICT: the file names another
                raise SystemExit(f"configuration error: {path}: {err}") from None
            log.info("campaign already running, kept", extra={"campaign": campaign_id})


def serve(settings: Settings, load: list[Path]) -> None:
    """Run the service until SIGTERM/SIGINT."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.person_secret()  # create it once, before workers race to
    if not settings.keys_path.exists():
        if settings.keys_file is not None:
            raise SystemExit(f"ISSUER_KEYS_FILE {settings.keys_file} does not exist")
        keyfile.write_dev_keys(settings.keys_path, file_tenants(load))
        log.warning("wrote development keys", extra={"path": str(settings.keys_path)})
    try:  # a file the workers cannot read stops the service now, not after their restarts
        keys_in_force = auth.read_keys(settings.keys_path)
    except auth.KeysFileError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    reserved = reuseport_socket(settings.host, settings.port, listen=False)
    port = reserved.getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    banner = "\n".join(
        [
            f"issuer ready on http://{host}:{port}  workers={settings.workers}",
            f"  keys file: {settings.keys_path}  (a key is chosen with --key-id ID)",
            *(f"    {line}" for line in keyfile.describe(keys_in_force.values())),
            f"  try:       .venv/bin/issuer call GET /v1/campaigns/demo --url http://{host}:{port}",
        ]
    )
    with reserved, backing_servers(settings) as (live, servers):
        uvloop.run(Supervisor(live, port, servers).run(load, banner))


def file_tenants(paths: list[Path]) -> set[str]:
    """The tenants the campaign files name (development keys get one set per tenant)."""
    from issuer.campaign_file import load_campaign_file
    from issuer.model import DEFAULT_TENANT

    named = {load_campaign_file(path)[1].tenant for path in paths}
    return {t for t in named if t is not None and t != DEFAULT_TENANT}
