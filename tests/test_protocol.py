"""Python and Lua agree on every script's KEYS and ARGV: the structure of issuer/protocol.py
and the names the script's header binds, in the same order and at the same places."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from typing import get_args

import pytest

from issuer import protocol, scripts
from issuer.protocol import Call, Request, layout

pytestmark = pytest.mark.fast

CALLS = {
    v.SCRIPT: v
    for v in vars(protocol).values()
    if isinstance(v, type) and issubclass(v, Call) and "SCRIPT" in vars(v)
}
FIXED = re.compile(r"^local (\w+) = (?:tonumber\(|cjson\.decode\()?(KEYS|ARGV)\[(\d+)\]", re.M)
START = re.compile(r"^local (\w+)_at = ([^-\n]+?)\s*(?:--.*)?$", re.M)
GROUP = re.compile(r"local\s+([\w\s,]+?)\s*=\s*unpack\(\w+,\s*(\w+),\s*\2 \+ (\d+)\)")
# a packed list's fields, each bound where its run starts: local a_at, b_at = 0, n, 2 * n...
RUNS = re.compile(r"local\s+([\w\s,]+?)\s*=\s*(0, (\w+)(?:, \d+ \* \3)*)$", re.M)
NUMBERED = re.compile(r"(?:KEYS|ARGV)\[\d")


@dataclass
class Binding:
    name: str
    at: int | None  # the index it is bound to, None if computed
    table: str | None  # KEYS or ARGV; None for where a tail or a tuple starts


def bindings(text: str) -> list[Binding]:
    found = [(m.start(), Binding(m[1], int(m[3]), m[2])) for m in FIXED.finditer(text)]
    for m in START.finditer(text):
        at = int(m[2]) if m[2].isdigit() else None
        found.append((m.start(), Binding(m[1], at, None)))
    return [b for _, b in sorted(found, key=lambda pair: pair[0])]


def lua(name: str) -> str:
    return files("issuer.lua").joinpath(f"{name}.lua").read_text()


def test_the_typed_names_are_the_scripts_of_lua() -> None:
    assert sorted(get_args(protocol.ScriptName)) == list(scripts.NAMES)
    assert sorted(CALLS) == list(scripts.NAMES)


@pytest.mark.parametrize("name", scripts.NAMES)
def test_python_and_lua_agree_on_keys_and_args(name: str) -> None:
    text = lua(name)
    bound = bindings(text)
    shape = layout(CALLS[name])
    for table, slots in (("KEYS", shape.keys), ("ARGV", shape.args)):
        names = {s.name for s in slots}
        mine = [b for b in bound if b.table == table or (b.table is None and b.name in names)]
        assert [b.name for b in mine] == [s.name for s in slots], table
        place: int | None = 1
        for binding, slot in zip(mine, slots, strict=True):
            single = slot.spread in (protocol.ONE, protocol.JSON, protocol.FLAT)
            assert (binding.table is not None) == single, f"{table} {slot.name}"
            if place is not None:
                assert binding.at == place, f"{table} {slot.name}"
            place = None if place is None or slot.size is None else place + slot.size
    groups = [s for s in shape.args if s.group and s.spread != protocol.JSON]
    unpacked = [(m[1].replace(",", " ").split(), int(m[3])) for m in GROUP.finditer(text)]
    assert [names for names, _ in unpacked] == [list(s.group) for s in groups]
    assert [last + 1 for _, last in unpacked] == [len(s.group) for s in groups]
    packed = [s for s in shape.args if s.spread == protocol.JSON]
    runs = [(m[1].replace(",", " ").split(), m[2], m[3]) for m in RUNS.finditer(text)]
    assert [names for names, _, _ in runs] == [[f"{f}_at" for f in s.group] for s in packed]
    for names, starts, count in runs:
        assert starts == ", ".join(["0", count] + [f"{k} * {count}" for k in range(2, len(names))])


@pytest.mark.parametrize("name", scripts.NAMES)
def test_below_its_header_a_script_reads_keys_and_args_by_name(name: str) -> None:
    lines = [line for line in lua(name).splitlines() if not FIXED.match(line)]
    assert [line for line in lines if NUMBERED.search(line)] == []


def test_a_call_lays_out_its_request_first_then_its_fields_groups_and_tails() -> None:
    request = Request(idem_current="i1", idem_previous="i0", idem_field="k|r", fingerprint="fp")
    repaid = protocol.ClawbackRepaid(
        request=request,
        ledger="l",
        refunds="f",
        events="e",
        refund_id="x",
        by="k",
        reason="why",
    )
    assert repaid.keys() == ["i1", "i0", "l", "f", "e"]
    assert repaid.args() == ["k|r", "fp", request.idem_ttl_s, "x", "k", "why"]
    spend = protocol.SpendNonces(
        nonce_buckets=["n7", "n8"],
        first_nonce_bucket=7,
        nonces=[4801, "a", 4200, "b"],  # X-Timestamps and nonces, kept flat by the spender
    )
    assert spend.keys() == ["n7", "n8"]
    assert spend.args() == [spend.nonce_ttl_s, 600, 7, b'[4801,"a",4200,"b"]']


def test_sizes_and_groups_follow_the_field_types() -> None:
    batch = layout(protocol.ClaimBatch)
    keys = {s.name: s.size for s in batch.keys}
    assert (keys["ledger"], keys["rate_windows"], keys["nonce_buckets"]) == (1, 3, None)
    args = {s.name: (s.size, s.group) for s in batch.args}
    assert args["rate_limits"] == (9, protocol.RateLimitArgs._fields)
    assert args["claims"] == (1, protocol.Claim._fields)
    assert args["round_id"] == (1, ())
