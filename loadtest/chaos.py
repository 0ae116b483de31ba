"""`make chaos`: rehearse the faults a Redis deployment meets (Jepsen's nemeses: kill,
a primary started again too early, pause, partitions) against real topologies while a
crowd claims, then check the two numbers the service promises: nothing over-issued, and
nothing lost that a client was told.

For each topology (Sentinel 1+2+3, Cluster 3+3, Cluster 3+6), each `ISSUER_DURABLE_ACK`
(`replica`, `none`) and each nemesis (alone, then mixed), one cell: a fresh campaign
whose quota sells out in a few seconds of unhindered claiming, a crowd of distinct
persons pressing "claim" (5xx retried with the same request_id, every 201 written down),
the fault brought to the primary that owns the campaign, healed, the quota pressed until
sold out (the cell's time bounds it), the topology converged, the flusher drained. The
checker: every told voucher in Redis and PostgreSQL, told ≤ quota, one per person, the
ledger, reconcile clean (`loadtest.verify`, `issuer reconcile`); for `none` it counts the
loss and how much of it PostgreSQL holds (which reconcile names).

Each Valkey node listens and connects out on its own address of the run's /24 of
127.0.0.0/8; partitions are packet-filter rules in a chain of the run's own (`Net`).
Writes `--out` (loadtest/out): chaos.md (the table), chaos.png (the timeline), chaos.json.
Exit code 1 if a `replica` cell lost or over-issued anything or failed a check."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from bench.procs import ROOT, Service
from issuer import embedded, keys, topology
from issuer.auth import load_keys
from issuer.campaigns import HINT_TTL_S, hash_keys
from issuer.client import Client
from issuer.reconcile import reconcile
from loadtest.crowd import Crowd, crowd_of
from loadtest.nemesis import HOLD_S, Events, Nemesis, Net, watch_promotions
from loadtest.prom import LOST_PRIMARY, Prometheus
from loadtest.rigs import NODES, TOPOLOGIES, Rig
from loadtest.verify import verify
from tests.people import campaign

OUT = ROOT / "loadtest" / "out"
NEMESES = (
    "kill",
    "restart-early",
    "pause",
    "partition",
    "partition-half",
    "partition-clients",
    "mixed",
)
ACKS = ("replica", "none")
CLIENTS = 32  # people pressing at once
WARM_S = 1.5  # claims flow this long before the fault
RATE_S = 2.0  # the crowd's pace is measured this long when a stage starts
MIN_QUOTA = 200
PEOPLE_PER_CELL = 1_000_000  # person numbers of one cell never meet another's
PROMETHEUS_CELL = "partition-clients"  # the cell a real Prometheus watches (replica ack)
PROMETHEUS_HOLD_S = 20.0  # its fault holds past the alert's `for: 10s` (fired at 14-15 s)
RESOLVE_S = 30.0  # after the heal, how long the alert has to resolve


@dataclass
class Cell:
    """One cell's figures; times are seconds."""

    topology: str
    ack: str
    nemesis: str
    quota: int
    told: int = 0
    lost: int = 0  # told, but not in Redis afterwards
    lost_in_pg: int = 0  # of those, how many PostgreSQL holds (reconcile names them)
    over_issued: int = 0  # told beyond the quota
    no_primary_s: float = 0.0  # stretches with no claim decided (Crowd.unavailable_s)
    answers_503: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # 5xx answers by status and code
    undecided: int = 0  # claims still 5xx when the crowd gave up
    sold_out: bool = False
    failed: list[str] = field(default_factory=list)  # verifier checks that failed
    reconcile: list[str] = field(default_factory=list)  # its problems
    seconds: float = 0.0
    # the Prometheus cell: seconds from the fault to the lost-primary alert firing, and
    # from the heal to its resolving (-1: it did not)
    alert_fired_s: float | None = None
    alert_resolved_s: float | None = None
    # for the chart: times since the stage started
    start: float = 0.0
    events: list[tuple[float, str, str]] = field(default_factory=list)
    issued_at: list[float] = field(default_factory=list)
    unavailable_at: list[float] = field(default_factory=list)  # 503s and missing answers

    @property
    def ok(self) -> bool:
        """Nothing lost or over-issued, every check and reconcile clean (and, where a
        Prometheus watched, the alert fired and resolved)."""
        clean = not self.failed and not self.reconcile and not self.undecided
        alerted = (
            self.alert_fired_s is None or min(self.alert_fired_s, self.alert_resolved_s or -1) >= 0
        )
        return self.lost == 0 and self.over_issued == 0 and clean and alerted

    def note_alert(self) -> None:
        """alert_fired_s / alert_resolved_s from the events (times as the events')."""
        faults = [t for t, kind, _ in self.events if kind == "fault"]
        heals = [t for t, kind, _ in self.events if kind == "heal"]
        fired = [t for t, kind, text in self.events if kind == "alert" and text.endswith("firing")]
        ended = [
            t
            for t, kind, text in self.events
            if kind == "alert" and text.endswith("inactive") and fired and t > fired[0]
        ]
        self.alert_fired_s = fired[0] - faults[0] if fired and faults else -1
        self.alert_resolved_s = ended[0] - heals[-1] if ended and heals else -1


