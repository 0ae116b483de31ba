"""What each script of `lua/` takes: its KEYS and ARGV as named fields, in its order.

One structure per script (a `Call`), whose fields are named as the script's header binds
them (`local ledger = KEYS[1]`, `local reserve_fen = tonumber(ARGV[2])`): callers fill them
by name, and `keys()` and `args()` lay them out in field order. A field typed `Key` is a
key and any other an argument; a `Keys` or `list` field is a variable-length tail (the
script binds where it starts, `local nonce_buckets_at = 19`), and a NamedTuple is a group
of arguments the script unpacks (`local limit, retry_after_s, window_ttl_s = unpack(ARGV,
at, at + 2)`). A list of groups marked `PACKED` is one argument instead, its groups' values in
one flat JSON list, field by field (every group's first value, then every group's second...:
`local claims = cjson.decode(ARGV[18])`, each field's run bound by name from there); a list
marked `PACKED` and a group is a flat list of groups as its caller keeps it. A
`Part` (the `Request` of an idempotent write) adds its keys and arguments where it
stands. tests/test_protocol.py checks every structure against its script.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from itertools import chain, groupby
from operator import attrgetter
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    NamedTuple,
    get_args,
    get_origin,
    get_type_hints,
)

import msgspec

from issuer.keys import IDEMPOTENCY_TTL_S, NONCE_BUCKET_S, NONCE_TTL_S

ScriptName = Literal[
    "campaign_put",
    "carry_over",
    "claim_batch",
    "clawback_repaid",
    "draw_batch",
    "expire",
    "mark_paid",
    "merchant_put",
    "merchant_version",
    "ready",
    "rebuild_commit",
    "redeem",
    "refund",
    "register",
    "round_budget",
    "set_status",
    "spend_nonces",
    "trim_acked",
]

KEY = "KEYS"  # marks a field that names keys
Key = Annotated[str, KEY]
Keys = Annotated[list[str], KEY]  # a variable-length tail of keys
PACKED = "PACKED"  # marks a list of groups sent as one JSON argument


# ---------------------------------------------------------------- layout


# a field gives one value, all of its values, each group's values, its groups' values as one
# JSON list field by field, or its flat list of groups' values as one JSON list
ONE, ALL, EACH, JSON, FLAT = 0, 1, 2, 3, 4
_JSON = msgspec.json.Encoder()


@dataclass(frozen=True)
class Slot:
    """Where a field goes in KEYS or ARGV."""

    name: str  # the field's, and the script's local (`<name>_at` for a tail or a tuple)
    size: int | None  # how many values; None: a variable-length tail
    group: tuple[str, ...]  # a group's members, in the order the script unpacks them
    path: str  # its attribute in the structure (`request.idem_field` in a Part)
    spread: int  # ONE, ALL, EACH, JSON or FLAT


# how a call's values are read: (getter, spread), a run of single values in one getter
Reads = tuple[tuple[Callable[[Any], Any], int], ...]


@dataclass(frozen=True)
class Layout:
    keys: tuple[Slot, ...]
    args: tuple[Slot, ...]
    read_keys: Reads
    read_args: Reads


def _slot(name: str, path: str, hint: Any) -> Slot:
    origin, params = get_origin(hint), get_args(hint)
    if origin not in (list, tuple):
        return Slot(name, 1, (), path, ONE)
    group: tuple[str, ...] = getattr(params[0], "_fields", ())
    size = None if origin is list else len(params) * (len(group) or 1)
    return Slot(name, size, group, path, EACH if group else ALL)


def _slots(cls: type, prefix: str = "") -> list[tuple[bool, Slot]]:
    """(is a key, slot) for each field of `cls`, a Part's fields in its place."""
    hints = get_type_hints(cls, include_extras=True)
    out: list[tuple[bool, Slot]] = []
    for f in fields(cls):
        hint, path = hints[f.name], prefix + f.name
        if isinstance(hint, type) and issubclass(hint, Part):
            out += _slots(hint, path + ".")
            continue
        marks: tuple[Any, ...] = hint.__metadata__ if get_origin(hint) is Annotated else ()
        slot = _slot(f.name, path, hint.__origin__ if marks else hint)
        if PACKED in marks:
            # a list kept flat names its group after PACKED
            flat: tuple[str, ...] = getattr(marks[-1], "_fields", ())
            slot = Slot(f.name, 1, flat or slot.group, slot.path, FLAT if flat else JSON)
        out.append((KEY in marks, slot))
    return out


