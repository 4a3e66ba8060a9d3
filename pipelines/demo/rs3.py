"""The demo world's label-only archives: fMoW, BigEarthNet and MillionAID (the RS3 subset).

``build_rs3(out_dir, seed)`` writes, next to the PUB11 and ``local`` parts of a world (built
first: their pictures are what the RS3 pictures must differ from; without them the RS3
pictures only differ among themselves)::

    {out}/rs3/fmow-rgb/train/{category}/{category}_{n}/{category}_{n}_0_{rgb|msrgb}.jpg+.json
    {out}/rs3/fmow-full/train/{category}/{category}_{n}/{category}_{n}_0_{rgb|msrgb}.tif+.json
    {out}/rs3/bigearthnet/{patch}/{patch}_B01.tif … _B12.tif, _B8A.tif, _labels_metadata.json
    {out}/rs3/millionaid/train/{level 1}/{level 2}/{leaf}/P*.jpg, test/P*.jpg
    {out}/rs3_truth.parquet      one row per archive entry: where it must end

Pictures are ``scenes.render_scene`` draws from their own seed stream (8001; PUB11 uses
1-11, ``local`` 7001, the benchmark 9001), each at least :data:`MIN_PHASH_DISTANCE` pHash
bits (the dedup stage's crop-aware distance, hashed as ``Decode`` hashes them) from every
PUB11 and ``local`` picture and from each other. Scene classes map to fMoW categories
(:data:`FMOW_CATEGORY`), CORINE labels (:data:`CORINE`) and MillionAID-style class paths
(:data:`MILLIONAID_PATH`). Places are real towns (:data:`FMOW_TOWNS`, :data:`BEN_TOWNS`) on
both hemispheres, a few km off their centre; times spread over the months.

- fMoW: every scene has a 256 px ``_rgb`` and a 128 px ``_msrgb`` view of the same picture
  (twice the GSD); content dedup keeps the larger ``_rgb``, so the truth expects the
  ``_msrgb`` row as a duplicate (method ``phash``) in the pair's ``duplicate_group``. A few
  scenes are in ``fmow-full`` as 16-bit TIFFs: 3-band ``_rgb`` and 4-band (B, G, R, NIR) or
  8-band (WorldView order) ``_msrgb``, paired the same way.
- BigEarthNet: 12 band GeoTIFFs at their real sizes (10 m bands 120x120, 20 m 60x60, 60 m
  20x20), uint16 reflectance x 10000 made from the scene so that the source's default
  stretch (``max_reflectance`` 0.3) gives back the scene's pixels exactly; real UTM CRSs in
  both hemispheres (e.g. EPSG:32633, EPSG:32723, EPSG:32756), the grid snapped to 60 m.
- MillionAID: two thirds of the pictures under ``train/<l1>/<l2>/<leaf>/``, the rest in
  ``test/``.

Planted bad entries (:data:`PLANTED_KINDS`, each with where it must end): an fMoW JSON
without its image, an image without its JSON, JSON that is not JSON, a JSON list, a JSON
missing ``raw_location``, a bow-tie footprint, a footprint off the globe, a truncated JPEG; a
BigEarthNet patch without B03, one whose GeoTIFFs have no CRS, one all zeros; a MillionAID
"JPEG" that is HTML. Same seed → byte-identical files (GeoTIFFs carry no timestamps).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import posixpath
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.demo import scenes
from pipelines.demo.local import _TRUTH_SCHEMA as _LOCAL_TRUTH_SCHEMA
from pipelines.demo.truth import fresh_part, tally, write_truth

FOLDER = "rs3"
TRUTH = "rs3_truth.parquet"
STREAM = 8001  # seed stream of RS3 scenes (pub11.py uses 1-11, local 7001, benchmarks 9001)
MIN_PHASH_DISTANCE = 12
MAX_COPY_DISTANCE = 2  # an _msrgb view is within this many bits of its _rgb
JPEG_QUALITY = 90
FMOW_SIDE, FMOW_MS_SIDE = 256, 128
BEN_SIDE = 120
MILLIONAID_SIDE = 256
BEN_MAX_REFLECTANCE = 0.3  # the DNs are made so that this stretch returns the scene
_ATTEMPTS = 30

FMOW_RGB, FMOW_FULL, BEN, MILLIONAID = "fmow-rgb", "fmow-full", "bigearthnet", "millionaid"

#: scene class → fMoW category (classes without an fMoW counterpart are not used for fMoW)
FMOW_CATEGORY: dict[str, str] = {
    "airport": "airport",
    "parking_lot": "parking_lot_or_garage",
    "lake": "lake_or_pond",
    "farmland": "crop_field",
    "residential": "single-unit_residential",
    "highway": "interchange",
    "harbor": "port",
    "industrial": "factory_or_powerplant",
    "baseball_field": "recreational_facility",
}
#: scene class → BigEarthNet (CORINE Land Cover, 43-class nomenclature) labels
CORINE: dict[str, list[str]] = {
    "forest": ["Coniferous forest", "Mixed forest"],
    "lake": ["Water bodies"],
    "farmland": ["Non-irrigated arable land"],
    "residential": ["Discontinuous urban fabric"],
    "airport": ["Airports"],
    "highway": ["Non-irrigated arable land", "Road and rail networks and associated land"],
    "beach": ["Beaches, dunes, sands", "Sea and ocean"],
    "parking_lot": ["Industrial or commercial units"],
    "industrial": ["Industrial or commercial units"],
    "desert": ["Sparsely vegetated areas"],
    "river": ["Water courses"],
    "baseball_field": ["Sport and leisure facilities"],
    "harbor": ["Port areas", "Sea and ocean"],
}
#: scene class → MillionAID-style class path (level 1, level 2, leaf), folder names
MILLIONAID_PATH: dict[str, tuple[str, str, str]] = {
    "forest": ("agriculture_land", "woodland", "forest"),
    "lake": ("water_area", "lake", "lake"),
    "farmland": ("agriculture_land", "arable_land", "dry_field"),
    "residential": ("residential_land", "detached_house", "detached_house"),
    "airport": ("transportation_land", "airport_area", "apron"),
    "parking_lot": ("transportation_land", "highway_area", "parking_lot"),
    "industrial": ("industrial_land", "factory_area", "works"),
    "desert": ("unutilized_land", "desert", "desert"),
    "river": ("water_area", "river", "river"),
    "beach": ("water_area", "beach", "beach"),
    "baseball_field": ("public_service_land", "sports_land", "baseball_field"),
}

#: (town, lat, lon, ISO 3166 alpha-3): inland spots near real towns, both hemispheres
FMOW_TOWNS: tuple[tuple[str, float, float, str], ...] = (
    ("Winterthur", 47.4999, 8.7262, "CHE"),
    ("Nairobi", -1.2921, 36.8219, "KEN"),
    ("Munich", 48.1351, 11.5820, "DEU"),
    ("Cordoba", -31.4201, -64.1888, "ARG"),
    ("Krakow", 50.0647, 19.9450, "POL"),
    ("Campinas", -22.9099, -47.0626, "BRA"),
    ("Denver", 39.7392, -104.9903, "USA"),
    ("Canberra", -35.2809, 149.1300, "AUS"),
    ("Pune", 18.5204, 73.8567, "IND"),
    ("Bloemfontein", -29.0852, 26.1596, "ZAF"),
    ("Toulouse", 43.6047, 1.4442, "FRA"),
    ("Arequipa", -16.4090, -71.5375, "PER"),
    ("Wichita", 37.6872, -97.3301, "USA"),
    ("Mendoza", -32.8895, -68.8458, "ARG"),
    ("Brno", 49.1951, 16.6068, "CZE"),
    ("Johannesburg", -26.2041, 28.0473, "ZAF"),
    ("Madrid", 40.4168, -3.7038, "ESP"),
    ("Brasilia", -15.7939, -47.8828, "BRA"),
    ("Ottawa", 45.4215, -75.6972, "CAN"),
    ("Alice Springs", -23.6980, 133.8807, "AUS"),
)
#: (town, lat, lon): BigEarthNet's Europe plus two southern UTM zones (23S, 56S)
BEN_TOWNS: tuple[tuple[str, float, float], ...] = (
    ("Vienna", 48.2082, 16.3738),      # 33N
    ("Sao Paulo", -23.5505, -46.6333),  # 23S
    ("Santarem", 39.2369, -8.6850),    # 29N
    ("Parramatta", -33.8150, 151.0011),  # 56S
    ("Helsinki", 60.1699, 24.9384),    # 35N
    ("Campinas", -22.9099, -47.0626),  # 23S
    ("Belgrade", 44.7866, 20.4489),    # 34N
    ("Maitland", -32.7316, 151.5525),  # 56S
    ("Naas", 53.2159, -6.6669),        # 29N
    ("Bern", 46.9480, 7.4474),         # 32N
)

#: planted kind → (source, expected, expected stage, expected reason)
PLANTED_KINDS: dict[str, tuple[str, str, str | None, str | None]] = {
    "fmow_json_without_image": (FMOW_RGB, "rejected", "read", "image_missing"),
    "fmow_image_without_json": (FMOW_RGB, "rejected", "read", "json_missing"),
    "fmow_json_not_json": (FMOW_RGB, "rejected", "read", "json_malformed"),
    "fmow_json_list": (FMOW_RGB, "rejected", "read", "json_malformed"),
    "fmow_json_missing_key": (FMOW_RGB, "rejected", "read", "json_malformed"),
    "fmow_footprint_invalid": (FMOW_RGB, "rejected", "read", "footprint_invalid"),
    "fmow_off_globe": (FMOW_RGB, "rejected", "read", "off_globe"),
    "fmow_truncated_jpeg": (FMOW_RGB, "rejected", "decode", "truncated_image"),
    "ben_band_missing": (BEN, "rejected", "read", "band_missing"),
    "ben_no_crs": (BEN, "rejected", "read", "no_crs"),
    "ben_all_nodata": (BEN, "rejected", "read", "all_nodata"),
    "millionaid_not_an_image": (MILLIONAID, "rejected", "decode", "not_an_image"),
}

#: BigEarthNet v1.0 bands and their pixel size in metres
BEN_BANDS: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10,
    "B09": 60, "B11": 20, "B12": 20, "B8A": 20,
}

# local's truth columns, plus the entry's place (footprint or patch centre) and hemisphere
_TRUTH_COLUMNS = [*_LOCAL_TRUTH_SCHEMA,
                  ("lat", pa.float64()), ("lon", pa.float64()), ("hemisphere", pa.string())]
_TRUTH_SCHEMA = pa.schema(_TRUTH_COLUMNS)

_MGRS_BANDS = "CDEFGHJKLMNPQRSTUVWX"


def _rng(seed: int, i: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM, i, attempt])


def utm_zone(lon: float) -> int:
    return int((lon + 180.0) // 6.0) % 60 + 1


def mgrs_band(lat: float) -> str:
    """The MGRS latitude band letter (C..X, 8° each from 80°S; X runs to 84°N)."""
    return _MGRS_BANDS[max(0, min(int((lat + 80.0) // 8.0), len(_MGRS_BANDS) - 1))]


def utm_epsg(lat: float, lon: float) -> int:
    return (32600 if lat >= 0 else 32700) + utm_zone(lon)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _tiff(arr: np.ndarray, crs: Any = None, transform: Any = None) -> bytes:
    """(bands, rows, cols) uint16 → GeoTIFF bytes (deflate; GDAL writes no timestamps)."""
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile
    from rasterio.transform import Affine

    c, h, w = arr.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=w, height=h, count=c, dtype="uint16",
                          crs=crs, transform=transform or Affine.identity(),
                          compress="deflate") as ds:
                ds.write(arr.astype(np.uint16))
            return bytes(mem.getbuffer())


def _hex(h: int) -> str:
    return f"{h:016x}"


# ----------------------------------------------------------------------------- the pool


def _pool(out_dir: str) -> Any:
    """The crop-aware pHash pool of every PUB11 and ``local`` picture already in the world."""
    from pipelines.demo.pub11 import _hashes, _PhashPool

    pool = _PhashPool()
    paths = []
    gt_path = os.path.join(out_dir, "ground_truth.parquet")
    if os.path.exists(gt_path):
        gt = pq.read_table(gt_path, columns=["image", "phash"]).to_pylist()
        paths += [os.path.join(out_dir, "www", "img", n)
                  for n in sorted({r["image"] for r in gt if r["image"] and r["phash"]})]
    local_path = os.path.join(out_dir, "local_truth.parquet")
    if os.path.exists(local_path):
        lt = pq.read_table(local_path, columns=["image"]).to_pylist()
        paths += [os.path.join(out_dir, "local", n)
                  for n in sorted({r["image"] for r in lt if r["image"]})]
    for p in paths:
        if not os.path.isfile(p):
            continue
        with Image.open(p) as im:
            h, crops = _hashes(im)
        pool.add(h, crops)
    return pool


def _decoded_hashes(body: bytes) -> tuple[int, list[int]]:
    """(pHash, crop pHashes) of ``body`` as the decode stage computes them."""
    from pipelines.stages.images import normalise_image, split_hashes

    out = normalise_image(body)
    phash = getattr(out, "phash", None)
    if phash is None:
        raise RuntimeError(f"a demo picture does not decode: {out}")
    return int(phash, 16), split_hashes(out.phash_crops)


# ----------------------------------------------------------------------------- the world


class _Rs3:
    def __init__(self, out_dir: str, seed: int) -> None:
        self.out = out_dir
        self.root = os.path.join(out_dir, FOLDER)
        self.seed = seed
        self.pool = _pool(out_dir)
        self.truth: list[dict[str, Any]] = []

    def write(self, rel: str, data: bytes) -> str:
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return rel

    def add(self, source: str, source_id: str, **t: Any) -> dict[str, Any]:
        from pipelines.records import make_key

        kind = t.pop("planted", None)
        if kind:
            _, expected, stage, reason = PLANTED_KINDS[kind]
        else:
            expected, stage, reason = t.pop("expect", ("kept", None, None))
        lat = t.get("lat")
        row = {"source": source, "row": len(self.truth), "source_id": source_id,
               "key": make_key(source, source_id), "url": None, "caption": None,
               "is_rs": t.pop("is_rs", True), "planted": kind, "expected": expected,
               "expected_stage": stage, "expected_reason": reason,
               "hemisphere": None if lat is None else ("N" if lat >= 0 else "S"), **t}
        self.truth.append(row)
        return row

    def distinct(self, i: int, draw: Any) -> Any:
        """``draw(rng)`` → (bodies..., result) until every body is far from the pool; the
        bodies' hashes then join the pool. ``draw`` returns (list of bodies, result)."""
        for attempt in range(_ATTEMPTS):
            bodies, result = draw(_rng(self.seed, i, attempt))
            hashes = [_decoded_hashes(b) for b in bodies]
            if len(hashes) > 1 and any(
                    (h[0] ^ hashes[0][0]).bit_count() > MAX_COPY_DISTANCE for h in hashes[1:]):
                continue  # a resized view that drifted: draw again
            if all(self.pool.min_distance(h, c) >= MIN_PHASH_DISTANCE for h, c in hashes):
                for h, c in hashes:
                    self.pool.add(h, c)
                return hashes, result
        raise RuntimeError(f"no distinct RS3 scene after {_ATTEMPTS} draws (#{i})")


