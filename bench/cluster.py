"""`python -m bench.cluster`: claims spread over campaigns held by 1 primary vs by 3 primaries of
one embedded Valkey Cluster (3 primaries + 3 replicas), the same `issuer serve` workers in
front, on the same machine in the same run.

Set "one" is three campaigns whose `{c:<id>}` hash slots all belong to one primary; set
"three" is three campaigns, one per primary. One raw-uvloop client process per campaign
sends distinct signed claims closed-loop; the sets run interleaved for R repetitions. Each
run reads the CPU of the issuer workers and of every Valkey primary by its pid (replicas as
one group), so it gives Valkey CPU µs per issued claim on each primary, the claims/s each
primary carried, and (from the service's /metrics) Valkey µs per script batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import redis
import uvloop
from redis.cluster import RedisCluster
from redis.crc import key_slot

from bench import cpu
from bench.cpu import Groups, children, tree
from bench.loadgen import GRACE_S, Clients, Merged, Part, Target
from bench.procs import Service
from bench.run import cpu_model, run_arguments, server_figures
from bench.signing import FIRST_N, Plan
from bench.stack import DURABLE, OPEN_QUOTA, PERSON_KEY, bench_dir, fs_type, pg_settings
from issuer import embedded
from issuer.auth import ApiKey, load_keys
from issuer.client import Client
from issuer.keys import CampaignKeys
from tests.people import campaign

OUT = Path(__file__).resolve().parent / "out" / "cluster.json"
SETS = ("one", "three")  # campaigns on one primary; one campaign per primary
CAMPAIGNS_PER_SET = 3
CANDIDATES = 10_000  # ids tried per set to find the slots wanted (each hits 1 in 3)
GUESS_RATE = 4_000.0  # req/s assumed before a set's first run, to size the requests built
HEADROOM = 1.4  # requests built per run: this times the last rate seen, times the run's length
DRAIN_TIMEOUT_S = 120
CLAIMED = 201
TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass(frozen=True)
class Placed:
    """A bench campaign and the primary (by port) that owns its hash slot."""

    campaign_id: str
    slot: int
    primary: int


def ledger_slot(campaign_id: str) -> tuple[str, int]:
    """The campaign's ledger key, as the service names it, and its hash slot."""
    ledger = CampaignKeys(campaign_id).ledger
    assert ledger == f"{{c:{campaign_id}}}:ledger"
    return ledger, key_slot(ledger.encode())


def owner(rc: RedisCluster, campaign_id: str) -> Placed:
    """Where the cluster's slot map puts `campaign_id`."""
    ledger, slot = ledger_slot(campaign_id)
    node = rc.get_node_from_key(ledger)
    assert node is not None, f"no primary for slot {slot}"
    return Placed(campaign_id, slot, int(node.port))


def choose(rc: RedisCluster, primaries: list[int]) -> dict[str, list[Placed]]:
    """Set "one": the first candidate ids whose slots belong to the lowest-port primary; set
    "three": for each primary, the first candidate id whose slot it owns."""
    target = primaries[0]
    one: list[Placed] = []
    for i in range(CANDIDATES):
        placed = owner(rc, f"one-{i}")
        if placed.primary == target and placed.slot not in {p.slot for p in one}:
            one.append(placed)
            if len(one) == CAMPAIGNS_PER_SET:
                break
    by_primary: dict[int, Placed] = {}
    for i in range(CANDIDATES):
        placed = owner(rc, f"three-{i}")
        by_primary.setdefault(placed.primary, placed)
        if len(by_primary) == len(primaries):
            break
    three = [by_primary[port] for port in primaries if port in by_primary]
    chosen = {"one": one, "three": three}
    assert len(one) == CAMPAIGNS_PER_SET and {p.primary for p in one} == {target}, one
    assert len(three) == CAMPAIGNS_PER_SET and {p.primary for p in three} == set(primaries), three
    return chosen


def check_placement(rc: RedisCluster, chosen: dict[str, list[Placed]]) -> None:
    """After the campaigns are created: each ledger lives on its chosen primary, and that
    node computes the same slot for it."""
    for placed in (p for ps in chosen.values() for p in ps):
        ledger, slot = ledger_slot(placed.campaign_id)
        with redis.Redis(host="127.0.0.1", port=placed.primary, socket_timeout=5) as node:
            assert int(node.execute_command("CLUSTER", "KEYSLOT", ledger)) == slot, placed
            assert node.execute_command("ROLE")[0] in (b"master", "master"), placed
            assert int(node.exists(ledger)) == 1, f"{ledger} not on primary {placed.primary}"