def _reads(slots: tuple[Slot, ...]) -> Reads:
    """How `slots` are read: a run of single values by one attrgetter, which gives them as
    a tuple (spread ALL), not one getter and one turn of the loop each; others each alone."""
    reads: list[tuple[Callable[[Any], Any], int]] = []
    for single, each in groupby(slots, key=lambda s: s.spread == ONE):
        run = list(each)
        if single and len(run) > 1:
            reads.append((attrgetter(*(s.path for s in run)), ALL))
        else:
            reads += ((attrgetter(s.path), s.spread) for s in run)
    return tuple(reads)


_LAYOUTS: dict[type, Layout] = {}


def layout(cls: type) -> Layout:
    """The KEYS and the ARGV of a script, from its structure's fields (read once)."""
    found = _LAYOUTS.get(cls)
    if found is None:
        assert is_dataclass(cls)
        slots = _slots(cls)
        keys = tuple(s for is_key, s in slots if is_key)
        args = tuple(s for is_key, s in slots if not is_key)
        found = _LAYOUTS[cls] = Layout(keys, args, _reads(keys), _reads(args))
    return found


def _lay_out(call: Call, reads: Reads) -> list[Any]:
    out: list[Any] = []
    for get, spread in reads:
        value = get(call)
        if spread == ONE:
            out.append(value)
        elif spread == ALL:
            out += value
        elif spread == EACH:
            out += chain.from_iterable(value)
        elif spread == JSON:
            out.append(_JSON.encode(list(chain.from_iterable(zip(*value, strict=True)))))
        else:
            out.append(_JSON.encode(value))
    return out


class Part:
    """Fields that several structures share, laid out where the structure holds them."""

    __slots__ = ()


class Call:
    """The KEYS and ARGV of one call of script `SCRIPT`."""

    __slots__ = ()
    SCRIPT: ClassVar[ScriptName]

    def keys(self) -> list[str]:
        return _lay_out(self, layout(type(self)).read_keys)

    def args(self) -> list[Any]:
        return _lay_out(self, layout(type(self)).read_args)


# ---------------------------------------------------------------- idempotent writes


@dataclass(slots=True, kw_only=True)
class Request(Part):
    """An idempotent write's request: the buckets its record is looked up in (and stored in,
    the current one), its field there and its body's fingerprint (lua/lib.lua)."""

    idem_current: Key
    idem_previous: Key
    idem_field: str
    fingerprint: str
    idem_ttl_s: int = IDEMPOTENCY_TTL_S


@dataclass(slots=True, kw_only=True)
class Write(Call):
    """A script that writes once per request: a retry is answered REPLAY, from its record."""

    request: Request


@dataclass(slots=True, kw_only=True)
class SetStatus(Write):
    SCRIPT = "set_status"
    ledger: Key
    events: Key
    status: str  # paused or active
    event: bytes  # JSON: who and why


@dataclass(slots=True, kw_only=True)
class RoundBudget(Write):
    SCRIPT = "round_budget"
    ledger: Key
    round: Key
    events: Key
    expected_budget_fen: int  # -1: the round has none
    budget_fen: int
    quota: int | str  # "": unchanged
    event: bytes  # JSON: who and the request


@dataclass(slots=True, kw_only=True)
class Register(Write):
    SCRIPT = "register"
    ledger: Key
    registrations: Key
    events: Key
    person_ref: str
    registration: bytes  # its record JSON, without registered_at


@dataclass(slots=True, kw_only=True)
class Refund(Write):
    SCRIPT = "refund"
    ledger: Key
    round: Key  # the voucher's
    vouchers: Key
    redemptions: Key
    refunds: Key
    events: Key
    redemption_id: str
    refunded_fen: int  # what the other amounts were computed from (compare-and-set)
    amount_fen: int
    subsidy_returned_fen: int
    overdraw_repaid_fen: int
    refund: bytes  # its record JSON


