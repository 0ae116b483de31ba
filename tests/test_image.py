"""deploy/Dockerfile built with podman from the wheelhouse and run as deploy/k8s runs it
(read-only root, tmpfs data directories, no capabilities, the keys file mounted) against
the suite's Valkey and PostgreSQL: /readyz, a signed claim recorded in PostgreSQL by the
image's own flusher, the image's HEALTHCHECK, every process non-root, and a clean stop on
SIGTERM. The base image is deploy/podman-base.sh's (.ci/run makes it before the suite);
skipped, with the reason, where podman or that base is missing or cannot run a container."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from issuer.auth import ApiKey
from issuer.client import Client
from issuer.embedded import free_port
from issuer.keyfile import write_dev_keys
from tests.conftest import NO_SHEDDING, ROOT, Keyspace, unique_id, wait_drained
from tests.people import campaign, claim
from tests.test_deploy import config_map, k8s_named

BASE_IMAGE = "localhost/issuer-base:bookworm"  # deploy/podman-base.sh's
WHEELS = ROOT / "wheels"  # the wheelhouse in the build context (deploy/wheelhouse.sh)
# Debian's podman on these machines: crun cannot run under hybrid cgroups, and a container
# may not raise its open-files limit (podman's default ulimits do)
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n'
GRACEFUL_STOP = ("stopping: workers first, then the flusher drains", "worker stopped")

# the build alone takes about a minute here
pytestmark = [pytest.mark.timeout(900), pytest.mark.long]


def k8s_writable() -> list[str]:
    """Where deploy/k8s's API pod can write (its root filesystem is read-only): the mount
    points of its volumes that are not read-only."""
    (pod,) = k8s_named("Deployment", "issuer")["spec"]["template"]["spec"]["containers"]
    return [m["mountPath"] for m in pod["volumeMounts"] if not m.get("readOnly")]


def run(*command: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def checked(done: subprocess.CompletedProcess[str]) -> str:
    """stdout of a command that must succeed; else a failure with its stderr's end."""
    assert done.returncode == 0, f"{done.args[:2]} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout.strip()


class Podman:
    """The podman command under this test's containers.conf."""

    def __init__(self, conf: Path) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, timeout: float = 120) -> str:
        return checked(self.run(*args, timeout=timeout))

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run("podman", *args, env=self.env, timeout=timeout)

    def fails(self, *args: str) -> str:
        """Why `podman args` fails: its stderr, or "" when it succeeds."""
        done = self.run(*args)
        return "" if done.returncode == 0 else done.stderr.strip() or f"exit {done.returncode}"

    def logs(self, cid: str) -> str:
        """What the container wrote: the banner on stdout, then the JSON log of stderr."""
        done = self.run("logs", cid)
        return done.stdout + done.stderr


class Container:
    def __init__(self, cid: str, url: str, keys: dict[str, ApiKey]) -> None:
        self.id = cid
        self.url = url
        self.keys = keys

    def client(self, role: str, session: aiohttp.ClientSession) -> Client:
        return Client(self.url, next(k for k in self.keys.values() if k.role == role), session)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (.ci/run installs it)")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    cmd = Podman(conf)
    if cmd.fails("image", "exists", BASE_IMAGE):
        pytest.skip(f"no {BASE_IMAGE}: make it with deploy/podman-base.sh (as root, minutes)")
    if why := cmd.fails("run", "--rm", "--network", "none", BASE_IMAGE, "true"):
        pytest.skip(f"podman cannot run a container here: {why[-500:]}")
    return cmd


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image's id: the wheelhouse refreshed, then deploy/Dockerfile built on the local
    base (docker format, which keeps the HEALTHCHECK). Removed afterwards."""
    python = {**os.environ, "PYTHON": sys.executable}
    checked(run("deploy/wheelhouse.sh", str(WHEELS), env=python, timeout=600))
    iidfile = tmp_path_factory.mktemp("image") / "iid"
    try:
        podman(
            "build", "--format", "docker", "--layers=false", "--force-rm",
            "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--iidfile", str(iidfile),
            "--file", "deploy/Dockerfile", ".",
            timeout=900,
        )  # fmt: skip
        yield iidfile.read_text().strip()
    finally:
        if iidfile.exists():
            podman("rmi", "--force", iidfile.read_text().strip())


def wait_ready(podman: Podman, cid: str, url: str, within_s: float = 180) -> None:
    """Until /readyz answers 200; fails early, with the logs, if the container exits."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:  # refused, or an HTTPError (503) while it starts
            pass
        if podman("inspect", "--format", "{{.State.Running}}", cid) != "true":
            break
        time.sleep(0.5)
    pytest.fail(f"the container did not become ready:\n{podman.logs(cid)[-3000:]}")


