"""HMAC request signatures (API.md "Authentication") and the keys file."""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from issuer import hmacs
from issuer.errors import ApiError
from issuer.model import AwareDatetime, Id

Role = Literal["app", "merchant", "payment", "auditor", "ops"]
ROLES: tuple[Role, ...] = ("app", "merchant", "payment", "auditor", "ops")
MAX_SKEW_S = 300
NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
TIMESTAMP = re.compile(r"[0-9]{1,12}")
SIGNATURE = re.compile(r"[0-9A-Fa-f]{64}")


class ApiKey(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    id: str
    secret: str
    role: Role
    merchant_id: str | None = None
    # the tenants whose records the key reads and acts on; None: every tenant (platform-wide)
    tenants: Annotated[frozenset[Id], Meta(min_length=1)] | None = None
    # outside [not_before, not_after) the key is refused (401), so it can be rotated ahead
    not_before: AwareDatetime | None = None
    not_after: AwareDatetime | None = None

    def may_act_in(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def valid_at(self, now: float) -> bool:
        """Whether `now` (epoch s) lies in [not_before, not_after)."""
        if self.not_before is not None and now < self.not_before.timestamp():
            return False
        return self.not_after is None or now < self.not_after.timestamp()


class KeysFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # never empty: a file emptied by mistake (or read mid-write) would refuse everyone
    key: Annotated[list[ApiKey], Meta(min_length=1)]


class KeysFileError(ValueError):
    """A keys file that cannot be used as a whole; the message names the file and why."""


class Verified(msgspec.Struct, frozen=True):
    """A signed request's signer, nonce and X-Timestamp. A Struct: made without a Python
    frame (a NamedTuple's __new__ is one), its fields read by specialised attribute loads
    (a NamedTuple's are descriptors the interpreter reads the generic way each time)."""

    key: ApiKey
    nonce: str
    timestamp: int


def read_keys(path: Path) -> dict[str, ApiKey]:
    """Every key of the file by id, or KeysFileError: a file is used whole or not at all."""
    try:
        data = tomllib.loads(path.read_text())
        parsed = msgspec.convert(data, KeysFile, strict=False, builtin_types=(datetime,))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise KeysFileError(f"keys file {path}: {exc}") from None
    keys: dict[str, ApiKey] = {}
    for k in parsed.key:
        problem = _problem(k)
        if k.id in keys:
            problem = "appears twice"
        if problem:
            raise KeysFileError(f"keys file {path}: key {k.id} {problem}")
        keys[k.id] = k
    return keys


def _problem(key: ApiKey) -> str:
    """What makes a key unusable ("" if nothing)."""
    if key.role == "merchant" and not key.merchant_id:
        return "needs merchant_id (role merchant)"
    if key.not_before and key.not_after and key.not_before >= key.not_after:
        return "has not_before at or after not_after"
    return ""


def load_keys(path: Path) -> dict[str, ApiKey]:
    """`read_keys` for a command: a bad file ends it, naming the file and the error."""
    try:
        return read_keys(path)
    except KeysFileError as exc:
        raise SystemExit(str(exc)) from None


def signature(
    secret: str, method: str, path_qs: str, timestamp: str, nonce: str, body: bytes
) -> str:
    message = "\n".join(
        (method.upper(), path_qs, timestamp, nonce, hashlib.sha256(body).hexdigest())
    )
    return hmacs.keyed(secret.encode()).hexdigest(message)


def verify(
    keys: dict[str, ApiKey],
    method: str,
    path_qs: str,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
) -> Verified:
    """Check key, timestamp window, nonce format and signature; the nonce's freshness is
    checked by the caller in Redis (claims do it inside their batch script)."""
    get = headers.get
    key = keys.get(get("X-Api-Key") or "")
    ts, nonce, sig = get("X-Timestamp") or "", get("X-Nonce") or "", get("X-Signature") or ""
    if key is None:
        raise ApiError("UNAUTHENTICATED", "unknown or missing X-Api-Key")
    if not TIMESTAMP.fullmatch(ts) or abs(int(ts) - now) > MAX_SKEW_S:
        raise ApiError("UNAUTHENTICATED", "X-Timestamp missing or more than 300 s off")
    if not NONCE.fullmatch(nonce):
        raise ApiError("UNAUTHENTICATED", "X-Nonce must be 16-64 chars [A-Za-z0-9_-]")
    if not SIGNATURE.fullmatch(sig):
        raise ApiError("UNAUTHENTICATED", "X-Signature must be 64 hex digits")
    expected = signature(key.secret, method, path_qs, ts, nonce, body)
    if not hmac.compare_digest(expected, sig.lower()):
        raise ApiError("UNAUTHENTICATED", "bad X-Signature")
    if (key.not_before or key.not_after) and not key.valid_at(now):
        raise ApiError("UNAUTHENTICATED", "key outside its validity (not_before, not_after)")
    return Verified(key, nonce, int(ts))


def role_refused(key: ApiKey) -> ApiError:
    """The refusal of a key whose role may not call the endpoint (checked by the caller,
    in its own frame: every request is)."""
    return ApiError("FORBIDDEN", f"role {key.role} may not call this endpoint")