@dataclass(slots=True, kw_only=True)
class ClawbackRepaid(Write):
    SCRIPT = "clawback_repaid"
    ledger: Key
    refunds: Key
    events: Key
    refund_id: str
    by: str
    reason: str


# ---------------------------------------------------------------- claims


class RateLimitArgs(NamedTuple):
    """One rate-limit window of a claim batch."""

    limit: int  # attempts per window, -1: none
    retry_after_s: int  # until the window ends
    window_ttl_s: int


class Claim(NamedTuple):
    """One claim of a batch, filled when the claim arrives."""

    idem_field: str
    fingerprint: str
    nonce_bucket: int  # keys.nonce_bucket of its X-Timestamp
    nonce: str
    person_ref: str
    user_id: str
    candidate: str  # its voucher id (in a lottery round: application id), if granted
    extra: str  # the record's own other fields as JSON members (",..."), "" if none
    device_id: str  # "" if none
    client_ip: str  # "" if none


@dataclass(slots=True, kw_only=True)
class ClaimBatch(Call):
    SCRIPT = "claim_batch"
    ledger: Key
    round: Key
    persons: Key
    accounts: Key
    vouchers: Key
    registrations: Key
    events: Key
    idem_current: Key
    idem_previous: Key
    winners: Key
    expiry: Key
    applications: Key
    applicants: Key
    applicant_accounts: Key
    entries: Key
    rate_windows: Annotated[tuple[str, str, str], KEY]  # per account, device, client IP
    nonce_buckets: Keys  # consecutive, from first_nonce_bucket
    round_id: str
    reserve_fen: int
    mode: str  # self or staff
    idem_ttl_s: int = IDEMPOTENCY_TTL_S
    nonce_ttl_s: int = NONCE_TTL_S
    rate_limits: tuple[RateLimitArgs, RateLimitArgs, RateLimitArgs]  # as rate_windows
    allocation: str  # first_come or lottery
    check_applicants: str  # "1" if the campaign has a lottery round
    first_nonce_bucket: int
    record_head: str  # every record's start: "{" and the campaign's fields, no "}"
    claims: Annotated[list[Claim], PACKED]


class SpentNonce(NamedTuple):
    """A group of `SpendNonces.nonces`, which the spender keeps flat (no tuple per nonce)."""

    timestamp_s: int  # its X-Timestamp: the script finds its bucket (keys.nonce_bucket)
    nonce: str


@dataclass(slots=True, kw_only=True)
class SpendNonces(Call):
    SCRIPT = "spend_nonces"
    nonce_buckets: Keys  # consecutive, from first_nonce_bucket
    nonce_ttl_s: int = NONCE_TTL_S
    nonce_bucket_s: int = NONCE_BUCKET_S
    first_nonce_bucket: int
    nonces: Annotated[list[int | str], PACKED, SpentNonce]


# ---------------------------------------------------------------- redemptions


class Redemption(NamedTuple):
    """One redemption of a batch, filled when the payment arrives."""

    idem_field: str
    fingerprint: str
    nonce_bucket: int  # keys.nonce_bucket of its X-Timestamp
    nonce: str
    voucher_id: str
    user_id: str
    order_id: str
    redemption: bytes  # its record JSON, without round_id, redeemed_at and overdrawn_fen
    discount_fen: int  # from the campaign's terms (the script checks they are the voucher's)
    refusal: str  # decided from state outside the campaign's slot, the merchant ("" if none)


