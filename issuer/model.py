"""Typed shapes of the contract: campaign definitions, merchants, requests and responses.

One msgspec Struct per JSON object of API.md; constraints live in the types so that
decoding *is* validation. Money is integer fen, times are timezone-aware datetimes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import date, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

Id = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="letters, digits, _ -")]
UserId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:@-]{1,64}$")]
RequestId = Annotated[str, Meta(min_length=8, max_length=64, pattern=r"^[\x21-\x7e]+$")]
Fen = Annotated[int, Meta(ge=0, le=10**13, description="integer fen (1 CNY = 100 fen)")]
Quota = Annotated[int, Meta(ge=0, le=10**8)]
AwareDatetime = Annotated[datetime, Meta(tz=True)]
# an administrative code or a prefix of one: 2-12 digits in pairs, not all zeros
RegionCode = Annotated[str, Meta(pattern=r"^(?!0+$)(?:[0-9]{2}){1,6}$")]
ClockTime = Annotated[str, Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
# "22:00" (same day) or "+5d 22:00" (five days later)
DayTime = Annotated[str, Meta(pattern=r"^(\+[0-9]{1,3}d )?([01][0-9]|2[0-3]):[0-5][0-9]$")]
Weekday = Literal[
    "day", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"
]
Text = Annotated[str, Meta(min_length=1, max_length=200)]
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$", description="lowercase hex SHA-256")]
Allocation = Literal["first_come", "lottery"]
# the tenant of records made before tenants existed, and of a platform-wide key's PUT
# that names none (API.md v1.2)
DEFAULT_TENANT = "default"


class Strict(Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every request shape: unknown fields are an error, not silently dropped."""


# ---------------------------------------------------------------- campaigns


class VoucherTerms(Strict, kw_only=True):
    discount_rate_bp: Annotated[int, Meta(ge=1, le=10000)] = 1000
    cap_fen: Annotated[int, Meta(ge=1, le=10**9)] = 200_000
    # money set aside per issued voucher; None means "the cap"
    reserve_fen: Annotated[int, Meta(ge=0, le=10**9)] | None = None

    @property
    def reserve(self) -> int:
        return self.cap_fen if self.reserve_fen is None else self.reserve_fen


class Geofence(Strict, kw_only=True):
    region_codes: Annotated[list[RegionCode], Meta(min_length=1, max_length=50)]
    polygons_file: str | None = None


class RoundSpec(Strict, kw_only=True):
    round_id: Id
    opens_at: AwareDatetime
    closes_at: AwareDatetime
    valid_until: AwareDatetime
    quota: Quota | None = None  # None: limited by money only
    budget_fen: Fen | None = None  # None: no round budget, only the campaign's
    # unset fields are left out of the definition as served, so first-come rounds read as
    # before; a lottery round takes applications from opens_at to applications_close_at and
    # draws its winners at draws_at with the seed whose SHA-256 is commitment
    allocation: Annotated[Allocation, Meta(description="default first_come")] | UnsetType = UNSET
    applications_close_at: AwareDatetime | UnsetType = UNSET
    draws_at: AwareDatetime | UnsetType = UNSET
    commitment: Sha256Hex | UnsetType = UNSET


class RoundRule(Strict, kw_only=True):
    every: Weekday
    at: ClockTime
    valid_until: DayTime
    from_: date = msgspec.field(name="from")
    to: date
    closes: DayTime | None = None  # end of the claim window; default valid_until
    quota: Quota | None = None
    budget_fen: Fen | None = None
    first_budget_fen: Fen | None = None  # Xi County: the first week differs


class Eligibility(Strict, kw_only=True):
    categories: Annotated[list[Id], Meta(min_length=1)]
    appliance_min_grade: Annotated[int, Meta(ge=1, le=5)] = 2
    require_gb_code: bool = True


class RateLimit(Strict, kw_only=True):
    limit: Annotated[int, Meta(ge=1, le=10**6)]  # claim attempts per window
    window_s: Annotated[int, Meta(ge=1, le=86_400)]


class RateLimits(Strict, kw_only=True):
    """Claim attempts that reach the gate, per app account, per device and per client IP."""

    per_account: RateLimit | None = None
    per_device: RateLimit | None = None
    per_ip: RateLimit | None = None


class CampaignDef(Strict, kw_only=True):
    name: Text
    # the programme owner; fixed once the campaign exists (as stored: always set, but
    # definitions stored before tenants existed lack it and belong to DEFAULT_TENANT)
    tenant: Id | None = None
    timezone: str = "Asia/Shanghai"
    budget_fen: Fen
    voucher: VoucherTerms = msgspec.field(default_factory=VoucherTerms)
    per_person: Literal[1] = 1
    mode: Literal["self", "staff"] = "self"
    geofence: Geofence
    rounds: list[RoundSpec] | RoundRule
    eligibility: Eligibility
    # Xi County: a closed round's unused budget moves to the next round still open
    carry_over: bool = False
    # Xi County: reimbursement documents are due this many days after the round closes
    document_deadline_days: Annotated[int, Meta(ge=0, le=365)] | None = None
    rate_limits: RateLimits = msgspec.field(default_factory=RateLimits)


