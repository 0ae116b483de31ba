"""Writing the keys file (`issuer keys add|revoke|list`, development keys): always whole,
readable by the service and mode 0600, replaced in one rename so that a worker reading it
meanwhile sees the old file or the new one, never a part."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import msgspec

from issuer.auth import ROLES, ApiKey, KeysFileError, Role, read_keys
from issuer.model import Id

SECRET_BYTES = 32


def render(keys: Iterable[ApiKey]) -> str:
    """The keys as the TOML the service reads (`[[key]]` tables)."""
    lines = []
    for k in keys:
        lines.append("[[key]]")
        for field in ApiKey.__struct_fields__:
            value = getattr(k, field)
            if value is not None:
                lines.append(f"{field} = {_toml(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()  # a TOML offset date-time
    if isinstance(value, frozenset):
        return "[" + ", ".join(_toml(v) for v in sorted(value)) + "]"
    return json.dumps(value, ensure_ascii=False)  # a TOML basic string


def write(path: Path, keys: Iterable[ApiKey]) -> None:
    """Replace the file with these keys (0600), after checking the service reads it back."""
    text = render(keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        read_keys(Path(tmp))  # never leave a file the service would refuse
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_key(
    role: Role,
    tenants: Iterable[str] = (),
    *,
    key_id: str | None = None,
    merchant_id: str | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> ApiKey:
    """A key with a random secret; its id names its scope and role unless given."""
    scope = sorted(tenants)
    default_id = f"{scope[0] if len(scope) == 1 else 'platform'}-{role}-{secrets.token_hex(3)}"
    try:
        return msgspec.convert(
            {
                "id": msgspec.convert(key_id or default_id, Id),
                "secret": secrets.token_hex(SECRET_BYTES),
                "role": role,
                "merchant_id": merchant_id,
                "tenants": scope or None,
                "not_before": not_before,
                "not_after": not_after,
            },
            ApiKey,
            builtin_types=(datetime,),
        )
    except msgspec.ValidationError as exc:
        raise KeysFileError(f"key: {exc}") from None


def add(path: Path, key: ApiKey) -> None:
    """Append `key` to the file (created if absent); KeysFileError if it cannot be."""
    keys = read_keys(path) if path.exists() else {}
    if key.id in keys:
        raise KeysFileError(f"keys file {path}: key {key.id} exists already")
    write(path, [*keys.values(), key])


def revoke(path: Path, key_id: str) -> ApiKey:
    """Remove a key from the file; returns it. The file may not end up empty."""
    keys = read_keys(path)
    if key_id not in keys:
        raise KeysFileError(f"keys file {path}: no key {key_id}")
    if len(keys) == 1:
        raise KeysFileError(f"keys file {path}: {key_id} is its last key; add another first")
    gone = keys.pop(key_id)
    write(path, keys.values())
    return gone


def describe(keys: Iterable[ApiKey], now: float | None = None) -> list[str]:
    """One line per key: id, role, tenants, merchant, validity; never its secret."""
    at = time.time() if now is None else now
    rows = [("id", "role", "tenants", "merchant", "not_before", "not_after", "now")]
    for k in keys:
        state = "valid" if k.valid_at(at) else "not yet" if _early(k, at) else "expired"
        rows.append(
            (
                k.id,
                k.role,
                ",".join(sorted(k.tenants)) if k.tenants else "(all: platform)",
                k.merchant_id or "-",
                k.not_before.isoformat() if k.not_before else "-",
                k.not_after.isoformat() if k.not_after else "-",
                state,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _early(key: ApiKey, now: float) -> bool:
    return key.not_before is not None and now < key.not_before.timestamp()


def write_dev_keys(path: Path, tenants: Iterable[str] = ()) -> dict[str, ApiKey]:
    """A development keys file: one platform-wide key per role (`dev-<role>`, first, so
    that tools taking "the first key of a role" get it), then one key per role scoped to
    each tenant (`<tenant>-<role>`; its merchant key acts for merchant `<tenant>-shop`)."""
    keys = [new_key(r, key_id=f"dev-{r}", merchant_id=_merchant(r, "demo-merchant")) for r in ROLES]
    for tenant in sorted(set(tenants)):
        keys += [
            new_key(r, [tenant], key_id=f"{tenant}-{r}", merchant_id=_merchant(r, f"{tenant}-shop"))
            for r in ROLES
        ]
    write(path, keys)
    return {k.id: k for k in keys}


def _merchant(role: Role, merchant_id: str) -> str | None:
    return merchant_id if role == "merchant" else None
