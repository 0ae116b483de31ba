"""Keys without a restart (API.md v1.2): validity windows under a controlled clock, the
`issuer keys` command, a malformed file at start, and a rotation under a steady flow of
claims: key B added and key A revoked by rewriting the file while both sign claims, then a
malformed rewrite, then a change only SIGHUP can notice."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from issuer import cli, keyfile
from issuer.auth import ApiKey, KeysFileError, read_keys, verify
from issuer.client import Client, signed_headers
from issuer.errors import ApiError
from issuer.keyring import POLL_S, Keyring
from tests.conftest import ROOT, Keyspace, Service, child_processes, running_service, unique_id
from tests.people import campaign, claim

T0 = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
RELOAD_BOUND_S = 5.0  # API.md: every worker within 5 s


# ------------------------------------------------------------------ validity windows


@pytest.mark.fast
@pytest.mark.parametrize(
    ("offset_s", "valid"),
    [(-1, False), (0, True), (3599, True), (3600, False), (7200, False)],
)
def test_a_key_signs_only_inside_its_window(offset_s: int, valid: bool) -> None:
    """[not_before, not_after): the clock is the server's `now`, the request's own
    timestamp follows it (as a client would sign)."""
    key = keyfile.new_key("app", not_before=T0, not_after=T0 + timedelta(hours=1))
    now = T0.timestamp() + offset_s
    headers = signed_headers(key, "GET", "/v1/x", b"", timestamp=int(now))
    if valid:
        assert verify({key.id: key}, "GET", "/v1/x", headers, b"", now).key == key
    else:
        with pytest.raises(ApiError) as refused:
            verify({key.id: key}, "GET", "/v1/x", headers, b"", now)
        assert refused.value.code == "UNAUTHENTICATED"
        assert "not_before" in str(refused.value)


@pytest.mark.fast
def test_a_file_is_taken_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    good = keyfile.new_key("ops", key_id="good")
    keyfile.write(path, [good])
    ring = Keyring.load(path)
    bad = [
        keyfile.render([good]) + '[[key]]\nid = "m"\nsecret = "s"\nrole = "merchant"\n',
        keyfile.render([good, good]),  # the same id twice
        keyfile.render([good]).replace('role = "ops"', 'role = "root"'),
        keyfile.render([good]) + "[[key]\n",
        "",  # no key at all
    ]
    for text in bad:
        path.write_text(text)
        with pytest.raises(KeysFileError, match=re.escape(str(path))):
            read_keys(path)
        assert not ring.reload()
        assert ring.current == {"good": good}


# ------------------------------------------------------------------ issuer keys


@pytest.mark.fast
def test_keys_command_adds_lists_and_revokes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    monkeypatch.setenv("ISSUER_KEYS_FILE", str(path))
    monkeypatch.setenv("ISSUER_DATA_DIR", str(tmp_path))
    assert cli.main(["keys", "add", "--role", "ops", "--tenant", "xiangning"]) == 0
    added = capsys.readouterr().out
    (secret,) = re.findall(r"secret \(shown once, never listed\): ([0-9a-f]{64})", added)
    assert path.stat().st_mode & 0o777 == 0o600
    (key,) = read_keys(path).values()
    assert (key.role, key.tenants, key.secret) == ("ops", frozenset({"xiangning"}), secret)
    assert key.id.startswith("xiangning-ops-")
    window = [
        "--not-before",
        "2026-12-03T10:00:00+08:00",
        "--not-after",
        "2027-01-01T00:00:00+08:00",
    ]
    shop = ["--merchant-id", "xixian-shop", "--id", "shop-key"]
    assert (
        cli.main(["keys", "add", "--role", "merchant", "--tenant", "xixian", *shop, *window]) == 0
    )
    capsys.readouterr()
    assert cli.main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert key.id in listed and "shop-key" in listed and "2027-01-01T00:00:00+08:00" in listed
    assert secret not in listed and read_keys(path)["shop-key"].secret not in listed
    with pytest.raises(SystemExit, match="needs merchant_id"):
        cli.main(["keys", "add", "--role", "merchant"])
    with pytest.raises(SystemExit, match="exists already"):
        cli.main(["keys", "add", "--role", "app", "--id", "shop-key"])
    assert cli.main(["keys", "revoke", "shop-key"]) == 0
    assert set(read_keys(path)) == {key.id}
    with pytest.raises(SystemExit, match="no key shop-key"):
        cli.main(["keys", "revoke", "shop-key"])
    with pytest.raises(SystemExit, match="last key"):
        cli.main(["keys", "revoke", key.id])
    assert path.stat().st_mode & 0o777 == 0o600


def table(key: ApiKey) -> str:
    """The key's table as `render` writes it, without its `[[key]]` line."""
    return keyfile.render([key]).split("\n", 1)[1]


