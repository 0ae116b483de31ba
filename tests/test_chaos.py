"""The nemesis harness (`loadtest.chaos`, the whole matrix is `make chaos`) in short cells:
each nemesis alone — kill -9, the old primary started again early, pause, a primary cut
off alone or with all its replicas but one, the service cut off from the primary — on each
topology (Sentinel 1+2+3, Cluster 3+3, Cluster 3+6) with ISSUER_DURABLE_ACK=replica,
while a crowd claims. Every cell must lose nothing it told and over-issue nothing, and
pass the verifier and reconcile. On the Sentinel set a real Prometheus scrapes the
service every second during the cut-off cell: the lost-primary alert must fire while the
fault holds and resolve after it.

Each Valkey node is on its own loopback address and the partitions are packet-filter
rules (`loadtest.nemesis.Net`), so the suite needs root and iptables (`.ci/run` installs
it), and Debian's prometheus for the alert."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from loadtest.chaos import progress, run_topology
from loadtest.nemesis import Net
from tests.conftest import Keyspace

pytestmark = pytest.mark.solo  # nemeses, iptables, time windows: alone on the machine

NEMESES = ["kill", "restart-early", "pause", "partition", "partition-half", "partition-clients"]
HOLD_S = 3.0  # a partition's length
CELL_S = 20.0  # a cell's fault and sell-out, at most
SELL_S = 3.0  # a cell's quota: what the crowd claims in this long unhindered


@pytest.mark.parametrize("rig", ["sentinel", "cluster", "cluster-3x2"])
async def test_no_fault_loses_or_over_issues_a_told_claim(
    rig: str, keyspace: Keyspace, workdir: Path
) -> None:
    # on 3+3 the primary has one replica: partition-half is partition
    nemeses = [n for n in NEMESES if rig != "cluster" or n != "partition-half"]
    work = workdir / f"chaos-{rig}"
    try:
        with Net() as net:
            cells = await run_topology(
                rig,
                ["replica"],
                nemeses,
                keyspace.database_url,
                work,
                net,
                hold_s=HOLD_S,
                cell_s=CELL_S,
                sell_s=SELL_S,
                repeat=1,  # restart-early once per cell (make chaos: three times)
                prometheus=rig == "sentinel",
            )
    finally:  # the nodes' AOFs and logs: hundreds of MB
        await asyncio.to_thread(shutil.rmtree, work, True)
    assert [c.nemesis for c in cells] == nemeses
    broken = [progress(c) for c in cells if not c.ok]
    assert not broken, "\n".join(broken)
    if rig == "sentinel":
        (watched,) = [c for c in cells if c.alert_fired_s is not None]
        assert watched.alert_fired_s is not None and watched.alert_fired_s >= 10
        assert watched.alert_resolved_s is not None and watched.alert_resolved_s >= 0
