"""Points about a kilometre outside the Linfen city boundary, for geofence abuse."""

from __future__ import annotations

import math

from issuer.geofence import Region

LINFEN = "1410"


def points_just_outside(count: int = 16, step_deg: float = 0.01) -> list[dict[str, float]]:
    """Boundary vertices pushed `step_deg` away from the centre; only those that the
    service's own check puts outside are kept."""
    region = Region([LINFEN])
    outline = region.outline()
    lat0 = sum(p[0] for p in outline) / len(outline)
    lon0 = sum(p[1] for p in outline) / len(outline)
    found = []
    for lat, lon in outline[:: max(1, len(outline) // count)]:
        norm = math.hypot(lat - lat0, lon - lon0) or 1.0
        point = (lat + (lat - lat0) / norm * step_deg, lon + (lon - lon0) / norm * step_deg)
        if not region.contains_point(*point):
            found.append({"lat": round(point[0], 6), "lon": round(point[1], 6)})
    return found