@pytest.mark.fast
def test_keys_command_keeps_the_files_comments_order_and_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`issuer keys add|revoke` change the key's own lines only: the operator's comments,
    the order of the keys and the file's mode stay."""
    path = tmp_path / "keys.toml"
    monkeypatch.setenv("ISSUER_KEYS_FILE", str(path))
    monkeypatch.setenv("ISSUER_DATA_DIR", str(tmp_path))
    a, b, c = (keyfile.new_key("ops", key_id=f"ops-{n}") for n in "abc")
    head = "# Linfen platform keys\n# owner: the ops desk\n"
    first = f"[[key]]  # the first\n{table(a)}\n"
    second = f"# rotated 2026-11: Xiangning's ops\n[[key]]\n# its id:\n{table(b)}\n"
    third = f"[[key]]\n{table(c)}"
    path.write_text(head + first + second + third)
    path.chmod(0o640)

    assert cli.main(["keys", "add", "--role", "app", "--id", "app-d"]) == 0
    d = read_keys(path)["app-d"]
    assert path.read_text() == head + first + second + third + "\n" + keyfile.render([d])
    assert cli.main(["keys", "revoke", "ops-b"]) == 0  # with its comments
    assert path.read_text() == head + first + third + "\n" + keyfile.render([d])
    assert cli.main(["keys", "revoke", "ops-a"]) == 0  # the file's own comments stay
    assert path.read_text() == head + third + "\n" + keyfile.render([d])
    assert list(read_keys(path)) == ["ops-c", "app-d"]
    assert path.stat().st_mode & 0o777 == 0o640

    # a file of comments only, as an operator may start one
    started = tmp_path / "started.toml"
    started.write_text("# keys of the Xi County programme\n")
    keyfile.add(started, d)
    assert started.read_text() == "# keys of the Xi County programme\n\n" + keyfile.render([d])

    # a key written otherwise than as a table of its own: left for a person to remove
    inline = (
        f'key = [{{ id = "x", secret = "{a.secret}", role = "ops" }},'
        f' {{ id = "y", secret = "{b.secret}", role = "ops" }}]\n'
    )
    (tmp_path / "inline.toml").write_text(inline)
    monkeypatch.setenv("ISSUER_KEYS_FILE", str(tmp_path / "inline.toml"))
    with pytest.raises(SystemExit, match="not written as a \\[\\[key\\]\\] table"):
        cli.main(["keys", "revoke", "x"])
    assert (tmp_path / "inline.toml").read_text() == inline
    capsys.readouterr()


@pytest.mark.fast
def test_keys_added_at_once_are_all_kept(tmp_path: Path) -> None:
    """Writers at once (threads here; separate `issuer keys` processes lock alike): each
    reads the file under the lock, so none writes over another's key."""
    path = tmp_path / "keys.toml"
    keyfile.write(path, [keyfile.new_key("ops", key_id="first")])
    wanted = [keyfile.new_key("app", key_id=f"app-{n:02d}") for n in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: keyfile.add(path, key), wanted))
    assert set(read_keys(path)) == {"first"} | {k.id for k in wanted}


