"""What the label-only archive readers (fMoW, BigEarthNet, MillionAID) share.

The three readers (:mod:`pipelines.sources.fmow`, :mod:`~pipelines.sources.bigearthnet`,
:mod:`~pipelines.sources.millionaid`) are the RS3 head's sources. Each one is a pure
*lister* (``root -> work items``: JSON-able dicts naming the files of one entry, sorted) and
a pure *reader* (``item -> record`` or ``(record, Reject)``); :class:`ReadArchive` is the
thin Beam wrapper both plug into. What lives here:

- **Listing** through ``FileSystems.match`` (``root/**``), so local paths, gs:// and s3://
  list alike. Each file comes with its size from the listing, so a file over the byte cap
  is refused (``too_large``) without being opened.
- **Capped reads** (:func:`read_capped`): at most ``max_bytes`` (default 1 GiB) of any file
  are read, whatever the listing said (a file may grow between listing and reading).
- **Rasters from bytes** (:func:`read_raster`): a TIFF's bytes opened with
  ``rasterio.io.MemoryFile`` (no temporary file, no sidecar lookups). Its size is checked
  from the header against ``max_pixels`` (``ImageConfig.max_pixels``, PIL's 89.5 MP) before
  any pixel is read, and a raster wider or taller than ``max_side`` (default 4096) is read
  *decimated* (``out_shape``, GDAL's average resampling), so a 40,000 px strip never
  decodes in full: the decode stage shrinks to 256 px anyway.
- **8-bit stretches** of 16-bit bands, both deterministic (same bands, same bytes):
  :func:`stretch_percentile` (per band, the 2nd..98th percentile of the valid pixels onto
  0..255; fMoW-full, whose DNs are uncalibrated 11-bit counts) and
  :func:`stretch_reflectance` (a fixed reflectance scale; BigEarthNet's L2A reflectance).
- **PNG encoding** (:func:`encode_png`): lossless, no metadata chunks, fixed compression,
  so the bytes ``Decode`` reads depend on the pixels only.
- **The reject helper** (:func:`rejected`): every bad entry is a counted row at stage
  ``read``, never an exception: ``image_missing``, ``image_unreadable``, ``json_missing``,
  ``json_malformed``, ``footprint_invalid``, ``off_globe``, ``band_missing``, ``no_crs``,
  ``all_nodata``, ``too_large``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import posixpath
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipelines.records import MAIN, REJECTS, Reject, new_record, reject_row
from pipelines.sinks.shards import join

STAGE = "read"
#: the most bytes one file of an archive may have (a BigEarthNet band is ~30 KB, an fMoW-full
#: 8-band strip a few hundred MB)
DEFAULT_MAX_BYTES = 1 << 30
#: a raster wider or taller than this is read decimated to fit (the decode stage keeps 256 px)
DEFAULT_MAX_SIDE = 4096
#: the most bytes of a metadata JSON (real ones are a few KB)
MAX_JSON_BYTES = 16 << 20
#: the percentiles of :func:`stretch_percentile`
PERCENTILES = (2.0, 98.0)
#: BigEarthNet stores L2A surface reflectance x 10000 as uint16
REFLECTANCE_SCALE = 10000.0

REASONS = (
    "image_missing",
    "image_unreadable",
    "json_missing",
    "json_malformed",
    "footprint_invalid",
    "off_globe",
    "band_missing",
    "no_crs",
    "all_nodata",
    "too_large",
)

Outcome = dict[str, Any] | tuple[dict[str, Any], Reject]


class ArchiveError(Exception):
    """A bad entry: ``reason`` is one of :data:`REASONS` (caught and turned into a reject)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


# --- records ------------------------------------------------------------------------------


def base_record(source: str, source_id: str, url: str | None, subset: str,
                license: str | None) -> dict[str, Any]:
    """A record with every field the archive sources set (see ``pipelines.recipes.rs3``),
    empty where the entry has not been read yet."""
    return new_record(
        subset, source, source_id, url, license=license, caption=None, labels=None,
        acquired=None, gsd_m=None, crs=None, extra=None, _pixel_size=None, _footprint=None,
        _geo=None, _target_box=None, _meta=None, _body=None,
        # input order for stages that keep the first of a repeated key
        _order=f"{source}\x1f{source_id}")


