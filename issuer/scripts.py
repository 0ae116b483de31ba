"""The Lua scripts of `lua/`, registered once per Redis client.

Each script is `lua/lib.lua` followed by the script's own file; a call is the script's
structure in issuer/protocol.py, which lays out its KEYS and ARGV. redis-py's `Script`
object runs EVALSHA and, on NOSCRIPT (after a Redis restart or failover), loads the
script and retries, so callers never see a missing script.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, RedisError, TimeoutError

from issuer import metrics, topology
from issuer.config import DurableAck
from issuer.protocol import Call

LIB = "lib.lua"  # prepended to every script
# every script of lua/ (protocol.ScriptName names the same: tests/test_protocol.py)
NAMES = tuple(
    sorted(
        f.name.removesuffix(".lua")
        for f in files("issuer.lua").iterdir()
        if f.name.endswith(".lua") and f.name != LIB
    )
)


def source(name: str) -> str:
    package = files("issuer.lua")
    return package.joinpath(LIB).read_text() + "\n" + package.joinpath(f"{name}.lua").read_text()


ACK_TIMEOUT_MS = 2000  # durable acknowledgement: longest wait for an fsync or a replica
REPLICAS_TTL_S = 1.0  # how long a primary's count of connected replicas is trusted


def _took(name: str, started: float) -> None:
    metrics.observe(metrics.child(metrics.SCRIPT_SECONDS, name), time.perf_counter() - started)


class Scripts:
    """One registered script per file; `run(call)`, or `run_acked` to wait until what the
    script wrote is durable (`ack`: "aof" or "replica")."""

    def __init__(self, redis: Any, ack: DurableAck = "none") -> None:
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(source(name)) for name in NAMES
        }
        self.ack = ack
        self.owners = topology.Owners(redis)
        self._replicas: dict[int, tuple[float, int]] = {}  # pool -> (when read, count)

    async def run(self, call: Call) -> Any:
        started = time.perf_counter()
        try:
            return await self._scripts[call.SCRIPT](keys=call.keys(), args=call.args())
        finally:
            _took(call.SCRIPT, started)

    async def run_acked(self, call: Call, wait: Callable[[Any], bool]) -> Any:
        """Run a script on the primary that owns its slot and, when `wait(result)`, wait on
        the same connection until its writes are durable: WAITAOF 1 0 (fsynced by that
        primary) or WAIT (received by its replicas, `confirm_replicas`), which only count
        that connection's writes. RedisError if not confirmed in time: the writes stay,
        and a retry with the same request_id is answered from them. A slot that moved is
        followed once."""
        name, keys, args = call.SCRIPT, call.keys(), call.args()
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                async with self.owners.of(keys[0]).client() as conn:
                    result = await self._scripts[name](
                        keys=list(keys), args=list(args), client=conn
                    )
                    if wait(result):
                        await self._confirm(conn)
                    return result
            except MovedError:
                await self.owners.refresh()
                if attempt == 2:
                    raise
            except (RedisConnectionError, TimeoutError):
                await self.owners.refresh()  # the primary may be gone: learn its successor
                raise
            finally:
                _took(name, started)
        raise AssertionError("unreachable")

    async def _confirm(self, conn: Any) -> None:
        if self.ack == "aof":
            local, _ = await conn.execute_command("WAITAOF", 1, 0, ACK_TIMEOUT_MS)
            if int(local) < 1:
                raise RedisError("WAITAOF: the AOF was not fsynced in time")
        elif self.ack == "replica":
            await self.confirm_replicas(conn)

    async def confirm_replicas(self, conn: Any) -> None:
        """WAIT until every replica connected to the primary (at least one) has what this
        connection wrote or read from a stream: a failover may promote any of them, and
        with WAIT 1 one that had not confirmed could take the batch back. The count is read
        (INFO replication) at most every REPLICAS_TTL_S. RedisError if not in time."""
        key, now = id(conn.connection_pool), time.monotonic()
        seen = self._replicas.get(key)
        if seen is None or now - seen[0] > REPLICAS_TTL_S:
            info = await conn.info("replication")
            seen = self._replicas[key] = (now, int(info.get("connected_slaves", 0)))
        need = max(1, seen[1])
        if int(await conn.execute_command("WAIT", need, ACK_TIMEOUT_MS)) < need:
            raise RedisError(f"WAIT: {need} replica(s) did not confirm in time")

    async def aclose(self) -> None:
        await self.owners.aclose()

    async def load_all(self, redis: Any) -> None:
        """Load every script (readiness: Redis answers a script, not just PING)."""
        for script in self._scripts.values():
            await redis.script_load(script.script)
