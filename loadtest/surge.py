"""`make surge`: rehearse a 10:00 opening on this machine, then prove nothing was over-issued.

Starts `issuer serve` (2 workers) on the embedded servers (or REDIS_URL / DATABASE_URL),
creates a campaign whose round opens a few seconds later, one that opens in an hour and
a merchant, runs the Locust surge, abuse and mixed (winners pay, some refund) scenarios
headless for a bounded time, and lets Locust's quitting hook run the verifier. Then, since
Locust saturates before the service on one machine, it brings a crowd above capacity with
the closed-loop generator of `bench.overload` (`--overload`): served latency with and
without shedding. Writes to `--out` (default loadtest/out): Locust's HTML report and CSVs,
`surge.png` (requests/s, outcomes, served p50/p99 over time), `summary.md`, `verify.txt`.
Exit code: Locust's (non-zero on any failure or failed invariant).

`--allocation lottery`: the surge round is a lottery (issue 15) committed to a random seed,
whose application window is the run (`--seconds`): the crowd applies at moments spread
over it (202 APPLIED) instead of in one second. After the window the harness reveals the
seed (`POST .../rounds/r1/draw`), fetches the draw document (`draw.json`), checks it with
`issuer verify-draw`, reads every application a client was told about
(`applications.json`) and runs the verifier with them; the chart shows applications/s."""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import cpu, overload, scrape
from bench.procs import ROOT, Service, stop
from issuer import embedded
from issuer.auth import load_keys
from issuer.client import Client
from loadtest import Row
from tests.people import campaign, iso

