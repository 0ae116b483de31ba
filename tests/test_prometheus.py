"""deploy/prometheus/ checked by Prometheus' own promtool: every rules file and the server's
configuration pass `promtool check`, the configuration loads every rules file, every alert
has unit tests that see it fire and stay silent, and `promtool test rules` passes them all
(a new rules file and its `<name>.test.yml` are picked up without naming them here). The
promtool checks skip where promtool is not installed; the YAML checks never do."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.prometheus import (
    CONFIG,
    PROMETHEUS_DIR,
    alert_names,
    load,
    promtool_passes,
    rule_files_of,
    rules_files,
    unit_test_files,
)

ALERTS = PROMETHEUS_DIR / "alerts.yml"


@pytest.mark.fast
def test_the_configuration_loads_every_rules_file() -> None:
    assert ALERTS in rules_files()
    assert rule_files_of(CONFIG) == set(rules_files())


def test_the_rules_files_and_the_configuration_pass_promtool_check(promtool: str) -> None:
    promtool_passes(promtool, "check", "rules", "--lint-fatal", *map(str, rules_files()))
    # also reads the rules files the configuration names: a missing one fails
    promtool_passes(promtool, "check", "config", "--lint-fatal", str(CONFIG))


@pytest.mark.fast
def test_every_alert_has_a_unit_test_that_sees_it_fire_and_one_that_sees_it_silent() -> None:
    seen: dict[tuple[Path, str], set[str]] = {}  # (rules file, alert) -> what a case expects
    for test_file in unit_test_files():
        loaded = {rules: alert_names(rules) for rules in rule_files_of(test_file)}
        assert loaded, f"{test_file.name} loads no rules file"
        for group in load(test_file)["tests"]:
            for case in group.get("alert_rule_test", []):
                name = case["alertname"]
                owners = [rules for rules, names in loaded.items() if name in names]
                assert owners, f"{test_file.name} tests {name}, an alert its rules do not have"
                for rules in owners:
                    expects = "fires" if case.get("exp_alerts") else "stays silent"
                    seen.setdefault((rules, name), set()).add(expects)
    untested = {}
    for rules in rules_files():
        for name in alert_names(rules):
            missing = {"fires", "stays silent"} - seen.get((rules, name), set())
            if missing:
                untested[f"{rules.name}: {name}"] = sorted(missing)
    assert not untested, f"alerts with no unit test where they: {untested}"


def test_the_alert_unit_tests_pass(promtool: str) -> None:
    files = unit_test_files()
    assert PROMETHEUS_DIR / "alerts.test.yml" in files
    output = promtool_passes(promtool, "test", "rules", *map(str, files))
    assert output.count("SUCCESS") == len(files), output