def _offset(rng: np.random.Generator, lat: float, lon: float, km: float = 3.0
            ) -> tuple[float, float]:
    """A point up to ``km`` from (lat, lon), 6 decimals."""
    d = rng.uniform(0.3, km) * 1000.0
    a = rng.uniform(0, 2 * math.pi)
    dlat = d * math.cos(a) / 111_320.0
    dlon = d * math.sin(a) / (111_320.0 * math.cos(math.radians(lat)))
    return round(lat + dlat, 6), round(lon + dlon, 6)


def _when(i: int, start: dt.datetime, rng: np.random.Generator) -> dt.datetime:
    """A time ``i`` steps of ~5 weeks after ``start``, at a daytime hour."""
    t = start + dt.timedelta(days=37 * i + int(rng.integers(0, 20)))
    return t.replace(hour=int(rng.integers(8, 14)), minute=int(rng.integers(0, 60)),
                     second=int(rng.integers(0, 60)))


# ----------------------------------------------------------------------------- fMoW


def _footprint_wkt(lat: float, lon: float, extent_m: float) -> str:
    dlat = extent_m / 2 / 111_320.0
    dlon = extent_m / 2 / (111_320.0 * math.cos(math.radians(lat)))
    ring = [(lon - dlon, lat + dlat), (lon + dlon, lat + dlat), (lon + dlon, lat - dlat),
            (lon - dlon, lat - dlat), (lon - dlon, lat + dlat)]
    return "POLYGON ((" + ", ".join(f"{x:.6f} {y:.6f}" for x, y in ring) + "))"


