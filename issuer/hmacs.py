"""HMAC-SHA256 (RFC 2104) from a key's pads hashed once. Setting up a keyed hash anew (what
`hmac.new` and `hmac.digest` do on every call) cost more than hashing a short message, and
`hmac.HMAC`'s own copy and update are Python frames around the same C calls."""

from __future__ import annotations

import functools
import hashlib


class Keyed:
    """HMAC-SHA256 under one key of messages that start with one prefix, the key's pads and
    the prefix hashed once: a message's HMAC is one Python frame (no concatenation)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, prefix: bytes) -> None:
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._inner.update(prefix)
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def hexdigest(self, rest: str) -> str:
        """HMAC-SHA256 of the prefix and `rest` (UTF-8), as 64 hex digits."""
        keyed = self._inner.copy()
        keyed.update(rest.encode())
        result = self._outer.copy()
        result.update(keyed.digest())
        return result.hexdigest()


@functools.lru_cache(maxsize=256)
def keyed(key: bytes, prefix: bytes = b"") -> Keyed:
    """The `Keyed` HMAC of `key` and `prefix`, made once (a key per caller: each API key's
    secret, each reference's domain)."""
    return Keyed(key, prefix)
