"""``make perf-skyscript``: how fast the SkyScript head reads OSM and cuts tiles, and where the
time goes, measured on the pure functions the recipe's stages call (one process, no Beam).

    python -m pipelines.perf.skyscript --osm 'extracts/*' --imagery 'imagery/*/*.tif'
        [--out-px 256] [--rounds 3]

Prints, per phase (medians of the rounds): OSM reading (objects/s, pyosmium), the imagery
catalogue (rasters/s: headers only), assigning objects to rasters (STRtree), and cutting
(plan + windowed read + PNG encode, one open per raster: tiles/s), and each phase's share of
the total. The Makefile target builds the demo world's place first and measures it.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any


def measure(osm_glob: str, imagery: str, out_px: int = 256) -> dict[str, Any]:
    import numpy as np
    import rasterio
    import shapely.wkb
    from apache_beam.io.filesystems import FileSystems
    from rasterio.errors import NotGeoreferencedWarning

    from pipelines.records import Reject, make_key, stable_hash
    from pipelines.sources.imagery import RasterIndex, catalogue, gdal_path
    from pipelines.sources.osm import TagTable, read_osm_objects
    from pipelines.stages import tiles

    table = TagTable.load()
    t0 = time.perf_counter()
    objects = []
    for m in sorted(x.path for x in FileSystems.match([osm_glob])[0].metadata_list):
        try:
            objects += read_osm_objects(m, table).objects
        except Exception:  # noqa: BLE001, S112 — a broken extract: the recipe counts it
            continue
    t1 = time.perf_counter()
    infos, problems = catalogue(imagery)
    index = RasterIndex(infos)
    t2 = time.perf_counter()
    by_raster: dict[str, list[Any]] = {}
    for o in objects:
        geom = shapely.wkb.loads(o.wkb)
        found = index.candidates(geom, o.max_gsd)
        if found:
            by_raster.setdefault(found[0].path, []).append((o, geom, found[0]))
    t3 = time.perf_counter()
    n_tiles = 0
    for path in sorted(by_raster):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(gdal_path(path)) as src:
                for o, geom, raster in by_raster[path]:
                    rng = np.random.default_rng(stable_hash(make_key("osm", o.source_id)))
                    window = tiles.plan_tile(geom, raster, rng, out_px)
                    if isinstance(window, tiles.TileWindow):
                        out = tiles.read_tile(src, window, raster, out_px)
                        n_tiles += not isinstance(out, Reject)
    t4 = time.perf_counter()
    return {"objects": len(objects), "rasters": len(infos) + len(problems),
            "tiles": n_tiles, "osm_s": t1 - t0, "catalogue_s": t2 - t1,
            "assign_s": t3 - t2, "cut_s": t4 - t3}


def report(runs: list[dict[str, Any]]) -> str:
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("osm_s", "catalogue_s", "assign_s", "cut_s")}
    total = sum(med.values())
    first = runs[0]
    rows = [
        ("OSM read (pyosmium)", med["osm_s"], f"{first['objects'] / med['osm_s']:.0f} objects/s"),
        ("imagery catalogue", med["catalogue_s"],
         f"{first['rasters'] / med['catalogue_s']:.0f} rasters/s"),
        ("assign (STRtree)", med["assign_s"],
         f"{first['objects'] / max(med['assign_s'], 1e-9):.0f} objects/s"),
        ("cut (plan + read + PNG)", med["cut_s"], f"{first['tiles'] / med['cut_s']:.0f} tiles/s"),
    ]
    lines = [(f"{first['objects']} objects, {first['rasters']} rasters, {first['tiles']} tiles; "
             f"medians of {len(runs)} rounds, one process"),
             f"{'phase':<26}{'seconds':>9}{'share':>8}  rate"]
    for name, sec, rate in rows:
        lines.append(f"{name:<26}{sec:>9.3f}{sec / total:>8.0%}  {rate}")
    lines.append(f"{'total':<26}{total:>9.3f}{1:>8.0%}  "
                 f"{first['objects'] / total:.0f} objects/s, {first['tiles'] / total:.0f} tiles/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--osm", required=True, help="OSM extract glob")
    ap.add_argument("--imagery", required=True, help="imagery glob or listing")
    ap.add_argument("--out-px", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    runs = [measure(a.osm, a.imagery, a.out_px) for _ in range(a.rounds)]
    print(report(runs))


if __name__ == "__main__":
    main()
