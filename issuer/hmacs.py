"""HMAC-SHA256 (RFC 2104) from a key's pads hashed once. Setting up a keyed hash anew (what
`hmac.new` and `hmac.digest` do on every call) cost more than hashing a short message, and
`hmac.HMAC`'s own copy and update are Python frames around the same C calls."""

from __future__ import annotations

import functools
import hashlib


@functools.lru_cache(maxsize=256)
def _pads(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """The inner and outer hashes with `key` taken in, each copied for a message."""
    block = hashlib.sha256().block_size
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


def hexdigest(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 of `message` under `key`, as 64 hex digits."""
    inner, outer = _pads(key)
    keyed = inner.copy()
    keyed.update(message)
    result = outer.copy()
    result.update(keyed.digest())
    return result.hexdigest()
