"""What keeps a claim cheap, where a regression would be silent: counts kept in process,
log lines written in batches, one middleware, a grid before the exact geofence test,
encoded refusals reused, the startup heap frozen."""

from __future__ import annotations

import asyncio
import gc
import inspect
import io
import logging
import os
import random
import re
import time

import msgspec
import pytest
import shapely
from aiohttp.test_utils import make_mocked_request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest

from issuer import keys, logs, metrics
from issuer.app import finish, make_app
from issuer.auth import ApiKey, Verified
from issuer.claims import SPEND_S, NonceSpender
from issuer.errors import ApiError, GateRefusal
from issuer.geofence import Region
from issuer.http import error_response
from issuer.ids import new_id
from issuer.protocol import SpendNonces
from issuer.routes import ROUTES
from issuer.routes_claims import claim
from issuer.server import settle_heap

pytestmark = pytest.mark.fast


def exposition(registry: CollectorRegistry) -> list[str]:
    """The samples, without the `_created` ones (a time, different per registry)."""
    return [x for x in generate_latest(registry).decode().splitlines() if "_created" not in x]


async def test_counts_wait_in_process_then_publish_what_direct_calls_would() -> None:
    kept, direct = CollectorRegistry(), CollectorRegistry()
    samples = [0.0002, 0.0007, 0.001, 0.0031, 0.0031, 0.1, 0.2, 9.0]  # 0.001, 0.1: bounds
    for registry in (kept, direct):
        Counter("c_total", "c", ["code"], registry=registry)
        Histogram("h_seconds", "h", ["route"], buckets=(0.001, 0.005, 0.1), registry=registry)
    kept_c = kept._names_to_collectors["c_total"].labels("OK")  # type: ignore[attr-defined]
    kept_h = kept._names_to_collectors["h_seconds"].labels("claim")  # type: ignore[attr-defined]
    for value in samples:
        metrics.count(kept_c)
        metrics.observe(kept_h, value)
        direct._names_to_collectors["c_total"].labels("OK").inc()  # type: ignore[attr-defined]
        direct._names_to_collectors["h_seconds"].labels("claim").observe(value)  # type: ignore[attr-defined]
    assert kept_c._value.get() == 0  # not one write per call
    await asyncio.sleep(metrics.PUBLISH_S * 2)  # published by the timer
    assert exposition(kept) == exposition(direct)


async def test_a_route_s_answers_publish_what_direct_calls_would() -> None:
    """Its counts by status and its latencies (a shed answer counted, not timed), as
    `inc()` and `observe()` on each would have left them."""
    route, answers = "/hot-path-test/{n}", [(409, 0.0004), (201, 0.003), (503, None)] * 3
    series = metrics.RouteSeries(route)
    for status, elapsed in answers:
        series.answered(status, elapsed)
    assert metrics.child(metrics.LATENCY, route)._sum.get() == 0  # nothing per request
    await asyncio.sleep(metrics.PUBLISH_S * 2)  # published by the timer
    direct = CollectorRegistry()
    requests = Counter("r_total", "r", ["route", "status"], registry=direct)
    buckets = metrics.LATENCY._upper_bounds  # type: ignore[attr-defined]
    latency = Histogram("l_seconds", "l", ["route"], buckets=buckets, registry=direct)
    for status, elapsed in answers:
        requests.labels(route, str(status)).inc()
        if elapsed is not None:
            latency.labels(route).observe(elapsed)
    kept = [
        x.replace("issuer_requests_", "r_").replace("issuer_request_seconds", "l_seconds")
        for x in exposition(REGISTRY)
        if f'route="{route}"' in x
    ]
    assert kept and sorted(kept) == sorted(x for x in exposition(direct) if "route=" in x)


def test_a_scrape_publishes_first() -> None:
    series = metrics.child(metrics.CLAIMS, "hot-path-test", "OK")
    before = series._value.get()
    asyncio.run(_count_then_scrape(series))
    assert series._value.get() == before + 3


async def _count_then_scrape(series: object) -> None:
    for _ in range(3):
        metrics.count(series)
    text, _ = metrics.exposition()
    assert b'issuer_claims_total{campaign="hot-path-test",code="OK"}' in text


class _Line(logs.Line):
    status: int
    n: int


