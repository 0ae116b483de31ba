"""Real servers for the suite: one embedded Valkey and one embedded PostgreSQL per session
(or REDIS_URL / DATABASE_URL), a fresh Redis database and PostgreSQL database per test
module, and `issuer serve` itself as a subprocess on loopback.

A module that sets `TOPOLOGIES = ("standalone", "cluster")` runs all its tests once per
topology: `cluster` is an embedded Valkey Cluster of 3 primaries and 3 replicas (one per
session, emptied for each module), which the service detects from REDIS_URL.

Tests marked `fast` (`make check`) use none of these: they start no server and no process
(checked here), and their Redis, if any, is fakeredis (`fake`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import fakeredis
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from issuer import embedded, store
from issuer.auth import ApiKey, load_keys
from issuer.client import Client, Response
from issuer.keys import CAMPAIGNS, CampaignKeys
from issuer.scripts import Scripts
from tests.fake import Fake

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.browser"]  # the browser fixtures of the page tests
_module_counter = iter(range(1, 1_000_000))
SERVERS = {"servers", "cluster"}  # the fixtures that start servers


@pytest.hookimpl(trylast=True)  # after pytest has grouped the tests by their fixtures
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("fast") and SERVERS & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} is marked fast but uses a server")
    # the modules marked long first (a stable sort: each module's tests stay together and in
    # order), so that make test's workers, given a file at a time, do not end on one of them
    long = {item.path for item in items if item.get_closest_marker("long")}
    items.sort(key=lambda item: item.path not in long)


def _no_process(*args: Any, **kwargs: Any) -> None:
    raise AssertionError(f"a fast test started a process: {args[:1]}")


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("fast") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", _no_process)
        yield


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    """The scripts on a fresh fakeredis with Lua: the fast tier's Redis."""
    redis = fakeredis.FakeAsyncRedis()
    yield Fake(redis, Scripts(redis))
    await redis.aclose()


class Servers:
    def __init__(self, redis_url: str, database_url: str) -> None:
        self.redis_url = redis_url
        self.database_url = database_url


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    # Not tmp_path: pytest resets its base dir to 0700, which locks out the postgres user.
    with tempfile.TemporaryDirectory(prefix="issuer-test-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


@pytest.fixture(scope="session")
def servers(workdir: Path) -> Iterator[Servers]:
    redis_url, database_url = os.environ.get("REDIS_URL"), os.environ.get("DATABASE_URL")
    started = []
    if not redis_url:
        started.append(embedded.start_redis(workdir))
        redis_url = started[-1].url
    if not database_url:
        fast = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        started.append(embedded.start_postgres(workdir, settings=fast))
        database_url = started[-1].url
    try:
        yield Servers(redis_url, database_url)
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus' promtool, or the test skips (Debian's prometheus package; .ci/run installs
    it)."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed: apt-get install prometheus (as .ci/run does)")
    return found


@pytest.fixture(scope="session")
def cluster(workdir: Path) -> Iterator[embedded.EmbeddedGroup]:
    with embedded.start_cluster(workdir) as group:
        yield group


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    topologies = getattr(metafunc.module, "TOPOLOGIES", None)
    if topologies and "keyspace" in metafunc.fixturenames:
        metafunc.parametrize("topology", topologies, indirect=True, scope="module")


@pytest.fixture(scope="module")
def topology(request: pytest.FixtureRequest) -> str:
    """The Redis topology of this module's keyspace: "standalone" unless parametrised."""
    return getattr(request, "param", "standalone")


class Keyspace:
    """One test module's Redis database and PostgreSQL database."""

    def __init__(self, redis_url: str, database_url: str, name: str, topology: str) -> None:
        self.redis_url = redis_url
        self.database_url = database_url
        self.name = name
        self.topology = topology

    def redis(self) -> Any:
        """A client of this keyspace's Redis (a `RedisCluster` on a cluster)."""
        if self.topology == "cluster":
            return RedisCluster.from_url(self.redis_url)
        return Redis.from_url(self.redis_url)


async def campaign_primaries(keyspace: Keyspace) -> set[str]:
    """The primaries that hold the campaigns registered in this keyspace (one on a server)."""
    client = keyspace.redis()
    try:
        ids = [m.decode() for m in await client.smembers(CAMPAIGNS)]
        if keyspace.topology != "cluster":
            return {keyspace.redis_url}
        await client.initialize()
        return {client.get_node_from_key(CampaignKeys(c).ledger).name for c in ids}
    finally:
        await client.aclose()


def _with_path(url: str, path: str) -> str:
    return re.sub(r"(//[^/]*)(/[^?]*)?", lambda m: m.group(1) + path, url, count=1)