class PerProcess(Clients):
    """The bench's client processes, each given its own Target (its own connection count)."""

    def go_each(self, targets: list[Target], start_at: float) -> None:
        for pipe, target in zip(self.pipes, targets, strict=True):
            pipe.send(("go", target, start_at))

    def collect_within(self, timeout: float) -> Merged:
        """What every process measured, in process order; TimeoutError if one is silent."""
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("a load-generator process did not report")
        return self.collect()


class ClusterStack:
    """Embedded PostgreSQL (durable) and Valkey Cluster under a temp dir, `issuer serve` on
    the cluster; start with `start(workers)`, always `stop()` (by PID, reverse order)."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.dir = bench_dir("issuer-bench-cluster-")
        self.log = self.dir / "servers.log"
        self.pg: embedded.EmbeddedServer | None = None
        self.cluster: embedded.EmbeddedGroup | None = None
        self.service: Service | None = None
        self.keys: dict[str, ApiKey] = {}
        self.pg_settings: dict[str, str] = {}
        self.primaries: dict[int, int] = {}  # port -> pid
        self.replicas: dict[int, int] = {}

    async def start(self, workers: int) -> None:
        self.pg = embedded.start_postgres(self.dir, settings=DURABLE)
        self.pg_settings = await pg_settings(self.pg.url)
        self.cluster = embedded.start_cluster(self.dir)
        with self.slot_map() as rc:
            ports = sorted(int(node.port) for node in rc.get_primaries())
        for node in self.cluster.nodes:
            (self.primaries if node.port in ports else self.replicas)[node.port] = node.pid
        assert len(self.primaries) == 3 and len(self.replicas) == 3, (ports, self.cluster.nodes)
        data_dir = self.dir / "issuer"
        env = {
            "REDIS_URL": self.cluster.url,
            "DATABASE_URL": self.pg.url,
            "ISSUER_DATA_DIR": str(data_dir),
            "ISSUER_PERSON_KEY": PERSON_KEY,
            "ISSUER_LOG_LEVEL": "WARNING",
            # as the test suite: shedding never interferes with a closed loop of 128
            "ISSUER_CLAIM_QUEUE_MAX": "1000000",
            "ISSUER_SHED_LAG_MS": "60000",
        }
        self.service = Service(workers, env, self.log)
        self.keys = load_keys(data_dir / "keys.toml")

    def slot_map(self) -> RedisCluster:
        assert self.cluster is not None
        return RedisCluster.from_url(self.cluster.url, socket_timeout=5)

    def key(self, role: str) -> ApiKey:
        return next(k for k in self.keys.values() if k.role == role)

    async def campaigns(self, ids: list[str]) -> None:
        """Each open for two hours with quota to spare, as bench.stack's OPEN campaign."""
        assert self.service is not None
        plenty = campaign(quota=OPEN_QUOTA, budget_fen=OPEN_QUOTA * 200_000, open_for_s=7200)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            ops = Client(self.service.url, self.key("ops"), session)
            for campaign_id in ids:
                put = await ops.call("PUT", f"/v1/campaigns/{campaign_id}", plenty)
                if put.status not in (200, 201):
                    raise RuntimeError(f"PUT {campaign_id}: {put.status} {put.body}")

    async def metrics(self) -> str:
        assert self.service is not None
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
            session.get(self.service.url + "/metrics") as resp,
        ):
            return await resp.text()

    async def drained(self) -> None:
        """Wait until the flusher has written every claim to PostgreSQL."""
        assert self.service is not None
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            while time.monotonic() < deadline:
                async with session.get(self.service.url + "/readyz") as resp:
                    if (await resp.json()).get("flusher_lag_entries") == 0:
                        return
                await asyncio.sleep(0.1)
        raise TimeoutError("the flusher did not drain")

    def groups(self, clients: list[int]) -> Groups:
        """CPU groups, pids resolved at each snapshot: each primary on its own."""
        service, pg = self.service, self.pg
        assert service is not None and pg is not None
        replicas = list(self.replicas.values())
        found: Groups = {
            "issuer": partial(children, service.pid, "worker"),
            "flusher": partial(children, service.pid, "flush"),
        }
        for port, pid in sorted(self.primaries.items()):
            found[f"primary:{port}"] = partial(tree, pid)  # with an AOF-rewrite child
        found["replicas"] = lambda: [p for pid in replicas for p in tree(pid)]
        found["postgres"] = partial(tree, pg.pid)
        found["client"] = lambda: clients
        found["bench"] = lambda: [os.getpid()]
        return found

    def stop(self) -> None:
        for part in (self.service, self.cluster, self.pg):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def split(total: int, parts: int) -> list[int]:
    """`total` connections over `parts` processes, as evenly as they go."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def issued_rate(part: Part) -> float:
    return part.statuses.get(CLAIMED, 0) / part.window_s if part.window_s > 0 else 0.0


def us_per(cores: float, rate: float) -> float:
    """CPU µs per item of a stream at `rate` per second that kept `cores` busy."""
    return cores / rate * 1e6 if rate > 0 else math.nan


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        stack: ClusterStack,
        clients: PerProcess,
        chosen: dict[str, list[Placed]],
    ) -> None:
        self.args = args
        self.stack = stack
        self.clients = clients
        self.chosen = chosen
        self.next_n = FIRST_N
        self.rate_seen: dict[str, float] = {}
        self.groups = stack.groups(clients.pids)

    def plans(self, name: str, rep: int) -> list[Plan]:
        """One plan per campaign (per client process), every person and request new."""
        key = self.stack.key("app")
        length = self.args.warmup + self.args.seconds
        rate = self.rate_seen.get(name, GUESS_RATE) / CAMPAIGNS_PER_SET
        per = math.ceil(rate * HEADROOM * length) + 1_000
        plans = []
        for placed in self.chosen[name]:
            path = f"/v1/campaigns/{placed.campaign_id}/claims"
            plans.append(Plan(path, key.id, key.secret, f"cl-{name}{rep}", self.next_n, per))
            self.next_n += per
        return plans

    async def run(self, name: str, rep: int) -> dict[str, Any]:
        args, stack = self.args, self.stack
        assert stack.service is not None
        built, build_s = await asyncio.to_thread(
            self.clients.build, self.plans(name, rep), "127.0.0.1"
        )
        port = stack.service.port
        targets = [
            Target("127.0.0.1", port, n, args.warmup, args.seconds)
            for n in split(args.connections, CAMPAIGNS_PER_SET)
        ]
        start_at = time.monotonic() + 0.2
        self.clients.go_each(targets, start_at)
        await asyncio.sleep(start_at + args.warmup - time.monotonic())
        first, opened = cpu.snapshot(self.groups), time.monotonic()
        before = await stack.metrics()
        await asyncio.sleep(start_at + args.warmup + args.seconds - time.monotonic())
        after = await stack.metrics()
        last, span = cpu.snapshot(self.groups), time.monotonic() - opened
        used = cpu.cores(first, last, span)
        merged = await asyncio.to_thread(self.clients.collect_within, GRACE_S + 30)
        server = server_figures(before, after, merged.count)
        drain = time.monotonic()
        await stack.drained()
        server["drain_s"] = time.monotonic() - drain

        rates = [issued_rate(p) for p in merged.parts]
        issued = sum(rates)
        primaries: dict[str, dict[str, Any]] = {}
        for primary in sorted(stack.primaries):
            mine = [i for i, p in enumerate(self.chosen[name]) if p.primary == primary]
            carried = sum(rates[i] for i in mine)
            cores = used[f"primary:{primary}"]
            primaries[str(primary)] = {
                "campaigns": [self.chosen[name][i].campaign_id for i in mine],
                "cores": cores,
                "claims_per_s": carried,
                "us_per_claim": us_per(cores, carried),
            }
        busiest = max(primaries, key=lambda p: primaries[p]["cores"])
        primaries_cores = sum(p["cores"] for p in primaries.values())
        batches = server["batches"]
        self.rate_seen[name] = merged.rate * (2 if merged.exhausted else 1)
        return {
            "set": name,
            "rep": rep,
            "rate": merged.rate,
            "issued_rate": issued,
            "p50_ms": merged.percentile_ms(0.50),
            "p99_ms": merged.percentile_ms(0.99),
            "count": merged.count,
            "statuses": merged.statuses,
            "exhausted": merged.exhausted,
            "troubles": merged.troubles,
            "built": built,
            "build_s": build_s,
            "span_s": span,
            "cpu_cores": {k: round(v, 3) for k, v in used.items()},
            "cpu_others": cpu.others(first, last, span),
            "issuer_us_per_claim": us_per(used["issuer"], issued),
            "primaries": primaries,
            "busiest": int(busiest),
            "busiest_cores": primaries[busiest]["cores"],
            "busiest_us_per_claim": primaries[busiest]["us_per_claim"],
            "primaries_cores": primaries_cores,
            "primaries_us_per_claim": us_per(primaries_cores, issued),
            "replicas_cores": used["replicas"],
            "valkey_us_per_batch": primaries_cores * span / batches * 1e6 if batches else math.nan,
            "server": server,
        }


def progress(r: dict[str, Any], reps: int) -> str:
    cores = r["cpu_cores"]
    line = (
        f"set {r['set']}, rep {r['rep']}/{reps}: {r['rate']:,.0f} req/s"
        f"  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms"
        f"  issuer {cores['issuer']:.2f} cores, {r['issuer_us_per_claim']:,.0f} µs/claim"
    )
    for port, p in r["primaries"].items():
        per = f"{p['us_per_claim']:,.0f} µs/claim" if p["claims_per_s"] else "no claims"
        line += (
            f"\n    primary {port}: {p['cores']:.2f} cores, {p['claims_per_s']:,.0f} claims/s,"
            f" {per}  ({', '.join(p['campaigns']) or '-'})"
        )
    rest = ("replicas", "flusher", "postgres", "client", "bench", "other", "idle")
    line += "\n    cores: " + "  ".join(f"{k} {cores[k]:.2f}" for k in rest)
    sv = r["server"]
    line += (
        f"\n    redis: {sv['batches']:,.0f} batches, mean {sv['mean_batch']:.1f} claims,"
        f" {sv['mean_script_ms']:.2f} ms per script, valkey (primaries)"
        f" {r['valkey_us_per_batch']:,.0f} µs CPU per batch; flusher drained in"
        f" {sv['drain_s']:.1f} s"
    )
    if cores.get("other", 0) >= 0.1 and r["cpu_others"]:
        line += f"\n    other, busiest outside the bench: {r['cpu_others']}"
    other = {k: v for k, v in r["statuses"].items() if k != CLAIMED}
    if other or r["exhausted"] or r["troubles"]:
        line += f"\n    WARNING: statuses {r['statuses']}, exhausted={r['exhausted']}"
        line += f", unfinished or lost={r['troubles']}"
    return line


MEDIANS = (
    "rate",
    "p50_ms",
    "p99_ms",
    "issuer_us_per_claim",
    "busiest_cores",
    "busiest_us_per_claim",
    "primaries_cores",
    "primaries_us_per_claim",
    "valkey_us_per_batch",
)


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    for name in SETS:
        mine = [r for r in runs if r["set"] == name]
        if mine:
            found[name] = {k: statistics.median(r[k] for r in mine) for k in MEDIANS}
            found[name]["mean_batch"] = statistics.median(r["server"]["mean_batch"] for r in mine)
    return found


TITLES = {"one": "3 campaigns on 1 primary", "three": "3 campaigns, 1 per primary"}
HEADER = (
    "set",
    "req/s",
    "p50 ms",
    "p99 ms",
    "issuer µs/claim",
    "busiest primary cores",
    "busiest primary µs/claim",
    "Σ primaries cores",
    "Valkey µs/batch",
)


def rows(found: dict[str, dict[str, float]]) -> list[list[str]]:
    return [
        [
            f"{name}: {TITLES[name]}",
            f"{m['rate']:,.0f}",
            f"{m['p50_ms']:.1f}",
            f"{m['p99_ms']:.1f}",
            f"{m['issuer_us_per_claim']:,.0f}",
            f"{m['busiest_cores']:.2f}",
            f"{m['busiest_us_per_claim']:,.0f}",
            f"{m['primaries_cores']:.2f}",
            f"{m['valkey_us_per_batch']:,.0f} ({m['mean_batch']:.1f} claims)",
        ]
        for name, m in found.items()
    ]


def text_table(found: dict[str, dict[str, float]]) -> str:
    table = [list(HEADER), *rows(found)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def markdown(found: dict[str, dict[str, float]], setup: str) -> str:
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(found)]
    return "\n".join(lines) + f"\n\n{setup}"


def derived(found: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """What one primary could carry of one campaign, from set "three" (each primary holds
    one campaign): the primaries' Valkey CPU per claim issued, 1 core / that."""
    m = found["three"]
    per = m["primaries_us_per_claim"]
    ceiling = 1e6 / per if per > 0 else math.nan
    line = (
        f"one primary sustains about {ceiling:,.0f} claims/s of one campaign at {per:,.0f} µs"
        f" Valkey CPU per claim (1 core / {per:,.0f} µs)"
    )
    return line, {"us_per_claim": per, "claims_per_s": ceiling}


