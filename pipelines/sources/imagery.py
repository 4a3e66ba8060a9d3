"""The imagery catalogue of the SkyScript recipe: which GeoTIFF/COG covers an object, how fine.

Pure functions first; the recipe (``pipelines.recipes.skyscript``) wires them into Beam.

- :func:`catalogue` lists rasters from a glob of GeoTIFF/COG files or from a listing (CSV or
  JSON with ``path``, ``collection``, ``year``, ``bands``, ``scale``) and describes each one
  from its header (no pixel is read) as a :class:`RasterInfo`. Rasters it cannot use are
  counted :class:`CatalogueProblem` rows, never exceptions: ``unreadable`` (GDAL cannot open
  it), ``no_crs`` (not georeferenced), ``unknown_collection`` (a listing names a collection
  the collections table lacks), ``band_missing`` (the RGB bands exceed the band count),
  ``footprint_invalid`` (the raster's outline cannot be brought to WGS84).
- **GSD** (:func:`ground_sample_distance`): the square root of the ground area of one pixel
  at the raster's centre, in metres. For a projected CRS that is not Mercator it is the
  transform's pixel size times the CRS's linear unit (exact: the nominal GSD of UTM, national
  grids, feet-based state planes). For a geographic CRS, degrees are turned into metres with
  the WGS84 ellipsoid's radii of curvature at the centre latitude. For Mercator (Web Mercator
  EPSG:3857, World Mercator EPSG:3395), whose scale grows as 1/cos(latitude), it is the pixel
  size times cos(centre latitude). A Web Mercator raster's GSD therefore holds at its centre
  only (it changes by ~0.02 % per km north-south at mid latitudes).
- **Collections as data**: ``pipelines/recipes/data/skyscript_collections.json`` says, per
  collection, which bands are R, G, B and how values become 8 bits (see that file's
  ``about``). A glob's raster belongs to the collection named by its parent folder
  (``.../naip/x.tif``) when the table knows that name, else to ``default``. A listing's
  ``bands`` (``"4,3,2"``) overrides the collection's RGB bands and its ``scale`` (the value
  shown as 255) turns the stretch into ``linear`` 0..scale.
- **Footprint**: the raster's outline (8 points a side, because a UTM square is no lon/lat
  rectangle) through ``rasterio.warp.transform_geom`` into WGS84 lon/lat, as a shapely
  geometry (a MultiPolygon when it is cut at the antimeridian).
- :class:`RasterIndex`: a shapely ``STRtree`` over the footprints. :meth:`RasterIndex.candidates`
  returns the rasters whose footprint contains an object and whose GSD is at most the tag's
  maximum GSD, **coarsest first**: SkyScript chose, per tag, the coarsest resolution at which
  it is still visible, so the first candidate is the one that wastes no resolution (ties: the
  newest year first, then collection name and path, so the order is deterministic).

**In a pipeline** (:class:`Catalogue`): the globs and listings are expanded and every header is
read on the workers (``FileSystems.match`` inside a DoFn, one raster per element after a
Reshuffle), never on the launcher; each problem becomes a reject row (stage ``imagery``,
source ``imagery``, source_id ``raster:<path>``), so a raster the build could not use is
counted in its accounting like any other input.

Paths: local paths are opened as they are; ``gs://`` and ``s3://`` become GDAL's ``/vsigs/``
and ``/vsis3/`` (credentials from GDAL's environment; untested here). Globs and listings are
read through Beam's ``FileSystems``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import posixpath
import warnings
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.records import MAIN, REJECTS, Reject, new_record, reject_row
from pipelines.sources.archives import crs_name

COLLECTIONS_FILE = "skyscript_collections.json"
DEFAULT_COLLECTION = "default"
#: a raster whose GSD exceeds a tag's maximum by at most this share still serves it: published
#: GSDs are round numbers, measured ones (Web Mercator, reprojected products) drift a little
GSD_TOLERANCE = 0.05
# WGS84 ellipsoid
_WGS84_A = 6378137.0
_WGS84_E2 = 6.69437999014e-3

STAGE = "imagery"
SOURCE = "imagery"
PROBLEMS = ("unreadable", "no_crs", "unknown_collection", "band_missing", "footprint_invalid")


@dataclasses.dataclass(frozen=True)
class RasterInfo:
    """One usable raster, as its header describes it (all a tile planner needs)."""

    path: str
    collection: str
    year: int | None
    crs: str  # "EPSG:32633", or the CRS's WKT/PROJ string when it has no EPSG code
    transform: tuple[float, float, float, float, float, float]  # Affine a, b, c, d, e, f
    width: int
    height: int
    count: int
    dtype: str
    gsd_m: float
    nodata: float | None
    bands: tuple[int, int, int]  # 1-based R, G, B
    stretch: dict[str, Any] = dataclasses.field(hash=False, compare=False)
    footprint: Any = dataclasses.field(hash=False, compare=False)  # shapely, WGS84 lon/lat

    @property
    def bounds_wgs84(self) -> tuple[float, float, float, float]:
        return tuple(float(v) for v in self.footprint.bounds)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class CatalogueProblem:
    """A raster the catalogue cannot use; ``reason`` is one of :data:`PROBLEMS`."""

    path: str
    reason: str
    detail: str | None = None


# --- collections --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _packaged_collections() -> str:
    return resources.files("pipelines.recipes").joinpath("data", COLLECTIONS_FILE).read_text(
        encoding="utf-8")


def load_collections(path: str | None = None) -> dict[str, dict[str, Any]]:
    """The collections table (``{name: {rgb_bands, stretch, ...}}``) from ``path`` (any Beam
    filesystem) or the packaged data file."""
    if path is None:
        text = _packaged_collections()
    else:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            text = f.read().decode("utf-8")
    doc = json.loads(text)
    table = doc.get("collections", doc)
    if DEFAULT_COLLECTION not in table:
        raise ValueError(f"collections table has no {DEFAULT_COLLECTION!r} entry")
    for name, spec in table.items():
        bands = spec.get("rgb_bands")
        if not (isinstance(bands, list) and len(bands) == 3
                and all(isinstance(b, int) and b >= 1 for b in bands)):
            raise ValueError(f"collection {name!r}: rgb_bands must be three 1-based ints")
        kind = spec.get("stretch", {}).get("kind")
        if kind not in ("none", "linear", "percentile", "auto"):
            raise ValueError(f"collection {name!r}: unknown stretch kind {kind!r}")
    return table


# --- geometry helpers ---------------------------------------------------------------------


def gdal_path(path: str) -> str:
    """``gs://b/k`` → ``/vsigs/b/k``, ``s3://b/k`` → ``/vsis3/b/k``; others unchanged."""
    for scheme, vsi in (("gs://", "/vsigs/"), ("s3://", "/vsis3/")):
        if path.startswith(scheme):
            return vsi + path[len(scheme):]
    return path


