"""The world basemap the report's map is drawn on: it ships inside the package (no tile server).

``data/land-110m.json`` is Natural Earth's 1:110m land polygons (version 4.1.0; Natural Earth
is public domain), taken from the ``world-atlas`` 2.0.2 TopoJSON redistribution (ISC licence,
Copyright 2013-2019 Michael Bostock) and decoded once by :func:`rings_from_topojson` into
plain WGS84 rings, coordinates rounded to 0.01 degree: 126 rings, 5,123 points, 66 kB.
Rings are cut at the antimeridian already; holes run the other way round from outer rings,
so a nonzero fill leaves them open.

To regenerate it from the package's ``land-110m.json``::

    python -c "import json, pipelines.report.basemap as b; \\
        json.dump(b.document(b.rings_from_topojson(json.load(open('land-110m.json')))), \\
        open('pipelines/report/data/land-110m.json', 'w'), separators=(',', ':'))"
"""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

LAND = os.path.join(os.path.dirname(__file__), "data", "land-110m.json")
SOURCE = ("Natural Earth 1:110m land (v4.1.0), public domain; via the world-atlas 2.0.2 "
          "TopoJSON (ISC), decoded to WGS84 rings")


def rings_from_topojson(topo: dict[str, Any], layer: str = "land"
                        ) -> list[list[tuple[float, float]]]:
    """Every ring (lon, lat) of ``layer`` in a quantized TopoJSON document."""
    (sx, sy), (tx, ty) = topo["transform"]["scale"], topo["transform"]["translate"]
    arcs = []
    for arc in topo["arcs"]:
        x = y = 0
        pts = []
        for dx, dy in arc:
            x += dx
            y += dy
            pts.append((round(x * sx + tx, 2), round(y * sy + ty, 2)))
        arcs.append(pts)
    rings = []
    for geom in topo["objects"][layer]["geometries"]:
        polygons = geom["arcs"] if geom["type"] == "MultiPolygon" else [geom["arcs"]]
        for polygon in polygons:
            for ring_arcs in polygon:
                ring: list[tuple[float, float]] = []
                for i in ring_arcs:
                    a = arcs[i] if i >= 0 else arcs[~i][::-1]
                    ring.extend(a if not ring else a[1:])
                rings.append(ring)
    return rings


def document(rings: list[list[tuple[float, float]]]) -> dict[str, Any]:
    return {"source": SOURCE, "rings": [[c for p in r for c in p] for r in rings]}


def _unwrapped(ring: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``ring`` with no step over 180 degrees of longitude (a ring across the antimeridian
    continues past ±180 instead of jumping round the world)."""
    out = [ring[0]]
    for lon, lat in ring[1:]:
        prev = out[-1][0]
        while lon - prev > 180:
            lon -= 360
        while lon - prev < -180:
            lon += 360
        out.append((lon, lat))
    return out


def drawable(ring: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Rings to fill on a -180..180 map for one ring of the data: unwrapped across the
    antimeridian and drawn again 360 degrees over where it runs past it; a ring round a pole
    (Antarctica: it ends 360 degrees from where it starts) closed along the pole."""
    r = _unwrapped(ring)
    if abs(r[-1][0] - r[0][0]) > 180:  # round a pole: close it through the pole
        pole = -90.0 if sum(p[1] for p in r) < 0 else 90.0
        r = [*r, (r[-1][0], pole), (r[0][0], pole)]
    lons = [p[0] for p in r]
    out = [r]
    if max(lons) > 180:
        out.append([(x - 360, y) for x, y in r])
    if min(lons) < -180:
        out.append([(x + 360, y) for x, y in r])
    return out


@cache
def land_rings() -> tuple[tuple[tuple[float, float], ...], ...]:
    """The shipped land rings, (lon, lat) each, ready to fill on a -180..180 map."""
    with open(LAND, encoding="utf-8") as f:
        flat = json.load(f)["rings"]
    rings = [list(zip(r[0::2], r[1::2], strict=True)) for r in flat]
    return tuple(tuple(d) for r in rings for d in drawable(r))