class Stage:
    """One topology under one ack mode: `issuer serve` (2 workers) on the rig, a signed
    client session, and the cells run on it one after another."""

    def __init__(self, rig: Rig, net: Net, ack: str, database_url: str, work: Path) -> None:
        self.rig = rig
        self.net = net
        self.ack = ack
        self.database_url = database_url
        self.work = work
        self.started = time.time()
        self.people = 0
        self.rate = 0.0  # claims/s of an unhindered crowd

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Stage]:
        data_dir = self.work / f"service-{self.ack}-{secrets.token_hex(3)}"
        data_dir.mkdir(parents=True)
        env = {
            **self.rig.env(),
            "DATABASE_URL": self.database_url,
            "ISSUER_DATA_DIR": str(data_dir),
            "ISSUER_DURABLE_ACK": self.ack,
            "ISSUER_PERSON_KEY": "chaos",
            "ISSUER_LOG_LEVEL": "WARNING",
            "ISSUER_SHUTDOWN_GRACE_S": "0",
            "ISSUER_CLAIM_QUEUE_MAX": "1000000",  # a fault must not look like shedding
            "ISSUER_SHED_LAG_MS": "60000",
        }
        self.service = await asyncio.to_thread(Service, 2, env, data_dir / "service.log")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CLIENTS * 2),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        found = load_keys(data_dir / "keys.toml").values()
        self.ops = Client(self.service.url, next(k for k in found if k.role == "ops"), self.session)
        self.app = Client(self.service.url, next(k for k in found if k.role == "app"), self.session)
        self.pg = await asyncpg.create_pool(self.database_url, min_size=1, max_size=4)
        self.started = time.time()
        try:
            yield self
        finally:
            await self.session.close()
            await self.pg.close()
            await asyncio.to_thread(self.service.stop)

    @asynccontextmanager
    async def prometheus(self, wanted: bool) -> AsyncIterator[Prometheus | None]:
        """A Prometheus scraping the service, when `wanted`."""
        if not wanted:
            yield None
            return
        target = self.service.url.removeprefix("http://")
        prom = Prometheus(self.work / f"prometheus-{secrets.token_hex(3)}", target)
        try:
            await prom.ready(self.session)
            yield prom
        finally:
            await asyncio.to_thread(prom.stop)

    async def new_campaign(self, quota: int) -> str:
        campaign_id = f"chaos-{secrets.token_hex(4)}"
        resp = await self.ops.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(quota=quota))
        if resp.status != 201:
            raise RuntimeError(f"campaign {campaign_id}: {resp.status} {resp.body}")
        return campaign_id

    def crowd(self, campaign_id: str) -> Crowd:
        self.people += PEOPLE_PER_CELL
        return Crowd.of(campaign_id, self.people)

    async def measure_rate(self) -> float:
        """Claims/s of the crowd with nothing in its way (sets the cells' quotas)."""
        crowd = self.crowd(await self.new_campaign(10**7))
        stop = asyncio.Event()
        tasks = crowd_of(self.app, crowd, CLIENTS, stop)
        await asyncio.sleep(RATE_S)
        stop.set()
        await asyncio.gather(*tasks)
        self.rate = max(len(crowd.told) / RATE_S, 1.0)
        return self.rate

    async def cell(
        self,
        nemesis: str,
        hold_s: float,
        cell_s: float,
        sell_s: float,
        rng: random.Random,
        repeat: int = 1,
        prometheus: Prometheus | None = None,
    ) -> Cell:
        quota = max(MIN_QUOTA, int(self.rate * sell_s))
        campaign_id = await self.new_campaign(quota)
        key = keys.CampaignKeys(campaign_id).ledger
        result = Cell(self.rig.label, self.ack, nemesis, quota, start=time.time())
        events = Events()
        crowd = self.crowd(campaign_id)
        stop, watching = asyncio.Event(), asyncio.Event()
        tasks = crowd_of(self.app, crowd, CLIENTS, stop)
        watcher = asyncio.create_task(watch_promotions(self.rig, key, events, watching))
        alerting = asyncio.Event()
        if prometheus is not None:
            hold_s = max(hold_s, PROMETHEUS_HOLD_S)
            alerts = asyncio.create_task(self.watch_alert(prometheus, events, alerting))
        faults = Nemesis(self.rig, self.net, key, events, hold_s, repeat)
        try:
            async with asyncio.timeout(cell_s):
                await asyncio.sleep(WARM_S)
                if nemesis == "mixed":
                    await faults.mixed(rng)
                else:
                    await faults.alone()[nemesis]()
                # sold out as the primary after the fault says it, not as one the fault
                # may take back said it (workers repeat a sold-out answer for HINT_TTL_S)
                await self.rig.converge()
                await asyncio.sleep(HINT_TTL_S)
                crowd.sold_out.clear()
                await crowd.sold_out.wait()
        except TimeoutError:
            pass
        finally:
            stop.set()
            self.net.heal()
            await asyncio.gather(*tasks, self.rig.converge())
            watching.set()
            await watcher
        result.seconds = time.time() - result.start
        await self.check(result, campaign_id, crowd)
        if prometheus is not None:
            alerting.set()
            await alerts
        result.events = events.seen
        if prometheus is not None:
            result.note_alert()
        return result

    async def watch_alert(
        self, prometheus: Prometheus, events: Events, done: asyncio.Event
    ) -> None:
        """Note each change of the lost-primary alert's state in Prometheus; once `done`,
        go on until it is inactive again after firing (at most RESOLVE_S)."""
        last, fired = "inactive", False
        deadline = float("inf")
        while time.monotonic() < deadline:
            try:
                state = await prometheus.alert_state(self.session, LOST_PRIMARY)
            except (aiohttp.ClientError, KeyError, ValueError):
                state = last
            if state != last:
                events.add("alert", f"{LOST_PRIMARY} {state}")
                last, fired = state, fired or state == "firing"
            if done.is_set():
                if last == "inactive" and fired:
                    return
                deadline = min(deadline, time.monotonic() + RESOLVE_S)
            await asyncio.sleep(0.5)

    async def check(self, result: Cell, campaign_id: str, crowd: Crowd) -> None:
        """The checker, after the flusher drained: the verifier's invariants, reconcile,
        and what the clients were told against what Redis and PostgreSQL hold."""
        client = self.rig.client()
        try:
            checks = await verify(client, self.pg, campaign_id, set(crowd.told), drain_timeout=30)
            report = await reconcile(client, self.pg, campaign_id)
            in_redis = await hash_keys(client, keys.CampaignKeys(campaign_id).vouchers)
        finally:
            await topology.close(client)
        lost = set(crowd.told) - in_redis
        held = await self.pg.fetchval(
            "SELECT count(*) FROM vouchers WHERE voucher_id = ANY($1::text[])", sorted(lost)
        )
        result.told = len(crowd.told)
        result.lost, result.lost_in_pg = len(lost), int(held)
        result.over_issued = max(0, result.told - result.quota)
        end = result.start + result.seconds
        result.no_primary_s = crowd.unavailable_s(result.start + WARM_S, end)
        result.answers_503 = sum(1 for *_, status, _ in crowd.answers if status >= 500)
        result.failures = {
            f"{status} {code}": n for (status, code), n in crowd.statuses().items() if status >= 500
        }
        result.undecided = crowd.undecided
        result.sold_out = crowd.sold_out.is_set()
        result.failed = [c.line for c in checks if not c.ok]
        result.reconcile = report.problems
        result.issued_at = crowd.told_at
        result.unavailable_at = [a for _, a, status, _ in crowd.answers if status >= 500]


