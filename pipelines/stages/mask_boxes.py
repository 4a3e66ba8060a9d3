"""Mask-to-Box (RemoteCLIP's M2B): semantic segmentation masks → horizontal boxes.

RemoteCLIP turned segmentation datasets into box annotations, then into captions with
Box-to-Caption: per class a binary mask, its connected components found by border following
(contours), each outer contour's min/max x, y a horizontal box. This module does exactly that
with OpenCV: ``cv2.findContours(binary, RETR_EXTERNAL, CHAIN_APPROX_SIMPLE)`` is Suzuki and
Abe's border following (1985), which traces the outer border of every 8-connected component
of the class's pixels; ``RETR_EXTERNAL`` keeps outer borders only, so a component lying inside
a hole of another component of the same class is part of that one's box.

Pure functions first (callable in a REPL), then the Beam stage :class:`MaskToBox` (stage
``"mask2box"``).

Rules, written down:

* **Boxes** are ``[label, x, y, x + w, y + h]`` with ``(x, y, w, h) = cv2.boundingRect``: pixel
  *edges*, so a component covering pixel columns 3..7 gives x0 = 3, x1 = 8 (the convention of
  the detection sources: COCO's ``[x, y, x + w, y + h]``).
* **Touching objects of one class are one component, so one box.** A mask cannot tell two
  adjacent buildings from one (a semantic mask has no instances); RemoteCLIP's M2B has the
  same limit. Counts from masks are counts of connected regions, not of objects. (Diagonal
  contact counts as touching: components are 8-connected.)
* **Minimum area** (``min_area``, the recipe's ``--mask_min_area`` flag, default 0 as in
  RemoteCLIP, which states none): a component with fewer pixels than this is dropped (specks
  of label noise). The area is the component's own pixel count (its border included, holes
  excluded; pixels of the same class nested in its holes counted with it).
* **Classes**: only those RemoteCLIP used for the dataset (``used`` of the table in
  ``recipes/data/remoteclip_classes.json``): Potsdam/Vaihingen building, tree, low vegetation,
  car; LoveDA building, road, water, barren, forest, agriculture; iSAID its 15 classes. No-data
  (LoveDA 0, the ISPRS eroded-boundary black) and background (LoveDA 1, ISPRS impervious
  surfaces and clutter, iSAID background) are never boxed.
* **Colour-coded masks** (:func:`rgb_to_index`): each pixel's colour looked up in the table;
  ``tolerance`` (default 0: exact) allows a per-channel difference (Chebyshev distance, the
  nearest colour wins) for masks that went through lossy compression. A pixel of no table
  colour is *unknown*: its share of the mask is measured; above ``max_unknown_share`` (1%) the
  record is rejected (``unknown_mask_colour``: the table is probably wrong for this mask),
  below, unknown pixels are treated as no-data. Index masks: a value that is no class id of the
  table counts the same way.

Records: ``_mask`` = ``{"path": mask file (any Beam filesystem), "style": "index" | "rgb",
"table": "loveda" | "potsdam" | "vaihingen" | "isaid"}``, with an optional ``"window": [x0,
y0, x1, y1]`` (pixel edges) for a tile of a large scene: the mask is cropped to it first. The
mask (or window) must be the size of the picture (``original_width`` x ``original_height``
when Decode has run, and ``_image_size``), else ``mask_size_mismatch``. The mask file is read
with a byte cap (``max_bytes``, 256 MiB) and decoded under the project's image guard
(``pipelines.image_guard.open_image``: PNG, TIFF, BMP or GIF, a pixel cap, a decoded-bytes
budget). The stage sets ``_objects`` (raw table names, e.g. "low vegetation") and
``_from_mask = True``; Box-to-Caption then writes the captions (caption_kind ``mask2box``).
Rejects: ``mask_missing``, ``mask_unreadable`` (also: over the byte cap, an unknown table, a
style the table cannot read), ``mask_size_mismatch``, ``unknown_mask_colour``,
``no_objects`` (no component of a used class). Records without ``_mask`` pass unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines import image_guard
from pipelines.image_guard import ImageRefused
from pipelines.records import MAIN, REJECTS, Reject
from pipelines.stages.box_captions import ClassNames, MaskTable, load_classes
from pipelines.stages.routing import CountingDoFn

STAGE = "mask2box"
STYLES = ("index", "rgb")
#: a mask file bigger than this is not read (an uncompressed 6000 x 6000 RGB TIFF is 108 MB)
DEFAULT_MAX_MASK_BYTES = 256 * 2**20
#: lossless raster formats masks come in (a JPEG mask would be no mask: see ``tolerance``)
MASK_FORMATS = ("PNG", "TIFF", "BMP", "GIF")
UNKNOWN = -1


class MaskUnreadable(ValueError):
    """A mask file that cannot be read as a mask of the asked style."""


# --- masks → boxes -------------------------------------------------------------------------


def _component_area(binary: np.ndarray, contour: np.ndarray, x: int, y: int, w: int,
                    h: int) -> int:
    """Pixels of the class inside ``contour`` (the component, border included)."""
    import cv2

    fill = np.zeros((h, w), np.uint8)
    cv2.drawContours(fill, [contour], -1, 1, thickness=cv2.FILLED, offset=(-x, -y))
    return int(np.count_nonzero(fill & binary[y:y + h, x:x + w]))


def mask_to_boxes(mask: np.ndarray, classes: Mapping[int, str],
                  min_area: int = 0) -> list[list[Any]]:
    """``[[label, x0, y0, x1, y1], ...]``: one horizontal box per outer contour of each class
    of ``classes`` (id → label) in ``mask`` (H x W class ids), in pixel edges; components of
    fewer than ``min_area`` pixels dropped. Ordered by class id, then top to bottom, left to
    right."""
    import cv2

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be H x W class ids, not shape {mask.shape}")
    out: list[list[Any]] = []
    for cid in sorted(classes):
        binary = (mask == cid).astype(np.uint8)
        if not binary.any():
            continue
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        found = []
        for contour in contours:
            x, y, w, h = (int(v) for v in cv2.boundingRect(contour))
            if min_area > 0 and (w * h < min_area
                                 or _component_area(binary, contour, x, y, w, h) < min_area):
                continue
            found.append((y, x, x + w, y + h))
        for y, x, x1, y1 in sorted(found):
            out.append([classes[cid], float(x), float(y), float(x1), float(y1)])
    return out


def rgb_to_index(rgb: np.ndarray, table: Sequence[tuple[Sequence[int], int]],
                 tolerance: int = 0) -> tuple[np.ndarray, float]:
    """(H x W int16 class ids, share of unknown pixels) of an H x W x 3 colour-coded mask.

    ``table``: ``[((r, g, b), id), ...]``. A pixel takes the id of its colour; with
    ``tolerance`` > 0, of the nearest table colour within that many levels on every channel.
    Pixels of no table colour get ``UNKNOWN`` (-1)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"an RGB mask must be H x W x 3, not shape {rgb.shape}")
    rgb = rgb[:, :, :3]
    index = np.full(rgb.shape[:2], UNKNOWN, np.int16)
    if tolerance <= 0:
        codes = (rgb[:, :, 0].astype(np.int32) << 16) | (rgb[:, :, 1].astype(np.int32) << 8) \
            | rgb[:, :, 2].astype(np.int32)
        for colour, cid in table:
            r, g, b = (int(c) for c in colour)
            index[codes == ((r << 16) | (g << 8) | b)] = cid
    else:
        best = np.full(rgb.shape[:2], tolerance + 1, np.int16)
        pixels = rgb.astype(np.int16)
        for colour, cid in table:
            distance = np.abs(pixels - np.asarray(colour, np.int16)).max(axis=2)
            closer = distance < best
            index[closer] = cid
            best[closer] = distance[closer]
    unknown = float(np.count_nonzero(index == UNKNOWN)) / max(1, index.size)
    return index, unknown