@pytest.fixture(scope="module")
def container(
    podman: Podman, image: str, keyspace: Keyspace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    """`issuer serve` in the image on the host's network, bound to loopback only, with the
    keys file where deploy/k8s mounts it and tmpfs where its pod has volumes."""
    keys_path = config_map()["ISSUER_KEYS_FILE"]
    keys_file = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys = write_dev_keys(keys_file)
    keys_file.chmod(0o644)  # readable by the image's user
    port = free_port()
    env = {
        "REDIS_URL": keyspace.redis_url,
        "DATABASE_URL": keyspace.database_url,
        "ISSUER_PERSON_KEY": "test-person-key",
        "ISSUER_KEYS_FILE": keys_path,
        "ISSUER_PORT": str(port),  # the HEALTHCHECK reads it too
        "ISSUER_WORKERS": "1",
        "ISSUER_SHUTDOWN_GRACE_S": "0",
        **NO_SHEDDING,
    }
    cid = podman(
        "run", "--detach", "--network", "host",
        "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--health-interval", "disable",
        *(f"--tmpfs={path}:rw,U" for path in k8s_writable()),
        "--volume", f"{keys_file}:{keys_path}:ro",
        *(f"--env={name}={value}" for name, value in env.items()),
        image, "serve", "--host", "127.0.0.1",
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(podman, cid, url)
        yield Container(cid, url, keys)
    finally:
        podman("rm", "--force", "--time", "0", cid)


async def test_ready_and_a_signed_claim_is_issued_and_recorded(
    container: Container, pg: asyncpg.Pool
) -> None:
    campaign_id = unique_id()
    async with aiohttp.ClientSession() as session:
        async with session.get(container.url + "/readyz") as resp:
            assert resp.status == 200, await resp.text()
        ops, app = container.client("ops", session), container.client("app", session)
        resp = await ops.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(quota=5))
        assert resp.status == 201, resp.body
        resp = await app.call("POST", f"/v1/campaigns/{campaign_id}/claims", claim(1))
        assert resp.status == 201, resp.body
        voucher_id = resp.body["voucher_id"]
        await wait_drained(session, container.url)
    recorded = await pg.fetchval(
        "SELECT voucher_id FROM vouchers WHERE campaign_id = $1", campaign_id
    )
    assert recorded == voucher_id


def test_the_image_healthcheck_passes(podman: Podman, container: Container) -> None:
    podman("healthcheck", "run", container.id)


def test_every_process_runs_as_the_image_user(podman: Podman, container: Container) -> None:
    rows = podman("top", container.id, "user", "huser", "args").splitlines()[1:]
    processes = [row.split(None, 2) for row in rows]
    assert len(processes) == 3, processes  # supervisor, one worker, the flusher
    assert {(user, uid) for user, uid, _ in processes} == {("issuer", "10001")}, processes


def test_sigterm_stops_it_cleanly(podman: Podman, container: Container) -> None:
    podman("stop", "--time", "60", container.id)  # SIGTERM; SIGKILL only after 60 s
    assert podman("inspect", "--format", "{{.State.ExitCode}}", container.id) == "0"
    logs = podman.logs(container.id)
    for line in GRACEFUL_STOP:
        assert line in logs, logs[-3000:]
    assert "killing it" not in logs, logs[-3000:]
