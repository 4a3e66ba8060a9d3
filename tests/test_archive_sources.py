"""The RS3 archive sources (fMoW, BigEarthNet, MillionAID) and the demo world's RS3 part.

One small RS3 world is built per session (``pipelines.demo.rs3.build_rs3``); the readers are
checked entry by entry against its truth (pure functions) and once through Beam
(``TestPipeline`` + ``assert_that``); odd files are made by hand in ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from pipelines.demo import rs3
from pipelines.records import Reject, make_key
from pipelines.sources import archives, bigearthnet, fmow, millionaid
from pipelines.sources.archives import ArchiveError
from pipelines.stages.images import hamming, normalise_image

SMALL = {"n_fmow": 6, "n_ben": 6, "n_millionaid": 6}


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("rs3_world"))
    rs3.build_rs3(out, seed=1, **SMALL)
    return out


@pytest.fixture(scope="session")
def truth(world) -> dict[tuple[str, str], dict]:
    rows = pq.read_table(os.path.join(world, rs3.TRUTH)).to_pylist()
    return {(r["source"], r["source_id"]): r for r in rows}


def _roots(world: str) -> dict[str, str]:
    base = os.path.join(world, rs3.FOLDER)
    return {"fmow-rgb": f"{base}/fmow-rgb", "fmow-full": f"{base}/fmow-full",
            "bigearthnet": f"{base}/bigearthnet", "millionaid": f"{base}/millionaid"}


def _read_all(world: str, **ben_kw) -> list:
    r = _roots(world)
    outs = []
    for root in (r["fmow-rgb"], r["fmow-full"]):
        outs += [fmow.read_entry(it, subset="rs3") for it in fmow.list_root(root)]
    outs += [bigearthnet.read_patch(it, subset="rs3", **ben_kw)
             for it in bigearthnet.list_root(r["bigearthnet"])]
    outs += [millionaid.read_image(it, subset="rs3")
             for it in millionaid.list_root(r["millionaid"])]
    return outs


def _split(out):
    return out if isinstance(out, tuple) else (out, None)


@pytest.fixture(scope="session")
def outcomes(world):
    return {(rec["source"], rec["source_id"]): (rec, rej)
            for rec, rej in map(_split, _read_all(world))}


def _tiff(arr: np.ndarray, crs=None, transform=None, dtype="uint16", **kw) -> bytes:
    c, h, w = arr.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=w, height=h, count=c, dtype=dtype, crs=crs,
                          transform=transform or Affine.identity(), **kw) as ds:
                ds.write(arr.astype(dtype))
            return bytes(mem.getbuffer())


# --- every entry of the demo world lands where its truth says -------------------------------


def test_every_truth_row_is_read_and_nothing_else(world, truth, outcomes):
    assert set(outcomes) == set(truth)
    by_source = Counter(s for s, _ in truth)
    assert by_source["fmow-rgb"] == 2 * SMALL["n_fmow"] + 8  # pairs + planted
    assert by_source["fmow-full"] == 2 * 2  # max(2, 6 // 8) pairs
    assert by_source["bigearthnet"] == SMALL["n_ben"] + 3
    assert by_source["millionaid"] == SMALL["n_millionaid"] + 1


def test_planted_and_clean_entries_land_as_the_truth_says(truth, outcomes):
    for key, t in truth.items():
        rec, rej = outcomes[key]
        assert rec["key"] == t["key"] == make_key(*key)
        if t["expected_stage"] == "read":
            assert rej is not None, key
            assert (rej.stage, rej.reason) == ("read", t["expected_reason"]), (key, rej)
            continue
        assert rej is None, (key, rej)
        decoded = normalise_image(rec["_body"])
        if t["expected"] == "rejected":  # a decode-stage plant: check what images.py says
            assert isinstance(decoded, Reject), key
            assert (decoded.stage, decoded.reason) == (t["expected_stage"],
                                                       t["expected_reason"])
        else:  # the truth's pHash is what Decode computes from the source's bytes
            assert not isinstance(decoded, Reject), (key, decoded)
            assert decoded.phash == t["phash"], key


def test_every_planted_kind_is_present_once(truth):
    planted = Counter(t["planted"] for t in truth.values() if t["planted"])
    assert planted == {k: 1 for k in rs3.PLANTED_KINDS}


def test_msrgb_views_are_duplicates_of_their_rgb(truth):
    groups: dict[str, list[dict]] = {}
    for t in truth.values():
        if t["duplicate_group"]:
            groups.setdefault(t["duplicate_group"], []).append(t)
    assert len(groups) == SMALL["n_fmow"] + 2
    for members in groups.values():
        kept = [m for m in members if m["expected"] == "kept"]
        dups = [m for m in members if m["expected"] == "duplicate"]
        assert len(kept) == 1 and len(dups) == 1
        assert kept[0]["source_id"].endswith("_rgb") and dups[0]["source_id"].endswith("_msrgb")
        assert kept[0]["width"] * kept[0]["height"] > dups[0]["width"] * dups[0]["height"]
        assert dups[0]["expected_stage"] == "dedup" and dups[0]["expected_reason"] == "phash"
        assert hamming(kept[0]["phash"], dups[0]["phash"]) <= rs3.MAX_COPY_DISTANCE


def test_clean_pictures_are_far_apart(truth):
    kept = [t for t in truth.values() if t["expected"] == "kept"]
    assert len(kept) >= 20
    for i, a in enumerate(kept):
        for b in kept[i + 1:]:
            assert hamming(a["phash"], b["phash"]) >= rs3.MIN_PHASH_DISTANCE, (a["source_id"],
                                                                                b["source_id"])


def test_truth_has_local_columns_and_both_hemispheres(world, truth):
    from pipelines.demo.local import _TRUTH_SCHEMA

    names = pq.read_schema(os.path.join(world, rs3.TRUTH)).names
    assert names[: len(_TRUTH_SCHEMA.names)] == _TRUTH_SCHEMA.names
    assert names[len(_TRUTH_SCHEMA.names):] == ["lat", "lon", "hemisphere"]
    for src in ("fmow-rgb", "bigearthnet"):
        hemis = {t["hemisphere"] for t in truth.values() if t["source"] == src}
        assert {"N", "S"} <= hemis, src
    assert all(t["url"] is None and t["caption"] is None for t in truth.values())


# --- fMoW ---------------------------------------------------------------------------------


def test_fmow_fields_parsed_from_the_json(world, outcomes):
    root = _roots(world)["fmow-rgb"]
    key = next(k for k in outcomes if k[0] == "fmow-rgb" and k[1].endswith("_1_0_rgb"))
    rec, rej = outcomes[key]
    assert rej is None
    with open(os.path.join(root, key[1] + ".json"), encoding="utf-8") as f:
        doc = json.load(f)
    assert rec["url"] == os.path.join(root, key[1] + ".jpg")
    assert rec["license"] == fmow.LICENSE
    assert rec["labels"] == [key[1].split("/")[1]]
    assert rec["acquired"] == doc["timestamp"] and rec["acquired"].endswith("Z")
    assert rec["gsd_m"] == doc["gsd"]
    assert rec["_pixel_size"] == [doc["img_width"], doc["img_height"]]
    assert rec["crs"] is None and rec["_geo"] is None
    # entry 1 has a false detection listed first: the target is the next box
    assert doc["bounding_boxes"][0]["category"] == "false_detection"
    assert rec["_target_box"] == doc["bounding_boxes"][1]["box"]
    ring = [[float(a), float(b)] for a, b in (p.split() for p in
            doc["raw_location"][len("POLYGON (("):-2].split(", "))]
    assert rec["_footprint"] == ring
    assert rec["_meta"] == {k: doc[k] for k in fmow.META_KEYS}
    extra = json.loads(rec["extra"])
    assert extra["variant"] == "rgb" and extra["target_id"] == doc["bounding_boxes"][1]["ID"]
    assert extra["pan_resolution_dbl"] == doc["pan_resolution_dbl"]
    with open(rec["url"], "rb") as f:
        assert rec["_body"] == f.read()  # fmow-rgb: the JPEG's own bytes


def test_fmow_full_gives_png_of_the_stretched_bands(outcomes):
    recs = [rec for (src, _), (rec, rej) in outcomes.items() if src == "fmow-full"]
    assert recs and all(r["_body"].startswith(b"\x89PNG") for r in recs)
    with Image.open(io.BytesIO(recs[0]["_body"])) as im:
        assert im.mode == "RGB" and im.size == tuple(recs[0]["_pixel_size"])


@pytest.mark.parametrize("doc_change, reason", [
    ({"raw_location": "POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))"}, "footprint_invalid"),
    ({"raw_location": "POINT (10 10)"}, "footprint_invalid"),
    ({"raw_location": "POLYGON ((0 0, 1"}, "footprint_invalid"),
    ({"raw_location": 5}, "footprint_invalid"),
    ({"raw_location": "POLYGON ((10 95, 11 95, 11 96, 10 95))"}, "off_globe"),
    ({"timestamp": "last tuesday"}, "json_malformed"),
    ({"img_width": -3}, "json_malformed"),
    ({"gsd": "0.5"}, "json_malformed"),
    ({"bounding_boxes": {"box": [1, 2, 3, 4]}}, "json_malformed"),
    ({"bounding_boxes": [{"box": [1, 2, 3]}]}, "json_malformed"),
    ({"country_code": 7}, "json_malformed"),
])
def test_fmow_bad_metadata_is_named(doc_change, reason):
    doc = {"img_width": 100, "img_height": 80, "gsd": 0.5, "timestamp": "2016-05-13T10:12:31Z",
           "raw_location": "POLYGON ((10 20, 10.01 20, 10.01 19.99, 10 19.99, 10 20))",
           "bounding_boxes": [{"ID": 1, "box": [1, 2, 30, 40], "category": "airport"}]}
    doc.update(doc_change)
    with pytest.raises(ArchiveError) as e:
        fmow.parse_metadata(doc, "train/airport/airport_1/airport_1_0_rgb.jpg", "rgb")
    assert e.value.reason == reason


def test_fmow_metadata_edge_cases():
    doc = {"img_width": 100, "img_height": 80, "gsd": 0.5,
           "timestamp": "2016-05-13T12:12:31+02:00",
           "raw_location": "POLYGON ((10 20, 10.01 20, 10.01 19.99, 10 19.99, 10 20))",
           "bounding_boxes": [{"box": [0, 0, 5, 5], "category": "false_detection"}]}
    out = fmow.parse_metadata(doc, "test/0012345/0012345_0_rgb.jpg", "rgb")
    assert out["acquired"] == "2016-05-13T10:12:31Z"  # normalised to UTC
    assert out["_target_box"] == [0, 0, 5, 5]  # only false detections: the first box
    assert out["labels"] == ["false_detection"]
    assert out["_meta"]["utm"] is None  # optional keys may be missing
    doc["bounding_boxes"] = []
    out = fmow.parse_metadata(doc, "train/airport/airport_1/airport_1_0_rgb.jpg", "rgb")
    assert out["_target_box"] is None and out["labels"] == ["airport"]  # from the folder
    missing = {k: v for k, v in doc.items() if k != "gsd"}
    with pytest.raises(ArchiveError, match="missing gsd"):
        fmow.parse_metadata(missing, "x_rgb.jpg", "rgb")


def test_fmow_variants_and_listing_order():
    files = {"train/a/a_1/a_1_0_rgb.jpg": 10, "train/a/a_1/a_1_0_rgb.json": 2,
             "train/a/a_1/a_1_0_msrgb.jpg": 5, "train/a/a_1/a_1_0_msrgb.json": 2,
             "train/a/a_2/a_2_0_msrgb.json": 2, "train/a/a_1/notes.txt": 1}
    items = fmow.list_entries(files, "/r")
    assert [i["source_id"] for i in items] == ["train/a/a_1/a_1_0_msrgb",
                                              "train/a/a_1/a_1_0_rgb", "train/a/a_2/a_2_0_msrgb"]
    assert items[2]["image"] is None and items[2]["url"] == "/r/train/a/a_2/a_2_0_msrgb.json"
    shuffled = dict(reversed(list(files.items())))
    assert fmow.list_entries(shuffled, "/r") == items
    only_rgb = fmow.list_entries(files, "/r", ("rgb",))
    assert [i["source_id"] for i in only_rgb] == ["train/a/a_1/a_1_0_rgb"]
    with pytest.raises(ValueError):
        fmow.ReadFmow("/nonexistent-root", "rs3", variants="rgb,pan")


def test_fmow_band_choice_by_band_count():
    """The same R, G, B stored as 3-band, 4-band (B,G,R,NIR) and 8-band (WorldView order)
    give the same picture, byte for byte."""
    rng = np.random.default_rng(0)
    r, g, b = (rng.integers(100, 2000, (40, 50)) for _ in range(3))
    nir = rng.integers(0, 2000, (40, 50))
    three = _tiff(np.stack([r, g, b]))
    four = _tiff(np.stack([b, g, r, nir]))
    eight = _tiff(np.stack([nir, b, g, nir, r, nir, nir, nir]))
    pngs = {fmow.tiff_body(x)[0] for x in (three, four, eight)}
    assert len(pngs) == 1
    with Image.open(io.BytesIO(pngs.pop())) as im:
        px = np.asarray(im)
    assert np.array_equal(px, archives.stretch_percentile(np.stack([r, g, b])))
    with pytest.raises(ArchiveError) as e:
        fmow.tiff_body(_tiff(np.stack([r, g])))
    assert e.value.reason == "image_unreadable"


def test_fmow_hostile_files_are_rows(tmp_path):
    root = tmp_path / "fmow-full"
    d = root / "train" / "dam" / "dam_0"
    d.mkdir(parents=True)
    doc = {"img_width": 10, "img_height": 10, "gsd": 1.0, "timestamp": "2017-01-01T00:00:00Z",
           "raw_location": "POLYGON ((10 20, 10.01 20, 10.01 19.99, 10 19.99, 10 20))",
           "bounding_boxes": []}
    (d / "dam_0_0_rgb.tif").write_bytes(b"II*\x00" + b"\x00" * 100)  # a broken TIFF
    (d / "dam_0_0_rgb.json").write_text(json.dumps(doc))
    big = np.random.default_rng(0).integers(1, 2000, (4, 60, 60))
    (d / "dam_0_0_msrgb.tif").write_bytes(_tiff(big))  # ~29 KB, over a 2000-byte cap
    (d / "dam_0_0_msrgb.json").write_text(json.dumps(doc))
    outs = {_split(o)[0]["source_id"]: _split(o) for o in
            (fmow.read_entry(i, subset="rs3", max_bytes=2000) for i in fmow.list_root(str(root)))}
    assert outs["train/dam/dam_0/dam_0_0_rgb"][1].reason == "image_unreadable"
    assert outs["train/dam/dam_0/dam_0_0_msrgb"][1].reason == "too_large"
    assert all(rec["source"] == "fmow-full" and rec["_body"] is None for rec, _ in outs.values())


# --- BigEarthNet --------------------------------------------------------------------------


def test_bigearthnet_geo_is_rasterios_own_on_both_hemispheres(world, outcomes):
    root = _roots(world)["bigearthnet"]
    recs = [rec for (src, _), (rec, rej) in outcomes.items() if src == "bigearthnet" and not rej]
    assert len(recs) == SMALL["n_ben"]
    zones = set()
    for rec in recs:
        patch = rec["source_id"]
        assert rec["url"] == os.path.join(root, patch)
        with rasterio.open(os.path.join(root, patch, f"{patch}_B04.tif")) as ds:
            assert rec["_geo"]["transform"] == list(ds.transform)[:6]
            assert rec["crs"] == rec["_geo"]["crs"] == f"EPSG:{ds.crs.to_epsg()}"
            assert (rec["_geo"]["width"], rec["_geo"]["height"]) == (ds.width, ds.height)
        zones.add(rec["crs"][:8])
        assert rec["gsd_m"] == 10.0 and rec["_pixel_size"] == [120, 120]
        with open(os.path.join(root, patch, f"{patch}_labels_metadata.json"),
                  encoding="utf-8") as f:
            doc = json.load(f)
        assert rec["labels"] == doc["labels"]
        assert rec["acquired"] == doc["acquisition_date"].replace(" ", "T")
        assert rec["_meta"] == {k: doc[k] for k in bigearthnet.META_KEYS}
        assert rec["license"] == bigearthnet.LICENSE
    assert {"EPSG:326", "EPSG:327"} <= zones  # north and south UTM zones


def test_bigearthnet_band_sizes_and_the_stretch(world, outcomes):
    root = _roots(world)["bigearthnet"]
    rec = next(r for (src, _), (r, rej) in outcomes.items() if src == "bigearthnet" and not rej)
    patch = rec["source_id"]
    sizes = {}
    for band in rs3.BEN_BANDS:
        with rasterio.open(os.path.join(root, patch, f"{patch}_{band}.tif")) as ds:
            sizes[band] = (ds.width, ds.dtypes[0])
    assert sizes["B02"] == (120, "uint16") and sizes["B05"] == (60, "uint16")
    assert sizes["B01"] == (20, "uint16") and len(sizes) == 12
    dns = []
    for band in ("B04", "B03", "B02"):
        with rasterio.open(os.path.join(root, patch, f"{patch}_{band}.tif")) as ds:
            dns.append(ds.read(1))
    with Image.open(io.BytesIO(rec["_body"])) as im:
        px = np.asarray(im)
    expect = np.rint(np.clip(np.stack(dns, -1) / 10000 / 0.3, 0, 1) * 255)
    assert np.array_equal(px, expect.astype(np.uint8))
    # the flag: a lower top reflectance brightens the same patch
    item = next(i for i in bigearthnet.list_root(root) if i["source_id"] == patch)
    bright = bigearthnet.read_patch(item, subset="rs3", max_reflectance=0.15)
    with Image.open(io.BytesIO(bright["_body"])) as im:
        assert np.asarray(im).mean() > px.mean()


def test_stretch_documented_values():
    dn = np.array([0, 1500, 3000, 6000], dtype=np.uint16).reshape(1, 1, 4).repeat(3, 0)
    assert archives.stretch_reflectance(dn)[0, :, 0].tolist() == [0, 128, 255, 255]
    assert archives.stretch_reflectance(dn, 0.15)[0, :, 0].tolist() == [0, 255, 255, 255]
    band = np.arange(0, 101, dtype=np.float64).reshape(1, 1, 101)
    bands = np.concatenate([band, band, band])
    bands[:, 0, 0] = 0  # a no-data pixel (0 in every band) is left out and stays 0
    out = archives.stretch_percentile(bands)[0, :, 0]
    lo, hi = np.percentile(np.arange(1, 101), [2, 98])
    assert out[0] == 0 and out[1] == 0 and out[100] == 255
    assert out[50] == np.rint((50 - lo) / (hi - lo) * 255)
    flat = np.full((3, 2, 2), 7)
    assert archives.stretch_percentile(flat).tolist() == np.full((2, 2, 3), 255).tolist()


def _copy_patch(world: str, truth: dict, tmp_path) -> tuple[str, str]:
    """A clean patch of the world, copied into ``tmp_path/ben``."""
    src_root = _roots(world)["bigearthnet"]
    patch = min(sid for (src, sid), t in truth.items()
                if src == "bigearthnet" and t["expected"] == "kept")
    root = tmp_path / "ben"
    shutil.copytree(os.path.join(src_root, patch), root / patch)
    return str(root), patch


def test_bigearthnet_json_missing_and_malformed(world, truth, tmp_path):
    root, patch = _copy_patch(world, truth, tmp_path)
    meta = os.path.join(root, patch, f"{patch}_labels_metadata.json")
    for content, reason in ((None, "json_missing"), ("[1, 2]", "json_malformed"),
                            ('{"labels": "Water bodies"}', "json_malformed"),
                            ('{"labels": [], "acquisition_date": "soon"}', "json_malformed")):
        if content is None:
            os.remove(meta)
        else:
            with open(meta, "w", encoding="utf-8") as f:
                f.write(content)
        (item,) = bigearthnet.list_root(root)
        rec, rej = bigearthnet.read_patch(item, subset="rs3")
        assert rej.reason == reason and rec["_body"] is None, content


def test_bigearthnet_unreadable_band(world, truth, tmp_path):
    root, patch = _copy_patch(world, truth, tmp_path)
    with open(os.path.join(root, patch, f"{patch}_B02.tif"), "wb") as f:
        f.write(b"not a tiff at all")
    (item,) = bigearthnet.list_root(root)
    _, rej = bigearthnet.read_patch(item, subset="rs3")
    assert rej.reason == "image_unreadable" and "B02" in rej.detail


def test_crs_without_epsg_code_keeps_its_own_string():
    from rasterio.crs import CRS

    crs = CRS.from_proj4("+proj=tmerc +lat_0=0 +lon_0=13.7 +k=0.9996 +x_0=500000 +y_0=0 "
                         "+ellps=WGS84 +units=m +no_defs")
    assert archives.crs_name(crs) == crs.to_string()
    assert archives.crs_name(CRS.from_epsg(32756)) == "EPSG:32756"
    assert archives.crs_name(None) is None


# --- MillionAID ---------------------------------------------------------------------------


def test_millionaid_hierarchy_and_test_split(world, outcomes):
    recs = {sid: rec for (src, sid), (rec, rej) in outcomes.items()
            if src == "millionaid" and not rej}
    train = {sid: r for sid, r in recs.items() if sid.startswith("train/")}
    test = {sid: r for sid, r in recs.items() if sid.startswith("test/")}
    assert train and test
    for sid, rec in train.items():
        path = sid.split("/")[1:-1]
        assert len(path) == 3 and rec["labels"] == path and rec["_meta"] == {"hierarchy": path}
        assert tuple(path) in rs3.MILLIONAID_PATH.values()
    assert all(r["labels"] is None and r["_meta"] is None for r in test.values())
    assert all(r["license"] == millionaid.LICENSE for r in recs.values())
    assert millionaid.hierarchy("train/P1.jpg") is None
    assert millionaid.hierarchy("other/a/b/P1.jpg") is None


def test_millionaid_byte_cap(world):
    items = millionaid.list_root(_roots(world)["millionaid"])
    outs = [_split(millionaid.read_image(i, subset="rs3", max_bytes=1000)) for i in items]
    reasons = Counter(rej.reason if rej else "ok" for _, rej in outs)
    assert reasons["too_large"] == len(items) - 1  # all but the small HTML "JPEG"
    with pytest.raises(ArchiveError) as e:
        archives.read_capped(items[0]["url"], 10)
    assert e.value.reason == "too_large"


# --- rasters: caps and decimation --------------------------------------------------------


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_big_raster_is_read_decimated(load_spy):
    # a sparse 12000 x 3000 raster: only its header is written, like a huge strip's
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=12000, height=3000, count=3, dtype="uint16",
                      tiled=True, blockxsize=512, blockysize=512, sparse_ok=True) as ds:
            ds.write(np.full((3, 512, 512), 900, np.uint16),
                     window=rasterio.windows.Window(0, 0, 512, 512))
        data = bytes(mem.getbuffer())
    r = archives.read_raster(data, [1, 2, 3])
    assert r.decimated and r.data.shape == (3, 1024, 4096)
    assert (r.width, r.height) == (12000, 3000)
    r = archives.read_raster(data, [1], max_side=300)
    assert r.data.shape == (1, 75, 300)
    with pytest.raises(ArchiveError) as e:
        archives.read_raster(data, [1], max_pixels=12000 * 3000 - 1)
    assert e.value.reason == "too_large"
    assert not load_spy  # no PIL decode involved


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_default_max_pixels_refuses_before_reading():
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=20000, height=20000, count=1, dtype="uint16",
                      tiled=True, blockxsize=1024, blockysize=1024, sparse_ok=True):
            pass
        data = bytes(mem.getbuffer())
    with pytest.raises(ArchiveError, match="max_pixels 89478485") as e:
        archives.read_raster(data, [1])
    assert e.value.reason == "too_large"


def test_a_crashing_reader_becomes_a_row():
    def boom(item):
        raise ZeroDivisionError("bad luck")

    rec, rej = archives.outcome_of(boom, {"source": "s", "source_id": "x", "url": "u"},
                                   "rs3", None)
    assert rej.reason == "image_unreadable" and rec["key"] == make_key("s", "x")


# --- Beam ---------------------------------------------------------------------------------


def test_readers_through_beam(world, truth):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.sources.bigearthnet import ReadBigEarthNet
    from pipelines.sources.fmow import ReadFmow
    from pipelines.sources.millionaid import ReadMillionAID

    r = _roots(world)
    want_rejects = sorted((t["source"], t["source_id"], t["expected_reason"])
                          for t in truth.values() if t["expected_stage"] == "read")
    want_records = sorted((t["source"], t["source_id"], t["key"])
                          for t in truth.values() if t["expected_stage"] != "read")
    with TestPipeline() as p:
        outs = [p | "F" >> ReadFmow(f"{r['fmow-rgb']},{r['fmow-full']}/", "rs3"),
                p | "B" >> ReadBigEarthNet(r["bigearthnet"], "rs3"),
                p | "M" >> ReadMillionAID(r["millionaid"], "rs3")]
        rejects = (tuple(o["rejects"] for o in outs) | "R" >> beam.Flatten()
                   | "RK" >> beam.Map(lambda x: (x["source"], x["source_id"], x["reason"])))
        records = (tuple(o["records"] for o in outs) | "K" >> beam.Flatten()
                   | "KK" >> beam.Map(lambda x: (x["source"], x["source_id"], x["key"])))
        assert_that(rejects, equal_to(want_rejects), label="rejects")
        assert_that(records, equal_to(want_records), label="records")


def test_missing_root_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError):
        millionaid.ReadMillionAID(str(tmp_path / "nope"), "rs3")
    assert archives.split_roots(" gs://b/x/ , /a/b/") == ["gs://b/x", "/a/b"]
    assert archives.rel_join("gs://b/x", "p/q.jpg") == "gs://b/x/p/q.jpg"


# --- the builder --------------------------------------------------------------------------


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def test_build_rs3_is_byte_identical_for_a_seed(world, tmp_path):
    other = str(tmp_path / "again")
    os.makedirs(other)
    summary = rs3.build_rs3(other, seed=1, **SMALL)
    assert _files(world) == _files(other)
    assert summary["rows"] == len(pq.read_table(summary["truth"]))
    assert summary["roots"]["fmow"].split(",") == [f"{other}/rs3/fmow-rgb",
                                                   f"{other}/rs3/fmow-full"]
    assert summary["planted"] == {k: 1 for k in rs3.PLANTED_KINDS}
    third = str(tmp_path / "seed2")
    os.makedirs(third)
    rs3.build_rs3(third, seed=2, **SMALL)
    assert _files(third) != _files(world)


def test_rs3_pictures_are_far_from_pub11_and_local(tmp_path):
    from pipelines.demo.local import build_local
    from pipelines.demo.pub11 import _hashes, build_pub11

    out = str(tmp_path)
    build_pub11(out, "http://127.0.0.1:9", seed=4, n_rs=12, n_non_rs=9, n_probe=4)
    build_local(out, seed=4, n=6)
    rs3.build_rs3(out, seed=4, n_fmow=3, n_ben=3, n_millionaid=3)
    theirs = pq.read_table(os.path.join(out, "ground_truth.parquet")).to_pylist()
    others = [r["phash"] for r in theirs if r["phash"]]
    for r in pq.read_table(os.path.join(out, "local_truth.parquet")).to_pylist():
        if r["image"] and os.path.isfile(os.path.join(out, "local", r["image"])):
            with Image.open(os.path.join(out, "local", r["image"])) as im:
                others.append(f"{_hashes(im)[0]:016x}")
    assert len(others) > 10
    mine = [t["phash"] for t in pq.read_table(os.path.join(out, rs3.TRUTH)).to_pylist()
            if t["expected"] in ("kept", "duplicate")]
    # PUB11's truth hashes its own render, the builder Decode's output of the archive bytes:
    # a bit or two of slack between the two hashings
    assert min(hamming(a, b) for a in mine for b in others) >= rs3.MIN_PHASH_DISTANCE - 2
