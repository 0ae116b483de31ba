"""deploy/prometheus/ as Prometheus reads it: the rules files (YAML holding rule `groups`),
the promtool unit tests beside them (`<name>.test.yml`), the server's configuration, and
promtool to run on them."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: the unit tests are long


def load(path: Path) -> dict[str, Any]:
    doc = yaml.load(path.read_text(), Loader=LOADER)
    return doc if isinstance(doc, dict) else {}


def unit_test_files() -> list[Path]:
    return sorted(PROMETHEUS_DIR.rglob("*.test.yml"))


def rules_files() -> list[Path]:
    """Every YAML file here that holds rule groups (the unit tests and the config hold none)."""
    tests = set(unit_test_files())
    found = [*PROMETHEUS_DIR.rglob("*.yml"), *PROMETHEUS_DIR.rglob("*.yaml")]
    return sorted(p for p in found if p not in tests and "groups" in load(p))


def alert_names(rules_file: Path) -> list[str]:
    return [r["alert"] for g in load(rules_file)["groups"] for r in g["rules"] if "alert" in r]


def rule_files_of(path: Path) -> set[Path]:
    """The rules files that a unit-test file or the configuration loads (globs, relative to
    the file, as Prometheus and promtool read them)."""
    return {p for pattern in load(path).get("rule_files", []) for p in path.parent.glob(pattern)}


def promtool_passes(promtool: str, *args: str, stdin: str | None = None) -> str:
    """Run promtool; its output, once it exited 0 (else the test fails showing it)."""
    done = subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{output}"
    return output