def describe(args: argparse.Namespace, stack: ClusterStack) -> dict[str, Any]:
    return {
        "workers": args.workers,
        "connections": args.connections,
        "client_processes": CAMPAIGNS_PER_SET,
        "warmup_s": args.warmup,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "postgres": stack.pg_settings,
        "postgres_fs": fs_type(stack.dir),
        "primaries": sorted(stack.primaries),
        "replicas": sorted(stack.replicas),
    }


def setup_line(d: dict[str, Any]) -> str:
    pg = d["postgres"]
    return (
        f"{d['cpus']} cores ({d['cpu_model']}), Python {d['python']}; an embedded Valkey"
        " Cluster (3 primaries + 3 replicas, AOF everysec) on the same machine, `issuer serve`"
        f" with {d['workers']} workers on it; {d['connections']} keep-alive connections from"
        f" {d['client_processes']} raw-uvloop client processes (one per campaign), distinct"
        f" signed claims, {d['warmup_s']:g} s warm-up + {d['seconds']:g} s measured, medians of"
        f" {d['repeat']} interleaved runs; CPU per primary by its pid. Embedded PostgreSQL"
        f" {pg['server_version']} on {d['postgres_fs']} (fsync={pg['fsync']},"
        f" synchronous_commit={pg['synchronous_commit']}) fed by the flusher."
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.cluster", description=__doc__)
    run_arguments(parser, seconds=6)
    parser.add_argument("--limit", type=float, default=900, help="seconds before it gives up")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir for a look")
    args = parser.parse_args(argv)
    if args.connections < CAMPAIGNS_PER_SET:
        parser.error(f"--connections must be at least {CAMPAIGNS_PER_SET}")
    return args


async def bench(args: argparse.Namespace) -> int:
    clients = PerProcess(CAMPAIGNS_PER_SET)
    stack = ClusterStack(args.keep)
    try:
        print(f"starting servers under {stack.dir} ...", flush=True)
        await stack.start(args.workers)
        settings = describe(args, stack)
        print(setup_line(settings), flush=True)
        with stack.slot_map() as rc:
            chosen = choose(rc, sorted(stack.primaries))
            await stack.campaigns([p.campaign_id for ps in chosen.values() for p in ps])
            check_placement(rc, chosen)
        for name, placed in chosen.items():
            where = ", ".join(f"{p.campaign_id} slot {p.slot} on {p.primary}" for p in placed)
            print(f"set {name}: {where}", flush=True)
        b = Bench(args, stack, clients, chosen)
        runs: list[dict[str, Any]] = []
        for rep in range(1, args.repeat + 1):
            for name in SETS:
                result = await b.run(name, rep)
                runs.append(result)
                print(progress(result, args.repeat), flush=True)
                await asyncio.sleep(0.5)
        found = medians(runs)
        line, ceiling = derived(found)
        print()
        print(text_table(found))
        print()
        print(line)
        print(
            f"  (from set three: Σ primaries' CPU / claims issued; set one's primary spent"
            f" {found['one']['busiest_us_per_claim']:,.0f} µs per claim of its 3 campaigns)"
        )
        busy = [r["cpu_cores"].get("other", 0.0) for r in runs]
        if max(busy) >= 0.2:
            print(
                f"\nnote: work outside the bench took up to {max(busy):.2f} cores (median"
                f" {statistics.median(busy):.2f}) during the runs; those figures are low."
            )
        print("\nMarkdown for docs/results.md:\n")
        print(markdown(found, setup_line(settings)))
        print(f"\n{line}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "settings": settings,
            "placement": {k: [asdict(p) for p in v] for k, v in chosen.items()},
            "runs": runs,
            "medians": found,
            "derived": {**ceiling, "line": line},
        }
        args.out.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {args.out}")
        if args.keep:
            print(f"kept {stack.dir}")
        return 0
    finally:
        clients.close()
        stack.stop()


def give_up(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("bench.cluster ran past --limit")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Bounded in time even if a server hangs at start: the alarm lands in the main thread,
    # and bench()'s `finally` stops every process it started.
    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(math.ceil(args.limit))
    try:
        return uvloop.run(bench(args))
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
