"""A closed-loop HTTP/1.1 keep-alive load generator on raw uvloop protocols.

Each of C connections writes one pre-built request, reads the whole response (status line,
headers, Content-Length body), records the latency and writes the next. It runs in P
processes that live for the whole bench; the parent sends each a plan to build, then a
start time, and merges what they measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import random
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

import uvloop

from bench.signing import Plan, build

GRACE_S = 3.0  # how long in-flight requests may finish after the window closes


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how hard one client process sends."""

    host: str
    port: int
    connections: int
    warmup_s: float
    seconds: float
    retry_after_s: float = 0.0  # a connection answered 503 waits 1-2 times this, as apps do


@dataclass(slots=True)
class Part:
    """What one client process measured inside its window."""

    window_s: float
    latencies: array[float]  # seconds, responses sent and received inside the window
    served: array[float]  # the latencies of the answers below 500 (not shed, not failed)
    statuses: dict[int, int]
    answered: dict[int, int]  # statuses of every answer to a request sent in the window
    warm: int  # responses before the window
    exhausted: bool  # ran out of requests before the window's planned end
    unfinished: int  # requests still in flight when it gave up waiting
    lost: int  # connections closed by the server

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.window_s if self.window_s > 0 else 0.0


class Load:
    """Shared state of one process's connections: the requests and what came back."""

    def __init__(
        self, requests: list[bytes], cycle: bool, start: float, end: float, retry_after_s: float
    ) -> None:
        self.requests = requests
        self.retry_after_s = retry_after_s
        self.cycle = cycle
        self.next_index = 0
        self.start = start
        self.end = end
        self.active = 0
        self.exhausted_at: float | None = None
        self.sent_at = array("d")
        self.done_at = array("d")
        self.status = array("H")
        self.warm = 0
        self.lost = 0

    def send(self, conn: Conn) -> None:
        """Give the connection its next request, or let it rest when time or requests ran out."""
        now = time.monotonic()
        if now >= self.end or conn.transport is None:
            return
        if self.next_index >= len(self.requests):
            if not self.cycle or not self.requests:
                if self.exhausted_at is None:
                    self.exhausted_at = now
                return
            self.next_index = 0
        request = self.requests[self.next_index]
        self.next_index += 1
        self.active += 1
        conn.busy = True
        conn.sent_at = now
        conn.transport.write(request)

    def received(self, conn: Conn, status: int) -> None:
        now = time.monotonic()
        self.active -= 1
        conn.busy = False
        if conn.sent_at >= self.start and now <= self.end:
            self.sent_at.append(conn.sent_at)
            self.done_at.append(now)
            self.status.append(status)
        elif now < self.start:
            self.warm += 1
        if status == 503 and self.retry_after_s:  # with jitter, or the retries come in waves
            wait = self.retry_after_s * (1 + random.random())
            asyncio.get_running_loop().call_later(wait, self.send, conn)
        else:
            self.send(conn)

    def part(self) -> Part:
        """The measured window ends early if the requests ran out (`answered` does not)."""
        end = self.end if self.exhausted_at is None else min(self.end, self.exhausted_at)
        lat, served = array("d"), array("d")
        statuses: dict[int, int] = {}
        for sent, done, status in zip(self.sent_at, self.done_at, self.status, strict=True):
            if done <= end:
                lat.append(done - sent)
                if status < 500:
                    served.append(done - sent)
                statuses[status] = statuses.get(status, 0) + 1
        answered: dict[int, int] = {}
        for status in self.status:
            answered[status] = answered.get(status, 0) + 1
        return Part(
            window_s=max(0.0, end - self.start),
            latencies=lat,
            served=served,
            statuses=statuses,
            answered=answered,
            warm=self.warm,
            exhausted=end < self.end,
            unfinished=self.active,
            lost=self.lost,
        )