def unknown_share(ids: np.ndarray, table: MaskTable) -> float:
    """The share of ``ids`` that is no class id of ``table`` (``UNKNOWN`` included)."""
    if ids.size == 0:
        return 0.0
    known = np.isin(ids, np.fromiter(table.classes, np.int32, len(table.classes)))
    return 1.0 - float(np.count_nonzero(known)) / ids.size


def _table_colours(table: MaskTable | Sequence[tuple[Sequence[int], int]] | None
                   ) -> Sequence[tuple[Sequence[int], int]]:
    if isinstance(table, MaskTable):
        return table.colours
    return table or ()


def read_mask(data: bytes, style: str,
              table: MaskTable | Sequence[tuple[Sequence[int], int]] | None = None, *,
              tolerance: int = 0, max_pixels: int = image_guard.DEFAULT_MAX_PIXELS,
              max_decoded_bytes: int = image_guard.DEFAULT_MAX_DECODED_BYTES,
              ) -> tuple[np.ndarray, float]:
    """(H x W class ids, share of unknown pixels) of mask file bytes, or MaskUnreadable.

    ``style`` "index": a single-channel PNG/TIFF of class ids (L, P — the palette indices are
    the ids —, 16/32-bit integer; an RGB file whose three channels are equal is read as its
    first); unknown = values that are no class of ``table`` (a :class:`MaskTable`; with no
    table nothing is unknown). ``style`` "rgb": a colour-coded mask, looked up in ``table``
    (a MaskTable or ``[((r, g, b), id), ...]``) by :func:`rgb_to_index`. Opened under the
    image guard: an allowed lossless format, at most ``max_pixels``, a decoded-bytes budget.
    """
    if style not in STYLES:
        raise MaskUnreadable(f"style must be one of {STYLES}, not {style!r}")
    try:
        img = image_guard.open_image(data, formats=MASK_FORMATS, max_pixels=max_pixels,
                                     max_decoded_bytes=max_decoded_bytes)
    except ImageRefused as exc:
        raise MaskUnreadable(f"{exc.reason}: {exc.detail}") from exc
    except Exception as exc:  # bad bytes are a reject, never a crash
        raise MaskUnreadable(f"{type(exc).__name__}: {exc}") from exc
    with img:
        try:
            img.load()
            return _decode(img, style, table, tolerance)
        except MaskUnreadable:
            raise
        except Exception as exc:  # truncated or broken files
            refused = image_guard.refusal(exc)
            raise MaskUnreadable(f"{refused.reason}: {refused.detail}") from exc


