"""fMoW (Functional Map of the World: fmow-rgb JPEGs, fmow-full TIFFs) → RS3 records.

Layout (``{train,val,test,seq}/{category}/{category}_{n}/{category}_{n}_{k}_{rgb|msrgb}.{jpg|
tif}``, a ``.json`` beside every image): every ``*_{variant}.{jpg,jpeg,tif,tiff}`` under a root
is an entry, for the ``variants`` asked for (``rgb``, ``msrgb``), and so is a
``*_{variant}.json`` without its image (rejected ``image_missing``). A record's ``source`` is
``fmow-rgb`` for a JPEG, ``fmow-full`` for a TIFF (a JSON without an image takes the kind of
its root: ``fmow-full`` when the root holds any TIFF); its ``source_id`` is the image's path
below the root without the extension, so keys are stable, and ``url`` its full path (the
JSON's for an ``image_missing`` row).

Pixels (``_body``): a JPEG's own bytes. A TIFF is read with rasterio from its bytes
(:func:`pipelines.sources.archives.read_raster`: checked against ``max_pixels`` from the
header, read decimated above ``max_side``); its RGB bands, chosen by band count, are

============  ==================================================  =================
bands         what the fMoW-full file holds                       R, G, B (1-based)
============  ==================================================  =================
3             ``_rgb``: pan-sharpened red, green, blue            1, 2, 3
4             ``_msrgb`` from 4-band sensors (QuickBird's         3, 2, 1
              order): blue, green, red, NIR
8             ``_msrgb`` from WorldView-2/3: coastal, blue,        5, 3, 2
              green, yellow, red, red edge, NIR1, NIR2
1             grey                                                1, 1, 1
============  ==================================================  =================

(any other count: ``image_unreadable``). What was checked, with ``search``: the WorldView-2/3
8-band order (coastal, blue, green, yellow, red, red-edge, NIR-1, NIR-2) and the QuickBird
4-band order (blue, green, red, NIR-1), as tabulated in DynaSlum/satsense
``satsense/bands.py`` (0-based there: red 4, green 2, blue 1 for WorldView; red 2, green 1,
blue 0 for QuickBird); a second public table (an R script's WorldView-2 band list: 1 Coastal,
2 Blue, 3 Green, 4 Yellow, 5 Red, ...) agrees. fMoW's own repository (fMoW/dataset) says
fmow-full holds "4-band and 8-band multispectral imagery" and fmow-rgb the same imagery
"converted to RGB". Not found: public fMoW code that reads the ``_msrgb`` TIFFs themselves,
so that the files keep the sensors' native band order is an assumption (the band count, not
the file name, decides). 8-bit bands are used as they are; 16-bit (11-bit DN) bands get the
per-band 2-98 percentile stretch (:func:`~pipelines.sources.archives.stretch_percentile`,
deterministic), then the picture is encoded as PNG (lossless).

Metadata (the JSON beside the image): ``img_width``/``img_height`` → ``_pixel_size``; ``gsd``
→ ``gsd_m``; ``timestamp`` → ``acquired`` (``YYYY-MM-DDTHH:MM:SSZ``, UTC); ``raw_location`` (a
WKT polygon in lon lat) → ``_footprint`` (the exterior ring as ``[[lon, lat], ...]``);
``bounding_boxes`` → ``_target_box`` (``[x, y, w, h]`` of the first box whose category is not
``false_detection``, else the first box) and ``labels`` (``[that box's category]``, else the
category folder of the path, else None); ``country_code``, ``utm`` (raw: zone + MGRS band
letter), ``cloud_cover``, ``off_nadir_angle_dbl``, ``target_azimuth_dbl``,
``sun_azimuth_dbl``, ``sun_elevation_dbl``, ``scan_direction`` → ``_meta``; ``img_filename``,
``pan_resolution_dbl``, ``multi_resolution_dbl``, the target box's ``ID``, the variant and
any other top-level key → ``extra`` (JSON). Required keys: :data:`REQUIRED_KEYS`; the others
may be missing (None).

License: ``"Functional Map of the World Challenge Public License"``, the title of the licence
text in the fMoW/dataset repository's ``LICENSE`` (also the licence a Hugging Face copy,
jbourcier/fmow-rgb-baseline, names); checked with ``search``.

Rejects (stage ``read``): ``image_missing`` (a JSON without its image), ``json_missing`` (an
image without its JSON), ``json_malformed`` (not JSON, a list, a required key missing or of
the wrong type), ``footprint_invalid`` (``raw_location`` is no valid polygon),
``off_globe`` (a footprint coordinate outside lon -180..180 / lat -90..90), ``too_large``
(a file over ``max_bytes``, a raster over ``max_pixels``), ``image_unreadable``.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import posixpath
import re
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines.sources import archives
from pipelines.sources.archives import ArchiveError, Outcome, base_record, rejected
from pipelines.sources.laion import MAX_EXTRA_BYTES, _jsonable

LICENSE = "Functional Map of the World Challenge Public License"
SOURCE_RGB = "fmow-rgb"
SOURCE_FULL = "fmow-full"
VARIANTS = ("rgb", "msrgb")
JPEG_EXTS = (".jpg", ".jpeg")
TIFF_EXTS = (".tif", ".tiff")
FALSE_DETECTION = "false_detection"

#: keys without which an fMoW JSON is ``json_malformed``
REQUIRED_KEYS = ("img_width", "img_height", "gsd", "timestamp", "raw_location",
                 "bounding_boxes")
#: JSON keys copied to ``_meta``
META_KEYS = ("country_code", "utm", "cloud_cover", "off_nadir_angle_dbl",
             "target_azimuth_dbl", "sun_azimuth_dbl", "sun_elevation_dbl", "scan_direction")
#: (R, G, B) band indexes (1-based) by band count, see the module docstring
RGB_BANDS = {3: [1, 2, 3], 4: [3, 2, 1], 8: [5, 3, 2], 1: [1, 1, 1]}

_NAME = re.compile(r"^(?P<stem>.+)_(?P<variant>rgb|msrgb)\.(?P<ext>[A-Za-z]+)$")


# --- listing ------------------------------------------------------------------------------


def list_entries(files: dict[str, int], root: str,
                 variants: tuple[str, ...] = VARIANTS) -> list[dict[str, Any]]:
    """The entries of an fMoW root from its file listing (``{rel path: size}``): one per
    image of a wanted variant, and one per JSON without its image; sorted by source_id."""
    images: dict[str, tuple[str, int]] = {}  # rel stem (…_rgb) → (rel image path, size)
    jsons: dict[str, tuple[str, int]] = {}
    has_tiff = False
    for rel, size in files.items():
        m = _NAME.match(posixpath.basename(rel))
        if not m or m["variant"] not in variants:
            continue
        ext = "." + m["ext"].lower()
        stem = posixpath.splitext(rel)[0]
        if ext in JPEG_EXTS + TIFF_EXTS:
            has_tiff |= ext in TIFF_EXTS
            prev = images.get(stem)
            if prev is None or rel < prev[0]:  # two images of one stem: the first, by name
                images[stem] = (rel, size)
        elif ext == ".json":
            jsons[stem] = (rel, size)
    items = []
    for stem in sorted(set(images) | set(jsons)):
        img = images.get(stem)
        js = jsons.get(stem)
        if img:
            ext = posixpath.splitext(img[0])[1].lower()
            source = SOURCE_FULL if ext in TIFF_EXTS else SOURCE_RGB
        else:
            source = SOURCE_FULL if has_tiff else SOURCE_RGB
        items.append({
            "source": source,
            "source_id": stem,
            "url": archives.rel_join(root, img[0] if img else js[0]),
            "root": root,
            "image": img[0] if img else None,
            "image_size": img[1] if img else None,
            "json": js[0] if js else None,
            "json_size": js[1] if js else None,
            "variant": _NAME.match(posixpath.basename((img or js)[0]))["variant"],
        })
    return items


def list_root(root: str, variants: tuple[str, ...] = VARIANTS) -> list[dict[str, Any]]:
    return list_entries(archives.list_files(root), root, variants)


# --- metadata -----------------------------------------------------------------------------


def _number(doc: dict[str, Any], key: str, *, required: bool = False) -> float | None:
    v = doc.get(key)
    if v is None:
        if required:
            raise ArchiveError("json_malformed", f"{key} is missing")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ArchiveError("json_malformed", f"{key} is {str(v)[:40]!r}, not a number")
    return float(v)


def _dimension(doc: dict[str, Any], key: str) -> int:
    v = _number(doc, key, required=True)
    if v is None or v <= 0 or v != int(v):
        raise ArchiveError("json_malformed", f"{key} is {doc.get(key)!r}, not a positive size")
    return int(v)


def iso_timestamp(value: Any) -> str:
    """fMoW's ``timestamp`` (ISO 8601, UTC) as ``YYYY-MM-DDTHH:MM:SSZ``."""
    if not isinstance(value, str) or not value.strip():
        raise ArchiveError("json_malformed", f"timestamp is {value!r}")
    try:
        t = dt.datetime.fromisoformat(value.strip().replace("z", "Z"))
    except ValueError as e:
        raise ArchiveError("json_malformed", f"timestamp {value[:40]!r} is not ISO 8601") from e
    if t.tzinfo is not None:
        t = t.astimezone(dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_footprint(wkt: Any) -> list[list[float]]:
    """``raw_location`` (WKT polygon, lon lat) → its exterior ring ``[[lon, lat], ...]``.

    ``footprint_invalid``: not a string, not WKT, not a (single) polygon, empty, non-finite
    or self-intersecting; ``off_globe``: a vertex outside lon -180..180 / lat -90..90."""
    import shapely
    from shapely import wkt as shapely_wkt
    from shapely.geometry import MultiPolygon, Polygon

    if not isinstance(wkt, str) or not wkt.strip():
        raise ArchiveError("footprint_invalid", f"raw_location is {str(wkt)[:60]!r}")
    try:
        geom = shapely_wkt.loads(wkt)
    except Exception as e:  # shapely raises several kinds on bad WKT
        raise ArchiveError("footprint_invalid", f"raw_location is not WKT: {wkt[:60]!r}") from e
    if isinstance(geom, MultiPolygon) and len(geom.geoms) == 1:
        geom = geom.geoms[0]
    if not isinstance(geom, Polygon) or geom.is_empty:
        raise ArchiveError("footprint_invalid",
                           f"raw_location is a {geom.geom_type}, not a polygon")
    ring = [[float(x), float(y)] for x, y, *_ in geom.exterior.coords]
    if not all(math.isfinite(v) for p in ring for v in p):
        raise ArchiveError("footprint_invalid", "raw_location has non-finite coordinates")
    off = [p for p in ring if not (-180 <= p[0] <= 180 and -90 <= p[1] <= 90)]
    if off:
        raise ArchiveError("off_globe", f"raw_location vertex lon {off[0][0]:g} lat "
                                        f"{off[0][1]:g} is off the globe")
    if not geom.is_valid:
        reason = shapely.is_valid_reason(geom)
        raise ArchiveError("footprint_invalid", f"raw_location is not a valid polygon "
                                                f"({reason})")
    return ring


def target_box(boxes: Any) -> tuple[list[float] | None, str | None, Any]:
    """(``[x, y, w, h]``, category, ID) of the target: the first box whose category is not
    ``false_detection``, else the first box; (None, None, None) for no boxes."""
    if not isinstance(boxes, list):
        raise ArchiveError("json_malformed", f"bounding_boxes is a {type(boxes).__name__}, "
                                             "not a list")
    if not boxes:
        return None, None, None
    for i, b in enumerate(boxes):
        if not isinstance(b, dict):
            raise ArchiveError("json_malformed", f"bounding_boxes[{i}] is not an object")
    pick = next((b for b in boxes if b.get("category") != FALSE_DETECTION), boxes[0])
    box = pick.get("box")
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in box)):
        raise ArchiveError("json_malformed", f"the target box is {str(box)[:60]!r}, not "
                                             "[x, y, w, h]")
    if box[2] < 0 or box[3] < 0:
        raise ArchiveError("json_malformed", f"the target box {box} has a negative size")
    cat = pick.get("category")
    return ([float(v) for v in box], cat if isinstance(cat, str) and cat else None,
            pick.get("ID"))


