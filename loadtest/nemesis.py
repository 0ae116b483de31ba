"""The faults the harness brings to a topology, the way Jepsen's nemeses do: kill -9 (and
the node started again), a primary started again too early, a pause (SIGSTOP), and
network partitions cut with packet-filter rules on loopback.

`Net` owns the rules of one harness run: a chain of its own, named after the process,
jumped to from INPUT and OUTPUT only for packets from or to the run's own /24 of
127.0.0.0/8, so nothing else on this machine is touched. Every rule and the chain go away
when the run ends, also on an exception, Ctrl-C or SIGTERM; chains left by a run that was
killed outright are removed by the next run's `open`."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import FrameType

from issuer.embedded import LOOPBACK, EmbeddedServer
from loadtest.rigs import Rig, until

CHAIN_PREFIX = "issuer-chaos-"
HOOKS = ("INPUT", "OUTPUT")
FAILOVER_S = 20.0  # longest a nemesis waits for a promotion
HOLD_S = 6.0  # how long a partition holds, by default


def iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run iptables (waiting for its lock, as another caller may hold it)."""
    return subprocess.run(
        ["iptables", "-w", "5", *args], capture_output=True, text=True, check=check
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Net:
    """This run's packet-filter rules; `cut` drops the packets between two sets of
    addresses (both ways), `heal` drops the rules, `close` removes the chain."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.chain = f"{CHAIN_PREFIX}{pid}"
        self.prefix = f"127.{100 + pid // 256 % 100}.{pid % 256}"
        self.subnet = f"{self.prefix}.0/24"
        self.opened = False

    def address(self, n: int) -> str:
        """The n-th address of this run's /24 (n from 10)."""
        return f"{self.prefix}.{n}"

    def _jumps(self) -> list[list[str]]:
        return [[hook, side, self.subnet, "-j", self.chain] for hook in HOOKS for side in "sd"]

    def open(self) -> None:
        remove_stale_chains()
        try:
            iptables("-N", self.chain)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            raise RuntimeError(f"iptables is needed, as root, to cut links: {detail}") from None
        self.opened = True
        atexit.register(self.close)
        for jump in self._jumps():
            iptables("-I", jump[0], f"-{jump[1]}", *jump[2:])

    def cut(self, side_a: list[str], side_b: list[str]) -> None:
        for a in side_a:
            for b in side_b:
                for src, dst in ((a, b), (b, a)):
                    iptables("-A", self.chain, "-s", src, "-d", dst, "-j", "DROP")

    def heal(self) -> None:
        if self.opened:
            iptables("-F", self.chain)

    def close(self) -> None:
        if not self.opened:
            return
        self.opened = False
        for jump in self._jumps():
            iptables("-D", jump[0], f"-{jump[1]}", *jump[2:], check=False)
        iptables("-F", self.chain, check=False)
        iptables("-X", self.chain, check=False)

    def __enter__(self) -> Net:
        self.open()
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: FrameType | None) -> None:
            self.close()
            signal.signal(signal.SIGTERM, previous)
            raise SystemExit(128 + signum)

        if previous in (signal.SIG_DFL, None):  # not when a test runner owns it
            signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale_chains() -> None:
    """Remove the chains (and their jumps) of harness runs whose process is gone."""
    listing = iptables("-S", check=False).stdout.splitlines()
    for line in listing:
        if not line.startswith(f"-N {CHAIN_PREFIX}"):
            continue
        chain = line.split()[1]
        pid = chain.removeprefix(CHAIN_PREFIX)
        if pid.isdigit() and _alive(int(pid)):
            continue
        for rule in listing:
            if rule.startswith("-A ") and rule.endswith(f"-j {chain}"):
                iptables("-D", *rule.split()[1:], check=False)
        iptables("-F", chain, check=False)
        iptables("-X", chain, check=False)


def drop_sockets(node: EmbeddedServer) -> None:
    """Destroy every TCP socket to or from `node`'s port with the data still in its
    buffers: what it had sent and the peer had not read is lost, as in a machine loss."""
    for side in ("sport", "dport"):
        subprocess.run(["ss", "-K", side, "=", f":{node.port}"], capture_output=True, check=True)


@dataclass
class Events:
    """What the nemesis did and saw, with time.time(): ("fault"|"heal"|"promoted", text)."""

    seen: list[tuple[float, str, str]] = field(default_factory=list)

    def add(self, kind: str, text: str) -> None:
        self.seen.append((time.time(), kind, text))
        print(f"    {time.strftime('%H:%M:%S')} {kind}: {text}", flush=True)


async def watch_promotions(rig: Rig, key: str, events: Events, stop: asyncio.Event) -> None:
    """Note every change of the primary a majority names for `key` (not the first)."""
    last: EmbeddedServer | None = None
    while not stop.is_set():
        now = await rig.primary_for(key)
        if now is not None and last is not None and now is not last:
            events.add("promoted", f"{now.address} ({rig.label})")
        last = now or last
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