class Round(Struct, kw_only=True, omit_defaults=True):
    """A round as stored and served: explicit times, whatever the definition said."""

    round_id: str
    opens_at: datetime
    closes_at: datetime
    valid_until: datetime
    quota: int | None = None
    budget_fen: int | None = None
    allocation: Allocation = "first_come"
    # lottery rounds only
    applications_close_at: datetime | None = None
    draws_at: datetime | None = None
    commitment: str | None = None


class StoredCampaign(Struct, kw_only=True):
    """What Redis keeps under the campaign's `def` key."""

    campaign_id: str
    definition: CampaignDef
    rounds: list[Round]


# ---------------------------------------------------------------- merchants


class MerchantDef(Strict, kw_only=True):
    name: Text
    tenant: Id | None = None  # fixed once the merchant exists; None: as CampaignDef's
    county_code: RegionCode
    categories: Annotated[list[Id], Meta(min_length=1)]
    status: Literal["active", "suspended", "blacklisted"] = "active"


# ---------------------------------------------------------------- requests


class PersonIn(Strict, kw_only=True):
    id_number: Annotated[str, Meta(min_length=15, max_length=18)]
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    phone: Annotated[str, Meta(pattern=r"^\+?[0-9]{6,15}$")]


class RegistrationIn(Strict, kw_only=True):
    request_id: RequestId
    user_id: UserId
    person: PersonIn


class ClaimPerson(Strict, kw_only=True):
    id_number: Annotated[str, Meta(min_length=15, max_length=18)]


class Location(Strict, kw_only=True):
    """Either a point (`lat`, `lon`, `crs`) or a `region_code`."""

    lat: Annotated[float, Meta(ge=-90, le=90)] | None = None
    lon: Annotated[float, Meta(ge=-180, le=180)] | None = None
    crs: Literal["gcj02", "wgs84"] = "gcj02"
    region_code: RegionCode | None = None


class ClaimIn(Strict, kw_only=True):
    request_id: RequestId
    user_id: UserId
    person: ClaimPerson | None = None
    person_ref: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")] | None = None
    location: Location
    device_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    staff_id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    # the consumer's IP as the app backend saw it (rate limits); default: the caller's
    client_ip: Annotated[str, Meta(min_length=2, max_length=45)] | None = None


class StatusChangeIn(Strict, kw_only=True):
    request_id: RequestId
    reason: Annotated[str, Meta(max_length=500)] = ""


class ItemIn(Strict, kw_only=True):
    category: Id
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    amount_fen: Fen  # the item's price after every other discount, quantity included
    quantity: Annotated[int, Meta(ge=1, le=10_000)] = 1
    gb_code: Annotated[str, Meta(max_length=32)] | None = None
    energy_grade: Annotated[int, Meta(ge=1, le=5)] | None = None


class RedemptionIn(Strict, kw_only=True):
    request_id: RequestId
    voucher_id: Annotated[str, Meta(min_length=3, max_length=100)]
    user_id: UserId
    merchant_id: Id
    order_id: Annotated[str, Meta(pattern=r"^[\x21-\x7e]{1,64}$")]
    order_amount_fen: Fen
    paid_at: AwareDatetime
    items: Annotated[list[ItemIn], Meta(min_length=1, max_length=50)]


class RefundIn(Strict, kw_only=True):
    request_id: RequestId
    amount_fen: Annotated[int, Meta(ge=1, le=10**13)]  # share of the order refunded
    reason: Annotated[str, Meta(max_length=500)] = ""


class RepaidIn(Strict, kw_only=True):
    request_id: RequestId
    reason: Annotated[str, Meta(max_length=500)] = ""


class DocumentMeta(Strict, kw_only=True):
    """The `meta` part of a document upload: what the merchant read off the papers."""

    invoice_no: Annotated[str, Meta(min_length=1, max_length=64)]
    invoice_buyer_name: Annotated[str, Meta(min_length=1, max_length=64)]
    invoice_amount_fen: Fen
    paid_amount_fen: Fen
    gb_codes: Annotated[list[Annotated[str, Meta(max_length=32)]], Meta(max_length=50)] = []


class DecisionIn(Strict, kw_only=True):
    request_id: RequestId
    decision: Literal["approve", "reject"]
    reason: Annotated[str, Meta(min_length=1, max_length=500)]
    # approving a record that failed an automatic check needs this, and it is logged
    override_reason: Annotated[str, Meta(min_length=1, max_length=500)] | None = None


