"""Geofence: packaged Linfen/Shanxi boundaries, code prefixes and the GCJ-02 offset."""

import json
import math
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import pytest

from issuer.geofence import Region, region_for, wgs84_to_gcj02

pytestmark = pytest.mark.fast

XIANGNING_SEAT = (35.97, 110.85)
XI_COUNTY_SEAT = (36.69, 110.94)
YUNCHENG = (35.03, 111.00)
LULIANG = (37.52, 111.14)
BEIJING = (39.90, 116.40)

LINFEN = region_for(("1410",), None)


def linfen_vertices() -> list[tuple[float, float]]:
    """Every (lon, lat) vertex of the packaged Linfen county polygons."""
    data = json.loads(files("issuer.data").joinpath("141000-linfen.json").read_bytes())
    return [
        (lon, lat)
        for feature in data["features"]
        for polygon in feature["geometry"]["coordinates"]
        for ring in polygon
        for lon, lat in ring
    ]


@pytest.mark.parametrize("point", [XIANGNING_SEAT, XI_COUNTY_SEAT])
def test_county_seats_inside_linfen(point: tuple[float, float]) -> None:
    assert LINFEN.contains_point(*point)


def test_county_seats_inside_their_own_county() -> None:
    assert Region(["141029"]).contains_point(*XIANGNING_SEAT)
    assert Region(["141031"]).contains_point(*XI_COUNTY_SEAT)
    assert not Region(["141031"]).contains_point(*XIANGNING_SEAT)
    assert not Region(["141029"]).contains_point(*XI_COUNTY_SEAT)


def test_city_code_with_trailing_zeros_is_the_same_region() -> None:
    city = Region(["141000"])
    assert city.contains_point(*XIANGNING_SEAT)
    assert not city.contains_point(*YUNCHENG)


@pytest.mark.parametrize("point", [YUNCHENG, LULIANG, BEIJING])
def test_points_elsewhere_outside_linfen(point: tuple[float, float]) -> None:
    assert not LINFEN.contains_point(*point)


def test_province_code_covers_neighbouring_cities() -> None:
    shanxi = Region(["140000"])
    assert all(shanxi.contains_point(*p) for p in (XIANGNING_SEAT, YUNCHENG, LULIANG))
    assert not shanxi.contains_point(*BEIJING)


def test_several_codes_are_united() -> None:
    both = Region(["141029", "140800"])
    assert both.contains_point(*XIANGNING_SEAT)
    assert both.contains_point(*YUNCHENG)
    assert not both.contains_point(*XI_COUNTY_SEAT)


def test_code_without_polygon_never_contains_a_point() -> None:
    beijing = Region(["110000"])
    assert not beijing.contains_point(*BEIJING)
    assert beijing.contains_code("110105")


def test_wgs84_offset_near_beijing() -> None:
    lat, lon = wgs84_to_gcj02(*BEIJING)
    assert 0.001 < lat - BEIJING[0] < 0.002
    assert 0.005 < lon - BEIJING[1] < 0.007


def test_wgs84_unchanged_outside_china() -> None:
    assert wgs84_to_gcj02(51.5, -0.12) == (51.5, -0.12)


def test_wgs84_point_inside_only_after_conversion() -> None:
    lon, lat = min(linfen_vertices())  # westernmost; the offset here moves points ~0.006° east
    point = (lat, lon - 0.003)
    assert not LINFEN.contains_point(*point)
    assert LINFEN.contains_point(*point, crs="wgs84")


def test_unknown_crs_rejected() -> None:
    with pytest.raises(ValueError, match="crs"):
        LINFEN.contains_point(*XIANGNING_SEAT, crs="bd09")


Extreme = Callable[[tuple[float, float]], float]


@pytest.mark.parametrize(
    "extreme",
    [lambda v: v[1], lambda v: -v[1], lambda v: v[0], lambda v: -v[0]],
    ids=["north", "south", "east", "west"],
)
def test_just_outside_and_just_inside_the_boundary(extreme: Extreme) -> None:
    vertices = linfen_vertices()
    centre_lon = sum(v[0] for v in vertices) / len(vertices)
    centre_lat = sum(v[1] for v in vertices) / len(vertices)
    lon, lat = max(vertices, key=extreme)
    length = math.hypot(lon - centre_lon, lat - centre_lat)
    step_lon, step_lat = 0.01 * (lon - centre_lon) / length, 0.01 * (lat - centre_lat) / length
    assert not LINFEN.contains_point(lat + step_lat, lon + step_lon)
    assert LINFEN.contains_point(lat - step_lat, lon - step_lon)


def test_contains_code_is_a_prefix_match() -> None:
    assert LINFEN.contains_code("141029")
    assert LINFEN.contains_code("141000")
    assert not Region(["1408"]).contains_code("141029")
    assert not Region(["141029"]).contains_code("141000")
    assert not Region(["141029"]).contains_code("141031")
    assert not LINFEN.contains_code("14")
    assert not LINFEN.contains_code("not-a-code")


@pytest.mark.parametrize("codes", [[], "1410", ["000000"], ["14a0"], ["141"]])
def test_invalid_region_codes_rejected(codes: list[str]) -> None:
    with pytest.raises(ValueError):
        Region(codes)


def test_polygons_file_replaces_packaged_data(tmp_path: Path) -> None:
    square = [[[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0], [0.0, 0.0]]]
    geometry = {"type": "Polygon", "coordinates": square}
    feature = {"properties": {"adcode": "990100"}, "geometry": geometry}
    path = tmp_path / "square.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    region = Region(["9901"], str(path))
    assert region.contains_point(5.0, 5.0)
    assert not region.contains_point(11.0, 5.0)
    assert not Region(["1410"], str(path)).contains_point(*XIANGNING_SEAT)


@pytest.mark.parametrize("content", [None, "not json", '{"features": [{"properties": {}}]}'])
def test_unreadable_polygons_file_rejected(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "polygons.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="cannot read region polygons"):
        Region(["1410"], str(path))


def test_region_for_is_cached() -> None:
    assert region_for(("1410",), None) is LINFEN


def test_point_test_is_fast() -> None:
    start = time.process_time()  # CPU time: a busy machine's preemption does not count
    for _ in range(10_000):
        LINFEN.contains_point(*XIANGNING_SEAT, crs="wgs84")
    assert time.process_time() - start < 1.0
