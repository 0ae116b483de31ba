"""Medians over repetitions, the ratios against their targets, and the tables."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.profile import Counted

# (scenario, baseline, target): throughput ratios the service must reach; None: measured,
# no target (x/a: against the empty handler, as before the floor (h) was measured; b/d:
# against the naive app; f/b, r/b: what durable acks cost; p/a, p/b: what an application
# to a lottery round costs, next to the empty handler and a first-come claim)
TARGETS: tuple[tuple[str, str, float | None], ...] = (
    ("c", "h", 0.85),
    ("g", "h", 0.85),
    ("h", "a", None),
    ("b", "a", None),
    ("c", "a", None),
    ("g", "a", None),
    ("b", "d", None),
    ("f", "b", None),
    ("r", "b", None),
    ("p", "a", None),
    ("p", "b", None),
)
# CPU per request by part, each median over the repetitions: (name, scenario, CPU groups,
# the baseline scenario whose worker CPU it is divided by or None for µs, the ceiling or
# None: measured, no target)
PARTS: tuple[tuple[str, str, tuple[str, ...], str | None, float | None], ...] = (
    ("worker CPU, sold-out refusal (c) / floor (h)", "c", ("issuer",), "h", 1.2),
    ("worker CPU, refusal before the opening (g) / floor (h)", "g", ("issuer",), "h", 1.2),
    ("worker CPU, issued claim (b) / floor (h)", "b", ("issuer",), "h", 1.6),
    ("worker CPU, redemption (e) / empty (a)", "e", ("issuer",), "a", 5.0),
    ("worker CPU, floor (h) / empty (a)", "h", ("floor",), "a", None),
    ("worker CPU, sold-out refusal (c) / empty (a)", "c", ("issuer",), "a", None),
    ("worker CPU, refusal before the opening (g) / empty (a)", "g", ("issuer",), "a", None),
    ("worker CPU, issued claim (b) / empty (a)", "b", ("issuer",), "a", None),
    ("worker CPU per application (p) / empty (a)", "p", ("issuer",), "a", None),
    ("Valkey CPU µs per issued claim (b)", "b", ("valkey",), None, 40.0),
    ("Valkey CPU µs per redemption (e)", "e", ("valkey",), None, None),
    ("Valkey CPU µs per application (p)", "p", ("valkey",), None, None),
    ("flusher + PostgreSQL CPU µs per issued claim (b)", "b", ("flusher", "postgres"), None, 40.0),
)
# instructions per request (callgrind, bench/profile.py) by scenario, against a
# baseline's: (name, scenario, baseline, ceiling or None) - the CPU ceilings above, counted
# without the kernel's work in system calls
INSTRUCTION_PARTS: tuple[tuple[str, str, str, float | None], ...] = (
    ("instructions, sold-out refusal (c) / floor (h)", "c", "h", 1.2),
    ("instructions, refusal before the opening (g) / floor (h)", "g", "h", 1.2),
    ("instructions, issued claim (b) / floor (h)", "b", "h", 1.6),
    ("instructions, redemption (e) / empty (a)", "e", "a", 5.0),
    ("instructions, floor (h) / empty (a)", "h", "a", None),
    ("instructions, sold-out refusal (c) / empty (a)", "c", "a", None),
    ("instructions, issued claim (b) / empty (a)", "b", "a", None),
)
WORKERS = {"a": "empty", "h": "floor", "d": "naive"}  # the CPU group of each scenario's workers
SHED_PER = 10_000  # claims shed (503) are counted per this many answers


@dataclass
class RunResult:
    """One scenario, one repetition."""

    scenario: str
    rep: int
    rate: float
    p50_ms: float
    p99_ms: float
    count: int
    statuses: dict[int, int]
    cpu_cores: dict[str, float]
    cpu_others: dict[str, float]
    exhausted: bool
    troubles: int
    built: int
    build_s: float
    server: dict[str, float] = field(default_factory=dict)  # from the issuer's /metrics
    expected: int = 0  # the status every answer should have
    # the primary's command time and calls per answered request, by command (INFO
    # commandstats), and its cores by part (main thread, other threads, forked)
    valkey_us: dict[str, float] = field(default_factory=dict)
    valkey_calls: dict[str, float] = field(default_factory=dict)
    valkey_parts: dict[str, float] = field(default_factory=dict)

    @property
    def useful_rate(self) -> float:
        """Answers per second with the expected status (an issued claim, a redemption):
        what a figure "per issued claim" divides by (a claim shed with 503 is not one)."""
        if not self.count:
            return 0.0
        return self.rate * self.statuses.get(self.expected, 0) / self.count


@dataclass
class Summary:
    scenario: str
    title: str
    rate: float
    p50_ms: float
    p99_ms: float


@dataclass
class Ratio:
    name: str
    value: float
    target: float | None

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "measured"
        return "PASS" if self.value >= self.target else "MISS"

    @property
    def goal(self) -> str:
        return "—" if self.target is None else f"≥ {self.target:g}"


@dataclass
class Part:
    """A per-request figure against its ceiling (None: measured, no target): a ratio ("×"),
    µs ("µs") or a count ("")."""

    name: str
    value: float
    ceiling: float | None
    unit: str

    @property
    def verdict(self) -> str:
        if self.ceiling is None:
            return "measured"
        return "PASS" if self.value <= self.ceiling else "MISS"

    @property
    def goal(self) -> str:
        return "—" if self.ceiling is None else f"≤ {self.ceiling:g}{self._suffix}"

    @property
    def shown(self) -> str:
        digits = {"×": 2, "µs": 0}.get(self.unit, 1)
        return f"{self.value:.{digits}f}{self._suffix}"

    @property
    def _suffix(self) -> str:
        return {"×": "×", "µs": " µs"}.get(self.unit, "")


def cpu_us(runs: list[RunResult], scenario: str, groups: tuple[str, ...]) -> float | None:
    """Median µs of CPU per request that `groups` spent in `scenario`'s runs."""
    per = [
        sum(r.cpu_cores.get(g, 0.0) for g in groups) / r.rate * 1e6
        for r in runs
        if r.scenario == scenario and r.rate
    ]
    return statistics.median(per) if per else None