# ------------------------------------------------------------------ at start


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[[key]]\nid = "a"\nsecret = "s"\nrole = "app"\n[[key]\n', "Expected ']]'"),
        ('[[key]]\nid = "m"\nsecret = "s"\nrole = "merchant"\n', "key m needs merchant_id"),
    ],
)
def test_a_malformed_keys_file_stops_serve_at_once(
    keyspace: Keyspace, tmp_path: Path, text: str, error: str
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    env = {
        **os.environ,
        "REDIS_URL": keyspace.redis_url,
        "DATABASE_URL": keyspace.database_url,
        "ISSUER_DATA_DIR": str(tmp_path),
        "ISSUER_KEYS_FILE": str(path),
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "issuer.cli", "serve", "--port", "0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert f"keys file {path}" in done.stderr and error in done.stderr, done.stderr
    assert time.monotonic() - started < 25  # its imports, on a machine running other tests


# ------------------------------------------------------------------ rotation under load


@dataclass
class Answer:
    key: str
    sent: float  # monotonic
    status: int
    code: str


async def flow(client: Client, path: str, first: int, until: float, out: list[Answer]) -> None:
    """Claims one after another, each by a new person, until `until` (monotonic)."""
    n = first
    while time.monotonic() < until:
        sent = time.monotonic()
        resp = await client.call("POST", path, claim(n, request_id=f"rot-{n:08d}"))
        code = resp.body["error"]["code"] if resp.status >= 400 else "OK"
        out.append(Answer(client.key.id, sent, resp.status, code))
        n += 1
        await asyncio.sleep(0.02)


async def metric(service: Service, name: str) -> float:
    async with service.session.get(service.url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    )


@pytest.mark.solo  # answers timed against the reload bound
async def test_keys_rotate_under_load_without_a_restart(keyspace: Keyspace, workdir: Path) -> None:
    data_dir = workdir / f"data-{keyspace.name}-rotation"
    path = data_dir / "keys.toml"
    ops = keyfile.new_key("ops", key_id="ops")
    key_a, key_b = keyfile.new_key("app", key_id="app-a"), keyfile.new_key("app", key_id="app-b")
    past, future = datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(days=1)
    expired = keyfile.new_key("app", key_id="app-expired", not_after=past)
    later = keyfile.new_key("app", key_id="app-later", not_before=future)
    keyfile.write(path, [ops, key_a, expired, later])
    async with running_service(keyspace, data_dir) as service:
        ops_client = Client(service.url, ops, service.session)
        campaign_id = unique_id()
        assert (
            await ops_client.call("PUT", f"/v1/campaigns/{campaign_id}", campaign(quota=None))
        ).status == 201
        claims = f"/v1/campaigns/{campaign_id}/claims"
        for outside in (expired, later):
            refused = await Client(service.url, outside, service.session).call(
                "POST", claims, claim(1)
            )
            assert refused.status == 401 and "not_before" in refused.body["error"]["message"]
        workers = child_processes(service.proc.pid)

        answers: list[Answer] = []
        start = time.monotonic()
        end = start + 1.5 + RELOAD_BOUND_S + 0.75
        flows = [
            asyncio.create_task(
                flow(Client(service.url, k, service.session), claims, first, end, answers)
            )
            for k, first in ((key_a, 100_000), (key_b, 200_000))
        ]
        await asyncio.sleep(1.5)
        keyfile.write(path, [ops, key_b])  # B added, A revoked, in one rename
        rewritten = time.monotonic()
        await asyncio.gather(*flows)

        assert {(a.status, a.code) for a in answers} <= {(201, "OK"), (401, "UNAUTHENTICATED")}
        after = [a for a in answers if a.sent > rewritten + RELOAD_BOUND_S]
        before = [a for a in answers if a.sent + 0.5 < rewritten]  # answered before it
        for key, was, became in ((key_a.id, 201, 401), (key_b.id, 401, 201)):
            assert {a.status for a in before if a.key == key} == {was}, key
            assert {a.status for a in after if a.key == key} == {became}, key
        last_a = max(a.sent for a in answers if a.key == key_a.id and a.status == 201)
        first_b = min(a.sent for a in answers if a.key == key_b.id and a.status == 201)
        print(
            f"rotation: {len(answers)} claims in {end - start:.1f} s; A's last success"
            f" {last_a - rewritten:+.2f} s, B's first {first_b - rewritten:+.2f} s from the rewrite"
        )
        assert await metric(service, "issuer_keys_reload_errors_total") == 0

        # a malformed rewrite changes nothing: B still signs, A is still refused
        path.write_text(keyfile.render([ops, key_a]) + "[[key]\n")
        await asyncio.sleep(POLL_S * 2)
        b_client, a_client = (Client(service.url, k, service.session) for k in (key_b, key_a))
        assert (await b_client.call("POST", claims, claim(300_001))).status == 201
        assert (await a_client.call("POST", claims, claim(300_002))).status == 401
        workers_n = sum(" worker" in command for command in workers.values())
        assert await metric(service, "issuer_keys_reload_errors_total") == workers_n

        # a change the file's stat does not show (same size, inode and time): SIGHUP reads it
        keyfile.write(path, [ops, key_b])
        await asyncio.sleep(POLL_S * 2)
        assert (await b_client.call("POST", claims, claim(300_003))).status == 201
        stamp = path.stat()
        key_c = msgspec.structs.replace(key_b, secret=keyfile.new_key("app").secret)
        with path.open("r+") as f:
            f.write(keyfile.render([ops, key_c]))
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        await asyncio.sleep(POLL_S * 2)
        assert (await b_client.call("POST", claims, claim(300_004))).status == 201
        service.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        c_client = Client(service.url, key_c, service.session)
        assert (await c_client.call("POST", claims, claim(300_005))).status == 201
        assert (await b_client.call("POST", claims, claim(300_006))).status == 401
        assert child_processes(service.proc.pid) == workers, "a worker was restarted"
