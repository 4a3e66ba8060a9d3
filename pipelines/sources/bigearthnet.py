"""BigEarthNet-S2 (v1.0) patches → RS3 records, reduced to RGB.

Layout: one folder per patch, ``S2{A|B}_MSIL2A_{YYYYMMDDTHHMMSS}_{row}_{col}/``, holding the
band GeoTIFFs ``{patch}_B01.tif`` … ``_B12.tif``, ``_B8A.tif`` (10 m bands 120x120 px, 20 m
60x60, 60 m 20x20; L2A surface reflectance x 10000 as uint16) and
``{patch}_labels_metadata.json`` (``labels``: CORINE names; ``coordinates``
``{ulx, uly, lrx, lry}``; ``projection``: WKT; ``tile_source``; ``acquisition_date``
``"YYYY-MM-DD HH:MM:SS"``). Every folder under a root that holds ``{folder}_labels_metadata
.json`` or a ``{folder}_B??.tif`` is a patch (at any depth: a root may be the archive or a
folder of archives). ``source`` is ``bigearthnet``, ``source_id`` the patch folder's name,
``url`` the folder's full path.

Pixels: ``_B04`` (red), ``_B03`` (green), ``_B02`` (blue), each read with rasterio from its
bytes, composed with the fixed reflectance stretch
``RGB = rint(clip(DN / 10000 / max_reflectance, 0, 1) * 255)``
(:func:`~pipelines.sources.archives.stretch_reflectance`; ``max_reflectance`` is the recipe
flag ``--ben_max_reflectance``, default 0.3: the usual "true colour" range of L2A land
reflectance, one scale for every patch so colours compare across patches), encoded as PNG.

Georeferencing comes from the B04 GeoTIFF itself, not the JSON: ``crs`` ("EPSG:32633", or
the CRS's own string when it has no EPSG code), ``_geo`` (that CRS, B04's affine transform
``[a, b, c, d, e, f]``, width, height) and ``gsd_m`` (the transform's pixel size, 10.0).
``acquired`` is ``acquisition_date`` in ISO form (``2017-06-13T10:10:31``); ``labels`` the
JSON's CORINE names; ``_meta`` keeps ``tile_source``, ``projection`` and ``coordinates``;
``_pixel_size`` is B04's size.

License: ``"CDLA-Permissive-1.0"`` (Community Data License Agreement – Permissive 1.0), as
published for BigEarthNet (the licence shown on the EarthNets BigEarthNet dataset cards on
Hugging Face); checked with ``search``.

Rejects (stage ``read``): ``band_missing`` (which of B02/B03/B04 is absent),
``json_missing``, ``json_malformed`` (not a JSON object; ``labels`` missing or not a list
of names; a bad ``acquisition_date``), ``image_unreadable`` (a band GDAL cannot read, with
several bands, or of another size than B04), ``no_crs`` (B04 has no CRS),
``all_nodata`` (every pixel 0 in all three bands), ``too_large``.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import posixpath
import re
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines.sources import archives
from pipelines.sources.archives import ArchiveError, Outcome, base_record, rejected
from pipelines.sources.laion import _jsonable

LICENSE = "CDLA-Permissive-1.0"
SOURCE = "bigearthnet"
#: red, green, blue: the bands read, in this order
RGB_BANDS = ("B04", "B03", "B02")
DEFAULT_MAX_REFLECTANCE = 0.3
JSON_SUFFIX = "_labels_metadata.json"
META_KEYS = ("tile_source", "projection", "coordinates")

_BAND = re.compile(r"^(?P<patch>.+)_(?P<band>B(?:0[1-9]|1[0-2]|8A))\.tif{1,2}$", re.IGNORECASE)


# --- listing ------------------------------------------------------------------------------


def list_patches(files: dict[str, int], root: str) -> list[dict[str, Any]]:
    """The patches of a BigEarthNet root from its listing (``{rel path: size}``), sorted by
    folder: ``{"bands": {"B04": (rel, size), ...}, "json": (rel, size) | None, ...}``."""
    patches: dict[str, dict[str, Any]] = {}
    for rel, size in files.items():
        folder, name = posixpath.split(rel)
        patch = posixpath.basename(folder)
        if not patch:
            continue
        if name == patch + JSON_SUFFIX:
            patches.setdefault(folder, {"bands": {}, "json": None})["json"] = [rel, size]
            continue
        m = _BAND.match(name)
        if m and m["patch"] == patch:
            p = patches.setdefault(folder, {"bands": {}, "json": None})
            p["bands"][m["band"].upper()] = [rel, size]
    items = []
    for folder in sorted(patches):
        p = patches[folder]
        items.append({
            "source": SOURCE,
            "source_id": posixpath.basename(folder),
            "url": archives.rel_join(root, folder),
            "root": root,
            "bands": {b: p["bands"][b] for b in sorted(p["bands"])},
            "json": p["json"],
        })
    return items


def list_root(root: str) -> list[dict[str, Any]]:
    return list_patches(archives.list_files(root), root)


# --- metadata -----------------------------------------------------------------------------


def iso_acquisition(value: Any) -> str | None:
    """``"2017-06-13 10:10:31"`` → ``"2017-06-13T10:10:31"``; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ArchiveError("json_malformed", f"acquisition_date is {str(value)[:40]!r}")
    try:
        t = dt.datetime.fromisoformat(value.strip())
    except ValueError as e:
        raise ArchiveError("json_malformed",
                           f"acquisition_date {value[:40]!r} is not a date and time") from e
    if t.tzinfo is not None:
        t = t.astimezone(dt.UTC).replace(tzinfo=None)
    return t.strftime("%Y-%m-%dT%H:%M:%S")


