"""End to end: the SkyScript recipe on the demo world's place (OSM extracts written with
pyosmium, mosaics in UTM and Web Mercator at two GSDs, planted bad input).

One world and one DirectRunner build are shared by the module; the tests check the build's
promises against the world's ground truth: accounting, where every object ends, tiles that
contain their object in both CRSs, captions and the overlay, determinism and translation.
"""

from __future__ import annotations

import io
import json
import os

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import shapely.wkt
from affine import Affine
from PIL import Image
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape

from pipelines.demo import scoring
from pipelines.demo.recipes import recipe_args
from pipelines.demo.skyscript import build_skyscript
from pipelines.demo.tiny_models import build_tiny_clip
from pipelines.recipes import skyscript
from pipelines.sources.imagery import catalogue
from pipelines.sources.osm import TagTable
from pipelines.stages import tiles
from pipelines.stages.osm_captions import focus_caption

pytestmark = pytest.mark.slow

OUT_PX = 256


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("skyworld")
    build_skyscript(str(root), seed=5)
    build_tiny_clip(str(root / "models" / "tiny-clip"), seed=5)
    return root


def run_build(root, out, *extra):
    return skyscript.run([*recipe_args(str(root), "skyscript"), "--output", str(out),
                          "--samples_per_shard", "40", *extra])


