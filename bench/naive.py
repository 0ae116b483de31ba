"""Baseline (d): the claim as one PostgreSQL transaction per request, no Redis, no batching.

Same request as the service (signature checked, body validated, person_ref computed), then
BEGIN; INSERT the voucher (unique per campaign and person); UPDATE the campaign's budget row
`WHERE available_fen >= reserve AND issued < quota`; COMMIT (or ROLLBACK and refuse).
The pool skips asyncpg's reset query on release (nothing to reset here; saves a round trip).
`python -m bench.naive --port P --dsn DSN --keys KEYS.toml --person-key K --pool N`.
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from pathlib import Path

import asyncpg
import msgspec
import uvloop
from aiohttp import web

from bench.serving import serve
from issuer.auth import ApiKey, load_keys, verify
from issuer.errors import ApiError
from issuer.http import error_response, reply
from issuer.identity import person_ref
from issuer.model import ClaimIn

SCHEMA = """
CREATE TABLE IF NOT EXISTS naive_budget (
    campaign_id   text PRIMARY KEY,
    available_fen bigint  NOT NULL,
    issued        integer NOT NULL,
    quota         integer NOT NULL
);
CREATE TABLE IF NOT EXISTS naive_vouchers (
    voucher_id  text PRIMARY KEY,
    campaign_id text   NOT NULL,
    person_ref  text   NOT NULL,
    user_id     text   NOT NULL,
    request_id  text   NOT NULL,
    reserve_fen bigint NOT NULL,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (campaign_id, person_ref)
);
"""
INSERT = """
INSERT INTO naive_vouchers (voucher_id, campaign_id, person_ref, user_id, request_id, reserve_fen)
VALUES ($1, $2, $3, $4, $5, $6)
"""
TAKE = """
UPDATE naive_budget SET available_fen = available_fen - $2, issued = issued + 1
WHERE campaign_id = $1 AND available_fen >= $2 AND issued < quota
RETURNING issued
"""
RESERVE_FEN = 200_000
DECODER = msgspec.json.Decoder(ClaimIn)


async def setup(admin_dsn: str, database: str, campaign_id: str) -> str:
    """Create the database and tables (if missing) and a campaign with money for ever;
    returns the database's DSN."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    dsn = admin_dsn.rsplit("/", 1)[0] + f"/{database}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        await conn.execute(
            "INSERT INTO naive_budget VALUES ($1, $2, 0, $3) ON CONFLICT DO NOTHING",
            campaign_id,
            10**15,
            2**31 - 1,
        )
    finally:
        await conn.close()
    return dsn


class Naive:
    """The handler and what it needs."""

    def __init__(self, pool: asyncpg.Pool, keys: dict[str, ApiKey], person_key: bytes) -> None:
        self.pool = pool
        self.keys = keys
        self.person_key = person_key

    async def claim(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            verify(self.keys, request.method, request.path_qs, request.headers, raw, time.time())
            body = DECODER.decode(raw)
            if body.person is None:
                raise ApiError("INVALID_REQUEST", "person: required")
            ref = person_ref(self.person_key, body.person.id_number)
        except ApiError as err:
            return error_response(err)
        except (msgspec.DecodeError, ValueError) as exc:
            return error_response(ApiError("INVALID_REQUEST", str(exc)))
        campaign_id = request.match_info["campaign_id"]
        voucher_id = f"{campaign_id}.{base64.b32encode(os.urandom(10)).decode().lower()}"
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    INSERT, voucher_id, campaign_id, ref, body.user_id, body.request_id, RESERVE_FEN
                )
                if await conn.fetchval(TAKE, campaign_id, RESERVE_FEN) is None:
                    raise ApiError("ROUND_QUOTA_EXHAUSTED")  # rolls the insert back
        except ApiError as err:
            return error_response(err)
        except asyncpg.UniqueViolationError:
            return error_response(ApiError("ALREADY_CLAIMED"))
        payload = {"voucher_id": voucher_id, "campaign_id": campaign_id, "status": "issued"}
        return reply(payload, 201)


async def no_reset(conn: asyncpg.Connection) -> None:
    """Release a connection as it is: every transaction here ends before release."""


async def run(args: argparse.Namespace) -> None:
    pool = await asyncpg.create_pool(
        args.dsn, min_size=args.pool, max_size=args.pool, reset=no_reset
    )
    assert pool is not None
    naive = Naive(pool, load_keys(Path(args.keys)), args.person_key.encode())
    app = web.Application()
    app.router.add_post("/v1/campaigns/{campaign_id}/claims", naive.claim)
    try:
        await serve(app, args.host, args.port)
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--keys", required=True)
    parser.add_argument("--person-key", required=True)
    parser.add_argument("--pool", type=int, default=8, help="connections per worker")
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
