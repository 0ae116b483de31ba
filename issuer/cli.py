"""The `issuer` command: serve, flush, campaign load, call, report, reconciliation, reconcile,
rebuild, verify-draw, keys."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import msgspec

from issuer.config import Settings


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        workers=getattr(args, "workers", None),
    )


def _metrics_dir(settings: Settings) -> None:
    """Metrics of all processes go to one directory; must be set before prometheus_client
    is imported."""
    path = settings.data_dir.resolve() / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _metrics_dir(settings)
    from issuer import logs, server

    logs.setup(settings.log_level)
    server.serve(settings, [Path(p) for p in args.load])
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    from issuer import logs, server

    logs.setup(settings.log_level)
    server.run_worker(settings, settings.port)
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    from issuer import logs

    logs.setup(settings.log_level)
    if not settings.external_redis or not settings.database_url:
        raise SystemExit("issuer flush needs REDIS_URL and DATABASE_URL")

    async def run() -> None:
        import signal
        import socket

        from issuer import store, topology
        from issuer.flusher import Flusher

        assert settings.database_url
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if settings.metrics_port is not None:  # its own /metrics when deployed on its own
            from prometheus_client import start_http_server

            start_http_server(settings.metrics_port, addr=settings.host)
        pool = await store.connect_when_up(settings.database_url, stop)
        if pool is None:
            return
        redis = topology.connect(settings)
        # one name per host: a flusher restarted after a crash re-reads its own pending
        # entries at once instead of waiting for another consumer's idle-time rescue
        flusher = Flusher(
            redis,
            pool,
            consumer=socket.gethostname(),
            batch=settings.flush_batch,
            ack=settings.durable_ack,
            ack_replicas=settings.ack_replicas,
        )
        if args.once:
            print(f"flushed {await flusher.drain()} entries")
        else:
            await flusher.run(stop)
        await topology.close(redis)
        await pool.close()

    asyncio.run(run())
    return 0


def _client_key(settings: Settings, role: str | None, key_id: str | None) -> Any:
    from issuer.auth import load_keys

    keys = load_keys(settings.keys_path)
    if key_id:
        if key_id not in keys:
            raise SystemExit(f"no key {key_id} in {settings.keys_path}")
        return keys[key_id]
    for key in keys.values():
        if key.role == role:
            return key
    raise SystemExit(f"no key with role {role} in {settings.keys_path}")


async def _call(url: str, key: Any, method: str, path: str, payload: Any) -> tuple[int, Any]:
    import aiohttp

    from issuer.client import Client

    async with aiohttp.ClientSession() as session:
        resp = await Client(url, key, session).call(method, path, payload)
        return resp.status, resp.body


def _role_for(method: str, path: str) -> str:
    if path.endswith("/claims") or path.endswith("/registrations") or "/users/" in path:
        return "app"
    if path.startswith("/v1/vouchers"):
        return "app"
    return "ops"


def cmd_call(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    key = _client_key(settings, args.role or _role_for(args.method, args.path), args.key_id)
    payload = msgspec.json.decode(args.json) if args.json else None
    status, body = asyncio.run(_call(args.url, key, args.method.upper(), args.path, payload))
    print(status)
    print(msgspec.json.format(msgspec.json.encode(body)).decode())
    return 0 if status < 400 else 1


def _download(args: argparse.Namespace, path: str, default_name: str) -> tuple[Path, bytes]:
    """GET a file with the auditor key; refuse it if its bytes do not match their digest."""
    import hashlib

    import aiohttp

    from issuer.client import Client, RawResponse

    settings = Settings.from_env()
    key = _client_key(settings, "auditor", args.key_id)

    async def get() -> RawResponse:
        async with aiohttp.ClientSession() as session:
            return await Client(args.url, key, session).request("GET", path)

    got = asyncio.run(get())
    if got.status != 200:
        raise SystemExit(f"{got.status} {got.body.decode(errors='replace')}")
    digest = hashlib.sha256(got.body).hexdigest()
    if got.headers.get("X-Content-SHA256") not in (None, digest):
        raise SystemExit("download corrupted: SHA-256 differs from the server's")
    out = Path(args.out)
    target = out / default_name if out.is_dir() else out
    target.write_bytes(got.body)
    print(f"{target}  {len(got.body)} bytes  sha256 {digest}")
    return target, got.body


def cmd_report(args: argparse.Namespace) -> int:
    query = f"by={args.by}&format={args.format}"
    name = f"{args.campaign}-report-{args.by}.{args.format}"
    _download(args, f"/v1/campaigns/{args.campaign}/report?{query}", name)
    return 0


def cmd_reconciliation(args: argparse.Namespace) -> int:
    """The day's reconciliation file and, beside it, its digest in `sha256sum` format."""
    import hashlib

    name = f"{args.campaign}-{args.date}.csv"
    path = f"/v1/campaigns/{args.campaign}/reconciliation?date={args.date}"
    target, body = _download(args, path, name)
    digest_file = target.with_name(target.name + ".sha256")
    digest_file.write_text(f"{hashlib.sha256(body).hexdigest()}  {target.name}\n")
    return 0


