"""Baseline (a): an aiohttp+uvloop handler that answers every claim request with a fixed
small JSON body, without reading it. `python -m bench.empty --port P`."""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import web

from bench.serving import serve

BODY = b'{"status":"ok"}'


async def handle(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/campaigns/{campaign_id}/claims", handle)
    uvloop.run(serve(app, args.host, args.port))


if __name__ == "__main__":
    main()
