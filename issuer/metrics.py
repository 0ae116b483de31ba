"""Prometheus metrics. With `--workers N` every process writes to PROMETHEUS_MULTIPROC_DIR
(set by `issuer serve` before this module is imported) and /metrics aggregates them."""

from __future__ import annotations

import asyncio
import bisect
import functools
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

REQUESTS = Counter(
    "issuer_requests_total", "HTTP requests by route and status", ["route", "status"]
)
LATENCY = Histogram(
    "issuer_request_seconds",
    "HTTP request latency by route (claims shed with 503 OVERLOADED left out)",
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
SHED = Counter(
    "issuer_claims_shed_total",
    "Claims refused 503 OVERLOADED before being read, by reason (queue full, loop late)",
    ["reason"],
)
for _reason in ("queue", "lag"):  # both series exist, at 0, before the first shed
    SHED.labels(_reason)
LOOP_LAG = Histogram(
    "issuer_event_loop_lag_seconds",
    "How late a worker's event loop ran, sampled every 10 ms",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
FLUSHED = Counter("issuer_flusher_entries_total", "Stream entries written to PostgreSQL")
# Set by whichever process measured the streams last (the flusher, or the worker answering
# /readyz or /metrics, which measures first): the most recent value is the true one.
FLUSH_LAG = Gauge(
    "issuer_flusher_lag_entries",
    "Stream entries not yet in PostgreSQL",
    multiprocess_mode="livemostrecent",
)
FLUSH_LAG_BY_CAMPAIGN = Gauge(
    "issuer_flusher_campaign_lag_entries",
    'Stream entries not yet in PostgreSQL, per campaign stream (campaign "": the global one)',
    ["campaign"],
    multiprocess_mode="livemostrecent",
)
FLUSH_LAG_SECONDS = Gauge(
    "issuer_flusher_lag_seconds",
    "Age of the oldest unflushed entry",
    multiprocess_mode="livemostrecent",
)
FLUSH_BATCH_SIZE = Histogram(
    "issuer_flusher_batch_size",
    "Stream entries per PostgreSQL transaction",
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 20000),
)
EMBEDDED_UP = Gauge(
    "issuer_embedded_server_up",
    "1 while the embedded server the supervisor started is running",
    ["server"],
    multiprocess_mode="livemax",
)
PRIMARY_MISSING = Gauge(
    "issuer_redis_primary_missing",
    "1 while this worker has no primary it can use for some slot of the gate (none that a"
    " majority of the Sentinels names, unreachable, not a primary, or its cluster down)",
    multiprocess_mode="livemax",
)
ACK_UNGUARDED = Gauge(
    "issuer_durable_ack_unguarded",
    "Primaries (ISSUER_DURABLE_ACK=replica) whose settings or replicas cannot keep the"
    " promise: min-replicas-to-write below 1, or no replica that could be promoted",
    multiprocess_mode="livemax",
)
ACK_REFUSED = Counter(
    "issuer_durable_ack_refused_total",
    "Claim batches answered 503 because no replica acknowledgement could cover them, by"
    " reason (not_primary, replica_missing, wait_short)",
    ["reason"],
)
for _reason in ("not_primary", "replica_missing", "wait_short"):
    ACK_REFUSED.labels(_reason)
WORKERS = Gauge("issuer_workers", "HTTP worker processes running", multiprocess_mode="livemax")
KEYS_RELOAD_ERRORS = Counter(
    "issuer_keys_reload_errors_total",
    "Keys file reads that failed, leaving the old keys in force (each worker counts its own)",
)


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, cached: the hot path skips the label lookup and lock."""
    return metric.labels(*labels)


class RouteSeries:
    """A route's request counts by status and its latency. Each answer timed is one append
    of its latency to its status's list, counted and observed by the next publish: no
    child, histogram bucket or float sum touched per request. Its series are made when
    first published (a series made is exposed, at 0, from then on)."""

    def __init__(self, route: str) -> None:
        self.route = route
        self._answers: dict[int, list[float]] = {}

    def answered(self, status: int, elapsed: float | None) -> None:
        """Count an answer with `status` and observe its latency (None: not observed)."""
        if elapsed is None:  # a claim shed: counted, not timed
            count(child(REQUESTS, self.route, str(status)))
            return
        answers = self._answers.get(status)
        if answers is None:
            answers = self._answers[status] = []
            _answered.append((self.route, str(status), answers))
        answers.append(elapsed)
        if not _publishing:
            _schedule()


PUBLISH_S = 0.1  # longest time a count made in one worker waits to reach the others' scrape
_counts: dict[Any, float] = {}  # child -> amount not yet added
_observed: dict[Any, list[float]] = {}  # histogram child -> values not yet observed
_answered: list[tuple[str, str, list[float]]] = []  # every RouteSeries's lists
_publishing: list[asyncio.TimerHandle] = []  # the pending publish, if one is due


def count(series: Any, amount: float = 1) -> None:
    """`series.inc(amount)`, kept in this process until the next publish: with several
    workers every inc() writes a shared file under a lock, a cost paid per request."""
    _counts[series] = _counts.get(series, 0) + amount
    if not _publishing:
        _schedule()


def observe(series: Any, value: float) -> None:
    """`series.observe(value)` of a histogram child, kept until the next publish."""
    values = _observed.get(series)
    if values is None:
        values = _observed[series] = []
    values.append(value)
    if not _publishing:
        _schedule()


def _schedule() -> None:
    try:
        _publishing.append(asyncio.get_running_loop().call_later(PUBLISH_S, publish))
    except RuntimeError:  # no event loop (a command, a test): publish at once
        publish()


def publish() -> None:
    """Add what this process counted and observed to the Prometheus values."""
    for handle in _publishing:
        handle.cancel()
    _publishing.clear()
    for route, status, answers in _answered:
        if answers:
            child(REQUESTS, route, status).inc(len(answers))
            _observe_all(child(LATENCY, route), answers)
            answers.clear()
    for series, amount in _counts.items():
        series.inc(amount)
    _counts.clear()
    for series, values in _observed.items():
        _observe_all(series, values)
    _observed.clear()


def _observe_all(series: Any, values: list[float]) -> None:
    """`series.observe(value)` for each of `values`, adding to a histogram's buckets and
    sum (prometheus_client's own private values, the ones observe() adds to: per-bucket
    counts, summed into `le` buckets at collection) once each. The values sorted, each
    bucket's count is found by bisection: no Python step per value."""
    ordered = sorted(values)
    below = 0  # the values in the buckets before
    for bucket, bound in zip(series._buckets, series._upper_bounds, strict=True):
        upto = bisect.bisect_right(ordered, bound)
        if upto > below:
            bucket.inc(upto - below)
            below = upto
    series._sum.inc(sum(values))


class _Fixed(Collector):
    """Families computed by the caller for one scrape."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def exposition(extra: Iterable[Metric] = ()) -> tuple[bytes, str]:
    """The text format of every metric, across worker processes when there are several,
    followed by `extra` (gauges read at scrape time)."""
    publish()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        text = generate_latest(registry)
    else:
        text = generate_latest()
    scraped = CollectorRegistry()
    scraped.register(_Fixed(extra))
    return text + generate_latest(scraped), CONTENT_TYPE_LATEST


def claim_counts() -> dict[str, dict[str, int]]:
    """Claims so far by campaign and outcome code, summed over every worker process."""
    publish()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    counts: dict[str, dict[str, int]] = {}
    for family in registry.collect():
        if family.name != "issuer_claims":
            continue
        for sample in family.samples:
            if sample.name == "issuer_claims_total":
                by_code = counts.setdefault(sample.labels["campaign"], {})
                code = sample.labels["code"]
                by_code[code] = by_code.get(code, 0) + int(sample.value)
    return counts


def process_gone(pid: int) -> None:
    """Drop a dead process's live gauges (multiprocess mode)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