def folder_category(rel: str) -> str | None:
    """``train/airport/airport_0/airport_0_1_rgb.jpg`` → ``airport`` (None if the path does
    not have fMoW's ``{category}/{category}_{n}/`` folders)."""
    parts = rel.split("/")
    if len(parts) >= 3 and parts[-2].startswith(parts[-3] + "_"):
        return parts[-3]
    return None


def parse_metadata(doc: dict[str, Any], rel: str, variant: str) -> dict[str, Any]:
    """The record fields an fMoW JSON gives (see the module docstring); raises
    :class:`ArchiveError` (``json_malformed``, ``footprint_invalid``, ``off_globe``)."""
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ArchiveError("json_malformed", f"missing {', '.join(missing)}")
    width, height = _dimension(doc, "img_width"), _dimension(doc, "img_height")
    gsd = _number(doc, "gsd", required=True)
    acquired = iso_timestamp(doc["timestamp"])
    box, category, box_id = target_box(doc["bounding_boxes"])
    meta: dict[str, Any] = {}
    for k in META_KEYS:
        v = doc.get(k)
        if k in ("country_code", "utm", "scan_direction"):
            if v is not None and not isinstance(v, str):
                raise ArchiveError("json_malformed", f"{k} is {str(v)[:40]!r}, not text")
            meta[k] = v
        else:
            meta[k] = _number(doc, k)
    footprint = parse_footprint(doc["raw_location"])
    label = category or folder_category(rel)
    used = set(REQUIRED_KEYS) | set(META_KEYS)
    extra = {"variant": variant, "target_id": _jsonable(box_id)}
    extra.update({str(k): _jsonable(v) for k, v in doc.items() if k not in used})
    extra_json = json.dumps(extra, sort_keys=True, ensure_ascii=False)
    if len(extra_json.encode()) > MAX_EXTRA_BYTES:
        extra_json = json.dumps({"variant": variant, "target_id": _jsonable(box_id)},
                                sort_keys=True)
    return {
        "_pixel_size": [width, height],
        "gsd_m": gsd,
        "acquired": acquired,
        "_target_box": box,
        "labels": [label] if label else None,
        "_meta": meta,
        "_footprint": footprint,
        "extra": extra_json,
    }