def rejected(record: dict[str, Any], reason: str, detail: str | None = None
             ) -> tuple[dict[str, Any], Reject]:
    """``(record, Reject)`` at stage ``read``; the record loses its image bytes."""
    record["_body"] = None
    return record, Reject(STAGE, reason, detail)


def tagged(out: Outcome) -> Any:
    """A reader's outcome as the Beam output: the record, or its reject row under REJECTS."""
    if isinstance(out, tuple):
        record, rej = out
        return beam.pvalue.TaggedOutput(REJECTS, reject_row(record, rej))
    return out


# --- listing and reading ------------------------------------------------------------------


def split_roots(roots: str | Iterable[str]) -> list[str]:
    """``"a,b"`` (or a list) → archive roots, trailing slashes gone, local ones absolute."""
    parts = roots.split(",") if isinstance(roots, str) else list(roots)
    out = []
    for p in (str(x).strip() for x in parts):
        if not p:
            continue
        p = p.rstrip("/") or "/"
        out.append(p if "://" in p else os.path.abspath(p))
    if not out:
        raise ValueError(f"no archive roots in {roots!r}")
    return out


def check_roots(roots: list[str]) -> None:
    """Fail at construction, before any worker starts, when a local root is not a folder."""
    for r in roots:
        if "://" not in r and not os.path.isdir(r):
            raise FileNotFoundError(f"archive root {r} does not exist or is not a folder")


def list_files(root: str) -> dict[str, int]:
    """``{relative POSIX path: size in bytes}`` of every file under ``root``."""
    prefix = root.rstrip("/") + "/"
    out: dict[str, int] = {}
    for m in FileSystems.match([prefix + "**"])[0].metadata_list:
        if m.path.startswith(prefix):
            out[m.path[len(prefix):]] = int(m.size_in_bytes or 0)
    return dict(sorted(out.items()))


def read_capped(path: str, max_bytes: int) -> bytes:
    """The bytes of ``path`` (any Beam filesystem), at most ``max_bytes`` of them.

    Raises :class:`ArchiveError` ``too_large`` past the cap and ``image_unreadable`` when the
    file cannot be read."""
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            data = f.read(max_bytes + 1)
    except Exception as e:  # any filesystem's error: a counted row
        raise ArchiveError("image_unreadable", f"{path}: {type(e).__name__}: {e}") from e
    if len(data) > max_bytes:
        raise ArchiveError("too_large", f"{path} exceeds max_bytes {max_bytes}")
    return data


