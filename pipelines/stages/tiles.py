"""Tiles: the SkyScript recipe's crop of one raster around one OSM object (stage ``"tile"``).

Pure functions (each callable in a REPL); the recipe wires them into Beam.

- :func:`assign_raster` / :func:`group_by_raster`: each object (a dict with a WGS84
  ``geometry`` and its tag's ``max_gsd_m``) goes to its first :meth:`RasterIndex.candidates`
  raster (the coarsest that still shows the tag). The recipe **keys work by raster path**
  (``beam.GroupByKey`` on the path, or this helper in a test) so a worker opens each file
  once and cuts all of its tiles. No fitting raster → ``no_imagery``.
- :func:`plan_tile`: the square window, in the raster's own pixels. The geometry is brought
  into the raster's CRS (``rasterio.warp.transform_geom``), then into pixel coordinates.
  Points: a window of ``point_size_px`` centred on the point; lines: centred on one of their
  nodes, drawn with ``rng``; polygons: their bounding box padded by ``pad`` and made square,
  the side clamped to ``[min_size_px, max_size_px]`` (``object_too_large`` when the box itself
  exceeds ``max_size_px``). Then a seeded random shift of at most ``max_shift`` of the side
  that keeps the object (a line: its chosen node) inside the window and the window inside
  the raster; when no window of that side can do both, ``off_raster``.
- :func:`read_tile`: a windowed read resampled to ``out_px`` x ``out_px`` (``out_shape``;
  average when shrinking, bilinear when enlarging), the collection's RGB bands and 8-bit
  stretch, nodata honoured (no-data pixels are black and counted); ``mostly_nodata`` when
  their share exceeds ``max_nodata``. It also returns the object's box in tile pixels so the
  caller can check it lies inside the tile.

Rejects (stage ``tile``): ``no_imagery``, ``off_raster``, ``mostly_nodata``,
``object_too_large``, ``geometry_invalid`` (empty, or not transformable into the CRS), and
``raster_unreadable`` (the raster, catalogued earlier, fails to open or to read a window).
Same inputs and the same seed → the same window and the same PNG bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from pipelines.records import Reject
from pipelines.sources.archives import encode_png, stretch_percentile
from pipelines.sources.imagery import RasterIndex, RasterInfo, as_geometry

STAGE = "tile"
REASONS = ("no_imagery", "off_raster", "mostly_nodata", "object_too_large", "geometry_invalid",
           "raster_unreadable")
DEFAULT_OUT_PX = 256
DEFAULT_MAX_NODATA = 0.5
DEFAULT_MAX_SHIFT = 0.25  # of the window's side
DEFAULT_PAD = 0.1  # a polygon's box grows by this share before it becomes the window


def _reject(reason: str, detail: str | None = None) -> Reject:
    return Reject(STAGE, reason, detail)


@dataclasses.dataclass(frozen=True)
class TileWindow:
    """A square window in the raster's pixels and where the object lies in it.

    ``object_box`` is ``(x0, y0, x1, y1)`` in the raster's pixel coordinates (column, row;
    pixel edges at integers): a polygon's bounding box, a point (zero size), or for a line
    the bounding box of the part inside the window. ``anchor`` is the point, the chosen node
    of a line, or the polygon box's centre."""

    col_off: int
    row_off: int
    size: int
    kind: str  # "point", "line", "polygon"
    object_box: tuple[float, float, float, float]
    anchor: tuple[float, float]

    def box_in_tile(self, out_px: int) -> tuple[float, float, float, float]:
        """``object_box`` in the pixels of the ``out_px`` x ``out_px`` tile."""
        s = out_px / self.size
        x0, y0, x1, y1 = self.object_box
        return ((x0 - self.col_off) * s, (y0 - self.row_off) * s,
                (x1 - self.col_off) * s, (y1 - self.row_off) * s)


# --- assigning objects to rasters ---------------------------------------------------------


def assign_raster(obj: dict[str, Any], index: RasterIndex, *, geometry_key: str = "geometry",
                  max_gsd_key: str = "max_gsd_m") -> RasterInfo | Reject:
    """The raster that serves ``obj`` (the coarsest fitting one), or ``no_imagery``."""
    found = index.candidates(obj[geometry_key], float(obj[max_gsd_key]))
    if not found:
        return _reject("no_imagery", f"no raster with gsd <= {obj[max_gsd_key]} m contains "
                                     "the object")
    return found[0]


