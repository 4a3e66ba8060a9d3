"""The demo world's SkyScript part (pipelines/demo/skyscript.py): deterministic, its truth
agrees with the OSM reader and the imagery catalogue, its pixels agree with its OSM
geometry, and the roof-shape benchmark is laid out as the zero-shot loaders expect."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from shapely.geometry import mapping

from pipelines.demo import skyscript
from pipelines.sources.imagery import RasterIndex, catalogue
from pipelines.sources.osm import OsmFileError, TagTable, read_osm_objects


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("skyworld")
    return d, skyscript.build_skyscript(str(d), seed=0)


@pytest.fixture(scope="module")
def truth(world: tuple[Path, dict[str, Any]]) -> list[dict[str, Any]]:
    d, _ = world
    return pq.read_table(d / skyscript.TRUTH).to_pylist()


@pytest.fixture(scope="module")
def rasters(world: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    _, summary = world
    infos, _ = catalogue(summary["imagery_glob"])
    return {os.path.basename(r.path): r for r in infos}


@pytest.fixture(scope="module")
def reads(world: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    """extract basename → OsmRead, or the OsmFileError it raised."""
    d, _ = world
    table = TagTable.load()
    out: dict[str, Any] = {}
    for p in sorted((d / "skyscript" / "osm").iterdir()):
        try:
            out[p.name] = read_osm_objects(str(p), table)
        except OsmFileError as e:
            out[p.name] = e
    return out


def test_summary_and_truth_columns(world: tuple[Path, dict[str, Any]],
                                   truth: list[dict[str, Any]]) -> None:
    d, summary = world
    assert summary["rows"] == len(truth)
    assert [r["row"] for r in truth] == list(range(len(truth)))
    assert pq.read_schema(d / skyscript.TRUTH).names == skyscript._TRUTH_SCHEMA.names
    assert summary["osm_glob"] == f"{os.path.abspath(d)}/skyscript/osm/*"
    assert summary["imagery_glob"] == f"{os.path.abspath(d)}/skyscript/imagery/*/*.tif"
    assert set(summary["planted"]) == {
        "all_nodata", "border_duplicate", "bowtie", "far_away", "missing_nodes", "no_crs",
        "too_fine", "truncated_pbf", "unknown_tags"}
    kinds = summary["by_kind"]
    assert kinds["building"] >= 55 and kinds["road"] >= 15 and kinds["parking"] == 8
    shapes = [r["fine_class"] for r in truth if r["fine_class"] in skyscript.ROOF_SHAPES
              and r["expected"] == "kept"]
    counts = [shapes.count(s) for s in skyscript.ROOF_SHAPES]
    assert min(counts) >= 15 and max(counts) - min(counts) <= 4
    assert {r["fine_class"] for r in truth} >= {"asphalt", "gravel", "dirt"}
    by_raster = summary["by_raster"]
    assert by_raster["utm_fine.tif"] > 20 and by_raster["merc_fine.tif"] > 20
    assert by_raster["utm_coarse.tif"] == 4  # two fields, the lake, the wood
    assert by_raster["all_nodata.tif"] == 3  # the planted houses and nothing else
    assert all(r["tags"] == json.dumps(json.loads(r["tags"]), sort_keys=True)
               for r in truth if r["tags"])
    assert all(r["key"] is None for r in truth)


def test_deterministic(world: tuple[Path, dict[str, Any]]) -> None:
    d, summary = world
    before = _files(d)
    again = skyscript.build_skyscript(str(d), seed=0)
    after = _files(d)
    assert again == summary
    assert before.keys() == after.keys()
    assert [k for k in before if before[k] != after[k]] == []


def test_kept_objects_lie_in_their_raster(truth: list[dict[str, Any]],
                                          rasters: dict[str, Any]) -> None:
    assert set(rasters) == {"utm_fine.tif", "merc_fine.tif", "utm_coarse.tif",
                            "all_nodata.tif"}
    assert rasters["merc_fine.tif"].crs == "EPSG:3857"
    assert abs(rasters["merc_fine.tif"].gsd_m - 0.5) < 1e-3
    assert abs(rasters["utm_coarse.tif"].gsd_m - 2.0) < 1e-9
    kept = [r for r in truth if r["expected"] == "kept"]
    assert len(kept) > 80
    for r in kept:
        info = rasters[r["raster"]]
        assert shapely.from_wkt(r["geometry_wkt"]).within(info.footprint), r["source_id"]
        assert r["crs"] == info.crs


def test_planted_imagery(world: tuple[Path, dict[str, Any]], truth: list[dict[str, Any]]
                         ) -> None:
    _, summary = world
    _, problems = catalogue(summary["imagery_glob"])
    row = next(r for r in truth if r["planted"] == "no_crs")
    assert [(f"raster:{p.path}", p.reason) for p in problems] == [
        (row["source_id"], row["expected_reason"])]
    nodata = [r for r in truth if r["planted"] == "all_nodata"]
    assert len(nodata) == 3
    assert {(r["expected_stage"], r["expected_reason"], r["raster"]) for r in nodata} == {
        ("tile", "mostly_nodata", "all_nodata.tif")}
    for kind in ("far_away", "too_fine"):
        r = next(r for r in truth if r["planted"] == kind)
        assert (r["expected"], r["expected_stage"], r["expected_reason"]) == (
            "rejected", "tile", "no_imagery")


def test_truth_agrees_with_the_reader(truth: list[dict[str, Any]], reads: dict[str, Any],
                                      rasters: dict[str, Any]) -> None:
    assert set(reads) == {"broken.osm.pbf", "east.osm", "main.osm.pbf"}
    assert isinstance(reads["broken.osm.pbf"], OsmFileError)
    objects = {(name, o.source_id): o for name, rd in reads.items()
               if not isinstance(rd, Exception) for o in rd.objects}
    rejects = {(name, j.source_id): j.reason for name, rd in reads.items()
               if not isinstance(rd, Exception) for j in rd.rejects}
    index = RasterIndex(list(rasters.values()))
    seen = set()
    for r in truth:
        if r["source"] != "osm":
            continue
        at = (r["extract"], r["source_id"])
        seen.add(at)
        if r["expected"] == "kept" or r["expected_stage"] == "tile":
            obj = objects[at]
            assert json.loads(r["tags"]) == obj.tags
            found = index.candidates(obj.geometry, obj.max_gsd)
            first = os.path.basename(found[0].path) if found else None
            assert first == r["raster"], at
        elif r["expected_reason"] == "osm_file_unreadable":
            assert r["source_id"] == f"file:{reads['broken.osm.pbf'].path}"
        elif r["expected_reason"] == "duplicate_id":
            # the copy the build drops is read, and the same id is read from east.osm,
            # whose path sorts first
            assert at in objects and ("east.osm", r["source_id"]) in objects
            assert r["extract"] == "main.osm.pbf"
        elif r["expected_stage"] == "read":
            assert rejects[at] == r["expected_reason"]
        else:
            assert r["expected"] == "not_read"
            assert at not in objects and at not in rejects
    assert set(objects) | set(rejects) <= seen  # every object read has a truth row
    n_unmatched = sum(1 for r in truth if r["expected"] == "not_read")
    assert sum(rd.counts["unmatched"] for rd in reads.values()
               if not isinstance(rd, Exception)) == n_unmatched
    dup = [r for r in truth if r["planted"] == "border_duplicate"]
    assert len(dup) == 2 and dup[0]["source_id"] == dup[1]["source_id"]
    assert sorted(r["expected"] for r in dup) == ["kept", "rejected"]


def _contrast(path: str, wkt: str) -> float:
    """Mean colour distance between the pixels inside the polygon and a ring 1-3 m outside
    it (the building's own shadow falls there too: any clear difference will do)."""
    poly = shapely.from_wkt(wkt)
    with rasterio.open(path) as src:
        arr = src.read().astype(np.float64)
        proj = shapely.geometry.shape(transform_geom("EPSG:4326", src.crs, mapping(poly)))
        scale = 1.0 if src.crs.to_epsg() != 3857 else abs(src.transform.a) / 0.5
        ring = proj.buffer(3 * scale).difference(proj.buffer(1 * scale))
        inner = proj.buffer(-0.75 * scale)
        shape = (src.height, src.width)
        m_in = ~geometry_mask([mapping(inner)], shape, src.transform)
        m_out = ~geometry_mask([mapping(ring)], shape, src.transform)
    assert m_in.sum() > 50 and m_out.sum() > 50
    a, b = arr[:, m_in].mean(axis=1), arr[:, m_out].mean(axis=1)
    return float(np.linalg.norm(a - b))


def test_pixels_agree_with_osm(world: tuple[Path, dict[str, Any]],
                               truth: list[dict[str, Any]]) -> None:
    d, _ = world
    img = d / "skyscript" / "imagery" / "naip"
    buildings = [r for r in truth if r["expected"] == "kept"
                 and r["fine_class"] in skyscript.ROOF_SHAPES]
    west = [r for r in buildings if r["raster"] == "utm_fine.tif"][:5]
    east = [r for r in buildings if r["raster"] == "merc_fine.tif"][:2]
    assert len(west) == 5 and len(east) == 2
    for r, name in [*((r, "utm_fine.tif") for r in west), *((r, "merc_fine.tif") for r in east)]:
        assert _contrast(str(img / name), r["geometry_wkt"]) > 20, r["source_id"]
    # and a polygon moved 30 m away from a building is not one: the contrast is the object's
    moved = shapely.affinity.translate(shapely.from_wkt(west[0]["geometry_wkt"]), yoff=0.0004)
    assert _contrast(str(img / "utm_fine.tif"), moved.wkt) < _contrast(
        str(img / "utm_fine.tif"), west[0]["geometry_wkt"])


def test_fine_benchmark(tmp_path: Path) -> None:
    from PIL import Image

    from trainer.bench.registry import normalise_classname

    out = skyscript.build_fine_benchmark(str(tmp_path), seed=0, n_per_class=5)
    root = tmp_path / "roof_shape"
    assert out["classes"] == ["flat_roof", "gabled_roof", "hipped_roof"]
    assert [normalise_classname(c) for c in out["classes"]] == [
        "flat roof", "gabled roof", "hipped roof"]
    split = json.loads((root / "split.json").read_text())
    assert len(split["train"]) == 6 and len(split["test"]) == 9
    digests = set()
    for c in out["classes"]:
        files = sorted((root / c).glob("*.png"))
        assert [f.name for f in files] == [f"{c}_{j:03d}.png" for j in range(5)]
        assert [s for s in split["train"] if s.startswith(c)] == [f"{c}/{c}_000.png",
                                                                  f"{c}/{c}_001.png"]
        for f in files:
            with Image.open(f) as im:
                assert im.size == (256, 256) and im.mode == "RGB"
            digests.add(hashlib.sha256(f.read_bytes()).hexdigest())
    assert len(digests) == 15
    before = _files(root)
    skyscript.build_fine_benchmark(str(tmp_path), seed=0, n_per_class=5)
    assert _files(root) == before
