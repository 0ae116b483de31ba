"""The fixed product categories of the programme, their groups, and product codes."""

import re
from collections.abc import Iterable

from stdnum import ean

GROUPS: dict[str, frozenset[str]] = {
    "appliance": frozenset(
        {
            "central_air_conditioner",
            "air_conditioner",
            "refrigerator",
            "freezer",
            "washing_machine",
            "television",
            "water_heater",
            "range_hood",
            "gas_stove",
            "dishwasher",
            "integrated_stove",
            "water_purifier",
        }
    ),
    "furniture": frozenset(
        {"bed", "cabinet", "sofa", "tea_table", "table", "chair", "partition", "kitchen_cabinet"}
    ),
    "textile": frozenset(
        {"bedding", "curtain", "fabric", "embroidery", "towel", "flocking", "blanket"}
    ),
    "decoration": frozenset(
        {
            "tile",
            "flooring",
            "wallpaper",
            "wall_cloth",
            "paint",
            "latex_paint",
            "lighting",
            "sanitary_ware",
            "hardware",
            "wood_decoration",
            "stone_decoration",
            "other_decoration",
        }
    ),
}
"""Group id -> the category ids it stands for."""

ALL_CATEGORIES: frozenset[str] = frozenset().union(*GROUPS.values())

_GB_CODE = re.compile(r"[0-9]{13}")


def expand_categories(ids: Iterable[str]) -> frozenset[str]:
    """The category ids named by a mix of category and group ids; ValueError on unknown."""
    categories: set[str] = set()
    for item in ids:
        if item in GROUPS:
            categories |= GROUPS[item]
        elif item in ALL_CATEGORIES:
            categories.add(item)
        else:
            raise ValueError(f"unknown product category {item!r}")
    return frozenset(categories)


def is_appliance(category: str) -> bool:
    """Whether the category is an appliance (needs an energy grade and a GB code)."""
    return category in GROUPS["appliance"]


def valid_gb_code(code: str) -> bool:
    """Whether code is a 13-digit national product code with a valid EAN-13 check digit."""
    return bool(_GB_CODE.fullmatch(code)) and bool(ean.is_valid(code))
