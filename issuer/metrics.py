"""Prometheus metrics. With `--workers N` every process writes to PROMETHEUS_MULTIPROC_DIR
(set by `issuer serve` before this module is imported) and /metrics aggregates them."""

from __future__ import annotations

import functools
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "issuer_requests_total", "HTTP requests by route and status", ["route", "status"]
)
LATENCY = Histogram(
    "issuer_request_seconds",
    "HTTP request latency by route",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CLAIMS = Counter("issuer_claims_total", "Claim outcomes by campaign and code", ["campaign", "code"])
REDEMPTIONS = Counter(
    "issuer_redemptions_total", "Redemption outcomes by campaign and code", ["campaign", "code"]
)
REFUNDS = Counter(
    "issuer_refunds_total", "Refund outcomes by campaign and code", ["campaign", "code"]
)
EXPIRED = Counter("issuer_vouchers_expired_total", "Vouchers expired by the sweeper", ["campaign"])
BATCH_SIZE = Histogram(
    "issuer_claim_batch_size",
    "Claims per script call",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
)
SCRIPT_SECONDS = Histogram(
    "issuer_redis_script_seconds",
    "Redis script latency",
    ["script"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
FLUSHED = Counter("issuer_flusher_entries_total", "Stream entries written to PostgreSQL")
FLUSH_LAG = Gauge(
    "issuer_flusher_lag_entries", "Stream entries not yet in PostgreSQL", multiprocess_mode="max"
)
FLUSH_LAG_SECONDS = Gauge(
    "issuer_flusher_lag_seconds", "Age of the oldest unflushed entry", multiprocess_mode="max"
)


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, cached: the hot path skips the label lookup and lock."""
    return metric.labels(*labels)


def exposition() -> tuple[bytes, str]:
    """The text format of every metric, across worker processes when there are several."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
