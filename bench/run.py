"""`make bench`: req/s and p50/p99 latency of (a) an empty aiohttp+uvloop handler, (h) the
floor of a refusal (a bare handler doing only a refused claim's essential work), (b) our
claim endpoint while the round has quota, (p) an application to a lottery round (202
applied), (c) our claim endpoint after sell-out, (g) our claim endpoint before the round
opens, (d) a naive claim-as-PostgreSQL-transaction app, (e) our redemption endpoint and (f)
claims answered only once Redis fsynced them (ISSUER_DURABLE_ACK=aof) and (r) once a replica
has them (ISSUER_DURABLE_ACK=replica), all with the same number of server workers, run
interleaved for R repetitions; then the instructions per request of some of them, counted
by callgrind (bench/profile.py); prints medians, the throughput ratios and the CPU
and instructions per request of each part against their targets."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench import cpu, profile, report
from bench.loadgen import Clients, Merged, Target
from bench.procs import Service, Workers, clean_env
from bench.signing import FIRST_N, Plan, build
from bench.stack import (
    EMPTY,
    LOTTERY,
    MERCHANT,
    NAIVE,
    NOT_YET,
    OPEN,
    REDEEM,
    SOLD_OUT,
    Stack,
    fs_type,
)
from issuer.server import reuseport_socket

OUT = Path(__file__).resolve().parent / "out" / "results.json"
HEADROOM = 1.4  # requests built per run: this times the last rate seen, times the run's length
IDLE_S = 3.0  # how long Valkey's CPU is read with no load, before the first run
CYCLED = 2_000  # distinct requests per client process for the empty handler, sent in turn


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    campaign: str
    expect: int  # the status every response should have
    guess: float  # req/s assumed before the first run, to size the requests built
    cycle: bool = False
    redeem: bool = False  # payments with vouchers issued just before the run


SCENARIOS = (
    Scenario("a", "empty aiohttp+uvloop handler", EMPTY, 200, 0, cycle=True),
    Scenario(
        "h", "floor: a refusal's essential work in a bare handler", SOLD_OUT, 409, 0, cycle=True
    ),
    Scenario("b", "claim, round open (201 issued)", OPEN, 201, 8_000),
    Scenario("p", "apply to a lottery round (202 applied)", LOTTERY, 202, 8_000),
    Scenario("c", "claim after sell-out (409)", SOLD_OUT, 409, 15_000),
    Scenario("g", "claim before the opening (409 NOT_OPEN)", NOT_YET, 409, 15_000),
    Scenario("d", "naive: claim as a PostgreSQL transaction", NAIVE, 201, 3_000),
    Scenario("e", "redemption (201 redeemed)", REDEEM, 201, 3_000, redeem=True),
    Scenario("f", "claim, durable ack (WAITAOF per batch)", OPEN, 201, 6_000),
    Scenario("r", "claim, replica ack (WAIT 1 per batch)", OPEN, 201, 6_000),
)


def run_arguments(parser: argparse.ArgumentParser, seconds: float) -> None:
    """The arguments every bench takes: workers, run length, repetitions, connections."""
    parser.add_argument("--workers", type=int, default=2, help="server processes per service")
    parser.add_argument("--seconds", type=float, default=seconds, help="measured s per run")
    parser.add_argument("--warmup", type=float, default=1, help="unmeasured seconds first")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--connections", type=int, default=128, help="in total")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    run_arguments(parser, seconds=8)
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--naive-pool", type=int, default=2, help="PG connections per naive worker (2 was fastest)"
    )
    parser.add_argument("--scenarios", default="ahbpcgdefr", help="which of a … h, p, r to run")
    parser.add_argument(
        "--instructions",
        default="ahbcge",
        help="which scenarios to count in instructions with callgrind afterwards ('' for none)",
    )
    parser.add_argument(
        "--count-requests", type=int, default=profile.REQUESTS, help="per counted round"
    )
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="count with callgrind's cache and branch simulation too: misses, mispredicts"
        " and estimated cycles per request beside the instructions (slower)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir for a look")
    parser.add_argument(
        "--profile", type=Path, help="write a py-spy flame graph per scenario (rep 1) here"
    )
    args = parser.parse_args(argv)
    if args.connections < args.clients:
        parser.error("--connections must be at least --clients")
    return args


def metric(text: str, name: str) -> float:
    """Sum of every sample of `name` (any labels) in a Prometheus exposition."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


