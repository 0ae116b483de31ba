"""Identity numbers and keyed references."""

import datetime
import hmac
import random
import time
from collections.abc import Callable

import pytest

from issuer import hmacs, identity
from issuer.identity import _check_digit, name_ref, normalise_id_number, person_ref, phone_ref

pytestmark = pytest.mark.fast

KEY = b"k" * 32


def with_check_digit(first17: str) -> str:
    """Append the GB 11643 check digit (weights 2**(17-i) mod 11)."""
    total = sum(int(d) * pow(2, 17 - i, 11) for i, d in enumerate(first17))
    check = (12 - total % 11) % 11
    return first17 + ("X" if check == 10 else str(check))


# Both are refused by python-stdnum's ric.validate, which dates these codes from 2000.
XIANGNING_1975 = with_check_digit("14102919750312123")
XI_COUNTY_1990 = with_check_digit("14103119900621004")


def test_check_digit_helper_matches_a_known_number() -> None:
    assert with_check_digit("36042619910101007") == "360426199101010071"


@pytest.mark.parametrize("number", [XIANGNING_1975, XI_COUNTY_1990, "360426199101010071"])
def test_valid_numbers_accepted(number: str) -> None:
    assert normalise_id_number(number) == number


@pytest.mark.parametrize(
    "number",
    [
        # Xiangning's code 141029 dates from 2000 (before: 142631); the card keeps the code
        # of its issue, so people born long before 2000 carry it. python-stdnum refuses these.
        with_check_digit("14102919520101002"),
        # Mancheng County (130621) was abolished in 2015 and only existed from 1983.
        with_check_digit("13062119800101001"),
        # Old Xiangning code under Linfen prefecture, used until 2000.
        with_check_digit("14263119680915003"),
    ],
)
def test_renamed_or_abolished_county_codes_accepted(number: str) -> None:
    assert normalise_id_number(number) == number


def test_number_ending_in_x() -> None:
    number = next(
        n for n in (with_check_digit(f"1410291985010100{i}") for i in range(10)) if n[-1] == "X"
    )
    assert normalise_id_number(number.lower()) == number
    assert normalise_id_number(f" {number[:6]} {number[6:14]} {number[14:].lower()} ") == number


def future_number() -> str:
    soon = datetime.date.today() + datetime.timedelta(days=2)  # future in any time zone
    return with_check_digit(f"141029{soon:%Y%m%d}001")


def wrong_check_digit(number: str) -> str:
    return number[:-1] + ("1" if number[-1] == "0" else "0")


