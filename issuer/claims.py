"""The claim hot path: validate locally, refuse cheaply when the answer is known, and send
everything else in micro-batches, one EVALSHA per batch per campaign round."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import time
from datetime import UTC, datetime
from typing import cast
from zoneinfo import ZoneInfo

import msgspec
from redis.asyncio import Redis

from issuer import applications, keys, metrics, topology
from issuer.auth import Verified
from issuer.batching import TickBatcher
from issuer.campaigns import HINT_TTL_S, CachedCampaign, Campaigns, Hint, Holders, hash_keys
from issuer.draw_rules import application_ref
from issuer.errors import ApiError, GateRefusal
from issuer.idempotency import fingerprint, idem_field
from issuer.identity import normalise_id_number, person_refs
from issuer.ids import new_id
from issuer.model import ApplicationOut, ClaimIn, RateLimit, Round, VoucherOut
from issuer.protocol import Claim, ClaimBatch, RateLimitArgs, SpendNonces
from issuer.schedule import from_millis, to_millis, zone
from issuer.scripts import Scripts
from issuer.vouchers import VOUCHER, voucher_out

log = logging.getLogger("issuer.claims")
SPEND_S = 0.05  # longest a refused claim's nonce waits to be spent with others
# refusals that hold for the rest of the round: a worker repeats them locally for a while
# (as the script answers them: a batch's codes are looked up undecoded)
STICKY = frozenset(
    (b"ROUND_QUOTA_EXHAUSTED", b"ROUND_BUDGET_EXHAUSTED", b"BUDGET_EXHAUSTED", b"CAMPAIGN_PAUSED")
)


ENCODER = msgspec.json.Encoder()


class Issued(msgspec.Struct, gc=False):
    """A voucher just issued: its id, and its answer (a VoucherOut) already encoded (a
    Struct: made in C, a NamedTuple's __new__ is a Python frame)."""

    voucher_id: str
    body: bytes


# the answer, and whether it is a replay
Claimed = tuple[Issued | VoucherOut | ApplicationOut, bool]
# where the issued answer's encoding is cut (Batcher._answer)
_MARK = "\0"
_MARK_JSON = ENCODER.encode(_MARK).decode()[1:-1]  # inside its quotes
_MARK_AT = datetime(1, 1, 1, tzinfo=UTC)
_MARK_AT_JSON = ENCODER.encode(_MARK_AT).decode()  # with its quotes, as _issued_at
Checked = tuple[Round, str, str]  # a claim's round, idempotency field and person reference
# a claim batch's rate-limit windows (per account, device, client IP): keys, then arguments
Windows = tuple[tuple[str, str, str], tuple[RateLimitArgs, RateLimitArgs, RateLimitArgs]]


def _window(
    ck: keys.CampaignKeys, dimension: str, limit: RateLimit | None, now: float
) -> tuple[str, RateLimitArgs]:
    """A claim batch's rate-limit window of one dimension: its key and its arguments."""
    window_s = limit.window_s if limit else 1
    args = RateLimitArgs(
        limit=limit.limit if limit else -1,
        retry_after_s=math.ceil(window_s - now % window_s),
        window_ttl_s=window_s * 2,
    )
    return ck.rate_window(dimension, window_s, now), args


@functools.lru_cache(maxsize=256)
def refusal(code: str, detail: str | None = None) -> ApiError:
    """A refusal the claim path returns, made once per code and detail (making an
    exception costs about as much as answering it). Returned, never raised: a raised one
    would keep its traceback, and its frames, for good."""
    return ApiError(code, detail)


# an IPv4 address as ipaddress writes it (no leading zeros): taken as it is, without
# ipaddress.ip_address (about 20 times the cost of this match)
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"({_OCTET}\.){{3}}{_OCTET}")


def _client_ip(given: str) -> str:
    """The normalised client IP a claim names; INVALID_REQUEST if malformed."""
    if _IPV4.fullmatch(given):
        return given
    try:
        return str(ipaddress.ip_address(given))
    except ValueError:
        raise ApiError("INVALID_REQUEST", "client_ip: not an IP address") from None