def cpu_us_useful(runs: list[RunResult], scenario: str, groups: tuple[str, ...]) -> float | None:
    """Median µs of CPU that `groups` spent per answer of the expected status in
    `scenario`'s runs (per issued claim, per redemption)."""
    per = [
        sum(r.cpu_cores.get(g, 0.0) for g in groups) / r.useful_rate * 1e6
        for r in runs
        if r.scenario == scenario and r.useful_rate
    ]
    return statistics.median(per) if per else None


def parts(runs: list[RunResult]) -> list[Part]:
    """The PARTS rows whose scenarios ran, then the claims shed in (b) per SHED_PER."""
    out = []
    for name, scenario, groups, baseline, ceiling in PARTS:
        if baseline is None:
            absolute = cpu_us_useful(runs, scenario, groups)
            if absolute is not None:
                out.append(Part(name, absolute, ceiling, "µs"))
            continue
        value = cpu_us(runs, scenario, groups)
        if value is None:
            continue
        base = cpu_us(runs, baseline, (WORKERS.get(baseline, "issuer"),))
        if base:
            out.append(Part(name, value / base, ceiling, "×"))
    claims = [r for r in runs if r.scenario == "b"]
    if claims:
        shed = sum(r.statuses.get(503, 0) for r in claims) / sum(r.count for r in claims)
        out.append(Part(f"claims shed in (b), per {SHED_PER:,}", shed * SHED_PER, 0, ""))
    return out


def summarise(titles: dict[str, str], runs: list[RunResult]) -> list[Summary]:
    """Per scenario, the median of each figure over its repetitions."""
    out = []
    for key, title in titles.items():
        mine = [r for r in runs if r.scenario == key]
        if mine:
            out.append(
                Summary(
                    key,
                    title,
                    statistics.median(r.rate for r in mine),
                    statistics.median(r.p50_ms for r in mine),
                    statistics.median(r.p99_ms for r in mine),
                )
            )
    return out


def ratios(summaries: list[Summary]) -> list[Ratio]:
    rate = {s.scenario: s.rate for s in summaries}
    return [
        Ratio(f"{a}/{b}", rate[a] / rate[b], target)
        for a, b, target in TARGETS
        if a in rate and rate.get(b)
    ]


