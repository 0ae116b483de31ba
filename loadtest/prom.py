"""A real Prometheus (Debian's `prometheus` binary) beside a chaos cell: it scrapes the
service's /metrics every second, evaluates deploy/prometheus/alerts-gate.yml every second,
and the harness reads the alerts back from Prometheus' own HTTP API, to see the alert for
a lost primary fire while the fault holds and resolve after it."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp

from bench.procs import ROOT, stop
from issuer.children import die_with_parent
from issuer.embedded import free_port

RULES = ROOT / "deploy" / "prometheus" / "alerts-gate.yml"
LOST_PRIMARY = "IssuerRedisPrimaryMissing"
START_S = 30.0


class Prometheus:
    """Prometheus on 127.0.0.1 scraping `target` (host:port) with the gate's rules."""

    def __init__(self, work: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("Debian's prometheus package is needed (apt-get install prometheus)")
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy(RULES, work / RULES.name)
        (work / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES.name}\n"
            "scrape_configs:\n  - job_name: issuer\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        with (work / "prometheus.log").open("a") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )

    async def ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            try:
                async with session.get(self.url + "/-/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"prometheus at {self.url} not ready after {START_S:g} s")

    async def alert_state(self, session: aiohttp.ClientSession, name: str) -> str:
        """ "firing", "pending" or "inactive", as /api/v1/alerts says of alert `name`."""
        async with session.get(self.url + "/api/v1/alerts") as resp:
            alerts = (await resp.json())["data"]["alerts"]
        states = {a["state"] for a in alerts if a["labels"].get("alertname") == name}
        return "firing" if "firing" in states else "pending" if states else "inactive"

    def stop(self) -> None:
        stop(self.proc)
