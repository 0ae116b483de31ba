"""Quantiles of the issuer's own latency histograms, read from its /metrics text."""

from __future__ import annotations

import math

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Buckets = dict[float, float]  # upper bound (s) -> cumulative count
CLAIM_ROUTE = "/v1/campaigns/{campaign_id}/claims"
TIMEOUT = aiohttp.ClientTimeout(total=10)


async def claim_histograms(url: str) -> tuple[Buckets, Buckets]:
    """The claim route's latency (served claims) and the event-loop lag histograms of the
    service at `url`, so far."""
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.get(url + "/metrics") as resp,
    ):
        text = await resp.text()
    return (
        buckets(text, "issuer_request_seconds", route=CLAIM_ROUTE),
        buckets(text, "issuer_event_loop_lag_seconds"),
    )


def buckets(text: str, name: str, **labels: str) -> Buckets:
    """The cumulative buckets of histogram `name` whose samples carry `labels`."""
    found: Buckets = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != f"{name}_bucket":
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                le = float(sample.labels["le"])
                found[le] = found.get(le, 0.0) + sample.value
    return found


def since(after: Buckets, before: Buckets) -> Buckets:
    """What was observed between two scrapes."""
    return {le: n - before.get(le, 0.0) for le, n in after.items()}


def quantile_ms(counts: Buckets, q: float) -> float:
    """The upper bound (ms) of the bucket holding quantile `q`; 0 if nothing was observed,
    inf if it lies above the last finite bucket."""
    ordered = sorted(counts.items())
    total = ordered[-1][1] if ordered else 0.0
    if not total:
        return 0.0
    return next((le * 1000 for le, n in ordered if n >= q * total), math.inf)
