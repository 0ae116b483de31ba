"""The Redis topologies the fault harness rehearses on: embedded Valkey sets whose every
node listens, and connects out, on its own loopback address (so that a packet filter can
cut the link between two nodes), and what their failover authority says of them: the
Sentinels, or the cluster nodes' own views."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from issuer import embedded, topology
from issuer.config import Settings
from issuer.embedded import EmbeddedGroup, EmbeddedServer

PROBE_S = 0.5  # a node that does not answer in this long is counted as unreachable
POLL_S = 0.1
STRAGGLER_S = 3.0  # converging: a node still following the wrong primary this long is told
CONVERGE_S = 45.0


class NotConverged(RuntimeError):
    """The topology did not come back to one primary with synced replicas in time."""


async def until(check: Callable[[], Awaitable[Any]], within_s: float, what: str) -> Any:
    """Poll `check` until it returns something truthy; TimeoutError naming `what`."""
    deadline = time.monotonic() + within_s
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within_s:g} s")
        await asyncio.sleep(POLL_S)


class Rig:
    """One embedded topology under test: its data nodes (`data`), the Sentinels
    (`watchers`, none for a cluster), and short-timeout probes of each node."""

    label = ""

    def __init__(self, group: EmbeddedGroup, data: list[EmbeddedServer]) -> None:
        self.group = group
        self.data = data
        self.watchers = [n for n in group.nodes if n not in data]
        self._probes: dict[str, Redis] = {}

    def node_at(self, address: str) -> EmbeddedServer | None:
        return next((n for n in self.group.nodes if n.address == address), None)

    async def probe(self, node: EmbeddedServer, *command: Any) -> Any:
        """`command` on `node`; RedisError or TimeoutError when it does not answer."""
        client = self._probes.get(node.address)
        if client is None:
            client = self._probes[node.address] = Redis(
                host=node.host,
                port=node.port,
                socket_timeout=PROBE_S,
                socket_connect_timeout=PROBE_S,
            )
        async with asyncio.timeout(PROBE_S * 2):
            return await client.execute_command(*command)

    async def role(self, node: EmbeddedServer) -> tuple[str, str]:
        """("master", "") or ("slave", "host:port connected|connecting|...") or ("down", "")."""
        try:
            reply = await self.probe(node, "ROLE")
        except (RedisError, OSError, TimeoutError):
            return "down", ""
        if reply[0] == b"master":
            return "master", ""
        return "slave", f"{reply[1].decode()}:{reply[2]} {reply[3].decode()}"

    def resume_all(self) -> None:
        """SIGCONT every node (a pause that was not undone)."""
        for node in self.group.nodes:
            if node.running():
                node.resume()

    async def start_dead(self, primary: EmbeddedServer | None) -> None:
        """Start again every data node that is down, as a replica of `primary`."""
        for node in self.data:
            if not node.running():
                await asyncio.to_thread(self.restart_as_replica, node, primary)

    async def aclose(self) -> None:
        for client in self._probes.values():
            await client.aclose()
        self._probes.clear()
        await asyncio.to_thread(self.group.stop)

    # -- what the topology's kind decides --------------------------------------------

    def env(self) -> dict[str, str]:
        """The settings that point `issuer serve` at this topology."""
        raise NotImplementedError

    def client(self) -> Any:
        """A client of the topology as the service makes it (close with topology.close)."""
        raise NotImplementedError

    async def primary_for(self, key: str) -> EmbeddedServer | None:
        """The primary of `key` as a majority of the failover authority names it now."""
        raise NotImplementedError

    async def named_elsewhere(self, old: EmbeddedServer, key: str) -> EmbeddedServer | None:
        """A primary for `key` other than `old`, as the first voice of the authority names it."""
        raise NotImplementedError

    async def replicas_of(self, primary: EmbeddedServer) -> list[EmbeddedServer]:
        """The replicas following `primary` now."""
        followers = []
        for node in self.data:
            role, of = await self.role(node)
            if role == "slave" and of.split()[0] == primary.address:
                followers.append(node)
        return followers

    def restart_as_replica(self, node: EmbeddedServer, primary: EmbeddedServer | None) -> None:
        """Start `node` again as its supervisor would after a crash."""
        node.restart()

    async def converged(self) -> bool:
        """Whether every node is up, each slot has the one primary everybody names, and
        every other data node is its synced replica."""
        raise NotImplementedError

    async def converge(self, within_s: float = CONVERGE_S) -> None:
        """Heal processes (resume, start the dead) and wait until `converged`; nodes that
        keep following a wrong primary are pointed at the right one, as an operator would."""
        self.resume_all()
        started = time.monotonic()
        while not await self.converged():
            if time.monotonic() - started > within_s:
                raise NotConverged(f"{self.label}: no single primary with synced replicas")
            await self.start_dead(await self.any_primary())
            if time.monotonic() - started > STRAGGLER_S:
                await self.fix_stragglers()
            await asyncio.sleep(POLL_S * 3)

    async def any_primary(self) -> EmbeddedServer | None:
        raise NotImplementedError

    async def fix_stragglers(self) -> None:
        """Point nodes that follow no primary or the wrong one at the right one."""


class SentinelRig(Rig):
    """A primary, two replicas and three Sentinels (quorum 2)."""

    label = "sentinel 1+2+3"

    @classmethod
    def start(cls, directory: Path, hosts: list[str]) -> SentinelRig:
        group = embedded.start_sentinel_set(directory, 2, 3, hosts)
        return cls(group, group.nodes[:3])

    @property
    def sentinels(self) -> str:
        return ",".join(n.address for n in self.watchers)

    def env(self) -> dict[str, str]:
        return {
            "ISSUER_REDIS_MODE": "sentinel",
            "ISSUER_SENTINELS": self.sentinels,
            "ISSUER_SENTINEL_MASTER": embedded.SENTINEL_MASTER,
        }

    def client(self) -> Any:
        settings = Settings(
            redis_mode="sentinel",
            sentinels=self.sentinels,
            sentinel_master=embedded.SENTINEL_MASTER,
        )
        return topology.connect(settings)

    async def named(self) -> list[str | None]:
        """The primary's address as each Sentinel names it (None: no answer)."""

        async def ask(sentinel: EmbeddedServer) -> str | None:
            try:
                host, port = await self.probe(
                    sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", embedded.SENTINEL_MASTER
                )
            except (RedisError, OSError, TimeoutError, TypeError, ValueError):
                return None
            return f"{host.decode()}:{int(port)}"

        return list(await asyncio.gather(*(ask(s) for s in self.watchers)))

    async def primary_for(self, key: str) -> EmbeddedServer | None:
        votes = Counter(a for a in await self.named() if a)
        if not votes:
            return None
        address, n = votes.most_common(1)[0]
        return self.node_at(address) if n > len(self.watchers) // 2 else None

    async def any_primary(self) -> EmbeddedServer | None:
        return await self.primary_for("")

    async def named_elsewhere(self, old: EmbeddedServer, key: str) -> EmbeddedServer | None:
        for address in await self.named():
            if address and address != old.address:
                return self.node_at(address)
        return None

    def restart_as_replica(self, node: EmbeddedServer, primary: EmbeddedServer | None) -> None:
        """Its supervisor starts it as a replica of the primary the Sentinels name (the
        usual init script), not as the primary it was."""
        if primary is not None and primary is not node:
            with (node.data_dir / "valkey.conf").open("a") as conf:
                conf.write(f"replicaof {primary.host} {primary.port}\n")
        node.restart()

    async def converged(self) -> bool:
        named = await self.named()
        if None in named or len(set(named)) != 1 or not all(n.running() for n in self.data):
            return False
        primary = self.node_at(str(named[0]))
        if primary is None or (await self.role(primary))[0] != "master":
            return False
        for node in self.data:
            if node is not primary:
                role, of = await self.role(node)
                if role != "slave" or of != f"{primary.address} connected":
                    return False
        for sentinel in self.watchers:  # each can fail over again: it sees every replica
            try:
                known = await self.probe(sentinel, "SENTINEL", "REPLICAS", embedded.SENTINEL_MASTER)
            except (RedisError, OSError, TimeoutError):
                return False
            fine = [r for r in known if r.get(b"flags") == b"slave"]
            if len(fine) < len(self.data) - 1:
                return False
        return True

    async def fix_stragglers(self) -> None:
        primary = await self.any_primary()
        if primary is None:
            return
        for node in self.data:
            if node is primary or not node.running():
                continue
            role, of = await self.role(node)
            if role == "master" or (role == "slave" and of.split()[0] != primary.address):
                try:
                    await self.probe(node, "REPLICAOF", primary.host, primary.port)
                    await self.probe(node, "CONFIG", "REWRITE")
                except (RedisError, OSError, TimeoutError):
                    continue