def _fmow_doc(*, filename: str, side: int, gsd: float, lat: float, lon: float, country: str,
              when: dt.datetime, category: str, box: list[int], box_id: int,
              rng: np.random.Generator, decoy: bool) -> dict[str, Any]:
    boxes = [{"ID": box_id, "box": box, "category": category,
              "raw_location": _footprint_wkt(lat, lon, max(box[2], box[3]) * gsd)}]
    if decoy:  # a false detection listed first: the target is the box after it
        boxes.insert(0, {"ID": box_id + 500, "box": [0, 0, side // 8, side // 8],
                         "category": "false_detection",
                         "raw_location": _footprint_wkt(lat, lon, side // 8 * gsd)})
    return {
        "bounding_boxes": boxes,
        "cloud_cover": int(rng.integers(0, 35)),
        "country_code": country,
        "gsd": round(gsd, 4),
        "img_filename": filename,
        "img_height": side,
        "img_width": side,
        "multi_resolution_dbl": round(gsd * 4, 4),
        "off_nadir_angle_dbl": round(float(rng.uniform(4, 32)), 3),
        "pan_resolution_dbl": round(gsd, 4),
        "raw_location": _footprint_wkt(lat, lon, side * gsd),
        "scan_direction": "Forward" if rng.random() < 0.5 else "Reverse",
        "sun_azimuth_dbl": round(float(rng.uniform(0, 360)), 3),
        "sun_elevation_dbl": round(float(rng.uniform(20, 75)), 3),
        "target_azimuth_dbl": round(float(rng.uniform(0, 360)), 3),
        "timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "utm": f"{utm_zone(lon)}{mgrs_band(lat)}",
    }


def _fmow_place(w: _Rs3, i: int) -> dict[str, Any]:
    town, lat, lon, country = FMOW_TOWNS[i % len(FMOW_TOWNS)]
    rng = _rng(w.seed, i, 999)
    lat, lon = _offset(rng, lat, lon)
    gsd = round(float(rng.uniform(0.4, 0.8)), 3)
    side = FMOW_SIDE
    bw, bh = int(rng.integers(side // 5, side // 2)), int(rng.integers(side // 5, side // 2))
    box = [int(rng.integers(0, side - bw)), int(rng.integers(0, side - bh)), bw, bh]
    when = _when(i % 36, dt.datetime(2015, 1, 3), rng)
    return {"town": town, "lat": lat, "lon": lon, "country": country, "gsd": gsd, "box": box,
            "when": when, "meta_rng": rng}


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


def _fmow_pair_docs(place: dict[str, Any], stem: str, category: str, i: int, ext: str,
                    decoy: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = place["meta_rng"]
    common = {"lat": place["lat"], "lon": place["lon"], "country": place["country"],
              "when": place["when"], "category": category, "box_id": 1000 + i,
              "rng": rng, "decoy": decoy}
    rgb = _fmow_doc(filename=f"{stem}_rgb.{ext}", side=FMOW_SIDE, gsd=place["gsd"],
                    box=place["box"], **common)
    half = [v * FMOW_MS_SIDE // FMOW_SIDE for v in place["box"]]
    ms = _fmow_doc(filename=f"{stem}_msrgb.{ext}", side=FMOW_MS_SIDE,
                   gsd=place["gsd"] * FMOW_SIDE / FMOW_MS_SIDE, box=half, **common)
    # one acquisition: the views share their angles, clouds and time
    for k in ("cloud_cover", "off_nadir_angle_dbl", "sun_azimuth_dbl", "sun_elevation_dbl",
              "target_azimuth_dbl", "scan_direction"):
        ms[k] = rgb[k]
    return rgb, ms


def _fmow_classes() -> list[str]:
    return [c for c in scenes.CLASSES if c in FMOW_CATEGORY]


def _write_fmow_pair(w: _Rs3, source: str, ext: str, i: int, stem: str, cat: str, cls: str,
                     files: tuple[bytes, bytes], hashes: Any, meta: dict[str, Any],
                     decoy: bool) -> None:
    """An fMoW entry's ``_rgb`` and ``_msrgb`` images with their JSON, and their truth: the
    msrgb image, the same capture, ends as a pHash duplicate of the rgb one."""
    place = _fmow_place(w, i)
    doc_rgb, doc_ms = _fmow_pair_docs(place, posixpath.basename(stem), cat, i, ext, decoy=decoy)
    base = f"{source}/{stem}"
    for variant, data, doc in (("rgb", files[0], doc_rgb), ("msrgb", files[1], doc_ms)):
        w.write(f"{base}_{variant}.{ext}", data)
        w.write(f"{base}_{variant}.json", _json_bytes(doc))
    common = {"scene_class": cls, "duplicate_group": f"{source}:{stem}", "lat": place["lat"],
              "lon": place["lon"], "objects": json.dumps(meta["objects"], sort_keys=True)}
    w.add(source, f"{stem}_rgb", image=f"{FOLDER}/{base}_rgb.{ext}", width=FMOW_SIDE,
          height=FMOW_SIDE, phash=_hex(hashes[0][0]), **common)
    w.add(source, f"{stem}_msrgb", image=f"{FOLDER}/{base}_msrgb.{ext}",
          width=FMOW_MS_SIDE, height=FMOW_MS_SIDE, phash=_hex(hashes[1][0]),
          expect=("duplicate", "dedup", "phash"), **common)


def _build_fmow_rgb(w: _Rs3, n: int) -> None:
    classes = _fmow_classes()
    for i in range(n):
        cls = classes[i % len(classes)]
        cat = FMOW_CATEGORY[cls]
        stem = f"train/{cat}/{cat}_{i}/{cat}_{i}_0"

        def draw(rng: np.random.Generator, cls: str = cls) -> Any:
            img, meta = scenes.render_scene(cls, rng, FMOW_SIDE)
            small = img.resize((FMOW_MS_SIDE, FMOW_MS_SIDE), Image.Resampling.LANCZOS)
            rgb, ms = _jpeg(img), _jpeg(small)
            return [rgb, ms], (rgb, ms, meta)

        hashes, (rgb, ms, meta) = w.distinct(i, draw)
        _write_fmow_pair(w, FMOW_RGB, "jpg", i, stem, cat, cls, (rgb, ms), hashes, meta,
                         decoy=i % 5 == 1)


def _uint16_bands(img: Image.Image, n_bands: int, rng: np.random.Generator) -> np.ndarray:
    """An 8-bit RGB picture → (n_bands, H, W) uint16 11-bit DNs in fMoW-full's band order:
    3 = R, G, B; 4 = B, G, R, NIR; 8 = coastal, B, G, yellow, R, red edge, NIR1, NIR2."""
    a = np.asarray(img, dtype=np.float64)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    gain, offset = rng.uniform(5.5, 7.5), rng.uniform(40, 90)

    def dn(x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(offset + gain * x), 1, 2047)

    nir = np.clip(1.4 * g - 0.3 * r + 20, 0, 255)
    if n_bands == 3:
        bands = [r, g, b]
    elif n_bands == 4:
        bands = [b, g, r, nir]
    else:
        bands = [0.9 * b + 10, b, g, (r + g) / 2, r, (r + nir) / 2, nir, 0.9 * nir]
    return np.stack([dn(x) for x in bands]).astype(np.uint16)


def _build_fmow_full(w: _Rs3, n: int) -> None:
    from pipelines.sources.fmow import tiff_body

    classes = _fmow_classes()
    for j in range(n):
        i = 3000 + j
        cls = classes[(j * 4 + 2) % len(classes)]
        cat = FMOW_CATEGORY[cls]
        stem = f"train/{cat}/{cat}_{j}/{cat}_{j}_0"
        n_ms = 8 if j % 2 == 0 else 4

        def draw(rng: np.random.Generator, cls: str = cls, n_ms: int = n_ms) -> Any:
            img, meta = scenes.render_scene(cls, rng, FMOW_SIDE)
            small = img.resize((FMOW_MS_SIDE, FMOW_MS_SIDE), Image.Resampling.LANCZOS)
            rgb_tif = _tiff(_uint16_bands(img, 3, rng))
            ms_tif = _tiff(_uint16_bands(small, n_ms, rng))
            # what the source hands Decode: the stretched PNG
            bodies = [tiff_body(rgb_tif)[0], tiff_body(ms_tif)[0]]
            return bodies, (rgb_tif, ms_tif, meta)

        hashes, (rgb, ms, meta) = w.distinct(i, draw)
        _write_fmow_pair(w, FMOW_FULL, "tif", i, stem, cat, cls, (rgb, ms), hashes, meta,
                         decoy=False)


def _build_fmow_planted(w: _Rs3) -> None:
    classes = _fmow_classes()
    kinds = [k for k in PLANTED_KINDS if k.startswith("fmow_")]
    for j, kind in enumerate(kinds):
        i = 5000 + j
        cls = classes[j % len(classes)]
        cat = FMOW_CATEGORY[cls]
        stem = f"train/{cat}/{cat}_{900 + j}/{cat}_{900 + j}_0"
        img, _ = scenes.render_scene(cls, _rng(w.seed, i), FMOW_SIDE)
        place = _fmow_place(w, i)
        doc, _ = _fmow_pair_docs(place, posixpath.basename(stem), cat, i, "jpg", decoy=False)
        jpeg = _jpeg(img)
        json_bytes = _json_bytes(doc)
        if kind == "fmow_json_not_json":
            json_bytes = json_bytes[: len(json_bytes) // 2]
        elif kind == "fmow_json_list":
            json_bytes = _json_bytes([doc])
        elif kind == "fmow_json_missing_key":
            json_bytes = _json_bytes({k: v for k, v in doc.items() if k != "raw_location"})
        elif kind == "fmow_footprint_invalid":  # a bow tie: the ring crosses itself
            lat, lon = place["lat"], place["lon"]
            doc["raw_location"] = (f"POLYGON (({lon:.6f} {lat:.6f}, {lon + 0.01:.6f} "
                                   f"{lat + 0.01:.6f}, {lon + 0.01:.6f} {lat:.6f}, "
                                   f"{lon:.6f} {lat + 0.01:.6f}, {lon:.6f} {lat:.6f}))")
            json_bytes = _json_bytes(doc)
        elif kind == "fmow_off_globe":
            doc["raw_location"] = _footprint_wkt(place["lat"], 200.0, FMOW_SIDE * place["gsd"])
            json_bytes = _json_bytes(doc)
        elif kind == "fmow_truncated_jpeg":
            jpeg = jpeg[: len(jpeg) // 2]
        base = f"{FMOW_RGB}/{stem}"
        if kind != "fmow_json_without_image":
            w.write(f"{base}_rgb.jpg", jpeg)
        if kind != "fmow_image_without_json":
            w.write(f"{base}_rgb.json", json_bytes)
        image = None if kind == "fmow_json_without_image" else f"{FOLDER}/{base}_rgb.jpg"
        w.add(FMOW_RGB, f"{stem}_rgb", planted=kind, scene_class=cls, image=image,
              lat=place["lat"], lon=place["lon"])


# ----------------------------------------------------------------------------- BigEarthNet


def _ben_bands(img: Image.Image) -> dict[str, np.ndarray]:
    """The scene → every band's (rows, cols) uint16 reflectance x 10000, at its size. B04,
    B03, B02 are the scene's R, G, B at ``BEN_MAX_REFLECTANCE`` = 255; the others are
    plausible mixes (vegetation bright in NIR), box-averaged to 20 m / 60 m."""
    a = np.asarray(img, dtype=np.float64) / 255.0 * BEN_MAX_REFLECTANCE
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    nir = np.clip(1.6 * g - 0.4 * r + 0.05, 0, 0.6)
    full = {"B02": b, "B03": g, "B04": r, "B08": nir, "B01": 0.9 * b + 0.01,
            "B05": (r + nir) / 2, "B06": 0.3 * r + 0.7 * nir, "B07": 0.9 * nir,
            "B8A": 0.95 * nir, "B09": 0.3 * nir, "B11": 0.6 * r + 0.2 * nir + 0.02,
            "B12": 0.5 * r + 0.05}
    out = {}
    for band, res in BEN_BANDS.items():
        x = full[band]
        k = res // 10
        if k > 1:
            x = x.reshape(BEN_SIDE // k, k, BEN_SIDE // k, k).mean(axis=(1, 3))
        out[band] = np.clip(np.rint(x * 10000.0), 0, 10000).astype(np.uint16)
    return out


def _ben_grid(lat: float, lon: float) -> dict[str, Any]:
    """The patch's UTM CRS and upper-left corner (snapped to 60 m) around (lat, lon), and
    its centre back in WGS84."""
    from rasterio.crs import CRS
    from rasterio.warp import transform

    epsg = utm_epsg(lat, lon)
    crs = CRS.from_epsg(epsg)
    xs, ys = transform("EPSG:4326", crs, [lon], [lat])
    side_m = BEN_SIDE * 10
    ulx = math.floor((xs[0] - side_m / 2) / 60.0) * 60
    uly = math.ceil((ys[0] + side_m / 2) / 60.0) * 60
    cx, cy = transform(crs, "EPSG:4326", [ulx + side_m / 2], [uly - side_m / 2])
    return {"epsg": epsg, "crs": crs, "ulx": ulx, "uly": uly, "lon": round(cx[0], 6),
            "lat": round(cy[0], 6)}


def _ben_patch(w: _Rs3, i: int, img: Image.Image, labels: list[str], *, crs: bool = True,
               skip: tuple[str, ...] = (), zeros: bool = False) -> dict[str, Any]:
    from rasterio.transform import Affine

    town, lat0, lon0 = BEN_TOWNS[i % len(BEN_TOWNS)]
    rng = _rng(w.seed, i, 999)
    lat, lon = _offset(rng, lat0, lon0, km=2.0)
    grid = _ben_grid(lat, lon)
    when = _when(i % 12, dt.datetime(2017, 6, 1), rng)
    sat = "A" if i % 2 == 0 else "B"
    patch = f"S2{sat}_MSIL2A_{when:%Y%m%dT%H%M%S}_{10 + i % 80}_{(7 * i) % 90}"
    bands = _ben_bands(img)
    zone = utm_zone(lon)
    for band, arr in bands.items():
        if band in skip:
            continue
        res = BEN_BANDS[band]
        t = Affine(res, 0, grid["ulx"], 0, -res, grid["uly"])
        data = np.zeros_like(arr) if zeros else arr
        w.write(f"{BEN}/{patch}/{patch}_{band}.tif",
                _tiff(data[None], grid["crs"] if crs else None, t))
    doc = {
        "acquisition_date": when.strftime("%Y-%m-%d %H:%M:%S"),
        "coordinates": {"lrx": grid["ulx"] + BEN_SIDE * 10, "lry": grid["uly"] - BEN_SIDE * 10,
                        "ulx": grid["ulx"], "uly": grid["uly"]},
        "labels": labels,
        "projection": grid["crs"].to_wkt(),
        "tile_source": (f"S2{sat}_MSIL1C_{when:%Y%m%dT%H%M%S}_N0205_R{22 + i % 100:03d}_"
                        f"T{zone:02d}{mgrs_band(lat)}XP_{when:%Y%m%dT%H%M%S}"),
    }
    w.write(f"{BEN}/{patch}/{patch}_labels_metadata.json", _json_bytes(doc))
    return {"patch": patch, "lat": grid["lat"], "lon": grid["lon"], "epsg": grid["epsg"],
            "town": town}


def _build_ben(w: _Rs3, n: int) -> None:
    from pipelines.sources.archives import encode_png, stretch_reflectance

    for i in range(n):
        cls = scenes.CLASSES[i % len(scenes.CLASSES)]

        def draw(rng: np.random.Generator, cls: str = cls) -> Any:
            img, meta = scenes.render_scene(cls, rng, BEN_SIDE)
            b = _ben_bands(img)
            # what the source hands Decode: B04/B03/B02 through its default stretch
            body = encode_png(stretch_reflectance(np.stack([b["B04"], b["B03"], b["B02"]]),
                                                  BEN_MAX_REFLECTANCE))
            return [body], (img, meta)

        hashes, (img, meta) = w.distinct(1000 + i, draw)
        p = _ben_patch(w, 1000 + i, img, CORINE[cls])
        w.add(BEN, p["patch"], scene_class=cls, image=f"{FOLDER}/{BEN}/{p['patch']}",
              width=BEN_SIDE, height=BEN_SIDE, phash=_hex(hashes[0][0]), lat=p["lat"],
              lon=p["lon"], objects=json.dumps(meta["objects"], sort_keys=True))
    planted = {"ben_band_missing": {"skip": ("B03",)}, "ben_no_crs": {"crs": False},
               "ben_all_nodata": {"zeros": True}}
    for j, (kind, kw) in enumerate(planted.items()):
        i = 6000 + j
        cls = scenes.CLASSES[(3 * j + 1) % len(scenes.CLASSES)]
        img, _ = scenes.render_scene(cls, _rng(w.seed, i), BEN_SIDE)
        p = _ben_patch(w, i, img, CORINE[cls], **kw)
        w.add(BEN, p["patch"], planted=kind, scene_class=cls,
              image=f"{FOLDER}/{BEN}/{p['patch']}", lat=p["lat"], lon=p["lon"])


# ----------------------------------------------------------------------------- MillionAID


def _build_millionaid(w: _Rs3, n: int) -> None:
    classes = [c for c in scenes.CLASSES if c in MILLIONAID_PATH]
    n_train = (2 * n + 2) // 3
    for i in range(n):
        cls = classes[i % len(classes)]
        name = f"P{100_000 + 37 * i:07d}"
        rel = (f"train/{'/'.join(MILLIONAID_PATH[cls])}/{name}" if i < n_train
               else f"test/{name}")

        def draw(rng: np.random.Generator, cls: str = cls) -> Any:
            img, meta = scenes.render_scene(cls, rng, MILLIONAID_SIDE)
            body = _jpeg(img)
            return [body], (body, meta)

        hashes, (body, meta) = w.distinct(2000 + i, draw)
        w.write(f"{MILLIONAID}/{rel}.jpg", body)
        w.add(MILLIONAID, rel, scene_class=cls, image=f"{FOLDER}/{MILLIONAID}/{rel}.jpg",
              width=MILLIONAID_SIDE, height=MILLIONAID_SIDE, phash=_hex(hashes[0][0]),
              objects=json.dumps(meta["objects"], sort_keys=True))
    rel = "test/P9999990"
    w.write(f"{MILLIONAID}/{rel}.jpg",
            b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
            b"<body><h1>Not Found</h1></body></html>\n")
    w.add(MILLIONAID, rel, planted="millionaid_not_an_image", is_rs=False,
          image=f"{FOLDER}/{MILLIONAID}/{rel}.jpg")


# ----------------------------------------------------------------------------- entry point


def build_rs3(out_dir: str, seed: int = 0, n_fmow: int = 24, n_ben: int = 24,
              n_millionaid: int = 24) -> dict[str, Any]:
    """Write the RS3 archives and their truth into ``out_dir`` (a world folder; see the
    module docstring). ``n_fmow`` fMoW scenes (each an ``_rgb`` + ``_msrgb`` pair in
    fmow-rgb; ``max(2, n_fmow // 8)`` more pairs in fmow-full), ``n_ben`` BigEarthNet
    patches, ``n_millionaid`` MillionAID images, plus the planted entries.

    Returns ``{"rows", "by_source": {source: rows}, "expected": {outcome: rows},
    "planted": {kind: rows}, "roots": {"fmow": "DIR,DIR", "bigearthnet": DIR,
    "millionaid": DIR}, "truth": path}`` (the roots are what the recipe's ``--fmow``,
    ``--bigearthnet``, ``--millionaid`` flags take)."""
    if min(n_fmow, n_ben, n_millionaid) < 1:
        raise ValueError("n_fmow, n_ben and n_millionaid must be at least 1")
    root, truth_path = fresh_part(out_dir, FOLDER, TRUTH)
    w = _Rs3(out_dir, seed)
    _build_fmow_rgb(w, n_fmow)
    _build_fmow_full(w, max(2, n_fmow // 8))
    _build_fmow_planted(w)
    _build_ben(w, n_ben)
    _build_millionaid(w, n_millionaid)
    rows = write_truth(w.truth, _TRUTH_SCHEMA, truth_path)

    return {
        "rows": len(rows),
        "by_source": tally(rows, "source"),
        "expected": tally(rows, "expected"),
        "planted": tally(rows, "planted"),
        "roots": {"fmow": f"{root}/{FMOW_RGB},{root}/{FMOW_FULL}",
                  "bigearthnet": f"{root}/{BEN}", "millionaid": f"{root}/{MILLIONAID}"},
        "truth": truth_path,
    }