@dataclass(slots=True, kw_only=True)
class RedeemBatch(Call):
    SCRIPT = "redeem"
    idem_current: Key
    idem_previous: Key
    ledger: Key
    vouchers: Key
    redemptions: Key
    orders: Key
    expiry: Key
    events: Key
    merchant_version: Key  # the campaign's (STALE unless merchants_read)
    rounds: Keys  # every round of the campaign, in round_ids' order
    nonce_buckets: Keys  # consecutive, from first_nonce_bucket
    idem_ttl_s: int = IDEMPOTENCY_TTL_S
    nonce_ttl_s: int = NONCE_TTL_S
    discount_rate_bp: int  # the campaign's terms, each discount's
    cap_fen: int
    first_nonce_bucket: int
    merchants_read: int  # the version of the merchants the payments' refusals were decided at
    round_count: int  # how many rounds (two tails follow in KEYS)
    round_ids: list[str]
    payments: list[Redemption]


# ---------------------------------------------------------------- campaigns and merchants


class RoundSettings(NamedTuple):
    """A round hash's settings (times in epoch ms)."""

    opens: int
    closes: int
    valid_until: int
    quota: int  # -1: none
    budget: int  # fen, -1: none
    apps_close: int  # when a lottery round's applications close; -1: a first-come round


@dataclass(slots=True, kw_only=True)
class CampaignPut(Call):
    SCRIPT = "campaign_put"
    definition: Key
    ledger: Key
    events: Key
    new_rounds: Keys  # one per `rounds`, in its order
    old_rounds: Keys  # those of the definition it replaces, deleted
    stored_campaign: bytes  # JSON of StoredCampaign
    budget_fen: int
    expected_version: str  # "" if new
    rounds: list[RoundSettings]


@dataclass(slots=True, kw_only=True)
class MerchantPut(Call):
    SCRIPT = "merchant_put"
    merchants: Key
    events: Key
    version: Key  # the merchants' version, raised
    merchant_id: str
    merchant: bytes  # its record JSON
    tenant: str  # its tenant (a merchant's tenant never changes)


@dataclass(slots=True, kw_only=True)
class MerchantVersion(Call):
    SCRIPT = "merchant_version"
    held: Key  # a campaign's merchants' version, or the merchants' own
    version: int  # raised to this (never lowered)


# ---------------------------------------------------------------- money and sweeps


@dataclass(slots=True, kw_only=True)
class MarkPaid(Call):
    SCRIPT = "mark_paid"
    redemptions: Key
    events: Key
    batch_id: str
    redemption_ids: list[str]


class Due(NamedTuple):
    voucher_id: str
    round_index: int  # its round's place in `rounds`, 0 for the first


@dataclass(slots=True, kw_only=True)
class Expire(Call):
    SCRIPT = "expire"
    ledger: Key
    vouchers: Key
    expiry: Key
    events: Key
    rounds: Keys
    now_ms: int
    due: list[Due]


@dataclass(slots=True, kw_only=True)
class CarryOver(Call):
    SCRIPT = "carry_over"
    closed_round: Key
    next_round: Key
    events: Key
    now_ms: int
    closed_round_id: str
    next_round_id: str


# ---------------------------------------------------------------- lottery draws


class DrawPick(NamedTuple):
    application_id: str
    voucher_id: str  # the voucher it wins, if it does


@dataclass(slots=True, kw_only=True)
class DrawBatch(Call):
    SCRIPT = "draw_batch"
    ledger: Key
    round: Key
    persons: Key
    accounts: Key
    vouchers: Key
    events: Key
    expiry: Key
    applications: Key
    draw: Key
    seed: str
    root: str
    reserve_fen: int
    start: int  # the draw's cursor this batch starts at
    round_id: str
    picks: list[DrawPick]  # in rank order


# ---------------------------------------------------------------- operations


@dataclass(slots=True, kw_only=True)
class Ready(Call):
    SCRIPT = "ready"
    campaigns: Key


@dataclass(slots=True, kw_only=True)
class TrimAcked(Call):
    SCRIPT = "trim_acked"
    stream: Key
    group: str


@dataclass(slots=True, kw_only=True)
class RebuildCommit(Call):
    SCRIPT = "rebuild_commit"
    winners: Key
    staged_winners: Key
    live: Keys
    staged: Keys  # one per live key, in its order
    buckets: Keys  # idempotency buckets
    staged_buckets: Keys  # one per bucket, in its order
    idem_ttl_s: int = IDEMPOTENCY_TTL_S
    moves: int  # how many live keys
