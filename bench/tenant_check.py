"""What the tenant check adds to a claim, per request, in one process: `tenancy.admit` on
the claim route's rule with the campaign cached in the worker (its dictionary look-up),
for a platform-wide key and for a scoped one, against the empty call it replaces.
`python -m bench.tenant_check [--number N]`; no server is started."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import warnings
from typing import Any, cast

from aiohttp.test_utils import make_mocked_request
from aiohttp.web_exceptions import NotAppKeyWarning

from issuer import tenancy
from issuer.auth import ApiKey, Verified
from issuer.routes import ROUTES
from issuer.routes_claims import claim


class Cached:
    tenant = "xiangning"


class Campaigns:
    """The worker's cache, hit (as it is for every claim but a campaign's first)."""

    cached = Cached()

    def peek(self, campaign_id: str) -> Cached:
        return self.cached


async def per_call_ns(key: ApiKey | None, number: int) -> float:
    """Nanoseconds per check (None: the bare coroutine call that carries it)."""
    rule = next(r for r in ROUTES if r.handler is claim).tenant
    owners = tenancy.Owners(cast(Any, None), cast(Any, Campaigns()), None)
    request = make_mocked_request(
        "POST", "/v1/campaigns/demo/claims", match_info={"campaign_id": "demo"}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAppKeyWarning)  # the app's str keys, once
        signer = key or ApiKey(id="k", secret="s", role="app")
        request["verified"] = Verified(signer, "n", 0)

    async def bare(
        owners: tenancy.Owners, rule: tenancy.Rule, request: Any, body: Any, key: ApiKey
    ) -> tuple[Any, str | None]:
        return body, None

    check = bare if key is None else tenancy.admit
    started = time.perf_counter_ns()
    for _ in range(number):
        await check(owners, rule, request, None, signer)
    return (time.perf_counter_ns() - started) / number


async def main(number: int, repeat: int) -> None:
    keys = {
        "bare coroutine call (no check)": None,
        "platform-wide key": ApiKey(id="p", secret="s", role="app"),
        "scoped key (its tenant)": ApiKey(
            id="s", secret="s", role="app", tenants=frozenset({"xiangning"})
        ),
    }
    for label, key in keys.items():
        runs = [await per_call_ns(key, number) for _ in range(repeat)]
        print(f"{label:32} median {statistics.median(runs):7.0f} ns  min {min(runs):7.0f} ns")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.number, args.repeat))
