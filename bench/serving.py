"""Run an aiohttp app in one of N worker processes sharing a port (SO_REUSEPORT), as the
issuer's workers do, until SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from issuer.server import reuseport_socket

READY_LINE = "listening"


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve `app` on host:port, print READY_LINE once accepting, stop on SIGTERM/SIGINT."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, reuseport_socket(host, port, listen=True)).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(READY_LINE, flush=True)
    await stop.wait()
    await runner.cleanup()