Commands = dict[str, tuple[float, float]]  # command -> (calls, µs)


def subtract(after: Commands, before: Commands) -> Commands:
    """What each command added between two INFO commandstats readings (those that ran)."""
    out = {}
    for name, (calls, usec) in after.items():
        calls_then, usec_then = before.get(name, (0.0, 0.0))
        if calls > calls_then:
            out[name] = (calls - calls_then, usec - usec_then)
    return out


def server_figures(before: str, after: str, measured: int) -> dict[str, float]:
    """Batching seen by the issuer's /metrics over the measured window."""

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    batches = delta("issuer_claim_batch_size_count")
    claims = delta("issuer_claim_batch_size_sum")
    scripts = delta("issuer_redis_script_seconds_count")
    return {
        "batches": batches,
        "claims_to_redis": claims,
        "mean_batch": claims / batches if batches else 0.0,
        "mean_script_ms": delta("issuer_redis_script_seconds_sum") / scripts * 1000
        if scripts
        else 0.0,
        "measured": measured,
    }


class Bench:
    def __init__(self, args: argparse.Namespace, stack: Stack, clients: Clients) -> None:
        self.args = args
        self.stack = stack
        self.clients = clients
        self.next_n = FIRST_N
        self.rate_seen: dict[str, float] = {}
        self.groups = {**stack.groups(clients.pids), "bench": lambda: [os.getpid()]}

    def baseline(self, s: Scenario) -> Workers | None:
        """The baseline workers that answer scenario `s`, if it is one's."""
        st = self.stack
        return {"a": st.empty, "h": st.floor, "d": st.naive}.get(s.key)

    def service(self, s: Scenario) -> Service:
        """The `issuer serve` that answers scenario `s` (not a baseline's)."""
        st = self.stack
        assert st.service and st.durable and st.replicated
        return {"f": st.durable, "r": st.replicated}.get(s.key, st.service)

    def port(self, s: Scenario) -> int:
        baseline = self.baseline(s)
        return baseline.port if baseline is not None else self.service(s).port

    def worker_pid(self, s: Scenario) -> int:
        """One server worker of the service that answers scenario `s` (to profile it)."""
        baseline = self.baseline(s)
        if baseline is not None:
            return baseline.pids[0]
        return cpu.children(self.service(s).pid, "worker")[0]

    def solo(self, s: Scenario, port: int) -> tuple[list[str], dict[str, str]]:
        """The interpreter's arguments and the environment of one more server worker of
        scenario `s`, on `port` (for callgrind)."""
        baseline = self.baseline(s)
        if baseline is not None:
            return baseline.argv(port), clean_env()
        metrics_dir = self.stack.dir / f"counted-metrics-{s.key}"
        env = profile.solo_env(self.worker_pid(s), port, metrics_dir)
        return ["-m", "bench.profile", "worker"], env

    async def plans(self, s: Scenario, rep: int) -> list[Plan]:
        procs = self.args.clients
        if s.cycle:
            per = CYCLED
        else:
            rate = self.rate_seen.get(s.key, s.guess)
            length = self.args.warmup + self.args.seconds
            per = math.ceil(rate * HEADROOM * length / procs) + 1_000
        return [await self.plan(s, f"{s.key}{rep}", per) for _ in range(procs)]

    async def plan(self, s: Scenario, tag: str, count: int) -> Plan:
        """`count` requests of scenario `s`, for persons not used before (with vouchers
        issued to them first for a redemption)."""
        key = self.stack.key("payment" if s.redeem else "app")
        path = "/v1/redemptions" if s.redeem else f"/v1/campaigns/{s.campaign}/claims"
        vouchers = tuple(await self.stack.issue(self.next_n, count)) if s.redeem else ()
        plan = Plan(path, key.id, key.secret, tag, self.next_n, count, s.cycle, vouchers, MERCHANT)
        self.next_n += count
        return plan

    async def count(self, s: Scenario) -> profile.Counted:
        """Scenario `s`'s instructions per request in one more worker under callgrind."""
        args = self.args
        warmup, each = profile.WARMUP, args.count_requests
        plan = await self.plan(s, f"{s.key}i", warmup + profile.ROUNDS * each)
        built = await asyncio.to_thread(build, plan, "127.0.0.1")
        starts = range(warmup, len(built), each)
        rounds = [built[start : start + each] for start in starts]
        reserved = reuseport_socket("127.0.0.1", 0, listen=False)
        with reserved:
            port = reserved.getsockname()[1]
            argv, env = self.solo(s, port)
            counted_dir = self.stack.dir / "callgrind"
            subject = profile.Subject(argv, env, counted_dir, self.stack.log, args.cache_sim)
            return await profile.count(s.key, subject, port, built[:warmup], rounds, s.expect)

    async def run(self, s: Scenario, rep: int) -> report.RunResult:
        args = self.args
        plans = await self.plans(s, rep)
        built, build_s = await asyncio.to_thread(self.clients.build, plans, "127.0.0.1")
        per_client = args.connections // args.clients
        target = Target("127.0.0.1", self.port(s), per_client, args.warmup, args.seconds)
        issuer_side = s.key in "bpcfr"
        start_at = time.monotonic() + 0.2
        self.clients.go(target, start_at)
        await asyncio.sleep(start_at + args.warmup - time.monotonic())
        profiling = None
        if args.profile is not None and rep == 1:
            out = args.profile / f"{s.key}.svg"
            profiling = profile.start(self.worker_pid(s), args.seconds, out)
        # the CPU and Valkey readings at the window's edges; the service's /metrics after
        # them (a scrape of a saturated service can take seconds, and its figures are ratios)
        commands = await self.stack.valkey_commands()
        first, opened = cpu.snapshot(self.groups), time.monotonic()
        valkey_then = self.stack.valkey_split()
        before = await self.stack.metrics(self.port(s)) if issuer_side else ""
        await asyncio.sleep(start_at + args.warmup + args.seconds - time.monotonic())
        last, span = cpu.snapshot(self.groups), time.monotonic() - opened
        valkey_now = self.stack.valkey_split()
        commands = subtract(await self.stack.valkey_commands(), commands)
        after = await self.stack.metrics(self.port(s)) if issuer_side else ""
        used = cpu.cores(first, last, span)
        valkey_parts = {
            k: (valkey_now[k] - valkey_then[k]) / cpu.TICKS_PER_S / span for k in valkey_now
        }
        merged: Merged = await asyncio.to_thread(self.clients.collect)
        if profiling is not None:
            await asyncio.to_thread(profile.finish, profiling)
        server: dict[str, float] = {}
        if issuer_side or s.redeem:
            if issuer_side:
                server = server_figures(before, after, merged.count)
                if server["batches"]:
                    server["valkey_us_per_batch"] = used["valkey"] * span / server["batches"] * 1e6
            drain = time.monotonic()
            await self.stack.drained()
            server["drain_s"] = time.monotonic() - drain
        rate = merged.rate
        self.rate_seen[s.key] = rate * (2 if merged.exhausted else 1)
        return report.RunResult(
            scenario=s.key,
            rep=rep,
            rate=rate,
            p50_ms=merged.percentile_ms(0.50),
            p99_ms=merged.percentile_ms(0.99),
            count=merged.count,
            statuses=merged.statuses,
            cpu_cores={k: round(v, 2) for k, v in used.items()},
            cpu_others=cpu.others(first, last, span),
            exhausted=merged.exhausted,
            troubles=merged.troubles,
            built=built,
            build_s=build_s,
            server=server,
            expected=s.expect,
            valkey_us={k: v / merged.count for k, (_, v) in commands.items() if merged.count},
            valkey_calls={k: n / merged.count for k, (n, _) in commands.items() if merged.count},
            valkey_parts=valkey_parts,
        )