def cmd_campaign_load(args: argparse.Namespace) -> int:
    from issuer.campaign_file import load_campaign_file

    settings = Settings.from_env()
    key = _client_key(settings, "ops", args.key_id)
    failed = 0
    for path in args.files:
        campaign_id, definition = load_campaign_file(Path(path))
        status, body = asyncio.run(
            _call(args.url, key, "PUT", f"/v1/campaigns/{campaign_id}", definition)
        )
        print(f"{path}: {status} {campaign_id}")
        if status >= 400:
            print(msgspec.json.encode(body).decode(), file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if not settings.external_redis or not settings.database_url:
        raise SystemExit("issuer reconcile needs REDIS_URL and DATABASE_URL")

    async def run() -> bool:
        from issuer import store, topology
        from issuer.reconcile import reconcile

        assert settings.database_url
        redis = topology.connect(settings)
        pool = await store.connect(settings.database_url)
        ok = True
        for campaign_id in args.campaigns:
            report = await reconcile(redis, pool, campaign_id)
            print(msgspec.json.encode(report).decode())
            ok = ok and report.ok
        await topology.close(redis)
        await pool.close()
        return ok

    return 0 if asyncio.run(run()) else 1


def cmd_rebuild(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if not settings.external_redis or not settings.database_url:
        raise SystemExit("issuer rebuild needs REDIS_URL and DATABASE_URL")
    if bool(args.campaigns) == args.all:
        raise SystemExit("issuer rebuild: name the campaigns or give --all")

    async def run() -> bool:
        from issuer import store, topology
        from issuer.rebuild import rebuild_campaigns

        assert settings.database_url
        redis = topology.connect(settings)
        pool = await store.connect(settings.database_url)
        try:
            return await rebuild_campaigns(redis, pool, args.campaigns or None, args.force)
        finally:
            await topology.close(redis)
            await pool.close()

    return 0 if asyncio.run(run()) else 1


def cmd_verify_draw(args: argparse.Namespace) -> int:
    """Recompute a published draw: 0 if it checks, 1 on any difference, 2 if unreadable."""
    from issuer.draw_rules import DrawDocument, verify

    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        doc = msgspec.json.decode(raw, type=DrawDocument)
    except (OSError, msgspec.DecodeError) as e:
        print(f"{args.file}: not a readable draw document: {e}", file=sys.stderr)
        return 2
    problems = verify(doc)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    won = sum(e.outcome == "won" for e in doc.applications)
    print(
        f"draw of {doc.campaign_id}/{doc.round_id} checks: {len(doc.applications)} applications,"
        f" {won} winners, root {doc.applications_root}"
    )
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    """Add a key with a random secret, printed this once; a running service takes it
    within seconds (or at once on SIGHUP)."""
    from issuer import keyfile
    from issuer.auth import KeysFileError

    path = Settings.from_env().keys_path
    try:
        key = keyfile.new_key(
            args.role,
            args.tenant,
            key_id=args.id,
            merchant_id=args.merchant_id,
            not_before=args.not_before,
            not_after=args.not_after,
        )
        keyfile.add(path, key)
    except KeysFileError as exc:
        raise SystemExit(str(exc)) from None
    print(f"added to {path}:")
    print("\n".join(keyfile.describe([key])))
    print(f"secret (shown once, never listed): {key.secret}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from issuer import keyfile
    from issuer.auth import KeysFileError

    path = Settings.from_env().keys_path
    try:
        gone = keyfile.revoke(path, args.id)
    except KeysFileError as exc:
        raise SystemExit(str(exc)) from None
    print(f"revoked {gone.id} ({gone.role}) in {path}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from issuer import keyfile
    from issuer.auth import load_keys

    print("\n".join(keyfile.describe(load_keys(Settings.from_env().keys_path).values())))
    return 0


def _moment(text: str) -> Any:
    """An RFC 3339 time with its offset (`--not-before`, `--not-after`)."""
    from datetime import datetime

    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text}: give the offset, e.g. 2026-12-03T10:00:00+08:00")
    return moment


def parser() -> argparse.ArgumentParser:
    from issuer.auth import ROLES

    p = argparse.ArgumentParser(prog="issuer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the service (embedded Redis/PostgreSQL by default)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="TOML",
        help="load a campaign file at start (repeatable)",
    )
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.set_defaults(func=cmd_worker)

    f = sub.add_parser("flush", help="run the stream -> PostgreSQL flusher alone")
    f.add_argument("--once", action="store_true", help="drain what is there and exit")
    f.set_defaults(func=cmd_flush)

    url = "http://127.0.0.1:8080"
    c = sub.add_parser("call", help="signed HTTP call: issuer call METHOD PATH [JSON]")
    c.add_argument("method")
    c.add_argument("path")
    c.add_argument("json", nargs="?")
    c.add_argument("--url", default=url)
    c.add_argument("--role", help="use the first key of this role from the keys file")
    c.add_argument("--key-id")
    c.set_defaults(func=cmd_call)

    camp = sub.add_parser("campaign", help="campaign files")
    camp_sub = camp.add_subparsers(dest="action", required=True)
    load = camp_sub.add_parser("load", help="PUT campaigns from TOML files")
    load.add_argument("files", nargs="+")
    load.add_argument("--url", default=url)
    load.add_argument("--key-id")
    load.set_defaults(func=cmd_campaign_load)

    rep = sub.add_parser("report", help="download a campaign report (CSV, XLSX or JSON)")
    rep.add_argument("campaign")
    rep.add_argument(
        "--by", default="total", choices=["total", "round", "day", "merchant", "category"]
    )
    rep.add_argument("--format", default="csv", choices=["csv", "xlsx", "json"])
    rep.add_argument("--out", default=".", help="file or directory (default: here)")
    rep.add_argument("--url", default=url)
    rep.add_argument("--key-id")
    rep.set_defaults(func=cmd_report)

    day = sub.add_parser(
        "reconciliation", help="download a day's reconciliation file and write its .sha256"
    )
    day.add_argument("campaign")
    day.add_argument("date", help="YYYY-MM-DD in the campaign's time zone")
    day.add_argument("--out", default=".", help="file or directory (default: here)")
    day.add_argument("--url", default=url)
    day.add_argument("--key-id")
    day.set_defaults(func=cmd_reconciliation)

    r = sub.add_parser("reconcile", help="compare Redis with PostgreSQL; non-zero on drift")
    r.add_argument("campaigns", nargs="+")
    r.set_defaults(func=cmd_reconcile)

    rb = sub.add_parser("rebuild", help="rebuild campaigns in Redis from PostgreSQL after a loss")
    rb.add_argument("campaigns", nargs="*")
    rb.add_argument("--all", action="store_true", help="every campaign PostgreSQL knows")
    rb.add_argument("--force", action="store_true", help="replace a campaign still in Redis")
    rb.set_defaults(func=cmd_rebuild)

    vd = sub.add_parser("verify-draw", help="recompute a lottery draw from its published JSON")
    vd.add_argument("file", help="the document of GET .../rounds/{round_id}/draw; - for stdin")
    vd.set_defaults(func=cmd_verify_draw)

    ks = sub.add_parser(
        "keys",
        help="the API keys file (ISSUER_KEYS_FILE): add, revoke, list;"
        " an edit keeps the file's other lines, comments included",
    )
    ks_sub = ks.add_subparsers(dest="action", required=True)
    add = ks_sub.add_parser("add", help="add a key with a random secret, printed once")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument(
        "--tenant",
        action="append",
        default=[],
        help="a tenant the key is scoped to (repeatable); none: platform-wide",
    )
    add.add_argument("--merchant-id", help="the merchant a merchant key acts for")
    add.add_argument("--id", help="the key id (default: <tenant>-<role>-<random>)")
    add.add_argument("--not-before", type=_moment, help="RFC 3339, e.g. 2026-12-03T10:00:00+08:00")
    add.add_argument("--not-after", type=_moment, help="RFC 3339; the key is refused from then")
    add.set_defaults(func=cmd_keys_add)
    rv = ks_sub.add_parser("revoke", help="remove a key: it is refused within seconds")
    rv.add_argument("id")
    rv.set_defaults(func=cmd_keys_revoke)
    ls = ks_sub.add_parser("list", help="ids, roles, tenants and validity; never secrets")
    ls.set_defaults(func=cmd_keys_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