class Batcher(TickBatcher[Claim, Claimed | ApiError]):
    """Sends the claims of one campaign round as one `claim_batch` script call, and
    answers each of its claims: an issued voucher (what they share is made once per round),
    a replay, an application, or the gate's refusal."""

    def __init__(self, claims: Claims, cached: CachedCampaign, rnd: Round) -> None:
        super().__init__(claims.batch_max)
        self.claims = claims
        self.cached = cached
        self.round = rnd
        # whether its round is a lottery's (its claims' records hold an application_ref):
        # read per claim, a plain attribute (a cached property's is read the generic way)
        self.lottery = rnd.allocation == "lottery"
        self._issued_ms = b""  # the last issued_at answered, and its encoding
        self._issued_at = ""
        self._windows_at = -1  # the second of its rate-limit windows, and the windows
        self._windows: Windows

    @functools.cached_property
    def zone(self) -> ZoneInfo:
        return zone(self.cached.definition.timezone)

    @functools.cached_property
    def _answer(self) -> tuple[str, str, str, str]:
        """Its issued vouchers' answer, encoded once, cut around what differs per voucher:
        the voucher id, the user id and issued_at (the rest is the round's). Ids are
        spliced as they are: their patterns hold no character JSON escapes."""
        voucher = self.cached.definition.voucher
        sample = ENCODER.encode(
            VoucherOut(
                voucher_id=_MARK,
                campaign_id=self.cached.keys.campaign_id,
                round_id=self.round.round_id,
                user_id=_MARK,
                status="issued",
                issued_at=_MARK_AT,
                # its vouchers' expiry, the round's valid_until
                expires_at=from_millis(to_millis(self.round.valid_until), self.zone),
                discount_rate_bp=voucher.discount_rate_bp,
                cap_fen=voucher.cap_fen,
            )
        ).decode()
        head, between, rest = sample.split(_MARK_JSON)
        before_at, after_at = rest.split(_MARK_AT_JSON)
        return head, between, before_at, after_at

    @functools.cached_property
    def _extra(self) -> str:
        """Its claims' records up to the campaign's fields (the batch's `record_head`),
        encoded once, its "}" left off."""
        voucher = self.cached.definition.voucher
        common = {
            "campaign_id": self.cached.keys.campaign_id,
            "discount_rate_bp": voucher.discount_rate_bp,
            "cap_fen": voucher.cap_fen,
        }
        return ENCODER.encode(common).decode()[:-1]

    def extra(self, claim: ClaimIn, candidate: str) -> str:
        """A claim's `extra`, its record's own fields, as JSON members that follow the
        campaign's (`_extra` and this are the same bytes as one dict encoded); called only
        for a claim that has some (a device or staff id, or a lottery round's), "" the
        others'."""
        own: dict[str, str] = {}
        if claim.device_id is not None:
            own["device_id"] = claim.device_id
        if claim.staff_id is not None:
            own["staff_id"] = claim.staff_id
        if self.lottery:
            own["application_ref"] = application_ref(self.claims.ref_key, candidate)
        return f",{ENCODER.encode(own).decode()[1:-1]}"

    @functools.cached_property
    def _counted(self) -> object:
        """The count of its issued claims (counted per batch, not per answer)."""
        return metrics.child(metrics.CLAIMS, self.cached.keys.campaign_id, "OK")

    async def send(self, items: list[Claim]) -> list[Claimed | ApiError]:
        """Each claim's answer. An issued voucher's (nearly every claim of a batch) is made
        here, spliced into its round's answer, and counted with the batch's others: the
        script answers only its time, the same for a batch, the rest is what was sent."""
        answers: list[Claimed | ApiError] = []
        head, between, before_at, after_at = self._answer
        issued = 0
        codes, payloads = await self.run(items)
        for claim, code, payload in zip(items, codes, payloads, strict=True):
            if code != b"OK":
                answers.append(self.answer(code.decode(), payload))
                continue
            if payload != self._issued_ms:
                at = from_millis(int(payload), self.zone)
                self._issued_ms, self._issued_at = payload, ENCODER.encode(at).decode()
            voucher_id = claim.candidate
            body = (
                f"{head}{voucher_id}{between}{claim.user_id}{before_at}{self._issued_at}{after_at}"
            )
            answers.append((Issued(voucher_id, body.encode()), False))
            issued += 1
        if issued:
            metrics.count(self._counted, issued)
        return answers

    async def run(self, items: list[Claim]) -> tuple[list[bytes], list[bytes]]:
        """One `claim_batch` call: its claims' codes and their payloads, as the script
        answers them (undecoded)."""
        ck = self.cached.keys
        definition = self.cached.definition
        round_id = self.round.round_id
        now = time.time()
        rate_windows, rate_limits = self._rate_windows(now)
        first_nonce_bucket, nonce_buckets = ck.nonce_range({c.nonce_bucket for c in items})
        current, previous = ck.idempotency(now)
        batch = ClaimBatch(
            ledger=ck.ledger,
            round=ck.round(round_id),
            persons=ck.persons,
            accounts=ck.accounts,
            vouchers=ck.vouchers,
            registrations=ck.registrations,
            events=ck.events,
            idem_current=current,
            idem_previous=previous,
            winners=ck.winners,
            expiry=ck.expiry,
            applications=ck.applications,
            applicants=ck.applicants,
            applicant_accounts=ck.applicant_accounts,
            entries=ck.entries(round_id),
            rate_windows=rate_windows,
            nonce_buckets=nonce_buckets,
            round_id=round_id,
            reserve_fen=definition.voucher.reserve,
            mode=definition.mode,
            rate_limits=rate_limits,
            allocation=self.round.allocation,
            check_applicants="1" if self.cached.lottery else "",
            first_nonce_bucket=first_nonce_bucket,
            record_head=self._extra,
            claims=items,
        )
        scripts = self.claims.scripts
        if scripts.ack == "none":
            result = await scripts.run(batch)
        else:  # answer only once the batch's vouchers are durable (ISSUER_DURABLE_ACK)
            result = await scripts.run_acked(batch, _issued_any)
        metrics.observe(metrics.BATCH_SIZE, len(items))
        status, version = result[0].decode(), result[1].decode()
        codes = result[4::2]
        self.claims.after_batch(self.cached, self.round, status, version, codes)
        return codes, result[5::2]

    def _rate_windows(self, now: float) -> Windows:
        """Its batch's rate-limit windows at `now`, made again only when the second changes:
        a window's key, and the seconds until it ends, rounded up, change only with it."""
        second = int(now)
        if second != self._windows_at:
            ck, limits = self.cached.keys, self.cached.definition.rate_limits
            account, account_limit = _window(ck, "account", limits.per_account, now)
            device, device_limit = _window(ck, "device", limits.per_device, now)
            ip, ip_limit = _window(ck, "ip", limits.per_ip, now)
            windows = (account, device, ip), (account_limit, device_limit, ip_limit)
            self._windows_at, self._windows = second, windows
        return self._windows

    def answer(self, code: str, payload: bytes) -> Claimed | ApiError:
        """The answer to a claim the script did not issue: a replay, an application, or
        the gate's refusal (`code`, with its payload)."""
        definition = self.cached.definition
        if code == "REPLAY":
            return voucher_out(VOUCHER.decode(payload), definition.timezone, "issued"), True
        if code in ("APPLIED", "REPLAY_APPLIED"):
            app = applications.APPLICATION.decode(payload)
            app_round = applications.round_of(self.cached.stored.rounds, app.round_id)
            return applications.application_out(
                app, app_round, definition.timezone
            ), code == "REPLAY_APPLIED"
        if code == "ALREADY_CLAIMED":  # no voucher: an application waits for its draw
            return GateRefusal(code, voucher_id=payload.decode() or None)
        if code == "RATE_LIMITED":
            return GateRefusal(code, retry_after=int(payload))
        if code == "ROUND_CLOSED":
            nxt = self.cached.round_at(time.time())
            return GateRefusal("NOT_OPEN" if nxt is not None else "CAMPAIGN_ENDED")
        return GateRefusal(code)