def valkey_breakdown(r: report.RunResult, idle_cores: float) -> str:
    """Where the primary's CPU per answer of the expected status went: its main thread
    (commands, the event loop, propagation to the AOF and the replica), its other threads
    and forked children; how much of it the same chores take with no load at all; and
    the commands per answer (a script's own counted in it and in EVALSHA)."""
    useful = r.useful_rate
    if not useful:
        return ""
    parts = "  ".join(f"{k} {v / useful * 1e6:,.1f}" for k, v in r.valkey_parts.items())
    calls = sorted(r.valkey_calls.items(), key=lambda kv: -kv[1])[:6]
    per = r.rate / useful  # answers per answer of the expected status
    script = r.valkey_us.get("evalsha", 0.0) * per
    return (
        f"    valkey µs per {r.expected} answer: {parts}; of it idle chores"
        f" {idle_cores / useful * 1e6:,.1f}, evalsha (scripts) {script:,.1f}; commands per"
        f" answer {sum(r.valkey_calls.values()) * per:,.1f} ("
        + "  ".join(f"{k} {n * per:,.2f}" for k, n in calls)
        + ")"
    )


def progress(r: report.RunResult, s: Scenario, reps: int, idle_cores: float) -> str:
    line = (
        f"scenario {s.key}, rep {r.rep}/{reps}: {r.rate:,.0f} req/s"
        f"  p50 {r.p50_ms:.1f} ms  p99 {r.p99_ms:.1f} ms"
    )
    shown = {k: v for k, v in r.cpu_cores.items() if v >= 0.02 or k == "idle"}
    cores = "  ".join(f"{k} {v:.2f}" for k, v in shown.items())
    per = "  ".join(
        f"{k} {v / r.rate * 1e6:,.0f}" for k, v in shown.items() if k != "idle" and r.rate
    )
    line += f"\n    cores: {cores}\n    cpu µs per request: {per}"
    if r.cpu_cores.get("other", 0) >= 0.1 and r.cpu_others:
        line += f"\n    other, busiest outside the bench: {r.cpu_others}"
    if "measured" not in r.server and "drain_s" in r.server:
        line += f"\n    flusher drained in {r.server['drain_s']:.1f} s"
    elif r.server:
        sv = r.server
        share = sv["claims_to_redis"] / sv["measured"] if sv["measured"] else 0.0
        line += (
            f"\n    redis: {sv['batches']:,.0f} batches, mean {sv['mean_batch']:.1f} claims,"
            f" {sv['mean_script_ms']:.2f} ms per script,"
            f" valkey {sv.get('valkey_us_per_batch', 0):,.0f} µs CPU per batch;"
            f" claims to redis / measured {share:.2f}; flusher drained in {sv['drain_s']:.1f} s"
        )
    busiest = sorted(r.valkey_us.items(), key=lambda kv: -kv[1])[:6]
    if busiest and busiest[0][1] >= 1:
        line += "\n    valkey µs per request by command: " + "  ".join(
            f"{k} {v:,.1f}" for k, v in busiest
        )
        line += "\n" + valkey_breakdown(r, idle_cores)
    other = {k: v for k, v in r.statuses.items() if k != s.expect}
    if other or r.exhausted or r.troubles:
        line += f"\n    WARNING: statuses {r.statuses}, exhausted={r.exhausted}"
        line += f", unfinished or lost={r.troubles}"
    return line


