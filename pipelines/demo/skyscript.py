"""The demo world's SkyScript part: one synthetic place, drawn once, published as OSM extracts
and as GeoTIFFs in two CRSs and two GSDs, plus the planted bad inputs and the truth.

``build_skyscript(out_dir, seed, n)`` writes::

    {out}/skyscript/osm/main.osm.pbf           most objects (west part), some planted cases
    {out}/skyscript/osm/east.osm               the east part (XML) + one building also in
                                               main.osm.pbf (same id and version)
    {out}/skyscript/osm/broken.osm.pbf         a truncated pbf (first 60 % of its bytes)
    {out}/skyscript/imagery/naip/utm_fine.tif       EPSG:32632, 0.5 m, canvas x in [0, 1000] m
    {out}/skyscript/imagery/naip/merc_fine.tif      EPSG:3857, 0.5 m at its centre, x in [600, 1600]
    {out}/skyscript/imagery/default/utm_coarse.tif  EPSG:32632, 2 m, the whole canvas
    {out}/skyscript/imagery/naip/all_nodata.tif     planted: EPSG:32632, 0.9 m, every pixel nodata
    {out}/skyscript/imagery/default/no_crs.tif      planted: no CRS
    {out}/skyscript_truth.parquet              one row per OSM object written (and per planted
                                               file), where a correct build puts it

**The place.** A canvas of 1600 m (east) x 700 m (north) in UTM 32N near Zurich (lon 8.54,
lat 47.37), drawn at 0.5 m/px with a 20 m margin: grass and soil ground, a wood and two
farmland fields, a lake with an island (a multipolygon relation), streets (asphalt, gravel,
dirt) with houses along both sides, parking lots with cars, pitches, storage tanks, pools,
trees and power towers. Every object is planned in canvas metres, its coordinates are turned
into WGS84 and **rounded to 1e-7 degree as OSM stores them**, and the object is drawn from
the rounded coordinates, so the pixels and the OSM geometry agree. Buildings carry
``roof:shape`` flat / gabled / hipped (about a third each), drawn so the shape shows from
above (flat: uniform with a dark parapet rim and AC boxes; gabled: a sunlit and a shaded half
split by the ridge; hipped: four facets of four shades); the roof colour is drawn from
:data:`ROOF_COLOURS` independently of the shape. Roads carry ``surface`` (asphalt dark grey,
gravel light speckled, dirt brown). ``fine_class`` in the truth is the roof shape or surface.

**Expectations** are computed with the recipe's own pure functions after the rasters are
written: the tag table's ``max_gsd``, :func:`pipelines.sources.imagery.catalogue` and
``RasterIndex.candidates(...)[0]`` (the expected raster), :func:`plan_tile` with the recipe's
default sizes (window fits / ``object_too_large`` / ``off_raster``; these do not depend on
the random shift) and :func:`read_tile` (``mostly_nodata``, for rasters that declare a
nodata value), so the truth and the recipe cannot drift. Read-stage cases are planted by construction.

**Planted rows** (``planted``): ``border_duplicate`` (one building in both extracts: the copy
in ``east.osm``, whose path sorts first, is kept, the ``main.osm.pbf`` copy is rejected at
``read`` as ``duplicate_id``), ``truncated_pbf`` (one file-level row, ``file:<abs path>``,
``osm_file_unreadable``; its objects get no rows), ``missing_nodes``, ``bowtie``
(``invalid_geometry``), ``no_crs`` (source ``imagery``, ``raster:<abs path>``, stage
``imagery``), ``all_nodata`` (three buildings without ``roof:shape``, max GSD 1 m, under the
0.9 m all-nodata raster: ``mostly_nodata``), ``far_away`` and ``too_fine`` (``highway=steps``,
0.2 m) (``no_imagery``), ``unknown_tags`` (``expected = "not_read"``: counted ``unmatched``
by the reader, never a record).

``build_fine_benchmark(out_dir, seed, n_per_class)`` renders NEW buildings (another seed
stream, same drawer, palettes and ground) and cuts each tile the way the recipe does, into
``{out}/roof_shape/{flat_roof,gabled_roof,hipped_roof}/*.png`` + ``split.json``.

Same seed → byte-identical files (the truth names the world's absolute path in the
source_ids of planted files: the same bytes for a world built in the same place).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pipelines.demo.scenes import _car, _shade, _tree
from pipelines.demo.truth import fresh_part, tally, write_truth

FOLDER = "skyscript"
TRUTH = "skyscript_truth.parquet"
STREAM = 7301  # pub11 1-11, local 7001, rs3 8001, benchmarks 9001, remoteclip 10001
BENCH_STREAM = 7302
GSD = 0.5  # metres per canvas pixel
WIDTH_M, HEIGHT_M, MARGIN_M = 1600.0, 700.0, 20.0
X0, Y0 = 464470.0, 5246035.0  # the canvas origin in UTM 32N (centre ~ lon 8.54, lat 47.37)
UTM, MERC, WGS84 = "EPSG:32632", "EPSG:3857", "EPSG:4326"
WEST_X, EAST_X = (0.0, 1000.0), (600.0, 1600.0)  # the two fine mosaics (canvas metres)
NODATA_BOX = (400.0, 560.0, 560.0, 690.0)  # x0, x1, y0, y1 of all_nodata.tif
EAST_SPLIT_X = 1000.0  # objects whose centre lies east of this go to east.osm
ROOF_SHAPES = ("flat", "gabled", "hipped")
SURFACES = {"asphalt": "residential", "gravel": "service", "dirt": "track"}
ROOF_COLOURS: tuple[tuple[int, int, int], ...] = (
    (168, 82, 60), (98, 98, 104), (122, 88, 62), (176, 172, 166), (132, 52, 46),
    (92, 112, 96), (150, 120, 90),
)
RASTERS = {  # basename → (collection folder, year)
    "utm_fine.tif": ("naip", 2022), "merc_fine.tif": ("naip", 2021),
    "utm_coarse.tif": ("default", 2020), "all_nodata.tif": ("naip", 2019),
    "no_crs.tif": ("default", 2018),
}
BENCH_FOLDERS = {"flat": "flat_roof", "gabled": "gabled_roof", "hipped": "hipped_roof"}
BENCH_OUT_PX, BENCH_MIN_PX = 256, 64  # the recipe's defaults (tiles.plan_tile)

_TRUTH_SCHEMA = pa.schema([
    ("row", pa.int32()), ("key", pa.string()), ("source", pa.string()),
    ("source_id", pa.string()), ("expected", pa.string()), ("expected_stage", pa.string()),
    ("expected_reason", pa.string()), ("planted", pa.string()), ("osm_type", pa.string()),
    ("osm_id", pa.int64()), ("tags", pa.string()), ("geometry_wkt", pa.string()),
    ("extract", pa.string()), ("raster", pa.string()), ("crs", pa.string()),
    ("fine_class", pa.string()),
])

RGB = tuple[int, int, int]
Pt = tuple[float, float]


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM, *parts])


# ----------------------------------------------------------------------------- coordinates


def _to_lonlat(pts_m: list[Pt]) -> list[Pt]:
    """Canvas metres → WGS84 lon/lat rounded to 1e-7 degree (OSM's fixed point)."""
    from rasterio.warp import transform

    xs = [X0 + x for x, _ in pts_m]
    ys = [Y0 + y for _, y in pts_m]
    lons, lats = transform(UTM, WGS84, xs, ys)
    return [(round(lo, 7), round(la, 7)) for lo, la in zip(lons, lats)]


def _to_px(lonlat: list[Pt]) -> list[Pt]:
    """WGS84 lon/lat → canvas pixel coordinates (column, row; pixel edges at integers)."""
    from rasterio.warp import transform

    xs, ys = transform(WGS84, UTM, [p[0] for p in lonlat], [p[1] for p in lonlat])
    top = Y0 + HEIGHT_M + MARGIN_M
    return [((x - (X0 - MARGIN_M)) / GSD, (top - y) / GSD) for x, y in zip(xs, ys)]


def _canvas_size() -> tuple[int, int]:
    return (round((WIDTH_M + 2 * MARGIN_M) / GSD), round((HEIGHT_M + 2 * MARGIN_M) / GSD))


# ----------------------------------------------------------------------------- drawing


def _smooth(rng: np.random.Generator, w: int, h: int, cell_px: float) -> np.ndarray:
    """Smooth noise in about [-1, 1] of ``h`` x ``w``, features ~``cell_px`` wide."""
    cw, ch = max(2, round(w / cell_px)), max(2, round(h / cell_px))
    small = rng.standard_normal((ch, cw)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC),
                      dtype=np.float32)