def group_by_raster(objects: Iterable[dict[str, Any]], index: RasterIndex, *,
                    rejects: list[tuple[dict[str, Any], Reject]] | None = None,
                    geometry_key: str = "geometry", max_gsd_key: str = "max_gsd_m"
                    ) -> dict[str, list[tuple[dict[str, Any], RasterInfo]]]:
    """``{raster path: [(object, raster), ...]}`` in input order, paths sorted; objects with
    no imagery go to ``rejects`` (when given) as ``(object, Reject)``."""
    groups: dict[str, list[tuple[dict[str, Any], RasterInfo]]] = {}
    for obj in objects:
        out = assign_raster(obj, index, geometry_key=geometry_key, max_gsd_key=max_gsd_key)
        if isinstance(out, Reject):
            if rejects is not None:
                rejects.append((obj, out))
            continue
        groups.setdefault(out.path, []).append((obj, out))
    return dict(sorted(groups.items()))


# --- planning -----------------------------------------------------------------------------


def to_pixels(geometry_wgs84: Any, raster: RasterInfo) -> Any:
    """``geometry_wgs84`` (shapely or GeoJSON-like, lon/lat) in ``raster``'s pixel coordinates
    (column, row); ValueError when empty or outside the CRS's domain."""
    from affine import Affine
    from rasterio.warp import transform_geom
    from shapely import affinity
    from shapely.geometry import mapping, shape

    geom = as_geometry(geometry_wgs84)
    if geom.is_empty:
        raise ValueError("empty geometry")
    projected = shape(transform_geom("EPSG:4326", raster.crs, mapping(geom)))
    inv = ~Affine(*raster.transform)
    out = affinity.affine_transform(projected, [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f])
    coords = np.asarray(_coords(out), dtype=float)
    if out.is_empty or not np.isfinite(coords).all():
        raise ValueError("the geometry falls outside the raster CRS's domain")
    return out


def _coords(geom: Any) -> list[tuple[float, float]]:
    import shapely

    return [tuple(c) for c in shapely.get_coordinates(geom).tolist()]


def _offset(lo_obj: float, hi_obj: float, size: int, limit: int, centre: float,
            max_shift_px: float, rng: np.random.Generator) -> int | None:
    """An integer window offset keeping ``[lo_obj, hi_obj]`` inside ``[off, off + size]`` and
    the window inside ``[0, limit]``, within ``max_shift_px`` of centring ``centre``; the
    shift bound is dropped when it alone leaves no room. None when nothing fits."""
    lo = max(math.ceil(hi_obj - size), 0)
    hi = min(math.floor(lo_obj), limit - size)
    if lo > hi:
        return None
    centred = centre - size / 2.0
    slo = max(lo, math.ceil(centred - max_shift_px))
    shi = min(hi, math.floor(centred + max_shift_px))
    if slo <= shi:
        lo, hi = slo, shi
    return int(rng.integers(lo, hi + 1))


