"""Gauges read at scrape time: each campaign's ledger and current round from Redis (the
live truth, whatever worker or process changed it), and the health of the backends."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from redis.asyncio import Redis

from issuer import keys
from issuer.campaigns import Campaigns
from issuer.errors import ApiError
from issuer.model import CampaignOut

LEDGER_ACCOUNTS = ("budget", "available", "reserved", "spent", "clawback_due", "adjustments")


async def campaigns(redis: Redis, known: Campaigns) -> list[CampaignOut]:
    """Every registered campaign's definition, ledger and current round, now. The worker's
    cached definitions serve (a scrape or the ops page must not reload them: that would drop
    the cached sold-out refusals the surge relies on)."""
    now = datetime.now(UTC)
    found = []
    for campaign_id in sorted(m.decode() for m in await redis.smembers(keys.CAMPAIGNS)):
        try:
            found.append(await known.live_state(await known.cached(campaign_id), now))
        except ApiError:  # removed since the registry was read
            continue
    return found


def families(states: Iterable[CampaignOut], health: Mapping[str, Any]) -> list[Metric]:
    """Prometheus families of the campaigns' money and rounds and of backend health."""
    ledger = GaugeMetricFamily(
        "issuer_campaign_ledger_fen",
        "Campaign money by ledger account (available + reserved + spent + clawback_due"
        " = budget + adjustments)",
        labels=["campaign", "account"],
    )
    paused = GaugeMetricFamily(
        "issuer_campaign_paused", "1 while the campaign is paused", labels=["campaign"]
    )
    issued = GaugeMetricFamily(
        "issuer_round_issued", "Vouchers issued in the current round", labels=["campaign", "round"]
    )
    quota = GaugeMetricFamily(
        "issuer_round_quota", "Current round's voucher quota", labels=["campaign", "round"]
    )
    round_money = GaugeMetricFamily(
        "issuer_round_fen",
        "Current round's budget, the money it holds (reserved, spent) and what the campaign"
        " pool paid above reservations (overdrawn)",
        labels=["campaign", "round", "account"],
    )
    for state in states:
        cid = state.campaign_id
        for account in LEDGER_ACCOUNTS:
            ledger.add_metric([cid, account], getattr(state.ledger, f"{account}_fen"))
        paused.add_metric([cid], 1.0 if state.status == "paused" else 0.0)
        rnd = state.current_round
        if rnd is None:
            continue
        issued.add_metric([cid, rnd.round_id], rnd.issued)
        if rnd.quota is not None:
            quota.add_metric([cid, rnd.round_id], rnd.quota)
        if rnd.budget_fen is not None:
            round_money.add_metric([cid, rnd.round_id, "budget"], rnd.budget_fen)
        round_money.add_metric([cid, rnd.round_id, "reserved"], rnd.reserved_fen)
        round_money.add_metric([cid, rnd.round_id, "spent"], rnd.spent_fen)
        round_money.add_metric([cid, rnd.round_id, "overdrawn"], rnd.overdrawn_fen)
    up = GaugeMetricFamily(
        "issuer_backend_up", "1 if this worker reaches the backend", labels=["backend"]
    )
    for backend in ("redis", "postgres"):
        up.add_metric([backend], 1.0 if health.get(f"{backend}_ok") is True else 0.0)
    return [ledger, paused, issued, quota, round_money, up]
