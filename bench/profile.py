"""One server worker's work during a bench scenario, seen from outside: where its time
goes (py-spy flame graphs, `--profile DIR`) and how many instructions a request costs it
(callgrind, `--instructions`).

py-spy samples the worker without pausing it (`--nonblocking`), so the scenario's figures
stay close to an unprofiled run; each graph shows where one worker's CPU went during the
measured seconds of the scenario's first repetition.

Seconds on a shared machine vary by tens of per cent from run to run; the instructions a
fixed sequence of requests costs repeat to about a per mille, so that a 5 % change shows.
One more worker of the scenario's server (a baseline, or an `issuer` worker beside the
service's, on the same Valkey and PostgreSQL) is started on a port of its own under
callgrind, with PYTHONHASHSEED fixed. Once it answers, its instrumentation goes on and
WARMUP requests are sent; then, SETTLE_S later, the idle worker is counted for IDLE_S
seconds, then each of ROUNDS sequences of N pre-signed requests from C keep-alive
connections, each connection sending its next request once answered, and counted until
SETTLE_S after its last answer. Instructions per request = (instructions counted − the
idle rate × the seconds counted) / N. Each round's profile is dumped once counted
(callgrind.out.PID.1, .2, kept with `bench.run --keep`: `callgrind_annotate` them). The
settling counts what a request leaves to be done later (its nonce's spend, its log line's
write, its counts' publish) with the request, and keeps it out of the idle rate: counted
from the last answer, the warm-up's deferred work fell into the idle seconds and was then
taken out of every round, times the round's length, and a round's own tail was left out.

Callgrind counts the instructions the process runs in user space, not the kernel's work in
its system calls (socket reads and writes), which the bench's CPU seconds include. Under
callgrind a worker runs some 50 times slower, so what it does by the clock would weigh 50
times more per request. An `issuer` worker counted here (`python -m bench.profile worker`)
has the intervals of what it does by the clock while it serves SLOWER times longer (the
loop-lag sampler, the log and metric flushes, the watch's probe timeout), what it does
every second or so whatever the load held off for HELD_S (the expiry sweep, the keys-file
poll, the primaries' watch, and the "sold out" hint's lifetime, whose end sends the claims
in flight to Valkey: at full speed about one claim in a thousand), and its loop-lag bound
lifted (it would shed every claim). The connections
open with the warm-up and stay open until the rounds are counted (the bench's connections
live for the whole run). valgrind (Debian: `apt-get install valgrind`) must be installed.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.loadgen import Conn, Load, Target, close, finished, kick, open_connections

RATE_HZ = 200  # samples per second


def start(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` for `seconds` into the SVG flame graph `out`."""
    beside = Path(sys.executable).with_name("py-spy")  # in the venv, which may not be on PATH
    exe = str(beside) if beside.exists() else shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install -e '.[dev]')")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", str(RATE_HZ), "--nonblocking", "--format", "flamegraph"]
    return subprocess.Popen([*argv, "--output", str(out)], stdout=subprocess.DEVNULL)


