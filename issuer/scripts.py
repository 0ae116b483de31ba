"""The Lua scripts of `lua/`, read once per Redis client and called by their SHA1.

Each script is `lua/lib.lua` followed by the script's own file; a call is the script's
structure in issuer/protocol.py, which lays out its KEYS and ARGV. A call is one EVALSHA
and, on NOSCRIPT (after a Redis restart or failover), SCRIPT LOAD and EVALSHA again, so
callers never see a missing script.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from importlib.resources import files
from typing import Any

from redis.exceptions import (
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from issuer import metrics, topology
from issuer.config import DurableAck
from issuer.durability import ACK_TIMEOUT_MS, AckRule, NotDurable
from issuer.protocol import Call

# the owner of the slot may have changed: learn where it is now, then answer 503
_LOST_OWNER = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError, NotDurable)

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


def _closed(exc: RuntimeError) -> RedisConnectionError:
    """A write on a connection whose transport a failover just closed raises the event
    loop's own error through redis-py (RuntimeError "the handler is closed" under uvloop;
    redis-py issue 4287), not ConnectionError: it is one (the claim answers 503)."""
    return RedisConnectionError(f"the connection closed under a write: {exc}")


@contextlib.contextmanager
def _transport_errors() -> Iterator[None]:
    """`_closed` over a block of commands."""
    try:
        yield
    except RuntimeError as exc:
        raise _closed(exc) from exc


def _took(name: str, started: float) -> None:
    metrics.observe(metrics.child(metrics.SCRIPT_SECONDS, name), time.perf_counter() - started)


class Scripts:
    """One registered script per file; `run(call)`, or `run_acked` to wait until what the
    script wrote is durable (`ack`: "aof" or "replica")."""

    def __init__(
        self, redis: Any, ack: DurableAck = "none", ack_replicas: int | None = None
    ) -> None:
        self.redis = redis
        self._sources = {name: source(name) for name in NAMES}
        self._shas = {
            name: hashlib.sha1(text.encode()).hexdigest() for name, text in self._sources.items()
        }
        self.ack = ack
        self.owners = topology.Owners(redis)
        self.rule = AckRule(redis, ack_replicas)  # what a replica acknowledgement waits for

    async def run(self, call: Call) -> Any:
        started = time.perf_counter()
        try:
            return await self._evalsha(self.redis, call.SCRIPT, call.keys(), call.args())
        except RuntimeError as exc:  # not in `_transport_errors`: a batch's 5 calls fewer
            raise _closed(exc) from exc
        finally:
            _took(call.SCRIPT, started)

    async def _evalsha(self, client: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        """Script `name` on `client` (the client or one connection of it): EVALSHA and, on
        NOSCRIPT, SCRIPT LOAD and EVALSHA again (not redis-py's `Script`, whose call was
        six Python calls more per batch)."""
        sha = self._shas[name]
        try:
            return await client.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self._sources[name])
            return await client.execute_command("EVALSHA", sha, len(keys), *keys, *args)

    async def run_acked(self, call: Call, wait: Callable[[Any], bool]) -> Any:
        """Run a script on the primary that owns its slot and, when `wait(result)`, wait on
        the same connection until its writes are durable: WAITAOF 1 0 (fsynced by that
        primary) or, in replica mode, held by every replica that could be promoted
        (`AckRule`, which is also asked before the script whether the batch could be
        confirmed there at all). RedisError if not confirmed: the writes stay, and a
        retry with the same request_id is answered from them. A slot that moved is
        followed once; a lost owner (unreachable, CLUSTERDOWN, not the primary) makes the
        topology be read again before the error goes up."""
        name, keys, args = call.SCRIPT, call.keys(), call.args()
        for attempt in (1, 2):
            started = time.perf_counter()
            owner = self.owners.of(keys[0])
            try:
                with _transport_errors():
                    return await self._run_on(owner, name, keys, args, wait)
            except MovedError:
                await self.owners.refresh()
                if attempt == 2:
                    raise
            except _LOST_OWNER:
                await self.owners.refresh(failed=self.owners.name(owner))
                raise
            finally:
                _took(name, started)
        raise AssertionError("unreachable")

    async def _run_on(
        self, owner: Any, name: str, keys: list[str], args: list[Any], wait: Callable[[Any], bool]
    ) -> Any:
        """The script on one connection to `owner`, admitted and confirmed there."""
        async with owner.client() as conn:
            if self.ack == "replica":
                await self.rule.admit(conn)
            result = await self._evalsha(conn, name, keys, args)
            if wait(result):
                await self._confirm(conn)
            return result

    async def _confirm(self, conn: Any) -> None:
        if self.ack == "aof":
            local, _ = await conn.execute_command("WAITAOF", 1, 0, ACK_TIMEOUT_MS)
            if int(local) < 1:
                raise RedisError("WAITAOF: the AOF was not fsynced in time")
        elif self.ack == "replica":
            await self.rule.confirm(conn)

    async def aclose(self) -> None:
        await self.owners.aclose()

    async def load_all(self, redis: Any) -> None:
        """Load every script (readiness: Redis answers a script, not just PING)."""
        for text in self._sources.values():
            await redis.script_load(text)