@pytest.mark.parametrize(
    ("number", "problem"),
    [
        (wrong_check_digit(XIANGNING_1975), "check digit"),
        (with_check_digit("14102919990230001"), "birth date"),
        (with_check_digit("14102919991301001"), "birth date"),
        (with_check_digit("14102918991231001"), "birth date"),
        (future_number(), "birth date"),
        ("141029750312123", "17 digits"),
        (XIANGNING_1975[:-1], "17 digits"),
        (XIANGNING_1975 + "1", "17 digits"),
        ("1410291975031212AB", "17 digits"),
        (with_check_digit("99102919750312123"), "province"),
        (with_check_digit("10102919750312123"), "province"),
    ],
)
def test_invalid_numbers_rejected_without_echoing_them(number: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        normalise_id_number(number)
    assert number not in str(caught.value)
    assert number[:6] not in str(caught.value)


def test_person_ref_is_stable_hex_and_keyed() -> None:
    ref = person_ref(KEY, XIANGNING_1975)
    assert len(ref) == 64
    assert int(ref, 16) >= 0
    assert ref == person_ref(KEY, XIANGNING_1975.lower() + " ")
    assert ref != person_ref(b"other key", XIANGNING_1975)
    assert ref != person_ref(KEY, XI_COUNTY_1990)


def test_person_ref_rejects_invalid_numbers() -> None:
    with pytest.raises(ValueError):
        person_ref(KEY, wrong_check_digit(XIANGNING_1975))


def test_refs_are_domain_separated() -> None:
    assert person_ref(KEY, XIANGNING_1975) != name_ref(KEY, XIANGNING_1975)
    assert phone_ref(KEY, "13800138000") != name_ref(KEY, "13800138000")


@pytest.mark.parametrize("variant", ["张 三", " 张三 ", "张\u3000三", "张\t三"])
def test_name_whitespace_ignored(variant: str) -> None:
    assert name_ref(KEY, variant) == name_ref(KEY, "张三")


def test_name_width_and_case_ignored() -> None:
    assert name_ref(KEY, "\uff37\uff41\uff4e\uff47 Wei") == name_ref(KEY, "WANGWEI")


@pytest.mark.parametrize("dot", ["·", "•", "・", "\uff65"])
def test_name_middle_dots_ignored(dot: str) -> None:
    assert name_ref(KEY, f"阿依古丽{dot}买买提") == name_ref(KEY, "阿依古丽买买提")


def test_name_refs_differ_by_name_and_key() -> None:
    assert name_ref(KEY, "张三") != name_ref(KEY, "张四")
    assert name_ref(KEY, "张三") != name_ref(b"other key", "张三")


@pytest.mark.parametrize("variant", ["13800138000", "+86 138 0013 8000", "86-138-0013-8000"])
def test_phone_normalisation(variant: str) -> None:
    assert phone_ref(KEY, variant) == phone_ref(KEY, "138 0013 8000")


def test_phone_country_code_only_stripped_from_mobile_length() -> None:
    assert phone_ref(KEY, "8613800138") != phone_ref(KEY, "13800138")


@pytest.mark.parametrize(("ref", "value"), [(name_ref, " · "), (phone_ref, "+ -")])
def test_empty_values_rejected(ref: Callable[[bytes, str], str], value: str) -> None:
    with pytest.raises(ValueError):
        ref(KEY, value)


def test_empty_key_rejected() -> None:
    with pytest.raises(ValueError, match="key"):
        person_ref(b"", XIANGNING_1975)


def test_check_digit_agrees_with_the_weighted_sum_on_many_numbers() -> None:
    rng = random.Random(11643)
    for _ in range(20_000):
        first17 = "".join(rng.choice("0123456789") for _ in range(17))
        assert _check_digit(first17) == with_check_digit(first17)[-1]


@pytest.mark.parametrize("key", [KEY, b"k" * 64, b"k" * 65, b"k" * 100])  # longer: hashed
def test_refs_stay_hmac_sha256_of_domain_and_value(key: bytes) -> None:
    """References already stored must not change with how they are computed."""
    expected = hmac.digest(key, b"id:" + XIANGNING_1975.encode(), "sha256").hex()
    assert person_ref(key, XIANGNING_1975) == expected


def test_a_birth_date_is_possible_from_the_first_second_of_its_day_in_china(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    china = datetime.timezone(datetime.timedelta(hours=8))
    midnight = datetime.datetime(2031, 5, 6, tzinfo=china).timestamp()
    born = with_check_digit("14102920310506001")
    monkeypatch.setattr(identity, "_today", [(float("-inf"), datetime.date.min)])
    monkeypatch.setattr(time, "time", lambda: midnight - 0.5)
    with pytest.raises(ValueError, match="birth date"):
        normalise_id_number(born)
    monkeypatch.setattr(time, "time", lambda: midnight)
    assert normalise_id_number(born) == born


@pytest.mark.parametrize("key_length", [0, 16, 32, 64, 65, 200])
def test_hmacs_is_rfc_2104_hmac_sha256_for_every_key_length(key_length: int) -> None:
    key = bytes(range(256))[:key_length]
    for message in ("", "x", "POST\n/v1/campaigns/c/claims\n" * 40):
        expected = hmac.new(key, b"id:" + message.encode(), "sha256").hexdigest()
        assert hmacs.keyed(key, b"id:").hexdigest(message) == expected
        assert hmacs.keyed(key).hexdigest("id:" + message) == expected
