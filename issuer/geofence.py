"""Geofence: is a consumer's location inside the campaign's administrative region?

Regions are administrative-code prefixes ("1410" is Linfen city, "141029" Xiangning
county) matched against packaged GeoJSON boundaries in GCJ-02 coordinates.
"""

import functools
import math
import re
from collections.abc import Sequence
from importlib.resources import files
from typing import Any, Literal

import msgspec
import shapely
from shapely.geometry import shape

PACKAGED_FILES = ("141000-linfen.json", "140000-shanxi.json")
"""Counties of Linfen, then the cities of Shanxi (GCJ-02 lon/lat)."""

_CODE = re.compile(r"(?:[0-9]{2}){1,6}")

# Krasovsky 1940 ellipsoid as used by the GCJ-02 offset.
_A = 6378245.0
_EE = 0.00669342162296594323


class _Geometry(msgspec.Struct):
    type: Literal["Polygon", "MultiPolygon"]
    coordinates: list[Any]


class _Properties(msgspec.Struct):
    adcode: int | str


class _Feature(msgspec.Struct):
    properties: _Properties
    geometry: _Geometry


class _FeatureCollection(msgspec.Struct):
    features: list[_Feature]


_Features = tuple[tuple[str, Any], ...]
"""(normalised adcode, shapely geometry) pairs."""


def _in_china(lat: float, lon: float) -> bool:
    return 72.004 <= lon <= 137.8347 and 0.8293 <= lat <= 55.8271


def _sines(t: float, a: float, m: float, b: float, n: float) -> float:
    """The offset formula's sine terms: (a sin(m pi t) + b sin(n pi t)) * 2/3."""
    return (a * math.sin(m * math.pi * t) + b * math.sin(n * math.pi * t)) * 2.0 / 3.0


def _lat_offset(x: float, y: float) -> float:
    poly = -100.0 + 2.0 * x + 3.0 * y + 0.2 * y * y + 0.1 * x * y + 0.2 * math.sqrt(abs(x))
    waves = _sines(x, 20, 6, 20, 2) + _sines(y, 20, 1, 40, 1 / 3)
    return poly + waves + _sines(y, 160, 1 / 12, 320, 1 / 30)


def _lon_offset(x: float, y: float) -> float:
    poly = 300.0 + x + 2.0 * y + 0.1 * x * x + 0.1 * x * y + 0.1 * math.sqrt(abs(x))
    waves = _sines(x, 20, 6, 20, 2) + _sines(x, 20, 1, 40, 1 / 3)
    return poly + waves + _sines(x, 150, 1 / 12, 300, 1 / 30)


def wgs84_to_gcj02(lat: float, lon: float) -> tuple[float, float]:
    """Convert WGS-84 (GPS) to GCJ-02 (Chinese map datum); unchanged outside China."""
    if not _in_china(lat, lon):
        return lat, lon
    x, y = lon - 105.0, lat - 35.0
    rad_lat = math.radians(lat)
    magic = 1.0 - _EE * math.sin(rad_lat) ** 2
    sqrt_magic = math.sqrt(magic)
    d_lat = _lat_offset(x, y) * 180.0 / ((_A * (1.0 - _EE)) / (magic * sqrt_magic) * math.pi)
    d_lon = _lon_offset(x, y) * 180.0 / (_A / sqrt_magic * math.cos(rad_lat) * math.pi)
    return lat + d_lat, lon + d_lon


def _normalise_code(code: str) -> str:
    """Strip trailing "00" pairs: "141000" -> "1410", "141029" unchanged."""
    while code.endswith("00"):
        code = code[:-2]
    return code


def _prefix(code: str) -> str:
    """A campaign region code as a non-empty prefix, or ValueError."""
    normalised = _normalise_code(code)
    if not _CODE.fullmatch(code) or not normalised:
        raise ValueError(f"invalid region code {code!r}")
    return normalised


def _decode(data: bytes) -> _Features:
    collection = msgspec.json.decode(data, type=_FeatureCollection)
    return tuple(
        (_normalise_code(str(f.properties.adcode)), shape(msgspec.structs.asdict(f.geometry)))
        for f in collection.features
    )


@functools.cache
def _packaged_features() -> _Features:
    package = files("issuer.data")
    return tuple(f for name in PACKAGED_FILES for f in _decode(package.joinpath(name).read_bytes()))


def _file_features(path: str) -> _Features:
    try:
        with open(path, "rb") as fh:
            return _decode(fh.read())
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot read region polygons from {path}: {exc}") from exc