def describe(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    pg = stack.pg_settings
    return {
        "workers": args.workers,
        "connections": args.connections,
        "client_processes": args.clients,
        "warmup_s": args.warmup,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "naive_pool_per_worker": args.naive_pool,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "postgres": pg,
        "postgres_fs": fs_type(stack.dir),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def setup_line(d: dict[str, Any]) -> str:
    pg = d["postgres"]
    return (
        f"{d['cpus']} cores ({d['cpu_model']}), Python {d['python']}; every scenario:"
        f" {d['workers']} server workers (SO_REUSEPORT), {d['connections']} keep-alive"
        f" connections from {d['client_processes']} raw-uvloop client processes on the same"
        f" machine, {d['warmup_s']:g} s warm-up + {d['seconds']:g} s measured, medians of"
        f" {d['repeat']} interleaved runs. Embedded PostgreSQL {pg['server_version']} on"
        f" {d['postgres_fs']}: fsync={pg['fsync']}, synchronous_commit={pg['synchronous_commit']},"
        f" full_page_writes={pg['full_page_writes']}, wal_sync_method={pg['wal_sync_method']};"
        f" naive pool {d['naive_pool_per_worker']} connections per worker; issuer on embedded"
        " Valkey (AOF everysec) with its flusher writing to the same PostgreSQL."
    )


async def bench(args: argparse.Namespace) -> int:
    chosen = [s for s in SCENARIOS if s.key in args.scenarios]
    counted = [s for s in SCENARIOS if s.key in args.instructions]
    if counted and not profile.installed():
        print("valgrind is not installed: no instruction counts (apt-get install valgrind)")
        counted = []
    titles = {s.key: s.title for s in chosen}
    clients = Clients(args.clients)
    stack = Stack(args.keep)
    try:
        print(f"starting servers under {stack.dir} ...", flush=True)
        await stack.start(args.workers, args.naive_pool)
        settings = describe(args, stack)
        print(setup_line(settings), flush=True)
        idle_cores = await stack.valkey_idle(IDLE_S)
        settings["valkey_idle_cores"] = idle_cores
        print(f"valkey with no load: {idle_cores * 1000:.1f} ms of CPU per second", flush=True)
        b = Bench(args, stack, clients)
        runs: list[report.RunResult] = []
        for rep in range(1, args.repeat + 1):
            for s in chosen:
                result = await b.run(s, rep)
                runs.append(result)
                print(progress(result, s, args.repeat, idle_cores), flush=True)
                await asyncio.sleep(0.5)
        counts = []
        for s in counted:
            counts.append(await b.count(s))
            c = counts[-1]
            rounds = ", ".join(f"{x:,.0f}" for x in c.per_request)
            print(
                f"scenario {s.key}: {c.median:,.0f} instructions per request (rounds of"
                f" {c.requests:,}: {rounds}; idle {c.idle_per_s:,.0f}/s taken out)",
                flush=True,
            )
            if c.events:
                print(f"    {report.simulated(c)}", flush=True)
        summaries = report.summarise(titles, runs)
        tables = report.Tables(summaries, report.ratios(summaries), report.parts(runs), counts)
        print()
        print(report.text_table(tables))
        busy = [r.cpu_cores.get("other", 0.0) for r in runs]
        if busy and max(busy) >= 0.2:
            print(
                f"\nnote: work outside the bench took up to {max(busy):.2f} cores (median"
                f" {statistics.median(busy):.2f}) during the runs; those figures are low."
            )
        print("\nMarkdown for docs/results.md:\n")
        print(report.markdown(tables, setup_line(settings)))
        report.write_json(args.out, settings, runs, tables)
        print(f"\nwrote {args.out}")
        if args.keep:
            print(f"kept {stack.dir}")
        return 0
    finally:
        clients.close()
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return uvloop.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