def parse_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    """The record fields a ``labels_metadata.json`` gives (labels, acquired, _meta)."""
    if "labels" not in doc:
        raise ArchiveError("json_malformed", "missing labels")
    labels = doc["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise ArchiveError("json_malformed", f"labels is {str(labels)[:60]!r}, not a list of "
                                             "names")
    acquired = iso_acquisition(doc.get("acquisition_date"))
    meta = {k: _jsonable(doc.get(k)) for k in META_KEYS}
    used = {"labels", "acquisition_date", *META_KEYS}
    extra = {str(k): _jsonable(v) for k, v in doc.items() if k not in used}
    return {
        "labels": list(labels) or None,
        "acquired": acquired,
        "_meta": meta,
        "extra": json.dumps(extra, sort_keys=True, ensure_ascii=False) if extra else None,
    }


# --- pixels -------------------------------------------------------------------------------


def compose_rgb(red: archives.Raster, green: archives.Raster, blue: archives.Raster,
                max_reflectance: float = DEFAULT_MAX_REFLECTANCE) -> np.ndarray:
    """Three single-band rasters → (H, W, 3) uint8 by the fixed reflectance stretch;
    ``image_unreadable`` when they differ in size, ``all_nodata`` when all are 0."""
    shapes = {r.data.shape for r in (red, green, blue)}
    if len(shapes) != 1:
        raise ArchiveError("image_unreadable", f"B04/B03/B02 differ in size: {sorted(shapes)}")
    stack = np.concatenate([red.data, green.data, blue.data], axis=0)
    if not np.any(stack):
        raise ArchiveError("all_nodata", "every pixel of B04, B03 and B02 is 0")
    return archives.stretch_reflectance(stack, max_reflectance)


# --- one patch ----------------------------------------------------------------------------


def read_patch(item: dict[str, Any], *, subset: str,
               max_reflectance: float = DEFAULT_MAX_REFLECTANCE,
               max_bytes: int = archives.DEFAULT_MAX_BYTES,
               max_side: int = archives.DEFAULT_MAX_SIDE, max_pixels: int | None = None
               ) -> Outcome:
    """One listed patch (:func:`list_patches`) → a record, or (record, Reject)."""
    root = item["root"]
    patch = item["source_id"]
    rec = base_record(SOURCE, patch, item["url"], subset, LICENSE)
    missing = [b for b in RGB_BANDS if b not in item["bands"]]
    if missing:
        return rejected(rec, "band_missing",
                        ", ".join(f"{patch}_{b}.tif" for b in missing) + " missing")
    if not item.get("json"):
        return rejected(rec, "json_missing", f"{patch}{JSON_SUFFIX} missing")
    try:
        for b in RGB_BANDS:
            rel, size = item["bands"][b]
            archives.check_size(archives.rel_join(root, rel), size, max_bytes)
        doc = archives.read_json_doc(archives.rel_join(root, item["json"][0]))
        rec.update(parse_metadata(doc))
        rasters = {}
        for b in RGB_BANDS:
            data = archives.read_capped(archives.rel_join(root, item["bands"][b][0]), max_bytes)
            raster = archives.read_raster(data, None, max_side=max_side, max_pixels=max_pixels,
                                          what=f"{patch}_{b}.tif")
            if raster.count != 1:
                raise ArchiveError("image_unreadable",
                                   f"{patch}_{b}.tif has {raster.count} bands, not 1")
            rasters[b] = raster
        red = rasters["B04"]
        if red.crs is None:
            return rejected(rec, "no_crs", f"{patch}_B04.tif has no CRS")
        rgb = compose_rgb(red, rasters["B03"], rasters["B02"], max_reflectance)
    except ArchiveError as e:
        return rejected(rec, e.reason, e.detail)
    rec["crs"] = archives.crs_name(red.crs)
    rec["_geo"] = archives.geo_of(red)
    rec["gsd_m"] = archives.pixel_size_m(red.transform)
    rec["_pixel_size"] = [red.width, red.height]
    rec["_body"] = archives.encode_png(rgb)
    return rec


class ReadBigEarthNet(beam.PTransform):
    """BigEarthNet roots (comma-separated local, gs:// or s3:// folders) → ``{"records",
    "rejects"}``; ``max_reflectance`` is the RGB stretch's top (``--ben_max_reflectance``)."""

    def __init__(self, roots: str, subset: str = "rs3",
                 max_reflectance: float = DEFAULT_MAX_REFLECTANCE,
                 max_bytes: int = archives.DEFAULT_MAX_BYTES,
                 max_side: int = archives.DEFAULT_MAX_SIDE, max_pixels: int | None = None
                 ) -> None:
        super().__init__()
        if not max_reflectance > 0:
            raise ValueError("max_reflectance must be positive")
        if max_bytes <= 0 or max_side <= 0:
            raise ValueError("max_bytes and max_side must be positive")
        self.roots = archives.split_roots(roots)
        archives.check_roots(self.roots)
        self.subset = subset
        self.max_reflectance = float(max_reflectance)
        self.max_bytes = max_bytes
        self.max_side = max_side
        self.max_pixels = max_pixels

    def expand(self, pbegin: Any) -> Any:
        return pbegin | "BigEarthNet" >> archives.ReadArchive(
            self.roots, list_root,
            functools.partial(read_patch, subset=self.subset,
                              max_reflectance=self.max_reflectance, max_bytes=self.max_bytes,
                              max_side=self.max_side, max_pixels=self.max_pixels),
            self.subset, LICENSE, "read_bigearthnet")