def plan_tile(geometry_wgs84: Any, raster: RasterInfo, rng: np.random.Generator | int,
              out_px: int = DEFAULT_OUT_PX, min_size_px: int | None = None,
              max_size_px: int | None = None, *, point_size_px: int | None = None,
              pad: float = DEFAULT_PAD, max_shift: float = DEFAULT_MAX_SHIFT
              ) -> TileWindow | Reject:
    """The window of ``raster`` (its own pixels) to cut for the object, or a Reject.

    ``rng``: a numpy Generator or a seed (the recipe seeds it from the sample key).
    Sizes are in the raster's pixels: ``min_size_px`` defaults to ``out_px // 4`` (a small
    polygon's padded box is its tile, as SkyScript's bounding box is),
    ``max_size_px`` to ``out_px * 4``, ``point_size_px`` (points and lines) to ``out_px``
    (the raster's native resolution), clamped into ``[min_size_px, max_size_px]``."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    min_px = out_px // 4 if min_size_px is None else int(min_size_px)
    max_px = out_px * 4 if max_size_px is None else int(max_size_px)
    if not 1 <= min_px <= max_px:
        raise ValueError(f"need 1 <= min_size_px <= max_size_px, got {min_px}, {max_px}")
    try:
        pix = to_pixels(geometry_wgs84, raster)
    except Exception as e:  # noqa: BLE001 — shapely/PROJ errors: a counted reject
        return _reject("geometry_invalid", f"{type(e).__name__}: {e}"[:200])
    gtype = pix.geom_type
    if gtype in ("Point", "MultiPoint", "LineString", "MultiLineString", "LinearRing"):
        kind = "point" if "Point" in gtype else "line"
        nodes = _coords(pix)
        ax, ay = nodes[0] if kind == "point" and len(nodes) == 1 else \
            nodes[int(rng.integers(len(nodes)))]
        size = min(max(point_size_px or out_px, min_px), max_px)
        inside = (ax, ay, ax, ay)
    elif gtype in ("Polygon", "MultiPolygon"):
        kind = "polygon"
        x0, y0, x1, y1 = pix.bounds
        side = max(x1 - x0, y1 - y0)
        if side > max_px:
            return _reject("object_too_large", f"the object spans {side:.0f} px > max_size_px "
                                               f"{max_px}")
        size = min(max(math.ceil(side * (1.0 + pad)), math.ceil(side), min_px), max_px)
        ax, ay = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        inside = (x0, y0, x1, y1)
    else:
        return _reject("geometry_invalid", f"unsupported geometry type {gtype}")
    shift = max_shift * size
    col = _offset(inside[0], inside[2], size, raster.width, ax, shift, rng)
    row = _offset(inside[1], inside[3], size, raster.height, ay, shift, rng)
    if col is None or row is None:
        return _reject("off_raster", f"no {size} px window inside the {raster.width}x"
                                     f"{raster.height} raster holds the object")
    if kind == "line":
        from shapely.geometry import box

        part = pix.intersection(box(col, row, col + size, row + size))
        object_box = tuple(float(v) for v in (part.bounds if not part.is_empty else inside))
    else:
        object_box = tuple(float(v) for v in inside)
    return TileWindow(col_off=col, row_off=row, size=size, kind=kind,
                      object_box=object_box,  # type: ignore[arg-type]
                      anchor=(float(ax), float(ay)))


# --- reading ------------------------------------------------------------------------------


def to_8bit(bands: np.ndarray, valid: np.ndarray, stretch: dict[str, Any], dtype: str
            ) -> np.ndarray:
    """(3, H, W) values → (H, W, 3) uint8 by the collection's ``stretch``; invalid pixels 0."""
    kind = stretch.get("kind", "auto")
    if kind == "auto":
        kind = "none" if dtype == "uint8" else "percentile"
    arr = np.asarray(bands, dtype=np.float64)
    if kind == "percentile":
        pct = (float(stretch.get("low", 2.0)), float(stretch.get("high", 98.0)))
        out = stretch_percentile(np.where(valid[None], arr, 0.0), pct)
    else:
        if kind == "linear":
            lo, hi = float(stretch["min"]), float(stretch["max"])
            arr = (arr - lo) / (hi - lo) * 255.0
        out = np.rint(np.clip(arr, 0.0, 255.0)).astype(np.uint8).transpose(1, 2, 0)
    return np.where(valid[..., None], out, 0).astype(np.uint8)


def read_tile(src: Any, window: TileWindow, raster: RasterInfo, out_px: int = DEFAULT_OUT_PX,
              max_nodata: float = DEFAULT_MAX_NODATA
              ) -> tuple[bytes, float, tuple[float, float, float, float]] | Reject:
    """``(png_bytes, nodata_share, box_in_tile_pixels)`` of ``window`` read from the open
    rasterio dataset ``src`` (the file ``raster`` describes), or ``mostly_nodata``."""
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    win = Window(window.col_off, window.row_off, window.size, window.size)
    resampling = Resampling.average if window.size > out_px else Resampling.bilinear
    bands = list(raster.bands)
    data = src.read(bands, window=win, out_shape=(3, out_px, out_px), resampling=resampling)
    masks = src.read_masks(bands, window=win, out_shape=(3, out_px, out_px),
                           resampling=Resampling.nearest)
    valid = np.all(masks > 0, axis=0)
    if raster.nodata is not None and src.nodata is None:  # the catalogue knew better
        valid &= np.all(data != raster.nodata, axis=0)
    share = float(1.0 - valid.mean())
    if share > max_nodata:
        return _reject("mostly_nodata", f"{share:.2f} of the tile is no-data > {max_nodata}")
    rgb = to_8bit(data, valid, raster.stretch, raster.dtype)
    # uncompressed: the tile goes straight to the decode stage, fused in the same worker
    return encode_png(rgb, compress_level=0), share, window.box_in_tile(out_px)