def instruction_parts(counts: list[Counted]) -> list[Part]:
    """The INSTRUCTION_PARTS rows whose two scenarios were counted; with `--cache-sim`,
    the same ratios of estimated cycles after them (measured, no target)."""
    per = {c.scenario: c.median for c in counts}
    cycles = {c.scenario: c.cycles for c in counts if c.events}
    return [
        Part(name, per[scenario] / per[baseline], ceiling, "×")
        for name, scenario, baseline, ceiling in INSTRUCTION_PARTS
        if scenario in per and per.get(baseline)
    ] + [
        Part(name.replace("instructions", "estimated cycles", 1), cycles[a] / cycles[b], None, "×")
        for name, a, b, _ in INSTRUCTION_PARTS
        if a in cycles and cycles.get(b)
    ]


@dataclass
class Tables:
    """Everything a bench prints: medians, throughput ratios, CPU per request, counts."""

    summaries: list[Summary]
    found: list[Ratio]
    costs: list[Part]
    counts: list[Counted]

    @property
    def counted(self) -> list[Part]:
        return instruction_parts(self.counts)


SIMULATED = ("I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bcm", "Bim")


def simulated(c: Counted) -> str:
    """A count's simulated misses, mispredicts and estimated cycles per request."""
    shown = "  ".join(f"{k} {c.events[k]:,.0f}" for k in SIMULATED)
    return f"{shown}  estimated cycles {c.cycles:,.0f}"


def text_table(t: Tables) -> str:
    width = max((len(s.title) for s in t.summaries), default=0) + 4
    lines = [f"{'scenario':<{width}} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"]
    for s in t.summaries:
        title = f"({s.scenario}) {s.title}"
        lines.append(f"{title:<{width}} {s.rate:>9,.0f} {s.p50_ms:>8.1f} {s.p99_ms:>8.1f}")
    lines.append("")
    for r in t.found:
        lines.append(f"{r.name:<5} {r.value:>7.2f}   target {r.goal:<6} {r.verdict}")
    lines.append("")
    parts = t.costs + t.counted
    width = max((len(p.name) for p in parts), default=0)
    for p in parts:
        lines.append(f"{p.name:<{width}} {p.shown:>9}   target {p.goal:<8} {p.verdict}")
    if t.counts:
        lines += ["", "instructions per request (callgrind): median, each round, idle rate"]
        for c in t.counts:
            rounds = ", ".join(f"{x:,.0f}" for x in c.per_request)
            lines.append(
                f"  ({c.scenario}) {c.median:>12,.0f}   {rounds}   idle {c.idle_per_s:,.0f}/s"
            )
            if c.events:
                lines.append(f"      {simulated(c)}")
    return "\n".join(lines)


def markdown(t: Tables, setup: str) -> str:
    lines = [
        "| scenario | req/s (median) | p50 ms | p99 ms | instructions per request |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    per = {c.scenario: c.median for c in t.counts}
    for s in t.summaries:
        counted = f"{per[s.scenario]:,.0f}" if s.scenario in per else "—"
        lines.append(
            f"| ({s.scenario}) {s.title} | {s.rate:,.0f} | {s.p50_ms:.1f} | {s.p99_ms:.1f}"
            f" | {counted} |"
        )
    lines += ["", "| ratio | value | target | |", "| --- | ---: | ---: | --- |"]
    for r in t.found:
        lines.append(f"| {r.name} | {r.value:.2f} | {r.goal} | {r.verdict} |")
    lines += ["", "| per request | value | target | |", "| --- | ---: | ---: | --- |"]
    for c in t.costs + t.counted:
        lines.append(f"| {c.name} | {c.shown} | {c.goal} | {c.verdict} |")
    lines += ["", setup]
    return "\n".join(lines)


def write_json(path: Path, settings: dict[str, Any], runs: list[RunResult], t: Tables) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "settings": settings,
        "runs": [asdict(r) for r in runs],
        "medians": [asdict(s) for s in t.summaries],
        "ratios": [{**asdict(r), "verdict": r.verdict} for r in t.found],
        "cpu_per_request": [{**asdict(c), "verdict": c.verdict} for c in t.costs],
        "instructions_per_request": [asdict(c) for c in t.counts],
        "instruction_ratios": [{**asdict(c), "verdict": c.verdict} for c in t.counted],
    }
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