# --- pixels -------------------------------------------------------------------------------


def tiff_body(data: bytes, *, max_side: int = archives.DEFAULT_MAX_SIDE,
              max_pixels: int | None = None, what: str = "tiff"
              ) -> tuple[bytes, archives.Raster]:
    """An fMoW-full TIFF → (PNG bytes of its RGB picture, the raster read)."""

    def pick(count: int) -> list[int]:
        if count not in RGB_BANDS:
            raise ArchiveError("image_unreadable",
                               f"{what} has {count} bands (fMoW-full has 3, 4 or 8)")
        return RGB_BANDS[count]

    raster = archives.read_raster(data, pick, max_side=max_side, max_pixels=max_pixels,
                                  what=what)
    if raster.dtype == "uint8":
        rgb = np.ascontiguousarray(np.moveaxis(raster.data, 0, -1))
    else:
        rgb = archives.stretch_percentile(raster.data)
    return archives.encode_png(rgb), raster


# --- one entry ----------------------------------------------------------------------------


def read_entry(item: dict[str, Any], *, subset: str, max_bytes: int = archives.DEFAULT_MAX_BYTES,
               max_side: int = archives.DEFAULT_MAX_SIDE, max_pixels: int | None = None
               ) -> Outcome:
    """One listed entry (:func:`list_entries`) → a record, or (record, Reject)."""
    root = item["root"]
    rec = base_record(item["source"], item["source_id"], item["url"], subset, LICENSE)
    if not item.get("image"):
        return rejected(rec, "image_missing",
                        f"{posixpath.basename(item['json'])} has no image beside it")
    if not item.get("json"):
        return rejected(rec, "json_missing",
                        f"{posixpath.basename(item['image'])} has no .json beside it")
    try:
        archives.check_size(item["url"], item.get("image_size") or 0, max_bytes)
        doc = archives.read_json_doc(archives.rel_join(root, item["json"]))
        rec.update(parse_metadata(doc, item["image"], item["variant"]))
        data = archives.read_capped(item["url"], max_bytes)
        if item["source"] == SOURCE_FULL:
            body, raster = tiff_body(data, max_side=max_side, max_pixels=max_pixels,
                                     what=posixpath.basename(item["image"]))
            if raster.crs is not None:
                rec["crs"] = archives.crs_name(raster.crs)
                rec["_geo"] = archives.geo_of(raster)
            rec["_body"] = body
        else:
            rec["_body"] = data
    except ArchiveError as e:
        return rejected(rec, e.reason, e.detail)
    return rec


