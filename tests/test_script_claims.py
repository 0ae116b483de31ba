"""lua/claim_batch.lua and lua/spend_nonces.lua on fakeredis: every answer of the gate, the
order of its checks, what a refusal leaves behind, and the idempotency records."""

from __future__ import annotations

import json
import time

import pytest

from issuer.keys import NONCE_BUCKET_S
from issuer.model import RateLimit, RateLimits
from issuer.protocol import Register, SpentNonce
from tests.fake import CK, EXTRA, RESERVE, Fake, claim, request, settings

pytestmark = pytest.mark.fast

ONE_PER_MINUTE = RateLimit(limit=1, window_s=60)


async def test_a_grant_reserves_from_the_campaign_and_the_round(fake: Fake) -> None:
    await fake.put_campaign(settings())
    [(code, issued_at)] = await fake.claim(claim(1))
    assert code == "OK" and int(issued_at) > 0
    led = await fake.balanced()
    assert (led["available"], led["reserved"]) == (1_000_000 - RESERVE, RESERVE)
    rnd = await fake.round()
    assert (rnd["issued"], rnd["reserved"]) == (1, RESERVE)
    voucher = json.loads(await fake.redis.hget(CK.vouchers, claim(1).candidate))
    assert voucher["status"] == "issued" and voucher["reserve_fen"] == RESERVE
    assert voucher["request"] == [claim(1).idem_field, claim(1).fingerprint]
    assert await fake.redis.hget(CK.persons, "person-1") == claim(1).candidate.encode()
    assert await fake.redis.hget(CK.accounts, "user-1") == claim(1).candidate.encode()
    assert await fake.redis.zscore(CK.expiry, claim(1).candidate) == voucher["expires_at"]
    assert await fake.events() == ["campaign", "claim"]


async def test_the_packed_claims_keep_the_callers_text_byte_for_byte(fake: Fake) -> None:
    # the claims go as one JSON list: quotes, backslashes, control characters and
    # non-ASCII in the fields and in `extra` (itself JSON) come out as they went in
    await fake.put_campaign(settings())
    own = r',"device_id":"d\"\\\n\u00e9中😀","staff_id":"é/"'
    extra = EXTRA[:-1] + own + "}"
    odd = claim(1, user_id='u"\\\n\té中😀', idem_field='k-app|r"\\中', extra=own)
    [(code, issued_at)] = await fake.claim(odd)
    assert code == "OK"
    stored = await fake.redis.hget(CK.vouchers, odd.candidate)
    assert stored.startswith(extra[:-1].encode() + b',"round_id":"r1","user_id":')
    assert json.loads(stored) == {
        **json.loads(extra),
        "round_id": "r1",
        "user_id": odd.user_id,
        "person_ref": "person-1",
        "status": "issued",
        "request": [odd.idem_field, odd.fingerprint],
        "voucher_id": odd.candidate,
        "issued_at": int(issued_at),
        "expires_at": json.loads(stored)["expires_at"],
        "reserve_fen": RESERVE,
    }
    [(code, replayed)] = await fake.claim(odd._replace(nonce="another-nonce-0002"))
    assert code == "REPLAY" and json.loads(replayed)["user_id"] == odd.user_id


async def test_the_idempotency_record_and_the_winners_set(fake: Fake) -> None:
    await fake.put_campaign(settings())
    await fake.claim(claim(1))
    current, _ = CK.idempotency(time.time())
    record = await fake.redis.hget(current, claim(1).idem_field)
    assert record == f"{claim(1).fingerprint}\n{claim(1).candidate}".encode()
    assert await fake.redis.smembers(CK.winners) == {claim(1).idem_field.encode()}
    assert await fake.redis.ttl(current) > 0 and await fake.redis.ttl(CK.winners) > 0


async def test_a_retry_is_answered_with_the_first_voucher(fake: Fake) -> None:
    await fake.put_campaign(settings())
    await fake.claim(claim(1))
    [(code, payload)] = await fake.claim(claim(1, nonce="another-nonce-0001"))
    assert code == "REPLAY"
    assert json.loads(payload)["voucher_id"] == claim(1).candidate
    assert (await fake.round())["issued"] == 1


async def test_a_retry_with_another_body_is_refused(fake: Fake) -> None:
    await fake.put_campaign(settings())
    await fake.claim(claim(1))
    again = claim(1, nonce="another-nonce-0001", fingerprint="other")
    assert await fake.claimed(again) == ["IDEMPOTENCY_MISMATCH"]


async def test_a_nonce_is_spent_before_anything_else_is_looked_at(fake: Fake) -> None:
    await fake.put_campaign(settings())
    await fake.claim(claim(1))
    # the same signed request again: refused as a replayed signature, not answered REPLAY
    assert await fake.claimed(claim(1)) == ["UNAUTHENTICATED"]