def _decode(img: Any, style: str, table: Any, tolerance: int) -> tuple[np.ndarray, float]:
    mode = img.mode
    if style == "index":
        if mode in ("L", "P", "1") or mode.startswith("I"):
            ids = np.asarray(img)
        elif mode in ("RGB", "RGBA", "LA"):
            arr = np.asarray(img)
            channels = arr[:, :, :3] if mode != "LA" else arr[:, :, :1]
            if channels.shape[2] > 1 and not (np.array_equal(channels[:, :, 0], channels[:, :, 1])
                                              and np.array_equal(channels[:, :, 0],
                                                                 channels[:, :, 2])):
                raise MaskUnreadable(f"a {mode} picture with colours is no index mask "
                                     "(style 'rgb'?)")
            ids = channels[:, :, 0]
        else:
            raise MaskUnreadable(f"mode {mode} is no index mask")
        ids = ids.astype(np.int32)
        return ids, unknown_share(ids, table) if isinstance(table, MaskTable) else 0.0
    colours = _table_colours(table)
    if not colours:
        raise MaskUnreadable("no colour table for an RGB mask")
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)[:, :, :3]
    elif mode in ("P", "L", "1", "LA", "PA"):
        rgb = np.asarray(img.convert("RGB"))
    else:
        raise MaskUnreadable(f"mode {mode} is no colour-coded mask")
    return rgb_to_index(rgb, colours, tolerance)


# --- the stage -----------------------------------------------------------------------------


