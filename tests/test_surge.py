"""`make surge` in miniature: the same runner, Locust file and verifier, for ~10 s, with
Locust as a master and two workers so that what the workers saw must reach the verifier,
then a small crowd from the closed-loop generator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loadtest import surge
from tests.conftest import Keyspace

pytestmark = pytest.mark.solo  # Locust and shedding at a lag bound: alone on the machine

TOPOLOGIES = ("standalone", "cluster")  # the surge and its verifier on one server and a cluster


async def test_short_surge_passes_the_verifier(
    keyspace: Keyspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", keyspace.redis_url)
    monkeypatch.setenv("DATABASE_URL", keyspace.database_url)
    argv = ["--users", "150", "--seconds", "10", "--ramp", "2", "--quota", "40", "--processes", "2"]
    argv += ["--overload", "300", "--overload-seconds", "2"]
    code = await asyncio.to_thread(surge.main, [*argv, "--out", str(tmp_path)])
    verdicts = (tmp_path / "verify.txt").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert code == 0, verdicts + summary
    assert "FAIL" not in verdicts and verdicts.count("PASS") >= 7, verdicts
    assert "| issued / quota | 40 / 40 |" in summary
    assert "| failures (Locust) | 0 |" in summary
    assert (tmp_path / "surge.png").stat().st_size > 10_000
    assert (tmp_path / "report.html").exists()
    # then the crowd above capacity, against a service that never sheds and one that does
    assert (
        "| never sheds | 300 |" in summary and "| sheds (queue 256, lag 50 ms) | 300 |" in summary
    )