def _centre_lonlat(crs: Any, transform: tuple[float, ...], width: int, height: int
                   ) -> tuple[float, float]:
    from rasterio.warp import transform as warp

    a, b, c, d, e, f = transform
    x = a * width / 2 + b * height / 2 + c
    y = d * width / 2 + e * height / 2 + f
    lons, lats = warp(crs, "EPSG:4326", [x], [y])
    return float(lons[0]), float(lats[0])


def ground_sample_distance(crs: Any, transform: tuple[float, ...], width: int, height: int
                           ) -> float:
    """Metres: the square root of the ground area of one pixel at the raster's centre (see
    the module docstring for geographic and Mercator CRSs)."""
    from rasterio.crs import CRS

    crs = CRS.from_user_input(crs)
    a, b, _c, d, e, _f = transform
    area = abs(a * e - b * d)  # of one pixel, in CRS units squared
    if crs.is_geographic:
        _lon, lat = _centre_lonlat(crs, transform, width, height)
        phi = math.radians(lat)
        w = 1.0 - _WGS84_E2 * math.sin(phi) ** 2
        n = _WGS84_A / math.sqrt(w)  # prime vertical radius
        m = _WGS84_A * (1.0 - _WGS84_E2) / w ** 1.5  # meridional radius
        per_deg = math.radians(1.0)
        return float(math.sqrt(area * (per_deg * n * math.cos(phi)) * (per_deg * m)))
    unit = crs.linear_units_factor[1]
    gsd = math.sqrt(area) * unit
    if crs.to_dict().get("proj") == "merc":
        _lon, lat = _centre_lonlat(crs, transform, width, height)
        gsd *= math.cos(math.radians(lat))
    return float(gsd)


def footprint_wgs84(crs: Any, transform: tuple[float, ...], width: int, height: int) -> Any:
    """The raster's outline (8 points a side) as a shapely geometry in WGS84 lon/lat."""
    import numpy as np
    from rasterio.warp import transform_geom
    from shapely.geometry import shape

    a, b, c, d, e, f = transform
    steps = np.linspace(0.0, 1.0, 9)[:-1]
    cols = np.concatenate([steps * width, np.full(8, width), (1 - steps) * width, np.zeros(8)])
    rows = np.concatenate([np.zeros(8), steps * height, np.full(8, height), (1 - steps) * height])
    ring = [(float(a * x + b * y + c), float(d * x + e * y + f)) for x, y in zip(cols, rows)]
    ring.append(ring[0])
    geom = transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    out = shape(geom)
    if out.is_empty or not out.is_valid:
        raise ValueError("the transformed outline is empty or invalid")
    return out


