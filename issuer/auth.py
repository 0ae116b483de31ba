"""HMAC request signatures (API.md "Authentication") and the keys file."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, NamedTuple

import msgspec

from issuer.errors import ApiError

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


class KeysFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    key: list[ApiKey]


class Verified(NamedTuple):
    key: ApiKey
    nonce: str
    timestamp: int


def load_keys(path: Path) -> dict[str, ApiKey]:
    try:
        parsed = msgspec.convert(tomllib.loads(path.read_text()), KeysFile)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise SystemExit(f"keys file {path}: {exc}") from None
    keys = {k.id: k for k in parsed.key}
    for k in parsed.key:
        if k.role == "merchant" and not k.merchant_id:
            raise SystemExit(f"keys file {path}: merchant key {k.id} needs merchant_id")
    return keys


def write_dev_keys(path: Path, merchant_id: str = "demo-merchant") -> dict[str, ApiKey]:
    """A keys file with one random key per role, for `make run` and tests."""
    keys = [
        ApiKey(
            id=f"dev-{role}",
            secret=secrets.token_hex(24),
            role=role,
            merchant_id=merchant_id if role == "merchant" else None,
        )
        for role in ROLES
    ]
    lines = []
    for k in keys:
        lines += ["[[key]]", f'id = "{k.id}"', f'secret = "{k.secret}"', f'role = "{k.role}"']
        if k.merchant_id:
            lines.append(f'merchant_id = "{k.merchant_id}"')
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return {k.id: k for k in keys}


def signature(
    secret: str, method: str, path_qs: str, timestamp: str, nonce: str, body: bytes
) -> str:
    message = "\n".join(
        (method.upper(), path_qs, timestamp, nonce, hashlib.sha256(body).hexdigest())
    )
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


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
    return Verified(key, nonce, int(ts))


def require_role(verified: Verified, *roles: Role) -> None:
    if verified.key.role not in roles:
        raise ApiError("FORBIDDEN", f"role {verified.key.role} may not call this endpoint")