OUT = ROOT / "loadtest" / "out"
LEAD_S = 4.0  # Locust starts this long before the round opens
DRAW_AFTER_S = 2.0  # lottery: the draw is due this long after applications close
READ_CONCURRENCY = 32  # lottery: applications read at once after the draw


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtest.surge", description=__doc__)
    parser.add_argument("--users", type=int, default=2000, help="surge users (one claim each)")
    parser.add_argument("--seconds", type=float, default=60, help="whole Locust run")
    parser.add_argument("--ramp", type=float, default=3, help="seconds to reach --users")
    parser.add_argument("--quota", type=int, default=500, help="vouchers in the round")
    parser.add_argument("--processes", type=int, default=1, help="Locust processes")
    parser.add_argument("--workers", type=int, default=2, help="issuer worker processes")
    parser.add_argument(
        "--queue-max",
        type=int,
        help="ISSUER_CLAIM_QUEUE_MAX of the service: claims a worker lets wait before it"
        " sheds with 503 OVERLOADED",
    )
    parser.add_argument(
        "--shed-lag-ms",
        type=int,
        help="ISSUER_SHED_LAG_MS of the service: how late a worker's event loop may run"
        " before it sheds",
    )
    parser.add_argument(
        "--service-nice",
        type=int,
        default=0,
        help="run the service at this lower CPU priority (1-19), so that on one machine"
        " Locust outruns it: a crowd above the service's capacity",
    )
    parser.add_argument(
        "--overload",
        default="2048,8192",
        help="then, connection counts of closed-loop claims above capacity, against a"
        " service that never sheds and one that does (bench.overload); none: skip",
    )
    parser.add_argument(
        "--overload-seconds", type=float, default=8, help="measured per row (after as long / 2)"
    )
    parser.add_argument(
        "--no-mixed", dest="mixed", action="store_false", help="winners do not pay or refund"
    )
    parser.add_argument(
        "--allocation",
        default="first_come",
        choices=("first_come", "lottery"),
        help="lottery: the crowd applies over --seconds, then the round is drawn and checked",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


class Lottery:
    """The lottery round of a surge: a random seed committed to at campaign creation,
    applications from the opening for `window_s`, the draw DRAW_AFTER_S later."""

    def __init__(self, opens_at: float, window_s: float) -> None:
        self.seed = secrets.token_hex(32)
        self.commitment = hashlib.sha256(bytes.fromhex(self.seed)).hexdigest()
        self.close_at = opens_at + window_s
        self.draws_at = self.close_at + DRAW_AFTER_S

    def round_fields(self) -> dict[str, str]:
        return {
            "allocation": "lottery",
            "applications_close_at": iso(datetime.fromtimestamp(self.close_at, UTC)),
            "draws_at": iso(datetime.fromtimestamp(self.draws_at, UTC)),
            "commitment": self.commitment,
        }


class Servers:
    """Embedded Valkey and PostgreSQL in a temp dir, unless the URLs are set."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="issuer-surge-"))
        self.dir.chmod(0o755)  # postgres runs as its own user when we are root
        self.started: list[embedded.EmbeddedServer] = []
        self.redis_url = os.environ.get("REDIS_URL") or self._start(embedded.start_redis)
        self.database_url = os.environ.get("DATABASE_URL") or self._start(embedded.start_postgres)

    def _start(self, start: Any) -> str:
        server: embedded.EmbeddedServer = start(self.dir)
        self.started.append(server)
        return server.url

    def stop(self) -> None:
        for server in reversed(self.started):
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


async def create_campaigns(
    service: Service, keys_file: Path, quota: int, opens_at: float, lottery: Lottery | None = None
) -> tuple[str, str, str]:
    """The surge campaign (opens at `opens_at`; a lottery round if `lottery`), one that
    opens in an hour, and the merchant where the winners pay (mixed)."""
    ops = next(k for k in load_keys(keys_file).values() if k.role == "ops")
    stamp = time.strftime("%H%M%S")
    surge_id, future_id, merchant_id = f"surge-{stamp}", f"future-{stamp}", f"shop-{stamp}"
    async with aiohttp.ClientSession() as session:
        client = Client(service.url, ops, session)
        shop = {"name": "乡宁家电城", "county_code": "141029", "categories": ["appliance"]}
        resp = await client.call("PUT", f"/v1/merchants/{merchant_id}", shop)
        if resp.status != 201:
            raise RuntimeError(f"merchant {merchant_id}: {resp.status} {resp.body}")
        for campaign_id, opens_in in ((surge_id, opens_at - time.time()), (future_id, 3600)):
            body = campaign(quota=quota, opens_in_s=opens_in, open_for_s=3600)
            if lottery is not None and campaign_id == surge_id:
                body["rounds"][0] |= lottery.round_fields()
            resp = await client.call("PUT", f"/v1/campaigns/{campaign_id}", body)
            if resp.status != 201:
                raise RuntimeError(f"campaign {campaign_id}: {resp.status} {resp.body}")
    return surge_id, future_id, merchant_id


async def round_state(service: Service, keys_file: Path, campaign_id: str) -> dict[str, Any]:
    ops = next(k for k in load_keys(keys_file).values() if k.role == "ops")
    async with aiohttp.ClientSession() as session:
        resp = await Client(service.url, ops, session).call("GET", f"/v1/campaigns/{campaign_id}")
    state: dict[str, Any] = resp.body.get("current_round") or {}
    return state


def locust_command(
    args: argparse.Namespace,
    url: str,
    keys_file: Path,
    ids: tuple[str, str, str],
    opens_at: float,
    lottery: Lottery | None = None,
) -> list[str]:
    out = args.out
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py")]
    cmd += ["--headless", "--only-summary", "--loglevel", "WARNING", "--host", url]
    # at the end, users finish the request in hand (SurgeShape)
    cmd += ["--stop-timeout", "20"]
    cmd += ["--csv", str(out / "locust"), "--html", str(out / "report.html")]
    cmd += ["--keys-file", str(keys_file), "--campaign", ids[0], "--future-campaign", ids[1]]
    if args.mixed and lottery is None:
        cmd += ["--merchant", ids[2]]
    cmd += ["--opens-at", f"{opens_at:.3f}", "--surge-users", str(args.users)]
    cmd += [
        "--ramp-s",
        str(args.ramp),
        "--surge-s",
        str(locust_seconds(args)),
        "--out-dir",
        str(out),
    ]
    if lottery is not None:  # the harness verifies once it has drawn
        cmd += ["--allocation", "lottery", "--applications-close-at", f"{lottery.close_at:.3f}"]
        cmd += ["--verify", "false"]
    if args.processes > 1:
        cmd += ["--processes", str(args.processes)]
    return cmd


def locust_seconds(args: argparse.Namespace) -> float:
    """The whole Locust run: --seconds, or in a lottery the lead, the window and a second."""
    if args.allocation == "lottery":
        return LEAD_S + 2 + float(args.seconds) + 1
    return float(args.seconds)


def applied_ids(out: Path) -> list[str]:
    """Every application id a Locust process was told about (applied-*.ids)."""
    found = {line for f in out.glob("applied-*.ids") for line in f.read_text().split()}
    return sorted(found)


async def draw_round(
    service: Service, keys_file: Path, campaign_id: str, lottery: Lottery, applied: list[str]
) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """At draws_at: reveal the seed, fetch the draw document, read every application a
    client was told about; returns the draw's answer (with draw_s, how long it took), the
    document and the applications as read."""
    found = load_keys(keys_file).values()
    ops = next(k for k in found if k.role == "ops")
    app = next(k for k in found if k.role == "app")
    await asyncio.sleep(max(0.0, lottery.draws_at - time.time()) + 0.2)
    path = f"/v1/campaigns/{campaign_id}/rounds/r1/draw"
    reveal = {"request_id": f"draw-{campaign_id}", "seed": lottery.seed}
    async with aiohttp.ClientSession() as session:
        ops_client = Client(service.url, ops, session)
        app_client = Client(service.url, app, session)
        started = time.monotonic()
        done = await ops_client.call("POST", path, reveal)
        took = time.monotonic() - started
        if done.status != 200:
            raise RuntimeError(f"draw of {campaign_id}: {done.status} {done.body}")
        doc = (await ops_client.call("GET", path)).body
        gate = asyncio.Semaphore(READ_CONCURRENCY)

        async def read(application_id: str) -> Any:
            async with gate:
                return (await app_client.call("GET", f"/v1/applications/{application_id}")).body

        reads = await asyncio.gather(*(read(a) for a in applied))
    return {**done.body, "draw_s": took}, doc, list(reads)


def check_draw(
    env: dict[str, str], campaign_id: str, out: Path, doc: dict[str, Any], reads: list[Any]
) -> tuple[int, str]:
    """Writes draw.json and applications.json, runs `issuer verify-draw` on the published
    document, then the verifier with the draw; writes verify.txt; returns (0 if both pass,
    their output)."""
    draw_path, reads_path = out / "draw.json", out / "applications.json"
    draw_path.write_text(json.dumps(doc, ensure_ascii=False) + "\n")
    reads_path.write_text(json.dumps(reads, ensure_ascii=False) + "\n")
    cli = [sys.executable, "-m", "issuer.cli", "verify-draw", str(draw_path)]
    offline = subprocess.run(
        cli, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}
    )
    verdict = "PASS" if offline.returncode == 0 else "FAIL"
    text = f"{verdict} issuer verify-draw {draw_path.name}: exit {offline.returncode}"
    text += "".join(f"; {line}" for line in (offline.stdout + offline.stderr).splitlines()[:3])
    cmd = [sys.executable, "-m", "loadtest.verify", "--campaign", campaign_id, "--told", str(out)]
    cmd += ["--draw", str(draw_path), "--applications", str(reads_path)]
    checked = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}
    )
    text += "\n" + checked.stdout + checked.stderr
    (out / "verify.txt").write_text(text)
    return (offline.returncode or checked.returncode), text


def read_rows(out: Path) -> list[Row]:
    rows: list[Row] = []
    for path in sorted(out.glob("requests-*.csv")):
        with path.open() as fh:
            for t, name, code, ms, ok in csv.reader(fh):
                rows.append((float(t), name, code, float(ms), ok == "True"))
    return rows


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def service_latency(service: Service) -> dict[str, float]:
    """Upper bounds (ms) of the claim route's p50 and p99 as the service measured them
    (from its middleware on: without the load generator's queue), and of its event loops'
    lag p99 (how long a request could wait to be read)."""
    claims, lag = await scrape.claim_histograms(service.url)
    return {
        "p50": scrape.quantile_ms(claims, 0.5),
        "p99": scrape.quantile_ms(claims, 0.99),
        "lag p99": scrape.quantile_ms(lag, 0.99),
    }


def locust_failures(out: Path) -> int:
    with (out / "locust_stats.csv").open() as fh:
        return sum(int(r["Failure Count"]) for r in csv.DictReader(fh) if r["Name"] != "Aggregated")


def summary(
    rows: list[Row],
    failures: int,
    issued: int,
    quota: int,
    verify_text: str,
    inside: dict[str, float],
    drawn: dict[str, Any] | None = None,
) -> str:
    claims = [r for r in rows if r[1] == "surge claim"]
    per_second = Counter(int(r[0]) for r in rows)
    latencies = [r[3] for r in claims if r[2] != "OVERLOADED"]  # served, not shed
    shed = [r[3] for r in claims if r[2] == "OVERLOADED"]
    outcomes = Counter(r[2] for r in rows)
    verdicts = [line for line in verify_text.splitlines() if line.startswith(("PASS", "FAIL"))]
    lines = [
        "| figure | value |",
        "| --- | ---: |",
        f"| requests | {len(rows):,} |",
        f"| surge claims | {len(claims):,} |",
        f"| requests/s at peak (1 s) | {max(per_second.values(), default=0):,} |",
        f"| issued / quota | {issued:,} / {quota:,} |",
        f"| surge claim p50 / p95 / p99 ms (served) | {percentile(latencies, 0.5):.1f} /"
        f" {percentile(latencies, 0.95):.1f} / {percentile(latencies, 0.99):.1f} |",
        f"| shed (503 OVERLOADED): answers, p99 ms | {len(shed):,}, {percentile(shed, 0.99):.1f} |",
        f"| claim p50 / p99 ms inside the service (≤ bucket) | {inside['p50']:g} /"
        f" {inside['p99']:g} |",
        f"| event loop lag p99 ms (≤ bucket) | {inside['lag p99']:g} |",
        f"| failures (Locust) | {failures:,} |",
    ]
    if drawn is not None:  # a lottery: the applications, their rate and the draw
        applied = Counter(int(r[0]) for r in rows if r[2] == "APPLIED")
        lines += [
            f"| applications (202 APPLIED) | {sum(applied.values()):,} |",
            f"| applications/s at peak (1 s) | {max(applied.values(), default=0):,} |",
            f"| drawn: winners / applications | {drawn['winners']:,} / {drawn['applications']:,} |",
            f"| draw call s | {drawn['draw_s']:.2f} |",
            f"| applications_root | `{drawn['applications_root']}` |",
        ]
    lines += [
        "",
        "| outcome | count |",
        "| --- | ---: |",
        *(f"| {code} | {n:,} |" for code, n in outcomes.most_common()),
        "",
        "Invariants:",
        "",
        *(f"- {line}" for line in verdicts or ["FAIL verifier did not run"]),
    ]
    return "\n".join(lines)


def chart(rows: list[Row], opens_at: float, path: Path, lottery: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_second: dict[int, list[Row]] = defaultdict(list)
    for row in rows:
        by_second[math.floor(row[0] - opens_at)].append(row)
    seconds = sorted(by_second)
    codes = [c for c, _ in Counter(r[2] for r in rows).most_common()]
    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    top.plot(seconds, [len(by_second[s]) for s in seconds], label="requests/s")
    if lottery:
        applied = [sum(1 for r in by_second[s] if r[2] == "APPLIED") for s in seconds]
        top.plot(seconds, applied, label="applications/s (202 APPLIED)")
        top.legend(fontsize="small", loc="upper right")
    top.set_ylabel("requests/s")
    bottom = [0] * len(seconds)
    for code in codes:
        counts = [sum(1 for r in by_second[s] if r[2] == code) for s in seconds]
        mid.bar(seconds, counts, bottom=bottom, label=code, width=1.0)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    mid.set_ylabel("answers/s by outcome")
    mid.legend(fontsize="small", ncol=3, loc="upper right")
    served = {
        s: [r[3] for r in by_second[s] if r[1] == "surge claim" and r[2] != "OVERLOADED"]
        for s in seconds
    }
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        low.plot(seconds, [percentile(served[s], q) for s in seconds], label=label)
    low.set_ylabel("served surge claims, ms")
    low.set_xlabel(
        "seconds since applications opened" if lottery else "seconds since the round opened"
    )
    low.legend()
    for axis in (top, mid, low):
        axis.axvline(0, color="grey", linestyle=":")
    fig.suptitle("issuer lottery rehearsal: applications" if lottery else "issuer surge rehearsal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class CpuWatch:
    """The busiest second of a process tree (Locust: its master and workers)."""

    def __init__(self, pid: int) -> None:
        self.groups: cpu.Groups = {"locust": lambda: cpu.tree(pid)}
        self.samples = 0
        self.peak_cores = 0.0
        self._last = (time.monotonic(), cpu.snapshot(self.groups))

    def sample(self) -> None:
        now, snapshot = time.monotonic(), cpu.snapshot(self.groups)
        then, before = self._last
        if now > then:
            used = cpu.cores(before, snapshot, now - then)["locust"]
            self.peak_cores = max(self.peak_cores, used)
        self._last = (now, snapshot)
        self.samples += 1

    def verdict(self, processes: int) -> str:
        line = f"Locust at its busiest: {self.peak_cores:.2f} cores for {processes} process(es)."
        if self.peak_cores >= 0.9 * processes:
            line += (
                " It was saturated: the client-side latencies above include its own queue;"
                " the service's own figures are the lines measured inside the service."
            )
        return line


def above_capacity(args: argparse.Namespace, servers: Servers) -> str:
    """The crowd Locust cannot bring on one machine: closed-loop claims from a generator
    that outruns the service, against a service that never sheds and one that does."""
    connections = tuple(int(c) for c in args.overload.split(","))
    print(
        f"\nabove capacity: {', '.join(f'{c:,}' for c in connections)} connections of"
        " closed-loop claims (bench.overload), never shedding vs shedding",
        flush=True,
    )
    seconds = args.overload_seconds
    crowd = overload.Crowd(
        connections,
        workers=args.workers,
        seconds=seconds,
        warmup=seconds / 2,
        queue_max=args.queue_max,
        lag_ms=args.shed_lag_ms,
    )
    lines = []
    for line in overload.compare(servers.redis_url, servers.database_url, servers.dir, crowd):
        print(line, flush=True)
        lines.append(line)
    return "Above capacity (`bench.overload`, served = answered below 500):\n\n" + "\n".join(lines)


def prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    patterns = ("told-*.txt", "requests-*.csv", "locust*.csv", "verify.txt", "applied-*.ids")
    for pattern in (*patterns, "draw.json", "applications.json"):
        for old in out.glob(pattern):
            old.unlink()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    prepare(args.out)
    servers = Servers()
    service: Service | None = None
    try:
        env = {"REDIS_URL": servers.redis_url, "DATABASE_URL": servers.database_url}
        data_dir = servers.dir / "issuer"
        log = servers.dir / "service.log"
        service_env = {**env, "ISSUER_DATA_DIR": str(data_dir)}
        service_env |= overload.shedding_env(args.queue_max, args.shed_lag_ms)
        service = Service(args.workers, service_env, log, nice=args.service_nice)
        keys_file = data_dir / "keys.toml"
        opens_at = time.time() + LEAD_S + 2
        lottery = Lottery(opens_at, args.seconds) if args.allocation == "lottery" else None
        ids = asyncio.run(create_campaigns(service, keys_file, args.quota, opens_at, lottery))
        print(
            f"service {service.url}; campaign {ids[0]} opens in {opens_at - time.time():.0f} s"
            f" with {args.quota} vouchers; {args.users} users for {args.seconds:.0f} s",
            flush=True,
        )
        if lottery is not None:
            print(
                f"a lottery: applications for {args.seconds:.0f} s, drawn"
                f" {DRAW_AFTER_S:g} s later; commitment {lottery.commitment}",
                flush=True,
            )
        cmd = locust_command(args, service.url, keys_file, ids, opens_at, lottery)
        locust = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=ROOT, text=True)
        deadline = time.time() + locust_seconds(args) + 120
        locust_cpu = CpuWatch(locust.pid)
        while locust.poll() is None:
            if time.time() > deadline:
                stop(locust)
                raise RuntimeError("Locust did not stop in time")
            time.sleep(1)
            locust_cpu.sample()
            if locust_cpu.samples % 5:
                continue
            state = asyncio.run(round_state(service, keys_file, ids[0]))
            print(
                f"  {time.time() - opens_at:+.0f} s: issued {state.get('issued', 0)}"
                f" of {args.quota}",
                flush=True,
            )
        rows = read_rows(args.out)
        drawn: dict[str, Any] | None = None
        returncode = locust.returncode
        if lottery is not None:
            applied = applied_ids(args.out)
            print(f"drawing {len(applied):,} applications told to clients ...", flush=True)
            drawn, doc, reads = asyncio.run(
                draw_round(service, keys_file, ids[0], lottery, applied)
            )
            checked, text = check_draw(env, ids[0], args.out, doc, reads)
            print(text, flush=True)
            returncode = returncode or checked
        issued = int(asyncio.run(round_state(service, keys_file, ids[0])).get("issued", 0))
        verify_path = args.out / "verify.txt"
        verify_text = verify_path.read_text() if verify_path.exists() else ""
        inside = asyncio.run(service_latency(service))
        failures = locust_failures(args.out)
        table = summary(rows, failures, issued, args.quota, verify_text, inside, drawn)
        table += "\n\n" + locust_cpu.verdict(args.processes)
        chart(rows, opens_at, args.out / "surge.png", lottery is not None)
        print("\n" + table, flush=True)
        if args.overload != "none":
            service.stop()
            service = None
            table += "\n\n" + above_capacity(args, servers)
        (args.out / "summary.md").write_text(table + "\n")
        print(f"\nwrote {args.out}/ (report.html, surge.png, summary.md)")
        return returncode
    finally:
        if service is not None:
            service.stop()
        servers.stop()


if __name__ == "__main__":
    sys.exit(main())