def read_mask_bytes(path: str, max_bytes: int = DEFAULT_MAX_MASK_BYTES) -> bytes:
    """The bytes of ``path`` (any Beam filesystem, read as stored: no decompression by
    extension). FileNotFoundError when it does not exist; MaskUnreadable over ``max_bytes``
    or when it cannot be read."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read(max_bytes + 1)
    except Exception as exc:  # decide missing vs unreadable below
        try:
            exists = FileSystems.exists(path)
        except Exception:  # noqa: BLE001 — a failing check: not known to be missing
            exists = True
        if not exists:
            raise FileNotFoundError(path) from exc
        raise MaskUnreadable(f"{type(exc).__name__}: {exc}"[:300]) from exc
    if len(data) > max_bytes:
        raise MaskUnreadable(f"mask file over the byte cap of {max_bytes}")
    return data


def _expected_sizes(record: Mapping[str, Any]) -> list[tuple[int, int]]:
    sizes = []
    try:
        sizes.append((int(record["original_width"]), int(record["original_height"])))
    except (KeyError, TypeError, ValueError):
        pass
    try:
        w, h = (int(v) for v in record["_image_size"][:2])
        sizes.append((w, h))
    except (KeyError, TypeError, ValueError):
        pass
    return sizes


def mask_box(record: dict[str, Any], classes: ClassNames, min_area: int = 0,
             max_unknown_share: float = 0.01, *, tolerance: int = 0,
             max_bytes: int = DEFAULT_MAX_MASK_BYTES) -> dict[str, Any] | Reject:
    """``record`` with ``_objects`` (boxes of its mask's used classes) and ``_from_mask``
    set, or a Reject; a record without ``_mask`` passes unchanged."""
    spec = record.get("_mask")
    if not spec:
        return record
    if not isinstance(spec, Mapping) or not spec.get("path"):
        return Reject(STAGE, "mask_missing", "_mask names no path")
    path, style = str(spec["path"]), str(spec.get("style") or "index")
    table = classes.tables.get(str(spec.get("table") or ""))
    if table is None:
        return Reject(STAGE, "mask_unreadable", f"unknown mask table {spec.get('table')!r}")
    if style == "rgb" and not table.colours:
        return Reject(STAGE, "mask_unreadable", f"table {table.name!r} has no colours")
    try:
        data = read_mask_bytes(path, max_bytes)
    except FileNotFoundError:
        return Reject(STAGE, "mask_missing", path[:300])
    except MaskUnreadable as exc:
        return Reject(STAGE, "mask_unreadable", str(exc)[:300])
    try:
        ids, unknown = read_mask(data, style, table, tolerance=tolerance)
    except MaskUnreadable as exc:
        return Reject(STAGE, "mask_unreadable", str(exc)[:300])
    h, w = ids.shape
    window = spec.get("window")
    if window is not None:
        try:
            x0, y0, x1, y1 = (int(v) for v in window[:4])
        except (TypeError, ValueError):
            return Reject(STAGE, "mask_size_mismatch", f"bad window {window!r}"[:300])
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            return Reject(STAGE, "mask_size_mismatch", f"window {window!r} outside the {w}x{h} "
                                                       "mask"[:300])
        ids = ids[y0:y1, x0:x1]
        h, w = ids.shape
        unknown = unknown_share(ids, table)
    for expected in _expected_sizes(record):
        if expected != (w, h):
            return Reject(STAGE, "mask_size_mismatch",
                          f"mask {w}x{h}, picture {expected[0]}x{expected[1]}")
    if unknown > max_unknown_share:
        return Reject(STAGE, "unknown_mask_colour",
                      f"{unknown:.2%} of the mask is no class of table {table.name!r}",
                      float(unknown))
    objects = mask_to_boxes(ids, table.used_classes(), min_area)
    if not objects:
        return Reject(STAGE, "no_objects", f"no region of {list(table.used)}"[:300])
    out = dict(record)
    out.update(_objects=objects, _from_mask=True, _mask_unknown_share=unknown)
    return out


class MaskToBoxDoFn(CountingDoFn):
    """Record with ``_mask`` → record with ``_objects``, or its reject row."""

    stage = STAGE

    def __init__(self, classes: ClassNames, min_area: int, max_unknown_share: float,
                 tolerance: int, max_bytes: int) -> None:
        super().__init__()
        self.classes = classes
        self.min_area = min_area
        self.max_unknown_share = max_unknown_share
        self.tolerance = tolerance
        self.max_bytes = max_bytes

    def process(self, record: dict[str, Any]) -> Iterator[Any]:
        result = mask_box(record, self.classes, self.min_area, self.max_unknown_share,
                          tolerance=self.tolerance, max_bytes=self.max_bytes)
        if result is record:
            self.count("passed_without_mask")
        elif not isinstance(result, Reject):
            self.count("boxed")
            if result["_mask_unknown_share"] > 0:
                self.count("unknown_colour_tolerated")
        yield from self.emit(record, result)


class MaskToBox(beam.PTransform):
    """Records → ``{"records": records with ``_objects``, "rejects": reject rows}``.

    ``classes``: the class/mask-table JSON (any Beam filesystem), else the bundled RemoteCLIP
    file, read and checked at construction. ``min_area``: ``--mask_min_area`` (pixels of a
    component; 0 keeps every component). ``max_unknown_share``: the share of unknown mask
    pixels tolerated (as no-data) before ``unknown_mask_colour``. ``tolerance``: per-channel
    colour tolerance of RGB masks. ``max_bytes``: the mask file byte cap.
    """

    def __init__(self, classes: str | None = None, min_area: int = 0,
                 max_unknown_share: float = 0.01, *, tolerance: int = 0,
                 max_bytes: int = DEFAULT_MAX_MASK_BYTES) -> None:
        super().__init__()
        if int(min_area) < 0:
            raise ValueError("min_area must be >= 0")
        if not 0.0 <= float(max_unknown_share) <= 1.0:
            raise ValueError("max_unknown_share must be in [0, 1]")
        if not 0 <= int(tolerance) <= 255 or int(max_bytes) <= 0:
            raise ValueError("tolerance must be in 0..255 and max_bytes positive")
        self.classes = load_classes(classes)
        self.min_area = int(min_area)
        self.max_unknown_share = float(max_unknown_share)
        self.tolerance = int(tolerance)
        self.max_bytes = int(max_bytes)

    def expand(self, records: beam.PCollection) -> Any:
        return records | "MaskToBox" >> beam.ParDo(
            MaskToBoxDoFn(self.classes, self.min_area, self.max_unknown_share, self.tolerance,
                          self.max_bytes)
        ).with_outputs(REJECTS, main=MAIN)