async def test_each_person_and_each_account_holds_one_voucher(fake: Fake) -> None:
    await fake.put_campaign(settings())
    await fake.claim(claim(1))
    same_person = claim(2, person_ref="person-1")
    same_account = claim(3, user_id="user-1")
    answers = await fake.claim(same_person, same_account)
    assert answers == [("ALREADY_CLAIMED", claim(1).candidate.encode())] * 2


async def test_a_batch_larger_than_one_command_reads_and_writes_every_claim(fake: Fake) -> None:
    """Lua's C stack bounds a command's arguments: a batch's reads and writes past 1,000
    of them go in several commands, and none is lost."""
    await fake.put_campaign(settings(), budget_fen=10**12)
    many = [claim(n) for n in range(1, 701)]
    assert await fake.claimed(*many) == ["OK"] * 700
    assert await fake.redis.hlen(CK.persons) == await fake.redis.zcard(CK.expiry) == 700
    again = [c._replace(nonce=f"again-{c.nonce}") for c in many]
    assert await fake.claimed(*again) == ["REPLAY"] * 700


async def test_a_claim_sees_what_the_claims_before_it_in_its_batch_wrote(fake: Fake) -> None:
    """The script reads each hash once per batch and writes at its end: a later claim of
    the same batch must still see the nonce, the idempotency record, the voucher and the
    holds of an earlier one, as if each claim had been a batch of its own."""
    await fake.put_campaign(settings())
    retry = claim(1, nonce="another-nonce-0001")
    answers = await fake.claim(
        claim(1),
        retry,
        claim(2, nonce=claim(1).nonce),
        claim(3, person_ref="person-1"),
        claim(4, user_id="user-1"),
        claim(1, nonce="another-nonce-0002", fingerprint="other"),
        claim(5),
    )
    codes = [code for code, _ in answers]
    assert codes == ["OK", "REPLAY", "UNAUTHENTICATED"] + ["ALREADY_CLAIMED"] * 2 + [
        "IDEMPOTENCY_MISMATCH",
        "OK",
    ]
    stored = json.loads(await fake.redis.hget(CK.vouchers, claim(1).candidate))
    assert json.loads(answers[1][1]) == stored
    assert answers[3][1] == answers[4][1] == claim(1).candidate.encode()
    assert stored == {
        **json.loads(EXTRA),
        "round_id": "r1",
        "user_id": "user-1",
        "person_ref": "person-1",
        "status": "issued",
        "request": [claim(1).idem_field, claim(1).fingerprint],
        "voucher_id": claim(1).candidate,
        "issued_at": int(answers[0][1]),
        "expires_at": stored["expires_at"],
        "reserve_fen": RESERVE,
    }
    assert await fake.redis.zscore(CK.expiry, claim(5).candidate) == stored["expires_at"]
    assert (await fake.round())["issued"] == 2
    assert await fake.events() == ["campaign", "claim", "claim"]
    # one stream entry for the batch's vouchers, their records in order
    (_, batch_entry) = (await fake.redis.xrange(CK.events))[-1]
    assert batch_entry[b"t"] == b"claim"
    assert json.loads(batch_entry[b"d"]) == [
        json.loads(await fake.redis.hget(CK.vouchers, c.candidate)) for c in (claim(1), claim(5))
    ]
    # the nonces of all seven are spent, whatever their answer
    assert await fake.claimed(claim(6, nonce="another-nonce-0002")) == ["UNAUTHENTICATED"]


