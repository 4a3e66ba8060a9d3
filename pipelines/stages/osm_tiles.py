"""OSM objects → captioned tiles: the SkyScript head's Beam stage (``CutTiles``).

    objects ──Assign (side input: the catalogue)──┬─ (raster, object)   the focus objects
                                                  └─ (raster, context)  every raster it touches
        → CoGroupByKey on the raster path → Cut: open the raster once, and per focus object
          plan the window, read it, list the other objects in it, caption

- **Assign** (:func:`pipelines.stages.tiles.assign_raster`): the coarsest raster fine enough
  for the object's tags (``_max_gsd``), or ``no_imagery``. Every object also goes, as
  *context*, to every catalogued raster whose footprint it touches, so the overlay sees the
  objects around a tile whatever raster they were cut from (or whether they were cut at all:
  an object too fine for any raster is still on the ground).
- **Cut**, keyed by raster so a worker opens each file once and reads windows (as COGs
  want): focus objects in key order, each with a generator seeded by its key
  (:func:`pipelines.records.stable_hash`), so the window and the PNG bytes never depend on the
  runner. :func:`~pipelines.stages.tiles.plan_tile` and :func:`~pipelines.stages.tiles.read_tile`
  do the work; their rejects are counted at stage ``tile``.
- **Overlay**: the other objects whose geometry, in the raster's pixels, intersects the tile's
  square (shapely ``STRtree``), sorted by id: ``other_ids`` and ``other_tags``.
- **Captions** (:mod:`pipelines.stages.osm_captions`): ``caption`` (``txt``) is the focus
  caption, ``captions`` the focus caption then the multi-object one (``gabled roof building,
  surrounded by 2 residential roads and a parking lot``) when it differs.

A tile record carries ``_body`` (PNG, ``out_px`` square, for the decode stage), the focus
object's box in tile pixels (``boxes``, labelled by its caption; a line's box is the part
inside the tile), the tile's WGS84 ``bbox`` and centre ``lat``/``lon``, the raster's ``crs``
and ``collection``, ``acquired`` (the raster's year), and ``gsd_m``: the GSD of the written
tile (the raster's GSD times window side / ``out_px``). ``extra`` (JSON) names the raster
and the window (``col_off``, ``row_off``, ``size`` in its pixels) and the no-data share.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines.records import MAIN, REJECTS, Reject, reject_row, stable_hash
from pipelines.sources.imagery import RasterIndex, RasterInfo, gdal_path
from pipelines.sources.osm import TagTable
from pipelines.stages import tiles
from pipelines.stages.osm_captions import focus_caption, multi_caption

log = logging.getLogger(__name__)

STAGE = tiles.STAGE
CONTEXT = "context"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    out_px: int = tiles.DEFAULT_OUT_PX
    min_size_px: int | None = None
    max_size_px: int | None = None
    point_size_px: int | None = None
    pad: float = tiles.DEFAULT_PAD
    max_shift: float = tiles.DEFAULT_MAX_SHIFT
    max_nodata: float = tiles.DEFAULT_MAX_NODATA
    overlay: bool = True
    max_groups: int = 5


def _geometry(record: dict[str, Any]) -> Any:
    import shapely.wkb

    return shapely.wkb.loads(record["_geometry_wkb"])


class _Index:
    """The catalogue side input by path, and as a :class:`RasterIndex` when asked (each
    built once per side-input value)."""

    def __init__(self) -> None:
        self._seen: int | None = None
        self._index: RasterIndex | None = None
        self.by_path: dict[str, RasterInfo] = {}

    def paths(self, infos: list[RasterInfo]) -> dict[str, RasterInfo]:
        if self._seen != id(infos):
            self.by_path = {r.path: r for r in sorted(infos, key=lambda r: r.path)}
            self._index, self._seen = None, id(infos)
        return self.by_path

    def get(self, infos: list[RasterInfo]) -> RasterIndex:
        by_path = self.paths(infos)
        if self._index is None:
            self._index = RasterIndex(list(by_path.values()))
        return self._index


class _Assign(beam.DoFn):
    def __init__(self, overlay: bool) -> None:
        self.overlay = overlay
        self._index = _Index()

    def process(self, record: dict[str, Any], infos: list[RasterInfo]) -> Iterator[Any]:
        index = self._index.get(infos)
        geom = _geometry(record)
        found = tiles.assign_raster({"geometry": geom, "max_gsd_m": record["_max_gsd"]}, index)
        if isinstance(found, Reject):
            beam.metrics.Metrics.counter(STAGE, found.reason).inc()
            yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, found))
        else:
            yield found.path, record
        if not self.overlay:
            return
        context = {"key": record["key"], "source_id": record["source_id"],
                   "tags": dict(record.get("tags") or {}), "wkb": record["_geometry_wkb"]}
        for raster in index.touching(geom):
            yield beam.pvalue.TaggedOutput(CONTEXT, (raster.path, context))


def _window_box(window: tiles.TileWindow) -> Any:
    from shapely.geometry import box

    return box(window.col_off, window.row_off, window.col_off + window.size,
               window.row_off + window.size)


def _tile_geo(raster: RasterInfo, window: tiles.TileWindow
              ) -> tuple[list[float], float, float]:
    """The tile's WGS84 ``[west, south, east, north]`` and its centre's lat, lon."""
    from affine import Affine
    from rasterio.warp import transform, transform_bounds

    tr = Affine(*raster.transform)
    x0, y0 = tr @ (window.col_off, window.row_off)
    x1, y1 = tr @ (window.col_off + window.size, window.row_off + window.size)
    bounds = transform_bounds(raster.crs, "EPSG:4326", min(x0, x1), min(y0, y1), max(x0, x1),
                              max(y0, y1), densify_pts=8)
    cx, cy = tr @ (window.col_off + window.size / 2.0, window.row_off + window.size / 2.0)
    lons, lats = transform(raster.crs, "EPSG:4326", [cx], [cy])
    return [round(float(v), 7) for v in bounds], round(float(lats[0]), 7), \
        round(float(lons[0]), 7)


class _Context:
    """The objects on one raster, in its pixels, for the overlay."""

    def __init__(self, raster: RasterInfo, contexts: Iterable[dict[str, Any]]) -> None:
        import shapely.wkb
        from shapely import STRtree

        self.items: list[tuple[dict[str, Any], Any]] = []
        seen: set[str] = set()
        for ctx in sorted(contexts, key=lambda c: c["source_id"]):
            if ctx["key"] in seen:
                continue
            seen.add(ctx["key"])
            try:
                pix = tiles.to_pixels(shapely.wkb.loads(ctx["wkb"]), raster)
            except Exception as e:  # noqa: BLE001 — outside the CRS's domain: not on it
                log.debug("overlay: %s not on %s: %s", ctx["source_id"], raster.path, e)
                continue
            self.items.append((ctx, pix))
        self.tree = STRtree([pix for _, pix in self.items])

    def around(self, window: tiles.TileWindow, focus_key: str) -> list[dict[str, Any]]:
        square = _window_box(window)
        hits = sorted(int(i) for i in self.tree.query(square, predicate="intersects"))
        return [self.items[i][0] for i in hits if self.items[i][0]["key"] != focus_key]


class _Cut(beam.DoFn):
    def __init__(self, table: TagTable, cfg: TileConfig) -> None:
        self.table = table
        self.cfg = cfg
        self._index = _Index()

    def process(self, element: tuple[str, dict[str, Iterable[Any]]], infos: list[RasterInfo]
                ) -> Iterator[Any]:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        path, groups = element
        focus = sorted(groups.get(MAIN) or [], key=lambda r: r["key"])
        if not focus:
            return
        raster = self._index.paths(infos)[path]
        context = _Context(raster, groups.get(CONTEXT) or []) if self.cfg.overlay else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                src = rasterio.open(gdal_path(path))
        except Exception as e:  # noqa: BLE001 — vanished or broken since the catalogue
            for record in focus:
                yield from self._reject(record, "raster_unreadable", f"{type(e).__name__}: {e}")
            return
        with src:
            for record in focus:
                yield from self._cut(record, raster, src, context)

    def _reject(self, record: dict[str, Any], reason: str, detail: str | None) -> Iterator[Any]:
        beam.metrics.Metrics.counter(STAGE, reason).inc()
        yield beam.pvalue.TaggedOutput(REJECTS, reject_row(
            record, Reject(STAGE, reason, (detail or "")[:500] or None)))

    def _cut(self, record: dict[str, Any], raster: RasterInfo, src: Any,
             context: _Context | None) -> Iterator[Any]:
        cfg = self.cfg
        rng = np.random.default_rng(stable_hash(record["key"]))
        window = tiles.plan_tile(_geometry(record), raster, rng, cfg.out_px, cfg.min_size_px,
                                 cfg.max_size_px, point_size_px=cfg.point_size_px, pad=cfg.pad,
                                 max_shift=cfg.max_shift)
        if isinstance(window, Reject):
            yield from self._reject(record, window.reason, window.detail)
            return
        try:
            read = tiles.read_tile(src, window, raster, cfg.out_px, cfg.max_nodata)
        except Exception as e:  # noqa: BLE001 — a corrupt block, a dropped connection
            yield from self._reject(record, "raster_unreadable", f"{type(e).__name__}: {e}")
            return
        if isinstance(read, Reject):
            yield from self._reject(record, read.reason, read.detail)
            return
        png, nodata_share, box = read
        beam.metrics.Metrics.counter(STAGE, "tiles").inc()
        yield tile_record(record, raster, window, png, nodata_share, box, self.table,
                          context.around(window, record["key"]) if context else [], cfg)


def tile_record(record: dict[str, Any], raster: RasterInfo, window: tiles.TileWindow,
                png: bytes, nodata_share: float, box: tuple[float, float, float, float],
                table: TagTable, others: list[dict[str, Any]], cfg: TileConfig
                ) -> dict[str, Any]:
    """The tile's record: the object's record plus image, captions, overlay and place."""
    tags = dict(record.get("tags") or {})
    focus = focus_caption(tags, table)
    multi = multi_caption(tags, [o["tags"] for o in others], table, max_groups=cfg.max_groups)
    bbox, lat, lon = _tile_geo(raster, window)
    x0, y0, x1, y1 = (min(max(v, 0.0), float(cfg.out_px)) for v in box)
    extra = json.loads(record.get("extra") or "{}")
    extra.update(raster=raster.path, window={"col_off": window.col_off,
                                             "row_off": window.row_off, "size": window.size},
                 nodata_share=round(nodata_share, 4))
    return {
        **record,
        "_body": png,
        "caption": focus,
        "captions": [focus] if multi == focus else [focus, multi],
        "caption_kind": "osm_tags",
        "other_ids": [o["source_id"] for o in others],
        "other_tags": [dict(o["tags"]) for o in others],
        "boxes": [{"label": focus, "x0": x0, "y0": y0, "x1": x1, "y1": y1}],
        "bbox": bbox,
        "lat": lat,
        "lon": lon,
        "crs": raster.crs,
        "gsd_m": round(raster.gsd_m * window.size / cfg.out_px, 4),
        "collection": raster.collection,
        "acquired": str(raster.year) if raster.year is not None else None,
        "extra": json.dumps(extra, sort_keys=True),
    }


class CutTiles(beam.PTransform):
    """Objects (``ReadOsm`` records) → tile records, given the catalogue's ``rasters``
    PCollection (:class:`pipelines.sources.imagery.Catalogue`)."""

    def __init__(self, rasters: beam.PCollection, table: TagTable, cfg: TileConfig) -> None:
        super().__init__()
        self.rasters = rasters
        self.table = table
        self.cfg = cfg

    def expand(self, records: beam.PCollection) -> Any:
        infos = beam.pvalue.AsList(self.rasters)
        assigned = records | "Assign" >> beam.ParDo(_Assign(self.cfg.overlay), infos).with_outputs(
            REJECTS, CONTEXT, main=MAIN)
        grouped = ({MAIN: assigned[MAIN], CONTEXT: assigned[CONTEXT]}
                   | "ByRaster" >> beam.CoGroupByKey())
        cut = grouped | "Cut" >> beam.ParDo(_Cut(self.table, self.cfg), infos).with_outputs(
            REJECTS, main=MAIN)
        rejects = (assigned[REJECTS], cut[REJECTS]) | "Rejects" >> beam.Flatten()
        return {MAIN: cut[MAIN], REJECTS: rejects}
