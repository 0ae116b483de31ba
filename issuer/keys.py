"""Every Redis key name, built in one place.

All keys of one campaign carry the hash tag `{c:<campaign_id>}`: Redis Cluster hashes only
the part between the braces, so every key a campaign's script touches lands in the same
slot and one EVALSHA can use them all. Scripts receive these names in KEYS and never build
key names from ARGV. Global keys (the campaign registry, merchants, nonces of non-claim
calls) carry `{g}` so that they share one slot too.
"""

from __future__ import annotations

from collections.abc import Collection

# Window in which an idempotency record or a signature nonce must be remembered.
IDEMPOTENCY_BUCKET_S = 24 * 3600  # a retried write is answered the same for 24-48 h
NONCE_BUCKET_S = 600  # signatures are accepted ±300 s around server time
# a bucket expires once no lookup can reach it: two bucket widths after it began
IDEMPOTENCY_TTL_S = 2 * IDEMPOTENCY_BUCKET_S
NONCE_TTL_S = 2 * NONCE_BUCKET_S

CAMPAIGNS = "{g}:campaigns"  # set of campaign ids
MERCHANTS = "{g}:merchants"  # hash merchant_id -> JSON definition
# counter raised by every merchant change: the version of the merchants a worker has read
MERCHANT_VERSION = "{g}:merchant_version"
GLOBAL_EVENTS = "{g}:events"  # stream of merchant changes
FLUSH_GROUP = "flusher"  # consumer group reading every event stream


def nonce_key(key_id: str, nonce: str) -> str:
    """Replay guard of a non-claim call (SET NX EX)."""
    return f"{{g}}:nonce:{key_id}:{nonce}"


def bucket(prefix: str, now_s: float, width_s: int) -> str:
    return f"{prefix}:{int(now_s // width_s)}"


def nonce_bucket(timestamp_s: int) -> int:
    """The number of the bucket of claim nonces of a request's own X-Timestamp, so that a
    replayed request (same timestamp) is always checked against the same hash."""
    return timestamp_s // NONCE_BUCKET_S


class CampaignKeys:
    """Names of one campaign's keys."""

    __slots__ = (
        "accounts",
        "applicant_accounts",
        "applicants",
        "applications",
        "campaign_id",
        "definition",
        "events",
        "expiry",
        "ledger",
        "merchant_version",
        "orders",
        "persons",
        "redemptions",
        "refunds",
        "registrations",
        "tag",
        "vouchers",
        "winners",
    )

    def __init__(self, campaign_id: str) -> None:
        tag = f"{{c:{campaign_id}}}"
        self.campaign_id = campaign_id
        self.tag = tag
        self.definition = f"{tag}:def"  # JSON of StoredCampaign
        self.ledger = f"{tag}:ledger"  # hash: status, version, budget, available, reserved, ...
        self.persons = f"{tag}:persons"  # hash person_ref -> voucher_id
        self.accounts = f"{tag}:accounts"  # hash user_id -> voucher_id
        self.vouchers = f"{tag}:vouchers"  # hash voucher_id -> JSON record
        self.registrations = f"{tag}:registrations"  # hash person_ref -> JSON record
        self.events = f"{tag}:events"  # stream flushed to PostgreSQL
        self.winners = f"{tag}:winners"  # set of idempotency fields that won a voucher
        self.expiry = f"{tag}:expiry"  # sorted set voucher_id by expires_at ms (issued only)
        self.redemptions = f"{tag}:redemptions"  # hash redemption_id -> JSON record
        self.orders = f"{tag}:orders"  # hash order_id -> redemption_id (one per order)
        self.refunds = f"{tag}:refunds"  # hash refund_id -> JSON record
        # the merchants' version (MERCHANT_VERSION) its redemptions are decided at: raised,
        # never lowered, by each merchant change before it is answered (issuer/merchants.py)
        self.merchant_version = f"{tag}:merchant_version"
        # lottery rounds: every application, and each person's and account's latest one
        # (while it waits for its draw, they may neither apply again nor claim)
        self.applications = f"{tag}:applications"  # hash application_id -> JSON record
        self.applicants = f"{tag}:applicants"  # hash person_ref -> application_id
        self.applicant_accounts = f"{tag}:applicant_accounts"  # hash user_id -> application_id

    def round(self, round_id: str) -> str:
        """Hash: opens/closes/valid_until (ms), quota, budget, issued, reserved (held by
        issued vouchers), spent (discounts of its redeemed vouchers, net of refunds)."""
        return f"{self.tag}:round:{round_id}"

    def entries(self, round_id: str) -> str:
        """Hash: application_ref -> application_id, the applications of a lottery round."""
        return f"{self.tag}:entries:{round_id}"

    def draw(self, round_id: str) -> str:
        """Hash of a lottery round's draw: seed, root, cursor (applications decided, in rank
        order), winners, full (1 once quota or money refused a winner)."""
        return f"{self.tag}:draw:{round_id}"

    def idempotency(self, now_s: float) -> tuple[str, str]:
        """The current and the previous idempotency bucket (hash request key -> result)."""
        return _bucket_pair(f"{self.tag}:idem", now_s, IDEMPOTENCY_BUCKET_S)

    def nonces(self, first: int, last: int) -> list[str]:
        """Hashes of claim and redemption nonces: the buckets numbered `first` to `last`
        (nonce_bucket)."""
        return [f"{self.tag}:nonce:{n}" for n in range(first, last + 1)]

    def nonce_range(self, numbers: Collection[int]) -> tuple[int, list[str]]:
        """The first of these nonce buckets, and the keys from it to the last, as the
        scripts take them (a batch's X-Timestamps, ±300 s of the time, span two at most)."""
        first = min(numbers)
        return first, self.nonces(first, max(numbers))

    def rate_window(self, dimension: str, window_s: int, now_s: float) -> str:
        """Hash: identity (account, device or IP) -> claim attempts in the current window."""
        return bucket(f"{self.tag}:rl:{dimension}:{window_s}", now_s, window_s)

    def staged(self, key: str) -> str:
        """Where `issuer rebuild` writes one of this campaign's keys before moving it in
        place; same hash tag, so the move is one script in the campaign's slot."""
        return f"{self.tag}:rebuild:{key.removeprefix(self.tag + ':')}"


def _bucket_pair(prefix: str, now_s: float, width_s: int) -> tuple[str, str]:
    n = int(now_s // width_s)
    return f"{prefix}:{n}", f"{prefix}:{n - 1}"