def _issued_any(result: list[bytes]) -> bool:
    """Whether a batch answers a voucher (new, or replayed: its first answer may have been a
    503 because it was not confirmed then)."""
    return any(c in (b"OK", b"REPLAY") for c in result[4::2])


class NonceSpender:
    """Spends the nonces of claims refused before the gate, so that a replay is refused
    even after the answer would have changed; one script call per campaign per batch, in
    the background (a call that fails leaves its nonces unspent, logged). A nonce lingers
    up to SPEND_S for others: sent as they came, nearly every refusal was a round trip of
    its own, a fifth of its cost. Nobody waits for a nonce's answer: a campaign's nonces
    wait in one flat list (X-Timestamp, nonce, X-Timestamp, nonce...), sent as it is: the
    script's layout (it finds each nonce's bucket). One batch in flight: nonces refused
    meanwhile go in the next."""

    def __init__(self, scripts: Scripts, batch_max: int) -> None:
        self.scripts = scripts
        self.batch_max = batch_max
        self.waiting: dict[str, list[int | str]] = {}  # by campaign
        self.running = False  # a drain is due or under way
        self._lingering: asyncio.TimerHandle | None = None

    def refused(self, campaign_id: str, verified: Verified, err: ApiError) -> ApiError:
        """The answer to a claim (or redemption) of `campaign_id` refused with `err`, at
        once (`Claims.refused`). Refused before the gate, its nonce is spent all the same,
        in the next batch, so that a replay cannot succeed once the answer would change
        (the round opened, the budget grew): the gate refuses it, UNAUTHENTICATED. A
        replay is refused locally like the first request, before the spend or after it: it
        can only resubmit the same person's claim. The gate spends its own nonces; after
        UNAVAILABLE the gate may have run, or not: a retry is its to decide."""
        if isinstance(err, GateRefusal) or err.code == "UNAVAILABLE":
            return err
        waiting = self.waiting.get(campaign_id)
        if waiting is None:
            waiting = self.waiting[campaign_id] = []
        waiting += verified.timestamp, verified.nonce
        if not self.running:
            self.running = True
            self._lingering = asyncio.get_running_loop().call_later(SPEND_S, self._start)
        return err

    def _start(self) -> None:
        self._lingering = None
        asyncio.get_running_loop().create_task(self._drain())

    async def flush(self) -> None:
        """Spend what lingers now (a worker stopping)."""
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
            await self._drain()

    async def _drain(self) -> None:
        size = 2 * self.batch_max
        try:
            while self.waiting:
                waiting, self.waiting = self.waiting, {}
                for campaign_id, nonces in waiting.items():
                    for at in range(0, len(nonces), size):
                        part = nonces[at : at + size]
                        try:
                            await self.spend(campaign_id, part)
                        except Exception as exc:
                            log.warning(
                                "a batch failed",
                                extra={
                                    "batcher": "NonceSpender",
                                    "campaign_id": campaign_id,
                                    "posted": len(part) // 2,
                                    "error": repr(exc),
                                },
                            )
        finally:
            self.running = False

    async def spend(self, campaign_id: str, nonces: list[int | str]) -> list[int]:
        """Spend one campaign's nonces (X-Timestamp, nonce, X-Timestamp, nonce...) in one
        script call, each in its X-Timestamp's bucket: per nonce 1 (fresh, now spent) or 0
        (seen before). The buckets' keys run from the earliest X-Timestamp's to the latest's
        (the script finds each nonce's bucket, no Python step per nonce)."""
        times = cast(list[int], nonces[::2])
        span = keys.nonce_bucket(min(times)), keys.nonce_bucket(max(times))
        first, buckets = keys.CampaignKeys(campaign_id).nonce_range(span)
        call = SpendNonces(nonce_buckets=buckets, first_nonce_bucket=first, nonces=nonces)
        return cast(list[int], await self.scripts.run(call))


