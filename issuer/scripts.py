"""The Lua scripts of `lua/`, registered once per Redis client.

Each script is `lua/lib.lua` followed by the script's own file. redis-py's `Script`
object runs EVALSHA and, on NOSCRIPT (after a Redis restart or failover), loads the
script and retries, so callers never see a missing script.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from issuer import metrics

NAMES = (
    "claim_batch",
    "register",
    "campaign_put",
    "set_status",
    "round_budget",
    "merchant_put",
    "ready",
    "trim_acked",
    "spend_nonces",
    "redeem",
    "expire",
    "refund",
    "clawback_repaid",
    "mark_paid",
    "carry_over",
    "rebuild_commit",
)


def source(name: str) -> str:
    package = files("issuer.lua")
    return (
        package.joinpath("lib.lua").read_text() + "\n" + package.joinpath(f"{name}.lua").read_text()
    )


class Scripts:
    """One registered script per file; call `run(name, keys, args)`."""

    def __init__(self, redis: Redis) -> None:
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(source(name)) for name in NAMES
        }

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        started = time.perf_counter()
        try:
            return await self._scripts[name](keys=list(keys), args=list(args))
        finally:
            metrics.child(metrics.SCRIPT_SECONDS, name).observe(time.perf_counter() - started)

    async def load_all(self, redis: Redis) -> None:
        """Load every script (readiness: Redis answers a script, not just PING)."""
        for script in self._scripts.values():
            await redis.script_load(script.script)
