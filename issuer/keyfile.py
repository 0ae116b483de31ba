"""Writing the keys file (`issuer keys add|revoke|list`, development keys).

`add` and `revoke` edit the file as text: every line but the key's own (its `[[key]]` table
and the comment lines right above it) stays as the operator wrote it, in its order. Each
edit holds an exclusive flock on a lock file beside it (`.<name>.lock`, never removed) from
reading the file to replacing it, so two `issuer keys` runs at once cannot lose one's
change. The new text is checked first (the service must read from it exactly the keys
intended), then put in place in one rename, with the mode and owner of the file it
replaces (a new file: 0600): a worker reading it meanwhile sees the old file or the new
one, never a part."""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
    """Replace the whole file with these keys."""
    wanted = list(keys)
    with _locked(path):
        _replace(path, render(wanted), {k.id: k for k in wanted})


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the file's edit lock. The lock file stays: removing it would let the next
    writer lock a new file while one still waits on the old."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def _replace(path: Path, text: str, expected: dict[str, ApiKey]) -> None:
    """Put `text` in place of the file in one rename, once the service reads from it
    exactly `expected`, in that order; the mode and owner stay the file's (new: 0600)."""
    before = path.stat() if path.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        if before is not None:
            os.fchmod(fd, before.st_mode & 0o7777)
            if (before.st_uid, before.st_gid) != (os.geteuid(), os.getegid()):
                _keep_owner(fd, path, before)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        found = read_keys(Path(tmp))  # never leave a file the service would refuse
        if list(found.items()) != list(expected.items()):
            raise KeysFileError(
                f"keys file {path}: editing it would change other keys than intended;"
                " nothing written, edit it by hand"
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def _keep_owner(fd: int, path: Path, before: os.stat_result) -> None:
    try:
        os.fchown(fd, before.st_uid, before.st_gid)
    except PermissionError:
        raise KeysFileError(
            f"keys file {path}: cannot keep its owner {before.st_uid}:{before.st_gid};"
            " run this as that user or as root"
        ) from None


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
    with _locked(path):
        text = path.read_text() if path.exists() else ""
        # a file of comments only (an operator's header, no key yet) holds no keys
        only_comments = all(not line.strip() or COMMENT.match(line) for line in text.splitlines())
        keys = {} if only_comments else read_keys(path)
        if key.id in keys:
            raise KeysFileError(f"keys file {path}: key {key.id} exists already")
        if text and not text.endswith("\n"):
            text += "\n"
        if text.strip() and not text.endswith("\n\n"):
            text += "\n"  # a blank line between the last table and the new one
        _replace(path, text + render([key]), {**keys, key.id: key})


def revoke(path: Path, key_id: str) -> ApiKey:
    """Remove a key from the file; returns it. The file may not end up empty."""
    with _locked(path):
        keys = read_keys(path)
        if key_id not in keys:
            raise KeysFileError(f"keys file {path}: no key {key_id}")
        if len(keys) == 1:
            raise KeysFileError(f"keys file {path}: {key_id} is its last key; add another first")
        lines = path.read_text().splitlines(keepends=True)
        start, end = _table_of(lines, key_id, path)
        gone = keys.pop(key_id)
        _replace(path, "".join(lines[:start] + lines[end:]), keys)
        return gone


KEY_HEADER = re.compile(r"\s*\[\[\s*key\s*\]\]\s*(#.*)?$")
TABLE_HEADER = re.compile(r"\s*\[")  # any table's header ends the table before it
COMMENT = re.compile(r"\s*#")


def _table_of(lines: list[str], key_id: str, path: Path) -> tuple[int, int]:
    """The lines [start, end) of the key's `[[key]]` table with the comment lines right
    above its header (unless they open the file: those are the file's own and stay)."""
    tables = [n for n, line in enumerate(lines) if TABLE_HEADER.match(line)]
    for n, header in enumerate(tables):
        end = tables[n + 1] if n + 1 < len(tables) else len(lines)
        end = _above(lines, end) if end < len(lines) else end  # the next table's comments
        if not KEY_HEADER.match(lines[header]) or not _names(lines[header:end], key_id):
            continue
        start = _above(lines, header)
        return (header if start == 0 else start), end
    raise KeysFileError(
        f"keys file {path}: key {key_id} is not written as a [[key]] table of its own;"
        " remove it by hand"
    )


def _above(lines: list[str], n: int) -> int:
    """Where the comment lines right above line `n` begin."""
    while n > 0 and COMMENT.match(lines[n - 1]):
        n -= 1
    return n


def _names(table: list[str], key_id: str) -> bool:
    try:
        parsed = tomllib.loads("".join(table))
    except tomllib.TOMLDecodeError:
        return False
    return [k.get("id") for k in parsed.get("key", [])] == [key_id]


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