class SettlementQuery(Strict, kw_only=True):
    status: Literal["submitted", "approved", "rejected", "paid"] | None = None
    merchant_id: Id | None = None
    campaign_id: Id | None = None
    checks_passed: bool | None = None  # false: the records that failed a check


class DisbursementQuery(Strict, kw_only=True):
    merchant_id: Id | None = None
    status: Literal["pending", "paid"] | None = None


class AuditQuery(Strict, kw_only=True):
    campaign_id: Id | None = None
    redemption_id: Annotated[str, Meta(min_length=3, max_length=100)] | None = None
    actor: Annotated[str, Meta(min_length=1, max_length=100)] | None = None
    after: Annotated[str, Meta(pattern=r"^[0-9]{1,18}$")] | None = None  # an entry_id
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


class DisbursementIn(Strict, kw_only=True):
    request_id: RequestId
    merchant_id: Id | None = None


class PaidIn(Strict, kw_only=True):
    request_id: RequestId
    reason: Annotated[str, Meta(max_length=500)] = ""


class RoundBudgetIn(Strict, kw_only=True):
    request_id: RequestId
    expected_budget_fen: Fen | None
    budget_fen: Fen
    quota: Quota | None = None


# ---------------------------------------------------------------- responses


class RegistrationOut(Struct, kw_only=True):
    registration_id: str
    person_ref: str


class VoucherOut(Struct, kw_only=True, omit_defaults=True):
    voucher_id: str
    campaign_id: str
    round_id: str
    user_id: str
    status: str
    issued_at: datetime
    expires_at: datetime
    discount_rate_bp: int
    cap_fen: int
    redemption_id: str | None = None


class ItemOut(Struct, kw_only=True, omit_defaults=True):
    category: str
    name: str
    amount_fen: int
    quantity: int
    gb_code: str | None = None
    energy_grade: int | None = None


class RedemptionOut(Struct, kw_only=True):
    """A redemption; `status` is redeemed, partially_refunded or refunded."""

    redemption_id: str
    voucher_id: str
    campaign_id: str
    user_id: str
    merchant_id: str
    order_id: str
    order_amount_fen: int
    discount_fen: int
    payable_fen: int
    status: str
    paid_at: datetime
    redeemed_at: datetime
    refunded_fen: int
    subsidy_returned_fen: int
    paid_to_merchant: bool
    items: list[ItemOut]


class RefundOut(Struct, kw_only=True):
    """`subsidy_returned_fen`: the refunded share of the discount, leaving `spent`;
    `clawback_due_fen`: the part of it the merchant must pay back (it was reimbursed)."""

    refund_id: str
    redemption_id: str
    amount_fen: int
    subsidy_returned_fen: int
    clawback_due_fen: int
    status: str  # returned | clawback_due | repaid


class CheckResult(Struct, kw_only=True, omit_defaults=True):
    # required_parts, energy_labels, buyer_name, amounts, gb_codes, deadline;
    # unique_invoice, unique_documents, distinct_photos (evidence integrity)
    name: str
    passed: bool
    detail: str
    # an integrity check's: the other redemptions (first 20; a key scoped to tenants: of
    # its tenants only, the others counted in `detail`)
    redemption_ids: list[str] = []


class StoredFile(Struct, kw_only=True):
    part: str
    sha256: str
    content_type: str
    size: int


class RedemptionFacts(Struct, kw_only=True, omit_defaults=True):
    """What a reviewer compares the papers with, as PostgreSQL recorded it: the order, its
    items and the voucher (with the staff and device of its claim)."""

    order_id: str
    order_amount_fen: int
    discount_fen: int
    paid_at: datetime
    redeemed_at: datetime
    refunded_fen: int
    subsidy_returned_fen: int
    items: list[ItemOut]
    voucher_id: str
    round_id: str
    issued_at: datetime
    expires_at: datetime
    cap_fen: int
    device_id: str | None = None
    staff_id: str | None = None


class SettlementOut(Struct, kw_only=True, omit_defaults=True):
    """A redemption's reimbursement record: submitted, approved, rejected or paid."""

    redemption_id: str
    campaign_id: str
    merchant_id: str
    status: str
    subsidy_fen: int  # what the merchant is reimbursed: discount less subsidy returned
    checks: list[CheckResult]
    checks_passed: bool
    files: list[StoredFile]
    submitted_at: datetime
    decided_at: datetime | None = None
    decided_by: str | None = None
    reason: str | None = None
    override_reason: str | None = None
    due_date: date | None = None
    # a due date reaching a year whose official holidays are not known yet counts that
    # year's weekends only until they are (then it is recomputed)
    due_date_provisional: bool
    provisional_until_year: int | None = None
    disbursement_id: str | None = None
    # one record's read: its order and voucher (absent until the flusher recorded them)
    redemption: RedemptionFacts | None = None


