"""Real Valkey and PostgreSQL servers started from the wheels keep their data across restarts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis

from issuer.embedded import start_postgres, start_redis, system_account

FAST_PG = {"fsync": "off", "synchronous_commit": "off"}


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    """A data dir outside tmp_path: any pytest session that starts re-closes /tmp/pytest-of-<user>
    to 0700, which would lock the unprivileged postgres user (when we are root) out mid-start."""
    with tempfile.TemporaryDirectory(prefix="issuer-test-pg-") as directory:
        yield Path(directory)


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def pg(url: str, sql: str) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_valkey_keeps_data_across_a_clean_stop(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server, redis.Redis.from_url(server.url) as client:
        assert client.ping()
        client.set("k", "v")
    assert_gone(server.pid)
    with start_redis(tmp_path) as server, redis.Redis.from_url(server.url) as client:
        assert client.get("k") == b"v"
    assert_gone(server.pid)


def test_valkey_keeps_fsynced_writes_across_a_kill(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server:
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        time.sleep(1.5)  # appendfsync everysec
        server.kill()
        assert_gone(server.pid)
        url = server.url
        server.restart()
        assert server.url == url
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") == b"v"


def test_a_taken_port_fails_with_the_log_tail(tmp_path: Path) -> None:
    with start_redis(tmp_path / "a") as server:
        port = urlsplit(server.url).port
        with pytest.raises(RuntimeError, match=r"(?s)did not come up.*Address already in use"):
            start_redis(tmp_path / "b", port)


def test_postgres_keeps_tables_across_a_clean_stop(pg_dir: Path) -> None:
    with start_postgres(pg_dir, settings=FAST_PG) as server:
        assert pg(server.url, "SELECT 1") == 1
        pg(server.url, "CREATE TABLE t AS SELECT 42 AS x")
    assert_gone(server.pid)
    with start_postgres(pg_dir, settings=FAST_PG) as server:
        assert pg(server.url, "SELECT x FROM t") == 42
    assert_gone(server.pid)


def test_postgres_recovers_after_a_kill(pg_dir: Path) -> None:
    with start_postgres(pg_dir) as server:
        pg(server.url, "CREATE TABLE t AS SELECT 42 AS x")
        server.kill()
    assert (pg_dir / "pg" / "postmaster.pid").exists()  # stale: postgres itself replaces it
    with start_postgres(pg_dir) as server:
        assert pg(server.url, "SELECT x FROM t") == 42


@pytest.mark.skipif(os.geteuid() != 0, reason="creates a system account: root only")
def test_processes_starting_at_once_create_one_account() -> None:
    """xdist workers on a fresh machine each start PostgreSQL as the same account at once."""
    name = f"issuer-t{os.getpid() % 100000}"
    code = "import sys; import issuer.embedded as e; print(e.system_account(sys.argv[1]).pw_uid)"
    try:
        racers = [
            subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        uids = {racer.communicate(timeout=60)[0].strip() for racer in racers}
        assert all(racer.returncode == 0 for racer in racers)
        assert uids == {str(system_account(name).pw_uid)}
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