async def test_request_lines_are_written_together_in_the_formatter_s_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.BytesIO()
    monkeypatch.setattr(logs, "_stream", [stream])
    head = logs.head(logging.INFO, "issuer.api", "request")
    for n in range(3):
        logs.batched(_Line(logs.timestamp(time.time()), head, 409, n))
    assert stream.getvalue() == b""  # nothing written per line
    await asyncio.sleep(logs.BATCH_S * 2)
    lines = [msgspec.json.decode(line) for line in stream.getvalue().splitlines()]
    assert [line["n"] for line in lines] == [0, 1, 2]
    record = logging.LogRecord("issuer.api", logging.INFO, "", 0, "request", None, None)
    record.status, record.n = 409, 0
    shaped = msgspec.json.decode(logs.JsonFormatter().format(record))
    assert list(lines[0]) == list(shaped) and lines[0]["level"] == "INFO"


async def test_a_request_line_keeps_its_keys_in_their_order_batched_or_not(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    request = make_mocked_request(
        "POST", "/v1/campaigns/c-1/claims", headers={"X-Request-Id": "t-1"}, match_info={}
    )
    request.match_info["campaign_id"] = "c-1"
    verified = Verified(ApiKey(id="k", secret="s", role="app"), "n", 0)
    # as the endpoint passes them: signer, request_id, a voucher's campaign, tenant
    known = (verified, "r-1", None, "t")
    fields = {
        "route": "claim",
        "method": "POST",
        "status": 409,
        "code": "NOT_OPEN",
        "request_id": "r-1",
        "campaign": "c-1",
        "key": "k",
        "key_tenants": None,
        "tenant": "t",
        "trace": "t-1",
        "latency_ms": 1.234,
    }
    series = metrics.RouteSeries("/hot-path-test/line")
    monkeypatch.setattr(time, "perf_counter", lambda: 10.001234)  # answered 1.234 ms after

    def answered() -> None:
        finish(request, error_response(ApiError("NOT_OPEN")), series, 10.0, "claim", *known)

    stream = io.BytesIO()
    monkeypatch.setattr(logs, "_stream", [stream])
    answered()
    logs.write_batch()
    line = msgspec.json.decode(stream.getvalue())
    assert list(line) == ["ts", "level", "logger", "msg", *fields]
    assert (line["level"], line["logger"], line["msg"]) == ("INFO", "issuer.api", "request")
    assert {k: line[k] for k in fields} == fields
    monkeypatch.setattr(logs, "_stream", [])  # logging not set up: an ordinary record
    with caplog.at_level(logging.INFO, "issuer.api"):
        answered()
    (record,) = caplog.records
    assert record.getMessage() == "request"
    assert {k: getattr(record, k) for k in fields} == fields


async def test_the_app_has_no_middleware() -> None:
    """aiohttp walks a second layer for an app with any middleware: each route's handler
    serves it all instead."""
    app = make_app(None, None)  # type: ignore[arg-type]
    assert not app.middlewares
    app.freeze()
    assert not app._run_middlewares


def test_the_geofence_grid_answers_most_points_and_agrees_with_the_exact_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    region = Region(["141000"])
    west, south, east, north = region._geometry.bounds
    rng = random.Random(141000)
    points = [(rng.uniform(south, north), rng.uniform(west, east)) for _ in range(5_000)]
    exact_test, exact_tests = shapely.intersects_xy, []

    def counted(geometry: object, x: float, y: float) -> bool:
        exact_tests.append((x, y))
        return bool(exact_test(geometry, x, y))

    monkeypatch.setattr(shapely, "intersects_xy", counted)
    answers = [region.contains_point(lat, lon) for lat, lon in points]
    assert len(exact_tests) < 0.2 * len(points)  # the grid answers most points
    for (lat, lon), answer in zip(points, answers, strict=True):
        assert answer == bool(exact_test(region._geometry, lon, lat))


def test_log_timestamps_format_each_second_once_and_keep_the_milliseconds() -> None:
    got = [logs.timestamp(t) for t in (0.25, 0.999, 1.0, 1.5, 86_400.0625, 0.5)]
    assert got == [
        "1970-01-01T00:00:00.250Z",
        "1970-01-01T00:00:00.999Z",
        "1970-01-01T00:00:01.000Z",
        "1970-01-01T00:00:01.500Z",
        "1970-01-02T00:00:00.062Z",
        "1970-01-01T00:00:00.500Z",
    ]


def test_a_repeated_refusal_reuses_its_encoded_body() -> None:
    first = error_response(ApiError("ROUND_QUOTA_EXHAUSTED"))
    again = error_response(ApiError("ROUND_QUOTA_EXHAUSTED"))
    assert first.body is again.body
    held = error_response(ApiError("ALREADY_CLAIMED", voucher_id="v-1"))
    assert b'"voucher_id":"v-1"' in bytes(held.body)  # type: ignore[arg-type]


def test_a_worker_settles_its_startup_heap_out_of_the_collector_s_sight() -> None:
    try:
        settle_heap()
        assert gc.get_freeze_count() > 10_000  # the modules imported here, at least
    finally:
        gc.unfreeze()


def test_ids_drawn_in_bulk_are_unique_and_a_forked_child_draws_its_own() -> None:
    """Random bytes are drawn for many ids at once (a getrandom per id was a system call
    per claim); none is given out twice, in this process or a child forked from it."""
    given = [new_id("c") for _ in range(1_000)]
    assert all(re.fullmatch(r"c\.[0-9a-f]{20}", i) for i in given)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        os.write(write, new_id("c").encode())
        os._exit(0)
    os.waitpid(child, 0)
    os.close(write)
    given += [os.read(read, 64).decode(), new_id("c")]
    os.close(read)
    assert len(set(given)) == len(given)


class _Scripts:
    """Records the nonce-spending script calls (one answer per nonce: fresh)."""

    def __init__(self) -> None:
        self.calls: list[SpendNonces] = []

    async def run(self, call: SpendNonces) -> list[int]:
        self.calls.append(call)
        return [1] * (len(call.nonces) // 2)


NOT_OPEN = ApiError("NOT_OPEN")
APP_KEY = ApiKey(id="app-1", secret="s", role="app")


def post(spender: NonceSpender, campaign_id: str, timestamp: int, nonce: str) -> None:
    """A claim refused before the gate (NOT_OPEN) with this nonce, signed at `timestamp`."""
    verified = Verified(APP_KEY, nonce, timestamp)
    assert spender.refused(campaign_id, verified, NOT_OPEN) is NOT_OPEN


async def test_refused_claims_nonces_wait_for_each_other_then_go_in_one_call() -> None:
    """A refusal's nonce is spent in the background with the others of the next SPEND_S:
    one at a time, nearly every refusal was a script call of its own."""
    scripts = _Scripts()
    spender = NonceSpender(scripts, 100)  # type: ignore[arg-type]
    for n in range(10):
        post(spender, "c1", 600, f"nonce-{n:012d}")
        await asyncio.sleep(0)  # the loop turns between refusals
    assert scripts.calls == []
    await asyncio.sleep(SPEND_S * 5)
    assert [len(c.nonces) for c in scripts.calls] == [20]  # bucket, nonce, bucket, nonce...
    post(spender, "c1", 600, "nonce-last-000000")
    await spender.flush()  # a worker stopping: at once
    assert [len(c.nonces) for c in scripts.calls] == [20, 2]
    await asyncio.sleep(SPEND_S * 2)
    assert len(scripts.calls) == 2  # and not again


async def test_a_refusal_after_the_gate_or_unavailable_spends_no_nonce() -> None:
    """The gate spent the nonce of a refusal it made; after UNAVAILABLE it may have run, or
    not: neither is spent again (a retry of UNAVAILABLE is the gate's to decide)."""
    spender = NonceSpender(_Scripts(), 100)  # type: ignore[arg-type]
    for err in (GateRefusal("ROUND_QUOTA_EXHAUSTED"), ApiError("UNAVAILABLE")):
        assert spender.refused("c1", Verified(APP_KEY, "nonce-gate-000000", 600), err) is err
    assert spender.waiting == {} and not spender.running


async def test_a_failed_spend_is_logged_and_the_other_campaigns_nonces_still_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One script call per campaign; one that fails leaves its nonces unspent, logged."""
    scripts = _Scripts()
    spender = NonceSpender(scripts, 100)  # type: ignore[arg-type]
    failing = scripts.run

    async def run(call: SpendNonces) -> list[int]:
        if "c1" in call.nonce_buckets[0]:
            raise ConnectionError("down")
        return await failing(call)

    scripts.run = run  # type: ignore[method-assign]
    post(spender, "c1", 300, "nonce-a")
    post(spender, "c2", 300, "nonce-b")  # X-Timestamps: bucket numbers when sent
    post(spender, "c1", 600, "nonce-c")
    await spender.flush()
    bucket = keys.nonce_bucket(300)
    assert [(c.first_nonce_bucket, c.nonces) for c in scripts.calls] == [
        (bucket, [300, "nonce-b"])  # the X-Timestamp: the script finds its bucket
    ]
    failed = [r for r in caplog.records if r.getMessage() == "a batch failed"]
    assert [(r.campaign_id, r.posted) for r in failed] == [("c1", 2)]  # type: ignore[attr-defined]


def test_every_handler_answers_with_a_coroutine_but_the_claim_s() -> None:
    """The endpoint tells a handler's answer from a coroutine by the coroutine's type
    (issuer/app.py): every handler is an `async def`, but the claim's, which answers its
    refusals at once and returns a coroutine for the rest."""
    for route in ROUTES:
        assert route.handler is claim or inspect.iscoroutinefunction(route.handler), route.path