class ClusterRig(Rig):
    """A Valkey Cluster of three primaries with one or two replicas each."""

    def __init__(self, group: EmbeddedGroup, data: list[EmbeddedServer], replicas: int) -> None:
        super().__init__(group, data)
        self.label = f"cluster 3+{3 * replicas}"

    @classmethod
    def start(cls, directory: Path, hosts: list[str], replicas: int) -> ClusterRig:
        group = embedded.start_cluster(directory, 3, replicas, hosts)
        return cls(group, group.nodes, replicas)

    def env(self) -> dict[str, str]:
        return {"ISSUER_REDIS_MODE": "cluster", "REDIS_URL": self.group.url}

    def client(self) -> Any:
        up = next(n for n in self.data if n.running())
        return RedisCluster(host=up.host, port=up.port)

    async def views(self) -> dict[str, dict[str, Any]]:
        """Each reachable node's CLUSTER NODES, by the node's address."""

        async def ask(node: EmbeddedServer) -> dict[str, Any] | None:
            try:
                reply = await self.probe(node, "CLUSTER", "NODES")
            except (RedisError, OSError, TimeoutError):
                return None
            return parse_nodes(reply.decode())

        views = await asyncio.gather(*(ask(n) for n in self.data))
        return {n.address: v for n, v in zip(self.data, views, strict=True) if v is not None}

    @staticmethod
    def owner(view: dict[str, Any], slot: int) -> str | None:
        for address, node in view.items():
            serving = "master" in node["flags"] and "fail" not in node["flags"]
            if serving and any(a <= slot <= b for a, b in node["slots"]):
                return address
        return None

    async def primary_for(self, key: str) -> EmbeddedServer | None:
        slot = key_slot(key.encode())
        views = await self.views()
        votes = Counter(o for v in views.values() if (o := self.owner(v, slot)))
        if not votes:
            return None
        address, n = votes.most_common(1)[0]
        return self.node_at(address) if n > len(self.data) // 2 else None

    async def any_primary(self) -> EmbeddedServer | None:
        return None  # a cluster's nodes rejoin by themselves

    async def named_elsewhere(self, old: EmbeddedServer, key: str) -> EmbeddedServer | None:
        slot = key_slot(key.encode())
        for address, view in (await self.views()).items():
            owner = self.owner(view, slot)
            if owner and owner != old.address and address != old.address:
                return self.node_at(owner)
        return None

    async def converged(self) -> bool:
        if not all(n.running() for n in self.data):
            return False
        views = await self.views()
        if len(views) < len(self.data):
            return False
        layouts = set()
        for view in views.values():
            if any("fail" in n["flags"] or "handshake" in n["flags"] for n in view.values()):
                return False
            layouts.add(
                frozenset(
                    (a, tuple(map(tuple, n["slots"])))
                    for a, n in view.items()
                    if "master" in n["flags"] and n["slots"]
                )
            )
        if len(layouts) != 1:
            return False
        for node in self.data:
            try:
                info = await self.probe(node, "CLUSTER", "INFO")
                replication = await self.probe(node, "INFO", "replication")
            except (RedisError, OSError, TimeoutError):
                return False
            if b"cluster_state:ok" not in info:
                return False
            if b"role:slave" in replication and b"master_link_status:up" not in replication:
                return False
        return True


def parse_nodes(text: str) -> dict[str, dict[str, Any]]:
    """CLUSTER NODES as address -> {id, flags, master, slots [(first, last)]}."""
    found = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@")[0]
        slots = []
        for item in fields[8:]:
            if item.startswith("["):
                continue  # a slot being migrated
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        found[address] = {
            "id": fields[0],
            "flags": set(fields[2].split(",")),
            "master": fields[3],
            "slots": slots,
        }
    return found


TOPOLOGIES: dict[str, Callable[[Path, list[str]], Rig]] = {
    "sentinel": SentinelRig.start,
    "cluster": lambda directory, hosts: ClusterRig.start(directory, hosts, 1),
    "cluster-3x2": lambda directory, hosts: ClusterRig.start(directory, hosts, 2),
}
NODES = {"sentinel": 6, "cluster": 6, "cluster-3x2": 9}  # addresses each one needs
