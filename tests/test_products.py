"""Product categories, groups and 13-digit product codes."""

import pytest

from issuer.products import (
    ALL_CATEGORIES,
    GROUPS,
    expand_categories,
    is_appliance,
    valid_gb_code,
)

pytestmark = pytest.mark.fast


def with_ean_check_digit(first12: str) -> str:
    """Append the EAN-13 check digit (weights 1, 3 alternating from the left)."""
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(first12))
    return first12 + str(-total % 10)


GB_CODE = with_ean_check_digit("690123456789")


def test_groups_match_the_contract() -> None:
    assert set(GROUPS) == {"appliance", "furniture", "textile", "decoration"}
    assert {group: len(ids) for group, ids in GROUPS.items()} == {
        "appliance": 12,
        "furniture": 8,
        "textile": 7,
        "decoration": 12,
    }
    assert len(ALL_CATEGORIES) == sum(len(ids) for ids in GROUPS.values())
    assert not ALL_CATEGORIES & set(GROUPS)


def test_expand_mixes_groups_and_categories() -> None:
    expanded = expand_categories(["appliance", "bed", "sofa", "refrigerator"])
    assert expanded == GROUPS["appliance"] | {"bed", "sofa"}
    assert expand_categories(GROUPS) == ALL_CATEGORIES
    assert expand_categories([]) == frozenset()


def test_expand_rejects_unknown_ids_by_name() -> None:
    with pytest.raises(ValueError, match="'toaster'"):
        expand_categories(["bed", "toaster"])


@pytest.mark.parametrize(
    ("category", "appliance"),
    [
        ("water_purifier", True),
        ("central_air_conditioner", True),
        ("kitchen_cabinet", False),
        ("appliance", False),
        ("toaster", False),
    ],
)
def test_is_appliance(category: str, appliance: bool) -> None:
    assert is_appliance(category) is appliance


def test_check_digit_helper_matches_a_known_code() -> None:
    assert with_ean_check_digit("400638133393") == "4006381333931"


def test_valid_gb_code() -> None:
    assert valid_gb_code(GB_CODE)
    assert valid_gb_code("4006381333931")


@pytest.mark.parametrize(
    "code",
    [
        GB_CODE[:-1] + str((int(GB_CODE[-1]) + 1) % 10),
        GB_CODE[:-1],
        "0" + GB_CODE,
        GB_CODE[:3] + " " + GB_CODE[3:],
        GB_CODE[:3] + "-" + GB_CODE[3:],
        "690123456789X",
        "\uff16" + GB_CODE[1:],
        "",
    ],
)
def test_invalid_gb_codes(code: str) -> None:
    assert not valid_gb_code(code)