def _ground(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Grass with soil patches and grain: float (h, w, 3)."""
    grass = np.asarray((96, 122, 68), np.float32)
    soil = np.asarray((138, 118, 86), np.float32)
    patch = np.clip(_smooth(rng, w, h, 90.0) * 0.8 - 0.3, 0.0, 1.0)[..., None]
    arr = grass * (1 - patch) + soil * patch
    arr += (_smooth(rng, w, h, 14.0) * 9.0)[..., None]
    arr += rng.standard_normal((h, w, 1)).astype(np.float32) * 5.0
    return arr


def _surface_texture(rng: np.random.Generator, w: int, h: int, kind: str) -> np.ndarray:
    if kind == "asphalt":
        base, grain, blot = (72, 72, 75), 4.0, 5.0
    elif kind == "gravel":
        base, grain, blot = (188, 178, 156), 16.0, 6.0
    elif kind == "dirt":
        base, grain, blot = (128, 96, 66), 6.0, 12.0
    elif kind == "water":
        base, grain, blot = (38, 72, 104), 2.0, 7.0
    elif kind == "wood":
        base, grain, blot = (40, 68, 36), 5.0, 10.0
    else:
        raise ValueError(kind)
    arr = np.empty((h, w, 3), np.float32)
    arr[:] = np.asarray(base, np.float32)
    arr += (_smooth(rng, w, h, 20.0) * blot)[..., None]
    arr += rng.standard_normal((h, w, 1)).astype(np.float32) * grain
    return arr


def _paste(img: Image.Image, rings: list[list[Pt]], tex_fn: Any, *, line_px: float = 0.0
           ) -> tuple[Image.Image, tuple[int, int]] | None:
    """Paint ``tex_fn(w, h)`` (float array) through the polygon ``rings`` (outer, holes) or,
    with ``line_px``, through the polyline ``rings[0]`` of that width. Returns the texture
    image and its offset (for further drawing), or None when it is off the canvas."""
    pts = [p for r in rings for p in r]
    pad = line_px / 2 + 2
    x0 = max(0, math.floor(min(p[0] for p in pts) - pad))
    y0 = max(0, math.floor(min(p[1] for p in pts) - pad))
    x1 = min(img.width, math.ceil(max(p[0] for p in pts) + pad))
    y1 = min(img.height, math.ceil(max(p[1] for p in pts) + pad))
    if x1 <= x0 or y1 <= y0:
        return None
    w, h = x1 - x0, y1 - y0
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    if line_px:
        md.line([(x - x0, y - y0) for x, y in rings[0]], fill=255, width=max(1, round(line_px)),
                joint="curve")
    else:
        md.polygon([(x - x0, y - y0) for x, y in rings[0]], fill=255)
        for hole in rings[1:]:
            md.polygon([(x - x0, y - y0) for x, y in hole], fill=0)
    tex = Image.fromarray(np.clip(tex_fn(w, h), 0, 255).astype(np.uint8))
    img.paste(tex, (x0, y0), mask)
    return tex, (x0, y0)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.hypot(*v))
    return v / n if n > 0 else v


SUN = _unit(np.asarray((-1.0, -1.0)))  # light from the north-west (pixel rows grow south)


def draw_roof(draw: ImageDraw.ImageDraw, rng: np.random.Generator, corners: list[Pt],
              shape: str, colour: RGB) -> None:
    """A rectangular building from above (pixel corners in ring order): shadow, then the
    roof of ``shape`` (flat / gabled / hipped) in ``colour``."""
    p = np.asarray(corners[:4], dtype=np.float64)
    if np.hypot(*(p[1] - p[0])) < np.hypot(*(p[2] - p[1])):
        p = np.roll(p, -1, axis=0)  # p0→p1 is a long side
    u, v = _unit(p[1] - p[0]), _unit(p[3] - p[0])
    long_, short = float(np.hypot(*(p[1] - p[0]))), float(np.hypot(*(p[3] - p[0])))
    sh = 2.0 + 0.12 * short
    draw.polygon([(x + sh, y + sh) for x, y in p.tolist()], fill=(46, 48, 44))

    def poly(pts: Any, f: float) -> None:
        draw.polygon([tuple(q) for q in np.asarray(pts).tolist()], fill=_shade(colour, f))

    if shape == "flat":
        poly(p, 0.5)  # parapet rim
        rim = max(1.2, 0.06 * short)
        inner = np.asarray([p[0] + rim * (u + v), p[1] + rim * (-u + v), p[2] - rim * (u + v),
                            p[3] + rim * (u - v)])
        poly(inner, 1.0)
        for _ in range(int(rng.integers(1, 4))):
            a, b = rng.uniform(0.2, 0.8, 2)
            c = p[0] + u * a * long_ + v * b * short
            s = rng.uniform(1.5, 2.5)
            draw.rectangle((c[0] - s, c[1] - s, c[0] + s, c[1] + s), fill=(206, 206, 208))
    elif shape == "gabled":
        m03, m12 = (p[0] + p[3]) / 2, (p[1] + p[2]) / 2
        halves = [(np.asarray([p[0], p[1], m12, m03]), -v), (np.asarray([m03, m12, p[2], p[3]]), v)]
        halves.sort(key=lambda hv: -float(hv[1] @ SUN))
        poly(halves[0][0], 1.22)
        poly(halves[1][0], 0.55)
        draw.line([tuple(m03), tuple(m12)], fill=_shade(colour, 1.45), width=1)
    elif shape == "hipped":
        m03, m12 = (p[0] + p[3]) / 2, (p[1] + p[2]) / 2
        half = min(short / 2, long_ / 2)
        r1, r2 = m03 + u * half, m12 - u * half
        facets = [(np.asarray([p[0], p[1], r2, r1]), -v), (np.asarray([p[3], p[2], r2, r1]), v),
                  (np.asarray([p[0], r1, p[3]]), -u), (np.asarray([p[1], r2, p[2]]), u)]
        facets.sort(key=lambda fv: -float(fv[1] @ SUN))
        for (pts, _), f in zip(facets, (1.3, 0.98, 0.72, 0.48)):
            poly(pts, f)
    else:
        raise ValueError(f"unknown roof shape {shape!r}")


def _draw_tank(draw: ImageDraw.ImageDraw, ring: list[Pt]) -> None:
    cx = sum(x for x, _ in ring[:-1]) / (len(ring) - 1)
    cy = sum(y for _, y in ring[:-1]) / (len(ring) - 1)
    r = max(math.hypot(x - cx, y - cy) for x, y in ring)
    s = r * 0.35
    draw.ellipse((cx - r + s, cy - r + s, cx + r + s, cy + r + s), fill=(44, 46, 44))
    draw.polygon(ring, fill=(214, 214, 210))
    draw.ellipse((cx - r * 0.75, cy - r * 0.75, cx + r * 0.75, cy + r * 0.75),
                 outline=(150, 150, 150), width=2)
    draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=(120, 120, 120))


def _draw_pitch(draw: ImageDraw.ImageDraw, ring: list[Pt], sport: str) -> None:
    p = np.asarray(ring[:4], dtype=np.float64)
    fill = (176, 92, 62) if sport == "tennis" else (62, 138, 62)
    draw.polygon([tuple(q) for q in p.tolist()], fill=fill)
    c = p.mean(axis=0)
    inner = c + (p - c) * 0.82
    draw.polygon([tuple(q) for q in inner.tolist()], outline=(236, 236, 236), width=2)
    a, b = (inner[0] + inner[1]) / 2, (inner[3] + inner[2]) / 2
    draw.line([tuple(a), tuple(b)], fill=(236, 236, 236), width=2)
    if sport == "soccer":
        r = float(np.hypot(*(inner[1] - inner[0]))) * 0.12
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), outline=(236, 236, 236), width=2)


def _draw_pool(draw: ImageDraw.ImageDraw, ring: list[Pt]) -> None:
    p = np.asarray(ring[:4], dtype=np.float64)
    c = p.mean(axis=0)
    draw.polygon([tuple(q) for q in (c + (p - c) * 1.25).tolist()], fill=(222, 222, 214))
    draw.polygon([tuple(q) for q in p.tolist()], fill=(44, 150, 206))


def _draw_tower(draw: ImageDraw.ImageDraw, x: float, y: float) -> None:
    draw.line([(x, y), (x + 22, y + 22)], fill=(60, 62, 58), width=2)  # long shadow
    s = 3.0
    draw.rectangle((x - s, y - s, x + s, y + s), outline=(70, 70, 72), width=1)
    draw.line([(x - s, y - s), (x + s, y + s)], fill=(90, 90, 92), width=1)
    draw.line([(x - s, y + s), (x + s, y - s)], fill=(90, 90, 92), width=1)


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Feature:
    """One OSM object of the world: planned in canvas metres, published in lon/lat."""

    kind: str  # building, road, parking, pitch, tank, pool, tree, tower, farmland, water, ...
    osm_type: str  # n, w, r
    osm_id: int
    tags: dict[str, str]
    rings_m: list[list[Pt]]  # a point [[p]], a line [pts], a polygon [outer, *holes]
    closed: bool = False
    extract: str = "main.osm.pbf"
    planted: str | None = None
    expect: tuple[str, str | None, str | None] | None = None  # by construction
    fine_class: str | None = None
    draw: bool = True
    style: dict[str, Any] = dataclasses.field(default_factory=dict)
    lonlat: list[list[Pt]] = dataclasses.field(default_factory=list)

    def publish(self) -> None:
        self.lonlat = [_to_lonlat(r) for r in self.rings_m]
        if self.closed:
            for r in self.lonlat:
                r[-1] = r[0]

    def geometry(self) -> Any:
        from shapely.geometry import LineString, Point, Polygon

        if self.osm_type == "n":
            return Point(self.lonlat[0][0])
        if self.closed:
            return Polygon(self.lonlat[0], self.lonlat[1:])
        return LineString(self.lonlat[0])


def _rect_m(cx: float, cy: float, w: float, h: float, angle: float) -> list[Pt]:
    c, s = math.cos(angle), math.sin(angle)
    pts = [(cx + dx * c - dy * s, cy + dx * s + dy * c)
           for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))]
    return [*pts, pts[0]]


def _blob_m(rng: np.random.Generator, cx: float, cy: float, r: float, k: int = 16,
            wobble: float = 0.18) -> list[Pt]:
    pts = []
    for i in range(k):
        a = 2 * math.pi * i / k
        rr = r * (1 + rng.uniform(-wobble, wobble))
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return [*pts, pts[0]]


class _Planner:
    """Lays out the place in canvas metres, keeping objects apart."""

    def __init__(self, rng: np.random.Generator, n: int) -> None:
        from shapely.geometry import box

        self.rng = rng
        self.n = n
        self.features: list[Feature] = []
        self.taken: list[Any] = []  # shapely geometries (metres) nothing may overlap
        self.inside = box(4, 4, WIDTH_M - 4, HEIGHT_M - 4)
        self.way_id = 0
        self.node_id = 0
        self.streets: list[tuple[Any, float]] = []  # (LineString, width)

    def next_way(self) -> int:
        self.way_id += 1
        return self.way_id

    def next_node(self) -> int:
        self.node_id += 1
        return self.node_id

    def free(self, geom: Any, gap: float = 1.5) -> bool:
        import shapely

        if not self.inside.contains(geom):
            return False
        if not self.taken:
            return True
        return not bool(shapely.intersects(np.asarray(self.taken, dtype=object),
                                           geom.buffer(gap)).any())

    def add(self, f: Feature, geom_m: Any | None = None) -> Feature:
        self.features.append(f)
        if geom_m is not None:
            self.taken.append(geom_m)
        return f

    # --- the layout

    def landcover(self) -> None:
        from shapely.geometry import Polygon, box

        rng = self.rng
        wood = _blob_m(rng, 150, 150, 100, k=14)
        fields = [[(40, 440), (300, 452), (290, 680), (52, 668)],
                  [(1332, 30), (1580, 40), (1575, 232), (1342, 222)]]
        self.add(Feature("wood", "w", self.next_way(), {"natural": "wood"}, [wood],
                         closed=True), Polygon(wood).buffer(4))
        for pts in fields:
            ring = [*pts, pts[0]]
            self.add(Feature("farmland", "w", self.next_way(), {"landuse": "farmland"},
                             [ring], closed=True,
                             style={"angle": float(rng.uniform(0, math.pi))}),
                     Polygon(ring).buffer(4))
        outer = _blob_m(rng, 1180, 560, 100, k=20, wobble=0.12)
        island = _blob_m(rng, 1195, 550, 26, k=10, wobble=0.1)
        self.add(Feature("water", "r", 1, {"natural": "water", "water": "lake"},
                         [outer, island], closed=True), Polygon(outer).buffer(5))
        x0, x1, y0, y1 = NODATA_BOX
        self.taken.append(box(x0, y0, x1, y1).buffer(6))  # only the planted houses go there

    def street(self, pts: list[Pt], surface: str, width: float, *,
               highway: str | None = None, check: bool = True) -> Feature | None:
        from shapely.geometry import LineString

        line = LineString(pts)
        body = line.buffer(width / 2 + 1.0, cap_style="flat")
        if check and not self.free(body, gap=0.5):
            return None
        tags = {"highway": highway or SURFACES[surface], "surface": surface}
        f = self.add(Feature("road", "w", self.next_way(), tags, [list(pts)],
                             fine_class=surface, style={"width": width}), body)
        self.streets.append((line, width))
        return f

    def roads(self) -> None:
        rng = self.rng
        west = [(320.0, 380.0), (540.0, 386.0), (760.0, 378.0), (980.0, 382.0)]
        east = [(1010.0, 330.0), (1300.0, 336.0), (1590.0, 328.0)]
        for main in (west, east):
            for k, (a, b) in enumerate(itertools.pairwise(main)):  # consecutive ways
                self.street([a, b], "asphalt", float(rng.uniform(8, 10)), check=k == 0)
        sides = [(360, 380, 530), (470, 380, 170), (580, 380, 520), (700, 380, 120),
                 (820, 380, 540), (930, 380, 160), (1060, 330, 90), (1180, 330, 110),
                 (1280, 330, 70), (1400, 330, 640), (1520, 330, 660), (880, 160, 60),
                 (640, 380, 560), (760, 380, 250), (410, 380, 250), (1120, 330, 420),
                 (1340, 330, 560), (1590, 328, 560)]
        order = ["asphalt", "gravel", "dirt"] * 6
        rng.shuffle(order)
        for (x, ya, yb), surface in zip(sides, order):
            start = ya + (8 if yb > ya else -8)
            mid = (x + float(rng.uniform(-8, 8)), (start + yb) / 2)
            width = float(rng.uniform(6, 8)) if surface != "asphalt" else float(
                rng.uniform(7, 9))
            self.street([(float(x), start), mid, (float(x) + float(rng.uniform(-6, 6)), yb)],
                        surface, width)

    def _slots(self, depth_range: tuple[float, float], spacing: tuple[float, float]
               ) -> list[tuple[Pt, float, float, int]]:
        """Places beside the streets: (point, street angle, offset from the centre line,
        side) every ``spacing`` metres on both sides."""
        out = []
        for line, width in self.streets:
            t = float(self.rng.uniform(6, 14))
            while t < line.length - 6:
                p0 = line.interpolate(t)
                p1 = line.interpolate(min(line.length, t + 1.0))
                ang = math.atan2(p1.y - p0.y, p1.x - p0.x)
                for side in (-1, 1):
                    off = width / 2 + float(self.rng.uniform(*depth_range))
                    out.append(((p0.x, p0.y), ang, off, side))
                t += float(self.rng.uniform(*spacing))
        return out

    def _place_rect(self, slot: tuple[Pt, float, float, int], w: float, h: float,
                    rotate: float = 0.0, gap: float = 1.5) -> tuple[list[Pt], Any] | None:
        from shapely.geometry import Polygon

        (x, y), ang, off, side = slot
        nx, ny = -math.sin(ang) * side, math.cos(ang) * side
        d = off + h / 2
        ring = _rect_m(x + nx * d, y + ny * d, w, h, ang + rotate)
        poly = Polygon(ring)
        if not self.free(poly, gap):
            return None
        return ring, poly

    def buildings(self) -> None:
        rng = self.rng
        slots = self._slots((2.5, 8.0), (18.0, 30.0))
        order = rng.permutation(len(slots))
        target = 60 * self.n
        placed = 0
        for i in order:
            if placed >= target:
                break
            long_ = float(rng.uniform(12, 25))
            short = float(rng.uniform(10, min(long_, 17)))
            rot = 0.0 if rng.random() < 0.7 else float(rng.uniform(-0.6, 0.6))
            got = self._place_rect(slots[int(i)], long_, short, rot)
            if got is None:
                continue
            ring, poly = got
            shape = ROOF_SHAPES[placed % 3]
            btype = ("house", "yes", "detached", "residential")[int(rng.integers(4))]
            colour = ROOF_COLOURS[int(rng.integers(len(ROOF_COLOURS)))]
            self.add(Feature("building", "w", self.next_way(),
                             {"building": btype, "roof:shape": shape}, [ring], closed=True,
                             fine_class=shape, style={"colour": colour}), poly)
            placed += 1

    def amenities(self) -> None:
        from shapely.geometry import Point, Polygon

        rng = self.rng
        slots = self._slots((3.0, 10.0), (30.0, 50.0))
        order = [slots[int(i)] for i in rng.permutation(len(slots))]
        wanted = ([("parking", None)] * 8 + [("pitch", "tennis"), ("pitch", "soccer")] * 2
                  + [("tank", None)] * 4 + [("pool", None)] * 4)
        for kind, sport in wanted * self.n:
            for _ in range(len(order)):
                slot = order.pop()
                order.insert(0, slot)
                if kind == "parking":
                    w, h = float(rng.uniform(28, 44)), float(rng.uniform(18, 28))
                elif kind == "pitch":
                    w, h = (36.0, 18.0) if sport == "tennis" else (64.0, 42.0)
                elif kind == "pool":
                    w, h = float(rng.uniform(8, 12)), float(rng.uniform(4, 6))
                else:
                    w = h = 2 * float(rng.uniform(7, 11))
                if kind == "tank":
                    (x, y), ang, off, side = slot
                    d = off + h / 2
                    cx, cy = x - math.sin(ang) * side * d, y + math.cos(ang) * side * d
                    ring = _blob_m(rng, cx, cy, w / 2, k=24, wobble=0.0)
                    poly = Polygon(ring)
                    if not self.free(poly, 2.0):
                        continue
                else:
                    got = self._place_rect(slot, w, h, gap=2.0)
                    if got is None:
                        continue
                    ring, poly = got
                tags = {"parking": {"amenity": "parking", "surface": "asphalt"},
                        "pitch": {"leisure": "pitch", "sport": str(sport)},
                        "tank": {"man_made": "storage_tank"},
                        "pool": {"leisure": "swimming_pool"}}[kind]
                self.add(Feature(kind, "w", self.next_way(), dict(tags), [ring], closed=True,
                                 style={"sport": sport}), poly)
                break
        for _ in range(10 * self.n):  # trees: nodes
            for _ in range(200):
                x, y = float(rng.uniform(20, WIDTH_M - 20)), float(rng.uniform(20, HEIGHT_M - 20))
                r = float(rng.uniform(2.5, 4.0))
                if self.free(Point(x, y).buffer(r), 1.0):
                    self.add(Feature("tree", "n", self.next_node(), {"natural": "tree"},
                                     [[(x, y)]], style={"r": r}), Point(x, y).buffer(r))
                    break
        for k in range(3):  # power towers along a line in the south
            for dx in (0.0, 20.0, -20.0, 40.0, -40.0, 60.0):
                x, y = 300.0 + 230.0 * k + dx, 30.0 + 4.0 * k
                if self.free(Point(x, y).buffer(3), 1.0):
                    self.add(Feature("tower", "n", self.next_node(),
                                     {"power": "tower", "ref": f"T{k + 1}"}, [[(x, y)]]),
                             Point(x, y).buffer(3))
                    break

    def planted(self) -> None:
        from shapely.geometry import LineString, Polygon

        rng = self.rng
        for k, (cx, cy) in enumerate(((432.0, 600.0), (482.0, 650.0), (530.0, 598.0))):
            ring = _rect_m(cx, cy, 16.0, 11.0, 0.2 * k)
            self.add(Feature("building", "w", self.next_way(),
                             {"building": ("yes", "house", "garage")[k]}, [ring], closed=True,
                             planted="all_nodata",
                             style={"colour": ROOF_COLOURS[k], "roof": "flat"}))
        # highway=steps (0.2 m): no raster is fine enough
        steps = [(250.0, 330.0), (258.0, 336.0)]
        if self.free(LineString(steps).buffer(2)):
            self.add(Feature("steps", "w", self.next_way(), {"highway": "steps"}, [steps],
                             planted="too_fine", style={"width": 2.0}),
                     LineString(steps).buffer(2))
        # a building ~5 km north: inside no raster (not drawn)
        far = _rect_m(800.0, 5000.0, 14.0, 11.0, 0.0)
        self.add(Feature("building", "w", self.next_way(),
                         {"building": "house", "roof:shape": "gabled"}, [far], closed=True,
                         planted="far_away", fine_class="gabled", draw=False))
        # a bow-tie building (drawn as nothing: rejected at read)
        bow = [(270.0, 300.0), (290.0, 314.0), (290.0, 300.0), (270.0, 314.0), (270.0, 300.0)]
        self.add(Feature("building", "w", self.next_way(), {"building": "yes"}, [bow],
                         closed=True, planted="bowtie",
                         expect=("rejected", "read", "invalid_geometry"), draw=False))
        self.taken.append(Polygon(bow).buffer(0).buffer(3))
        # a road whose node list names nodes the file lacks
        road = [(260.0, 250.0), (280.0, 255.0), (300.0, 252.0)]
        self.add(Feature("road", "w", self.next_way(),
                         {"highway": "service", "surface": "gravel"}, [road],
                         planted="missing_nodes", fine_class="gravel",
                         expect=("rejected", "read", "missing_nodes"), draw=False,
                         style={"missing": 2}))
        # objects with tags outside the table: counted unmatched, never read
        for tags in ({"foo": "bar"}, {"fixme": "survey", "note": "check"}):
            x, y = float(rng.uniform(100, 200)), float(rng.uniform(300, 340))
            self.add(Feature("unknown", "n", self.next_node(), tags, [[(x, y)]],
                             planted="unknown_tags", expect=("not_read", None, None),
                             draw=False))
        ring = _rect_m(220.0, 300.0, 10.0, 10.0, 0.0)
        self.add(Feature("unknown", "w", self.next_way(), {"foo": "bar", "name": "Nowhere"},
                         [ring], closed=True, planted="unknown_tags",
                         expect=("not_read", None, None), draw=False))


def _assign_extracts(features: list[Feature]) -> Feature | None:
    """East objects go to east.osm; one building near the border is in both. Returns the
    main.osm.pbf copy of that building."""
    for f in features:
        cx = float(np.mean([p[0] for p in f.rings_m[0]]))
        if cx > EAST_SPLIT_X and f.planted is None:
            f.extract = "east.osm"
    border = [f for f in features if f.kind == "building" and f.extract == "east.osm"
              and f.planted is None]
    if not border:
        return None
    first = min(border, key=lambda f: float(np.mean([p[0] for p in f.rings_m[0]])))
    first.planted = "border_duplicate"
    copy = dataclasses.replace(first, extract="main.osm.pbf", draw=False,
                               expect=("rejected", "read", "duplicate_id"))
    return copy


# ----------------------------------------------------------------------------- rendering


def _render(features: list[Feature], rng: np.random.Generator) -> np.ndarray:
    """The canvas (H, W, 3) uint8 with every drawable feature painted from its published
    (rounded) coordinates."""
    w, h = _canvas_size()
    img = Image.fromarray(np.clip(_ground(rng, w, h), 0, 255).astype(np.uint8))
    px = {id(f): [_to_px(r) for r in f.lonlat] for f in features if f.draw}

    def rings(f: Feature) -> list[list[Pt]]:
        return px[id(f)]

    layers = ("farmland", "wood", "water", "road", "steps", "parking", "pitch", "pool", "tank",
              "building", "tree", "tower")
    for layer in layers:
        for f in features:
            if not f.draw or f.kind != layer:
                continue
            r = rings(f)
            frng = np.random.default_rng([int(rng.integers(2**31)), f.osm_id])
            if layer == "farmland":
                _paste(img, r, lambda ww, hh, f=f, frng=frng: _field(frng, ww, hh,
                                                                     f.style["angle"]))
            elif layer == "wood":
                _paste(img, r, lambda ww, hh, frng=frng: _surface_texture(frng, ww, hh, "wood"))
                _wood_crowns(img, r, frng)
            elif layer == "water":
                _paste(img, r, lambda ww, hh, frng=frng: _surface_texture(frng, ww, hh,
                                                                          "water"))
                _island_trees(img, r[1], frng)
            elif layer in ("road", "steps"):
                kind = f.tags.get("surface", "gravel") if layer == "road" else "gravel"
                _paste(img, r, lambda ww, hh, kind=kind, frng=frng: _surface_texture(
                    frng, ww, hh, kind), line_px=f.style["width"] / GSD)
            elif layer == "parking":
                _paste(img, r, lambda ww, hh, frng=frng: _surface_texture(frng, ww, hh,
                                                                          "asphalt"))
                _parking_marks(ImageDraw.Draw(img), r[0], frng)
            elif layer == "pitch":
                _draw_pitch(ImageDraw.Draw(img), r[0], f.tags["sport"])
            elif layer == "pool":
                _draw_pool(ImageDraw.Draw(img), r[0])
            elif layer == "tank":
                _draw_tank(ImageDraw.Draw(img), r[0])
            elif layer == "building":
                draw_roof(ImageDraw.Draw(img), frng, r[0],
                          f.tags.get("roof:shape", f.style.get("roof", "flat")),
                          f.style["colour"])
            elif layer == "tree":
                (x, y), = r[0]
                _tree(ImageDraw.Draw(img), frng, x, y, f.style["r"] / GSD,
                      _shade((52, 92, 42), float(frng.uniform(0.85, 1.15))))
            elif layer == "tower":
                (x, y), = r[0]
                _draw_tower(ImageDraw.Draw(img), x, y)
    return np.asarray(img)


def _field(rng: np.random.Generator, w: int, h: int, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    stripes = (np.floor(t / 6.0) % 2).astype(np.float32)[..., None]
    a = np.asarray((150, 150, 78), np.float32)
    b = np.asarray((124, 132, 66), np.float32)
    arr = a * stripes + b * (1 - stripes)
    arr += (_smooth(rng, w, h, 40.0) * 8.0)[..., None]
    arr += rng.standard_normal((h, w, 1)).astype(np.float32) * 4.0
    return arr


def _wood_crowns(img: Image.Image, rings: list[list[Pt]], rng: np.random.Generator) -> None:
    from shapely.geometry import Point, Polygon

    poly = Polygon(rings[0])
    x0, y0, x1, y1 = poly.bounds
    draw = ImageDraw.Draw(img)
    for _ in range(int(poly.area / 60)):
        x, y = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
        if poly.contains(Point(x, y).buffer(8)):
            _tree(draw, rng, x, y, float(rng.uniform(5, 9)),
                  _shade((44, 80, 38), float(rng.uniform(0.8, 1.2))))


def _island_trees(img: Image.Image, ring: list[Pt], rng: np.random.Generator) -> None:
    from shapely.geometry import Point, Polygon

    poly = Polygon(ring)
    x0, y0, x1, y1 = poly.bounds
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
        if poly.contains(Point(x, y).buffer(7)):
            _tree(draw, rng, x, y, 6.0, (50, 88, 40))


def _parking_marks(draw: ImageDraw.ImageDraw, ring: list[Pt], rng: np.random.Generator
                   ) -> None:
    p = np.asarray(ring[:4], dtype=np.float64)
    if np.hypot(*(p[1] - p[0])) < np.hypot(*(p[2] - p[1])):
        p = np.roll(p, -1, axis=0)
    u, v = p[1] - p[0], p[3] - p[0]
    n_stalls = max(2, int(np.hypot(*u) / 6.0))  # 3 m stalls at 0.5 m/px
    horizontal = abs(u[0]) >= abs(u[1])
    for row_f in (0.05, 0.62):
        for k in range(1, n_stalls):
            a = p[0] + u * (k / n_stalls) + v * row_f
            draw.line([tuple(a), tuple(a + v * 0.33)], fill=(226, 226, 220), width=1)
        for k in range(n_stalls):
            if rng.random() < 0.45:
                c = p[0] + u * ((k + 0.5) / n_stalls) + v * (row_f + 0.17)
                _car(draw, rng, float(c[0]), float(c[1]), 9.0, 4.0, not horizontal)


# ----------------------------------------------------------------------------- rasters


def _write_tif(path: str, data: np.ndarray, crs: str | None, transform: Any, year: int,
               nodata: float | None = None) -> None:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    os.makedirs(os.path.dirname(path), exist_ok=True)
    count, h, w = data.shape
    profile: dict[str, Any] = {"driver": "GTiff", "width": w, "height": h, "count": count,
                               "dtype": "uint8", "compress": "deflate", "tiled": True,
                               "blockxsize": 256, "blockysize": 256, "photometric": "RGB"}
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            dst.update_tags(TIFFTAG_DATETIME=f"{year}:06:01 00:00:00")


def _write_rasters(root: str, canvas: np.ndarray, rng: np.random.Generator) -> None:
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.warp import reproject
    from rasterio.warp import transform as warp

    def from_origin(west: float, north: float, xres: float, yres: float) -> Affine:
        return Affine(xres, 0.0, west, 0.0, -yres, north)

    img = os.path.join(root, "imagery")
    left, top = X0 - MARGIN_M, Y0 + HEIGHT_M + MARGIN_M
    src_tr = from_origin(left, top, GSD, GSD)
    bands = np.ascontiguousarray(canvas.transpose(2, 0, 1))
    m = round(MARGIN_M / GSD)

    # 1. UTM, 0.5 m, x in [0, 1000], y in [0, 700]
    c0, c1 = m + round(WEST_X[0] / GSD), m + round(WEST_X[1] / GSD)
    r0, r1 = m, m + round(HEIGHT_M / GSD)
    _write_tif(os.path.join(img, "naip", "utm_fine.tif"), bands[:, r0:r1, c0:c1], UTM,
               from_origin(X0 + WEST_X[0], Y0 + HEIGHT_M, GSD, GSD), RASTERS["utm_fine.tif"][1])

    # 2. Web Mercator, 0.5 m at its centre, the bounding box of x in [600, 1600], y in [0, 700]
    xs = [X0 + EAST_X[0], X0 + EAST_X[1], X0 + EAST_X[1], X0 + EAST_X[0]]
    ys = [Y0, Y0, Y0 + HEIGHT_M, Y0 + HEIGHT_M]
    mx, my = warp(UTM, MERC, xs, ys)
    mx0, mx1, my0, my1 = min(mx), max(mx), min(my), max(my)
    lat_c = math.degrees(2 * math.atan(math.exp((my0 + my1) / 2 / 6378137.0)) - math.pi / 2)
    pix = GSD / math.cos(math.radians(lat_c))
    mw, mh = math.ceil((mx1 - mx0) / pix), math.ceil((my1 - my0) / pix)
    dst_tr = from_origin(mx0, my0 + mh * pix, pix, pix)
    merc = np.zeros((3, mh, mw), np.uint8)
    reproject(bands, merc, src_transform=src_tr, src_crs=UTM, dst_transform=dst_tr,
              dst_crs=MERC, resampling=Resampling.bilinear)
    _write_tif(os.path.join(img, "naip", "merc_fine.tif"), merc, MERC, dst_tr,
               RASTERS["merc_fine.tif"][1])

    # 3. UTM, 2 m, the whole canvas (margin included)
    h, w = canvas.shape[:2]
    coarse = canvas.reshape(h // 4, 4, w // 4, 4, 3).astype(np.float32).mean(axis=(1, 3))
    coarse_b = np.rint(coarse).astype(np.uint8).transpose(2, 0, 1)
    _write_tif(os.path.join(img, "default", "utm_coarse.tif"), np.ascontiguousarray(coarse_b),
               UTM, from_origin(left, top, 4 * GSD, 4 * GSD), RASTERS["utm_coarse.tif"][1])

    # planted: all nodata at 0.9 m over NODATA_BOX; no CRS at all
    x0, x1, y0, y1 = NODATA_BOX
    g = 0.9
    nw, nh = math.ceil((x1 - x0) / g), math.ceil((y1 - y0) / g)
    _write_tif(os.path.join(img, "naip", "all_nodata.tif"), np.zeros((3, nh, nw), np.uint8),
               UTM, from_origin(X0 + x0, Y0 + y1, g, g), RASTERS["all_nodata.tif"][1],
               nodata=0)
    junk = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    _write_tif(os.path.join(img, "default", "no_crs.tif"), junk, None, None,
               RASTERS["no_crs.tif"][1])


# ----------------------------------------------------------------------------- OSM files


def _osm_items(features: list[Feature], start_node: int
               ) -> tuple[list[Any], list[Any], list[Any], int]:
    """(nodes, ways, relations) of ``features`` as pyosmium mutable objects."""
    from osmium.osm.mutable import Node, Relation, Way

    nodes, ways, rels = [], [], []
    nid = start_node
    for f in features:
        if f.osm_type == "n":
            nodes.append(Node(id=f.osm_id, location=f.lonlat[0][0], version=1, tags=f.tags))
            continue
        ring_ways = []
        for k, ring in enumerate(f.lonlat):
            pts = ring[:-1] if f.closed else ring
            ids = []
            for p in pts:
                nid += 1
                nodes.append(Node(id=nid, location=p, version=1))
                ids.append(nid)
            if f.closed:
                ids.append(ids[0])
            if f.style.get("missing"):
                for _ in range(int(f.style["missing"])):
                    nodes.pop()
            if f.osm_type == "w":
                ways.append(Way(id=f.osm_id, nodes=ids, version=1, tags=f.tags))
            else:
                way_id = 900000 + f.osm_id * 10 + k
                ways.append(Way(id=way_id, nodes=ids, version=1))
                ring_ways.append(("w", way_id, "outer" if k == 0 else "inner"))
        if f.osm_type == "r":
            rels.append(Relation(id=f.osm_id, members=ring_ways, version=1,
                                 tags={"type": "multipolygon", **f.tags}))
    return nodes, ways, rels, nid


def _write_osm(path: str, nodes: list[Any], ways: list[Any], rels: list[Any]) -> None:
    import osmium

    if os.path.exists(path):
        os.remove(path)
    with osmium.SimpleWriter(path) as w:
        for o in sorted(nodes, key=lambda o: o.id):
            w.add_node(o)
        for o in sorted(ways, key=lambda o: o.id):
            w.add_way(o)
        for o in sorted(rels, key=lambda o: o.id):
            w.add_relation(o)


def _node_ids(features: list[Feature]) -> dict[int, int]:
    """A stable first node id per feature (ids unique across files; a feature written to two
    files gets the same node ids in both)."""
    out, nid = {}, 100000
    for f in features:
        out[id(f)] = nid
        nid += sum(len(r) for r in f.rings_m) + 1
    return out


def _write_extracts(root: str, features: list[Feature], dup: Feature | None,
                    seed: int) -> None:
    d = os.path.join(root, "osm")
    os.makedirs(d, exist_ok=True)
    starts = _node_ids(features)
    files: dict[str, tuple[list[Any], list[Any], list[Any]]] = {
        "main.osm.pbf": ([], [], []), "east.osm": ([], [], [])}
    for f in features:
        n, w, r, _ = _osm_items([f], starts[id(f)])
        for acc, items in zip(files[f.extract], (n, w, r)):
            acc.extend(items)
    if dup is not None:
        twin = next(f for f in features if f.planted == "border_duplicate"
                    and f.osm_id == dup.osm_id and f.extract == "east.osm")
        n, w, r, _ = _osm_items([dup], starts[id(twin)])
        for acc, items in zip(files["main.osm.pbf"], (n, w, r)):
            acc.extend(items)
    for name, (n, w, r) in files.items():
        _write_osm(os.path.join(d, name), n, w, r)
    # a valid pbf of a few buildings, truncated to its first 60 %
    rng = _rng(seed, 3)
    extra = []
    for k in range(4):
        ring = _rect_m(float(rng.uniform(100, 900)), float(rng.uniform(100, 600)), 12, 10, 0)
        f = Feature("building", "w", 800000 + k, {"building": "yes", "roof:shape": "flat"},
                    [ring], closed=True)
        f.publish()
        extra.append(f)
    n, w, r, _ = _osm_items(extra, 700000)
    full = os.path.join(d, "broken.full.osm.pbf")
    _write_osm(full, n, w, r)
    with open(full, "rb") as fh:
        data = fh.read()
    os.remove(full)
    with open(os.path.join(d, "broken.osm.pbf"), "wb") as fh:
        fh.write(data[: int(len(data) * 0.6)])


# ----------------------------------------------------------------------------- truth


def _expectations(features: list[Feature], imagery_glob: str) -> dict[int, dict[str, Any]]:
    """Per feature (by ``id``) the outcome the recipe's tile stage gives it: ``expected``,
    ``expected_stage``, ``expected_reason``, ``raster``, ``crs``."""
    import rasterio

    from pipelines.records import Reject
    from pipelines.sources.imagery import RasterIndex, catalogue
    from pipelines.sources.osm import TagTable
    from pipelines.stages.tiles import plan_tile, read_tile

    table = TagTable.load()
    infos, _problems = catalogue(imagery_glob)
    index = RasterIndex(infos)
    out: dict[int, dict[str, Any]] = {}
    opened: dict[str, Any] = {}
    try:
        for f in features:
            if f.expect is not None:
                continue
            gsd = table.max_gsd(f.tags)
            assert gsd is not None, f.tags
            found = index.candidates(f.geometry(), gsd)
            if not found:
                out[id(f)] = {"expected": "rejected", "expected_stage": "tile",
                              "expected_reason": "no_imagery", "raster": None, "crs": None}
                continue
            r = found[0]
            row = {"raster": os.path.basename(r.path), "crs": r.crs}
            win = plan_tile(f.geometry(), r, 0)
            if isinstance(win, Reject):
                out[id(f)] = {**row, "expected": "rejected", "expected_stage": "tile",
                              "expected_reason": win.reason}
                continue
            # a raster without nodata has no nodata pixel: read only the others (the read
            # also encodes the tile, the slow part)
            got = None
            if r.nodata is not None:
                if r.path not in opened:
                    opened[r.path] = rasterio.open(r.path)
                got = read_tile(opened[r.path], win, r)
            if isinstance(got, Reject):
                out[id(f)] = {**row, "expected": "rejected", "expected_stage": "tile",
                              "expected_reason": got.reason}
                continue
            out[id(f)] = {**row, "expected": "kept", "expected_stage": None,
                          "expected_reason": None}
    finally:
        for src in opened.values():
            src.close()
    return out


def _truth_rows(root: str, features: list[Feature], dup: Feature | None,
                expect: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for f in [*features, *([dup] if dup is not None else [])]:
        row: dict[str, Any] = {
            "key": None, "source": "osm", "source_id": f"{f.osm_type}{f.osm_id}",
            "planted": f.planted, "osm_type": f.osm_type, "osm_id": f.osm_id,
            "tags": json.dumps(f.tags, sort_keys=True), "geometry_wkt": f.geometry().wkt,
            "extract": f.extract, "fine_class": f.fine_class, "raster": None, "crs": None}
        if f.expect is not None:
            row["expected"], row["expected_stage"], row["expected_reason"] = f.expect
        else:
            row.update(expect[id(f)])
        rows.append(row)
    broken = os.path.abspath(os.path.join(root, "osm", "broken.osm.pbf"))
    rows.append({"key": None, "source": "osm", "source_id": f"file:{broken}",
                 "expected": "rejected", "expected_stage": "read",
                 "expected_reason": "osm_file_unreadable", "planted": "truncated_pbf",
                 "extract": "broken.osm.pbf"})
    no_crs = os.path.abspath(os.path.join(root, "imagery", "default", "no_crs.tif"))
    rows.append({"key": None, "source": "imagery", "source_id": f"raster:{no_crs}",
                 "expected": "rejected", "expected_stage": "imagery",
                 "expected_reason": "no_crs", "planted": "no_crs"})
    for i, r in enumerate(rows):
        r["row"] = i
    return rows


# ----------------------------------------------------------------------------- entry points


def build_skyscript(out_dir: str, seed: int = 0, n: int = 1) -> dict[str, Any]:
    """Write the SkyScript sources (OSM extracts, GeoTIFFs) and their truth into ``out_dir``
    (see the module docstring); ``n`` scales the number of objects. Returns ``{"rows",
    "by_expected", "by_reason", "by_kind", "fine_classes", "planted", "osm_glob",
    "imagery_glob", "truth"}``."""
    if n < 1:
        raise ValueError("n must be at least 1")
    root, truth_path = fresh_part(out_dir, FOLDER, TRUTH)

    plan = _Planner(_rng(seed, 1), n)
    plan.landcover()
    plan.planted()
    plan.roads()
    plan.buildings()
    plan.amenities()
    features = plan.features
    for f in features:
        f.publish()
    dup = _assign_extracts(features)

    canvas = _render(features, _rng(seed, 2))
    _write_rasters(root, canvas, _rng(seed, 4))
    _write_extracts(root, features, dup, seed)

    abs_root = os.path.abspath(root)
    osm_glob = f"{abs_root}/osm/*"
    imagery_glob = f"{abs_root}/imagery/*/*.tif"
    expect = _expectations(features, imagery_glob)
    rows = write_truth(_truth_rows(root, features, dup, expect), _TRUTH_SCHEMA, truth_path)
    kinds: dict[str, int] = {}
    for f in features:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    reasons = [{"r": r["expected_reason"] or r["expected"]} for r in rows]
    return {
        "rows": len(rows),
        "by_expected": tally(rows, "expected"),
        "by_reason": tally(reasons, "r"),
        "by_kind": dict(sorted(kinds.items())),
        "fine_classes": tally(rows, "fine_class"),
        "by_raster": tally(rows, "raster"),
        "planted": tally(rows, "planted"),
        "osm_glob": osm_glob,
        "imagery_glob": imagery_glob,
        "truth": truth_path,
    }


def render_building_tile(rng: np.random.Generator, shape: str, out_px: int = BENCH_OUT_PX
                         ) -> Image.Image:
    """One new building of roof ``shape`` on the world's ground, cut the way the recipe cuts
    a polygon's tile: its box padded 10 %, square, at least :data:`BENCH_MIN_PX` px at 0.5 m,
    shifted by up to 25 % of the side with the building kept inside; resampled to
    ``out_px`` with PIL's box filter."""
    side = 224  # px of the patch drawn around the building (112 m)
    img = Image.fromarray(np.clip(_ground(rng, side, side), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    c = side / 2
    long_ = float(rng.uniform(12, 25)) / GSD
    short = float(rng.uniform(10, min(long_ * GSD, 17))) / GSD
    ang = float(rng.uniform(0, math.pi)) if rng.random() < 0.5 else float(
        rng.integers(2)) * math.pi / 2
    if rng.random() < 0.6:  # a street beside the house
        kind = ("asphalt", "gravel", "dirt")[int(rng.integers(3))]
        off = short / 2 + float(rng.uniform(8, 14))
        nx, ny = -math.sin(ang), math.cos(ang)
        a = (c + nx * off - math.cos(ang) * side, c + ny * off - math.sin(ang) * side)
        b = (c + nx * off + math.cos(ang) * side, c + ny * off + math.sin(ang) * side)
        _paste(img, [[a, b]], lambda ww, hh: _surface_texture(rng, ww, hh, kind),
               line_px=float(rng.uniform(12, 18)))
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, side, 2)
        if math.hypot(x - c, y - c) > long_:
            _tree(draw, rng, float(x), float(y), float(rng.uniform(5, 8)), (52, 92, 42))
    ring = _rect_m(c, c, long_, short, ang)[:4]
    colour = ROOF_COLOURS[int(rng.integers(len(ROOF_COLOURS)))]
    draw_roof(draw, rng, ring, shape, colour)
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    bside = max(x1 - x0, y1 - y0)
    size = max(math.ceil(bside * 1.1), BENCH_MIN_PX)
    shift = 0.25 * size

    def offset(lo: float, hi: float, centre: float) -> int:
        a = max(math.ceil(hi - size), 0, math.ceil(centre - size / 2 - shift))
        b = min(math.floor(lo), side - size, math.floor(centre - size / 2 + shift))
        return int(rng.integers(a, b + 1)) if a <= b else round(centre - size / 2)

    col, row = offset(x0, x1, (x0 + x1) / 2), offset(y0, y1, (y0 + y1) / 2)
    tile = img.crop((col, row, col + size, row + size))
    return tile.resize((out_px, out_px), Image.Resampling.BOX)


def build_fine_benchmark(out_dir: str, seed: int = 0, n_per_class: int = 30) -> dict[str, Any]:
    """Write the roof-shape benchmark (buildings the build never saw) to
    ``out_dir/roof_shape``: class-per-folder PNGs and ``split.json`` (the first 40 % of each
    class train, the rest test). Returns ``{"root", "classes", "per_class", "train",
    "test"}``."""
    if n_per_class < 2:
        raise ValueError("n_per_class must be at least 2")
    root = os.path.join(out_dir, "roof_shape")
    shutil.rmtree(root, ignore_errors=True)
    split: dict[str, list[str]] = {"train": [], "test": []}
    n_train = min(n_per_class - 1, max(1, round(n_per_class * 0.4)))
    for ci, shape in enumerate(ROOF_SHAPES):
        folder = BENCH_FOLDERS[shape]
        os.makedirs(os.path.join(root, folder))
        for j in range(n_per_class):
            rng = np.random.default_rng([seed, BENCH_STREAM, ci, j])
            tile = render_building_tile(rng, shape)
            rel = f"{folder}/{folder}_{j:03d}.png"
            tile.save(os.path.join(root, rel), "PNG", compress_level=6)
            split["train" if j < n_train else "test"].append(rel)
    with open(os.path.join(root, "split.json"), "w") as f:
        json.dump(split, f, indent=0)
    return {"root": root, "classes": [BENCH_FOLDERS[s] for s in ROOF_SHAPES],
            "per_class": n_per_class, "train": len(split["train"]),
            "test": len(split["test"])}


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the world folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--bench", type=int, default=0,
                    help="also write the roof-shape benchmark with this many per class")
    a = ap.parse_args(argv)
    out = build_skyscript(a.out, a.seed, a.n)
    if a.bench:
        out["roof_shape"] = build_fine_benchmark(a.out, a.seed, a.bench)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
