"""Resident identity numbers and keyed references to people.

ID numbers, names and phone numbers are never stored or logged in clear: the service keeps
only HMAC-SHA256 references made with a secret key, one domain prefix per kind of value.
Error messages describe the problem, never the value.
"""

from __future__ import annotations

import datetime
import re
import time
import unicodedata
from collections.abc import Callable
from zoneinfo import ZoneInfo

from issuer import hmacs

_ID_FORMAT = re.compile(r"[0-9]{17}[0-9X]")
_PROVINCES = frozenset(
    f"{code:02d}"
    for first, last in ((11, 15), (21, 23), (31, 37), (41, 46), (50, 54), (61, 65))
    for code in range(first, last + 1)
) | {"71", "81", "82", "83", "91"}
"""GB/T 2260 province-level codes, the first two digits of an ID number."""

_ID = b"id:"  # the domain of references to ID numbers
_NAME_DOTS = str.maketrans("", "", "·•・")
_CHINA = ZoneInfo("Asia/Shanghai")
_today: list[tuple[float, datetime.date]] = [(float("-inf"), datetime.date.min)]
"""Today's date in China and until when (epoch s) it is today."""


def _check_digit(digits: str) -> str:
    """GB 11643's check character (ISO 7064 MOD 11-2): it makes sum(d_i * 2**(17 - i)) plus
    itself 1 mod 11. Read in base 13 (13 = 2 mod 11), the 17 digits are that sum over 2."""
    check = (1 - 2 * int(digits, 13)) % 11
    return "X" if check == 10 else str(check)


def normalise_id_number(raw: str) -> str:
    """The 18-character second-generation ID number, or ValueError saying what is wrong.

    The birth-place code is only checked for a known province: a card keeps the county code
    in force when it was issued, and many of those have since been renamed or abolished.
    """
    number = "".join(raw.split()).upper()
    if not _ID_FORMAT.fullmatch(number):
        raise ValueError("ID number must be 17 digits followed by a digit or X")
    if number[-1] != _check_digit(number[:17]):
        raise ValueError("ID number has a wrong check digit")
    if number[:2] not in _PROVINCES:
        raise ValueError("ID number has an unknown province code")
    try:
        birth = datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        raise ValueError("ID number has an invalid birth date") from None
    if birth.year < 1900 or birth > _today_in_china():
        raise ValueError("ID number has an impossible birth date")
    return number


def _today_in_china() -> datetime.date:
    """Today's date in China, worked out once a day: a time-zone conversion per ID number
    cost more than its check digit."""
    now = time.time()
    until, today = _today[0]
    if now >= until:
        today = datetime.datetime.fromtimestamp(now, _CHINA).date()
        tomorrow = datetime.datetime.combine(
            today + datetime.timedelta(days=1), datetime.time(), _CHINA
        )
        _today[0] = (tomorrow.timestamp(), today)
    return today


def _keyed(key: bytes, domain: bytes) -> hmacs.Keyed:
    """The HMAC of references of one domain under `key`."""
    if not key:
        raise ValueError("reference key must not be empty")
    return hmacs.keyed(key, domain)


def person_ref(key: bytes, id_number: str) -> str:
    """Keyed reference (64 hex chars) to the person holding an ID number."""
    return _keyed(key, _ID).hexdigest(normalise_id_number(id_number))


def person_refs(key: bytes) -> Callable[[str], str]:
    """`person_ref` under `key` of an ID number `normalise_id_number` already gave: one
    Python frame per reference (the claim path's)."""
    return _keyed(key, _ID).hexdigest


def name_ref(key: bytes, name: str) -> str:
    """Keyed reference to a name, ignoring width, case, whitespace and middle dots."""
    normalised = "".join(unicodedata.normalize("NFKC", name).split())
    normalised = normalised.translate(_NAME_DOTS).casefold()
    if not normalised:
        raise ValueError("name is empty")
    return _keyed(key, b"name:").hexdigest(normalised)


def phone_ref(key: bytes, phone: str) -> str:
    """Keyed reference to a phone number: its digits, without a +86 country code."""
    digits = re.sub(r"[^0-9]", "", unicodedata.normalize("NFKC", phone))
    if len(digits) == 13 and digits.startswith("86"):
        digits = digits[2:]
    if not digits:
        raise ValueError("phone number has no digits")
    return _keyed(key, b"phone:").hexdigest(digits)
