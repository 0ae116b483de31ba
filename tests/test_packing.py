"""Commands packed by hiredis (issuer/packing.py): the bytes redis-py's own packer makes,
its errors, and the connections of every standalone and primary pool using it."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from issuer import topology
from issuer.config import Settings
from issuer.packing import HiredisPacking, packing
from issuer.sentinel import PrimaryConnection, RoleConfirmedConnection
from tests.conftest import Keyspace

ARGS = (
    "EVALSHA",
    "a" * 40,
    3,
    "{c:x}:ledger",
    b"bytes",
    bytearray(b"array"),
    memoryview(b"view"),
    "中文 ü",
    0,
    -17,
    2**70,
    1.5,
    1e20,
    0.1 + 0.2,
    float("inf"),
    "",
)


def test_the_bytes_are_redis_pys_own() -> None:
    ours, theirs = packing(Connection)(), Connection()
    plain = tuple(a for a in ARGS if not isinstance(a, bytearray | memoryview))
    for args in (ARGS, plain):  # with what hiredis takes as it is, and with what it does not
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))
    # a command name of two words goes as two arguments, as redis-py sends it
    two_words = ("CONFIG GET", "x")
    assert ours.pack_command(*two_words) == [b"".join(theirs.pack_command(*two_words))]


@pytest.mark.parametrize("bad", [True, None, object()])
def test_what_redis_py_refuses_is_refused(bad: object) -> None:
    with pytest.raises(DataError):
        packing(Connection)().pack_command("SET", "k", bad)


def test_every_pool_packs_with_hiredis() -> None:
    for url, cls in (
        ("redis://127.0.0.1:1/0", Connection),
        ("unix:///tmp/none.sock", UnixDomainSocketConnection),
    ):
        client = topology.connect(Settings(redis_url=url, redis_mode="standalone"))
        made = client.connection_pool.connection_class
        assert issubclass(made, HiredisPacking) and issubclass(made, cls), url
    assert issubclass(PrimaryConnection, HiredisPacking)
    assert issubclass(RoleConfirmedConnection, HiredisPacking)


async def test_a_round_trip(keyspace: Keyspace) -> None:
    client = topology.connect(Settings(redis_url=keyspace.redis_url, redis_mode="standalone"))
    try:
        await client.hset("packed", mapping={"中文 ü": 2**70, "f": 0.1 + 0.2, "b": b"\x00\xff"})
        assert await client.hgetall("packed") == {
            "中文 ü".encode(): str(2**70).encode(),
            b"f": repr(0.1 + 0.2).encode(),
            b"b": b"\x00\xff",
        }
    finally:
        await topology.close(client)
