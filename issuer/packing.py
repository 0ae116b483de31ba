"""Redis commands packed into RESP by hiredis, in C.

redis-py's asyncio connection packs a command in Python, argument by argument (an encoder
call and a bytes join each: some 8,000 instructions per argument); a claim batch sends
about eleven arguments per claim, so packing it cost more than any other part of an issued
claim's work in the worker. redis-py's own sync client packs with hiredis when hiredis is
installed (`HiredisRespSerializer`, the same bytes for every argument it accepts); the
connection classes of `issuer.topology` and `issuer.sentinel` use hiredis too: the
arguments as they are when the command's name is one word, else that serializer (which
splits a name of two words and converts bytearray and memoryview arguments).
"""

from __future__ import annotations

import functools
from typing import Any

import hiredis
from redis.connection import HiredisRespSerializer

_PACK = HiredisRespSerializer().pack


class HiredisPacking:
    """Mixed into a redis-py asyncio connection class, before it: pack with hiredis
    (an argument it cannot pack raises redis-py's DataError, as redis-py's packer does)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if type(name) is str and name.isprintable() and " " not in name:  # one word
            try:  # as they are: the serializer copies them all first, in Python
                return [hiredis.pack_command(args)]
            except TypeError:  # a bytearray or memoryview the serializer converts, or refused
                pass
        packed: list[bytes] = _PACK(*args)
        return packed


@functools.cache
def packing(cls: type) -> type:
    """The redis-py asyncio connection class `cls`, packing with hiredis (one class per
    `cls`: a pool's connection class may come from its URL, SSL or a Unix socket)."""
    return type(cls.__name__, (HiredisPacking, cls), {})
