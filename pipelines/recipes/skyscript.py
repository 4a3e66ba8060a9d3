"""SkyScript: OpenStreetMap objects × georeferenced imagery → GSD-aware tiles → tag captions.

    read OSM extracts (objects whose tags the tag table knows) + catalogue the imagery (on the
    workers) → unique ids → each object to the coarsest raster fine enough for its tags →
    keyed by raster: cut a seeded window around each object, read it (one open per raster),
    list the other objects in it → focus + multi-object captions → decode → the shared tail
    (embed, CLIP filter top p% per source, decontaminate, semantic dedup) → shards/skyscript-*

``make build-skyscript OSM='extracts/*.osm.pbf' IMAGERY='imagery/*/*.tif' OUTPUT=…``;
``--imagery`` also takes a CSV/JSON listing (path, collection, year, bands, scale). Inputs,
rules and rejects: :mod:`pipelines.sources.osm` (extracts, the tag table, how to cut a region
into extracts with ``osmium extract``), :mod:`pipelines.sources.imagery` (the catalogue, GSD,
collections), :mod:`pipelines.stages.tiles` (windows) and :mod:`pipelines.stages.osm_tiles`
(the keyed cut, overlay, captions). One subset, ``skyscript``; the source of every kept row is
``osm``. Tiles are not deduplicated by content: two objects close together share pixels by
design (SkyScript keeps both; their captions differ); an object in two extracts is kept once.

SkyScript kept the top 20-50% of its pairs by CLIP similarity: ``--clip_top_percent 30`` (the
kit's filter, per source) with a trained ``--clip_model``.
"""

from __future__ import annotations

import argparse
from typing import Any

import apache_beam as beam

from pipelines.recipes import kit
from pipelines.stages.unique_keys import UniqueKeys


class _ReadObjects(beam.PTransform):
    """The OSM objects, with the OSM and catalogue rejects as the read's rejects."""

    def __init__(self, osm: beam.PTransform, catalogue_rejects: beam.PCollection) -> None:
        super().__init__()
        self.osm = osm
        self.catalogue_rejects = catalogue_rejects

    def expand(self, pbegin: Any) -> Any:
        from pipelines.records import MAIN, REJECTS

        out = pbegin | "Osm" >> self.osm
        rejects = (out[REJECTS], self.catalogue_rejects) | "Rejects" >> beam.Flatten()
        return {MAIN: out[MAIN], REJECTS: rejects}


class SkyScriptHead(kit.Head):
    """OSM objects cut from georeferenced imagery, captioned from their tags."""

    subset = "skyscript"
    title = "OSM objects × georeferenced imagery (--osm GLOB --imagery GLOB|LISTING)"
    priority = kit.PRIORITY_ARCHIVE
    dedups_content = True  # see the module docstring: tiles of neighbours share pixels
    caption_kinds = ("osm_tags",)

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("skyscript: OSM objects and imagery")
        g.add_argument("--osm", help="OSM extracts: .osm.pbf/.osm/.osm.bz2 globs, "
                       "comma-separated (local, gs://, s3://)")
        g.add_argument("--imagery", help="GeoTIFF/COG globs or CSV/JSON listings (path, "
                       "collection, year, bands, scale), comma-separated; any CRS")
        g.add_argument("--skyscript_subset", default="skyscript",
                       help="subset name (default %(default)s)")
        g.add_argument("--tag_table", help="tag table JSON (default: the bundled "
                       "skyscript_tags.json)")
        g.add_argument("--collections", help="collections table JSON: RGB bands and stretch "
                       "per collection (default: the bundled skyscript_collections.json)")
        g.add_argument("--osm_repair", type=kit.as_bool, default=False,
                       help="repair invalid polygons (shapely make_valid) instead of "
                       "rejecting them (default false)")
        g.add_argument("--osm_max_bytes", type=int, default=8 << 30,
                       help="byte cap per extract (default 8 GiB)")
        g.add_argument("--tile_min_px", type=int, help="smallest window side in raster pixels "
                       "(default image_size/4: a small polygon's padded box is its tile)")
        g.add_argument("--tile_max_px", type=int, help="largest window side in raster pixels; "
                       "a bigger polygon is object_too_large (default 4 x image_size)")
        g.add_argument("--tile_point_px", type=int, help="window side for points and lines "
                       "(default image_size: the raster's own resolution)")
        g.add_argument("--tile_pad", type=float, default=0.1,
                       help="a polygon's box grows by this share (default %(default)s)")
        g.add_argument("--tile_max_shift", type=float, default=0.25,
                       help="seeded random shift, share of the side (default %(default)s)")
        g.add_argument("--tile_max_nodata", type=float, default=0.5,
                       help="reject a tile with more no-data than this share (default "
                       "%(default)s)")
        g.add_argument("--overlay", type=kit.as_bool, default=True,
                       help="list the other objects in each tile (the multi-object caption; "
                       "default true)")
        g.add_argument("--overlay_max_groups", type=int, default=5,
                       help="object groups named in the multi-object caption (default "
                       "%(default)s)")

    def subset_name(self, cfg: dict[str, Any]) -> str:
        return cfg.get("skyscript_subset") or self.subset

    def given(self, cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("osm"))

    def resolve(self, cfg: dict[str, Any]) -> None:
        from pipelines.sources.imagery import load_collections
        from pipelines.sources.osm import TagTable

        if not cfg.get("imagery"):
            raise SystemExit("skyscript: --osm needs --imagery (GeoTIFF/COG globs or a listing)")
        try:
            TagTable.load(cfg.get("tag_table"))
            load_collections(cfg.get("collections"))
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"skyscript: unusable table: {e}") from None

    def expand(self, p: beam.Pipeline, cfg: dict[str, Any]) -> kit.Branch:
        from pipelines.sources.imagery import Catalogue, load_collections
        from pipelines.sources.osm import ReadOsm, TagTable
        from pipelines.stages.images import Decode
        from pipelines.stages.osm_tiles import CutTiles, TileConfig

        subset = self.subset_name(cfg)
        table = TagTable.load(cfg.get("tag_table"))
        rasters = p | f"Catalogue[{subset}]" >> Catalogue(
            cfg["imagery"], subset, load_collections(cfg.get("collections")))
        osm = ReadOsm(cfg["osm"], subset, table, repair=cfg["osm_repair"],
                      max_bytes=cfg["osm_max_bytes"])
        b = kit.Branch.read(p, subset, "Read", _ReadObjects(osm, rasters["rejects"]))
        b.apply("UniqueIds", UniqueKeys())
        tile = TileConfig(out_px=cfg["image_size"], min_size_px=cfg.get("tile_min_px"),
                          max_size_px=cfg.get("tile_max_px"),
                          point_size_px=cfg.get("tile_point_px"), pad=cfg["tile_pad"],
                          max_shift=cfg["tile_max_shift"], max_nodata=cfg["tile_max_nodata"],
                          overlay=cfg["overlay"], max_groups=cfg["overlay_max_groups"])
        b.apply("Tiles", CutTiles(rasters["records"], table, tile))
        b.apply("Decode", Decode(kit.image_config(cfg)))
        return b


RECIPE = kit.Recipe("skyscript", __doc__ or "", [SkyScriptHead()], "out/skyscript")

run, main = RECIPE.run, RECIPE.main  # the entry points (tests call run(argv))


if __name__ == "__main__":
    main()