def progress(cell: Cell) -> str:
    verdict = "ok" if cell.ok else "BROKEN" if cell.ack == "replica" else "lossy"
    return (
        f"  {cell.topology} ack={cell.ack} {cell.nemesis}: told {cell.told}/{cell.quota}"
        f" (sold out: {cell.sold_out}), lost {cell.lost} (PostgreSQL holds {cell.lost_in_pg}),"
        f" over-issued {cell.over_issued}, no primary {cell.no_primary_s:.1f} s,"
        f" 5xx {cell.failures}, undecided {cell.undecided}, {cell.seconds:.1f} s: {verdict}"
        + (f"\n    failed: {cell.failed}" if cell.failed else "")
        + (f"\n    reconcile: {cell.reconcile[:3]}" if cell.reconcile else "")
        + (
            f"\n    {LOST_PRIMARY}: fired {cell.alert_fired_s:.1f} s after the fault,"
            f" resolved {cell.alert_resolved_s:.1f} s after the heal (-1: did not)"
            if cell.alert_fired_s is not None and cell.alert_resolved_s is not None
            else ""
        )
    )


async def run_topology(
    name: str,
    acks: list[str],
    nemeses: list[str],
    database_url: str,
    work: Path,
    net: Net,
    *,
    hold_s: float = HOLD_S,
    cell_s: float = 60.0,
    sell_s: float = 6.0,
    seed: int = 20,
    repeat: int = 3,
    prometheus: bool = False,
) -> list[Cell]:
    """Every cell of one topology (started once, converged between cells); with
    `prometheus`, a real Prometheus watches the PROMETHEUS_CELL of the replica stage."""
    hosts = [net.address(10 + i) for i in range(NODES[name])]
    rig = await asyncio.to_thread(TOPOLOGIES[name], work / name, hosts)
    cells = []
    try:
        for ack in acks:
            async with Stage(rig, net, ack, database_url, work).running() as stage:
                rate = await stage.measure_rate()
                print(f"{rig.label} ack={ack}: the crowd claims {rate:.0f}/s", flush=True)
                for nemesis in nemeses:
                    print(f"  {rig.label} ack={ack} {nemesis} ...", flush=True)
                    watched = prometheus and ack == "replica" and nemesis == PROMETHEUS_CELL
                    async with stage.prometheus(watched) as prom:
                        cell = await stage.cell(
                            nemesis, hold_s, cell_s, sell_s, random.Random(seed), repeat, prom
                        )
                    for at in (cell.issued_at, cell.unavailable_at):
                        at[:] = [t - stage.started for t in at]
                    cell.events = [(t - stage.started, k, s) for t, k, s in cell.events]
                    cell.start -= stage.started
                    print(progress(cell), flush=True)
                    cells.append(cell)
    finally:
        await rig.aclose()
    return cells