# --- the catalogue ------------------------------------------------------------------------


def _listing_rows(path: str) -> list[dict[str, Any]]:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        text = f.read().decode("utf-8-sig")
    base = posixpath.dirname(path)
    if path.lower().endswith(".json"):
        doc = json.loads(text)
        rows = doc.get("rasters", []) if isinstance(doc, dict) else doc
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    out = []
    for row in rows:
        row = {k: v for k, v in dict(row).items() if v not in (None, "")}
        p = str(row.get("path", ""))
        if p and "://" not in p and not p.startswith("/"):
            row["path"] = posixpath.join(base, p)  # relative to the listing
        out.append(row)
    return out


def _glob_rows(pattern: str) -> list[dict[str, Any]]:
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    return [{"path": p} for p in paths]


def _parse_bands(value: Any) -> tuple[int, int, int]:
    parts = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    bands = tuple(int(v) for v in parts)
    if len(bands) != 3 or min(bands) < 1:
        raise ValueError(f"bands must be three 1-based ints, got {value!r}")
    return bands  # type: ignore[return-value]


def _year_from_tags(tags: dict[str, str]) -> int | None:
    stamp = tags.get("TIFFTAG_DATETIME") or tags.get("ACQUISITION_DATE") or ""
    head = stamp[:4]
    return int(head) if head.isdigit() else None