class ReadFmow(beam.PTransform):
    """fMoW roots (comma-separated local, gs:// or s3:// folders) → ``{"records",
    "rejects"}``. ``variants``: which of ``rgb``/``msrgb`` to read."""

    def __init__(self, roots: str, subset: str = "rs3", variants: Any = VARIANTS,
                 max_bytes: int = archives.DEFAULT_MAX_BYTES,
                 max_side: int = archives.DEFAULT_MAX_SIDE, max_pixels: int | None = None
                 ) -> None:
        super().__init__()
        if isinstance(variants, str):
            variants = [v.strip() for v in variants.split(",") if v.strip()]
        variants = tuple(variants)
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown or not variants:
            raise ValueError(f"fMoW variants must be among {VARIANTS}, not {list(variants)}")
        if max_bytes <= 0 or max_side <= 0:
            raise ValueError("max_bytes and max_side must be positive")
        self.roots = archives.split_roots(roots)
        archives.check_roots(self.roots)
        self.subset = subset
        self.variants = variants
        self.max_bytes = max_bytes
        self.max_side = max_side
        self.max_pixels = max_pixels

    def expand(self, pbegin: Any) -> Any:
        return pbegin | "Fmow" >> archives.ReadArchive(
            self.roots,
            functools.partial(list_root, variants=self.variants),
            functools.partial(read_entry, subset=self.subset, max_bytes=self.max_bytes,
                              max_side=self.max_side, max_pixels=self.max_pixels),
            self.subset, LICENSE, "read_fmow")