@pytest.fixture(scope="module")
async def keyspace(
    servers: Servers, topology: str, request: pytest.FixtureRequest
) -> AsyncIterator[Keyspace]:
    n = next(_module_counter)
    name = f"t{n}_{request.module.__name__.rsplit('.', 1)[-1]}"[:60].lower()
    if topology == "cluster":  # one database only: the module has the cluster to itself
        redis_url = request.getfixturevalue("cluster").url
        client: Any = RedisCluster.from_url(redis_url)
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        redis_url = _with_path(servers.redis_url, f"/{n % 16}")
        client = Redis.from_url(redis_url)
        await client.flushdb()
    await client.aclose()
    yield Keyspace(redis_url, await new_database(servers, name), name, topology)


async def new_database(servers: Servers, name: str) -> str:
    """An empty database `name` (dropped first if it exists); returns its URL."""
    admin = await asyncpg.connect(servers.database_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return _with_path(servers.database_url, f"/{name}")


@pytest.fixture(scope="module")
async def redis(keyspace: Keyspace) -> AsyncIterator[Redis]:
    client = keyspace.redis()
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
async def pg(keyspace: Keyspace) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(keyspace.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@contextlib.asynccontextmanager
async def database_at(servers: Servers, name: str, version: int) -> AsyncIterator[asyncpg.Pool]:
    """A new database `name` with the schema of migration `version`, as an older release
    left it (store.migrate takes it on from there)."""
    pool = await asyncpg.create_pool(await new_database(servers, name))
    try:
        await store.migrate(pool, upto=version)
        yield pool
    finally:
        await pool.close()


class Service:
    """`issuer serve` running as a subprocess, and signed clients for each role."""

    def __init__(
        self,
        proc: subprocess.Popen[str],
        url: str,
        keys: dict[str, ApiKey],
        session: aiohttp.ClientSession,
    ) -> None:
        self.proc = proc
        self.url = url
        self.keys = keys
        self.session = session

    def key(self, role: str) -> ApiKey:
        return next(k for k in self.keys.values() if k.role == role)

    def client(self, role: str) -> Client:
        return Client(self.url, self.key(role), self.session)

    async def call(
        self, method: str, path: str, payload: Any = None, role: str = "ops"
    ) -> Response:
        return await self.client(role).call(method, path, payload)

    async def drained(self) -> None:
        await wait_drained(self.session, self.url)


async def wait_drained(session: aiohttp.ClientSession, url: str, within_s: float = 30) -> None:
    """Wait until the flusher of the service at `url` has written every stream entry to
    PostgreSQL (its /readyz says so, even while it answers 503 for another reason)."""
    async with asyncio.timeout(within_s):
        while True:
            async with session.get(url + "/readyz") as resp:
                checks = await resp.json()
            if checks.get("flusher_lag_entries") == 0:
                return
            await asyncio.sleep(0.05)


# tests fire thousands of claims at once and count every answer: shedding (its own tests
# set these) must not depend on how busy the machine is
NO_SHEDDING = {"ISSUER_CLAIM_QUEUE_MAX": "1000000", "ISSUER_SHED_LAG_MS": "60000"}


def start_service(
    keyspace: Keyspace, data_dir: Path, workers: int = 2, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ,
        "REDIS_URL": keyspace.redis_url,
        "DATABASE_URL": keyspace.database_url,
        "ISSUER_DATA_DIR": str(data_dir),
        "ISSUER_PERSON_KEY": "test-person-key",
        "ISSUER_LOG_LEVEL": "WARNING",
        "ISSUER_SHUTDOWN_GRACE_S": "0",
        **NO_SHEDDING,
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "issuer.cli", "serve", "--port", "0", "--workers", str(workers)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"service did not start: {line!r}")
    return proc, match.group(1)


def stop_service(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.asynccontextmanager
async def running_service(
    keyspace: Keyspace,
    data_dir: Path,
    workers: int = 2,
    env: dict[str, str] | None = None,
    connections: int = 100,
) -> AsyncIterator[Service]:
    """`issuer serve` for the block, with a client session of `connections` connections."""
    proc, url = await asyncio.to_thread(start_service, keyspace, data_dir, workers, env)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections))
    try:
        yield Service(proc, url, load_keys(data_dir / "keys.toml"), session)
    finally:
        await session.close()
        await asyncio.to_thread(stop_service, proc)


@pytest.fixture(scope="module")
async def service(keyspace: Keyspace, workdir: Path) -> AsyncIterator[Service]:
    data_dir = workdir / f"data-{keyspace.name}"
    async with running_service(keyspace, data_dir, connections=2000) as running:
        yield running


def child_processes(pid: int) -> dict[int, str]:
    """Direct children of process `pid`: pid -> command line."""
    task = Path(f"/proc/{pid}/task/{pid}/children")
    found = {}
    for child in map(int, task.read_text().split()):
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except FileNotFoundError:
            continue
    return found


def worker_pids(service: Service) -> list[int]:
    """The PIDs of the service's worker processes (children of its supervisor)."""
    children = child_processes(service.proc.pid)
    return [pid for pid, cmd in children.items() if cmd.endswith(" worker ")]


def unique_id(prefix: str = "c") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"