@pytest.fixture(scope="module")
def build(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("skyout")
    return out, run_build(world, out)


def _truth(world):
    return pq.read_table(str(world / "skyscript_truth.parquet")).to_pylist()


def _index(out):
    return pq.read_table(str(out / "index")).to_pylist()


@pytest.fixture(scope="module")
def rasters(world):
    infos, _ = catalogue(str(world / "skyscript" / "imagery" / "*" / "*.tif"))
    return {r.path: r for r in infos}


def _pixels(geom_wgs84, raster):
    """The geometry in the raster's pixels, computed here (rasterio + affine), not by tiles."""
    projected = shape(transform_geom("EPSG:4326", raster.crs, mapping(geom_wgs84)))
    inv = ~Affine(*raster.transform)
    return shapely.affinity.affine_transform(projected, [inv.a, inv.b, inv.d, inv.e, inv.c,
                                                          inv.f])


def _window(row):
    extra = json.loads(row["extra"])
    w = extra["window"]
    return extra["raster"], w["col_off"], w["row_off"], w["size"]


def test_accounting_and_every_object_where_the_ground_truth_says(world, build):
    out, stats = build
    assert stats["subsets"] == ["skyscript"]
    assert stats["input"] == stats["kept"] + stats["rejected"] + stats["duplicates"]
    rows = scoring.outcomes(str(out), str(world))
    assert rows and all(r["outcome"] is not None for r in rows), "a truth row vanished"
    bad = scoring.mismatches(rows)
    assert not bad, scoring.report(str(out), str(world))
    reasons = {(r["got_stage"], r["got_reason"]) for r in rows if r["outcome"] == "rejected"}
    assert {("read", "osm_file_unreadable"), ("read", "missing_nodes"),
            ("read", "invalid_geometry"), ("read", "duplicate_id"), ("imagery", "no_crs"),
            ("tile", "mostly_nodata"), ("tile", "no_imagery")} <= reasons
    assert any(r["outcome"] == "not_read" for r in rows)  # unknown tags only
    kept = [r for r in rows if r["outcome"] == "kept"]
    assert len(kept) >= 60


def test_every_tile_contains_its_drawn_object_in_both_crss(world, build, rasters):
    out, _ = build
    truth = {t["source_id"]: t for t in _truth(world) if t["expected"] == "kept"}
    crss = set()
    for r in _index(out):
        path, col, row, size = _window(r)
        raster = rasters[path]
        assert r["crs"] == raster.crs and r["collection"] == raster.collection
        t = truth[r["source_id"]]
        assert os.path.basename(path) == t["raster"]
        geom = _pixels(shapely.wkt.loads(t["geometry_wkt"]), raster)
        x0, y0, x1, y1 = geom.bounds
        s = OUT_PX / size
        tile_box = ((x0 - col) * s, (y0 - row) * s, (x1 - col) * s, (y1 - row) * s)
        if geom.geom_type in ("LineString", "MultiLineString"):  # a line: a part inside
            assert geom.intersects(box(col, row, col + size, row + size)), r["source_id"]
        else:
            assert -0.5 <= tile_box[0] <= tile_box[2] <= OUT_PX + 0.5, (r["source_id"], tile_box)
            assert -0.5 <= tile_box[1] <= tile_box[3] <= OUT_PX + 0.5, (r["source_id"], tile_box)
            (b,) = r["boxes"]
            assert np.allclose([b["x0"], b["y0"], b["x1"], b["y1"]], tile_box, atol=0.5)
        assert r["gsd_m"] == pytest.approx(raster.gsd_m * size / OUT_PX, rel=1e-3)
        crss.add(raster.crs)
    assert {"EPSG:32632", "EPSG:3857"} <= crss


def _phash(png_or_jpg: bytes) -> imagehash.ImageHash:
    return imagehash.phash(Image.open(io.BytesIO(png_or_jpg)).convert("RGB"))


def test_utm_and_mercator_tiles_of_one_place_show_the_same_object(world, rasters):
    """Buildings in the strip both fine mosaics cover: the same window cut from each (no
    shift) looks alike, and unlike another building's."""
    fine = {r.crs: r for r in rasters.values() if r.gsd_m < 0.6 and "nodata" not in r.path}
    utm, merc = fine["EPSG:32632"], fine["EPSG:3857"]
    both = [t for t in _truth(world) if t["source"] == "osm" and t["fine_class"]
            and t["tags"] and "building" in json.loads(t["tags"])
            and utm.footprint.contains(shapely.wkt.loads(t["geometry_wkt"]))
            and merc.footprint.contains(shapely.wkt.loads(t["geometry_wkt"]))]
    assert len(both) >= 2
    hashes = []
    for t in both[:4]:
        pair = []
        for raster in (utm, merc):
            import rasterio

            geom = shapely.wkt.loads(t["geometry_wkt"])
            w = tiles.plan_tile(geom, raster, 0, OUT_PX, max_shift=0.0)
            with rasterio.open(raster.path) as src:
                png, _, _ = tiles.read_tile(src, w, raster, OUT_PX)
            pair.append(_phash(png))
        hashes.append(pair)
    for i, (a, b) in enumerate(hashes):
        assert a - b <= 10, (both[i]["source_id"], a - b)
        others = [h[0] for j, h in enumerate(hashes) if j != i]
        assert min(a - o for o in others) > a - b


def test_captions_name_the_tags_and_list_exactly_the_objects_in_the_tile(world, build,
                                                                          rasters):
    out, _ = build
    table = TagTable.load()
    truth = _truth(world)
    on_ground = {t["source_id"]: t for t in truth if t["source"] == "osm"
                 and t["geometry_wkt"] and (t["expected"] == "kept" or
                                            t["expected_stage"] == "tile")}
    n_multi = 0
    for r in _index(out):
        t = on_ground[r["source_id"]]
        tags = json.loads(t["tags"])
        assert dict(r["tags"]) == tags
        assert r["caption"] == focus_caption(tags, table) and r["caption"]
        path, col, row, size = _window(r)
        square = box(col, row, col + size, row + size)
        want = sorted(sid for sid, o in on_ground.items() if sid != r["source_id"]
                      and _pixels(shapely.wkt.loads(o["geometry_wkt"]), rasters[path])
                      .intersects(square))
        assert r["other_ids"] == want, r["source_id"]
        assert [dict(x) for x in r["other_tags"]] == [json.loads(on_ground[s]["tags"])
                                                      for s in want]
        if want:
            n_multi += 1
            assert r["captions"][0] == r["caption"]
            assert r["captions"][1].startswith(r["caption"] + ", surrounded by ")
    assert n_multi >= 20


def test_shards_carry_the_tags_and_overlay_as_json(build):
    import tarfile

    out, _ = build
    shard = min((out / "shards").glob("skyscript-*.tar"))
    with tarfile.open(shard) as tar:
        doc = json.loads(tar.extractfile(
            next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert isinstance(doc["tags"], dict) and doc["osm_type"] in ("n", "w", "r")
    assert all(isinstance(t, dict) for t in doc["other_tags"])
    assert doc["caption_kind"] == "osm_tags" and doc["license"] == "ODbL-1.0"


def test_same_input_same_bytes(world, build, tmp_path):
    out, _ = build
    again = tmp_path / "again"
    run_build(world, again)
    for sub in ("shards", "index", "rejects"):
        a = sorted(p for p in (out / sub).rglob("*") if p.is_file())
        b = sorted(p for p in (again / sub).rglob("*") if p.is_file())
        assert [p.relative_to(out) for p in a] == [p.relative_to(again) for p in b]
        for x, y in zip(a, b, strict=True):
            assert x.read_bytes() == y.read_bytes(), x


def test_clip_filter_keeps_the_top_share_per_source(world, tmp_path):
    out = tmp_path / "top"
    stats = run_build(world, out, "--clip_top_percent", "50")
    kept = _index(out)
    rej = pq.read_table(str(out / "rejects")).to_pylist()
    filtered = [r for r in rej if r["stage"] == "clip_filter"]
    assert filtered and len(kept) == stats["kept"]
    assert abs(len(kept) - len(filtered)) <= 1
    assert min(r["clip_score"] for r in kept) >= max(r["score"] for r in filtered)


def test_dataflow_translation_dry_run_touches_no_bucket(world):
    names = skyscript.run([
        "--clip_model", str(world / "models" / "tiny-clip"),
        "--osm", "gs://rs-corpus-test/osm/*.osm.pbf",
        "--imagery", "gs://rs-corpus-test/imagery/*/*.tif,gs://rs-corpus-test/naip.csv",
        "--runner=DataflowRunner", "--dry_run=True", "--project=rs-corpus-test",
        "--region=us-central1", "--temp_location=gs://rs-corpus-test/tmp",
        "--output", "gs://rs-corpus-test/out"])
    for stage in ("Catalogue[skyscript]", "Read[skyscript]", "UniqueIds[skyscript]",
                  "Tiles[skyscript]", "Decode[skyscript]", "Tail/Embed[tail]",
                  "Subset[skyscript]/Shards"):
        assert any(stage in n for n in names), stage
