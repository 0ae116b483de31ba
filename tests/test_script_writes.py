"""The definition and ops scripts on fakeredis: campaign_put, set_status, round_budget,
register and merchant_put; each check's order and each idempotent write's records."""

from __future__ import annotations

import json
import time

import pytest

from issuer import keys
from issuer.protocol import MerchantPut, Register, RoundBudget, SetStatus
from tests.fake import BUDGET, CK, RESERVE, Fake, claim, request, settings

pytestmark = pytest.mark.fast


async def test_a_campaign_is_created_then_replaced_until_it_opens(fake: Fake) -> None:
    assert await fake.put_campaign(settings(60, 3600), settings(7200, 9000)) == [b"OK", b"1"]
    led = await fake.balanced()
    assert (led["status"], led["version"], led["available"]) == ("active", 1, BUDGET)
    assert led["opens"] == (await fake.round("r1"))["opens"]
    assert await fake.put_campaign(settings(60, 3600)) == [b"CONFLICT", b"1"]  # not version 1
    assert await fake.put_campaign(settings(60, 3600), expected_version="1") == [b"OK", b"2"]
    assert not await fake.redis.exists(CK.round("r2"))  # the old definition's round is gone
    assert await fake.events() == ["campaign", "campaign"]


async def test_a_campaign_that_opened_or_holds_money_is_not_replaced(fake: Fake) -> None:
    await fake.put_campaign(settings())
    assert await fake.put_campaign(settings(60), expected_version="1") == [
        b"CAMPAIGN_RUNNING",
        b"1",
    ]
    assert await fake.put_campaign(settings(60), expected_version="") == [b"CONFLICT", b"1"]


def status(n: int, to: str, fingerprint: str = "fp") -> SetStatus:
    return SetStatus(
        request=request(n, fingerprint),
        ledger=CK.ledger,
        events=CK.events,
        status=to,
        event=b'{"by":"k-ops","reason":"test"}',
    )


async def test_pause_and_resume_answer_as_they_first_did(fake: Fake) -> None:
    assert await fake.scripts.run(status(1, "paused")) == [b"NOT_FOUND", b"", b""]
    await fake.put_campaign(settings())
    assert await fake.scripts.run(status(1, "paused")) == [b"OK", b"paused", b"2"]
    assert await fake.scripts.run(status(2, "active")) == [b"OK", b"active", b"3"]
    # the first pause, retried after the resume: answered as it was, changing nothing
    assert await fake.scripts.run(status(1, "paused")) == [b"REPLAY", b"paused", b"2"]
    assert (await fake.ledger())["status"] == "active"
    assert await fake.scripts.run(status(1, "active", "other")) == [
        b"IDEMPOTENCY_MISMATCH",
        b"",
        b"",
    ]
    await fake.redis.hset(CK.ledger, "status", "ended")
    assert await fake.scripts.run(status(3, "active")) == [b"CAMPAIGN_ENDED", b"ended", b"3"]


async def test_an_idempotency_record_is_found_in_the_previous_bucket(fake: Fake) -> None:
    await fake.put_campaign(settings())
    yesterday = time.time() - keys.IDEMPOTENCY_BUCKET_S
    first = status(1, "paused")
    first.request = request(1, now_s=yesterday)
    assert (await fake.scripts.run(first))[0] == b"OK"
    record = await fake.redis.hget(first.request.idem_current, first.request.idem_field)
    assert record == b"fp\n2"
    ttl = await fake.redis.ttl(first.request.idem_current)
    assert keys.IDEMPOTENCY_TTL_S - 5 < ttl <= keys.IDEMPOTENCY_TTL_S
    assert (await fake.scripts.run(status(1, "paused")))[0] == b"REPLAY"  # looked up today


def budget(
    n: int, new: int, expected: int = -1, quota: int | str = "", fingerprint: str = "fp"
) -> RoundBudget:
    return RoundBudget(
        request=request(n, fingerprint),
        ledger=CK.ledger,
        round=CK.round("r1"),
        events=CK.events,
        expected_budget_fen=expected,
        budget_fen=new,
        quota=quota,
        event=b'{"by":"k-ops"}',
    )