def describe(row: dict[str, Any], table: dict[str, dict[str, Any]]
             ) -> RasterInfo | CatalogueProblem:
    """One listing row (``path`` and maybe ``collection``, ``year``, ``bands``, ``scale``) →
    its :class:`RasterInfo`, or a :class:`CatalogueProblem`."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    path = str(row.get("path", ""))
    if not path:
        return CatalogueProblem(path, "unreadable", f"listing row without a path: {row!r}"[:200])
    name = row.get("collection")
    if name is None:
        parent = posixpath.basename(posixpath.dirname(path))
        name = parent if parent in table else DEFAULT_COLLECTION
    elif name not in table:
        return CatalogueProblem(path, "unknown_collection", f"collection {name!r}")
    spec = table[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(gdal_path(path)) as src:
                crs, tr = src.crs, tuple(float(v) for v in tuple(src.transform)[:6])
                width, height, count = src.width, src.height, src.count
                dtype, nodata, tags = src.dtypes[0], src.nodata, src.tags()
    except Exception as e:  # noqa: BLE001 — any GDAL/filesystem error: a counted problem
        return CatalogueProblem(path, "unreadable", f"{type(e).__name__}: {e}"[:200])
    if crs is None:
        return CatalogueProblem(path, "no_crs", "the raster is not georeferenced")
    try:
        bands = _parse_bands(row["bands"]) if "bands" in row else _parse_bands(spec["rgb_bands"])
        year = int(row["year"]) if "year" in row else _year_from_tags(tags)
        stretch = dict(spec.get("stretch", {"kind": "auto"}))
        if "scale" in row:
            stretch = {"kind": "linear", "min": 0.0, "max": float(row["scale"])}
    except (TypeError, ValueError) as e:
        return CatalogueProblem(path, "unreadable", f"bad listing row: {e}"[:200])
    if max(bands) > count:
        return CatalogueProblem(path, "band_missing", f"bands {bands} but {count} band(s)")
    try:
        gsd = ground_sample_distance(crs, tr, width, height)
        footprint = footprint_wgs84(crs, tr, width, height)
    except Exception as e:  # noqa: BLE001 — PROJ errors: outside the CRS's domain
        return CatalogueProblem(path, "footprint_invalid", f"{type(e).__name__}: {e}"[:200])
    return RasterInfo(path=path, collection=name, year=year, crs=crs_name(crs) or "",
                      transform=tr, width=width, height=height, count=count, dtype=dtype,
                      gsd_m=gsd, nodata=None if nodata is None else float(nodata),
                      bands=bands, stretch=stretch, footprint=footprint)


def catalogue_rows(glob_or_listing: str) -> list[dict[str, Any]]:
    """The listing rows of a ``.csv``/``.json`` listing, or ``{"path"}`` rows of a glob."""
    if glob_or_listing.lower().endswith((".csv", ".json")):
        return _listing_rows(glob_or_listing)
    return _glob_rows(glob_or_listing)


def catalogue(glob_or_listing: str, collections: dict[str, dict[str, Any]] | str | None = None
              ) -> tuple[list[RasterInfo], list[CatalogueProblem]]:
    """``(rasters, problems)`` of a glob of GeoTIFF/COG files or a ``.csv``/``.json`` listing.

    ``collections``: the collections table, a path to one, or None for the packaged table.
    Both lists are sorted by path; every listed file is in exactly one of them."""
    table = collections if isinstance(collections, dict) else load_collections(collections)
    rows = catalogue_rows(glob_or_listing)
    infos: list[RasterInfo] = []
    problems: list[CatalogueProblem] = []
    for row in rows:
        out = describe(row, table)
        (infos if isinstance(out, RasterInfo) else problems).append(out)
    infos.sort(key=lambda r: r.path)
    problems.sort(key=lambda p: p.path)
    return infos, problems


# --- the index ----------------------------------------------------------------------------


def as_geometry(geometry: Any) -> Any:
    """A shapely geometry from a shapely geometry or a GeoJSON-like mapping."""
    from shapely.geometry import shape
    from shapely.geometry.base import BaseGeometry

    return geometry if isinstance(geometry, BaseGeometry) else shape(geometry)


class RasterIndex:
    """A spatial index over the WGS84 footprints of catalogued rasters."""

    def __init__(self, infos: list[RasterInfo], gsd_tolerance: float = GSD_TOLERANCE) -> None:
        from shapely import STRtree

        self.infos = list(infos)
        self.gsd_tolerance = gsd_tolerance
        self._tree = STRtree([r.footprint for r in self.infos])

    def __len__(self) -> int:
        return len(self.infos)

    def candidates(self, geometry_wgs84: Any, max_gsd: float) -> list[RasterInfo]:
        """Rasters whose footprint contains ``geometry_wgs84`` (lon/lat) and whose GSD is at
        most ``max_gsd`` (metres, within :data:`GSD_TOLERANCE`): coarsest first, then the
        newest year, then collection and path."""
        geom = as_geometry(geometry_wgs84)
        if geom.is_empty or not self.infos:
            return []
        limit = float(max_gsd) * (1.0 + self.gsd_tolerance)
        hits = [self.infos[int(i)] for i in self._tree.query(geom, predicate="within")]
        hits = [r for r in hits if r.gsd_m <= limit]
        hits.sort(key=lambda r: (-r.gsd_m, -(r.year if r.year is not None else -10**6),
                                 r.collection, r.path))
        return hits

    def touching(self, geometry_wgs84: Any) -> list[RasterInfo]:
        """Rasters whose footprint intersects ``geometry_wgs84``, in path order (any GSD)."""
        geom = as_geometry(geometry_wgs84)
        if geom.is_empty or not self.infos:
            return []
        found = sorted(int(i) for i in self._tree.query(geom, predicate="intersects"))
        return [self.infos[i] for i in found]


# --- the catalogue in a pipeline ----------------------------------------------------------


def problem_row(problem: CatalogueProblem, subset: str) -> dict[str, Any]:
    """The reject row of a raster the catalogue cannot use."""
    record = new_record(subset, SOURCE, f"raster:{problem.path}", problem.path)
    return reject_row(record, Reject(STAGE, problem.reason, problem.detail))


class _ListRasters(beam.DoFn):
    def process(self, spec: str) -> Iterator[dict[str, Any]]:
        rows = catalogue_rows(spec)
        if not rows:
            raise FileNotFoundError(f"{spec}: no raster matches (imagery glob or listing)")
        yield from rows


class _Describe(beam.DoFn):
    def __init__(self, table: dict[str, dict[str, Any]], subset: str) -> None:
        self.table = table
        self.subset = subset

    def process(self, row: dict[str, Any]) -> Iterator[Any]:
        out = describe(row, self.table)
        if isinstance(out, RasterInfo):
            beam.metrics.Metrics.counter("Catalogue", "rasters").inc()
            yield out
        else:
            beam.metrics.Metrics.counter("Catalogue", out.reason).inc()
            yield beam.pvalue.TaggedOutput(REJECTS, problem_row(out, self.subset))


class Catalogue(beam.PTransform):
    """Imagery globs/listings (comma-separated) → ``{"records": RasterInfo per usable raster,
    "rejects": a reject row per unusable one}``, listed and described on the workers."""

    def __init__(self, specs: str, subset: str,
                 collections: dict[str, dict[str, Any]] | str | None = None) -> None:
        super().__init__()
        self.specs = [s.strip() for s in str(specs).split(",") if s.strip()]
        if not self.specs:
            raise ValueError(f"no imagery glob or listing in {specs!r}")
        self.subset = subset
        self.table = collections if isinstance(collections, dict) else \
            load_collections(collections)

    def expand(self, pbegin: Any) -> Any:
        out = (pbegin
               | "Specs" >> beam.Create(self.specs)
               | "List" >> beam.ParDo(_ListRasters())
               | "Spread" >> beam.Reshuffle()
               | "Describe" >> beam.ParDo(_Describe(self.table, self.subset)).with_outputs(
                   REJECTS, main=MAIN))
        return {MAIN: out[MAIN], REJECTS: out[REJECTS]}