class SettlementList(Struct, kw_only=True):
    settlements: list[SettlementOut]


class DisbursementOut(Struct, kw_only=True, omit_defaults=True):
    disbursement_id: str
    merchant_id: str
    due_date: date
    due_date_provisional: bool  # as a settlement record's
    provisional_until_year: int | None = None
    total_fen: int
    redemption_ids: list[str]
    status: str  # pending | paid
    paid_at: datetime | None = None
    records: list[SettlementOut] = []  # the reads (GET) give the batch's records


class DisbursementList(Struct, kw_only=True):
    disbursements: list[DisbursementOut]


class AuditEntry(Struct, kw_only=True, omit_defaults=True):
    """One audit log entry; `detail` holds the reason and what the action recorded."""

    entry_id: str
    at: datetime
    actor: str
    action: str
    redemption_id: str | None = None
    disbursement_id: str | None = None
    detail: dict[str, Any]


class AuditLog(Struct, kw_only=True, omit_defaults=True):
    entries: list[AuditEntry]
    next_after: str | None = None  # pass as `after` for the next page; absent on the last


class ApplicationOut(Struct, kw_only=True, omit_defaults=True):
    """An application to a lottery round: applied, then won (with its voucher) or not_drawn."""

    application_id: str
    campaign_id: str
    round_id: str
    user_id: str
    status: Literal["applied", "won", "not_drawn"]
    draws_at: datetime
    applied_at: datetime
    voucher_id: str | None = None


class VoucherList(Struct, kw_only=True, omit_defaults=True):
    vouchers: list[VoucherOut]
    applications: list[ApplicationOut] = []  # to lottery rounds; left out if none


class DrawIn(Strict, kw_only=True):
    request_id: RequestId
    seed: Annotated[str, Meta(pattern=r"^(?:[0-9a-fA-F]{2}){16,64}$")]


class DrawOut(Struct, kw_only=True):
    round_id: str
    winners: int
    applications: int
    applications_root: str


class Ledger(Struct, kw_only=True):
    budget_fen: int
    available_fen: int
    reserved_fen: int
    spent_fen: int
    clawback_due_fen: int
    adjustments_fen: int = 0


class RoundState(Struct, kw_only=True, omit_defaults=True):
    round_id: str
    opens_at: datetime
    closes_at: datetime
    valid_until: datetime
    issued: int
    quota: int | None = None
    reserved_fen: int
    spent_fen: int
    # discount money above reservations that the campaign pool paid for this round, less
    # what refunds returned (they repay it first): reserved + spent <= budget + overdrawn
    overdrawn_fen: int
    budget_fen: int | None = None


class CampaignOut(Struct, kw_only=True, omit_defaults=True):
    campaign_id: str
    definition: CampaignDef
    status: str
    ledger: Ledger
    current_round: RoundState | None = None
    rounds_total: int = 0


class CampaignLive(Struct, kw_only=True, omit_defaults=True):
    """A campaign as the ops page shows it: money, the current round, claims by outcome."""

    campaign_id: str
    name: str
    tenant: str
    status: str
    ledger: Ledger
    current_round: RoundState | None = None
    claims: dict[str, int] = msgspec.field(default_factory=dict)


class ProvisionalDueDates(Struct, kw_only=True):
    """Approved records not yet paid whose due date is provisional, and the soonest."""

    provisional: int
    soonest_due_date: date | None
    soonest_until_year: int | None  # the year whose official holidays it waits for


class OpsOverview(Struct, kw_only=True):
    generated_at: datetime
    campaigns: list[CampaignLive]
    due_dates: ProvisionalDueDates | None = None  # None while PostgreSQL does not answer


class MerchantOut(Struct, kw_only=True):
    merchant_id: str
    name: str
    tenant: str = DEFAULT_TENANT  # merchants stored before tenants existed lack it
    county_code: str
    categories: list[str]
    status: str


def fitting(pattern: Any) -> Callable[[str], bool]:
    """Whether a value fits `pattern`, remembered per value: the same few ids come again
    and again (msgspec.convert looks the type up anew on each call). One cache per pattern,
    keyed by the value alone: a key holding the `Annotated` pattern hashed it in Python on
    every call."""

    @functools.lru_cache(maxsize=4096)
    def fits(value: str) -> bool:
        try:
            msgspec.convert(value, pattern)
        except msgspec.ValidationError:
            return False
        return True

    return fits


fits_id = fitting(Id)
fits_user_id = fitting(UserId)
fits_sha256 = fitting(Sha256Hex)