def finish(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a recording to be written; a failed one is said, not fatal."""
    if proc.wait(timeout=60) != 0:
        print(f"warning: py-spy exited with {proc.returncode}; no flame graph", flush=True)


# ------------------------------------------------------------------ instruction counts

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 300
REQUESTS = 1_000
ROUNDS = 2
CONNECTIONS = 32
IDLE_S = 5.0
START_TIMEOUT_S = 300  # interpreter start and imports, under callgrind
SLOWER = 60  # a counted worker's clocked intervals are this many times longer (see above)
CLOCKED = (  # (module, constant): what a worker does by the clock while it serves
    ("issuer.admission", "TICK_S"),
    ("issuer.logs", "BATCH_S"),
    ("issuer.claims", "SPEND_S"),
    ("issuer.metrics", "PUBLISH_S"),
    ("issuer.watch", "PROBE_S"),  # and how long a primary may take to answer the watch
)
HELD_S = 3_600.0  # and what it does once a second whatever the load: not during a count
HELD = (
    ("issuer.claims", "HINT_TTL_S"),
    ("issuer.expiry", "SWEEP_INTERVAL_S"),
    ("issuer.keyring", "POLL_S"),
    ("issuer.watch", "WATCH_EVERY_S"),
)
SHED_LAG_MS = 60_000  # a counted worker is always late: the most the setting allows
LONG_S = 3_600.0  # a sequence ends when its requests are answered, not at a time
SETTLE_S = 8.0  # longer than a counted worker's deferred work: its counts' publish (6 s)
EVENTS = re.compile(r"^\s*Totals:((?:\s+\w+)+)\s*$", re.M)  # the events' names
THREAD = re.compile(r"^\s*Th\s+\d+((?:\s+[\d,]+)+)\s*$", re.M)  # one thread's counts
# The simulated caches with `--cache-sim`: this VM's per-core L1i, L1d, and L2 as the last
# level (its 32 MiB L3 is shared with the host's other guests).
CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=1048576,16,64")


@dataclass(frozen=True)
class Counted:
    """One scenario's count: instructions per request in each round, and what was taken out."""

    scenario: str
    per_request: list[float]
    requests: int
    idle_per_s: float
    round_s: list[float]
    events: dict[str, float] = field(default_factory=dict)  # per request, with --cache-sim

    @property
    def cycles(self) -> float:
        """Estimated cycles per request from the simulated events (`--cache-sim`): each
        instruction 1, each first-level miss 10, each last-level miss 100, each
        mispredicted branch 10."""
        e = self.events
        first = e["I1mr"] + e["D1mr"] + e["D1mw"]
        last = e["ILmr"] + e["DLmr"] + e["DLmw"]
        return e["Ir"] + 10 * first + 100 * last + 10 * (e["Bcm"] + e["Bim"])

    @property
    def median(self) -> float:
        return statistics.median(self.per_request)

    @property
    def spread(self) -> float:
        """(largest − smallest) / median of the rounds."""
        return (max(self.per_request) - min(self.per_request)) / self.median


def callgrind_control(pid: int, *args: str) -> str:
    """callgrind_control's answer about process `pid`."""
    done = subprocess.run(
        ["callgrind_control", *args, str(pid)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout


def events(answer: str) -> dict[str, int]:
    """Each event's count, every thread, in callgrind_control's answer to `-e`."""
    names = EVENTS.search(answer)
    if names is None:
        raise RuntimeError(f"no event totals in callgrind_control's answer: {answer!r}")
    totals = dict.fromkeys(names.group(1).split(), 0)
    for counts in THREAD.findall(answer):  # a thread's trailing zero counts left out
        for name, n in zip(totals, counts.split(), strict=False):
            totals[name] += int(n.replace(",", ""))
    return totals


def instructions(pid: int) -> int:
    """Instructions callgrind counted in process `pid` (every thread) since its last zero."""
    return events(callgrind_control(pid, "-e"))["Ir"]


def installed() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def solo_env(worker_pid: int, port: int, metrics_dir: Path) -> dict[str, str]:
    """The environment of a running `issuer` worker, for one more of it on `port`."""
    raw = Path(f"/proc/{worker_pid}/environ").read_bytes()
    env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    env.update(
        ISSUER_PORT=str(port),
        ISSUER_SHED_LAG_MS=str(SHED_LAG_MS),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),  # its own: the service's scrape unchanged
    )
    return env


class Subject:
    """A server process under callgrind, its instrumentation off until `instrument()`."""

    def __init__(
        self, argv: list[str], env: dict[str, str], out_dir: Path, log: Path, cache_sim: bool
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        simulated = ["--cache-sim=yes", "--branch-sim=yes", *CACHES] if cache_sim else []
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            *simulated,
            f"--callgrind-out-file={out_dir}/callgrind.out.%p",
            sys.executable,
            *argv,
        ]
        with log.open("a") as err:
            self.proc = subprocess.Popen(
                cmd,
                env={**env, "PYTHONHASHSEED": "0"},
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=ROOT,
            )

    def control(self, *args: str) -> str:
        return callgrind_control(self.proc.pid, *args)

    def instrument(self) -> None:
        self.control("--instr=on")

    def zero(self) -> float:
        """Zero the counters; returns when (monotonic), halfway through the command."""
        before = time.monotonic()
        self.control("--zero")
        return (before + time.monotonic()) / 2

    def counted(self) -> tuple[dict[str, int], float]:
        """Each event since the last zero (instructions: "Ir"), every thread, and when they
        were read."""
        before = time.monotonic()
        return events(self.control("-e")), (before + time.monotonic()) / 2

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def answering(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until something answers HTTP on the port (any status)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the counted server exited with {proc.returncode}")
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    await resp.read()
                    return
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.5)
    raise TimeoutError(f"nothing answered on port {port} in {START_TIMEOUT_S} s")


def checked(load: Load, expect: int) -> None:
    """Every request of a finished load answered `expect`."""
    part = load.part()
    sent = len(load.requests)
    if part.answered != {expect: sent} or part.unfinished or part.lost:
        raise RuntimeError(
            f"expected {sent} × {expect}, got {part.answered}"
            f" ({part.unfinished} unfinished, {part.lost} connections lost)"
        )


def sequence(requests: list[bytes]) -> Load:
    """A load that sends these requests once, each connection its next once answered."""
    now = time.monotonic()
    return Load(requests, False, now, now + LONG_S, 0.0)


async def count(
    scenario: str,
    subject: Subject,
    port: int,
    warmup: list[bytes],
    rounds: list[list[bytes]],
    expect: int,
    connections: int = CONNECTIONS,
    idle_s: float = IDLE_S,
) -> Counted:
    """Count one scenario in a started subject (stopped after). The connections open with
    the warm-up and stay open until the rounds are counted: their opening and closing is
    no request's cost (the bench's connections live for the whole run)."""
    conns: list[Conn] = []
    try:
        await answering(port, subject.proc)
        await asyncio.to_thread(subject.instrument)
        load = sequence(warmup)
        conns = await open_connections(load, Target("127.0.0.1", port, connections, 0, LONG_S))
        await finished(load)
        checked(load, expect)
        await asyncio.sleep(SETTLE_S)
        began = await asyncio.to_thread(subject.zero)
        await asyncio.sleep(idle_s)
        idle, ended = await asyncio.to_thread(subject.counted)
        idle_per_s = {name: n / (ended - began) for name, n in idle.items()}
        each: list[dict[str, float]] = []
        took: list[float] = []
        for requests in rounds:
            load = sequence(requests)
            began = await asyncio.to_thread(subject.zero)
            kick(conns, load)
            await finished(load)
            await asyncio.sleep(SETTLE_S)
            total, ended = await asyncio.to_thread(subject.counted)
            await asyncio.to_thread(subject.control, "--dump=round")  # its own profile
            checked(load, expect)
            took.append(ended - began)
            each.append(
                {k: (n - idle_per_s[k] * took[-1]) / len(requests) for k, n in total.items()}
            )
        per_request = [e["Ir"] for e in each]
        simulated = (
            {k: statistics.median(e[k] for e in each) for k in each[0]} if len(each[0]) > 1 else {}
        )
        return Counted(scenario, per_request, len(rounds[0]), idle_per_s["Ir"], took, simulated)
    finally:
        close(conns)
        await asyncio.to_thread(subject.stop)


def worker() -> int:
    """An `issuer` worker as `issuer worker` runs it, its CLOCKED intervals SLOWER times
    longer and its HELD ones HELD_S (those of them its code has: the bench may count an
    earlier commit's)."""
    from issuer import cli

    for names, stretch in ((CLOCKED, lambda s: s * SLOWER), (HELD, lambda s: HELD_S)):
        for name, constant in names:
            try:
                module = importlib.import_module(name)
            except ImportError:  # not in that commit (or found elsewhere, not importable there)
                continue
            if hasattr(module, constant):
                setattr(module, constant, stretch(getattr(module, constant)))
    return cli.main(["worker"])


if __name__ == "__main__":
    if sys.argv[1:] != ["worker"]:
        sys.exit("usage: python -m bench.profile worker (make bench runs the counts)")
    sys.exit(worker())
