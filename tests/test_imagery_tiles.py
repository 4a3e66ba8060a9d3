"""The SkyScript imagery side: catalogue, raster index, tile planning and reading.

The world is built here: synthetic GeoTIFFs of the same place (15 E, 45 N) in UTM 33N at
0.5 m and in Web Mercator at 0.6 m ground, each with the same bright rectangle drawn at a
known lon/lat, plus a 10 m Sentinel-2-like stack, a raster without a CRS and a broken file.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.features import rasterize
from rasterio.warp import transform as warp
from rasterio.warp import transform_geom
from shapely.geometry import LineString, Point, box, mapping

from pipelines.records import Reject
from pipelines.sources.imagery import RasterIndex, catalogue, ground_sample_distance
from pipelines.stages.tiles import TileWindow, group_by_raster, plan_tile, read_tile

LON, LAT = 15.0, 45.0
M_LON = 1.0 / (111_320.0 * math.cos(math.radians(LAT)))  # degrees per metre, roughly
M_LAT = 1.0 / 111_132.0
#: the bright rectangle: 20 m x 12 m, centred 30 m east and 20 m north of the place
RECT = box(LON + 20 * M_LON, LAT + 14 * M_LAT, LON + 40 * M_LON, LAT + 26 * M_LAT)
BRIGHT = 250
UTM_NODATA_COLS = 250  # the UTM raster's western columns are no-data


def _write(path, crs, transform, width, height, count=3, dtype="uint8", nodata=0.0,
           data=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        rng = np.random.default_rng(0)
        data = rng.integers(40, 80, size=(count, height, width)).astype(dtype)
        if crs is not None:
            shape = transform_geom("EPSG:4326", crs, mapping(RECT))
            mask = rasterize([shape], out_shape=(height, width), transform=transform) > 0
            data[:, mask] = BRIGHT
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count,
               "dtype": dtype, "transform": transform, "nodata": nodata}
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagery")
    (ux,), (uy,) = warp("EPSG:4326", "EPSG:32633", [LON], [LAT])
    utm_tr = from_origin(ux - 200.0, uy + 200.0, 0.5, 0.5)  # 800 px = 400 m
    rng = np.random.default_rng(0)
    utm_data = rng.integers(40, 80, size=(3, 800, 800)).astype("uint8")
    shape = transform_geom("EPSG:4326", "EPSG:32633", mapping(RECT))
    utm_data[:, rasterize([shape], out_shape=(800, 800), transform=utm_tr) > 0] = BRIGHT
    utm_data[:, :, :UTM_NODATA_COLS] = 0
    utm = _write(root / "naip" / "utm.tif", "EPSG:32633", utm_tr, 800, 800, data=utm_data)

    (mx,), (my,) = warp("EPSG:4326", "EPSG:3857", [LON], [LAT])
    px = 0.6 / math.cos(math.radians(LAT))
    merc = _write(root / "naip" / "merc.tif", "EPSG:3857",
                  from_origin(mx - 300 * px, my + 300 * px, px, px), 600, 600)

    s2_data = np.zeros((4, 40, 40), dtype="uint16")
    s2_data[1], s2_data[2], s2_data[3] = 600, 1200, 2400  # B2 (blue), B3, B4 (red)
    s2 = _write(root / "sentinel2" / "s2.tif", "EPSG:32633",
                from_origin(ux - 200.0, uy + 200.0, 10.0, 10.0), 40, 40, count=4,
                dtype="uint16", nodata=None, data=s2_data)

    nocrs = _write(root / "naip" / "nocrs.tif", None, from_origin(0, 40, 1, 1), 40, 40)
    broken = root / "naip" / "broken.tif"
    broken.write_bytes(b"not a tiff at all")
    infos, problems = catalogue(str(root / "**" / "*.tif"))
    return {"root": root, "utm": utm, "merc": merc, "s2": s2, "nocrs": nocrs,
            "broken": str(broken), "infos": {i.path: i for i in infos}, "problems": problems,
            "index": RasterIndex(infos)}


def _bright(png: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return np.all(rgb >= 200, axis=-1)


def _tile(world, which, geom, seed, out_px=128, **kw):
    info = world["infos"][world[which]]
    win = plan_tile(geom, info, np.random.default_rng(seed), out_px=out_px, **kw)
    assert isinstance(win, TileWindow), win
    with rasterio.open(info.path) as src:
        out = read_tile(src, win, info, out_px=out_px)
    assert not isinstance(out, Reject), out
    return win, out


# --- catalogue ----------------------------------------------------------------------------


def test_catalogue_fields(world):
    infos = world["infos"]
    assert sorted(infos) == sorted([world["utm"], world["merc"], world["s2"]])
    utm, merc, s2 = infos[world["utm"]], infos[world["merc"]], infos[world["s2"]]
    assert utm.crs == "EPSG:32633" and merc.crs == "EPSG:3857"
    assert utm.gsd_m == pytest.approx(0.5, rel=1e-9)
    assert merc.gsd_m == pytest.approx(0.6, rel=2e-3)  # the pixel size x cos(centre latitude)
    assert s2.gsd_m == pytest.approx(10.0)
    for info in (utm, merc, s2):
        assert info.footprint.contains(Point(LON, LAT))
        assert info.footprint.contains(RECT)
    assert utm.nodata == 0.0 and s2.nodata is None
    assert (utm.width, utm.height, utm.count, utm.dtype) == (800, 800, 3, "uint8")
    assert utm.collection == "naip" and utm.bands == (1, 2, 3)
    assert s2.collection == "sentinel2" and s2.bands == (4, 3, 2)
    assert s2.stretch == {"kind": "linear", "min": 0, "max": 3000}
    reasons = {p.path: p.reason for p in world["problems"]}
    assert reasons == {world["nocrs"]: "no_crs", world["broken"]: "unreadable"}


def test_geographic_gsd():
    # 1e-5 degree pixels at 45 N: ~0.79 m east-west, ~1.11 m north-south
    tr = tuple(from_origin(14.99, 45.01, 1e-5, 1e-5))[:6]
    gsd = ground_sample_distance("EPSG:4326", tr, 2000, 2000)
    assert gsd == pytest.approx(math.sqrt(0.7885 * 1.1114), rel=5e-3)


def test_listing_csv_and_json(world):
    root = world["root"]
    (root / "listing.csv").write_text(
        "path,collection,year,bands,scale\n"
        "sentinel2/s2.tif,sentinel2,2021,\"3,2,1\",2000\n"
        "naip/utm.tif,naip,2019,,\n"
        "naip/merc.tif,nosuch,2019,,\n")
    infos, problems = catalogue(str(root / "listing.csv"))
    by_name = {i.path.rsplit("/", 1)[-1]: i for i in infos}
    assert by_name["s2.tif"].year == 2021 and by_name["s2.tif"].bands == (3, 2, 1)
    assert by_name["s2.tif"].stretch == {"kind": "linear", "min": 0.0, "max": 2000.0}
    assert by_name["utm.tif"].year == 2019 and by_name["utm.tif"].collection == "naip"
    assert [(p.path.rsplit("/", 1)[-1], p.reason) for p in problems] == [
        ("merc.tif", "unknown_collection")]
    (root / "listing.json").write_text(json.dumps(
        {"rasters": [{"path": "naip/utm.tif", "collection": "naip", "bands": [1, 2, 9]}]}))
    infos, problems = catalogue(str(root / "listing.json"))
    assert infos == [] and [p.reason for p in problems] == ["band_missing"]


# --- index --------------------------------------------------------------------------------


def test_index_picks_by_gsd(world):
    index = world["index"]
    names = lambda found: [i.path.rsplit("/", 1)[-1] for i in found]
    assert names(index.candidates(RECT, 0.55)) == ["utm.tif"]
    assert names(index.candidates(RECT, 1.0)) == ["merc.tif", "utm.tif"]  # coarsest first
    assert names(index.candidates(mapping(RECT), 10.0)) == ["s2.tif", "merc.tif", "utm.tif"]
    assert index.candidates(RECT, 0.1) == []
    assert index.candidates(Point(LON + 1.0, LAT), 30.0) == []

    objects = [{"id": 1, "geometry": RECT, "max_gsd_m": 1.0},
               {"id": 2, "geometry": Point(LON, LAT), "max_gsd_m": 0.5},
               {"id": 3, "geometry": RECT, "max_gsd_m": 0.1}]
    rejects: list = []
    groups = group_by_raster(objects, index, rejects=rejects)
    assert {k.rsplit("/", 1)[-1]: [o["id"] for o, _ in v] for k, v in groups.items()} == {
        "merc.tif": [1], "utm.tif": [2]}
    assert [(o["id"], r.stage, r.reason) for o, r in rejects] == [(3, "tile", "no_imagery")]


# --- tiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["utm", "merc"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tile_contains_the_object(world, which, seed):
    win, (png, share, tbox) = _tile(world, which, RECT, seed, min_size_px=16)
    assert win.kind == "polygon"
    x0, y0, x1, y1 = tbox
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    bright = _bright(png)
    assert bright.sum() > 200
    ys, xs = np.nonzero(bright)
    assert xs.min() >= x0 - 1.5 and xs.max() <= x1 + 0.5
    assert ys.min() >= y0 - 1.5 and ys.max() <= y1 + 0.5
    assert share == 0.0


def test_utm_and_mercator_tiles_show_the_same_object(world):
    masks = [_bright(_tile(world, which, RECT, 5, min_size_px=16, max_shift=0.0)[1][0])
             for which in ("utm", "merc")]
    iou = (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum()
    assert iou > 0.8
    # with a shift, both tiles still put the rectangle where their boxes say
    for which in ("utm", "merc"):
        for seed in range(4):
            _win, (png, _share, (x0, y0, x1, y1)) = _tile(world, which, RECT, seed,
                                                          min_size_px=16)
            ys, xs = np.nonzero(_bright(png))
            assert abs(xs.mean() + 0.5 - (x0 + x1) / 2) < 2.0
            assert abs(ys.mean() + 0.5 - (y0 + y1) / 2) < 2.0


@pytest.mark.parametrize("which", ["utm", "merc"])
def test_point_and_line_tiles(world, which):
    centre = RECT.centroid
    win, (png, _share, (x0, y0, x1, y1)) = _tile(world, which, centre, 11, out_px=64)
    assert win.kind == "point" and win.size == 64 and x0 == x1 and y0 == y1
    assert 0 <= x0 <= 64 and 0 <= y0 <= 64
    ys, xs = np.nonzero(_bright(png))
    assert abs(xs.mean() + 0.5 - x0) < 2.0 and abs(ys.mean() + 0.5 - y0) < 2.0
    info = world["infos"][world[which]]
    offsets = {(w.col_off, w.row_off) for w in (plan_tile(centre, info, s, out_px=64)
                                                 for s in range(6))}
    assert len(offsets) > 1  # the seeded shift moves the point off-centre

    line = LineString([(LON - 60 * M_LON, LAT), (LON, LAT + 20 * M_LAT),
                       (LON + 30 * M_LON, LAT + 20 * M_LAT)])
    win = plan_tile(line, info, 3, out_px=64)
    assert isinstance(win, TileWindow) and win.kind == "line"
    ax, ay = win.anchor
    assert win.col_off <= ax <= win.col_off + win.size
    assert win.row_off <= ay <= win.row_off + win.size
    bx0, by0, bx1, by1 = win.box_in_tile(64)
    assert 0 <= bx0 <= bx1 <= 64 and 0 <= by0 <= by1 <= 64


def test_rejects(world):
    utm = world["infos"][world["utm"]]
    east_of_raster = Point(LON + 250 * M_LON, LAT)  # the raster ends 200 m east
    assert plan_tile(east_of_raster, utm, 0).reason == "off_raster"
    assert plan_tile(Point(LON, LAT), utm, 0, point_size_px=1000, max_size_px=1000
                     ).reason == "off_raster"  # no 1000 px window fits an 800 px raster
    big = box(LON - 150 * M_LON, LAT - 10 * M_LAT, LON + 150 * M_LON, LAT + 10 * M_LAT)
    rej = plan_tile(big, utm, 0, max_size_px=256)
    assert (rej.stage, rej.reason) == ("tile", "object_too_large")
    assert plan_tile(Point(), utm, 0).reason == "geometry_invalid"

    # 150 px into the raster, where the first 250 columns are no-data
    west = Point(LON - 125 * M_LON, LAT)
    win = plan_tile(west, utm, 0)
    assert isinstance(win, TileWindow)
    with rasterio.open(utm.path) as src:
        rej = read_tile(src, win, utm)
        assert (rej.stage, rej.reason) == ("tile", "mostly_nodata")
        png, share, _ = read_tile(src, win, utm, max_nodata=1.0)
    assert share > 0.5
    rgb = np.asarray(Image.open(io.BytesIO(png)))
    assert (rgb[:, :10] == 0).all()  # no-data is black


def test_sentinel2_bands_and_stretch(world):
    s2 = world["infos"][world["s2"]]
    win = plan_tile(Point(LON, LAT), s2, 0, out_px=16)
    with rasterio.open(s2.path) as src:
        png, share, _ = read_tile(src, win, s2, out_px=16)
    rgb = np.asarray(Image.open(io.BytesIO(png)))
    # R = B4 2400, G = B3 1200, B = B2 600 on 0..3000 -> 204, 102, 51
    assert share == 0.0 and (rgb == np.array([204, 102, 51], dtype=np.uint8)).all()


def test_determinism(world):
    utm = world["infos"][world["utm"]]
    outs = []
    for _ in range(2):
        win = plan_tile(RECT, utm, np.random.default_rng(42), min_size_px=16)
        with rasterio.open(utm.path) as src:
            outs.append((win, read_tile(src, win, utm)))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1][0] == outs[1][1][0]
    assert plan_tile(RECT, utm, 42, min_size_px=16) == outs[0][0]  # a seed is a Generator


def from_origin(west: float, north: float, xsize: float, ysize: float) -> Affine:
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)