def read_json_doc(path: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A metadata JSON object; ``json_malformed`` when it is not one (a list, bad text)."""
    try:
        data = read_capped(path, max_bytes)
    except ArchiveError as e:
        raise ArchiveError("json_malformed" if e.reason == "too_large" else e.reason,
                           e.detail) from e
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ArchiveError("json_malformed", f"{posixpath.basename(path)}: not JSON "
                                             f"({type(e).__name__}: {str(e)[:120]})") from e
    if not isinstance(doc, dict):
        raise ArchiveError("json_malformed", f"{posixpath.basename(path)}: a JSON "
                                             f"{type(doc).__name__}, not an object")
    return doc


def check_size(path: str, size: int, max_bytes: int) -> None:
    """``too_large`` from the listed size, before the file is opened."""
    if size > max_bytes:
        raise ArchiveError("too_large", f"{path} has {size} bytes > max_bytes {max_bytes}")


# --- rasters ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Raster:
    """Bands read from a TIFF: ``data`` (bands, rows, cols), maybe decimated; the rest
    describes the raster as stored (full size)."""

    data: np.ndarray
    width: int  # of the stored raster
    height: int
    count: int
    dtype: str
    crs: Any  # rasterio CRS or None
    transform: tuple[float, float, float, float, float, float]  # Affine a..f, full size
    decimated: bool


def read_raster(data: bytes,
                indexes: list[int] | Callable[[int], list[int]] | None = None, *,
                max_side: int = DEFAULT_MAX_SIDE, max_pixels: int | None = None,
                what: str = "raster") -> Raster:
    """Bands ``indexes`` (1-based; all when None; a callable gets the band count and returns
    them, or raises :class:`ArchiveError`) of the TIFF in ``data``.

    The pixel count is checked from the header first (``too_large`` above ``max_pixels``);
    a raster with a side over ``max_side`` is read decimated with ``out_shape`` so that its
    longer side is ``max_side`` (GDAL average resampling: nothing larger is ever held).
    Raises :class:`ArchiveError` ``image_unreadable`` for bytes GDAL cannot read or an
    index the raster lacks."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    if max_pixels is None:
        from pipelines.stages.images import ImageConfig

        max_pixels = ImageConfig().max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), \
                    MemoryFile(data) as mem, mem.open() as ds:
                w, h, count = ds.width, ds.height, ds.count
                if w * h > max_pixels:
                    raise ArchiveError("too_large", f"{what} is {w}x{h} = {w * h} pixels > "
                                                    f"max_pixels {max_pixels}")
                if callable(indexes):
                    idx = list(indexes(count))
                else:
                    idx = list(indexes) if indexes else list(range(1, count + 1))
                bad = [i for i in idx if not 1 <= i <= count]
                if bad:
                    raise ArchiveError("image_unreadable",
                                       f"{what} has {count} bands, no band {bad[0]}")
                out_shape = None
                if max(w, h) > max_side:
                    scale = max_side / max(w, h)
                    out_shape = (len(idx), max(1, round(h * scale)), max(1, round(w * scale)))
                arr = ds.read(idx, out_shape=out_shape, resampling=Resampling.average)
                t = ds.transform
                return Raster(data=arr, width=w, height=h, count=count,
                              dtype=str(ds.dtypes[0]), crs=ds.crs,
                              transform=(t.a, t.b, t.c, t.d, t.e, t.f),
                              decimated=out_shape is not None)
    except ArchiveError:
        raise
    except Exception as e:  # GDAL's errors on hostile bytes: a counted row
        raise ArchiveError("image_unreadable", f"{what}: {type(e).__name__}: "
                                               f"{str(e)[:200]}") from e


def crs_name(crs: Any) -> str | None:
    """``"EPSG:32633"`` when the CRS has an EPSG code, else its own string; None for none."""
    if crs is None:
        return None
    try:
        code = crs.to_epsg()
    except Exception:  # noqa: BLE001 — a CRS PROJ cannot match to a code
        code = None
    return f"EPSG:{code}" if code else crs.to_string()


def pixel_size_m(transform: tuple[float, ...]) -> float:
    """Ground size of a pixel along a row, in CRS units (metres for UTM): ``sqrt(a² + d²)``."""
    a, _b, _c, d, _e, _f = transform
    return float(math.hypot(a, d))


def geo_of(raster: Raster) -> dict[str, Any]:
    """The ``_geo`` working field of a raster with a CRS (full-size transform)."""
    return {"crs": crs_name(raster.crs), "transform": [float(v) for v in raster.transform],
            "width": raster.width, "height": raster.height}


# --- stretches and encoding ---------------------------------------------------------------


def stretch_percentile(bands: np.ndarray, percentiles: tuple[float, float] = PERCENTILES
                       ) -> np.ndarray:
    """(3, H, W) bands of any numeric type → (H, W, 3) uint8, each band stretched linearly
    from its ``percentiles[0]``-th to its ``percentiles[1]``-th percentile (numpy's linear
    percentile) onto 0..255, rounded half to even, clipped.

    Percentiles are taken over the valid pixels: those not 0 in every band (0 is the no-data
    fill of fMoW's strips); invalid pixels stay 0. A band that is flat over the valid pixels
    maps to 0 below its value and 255 at or above it."""
    arr = np.asarray(bands, dtype=np.float64)
    valid = np.any(arr != 0, axis=0)
    out = np.zeros(arr.shape[1:] + (arr.shape[0],), dtype=np.uint8)
    if not valid.any():
        return out
    for i in range(arr.shape[0]):
        v = arr[i][valid]
        lo, hi = np.percentile(v, percentiles)
        scaled = (arr[i] - lo) / (hi - lo) if hi > lo else np.where(arr[i] >= lo, 1.0, 0.0)
        band = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0)
        out[..., i] = np.where(valid, band, 0).astype(np.uint8)
    return out


