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
    """HMAC-SHA256 of `message` under `key`, as 64 hex digits (the key's pads looked up:
    for a key per caller; `Keyed` for one key)."""
    inner, outer = _pads(key)
    keyed = inner.copy()
    keyed.update(message)
    result = outer.copy()
    result.update(keyed.digest())
    return result.hexdigest()


class Keyed:
    """HMAC-SHA256 under one key of messages that start with one prefix, the key's pads and
    the prefix hashed once: a message's HMAC is one Python frame (no cache look-up, no
    concatenation)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, prefix: bytes) -> None:
        inner, self._outer = _pads(key)
        self._inner = inner.copy()
        self._inner.update(prefix)

    def hexdigest(self, rest: str) -> str:
        """HMAC-SHA256 of the prefix and `rest` (UTF-8), as 64 hex digits."""
        keyed = self._inner.copy()
        keyed.update(rest.encode())
        result = self._outer.copy()
        result.update(keyed.digest())
        return result.hexdigest()