def _most_specific(features: _Features) -> list[Any]:
    """Geometries of the features that have no finer feature among them."""
    codes = {code for code, _ in features}
    return [
        geometry
        for code, geometry in features
        if not any(other != code and other.startswith(code) for other in codes)
    ]


GRID_CELLS = 64  # per side of the grid over a region's bounding box
_SIDE = GRID_CELLS + 1  # cells a row holds, and rows the grid holds, its far edges' included
# the far edge as a float: a point's column and row are floats, and a float compared with a
# float is the interpreter's fast case, with an int its generic one (~0.5k instructions a
# point for the four comparisons)
_FAR = float(GRID_CELLS)


class _Grid:
    """Cells over a geometry's bounding box, each known to lie wholly inside it, wholly
    outside, or on its boundary: only points of boundary cells need the exact test (a
    cell is a closed box, so a point on the line between two cells fits either answer).
    A point on the box's far edges (col or row == GRID_CELLS) falls in one cell more at
    the end of each row, or in one row more, copies of the last: no look-up corrects it."""

    def __init__(self, geometry: Any) -> None:
        self.west, self.south, east, north = geometry.bounds
        self.width = (east - self.west) / GRID_CELLS or 1.0
        self.height = (north - self.south) / GRID_CELLS or 1.0
        cells = [
            shapely.box(
                self.west + x * self.width,
                self.south + y * self.height,
                self.west + (x + 1) * self.width,
                self.south + (y + 1) * self.height,
            )
            for y in range(GRID_CELLS)
            for x in range(GRID_CELLS)
        ]
        inside = shapely.contains(geometry, cells)
        touching = shapely.intersects(geometry, cells)
        # per cell: True inside, False outside, None on the boundary
        known = [
            True if i else (None if t else False)
            for i, t in zip(inside.tolist(), touching.tolist(), strict=True)
        ]
        rows = [known[y * GRID_CELLS : (y + 1) * GRID_CELLS] for y in range(GRID_CELLS)]
        rows = [row + row[-1:] for row in rows]
        self.cells: list[bool | None] = [c for row in [*rows, rows[-1]] for c in row]


class Region:
    """The union of the boundaries of some administrative codes; points on it count as in."""

    def __init__(self, region_codes: Sequence[str], polygons_file: str | None = None) -> None:
        if isinstance(region_codes, str) or not region_codes:
            raise ValueError("region_codes must be a non-empty list of codes")
        self._prefixes = tuple(_prefix(code) for code in region_codes)
        features = _packaged_features() if polygons_file is None else _file_features(polygons_file)
        matched = tuple(f for f in features if self._matches(f[0]))
        self._geometry = shapely.union_all(_most_specific(matched))
        shapely.prepare(self._geometry)
        self._grid = _Grid(self._geometry)

    def _matches(self, code: str) -> bool:
        return code.startswith(self._prefixes)

    def contains_point(self, lat: float, lon: float, crs: str = "gcj02") -> bool:
        """Whether the point (in "gcj02" or "wgs84") lies in the region: its grid cell's
        answer, the exact test only in a cell on the boundary (the grid looked up here, in
        no frame of its own: the claim path's)."""
        if crs == "wgs84":
            lat, lon = wgs84_to_gcj02(lat, lon)
        elif crs != "gcj02":
            raise ValueError(f"unknown crs {crs!r}")
        grid = self._grid
        col = (lon - grid.west) / grid.width
        row = (lat - grid.south) / grid.height
        if not (0.0 <= col <= _FAR and 0.0 <= row <= _FAR):  # outside the box, or NaN
            return False
        known = grid.cells[int(row) * _SIDE + int(col)]
        if known is not None:
            return known
        return bool(shapely.intersects_xy(self._geometry, lon, lat))

    def outline(self) -> list[tuple[float, float]]:
        """The (lat, lon) vertices of the region's outer boundaries (GCJ-02)."""
        return [
            (lat, lon)
            for polygon in getattr(self._geometry, "geoms", [self._geometry])
            for lon, lat in polygon.exterior.coords
        ]

    def contains_code(self, region_code: str) -> bool:
        """Whether an administrative code lies within one of the region's codes."""
        return bool(_CODE.fullmatch(region_code)) and self._matches(_normalise_code(region_code))


@functools.lru_cache(maxsize=256)
def region_for(region_codes: tuple[str, ...], polygons_file: str | None) -> Region:
    """The Region for a campaign's geofence, built once and reused."""
    return Region(region_codes, polygons_file)