def stretch_reflectance(bands: np.ndarray, max_reflectance: float = 0.3,
                        scale: float = REFLECTANCE_SCALE) -> np.ndarray:
    """(3, H, W) DNs (reflectance x ``scale``) → (H, W, 3) uint8:
    ``rint(clip(DN / scale / max_reflectance, 0, 1) * 255)`` (rounded half to even).

    A fixed scale, the same for every patch, so colours compare across patches: with the
    default 0.3, reflectance 0 → 0, 0.15 → 128 (127.5 rounds to even), 0.3 and above → 255."""
    if not max_reflectance > 0:
        raise ValueError("max_reflectance must be positive")
    arr = np.asarray(bands, dtype=np.float64)
    refl = arr / scale / max_reflectance
    out = np.rint(np.clip(refl, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def encode_png(rgb: np.ndarray, compress_level: int = 6) -> bytes:
    """(H, W, 3) uint8 → PNG bytes: no metadata chunks, fixed compression (same pixels, same
    bytes). ``compress_level=0`` stores the pixels uncompressed: for a picture that only
    crosses to the next stage in the same worker (~20x faster than level 6 on imagery)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(
        buf, "PNG", optimize=False, compress_level=compress_level)
    return buf.getvalue()


# --- the Beam wrapper ---------------------------------------------------------------------


def outcome_of(reader: Callable[[dict[str, Any]], Outcome], item: dict[str, Any],
               subset: str, license: str | None) -> Outcome:
    """``reader(item)``, with anything it raises turned into an ``image_unreadable`` row, so
    one bad entry never takes the bundle down."""
    try:
        return reader(item)
    except Exception as e:  # noqa: BLE001 — a bug or an unforeseen file: count it, go on
        rec = base_record(item["source"], item["source_id"], item.get("url"), subset, license)
        return rejected(rec, "image_unreadable", f"{type(e).__name__}: {str(e)[:200]}")


class _List(beam.DoFn):
    def __init__(self, lister: Callable[[str], list[dict[str, Any]]]) -> None:
        self.lister = lister

    def process(self, root: str) -> Iterator[dict[str, Any]]:
        items = self.lister(root)
        if not items:
            raise FileNotFoundError(f"{root}: no archive entries found")
        yield from items


class _Read(beam.DoFn):
    def __init__(self, reader: Callable[[dict[str, Any]], Outcome], subset: str,
                 license: str | None, stage_name: str) -> None:
        self.reader = reader
        self.subset = subset
        self.license = license
        self.stage_name = stage_name
        self._counters: dict[str, Any] = {}

    def _count(self, name: str) -> None:
        c = self._counters.get(name)
        if c is None:
            c = self._counters[name] = beam.metrics.Metrics.counter(self.stage_name, name)
        c.inc()

    def process(self, item: dict[str, Any]) -> Iterator[Any]:
        out = outcome_of(self.reader, item, self.subset, self.license)
        self._count(out[1].reason if isinstance(out, tuple) else "ok")
        yield tagged(out)


class ReadArchive(beam.PTransform):
    """Roots → ``{"records": records, "rejects": reject rows}``: each root is listed by one
    worker (``lister``: root → sorted items), the items are spread, then read (``reader``:
    item → record or (record, Reject)). Listing a root that holds no entry fails the build
    with the root named."""

    def __init__(self, roots: list[str], lister: Callable[[str], list[dict[str, Any]]],
                 reader: Callable[[dict[str, Any]], Outcome], subset: str,
                 license: str | None, name: str) -> None:
        super().__init__()
        self.roots = roots
        self.lister = lister
        self.reader = reader
        self.subset = subset
        self.license = license
        self.name_ = name

    def expand(self, pbegin: Any) -> Any:
        out = (
            pbegin
            | "Roots" >> beam.Create(self.roots)
            | "List" >> beam.ParDo(_List(self.lister))
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_Read(self.reader, self.subset, self.license, self.name_))
            .with_outputs(REJECTS, main=MAIN)
        )
        return {MAIN: out[MAIN], REJECTS: out[REJECTS]}


def rel_join(root: str, rel: str) -> str:
    """The full path of ``rel`` under ``root`` (any Beam filesystem)."""
    return join(root, rel)
