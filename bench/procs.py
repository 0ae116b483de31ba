"""The server processes the bench starts, and stops by PID: N baseline workers sharing a
port, and `issuer serve` itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from bench.serving import READY_LINE
from issuer.server import reuseport_socket

ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 30


def stop(proc: subprocess.Popen[str], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM one process we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def clean_env() -> dict[str, str]:
    """Our environment without the service's settings, so only the bench's own apply."""
    names = ("ISSUER_", "REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")
    return {k: v for k, v in os.environ.items() if not k.startswith(names)}


class Workers:
    """`python -m MODULE --port P ARGS` in N processes on one SO_REUSEPORT port."""

    def __init__(self, name: str, module: str, args: list[str], workers: int, log: Path) -> None:
        self.name = name
        self.module = module
        self.args = args
        self.reserved = reuseport_socket("127.0.0.1", 0, listen=False)
        self.port: int = self.reserved.getsockname()[1]
        self.procs: list[subprocess.Popen[str]] = []
        cmd = [sys.executable, *self.argv(self.port)]
        with log.open("a") as err:
            for _ in range(workers):
                self.procs.append(
                    subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
                )
        for proc in self.procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != READY_LINE:
                self.stop()
                raise RuntimeError(f"{name} worker did not start; {log} ends with:\n{tail(log)}")

    def argv(self, port: int) -> list[str]:
        """The interpreter's arguments that start one such worker on `port`."""
        return ["-m", self.module, "--port", str(port), *self.args]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            stop(proc)
        self.reserved.close()


class Service:
    """`issuer serve --workers N --port 0` on given Redis and PostgreSQL; the port is read
    from its banner line. `nice` lowers its CPU priority (and its children's)."""

    def __init__(self, workers: int, env: dict[str, str], log: Path, nice: int = 0) -> None:
        cmd = [sys.executable, "-m", "issuer.cli", "serve", "--port", "0"]
        cmd += ["--workers", str(workers)]
        with log.open("a") as err:
            self.proc = subprocess.Popen(
                cmd,
                env={**clean_env(), **env},
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=ROOT,
                preexec_fn=(lambda: os.nice(nice)) if nice else None,
            )
        assert self.proc.stdout is not None
        banner = self.proc.stdout.readline()
        match = re.search(r"issuer ready on (http://\S+):(\d+)", banner)
        if match is None:
            stop(self.proc)
            raise RuntimeError(f"issuer serve did not start; {log} ends with:\n{tail(log)}")
        self.url = f"{match.group(1)}:{match.group(2)}"
        self.port = int(match.group(2))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop(self.proc)
