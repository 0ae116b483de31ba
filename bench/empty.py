"""The bare-handler baselines, on aiohttp+uvloop: (a) answers every claim request with a
fixed small JSON body without reading it; (h), the floor of a refusal, does only the work
no refused claim can skip, with the service's own functions: reads the body, checks the
HMAC signature and the timestamp (`auth.verify`), decodes the claim with msgspec
(`ClaimIn`), checks the ID number (`identity.normalise_id_number`: format, check digit,
province, birth date), and answers a 409 encoded once at start; no nonce, no campaign, no
log line, no count. `python -m bench.empty --port P [--floor KEYS.toml]`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import msgspec
import uvloop
from aiohttp import web

from bench.serving import serve
from issuer.auth import ApiKey, load_keys, verify
from issuer.errors import ApiError
from issuer.identity import normalise_id_number
from issuer.model import ClaimIn

BODY = b'{"status":"ok"}'
DECODER = msgspec.json.Decoder(ClaimIn)
REFUSAL = msgspec.json.encode(ApiError("ROUND_QUOTA_EXHAUSTED").envelope())
PATH = "/v1/campaigns/{campaign_id}/claims"


async def handle(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


def floor(keys: dict[str, ApiKey]) -> web.Application:
    """Baseline (h): a refusal's essential work and nothing else."""

    async def refuse(request: web.Request) -> web.Response:
        raw = await request.read()
        verify(keys, request.method, request.path_qs, request.headers, raw, time.time())
        claim = DECODER.decode(raw)
        if claim.person is not None:  # the bench's claims name a person
            normalise_id_number(claim.person.id_number)
        return web.Response(body=REFUSAL, status=409, content_type="application/json")

    app = web.Application()
    app.router.add_post(PATH, refuse)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--floor", type=Path, help="the service's keys file: serve (h), not (a)")
    args = parser.parse_args()
    if args.floor is not None:
        app = floor(load_keys(args.floor))
    else:
        app = web.Application()
        app.router.add_post(PATH, handle)
    uvloop.run(serve(app, args.host, args.port))


if __name__ == "__main__":
    main()
