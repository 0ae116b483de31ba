"""Medians over repetitions, the ratios against their targets, and the tables."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# (numerator, denominator, target): throughput ratios the service must reach
# (scenario, baseline, target); None: measured, no target (f/b, r/b: what durable acks cost)
TARGETS: tuple[tuple[str, str, float | None], ...] = (
    ("b", "a", 0.5),
    ("c", "a", 0.8),
    ("b", "d", 10.0),
    ("f", "b", None),
    ("r", "b", None),
)


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


def text_table(summaries: list[Summary], found: list[Ratio]) -> str:
    width = max(len(s.title) for s in summaries) + 4
    lines = [f"{'scenario':<{width}} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"]
    for s in summaries:
        title = f"({s.scenario}) {s.title}"
        lines.append(f"{title:<{width}} {s.rate:>9,.0f} {s.p50_ms:>8.1f} {s.p99_ms:>8.1f}")
    lines.append("")
    for r in found:
        lines.append(f"{r.name:<5} {r.value:>7.2f}   target {r.goal:<6} {r.verdict}")
    return "\n".join(lines)


def markdown(summaries: list[Summary], found: list[Ratio], setup: str) -> str:
    lines = [
        "| scenario | req/s (median) | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for s in summaries:
        lines.append(
            f"| ({s.scenario}) {s.title} | {s.rate:,.0f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} |"
        )
    lines += ["", "| ratio | value | target | |", "| --- | ---: | ---: | --- |"]
    for r in found:
        lines.append(f"| {r.name} | {r.value:.2f} | {r.goal} | {r.verdict} |")
    lines += ["", setup]
    return "\n".join(lines)


def write_json(
    path: Path,
    settings: dict[str, Any],
    runs: list[RunResult],
    summaries: list[Summary],
    found: list[Ratio],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "settings": settings,
        "runs": [asdict(r) for r in runs],
        "medians": [asdict(s) for s in summaries],
        "ratios": [{**asdict(r), "verdict": r.verdict} for r in found],
    }
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