class Conn(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.need = -1  # bytes of the whole response, once its headers are in
        self.status = 0
        self.busy = False
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.load.send(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buf
                return
            self.status = int(buf[9:12])
            self.need = end + 4 + content_length(buf, end)
        if len(buf) < self.need:
            self.buffer = buf
            return
        self.buffer = buf[self.need :]
        self.need = -1
        self.load.received(self, self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None and self.busy:
            self.load.lost += 1
            self.load.active -= 1
        self.transport = None


def content_length(buf: bytes, head_end: int) -> int:
    """The Content-Length of a response head (responses without one must have no body)."""
    at = buf.find(b"\r\nContent-Length:", 0, head_end)
    if at < 0:
        at = buf[:head_end].lower().find(b"\r\ncontent-length:")
        if at < 0:
            if b"chunked" in buf[:head_end].lower():
                raise ValueError("chunked responses are not supported")
            return 0
    start = at + len(b"\r\ncontent-length:")
    stop = buf.find(b"\r\n", start)
    return int(buf[start : stop if stop >= 0 else head_end])


async def open_connections(load: Load, target: Target) -> list[Conn]:
    """The target's connections for `load`, open; each sends its first request at once."""
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []

    def factory() -> Conn:
        conns.append(Conn(load))
        return conns[-1]

    opening = (
        loop.create_connection(factory, target.host, target.port) for _ in range(target.connections)
    )
    await asyncio.gather(*opening)
    return conns


def kick(conns: list[Conn], load: Load) -> None:
    """Give open, idle connections to another load: each sends its first request at once."""
    for conn in conns:
        conn.load = load
        load.send(conn)


async def finished(load: Load) -> None:
    """Until every request sent is answered and no more will be (the window is over or the
    requests ran out), or answers took GRACE_S beyond the window."""
    while True:
        await asyncio.sleep(0.05)
        now = time.monotonic()
        over = now >= load.end or load.exhausted_at is not None
        if (load.active == 0 and over) or now > load.end + GRACE_S:
            return


def close(conns: list[Conn]) -> None:
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()


async def run_load(requests: list[bytes], cycle: bool, target: Target, start_at: float) -> Part:
    """Open the connections at `start_at`, warm up, measure, then stop by itself."""
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    begin = time.monotonic() + target.warmup_s
    load = Load(requests, cycle, begin, begin + target.seconds, target.retry_after_s)
    conns = await open_connections(load, target)
    await finished(load)
    part = load.part()
    close(conns)
    return part


def client_main(pipe: Connection) -> None:
    """A client process: build a plan when told, run it when told, until told to quit."""
    requests: list[bytes] = []
    cycle = False
    while True:
        message: tuple[Any, ...] = pipe.recv()
        if message[0] == "build":
            plan, host = cast(Plan, message[1]), cast(str, message[2])
            started = time.monotonic()
            requests, cycle = build(plan, host), plan.cycle
            pipe.send(("built", len(requests), time.monotonic() - started))
        elif message[0] == "go":
            target, start_at = cast(Target, message[1]), cast(float, message[2])
            part = uvloop.run(run_load(requests, cycle, target, start_at))
            requests = []
            pipe.send(("done", part))
        else:
            return


@dataclass
class Merged:
    """The processes' parts together: throughput adds up, latencies pool."""

    parts: list[Part]
    latencies: list[float] = field(init=False)
    served: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.latencies = sorted(x for p in self.parts for x in p.latencies)
        self.served = sorted(x for p in self.parts for x in p.served)

    @property
    def rate(self) -> float:
        return sum(p.rate for p in self.parts)

    @property
    def count(self) -> int:
        return len(self.latencies)

    def percentile_ms(self, q: float, of: list[float] | None = None) -> float:
        """The q-quantile of the latencies (or of `of`, e.g. `served`) in ms."""
        values = self.latencies if of is None else of
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    @property
    def statuses(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for p in self.parts:
            for status, n in p.statuses.items():
                total[status] = total.get(status, 0) + n
        return total

    @property
    def exhausted(self) -> bool:
        return any(p.exhausted for p in self.parts)

    @property
    def troubles(self) -> int:
        return sum(p.unfinished + p.lost for p in self.parts)


class Clients:
    """P load-generator processes, started once (spawned: no inherited event loop)."""

    def __init__(self, processes: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_main, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def build(self, plans: list[Plan], host: str) -> tuple[int, float]:
        """Every process builds its plan; returns (requests built, slowest build seconds)."""
        for pipe, plan in zip(self.pipes, plans, strict=True):
            pipe.send(("build", plan, host))
        replies = [pipe.recv() for pipe in self.pipes]
        return sum(r[1] for r in replies), max(r[2] for r in replies)

    def go(self, target: Target, start_at: float) -> None:
        for pipe in self.pipes:
            pipe.send(("go", target, start_at))

    def collect(self) -> Merged:
        return Merged([pipe.recv()[1] for pipe in self.pipes])

    def close(self) -> None:
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    pipe.send(("quit",))
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