@pytest.mark.parametrize(
    ("rnd", "code"),
    [
        ({"quota": 1}, "ROUND_QUOTA_EXHAUSTED"),
        ({"budget": RESERVE + RESERVE // 2}, "ROUND_BUDGET_EXHAUSTED"),
    ],
)
async def test_the_round_runs_out(fake: Fake, rnd: dict[str, int], code: str) -> None:
    await fake.put_campaign(settings(**rnd))
    assert await fake.claimed(claim(1), claim(2)) == ["OK", code]
    assert (await fake.balanced())["reserved"] == RESERVE


async def test_the_campaign_runs_out_at_the_last_whole_reservation(fake: Fake) -> None:
    await fake.put_campaign(settings(), budget_fen=2 * RESERVE + 1)
    answers = await fake.claimed(claim(1), claim(2), claim(3))
    assert answers == ["OK", "OK", "BUDGET_EXHAUSTED"]
    assert (await fake.balanced())["available"] == 1


async def test_the_round_quota_is_checked_before_the_money(fake: Fake) -> None:
    await fake.put_campaign(settings(quota=0), budget_fen=0)
    assert await fake.claimed(claim(1)) == ["ROUND_QUOTA_EXHAUSTED"]


async def test_a_holder_is_told_so_even_once_the_round_is_sold_out(fake: Fake) -> None:
    await fake.put_campaign(settings(quota=1))
    await fake.claim(claim(1))
    assert await fake.claimed(claim(2, person_ref="person-1")) == ["ALREADY_CLAIMED"]


@pytest.mark.parametrize(
    ("rnd", "code"),
    [((60, 3600), "NOT_OPEN"), ((-120, -60), "ROUND_CLOSED")],  # (opens, closes) in s from now
)
async def test_outside_the_round(fake: Fake, rnd: tuple[int, int], code: str) -> None:
    await fake.put_campaign(settings(*rnd))
    assert await fake.claimed(claim(1)) == [code]


@pytest.mark.parametrize(
    ("status", "code"), [("paused", "CAMPAIGN_PAUSED"), ("ended", "CAMPAIGN_ENDED")]
)
async def test_a_campaign_not_active(fake: Fake, status: str, code: str) -> None:
    await fake.put_campaign(settings(opens_in_s=60))
    await fake.redis.hset(CK.ledger, "status", status)
    # the campaign's status is checked before the round's times
    assert await fake.claimed(claim(1)) == [code]


async def test_an_unknown_campaign_or_round(fake: Fake) -> None:
    answers = await fake.claim(claim(1), claim(2))
    assert answers == [("NOT_FOUND", b""), ("NOT_FOUND", b"")]
    await fake.put_campaign(settings())
    assert await fake.claimed(claim(3), round_id="r9") == ["NOT_FOUND"]


async def test_a_refusal_writes_nothing_but_its_nonce_and_rate_count(fake: Fake) -> None:
    await fake.put_campaign(settings(quota=0))
    before = sorted(await fake.redis.keys("*"))
    state = await fake.ledger(), await fake.round()
    await fake.claim(claim(1), limits=RateLimits(per_account=RateLimit(limit=5, window_s=60)))
    written = sorted(set(await fake.redis.keys("*")) - set(before))
    assert [k.decode().removeprefix(CK.tag).split(":")[1] for k in written] == ["nonce", "rl"]
    assert (await fake.ledger(), await fake.round()) == state
    assert await fake.events() == ["campaign"]


async def test_rate_limits_count_attempts_per_account_device_and_ip(fake: Fake) -> None:
    await fake.put_campaign(settings())
    limits = RateLimits(
        per_account=ONE_PER_MINUTE, per_device=ONE_PER_MINUTE, per_ip=ONE_PER_MINUTE
    )
    first = claim(1, device_id="dev-1", client_ip="10.0.0.1")
    same_account = claim(2, user_id="user-1")
    same_device = claim(3, device_id="dev-1")
    same_ip = claim(4, client_ip="10.0.0.1")
    answers = await fake.claim(first, same_account, same_device, same_ip, limits=limits)
    assert [code for code, _ in answers] == ["OK"] + ["RATE_LIMITED"] * 3
    assert 0 < int(answers[1][1]) <= 60  # seconds until the window ends


async def test_a_request_is_found_in_the_previous_idempotency_bucket(fake: Fake) -> None:
    await fake.put_campaign(settings())
    await fake.claim(claim(1))
    current, previous = CK.idempotency(time.time())
    await fake.redis.rename(current, previous)  # as if its bucket's time had passed
    retry = claim(1, nonce="another-nonce-0001")
    reused = claim(2, idem_field=claim(1).idem_field)  # the same request id, another body
    assert await fake.claimed(retry, reused) == ["REPLAY", "IDEMPOTENCY_MISMATCH"]


async def test_a_replay_is_not_counted_nor_limited(fake: Fake) -> None:
    await fake.put_campaign(settings())
    limits = RateLimits(per_account=ONE_PER_MINUTE)
    await fake.claim(claim(1), limits=limits)
    retry = claim(1, nonce="another-nonce-0001")
    assert await fake.claimed(retry, limits=limits) == ["REPLAY"]


async def test_rate_limits_come_before_the_campaign_s_status(fake: Fake) -> None:
    await fake.put_campaign(settings())
    limits = RateLimits(per_account=ONE_PER_MINUTE)
    await fake.claim(claim(1), limits=limits)
    await fake.redis.hset(CK.ledger, "status", "paused")
    assert await fake.claimed(claim(2, user_id="user-1"), limits=limits) == ["RATE_LIMITED"]


async def test_staff_claims_need_the_person_registered_to_the_account(fake: Fake) -> None:
    await fake.put_campaign(settings())
    registration = {"registration_id": "r-1", "person_ref": "person-1", "user_id": "user-1"}
    await fake.scripts.run(
        Register(
            request=request(1),
            ledger=CK.ledger,
            registrations=CK.registrations,
            events=CK.events,
            person_ref="person-1",
            registration=json.dumps(registration).encode(),
        )
    )
    other_account = claim(2, person_ref="person-1", user_id="user-2")
    unknown = claim(3)
    answers = await fake.claimed(claim(1), other_account, unknown, mode="staff")
    assert answers == ["OK", "NOT_REGISTERED", "NOT_REGISTERED"]


LOTTERY_EXTRA = ',"application_ref":"ref-1"'  # a claim's own, after the campaign's


async def test_a_lottery_round_takes_applications(fake: Fake) -> None:
    await fake.put_campaign(settings(closes_in_s=7200, applications_close_in_s=3600))
    apply = claim(1, candidate="c-fake.a1", extra=LOTTERY_EXTRA)
    [(code, payload)] = await fake.claim(apply, allocation="lottery", lottery=True)
    application = json.loads(payload)
    assert code == "APPLIED" and application["status"] == "applied"
    assert await fake.redis.hget(CK.entries("r1"), "ref-1") == b"c-fake.a1"
    assert (await fake.round())["issued"] == 0 and (await fake.ledger())["reserved"] == 0
    retry = apply._replace(nonce="another-nonce-0001")
    again = apply._replace(idem_field="k-app|req-2", nonce="another-nonce-0002")
    answers = await fake.claimed(retry, again, allocation="lottery", lottery=True)
    assert answers == ["REPLAY_APPLIED", "ALREADY_CLAIMED"]


async def test_applications_close_before_the_round_does(fake: Fake) -> None:
    await fake.put_campaign(settings(closes_in_s=7200, applications_close_in_s=-1))
    apply = claim(1, candidate="c-fake.a1", extra=LOTTERY_EXTRA)
    assert await fake.claimed(apply, allocation="lottery", lottery=True) == ["ROUND_CLOSED"]


async def test_who_waits_for_a_draw_may_not_claim_in_a_first_come_round(fake: Fake) -> None:
    await fake.put_campaign(settings(closes_in_s=7200, applications_close_in_s=3600), settings())
    apply = claim(1, candidate="c-fake.a1", extra=LOTTERY_EXTRA)
    await fake.claim(apply, allocation="lottery", lottery=True)
    answers = await fake.claim(claim(2, person_ref="person-1"), round_id="r2", lottery=True)
    assert answers == [("ALREADY_CLAIMED", b"")]


async def test_nonces_refused_before_the_gate_are_spent_once(fake: Fake) -> None:
    bucket = claim(1).nonce_bucket
    at = bucket * NONCE_BUCKET_S  # an X-Timestamp in the claim's bucket
    fresh = SpentNonce(at, "nonce-a"), SpentNonce(at + NONCE_BUCKET_S + 1, "nonce-b")
    assert await fake.spend(*fresh) == [True, True]
    assert await fake.spend(fresh[1], SpentNonce(at + 1, "nonce-c")) == [False, True]
    # a claim's nonce spent there is refused at the gate
    await fake.put_campaign(settings())
    assert await fake.claimed(claim(1, nonce="nonce-a")) == ["UNAUTHENTICATED"]
    assert await fake.redis.ttl(CK.nonces(bucket, bucket)[0]) > 0


async def test_a_batch_spends_each_nonce_in_its_own_bucket(fake: Fake) -> None:
    """A batch whose X-Timestamps span two nonce buckets: each nonce goes in its own (the
    script finds the first bucket's claims without a number), and a replay of either in a
    later batch is refused."""
    await fake.put_campaign(settings())
    first = claim(1).nonce_bucket
    early, late = claim(1), claim(2, nonce_bucket=first + 1)
    assert await fake.claimed(late, early) == ["OK", "OK"]
    older, newer = CK.nonces(first, first + 1)
    assert await fake.redis.hkeys(older) == [early.nonce.encode()]
    assert await fake.redis.hkeys(newer) == [late.nonce.encode()]
    again = [
        claim(n, nonce=c.nonce, nonce_bucket=c.nonce_bucket) for n, c in ((3, early), (4, late))
    ]
    assert await fake.claimed(*again) == ["UNAUTHENTICATED"] * 2


async def test_a_record_s_strings_are_escaped_as_json(fake: Fake) -> None:
    await fake.put_campaign(settings())
    odd = claim(1, user_id='u"1\\\n/é', idem_field='k-app|r"q')
    assert await fake.claimed(odd) == ["OK"]
    stored = json.loads(await fake.redis.hget(CK.vouchers, odd.candidate))
    assert (stored["user_id"], stored["request"][0]) == (odd.user_id, odd.idem_field)
