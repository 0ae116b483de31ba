"""A client that signs requests like a consumer-app backend would (API.md "Authentication")."""

from __future__ import annotations

import secrets
import time
from typing import Any

import aiohttp
import msgspec

from issuer.auth import ApiKey, signature


def signed_headers(
    key: ApiKey,
    method: str,
    path_qs: str,
    body: bytes,
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_urlsafe(18)
    return {
        "X-Api-Key": key.id,
        "X-Timestamp": ts,
        "X-Nonce": nonce,
        "X-Signature": signature(key.secret, method, path_qs, ts, nonce, body),
        "Content-Type": "application/json",
    }


class Response(msgspec.Struct):
    status: int
    body: Any
    headers: dict[str, str]


class RawResponse(msgspec.Struct):
    status: int
    body: bytes
    headers: dict[str, str]


class Client:
    """Signed JSON calls against one base URL with one key."""

    def __init__(self, base_url: str, key: ApiKey, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.session = session

    async def request(self, method: str, path_qs: str, payload: Any = None) -> RawResponse:
        """A signed call whose answer is returned as bytes (CSV, XLSX, or JSON undecoded)."""
        body = b"" if payload is None else msgspec.json.encode(payload)
        headers = signed_headers(self.key, method, path_qs, body)
        async with self.session.request(
            method, self.base_url + path_qs, data=body, headers=headers
        ) as resp:
            return RawResponse(resp.status, await resp.read(), dict(resp.headers))

    async def call(self, method: str, path_qs: str, payload: Any = None) -> Response:
        raw = await self.request(method, path_qs, payload)
        decoded = msgspec.json.decode(raw.body) if raw.body else None
        return Response(raw.status, decoded, raw.headers)