class Nemesis:
    """The faults, each brought to the primary that owns `key` now and undone at its end
    (processes started or resumed, rules dropped); the topology may still be converging."""

    def __init__(
        self, rig: Rig, net: Net, key: str, events: Events, hold_s: float, repeat: int = 1
    ) -> None:
        self.rig = rig
        self.net = net
        self.key = key
        self.events = events
        self.hold_s = hold_s
        self.repeat = repeat  # how many times restart-early kills and restarts

    async def primary(self) -> EmbeddedServer:
        found: EmbeddedServer = await until(
            lambda: self.rig.primary_for(self.key), FAILOVER_S, "a primary a majority names"
        )
        return found

    async def promoted(self, old: EmbeddedServer) -> EmbeddedServer:
        async def other() -> EmbeddedServer | None:
            now = await self.rig.primary_for(self.key)
            return now if now is not None and now is not old else None

        what = f"a primary other than {old.address}"
        found: EmbeddedServer = await until(other, FAILOVER_S, what)
        return found

    async def kill(self) -> None:
        """kill -9 the primary and its sockets; once another is promoted, its supervisor
        starts it again as a replica."""
        old = await self.primary()
        self.events.add("fault", f"kill -9 {old.address}")
        await asyncio.to_thread(old.kill)
        await asyncio.to_thread(drop_sockets, old)
        new = await self.promoted(old)
        await asyncio.to_thread(self.rig.restart_as_replica, old, new)
        self.events.add("heal", f"{old.address} started again as a replica")

    async def restart_early(self) -> None:
        """kill -9 the primary and start it again, as itself, as soon as the first voice
        of the authority names another; hold while the others catch up. `repeat` times."""
        for i in range(self.repeat):
            if i:
                await self.rig.converge()
            old = await self.primary()
            self.events.add("fault", f"kill -9 {old.address}, to be started early")
            await asyncio.to_thread(old.kill)
            await asyncio.to_thread(drop_sockets, old)

            async def elsewhere(old: EmbeddedServer = old) -> EmbeddedServer | None:
                return await self.rig.named_elsewhere(old, self.key)

            await until(elsewhere, FAILOVER_S, "a first voice naming a new primary")
            await asyncio.to_thread(old.restart)
            self.events.add("heal", f"{old.address} started again as the primary it was")
            await asyncio.sleep(self.hold_s / 2)

    async def pause(self) -> None:
        """SIGSTOP the primary past failure detection (until another is promoted), then
        SIGCONT: it wakes up believing it is the primary, its clients still connected."""
        old = await self.primary()
        self.events.add("fault", f"SIGSTOP {old.address}")
        old.pause()
        try:
            await self.promoted(old)
            await asyncio.sleep(0.5)
        finally:
            old.resume()
            self.events.add("heal", f"SIGCONT {old.address}")

    async def partition(self) -> None:
        """Cut the primary off from every other node (its replicas, the other primaries,
        the Sentinels); the service still reaches both sides. `hold_s`, then heal."""
        await self._isolate(keep_replicas=False)

    async def partition_half(self) -> None:
        """The same, but the primary keeps all of its replicas but one on its side: the
        shape in which a primary used to confirm claims through the replica it kept."""
        await self._isolate(keep_replicas=True)

    async def _isolate(self, keep_replicas: bool) -> None:
        old = await self.primary()
        keep = (await self.rig.replicas_of(old))[:-1] if keep_replicas else []
        near = [old, *keep]
        far = [n for n in self.rig.group.nodes if n not in near]
        self.net.cut([n.host for n in near], [n.host for n in far])
        kept = f" with {', '.join(n.address for n in keep)}" if keep else ""
        self.events.add("fault", f"partition: {old.address}{kept} | the rest")
        await self.hold()

    async def partition_clients(self) -> None:
        """Cut the service (on 127.0.0.1) off from the primary, which the other nodes
        still reach: no failover; `hold_s`, then heal."""
        old = await self.primary()
        self.net.cut([LOOPBACK], [old.host])
        self.events.add("fault", f"partition: the service | {old.address}")
        await self.hold()

    async def hold(self) -> None:
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self.net.heal()
            self.events.add("heal", "partition healed")

    async def mixed(self, rng: random.Random, faults: int = 3) -> None:
        """`faults` of the others one after another, picked by `rng`, each starting while
        the topology may still recover from the one before."""
        picks = [rng.choice(list(self.alone())) for _ in range(faults)]
        self.events.add("fault", f"mixed: {', '.join(picks)}")
        for name in picks:
            await self.alone()[name]()

    def alone(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {
            "kill": self.kill,
            "restart-early": self.restart_early,
            "pause": self.pause,
            "partition": self.partition,
            "partition-half": self.partition_half,
            "partition-clients": self.partition_clients,
        }