class Claims:
    """Entry point of `POST /v1/campaigns/{id}/claims`."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        campaigns: Campaigns,
        person_key: bytes,
        batch_max: int,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.campaigns = campaigns
        self.person_ref = person_refs(person_key)  # of a normalised ID number
        # application refs are published: keyed apart from the references to people
        self.ref_key = hmac.new(person_key, b"application_ref", hashlib.sha256).digest()
        self.batch_max = batch_max
        self._batchers: dict[str, Batcher] = {}  # by campaign: its current round's
        self._nonces = NonceSpender(scripts, batch_max)
        # the answer to a claim refused with an error, its nonce spent in the background:
        # the spender's own method (a method of this class calling it was one frame more)
        self.refused = self._nonces.refused

    async def flush(self) -> None:
        """Spend the nonces of refusals still waiting (a worker stopping)."""
        await self._nonces.flush()

    async def claim(
        self, campaign_id: str, claim: ClaimIn, verified: Verified, remote: str | None = None
    ) -> Claimed | ApiError:
        """Issue a voucher (in a lottery round: take an application): `check`, then
        `submit`, the campaign loaded first if this worker does not hold it."""
        cached = self.campaigns.peek(campaign_id) or await self.campaigns.cached(campaign_id)
        checked = self.check(cached, claim, verified)
        if isinstance(checked, ApiError):
            return checked
        return await self.submit(cached, claim, verified, remote, checked)

    def check(
        self, cached: CachedCampaign, claim: ClaimIn, verified: Verified
    ) -> Checked | ApiError:
        """Every check made without the gate, in no coroutine (most claims at 10:00 are
        refused here): what `submit` needs, or the refusal, returned, not raised (an
        exception costs at each frame it passes). A claim that is not valid raises
        (INVALID_REQUEST, FORBIDDEN). The person's reference, an HMAC, is made only once
        the round is open: the ID number is checked before, its reference not needed."""
        if cached.staff or verified.key.role != "app":  # all but the surge's app claims
            self._check_caller(cached, claim, verified)
        # the ID number normalised (None: a person_ref given) here, in no frame of its own
        person, number = claim.person, None
        if (person is None) is (claim.person_ref is None):  # bools: `==` is not specialised
            raise ApiError("INVALID_REQUEST", "person: give exactly one of person, person_ref")
        if person is not None:
            try:
                number = normalise_id_number(person.id_number)
            except ValueError as exc:
                raise ApiError("INVALID_REQUEST", f"person.id_number: {exc}") from None
        loc = claim.location  # in the campaign's region? (here too, in no frame of its own)
        if loc.region_code is not None:
            if loc.lat is not None or loc.lon is not None:
                raise ApiError("INVALID_REQUEST", "location: give either region_code or lat/lon")
            inside = cached.region.contains_code(loc.region_code)
        elif loc.lat is not None and loc.lon is not None:
            inside = cached.region.contains_point(loc.lat, loc.lon, loc.crs)
        else:
            raise ApiError("INVALID_REQUEST", "location: needs lat and lon, or region_code")
        if not inside:
            return refusal("OUTSIDE_GEOFENCE")
        now = time.time()
        at = cached.windows.at(now)
        if at is None:
            return refusal("CAMPAIGN_ENDED")
        if now < cached.windows.opens[at]:
            return cached.not_open[at]
        rnd = cached.stored.rounds[at]
        idem = idem_field(verified.key.id, claim.request_id)
        person_ref = self.person_ref  # read, then called (Campaigns.peek)
        ref = claim.person_ref if number is None else person_ref(number)
        assert ref is not None
        hint = cached.hint
        if hint is not None and hint.round_id == rnd.round_id and now < hint.until:
            held = hint.holders  # who holds a voucher, by request, person or account
            if not (idem in held.requests or ref in held.persons or claim.user_id in held.accounts):
                return hint.refusal
        return rnd, idem, ref

    def submit(
        self,
        cached: CachedCampaign,
        claim: ClaimIn,
        verified: Verified,
        remote: str | None,
        checked: Checked,
    ) -> asyncio.Future[Claimed | ApiError]:
        """Send a checked claim to the gate in its round's batch. The future answers
        (voucher or application, replayed), or a refusal, returned (the gate's, or
        INVALID_REQUEST for a client_ip that is not an IP address); it raises UNAVAILABLE
        if the gate cannot be reached. No coroutine: the batch answers each of its claims.
        `remote` is the caller's address, the client IP of rate limits when the body names
        none."""
        campaign_id = cached.keys.campaign_id
        rnd, idem, ref = checked
        client_ip = remote or ""  # unless the claim names one ("" if unknown)
        if claim.client_ip is not None:
            try:
                client_ip = _client_ip(claim.client_ip)
            except ApiError as err:
                refused: asyncio.Future[Claimed | ApiError]
                refused = asyncio.get_running_loop().create_future()
                refused.set_result(err)
                return refused
        # the batcher of its round, one per campaign, kept while idle: it holds what its
        # round's answers share, encoded once (dropped whenever its queue ran dry, it was
        # made again for nearly every batch). A claim of another round, or of the campaign
        # loaded anew (another version), replaces it; the one replaced sends what it holds.
        batcher = self._batchers.get(campaign_id)
        if batcher is None or batcher.cached is not cached or batcher.round is not rnd:
            batcher = self._batchers[campaign_id] = Batcher(self, cached, rnd)
        candidate = new_id(campaign_id)
        canonical = msgspec.structs.replace(claim, person=None, person_ref=ref)
        # by position, in its fields' order; tuple.__new__ as Claim's own __new__ does, less
        # its Python frame (by keyword, Claim(...) costs 3 times more)
        pending: Claim = tuple.__new__(
            Claim,
            (
                idem,
                fingerprint(canonical),
                keys.nonce_bucket(verified.timestamp),
                verified.nonce,
                ref,
                claim.user_id,
                candidate,
                (
                    batcher.extra(claim, candidate)
                    if claim.device_id or claim.staff_id or batcher.lottery
                    else ""
                ),
                claim.device_id or "",
                client_ip,
            ),
        )
        return batcher.submit(pending)

    def _check_caller(self, cached: CachedCampaign, claim: ClaimIn, verified: Verified) -> None:
        """FORBIDDEN unless the key's role is the one that claims in the campaign's mode;
        INVALID_REQUEST for a staff-mode claim that names no staff member."""
        role = verified.key.role
        if cached.staff:
            if role != "merchant":
                raise ApiError("FORBIDDEN", "staff-mode claims come from a merchant key")
            if claim.staff_id is None:
                raise ApiError("INVALID_REQUEST", "staff_id: required in staff mode")
        elif role != "app":
            raise ApiError("FORBIDDEN", "claims come from an app key")

    def after_batch(
        self, cached: CachedCampaign, rnd: Round, status: str, version: str, codes: list[bytes]
    ) -> None:
        """Learn from a batch's answers: a newer definition, or a refusal to repeat locally."""
        if self.campaigns.note_version(cached.keys.campaign_id, version):
            self.campaigns.forget(cached.keys.campaign_id)
            return
        if cached.staff:
            return  # face-to-face claims: no surge, and Redis may say NOT_REGISTERED first
        if STICKY.isdisjoint(codes) or cached.arming:  # nearly every batch: nothing sticky
            return
        sticky = next(c for c in reversed(codes) if c in STICKY)  # the last one
        cached.arming = True
        arm = self._arm_hint(cached, sticky.decode(), rnd.round_id)
        asyncio.get_running_loop().create_task(arm)

    async def _arm_hint(self, cached: CachedCampaign, code: str, round_id: str) -> None:
        """Start refusing `code` locally for a while. Redis would answer holders of a
        voucher differently (replay, ALREADY_CLAIMED), so they are loaded first and exempt;
        they are reloaded only when the campaign's voucher count changed."""
        ck = cached.keys
        try:
            count = await self.redis.hlen(ck.persons)
            previous = cached.hint.holders if cached.hint is not None else None
            if previous is not None and previous.count == count:
                holders = previous
            else:
                holders = Holders(
                    count=count,
                    requests=frozenset(m.decode() for m in await self.redis.smembers(ck.winners)),
                    persons=frozenset(await hash_keys(self.redis, ck.persons)),
                    accounts=frozenset(await hash_keys(self.redis, ck.accounts)),
                )
            cached.hint = Hint(refusal(code), round_id, time.time() + HINT_TTL_S, holders)
        except topology.REDIS_ERRORS:
            cached.hint = None
        finally:
            cached.arming = False