async def test_a_round_budget_is_compare_and_set(fake: Fake) -> None:
    assert await fake.scripts.run(budget(1, 1)) == [b"NOT_FOUND"]
    await fake.put_campaign(settings(budget=3 * RESERVE))
    assert await fake.claimed(claim(1), claim(2)) == ["OK", "OK"]
    held = [b"600000", b"-1", b"2", b"400000"]
    assert await fake.scripts.run(budget(1, RESERVE, expected=5)) == [b"BUDGET_CONFLICT", *held]
    # below what its vouchers hold
    low = budget(2, 2 * RESERVE - 1, expected=3 * RESERVE)
    assert await fake.scripts.run(low) == [b"BUDGET_CONFLICT", *held]
    # a quota below the vouchers issued
    below = budget(3, 2 * RESERVE, expected=3 * RESERVE, quota=1)
    assert await fake.scripts.run(below) == [b"BUDGET_CONFLICT", *held]
    ok = budget(4, 2 * RESERVE, expected=3 * RESERVE, quota=2)
    answer = [b"400000", b"2", b"2", b"400000"]
    assert await fake.scripts.run(ok) == [b"OK", *answer]
    assert ((await fake.round())["budget"], (await fake.round())["quota"]) == (2 * RESERVE, 2)
    assert (await fake.ledger())["version"] == 2
    assert await fake.scripts.run(ok) == [b"REPLAY", *answer]
    mismatch = budget(4, 2 * RESERVE, expected=3 * RESERVE, fingerprint="other")
    assert (await fake.scripts.run(mismatch))[0] == b"IDEMPOTENCY_MISMATCH"
    assert await fake.claimed(claim(3)) == ["ROUND_QUOTA_EXHAUSTED"]


def register(n: int, person_ref: str, fingerprint: str = "fp") -> Register:
    record = {"registration_id": f"r-{n}", "person_ref": person_ref, "user_id": f"user-{n}"}
    return Register(
        request=request(n, fingerprint),
        ledger=CK.ledger,
        registrations=CK.registrations,
        events=CK.events,
        person_ref=person_ref,
        registration=json.dumps(record).encode(),
    )


async def test_a_person_registers_once(fake: Fake) -> None:
    assert await fake.scripts.run(register(1, "person-1")) == [b"NOT_FOUND", b""]
    await fake.put_campaign(settings())
    code, first = await fake.scripts.run(register(1, "person-1"))
    assert code == b"OK" and json.loads(first)["registered_at"] > 0
    assert await fake.scripts.run(register(1, "person-1")) == [b"REPLAY", first]
    assert await fake.scripts.run(register(2, "person-1")) == [b"EXISTING", first]
    mismatch = register(1, "person-1", "other")
    assert await fake.scripts.run(mismatch) == [b"IDEMPOTENCY_MISMATCH", b""]
    assert await fake.events() == ["campaign", "registration"]


async def test_a_merchant_is_created_then_replaced_within_its_tenant(fake: Fake) -> None:
    def put(record: bytes, tenant: str = "xiangning") -> MerchantPut:
        return MerchantPut(
            merchants=keys.MERCHANTS,
            events=keys.GLOBAL_EVENTS,
            version=keys.MERCHANT_VERSION,
            merchant_id="m-1",
            merchant=record,
            tenant=tenant,
        )

    # each change raises the merchants' version: past the last, to the time in ms at least
    code, first = await fake.scripts.run(put(b'{"tenant":"xiangning","name":"a"}'))
    assert code == b"CREATED" and first >= int((time.time() - 60) * 1000)
    await fake.redis.set(keys.MERCHANT_VERSION, 10**14)  # ahead of the clock
    assert await fake.scripts.run(put(b'{"tenant":"xiangning","name":"b"}')) == [
        b"REPLACED",
        10**14 + 1,
    ]
    other = put(b'{"tenant":"xixian","name":"c"}', tenant="xixian")
    assert await fake.scripts.run(other) == [b"TENANT_CONFLICT"]
    assert await fake.redis.hget(keys.MERCHANTS, "m-1") == b'{"tenant":"xiangning","name":"b"}'
    assert await fake.redis.xlen(keys.GLOBAL_EVENTS) == 2
    assert await fake.redis.get(keys.MERCHANT_VERSION) == str(10**14 + 1).encode()
