"""Idempotent writes: a write retried with the same request_id is answered as the first
time and never applied twice; retried with another body, it is refused
(IDEMPOTENCY_MISMATCH).

Its script looks the request up in the campaign's current and previous idempotency buckets
and stores its result in the current one (lua/lib.lua), so a retry is answered REPLAY for
24 to 48 hours (keys.IDEMPOTENCY_BUCKET_S)."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass

import msgspec

from issuer.errors import ApiError
from issuer.keys import CampaignKeys
from issuer.protocol import Request, Write
from issuer.scripts import Scripts

ENCODE = msgspec.json.Encoder()
OK_OR_REPLAY = ("OK", "REPLAY")


_DIGEST = hashlib.blake2b(digest_size=12)  # copied per request: cheaper than a new one


def fingerprint(payload: object) -> str:
    """Stable digest of a request body, to tell a replay from a reused request_id."""
    digest = _DIGEST.copy()
    digest.update(ENCODE.encode(payload))
    return digest.hexdigest()


def idem_field(key_id: str, request_id: str) -> str:
    """A request's field in an idempotency bucket: each API key has its own request ids."""
    return f"{key_id}|{request_id}"


def request(ck: CampaignKeys, now_s: float, key_id: str, request_id: str, body: object) -> Request:
    """The request of a write to campaign `ck` at `now_s`; `body` is what it must repeat."""
    current, previous = ck.idempotency(now_s)
    return Request(
        idem_current=current,
        idem_previous=previous,
        idem_field=idem_field(key_id, request_id),
        fingerprint=fingerprint(body),
    )


@dataclass(frozen=True, slots=True)
class Answer:
    code: str
    payload: list[bytes]  # the rest of the script's answer

    @property
    def replayed(self) -> bool:
        return self.code == "REPLAY"


async def write(
    scripts: Scripts,
    call: Write,
    what: str | None = None,
    accept: Collection[str] = OK_OR_REPLAY,
) -> Answer:
    """Run an idempotent write: its answer if its code is one of `accept`, else
    ApiError(code), NOT_FOUND naming `what`."""
    code, *payload = await scripts.run(call)
    answer = Answer(code.decode(), payload)
    if answer.code not in accept:
        raise ApiError(answer.code, what if answer.code == "NOT_FOUND" else None)
    return answer
