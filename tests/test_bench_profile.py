"""bench/profile.py reads callgrind's event totals and estimates cycles from them."""

from __future__ import annotations

import pytest

from bench import profile, report

pytestmark = pytest.mark.fast

SIMULATED = "\n".join(  # callgrind_control -e of a worker under --cache-sim (trimmed)
    [
        "PID 7: python -m bench.profile worker",
        "",
        "  Totals:  Ir  Dr  Dw  I1mr  D1mr  D1mw  ILmr  DLmr  DLmw  Bc  Bcm  Bi  Bim ",
        "   Th 1  1,000,000 300,000 200,000 2,000 3,000 1,000 100 200 50 150,000 4,000 20,000"
        " 1,500 ",
        "   Th 2  10,000 3,000 2,000 20 30 10 1 2 0 1,500 40 200 15 ",
        "   Th 3  5 ",  # a thread's trailing zero counts are left out
    ]
)


def test_instructions_alone_are_summed_over_threads() -> None:
    answer = "  Totals:         Ir \n   Th 1  1,234,567 \n   Th 2  10 \n"
    assert profile.events(answer) == {"Ir": 1_234_577}


def test_simulated_events_and_estimated_cycles() -> None:
    totals = profile.events(SIMULATED)
    assert totals["Ir"] == 1_010_005 and totals["Bim"] == 1_515 and totals["DLmw"] == 50
    per = {k: n / 10 for k, n in totals.items()}
    counted = profile.Counted("h", [per["Ir"]], 10, 0.0, [1.0], per)
    first = (2_020 + 3_030 + 1_010) / 10
    last = (101 + 202 + 50) / 10
    mispredicts = (4_040 + 1_515) / 10
    assert counted.cycles == per["Ir"] + 10 * first + 100 * last + 10 * mispredicts
    assert "estimated cycles" in report.simulated(counted)


def test_estimated_cycles_get_ratios_of_their_own_beside_the_instructions() -> None:
    def counted(scenario: str, ir: float, events: dict[str, float]) -> profile.Counted:
        return profile.Counted(scenario, [ir], 10, 0.0, [1.0], events)

    plain = [counted("h", 300.0, {}), counted("c", 375.0, {})]
    assert [p.name for p in report.instruction_parts(plain)] == [
        "instructions, sold-out refusal (c) / floor (h)"
    ]
    none = dict.fromkeys(report.SIMULATED, 0.0)
    simulated = [
        counted("h", 300.0, {**none, "Ir": 300.0, "D1mr": 10.0}),
        counted("c", 375.0, {**none, "Ir": 375.0, "D1mr": 22.5}),
    ]
    parts = {p.name: p for p in report.instruction_parts(simulated)}
    cycles = parts["estimated cycles, sold-out refusal (c) / floor (h)"]
    assert cycles.value == 600.0 / 400.0 and cycles.verdict == "measured"
    assert parts["instructions, sold-out refusal (c) / floor (h)"].value == 1.25