def table(cells: list[Cell]) -> str:
    lines = [
        "| topology | ack | nemesis | told / quota | lost (PG holds) | over-issued"
        " | no primary s | 503s | checks | reconcile |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for c in cells:
        checks = "PASS" if not c.failed else f"{len(c.failed)} FAIL"
        rec = "clean" if not c.reconcile else f"{len(c.reconcile)} problems"
        lines.append(
            f"| {c.topology} | {c.ack} | {c.nemesis} | {c.told} / {c.quota} |"
            f" {c.lost} ({c.lost_in_pg}) | {c.over_issued} | {c.no_primary_s:.1f} |"
            f" {c.answers_503} | {checks} | {rec} |"
        )
    for c in cells:
        if c.alert_fired_s is not None and c.alert_resolved_s is not None:
            lines.append(
                f"\n{c.topology} ack={c.ack} {c.nemesis}: Prometheus saw {LOST_PRIMARY} fire"
                f" {c.alert_fired_s:.1f} s after the fault and resolve {c.alert_resolved_s:.1f} s"
                " after the heal (-1: it did not)"
            )
    return "\n".join(lines) + "\n"


def chart(cells: list[Cell], path: Path) -> None:
    """One row per topology and ack mode: 201/s and 5xx/s, each fault (red span to its
    heal) and promotion (blue line), each cell named at its start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        rows.setdefault((c.topology, c.ack), []).append(c)
    fig, axes = plt.subplots(len(rows), 1, figsize=(14, 2.6 * len(rows)), squeeze=False)
    for axis, ((topo, ack), row) in zip(axes[:, 0], rows.items(), strict=True):
        issued = [t for c in row for t in c.issued_at]
        failed = [t for c in row for t in c.unavailable_at]
        end = max([*issued, *failed, *(c.start + c.seconds for c in row)], default=1)
        bins = [i * 0.5 for i in range(int(end / 0.5) + 2)]
        axis.hist(issued, bins=bins, histtype="step", label="201/0.5 s", color="tab:green")
        axis.hist(failed, bins=bins, histtype="step", label="5xx/0.5 s", color="tab:orange")
        for c in row:
            axis.axvline(c.start, color="grey", linewidth=0.6)
            axis.text(c.start, 1.01, c.nemesis, transform=axis.get_xaxis_transform(), fontsize=7)
            opened: float | None = None
            for t, kind, text in c.events:
                if kind == "fault" and opened is None:
                    opened = t
                elif kind == "heal" and opened is not None:
                    axis.axvspan(opened, t, color="tab:red", alpha=0.15)
                    opened = None
                elif kind == "promoted":
                    axis.axvline(t, color="tab:blue", linestyle="--", linewidth=0.8)
                elif kind == "alert" and not text.endswith("pending"):  # Prometheus
                    style = "-" if text.endswith("firing") else ":"
                    axis.axvline(t, color="tab:purple", linestyle=style, linewidth=1.2)
        axis.set_ylabel(f"{topo}\nack={ack}", fontsize=8)
        axis.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel(
        "seconds since the stage started (red: fault held, blue: promotion,"
        " purple: Prometheus' lost-primary alert firing, dotted: resolved)"
    )
    fig.suptitle("make chaos: claims answered while faults come and go")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__)
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--acks", default=",".join(ACKS))
    parser.add_argument("--nemeses", default=",".join(NEMESES))
    parser.add_argument("--hold", type=float, default=HOLD_S, help="seconds a partition holds")
    parser.add_argument("--cell-seconds", type=float, default=60.0)
    parser.add_argument("--sell-seconds", type=float, default=6.0, help="quota = pace × this")
    parser.add_argument("--seed", type=int, default=20, help="of the mixed nemesis")
    parser.add_argument("--repeat", type=int, default=3, help="restart-early, times per cell")
    parser.add_argument(
        "--no-prometheus",
        dest="prometheus",
        action="store_false",
        help=f"no Prometheus watching the {PROMETHEUS_CELL} cell of the replica stages",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (every log) at the end"
    )
    return parser.parse_args(argv)


def workdir() -> Path:
    work = Path(tempfile.mkdtemp(prefix="issuer-chaos-"))
    work.chmod(0o755)  # postgres runs as its own user when we are root
    return work


async def run(args: argparse.Namespace) -> list[Cell]:
    work = workdir()
    cells: list[Cell] = []
    pg = await asyncio.to_thread(
        embedded.start_postgres, work, settings={"fsync": "off", "synchronous_commit": "off"}
    )
    try:
        with Net() as net:
            for name in args.topologies.split(","):
                cells += await run_topology(
                    name,
                    args.acks.split(","),
                    args.nemeses.split(","),
                    pg.url,
                    work,
                    net,
                    hold_s=args.hold,
                    cell_s=args.cell_seconds,
                    sell_s=args.sell_seconds,
                    seed=args.seed,
                    repeat=args.repeat,
                    prometheus=args.prometheus,
                )
    finally:
        await asyncio.to_thread(pg.stop)
        if args.keep:
            print(f"kept the nodes', services' and PostgreSQL's data and logs in {work}")
        else:  # a run leaves about 1 GB there
            await asyncio.to_thread(shutil.rmtree, work, True)
    return cells


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    cells = asyncio.run(run(args))
    command = "python -m loadtest.chaos " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"`{command.strip()}`, {started}\n\n{table(cells)}"
    (args.out / "chaos.md").write_text(text)
    (args.out / "chaos.json").write_text(json.dumps([asdict(c) for c in cells]))
    chart(cells, args.out / "chaos.png")
    print(f"\n{text}\nwrote {args.out / 'chaos.md'}, chaos.png, chaos.json")
    broken = [c for c in cells if c.ack == "replica" and not c.ok]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
