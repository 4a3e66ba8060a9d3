"""The demo world's detection, segmentation and caption datasets: the RemoteCLIP sources.

``build_remoteclip(out_dir, seed)`` writes, next to the PUB11, ``local`` and RS3 parts of a
world (built first: their pictures are what these pictures must differ from; without them
these pictures only differ among themselves)::

    {out}/remoteclip/dota/images/*.png + labelTxt/*.txt        DOTA v1 text (8 corners)
    {out}/remoteclip/voc/JPEGImages/*.jpg + Annotations/*.xml  PASCAL VOC, DIOR class names
    {out}/remoteclip/coco/annotations/instances_train.json + images/*.png   COCO boxes
    {out}/remoteclip/yolo/images/*.jpg + labels/*.txt + classes.txt         YOLO
    {out}/remoteclip/loveda/images/*.png + masks/*.png     class-index masks (0 no-data .. 7)
    {out}/remoteclip/potsdam/images/*.png + masks/*.png    ISPRS colour masks, black borders
    {out}/remoteclip/rsicd/dataset_rsicd.json + images/    Karpathy JSON, train and test
    {out}/remoteclip/rsicd_test/dataset_rsicd_test.json + images/   the test split alone:
                                                           what ``--decontam`` is given
    {out}/remoteclip/dota_val/images/*.png + labelTxt/*.txt    held out: RemoteCount's source
    {out}/remoteclip/annotations.txt                       the recipe's ``--annotations``
                                                           specs, one a line (absolute roots)
    {out}/remoteclip/heldout.txt                           ``pipelines.remotecount``'s
                                                           ``--annotations`` (one line)
    {out}/remoteclip_truth.parquet                         one row per image: where it ends

Pictures are ``scenes.render_scene`` draws from their own seed stream (10001; PUB11 uses
1-11, ``local`` 7001, RS3 8001, the benchmarks 9001); the mask datasets draw their own
land-cover layouts (solid shapes: fields, forest, water, roads, buildings; roofs, trees,
cars) and paint the picture from the mask, so masks and pixels agree. Every clean picture
is at least :data:`MIN_PHASH_DISTANCE` pHash bits (dedup's crop-aware distance, hashed as
``Decode`` hashes it) from every picture already in the world and from each other.

Boxes are written from each scene's ``meta["boxes"]`` rounded outward to whole pixels (a box
``[x0, y0, x1, y1]`` covers pixels x0..x1-1), so every format can state it exactly: DOTA
corners (axis-aligned, and every third object as a genuinely rotated rectangle inscribed in
the box, whose corners' min/max is the box), VOC 1-based inclusive ``xmin = x0 + 1, xmax =
x1``, COCO ``[x0, y0, x1 - x0, y1 - y0]``, YOLO centre/size divided by the image side (exact
in binary for 256 px pictures, written with ``repr``). Class names per format:
:data:`DOTA_NAMES`, :data:`VOC_NAMES`, :data:`COCO_CATEGORIES`, :data:`YOLO_CLASSES`; a demo
object type a format has no class for (DOTA and DIOR have no "building") is not annotated
there, as in the real sets.

Special rows (:data:`PLANTED_KINDS`, each with where it must end):

- ``same_scene``: one picture annotated in all four detection formats (``same_scene`` in
  each), the same boxes everywhere. DOTA and COCO hold the same PNG bytes, VOC and YOLO the
  same JPEG bytes of it (the formats' usual encodings). Dedup's survivor rule (most pixels,
  then most bytes, then smallest key) keeps the PNG copy with the smaller key; the other PNG
  is its ``sha256`` duplicate, the two JPEGs its ``phash`` duplicates (the build checks the
  JPEG lies within :data:`MAX_COPY_DISTANCE` bits of the PNG). ``duplicate_group`` is
  ``same_scene`` on all four rows, ``shared_key`` the survivor's key on the duplicates.
- ``yolo_benchmark_copy``: the bytes of the first RSICD **test** image, with YOLO labels of
  its boxes: rejected at ``decontam`` (``benchmark_overlap``) when the build decontaminates
  against ``rsicd_test``. The RSICD test images themselves are benchmark, not training
  input: their rows say ``expected = "not_read"`` (a reader of the Karpathy JSON takes the
  train split; a scorer checks they appear nowhere in the build).
- ``large_scene``: DOTA ``P9999``, 2200×1650 px tiled from 4×3 rendered 550 px scenes with
  their boxes offset (to exercise ``--tile``); its tiles are not knowable without the
  tiler, so its row says ``expected = "tiled"`` and holds the boxes of the whole scene.
- ``dota_clipped_boxes``: a kept image with one box partly outside (clipped) and one wholly
  outside (dropped: ``dropped_objects`` = 1).
- bad annotations, each rejected where the spec says: a DOTA label file of malformed lines,
  a DOTA label file naming a missing image, a DOTA image without a label file, a VOC "XML"
  that is not XML, a VOC image whose only box lies outside it, a COCO image entry whose file
  is missing, a COCO image whose boxes all have zero size, a YOLO label file whose only class
  index is out of range, a Potsdam mask painted with a colour not in the table, a LoveDA
  mask of another size than its image, a LoveDA mask of background and no-data only.

Truth columns: ``local``'s (:data:`pipelines.demo.local._TRUTH_SCHEMA`) with ``source`` =
the dataset name the recipe is given (``dota``, ``voc``, ``coco``, ``yolo``, ``loveda``,
``potsdam``, ``rsicd``), ``source_id`` = the image path relative to the dataset root
without extension and without the layout's image folder (``images/P0001.png`` → ``P0001``,
``JPEGImages/00001.jpg`` → ``00001``: the rule of ``pipelines.sources.annotations``),
``key`` = ``make_key(source, source_id)``, ``image`` = the image path relative to the world
folder (where it would be, for a missing one), ``objects`` = JSON list of ``{"label": raw
dataset label, "class": demo object type (or mask class), "box": [x0, y0, x1, y1] in the
image's own pixels as annotated, "difficult": 0|1}``, ``boxes`` = JSON list of ``[label,
x0, y0, x1, y1]``: the ``_objects`` a reader should emit (clipped to the image, boxes left
without area dropped; for masks: one box per connected component, 8-connected, holes
filled as ``cv2.RETR_EXTERNAL`` does, ``x1``/``y1`` exclusive, per class RemoteCLIP boxed
for the table); plus ``format``, ``dataset_root`` (relative to the world), ``annotation``
(the annotation file relative to the dataset root) and ``dropped_objects``.

Same seed → byte-identical files (the two listings name the world's absolute path: the same
bytes for a world built in the same place).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipelines.demo import scenes
from pipelines.demo.local import _TRUTH_SCHEMA as _LOCAL_TRUTH_SCHEMA
from pipelines.demo.truth import fresh_part, tally, write_truth

FOLDER = "remoteclip"
TRUTH = "remoteclip_truth.parquet"
ANNOTATIONS_FILE = "annotations.txt"
HELDOUT_FILE = "heldout.txt"
HELDOUT = "dota_val"  # the held-out DOTA-format set RemoteCount is built from
STREAM = 10001  # pub11.py uses 1-11, local 7001, rs3 8001, benchmarks 9001
MIN_PHASH_DISTANCE = 12
MAX_COPY_DISTANCE = 2  # the JPEG copy of the shared scene lies within this of its PNG
SIDE = 256
RSICD_SIDE = 224
LARGE_CELL, LARGE_COLS, LARGE_ROWS = 550, 4, 3
JPEG_QUALITY = 90
_ATTEMPTS = 40

DOTA, VOC, COCO, YOLO, LOVEDA, POTSDAM, RSICD = (
    "dota", "voc", "coco", "yolo", "loveda", "potsdam", "rsicd")
RSICD_TEST = "rsicd_test"  # the decontamination benchmark folder
#: dataset name → the ``--annotations`` format
FORMATS: dict[str, str] = {DOTA: "dota", VOC: "voc", COCO: "coco", YOLO: "yolo",
                           LOVEDA: "mask_index", POTSDAM: "mask_rgb", RSICD: "karpathy"}

#: demo object type → DOTA v1 category
DOTA_NAMES: dict[str, str] = {
    "airplane": "plane", "boat": "ship", "car": "small-vehicle",
    "storage_tank": "storage-tank", "bridge": "bridge", "baseball_diamond": "baseball-diamond",
}
#: demo object type → DIOR class name (VOC)
VOC_NAMES: dict[str, str] = {
    "airplane": "airplane", "boat": "ship", "car": "vehicle", "storage_tank": "storagetank",
    "bridge": "bridge", "baseball_diamond": "baseballfield",
}
#: COCO categories (iSAID's names): (id, name, demo object type or None when never drawn)
COCO_CATEGORIES: tuple[tuple[int, str, str | None], ...] = (
    (1, "plane", "airplane"), (2, "ship", "boat"), (3, "storage_tank", "storage_tank"),
    (4, "baseball_diamond", "baseball_diamond"), (5, "Bridge", "bridge"),
    (6, "Small_Vehicle", "car"), (7, "Large_Vehicle", None),
)
COCO_NAMES: dict[str, str] = {demo: name for _, name, demo in COCO_CATEGORIES if demo}
_COCO_IDS: dict[str, int] = {name: i for i, name, _ in COCO_CATEGORIES}
#: YOLO ``classes.txt``, one per line (index = position); "helicopter" is never drawn
YOLO_CLASSES: tuple[str, ...] = ("airplane", "boat", "building", "car", "storage tank",
                                 "bridge", "baseball diamond", "helicopter")
YOLO_NAMES: dict[str, str] = {"airplane": "airplane", "boat": "boat", "building": "building",
                              "car": "car", "storage_tank": "storage tank", "bridge": "bridge",
                              "baseball_diamond": "baseball diamond"}
LABELS: dict[str, dict[str, str]] = {DOTA: DOTA_NAMES, VOC: VOC_NAMES, COCO: COCO_NAMES,
                                     YOLO: YOLO_NAMES}

#: LoveDA class indices (formats.md); 0 and 1 are not captioned
LOVEDA_TABLE: dict[int, str] = {0: "no-data", 1: "background", 2: "building", 3: "road",
                                4: "water", 5: "barren", 6: "forest", 7: "agriculture"}
LOVEDA_BOXED = (2, 3, 4, 5, 6, 7)
#: ISPRS Potsdam colours; black boundaries are no-data
POTSDAM_TABLE: dict[str, tuple[int, int, int]] = {
    "impervious surfaces": (255, 255, 255), "building": (0, 0, 255),
    "low vegetation": (0, 255, 255), "tree": (0, 255, 0), "car": (255, 255, 0),
    "clutter": (255, 0, 0),
}
POTSDAM_NODATA = (0, 0, 0)
POTSDAM_BOXED = ("building", "tree", "low vegetation", "car")  # RemoteCLIP's (recipes.md)
UNKNOWN_COLOUR = (128, 0, 128)  # not in the table; covers ~40% of the planted mask

#: scene classes drawn for the detection formats (ones with boxed objects)
DETECTION_CLASSES = ("airport", "harbor", "parking_lot", "industrial", "lake", "highway",
                     "baseball_field", "river", "residential")

#: planted kind → (source, expected, expected stage, expected reason); ``same_scene`` rows
#: take their expectation from the survivor rule (see the module docstring)
PLANTED_KINDS: dict[str, tuple[str | None, str, str | None, str | None]] = {
    "same_scene": (None, "duplicate", "dedup", None),
    "large_scene": (DOTA, "tiled", None, None),
    "dota_clipped_boxes": (DOTA, "kept", None, None),
    "dota_label_malformed": (DOTA, "rejected", "read", "annotation_malformed"),
    "dota_image_missing": (DOTA, "rejected", "read", "image_missing"),
    "dota_annotation_missing": (DOTA, "rejected", "read", "annotation_missing"),
    "voc_not_xml": (VOC, "rejected", "read", "annotation_malformed"),
    "voc_box_outside": (VOC, "rejected", "read", "no_objects"),
    "coco_image_missing": (COCO, "rejected", "read", "image_missing"),
    "coco_degenerate_boxes": (COCO, "rejected", "read", "no_objects"),
    "yolo_unknown_class": (YOLO, "rejected", "read", "unknown_class"),
    "yolo_benchmark_copy": (YOLO, "rejected", "decontam", "benchmark_overlap"),
    "potsdam_unknown_colour": (POTSDAM, "rejected", "mask2box", "unknown_mask_colour"),
    "loveda_size_mismatch": (LOVEDA, "rejected", "mask2box", "mask_size_mismatch"),
    "loveda_background_only": (LOVEDA, "rejected", "mask2box", "no_objects"),
    "rsicd_test_split": (RSICD, "not_read", None, None),
}

_TRUTH_COLUMNS = [*_LOCAL_TRUTH_SCHEMA,
                  ("format", pa.string()), ("dataset_root", pa.string()),
                  ("annotation", pa.string()), ("dropped_objects", pa.int64())]
_TRUTH_SCHEMA = pa.schema(_TRUTH_COLUMNS)

Obj = dict[str, Any]  # {"label", "class", "box": [x0, y0, x1, y1], "difficult"}


def _rng(seed: int, i: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM, i, attempt])


#: a dataset's first ``NEAR`` scenes are drawn at ``base + j``: the bases lie 100 apart (DOTA
#: 100, VOC 400, COCO 500, ...; planted rows at ``base + NEAR``...), so later scenes are drawn
#: at ``base * SPREAD + j`` instead, a range of their own. Worlds with at most ``NEAR`` scenes
#: in every dataset (the default ``--n-remoteclip 24``, and up to 111: RSICD holds n//3 +
#: n//8) keep the indices, and so the bytes, they always had; larger ones no longer draw
#: another dataset's scenes again and waste their attempts rejecting them.
NEAR = 50
SPREAD = 10**6


def scene_index(base: int, j: int) -> int:
    """The random-stream index of the ``j``-th scene of the dataset drawn from ``base``."""
    if not 0 <= j < SPREAD:
        raise ValueError(f"scene {j} is out of range for one dataset (0..{SPREAD - 1})")
    return base + j if j < NEAR else base * SPREAD + j


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _png(img: Image.Image, level: int = 6) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def _hex(h: int) -> str:
    return f"{h:016x}"



def _sid(rel: str) -> str:
    """source_id: as the annotation sources name it (``images/P0001.png`` → ``P0001``)."""
    from pipelines.sources.annotations import source_id_of

    return source_id_of(rel)


# ----------------------------------------------------------------------------- the pool


class _Pool:
    """The world's pictures by dedup's crop-aware pHash distance. Pictures known only by
    their full hash (a BigEarthNet patch: a folder of bands) are compared full hash only."""

    def __init__(self) -> None:
        from pipelines.demo.pub11 import _PhashPool

        self.pool = _PhashPool()
        self.fulls: list[int] = []

    def min_distance(self, h: int, crops: list[int]) -> int:
        d = self.pool.min_distance(h, crops)
        if self.fulls:
            arr = np.asarray(self.fulls, dtype=np.uint64)
            for x in (h, *crops):
                d = min(d, int(np.bitwise_count(arr ^ np.uint64(x)).min()))
        return d

    def add(self, h: int, crops: list[int]) -> None:
        self.pool.add(h, crops)


def _decoded_hashes(body: bytes) -> tuple[int, list[int]]:
    from pipelines.demo.rs3 import _decoded_hashes as decoded

    return decoded(body)


def _world_pool(out_dir: str) -> _Pool:
    """Every picture already in the world: PUB11's, ``local``'s and RS3's, hashed as Decode
    hashes them; an RS3 entry that does not decode here (a BigEarthNet patch is a folder of
    bands) joins by the full hash its truth recorded."""
    pool = _Pool()
    entries: list[tuple[str, str | None]] = []  # (path, recorded pHash)
    gt = os.path.join(out_dir, "ground_truth.parquet")
    if os.path.exists(gt):
        rows = pq.read_table(gt, columns=["image", "phash"]).to_pylist()
        entries += [(os.path.join(out_dir, "www", "img", n), None)
                    for n in sorted({r["image"] for r in rows if r["image"] and r["phash"]})]
    lt = os.path.join(out_dir, "local_truth.parquet")
    if os.path.exists(lt):
        rows = pq.read_table(lt, columns=["image"]).to_pylist()
        entries += [(os.path.join(out_dir, "local", n), None)
                    for n in sorted({r["image"] for r in rows if r["image"]})]
    rt = os.path.join(out_dir, "rs3_truth.parquet")
    if os.path.exists(rt):
        entries += [(os.path.join(out_dir, r["image"]), r["phash"])
                    for r in pq.read_table(rt, columns=["image", "phash"]).to_pylist()
                    if r["image"] and r["phash"]]
    for path, recorded in entries:
        hashes = None
        if os.path.isfile(path):
            with open(path, "rb") as f:
                body = f.read()
            try:
                if path.lower().endswith((".tif", ".tiff")):  # fMoW-full: what its source hands
                    from pipelines.sources.fmow import tiff_body  # on to Decode (PIL cannot
                                                                  # read 8-band TIFFs)
                    body = tiff_body(body)[0]
                hashes = _decoded_hashes(body)
            except RuntimeError:  # not a picture Decode reads
                hashes = None
        if hashes is not None:
            pool.add(*hashes)
        elif recorded:
            pool.fulls.append(int(recorded, 16))
    return pool


# ----------------------------------------------------------------------------- boxes


def _int_box(box: list[Any], w: int, h: int) -> list[int] | None:
    """A scene box rounded outward to whole pixels inside the image; None without area."""
    x0, y0 = max(0, math.floor(box[1])), max(0, math.floor(box[2]))
    x1, y1 = min(w, math.ceil(box[3])), min(h, math.ceil(box[4]))
    return [x0, y0, x1, y1] if x1 - x0 >= 1 and y1 - y0 >= 1 else None


def _objects(meta: dict[str, Any], names: dict[str, str], w: int, h: int,
             dx: int = 0, dy: int = 0) -> list[Obj]:
    """The scene's boxes a format has classes for, as annotated objects (offset by dx, dy)."""
    out = []
    for b in meta["boxes"]:
        if b[0] not in names:
            continue
        ib = _int_box(b, w, h)
        if ib is None:
            continue
        x0, y0, x1, y1 = ib
        out.append({"label": names[b[0]], "class": b[0], "box": [x0 + dx, y0 + dy, x1 + dx,
                                                                  y1 + dy],
                    "difficult": int((x1 - x0) * (y1 - y0) < 64)})
    return out


def _clip(objs: list[Obj], w: int, h: int) -> tuple[list[list[Any]], int]:
    """What a reader emits: boxes clipped to the image, the ones left without area dropped."""
    kept, dropped = [], 0
    for o in objs:
        x0, y0, x1, y1 = o["box"]
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            dropped += 1
            continue
        kept.append([o["label"], float(x0), float(y0), float(x1), float(y1)])
    return kept, dropped


def rotated_corners(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """A rectangle turned inside the box, touching all four sides (so the min/max of its
    corners is the box), clockwise from the top edge: (x0+a, y0), (x1, y0+b), (x1-a, y1),
    (x0, y1-b), with b chosen so the corners meet at right angles."""
    w, h = x1 - x0, y1 - y0
    a = 0.3 * w
    while h * h < 4 * a * (w - a):
        a *= 0.5
    b = (h - math.sqrt(h * h - 4 * a * (w - a))) / 2
    return [(x0 + a, y0), (x1, y0 + b), (x1 - a, y1), (x0, y1 - b)]


def dota_text(objs: list[Obj], gsd: str | None, rotate_every: int = 3) -> str:
    """DOTA v1 label text: optional header, then ``x1 y1 .. x4 y4 category difficult``."""
    lines = [] if gsd is None else ["imagesource:GoogleEarth", f"gsd:{gsd}"]
    for j, o in enumerate(objs):
        x0, y0, x1, y1 = o["box"]
        if rotate_every and j % rotate_every == rotate_every - 1 and min(x1 - x0, y1 - y0) >= 6:
            pts = rotated_corners(x0, y0, x1, y1)
        else:
            pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        coords = " ".join(f"{v:.1f}" for p in pts for v in p)
        lines.append(f"{coords} {o['label']} {o['difficult']}")
    return "\n".join(lines) + "\n"


def voc_xml(filename: str, w: int, h: int, objs: list[Obj]) -> str:
    """PASCAL VOC XML; boxes 1-based inclusive (a box [x0, x1) is xmin x0+1, xmax x1)."""
    parts = ["<annotation>", "  <folder>JPEGImages</folder>", f"  <filename>{filename}</filename>",
             "  <source><database>DIOR-demo</database></source>",
             f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
             "  <segmented>0</segmented>"]
    for o in objs:
        x0, y0, x1, y1 = o["box"]
        parts += ["  <object>", f"    <name>{o['label']}</name>", "    <pose>Unspecified</pose>",
                  "    <truncated>0</truncated>", f"    <difficult>{o['difficult']}</difficult>",
                  (f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>"
                   f"<ymax>{y1}</ymax></bndbox>"), "  </object>"]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def yolo_text(objs: list[Obj], w: int, h: int) -> str:
    """YOLO label lines ``class cx cy w h`` normalised by the image size (``repr``: exact)."""
    lines = []
    for o in objs:
        x0, y0, x1, y1 = o["box"]
        c = YOLO_CLASSES.index(o["label"]) if o["label"] in YOLO_CLASSES else int(o["label"])
        vals = ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h)
        lines.append(f"{c} " + " ".join(repr(float(v)) for v in vals))
    return "\n".join(lines) + ("\n" if lines else "")


# ----------------------------------------------------------------------------- the builder


class OutOfDistinctScenes(RuntimeError):
    """The scene renderer cannot draw another picture far enough from the world's others."""


class _Builder:
    def __init__(self, out_dir: str, seed: int) -> None:
        self.out = out_dir
        self.root = os.path.join(out_dir, FOLDER)
        self.seed = seed
        self.pool = _world_pool(out_dir)
        self.truth: list[dict[str, Any]] = []
        self.coco_images: list[dict[str, Any]] = []
        self.coco_annotations: list[dict[str, Any]] = []

    def write(self, rel: str, data: bytes | str) -> str:
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return rel

    def add(self, source: str, image_rel: str, **t: Any) -> dict[str, Any]:
        """A truth row for the image at ``image_rel`` (relative to the dataset root)."""
        from pipelines.records import make_key

        kind = t.pop("planted", None)
        if "expect" in t:
            expected, stage, reason = t.pop("expect")
        elif kind:
            _, expected, stage, reason = PLANTED_KINDS[kind]
        else:
            expected, stage, reason = "kept", None, None
        objs = t.pop("objs", None)
        sid = _sid(image_rel)
        row = {"source": source, "row": len(self.truth), "source_id": sid,
               "key": make_key(source, sid), "url": None, "caption": None,
               "is_rs": True, "planted": kind, "expected": expected,
               "expected_stage": stage, "expected_reason": reason,
               "format": FORMATS[source], "dataset_root": f"{FOLDER}/{source}",
               "image": f"{FOLDER}/{source}/{image_rel}", **t}
        if objs is not None:
            row["objects"] = json.dumps(objs)
            if row.get("width") and "boxes" not in t:
                kept, dropped = _clip(objs, row["width"], row["height"])
                row["boxes"] = json.dumps(kept)
                row["dropped_objects"] = dropped
        self.truth.append(row)
        return row

    def distinct(self, i: int, draw: Callable[[np.random.Generator], Any]) -> Any:
        """``draw(rng)`` → (bodies, result), or None to draw again, until every body is far
        from the pool; the bodies' hashes then join it. Returns (hashes, result)."""
        for attempt in range(_ATTEMPTS):
            got = draw(_rng(self.seed, i, attempt))
            if got is None:
                continue
            bodies, result = got
            hashes = [_decoded_hashes(b) for b in bodies]
            if all(self.pool.min_distance(h, c) >= MIN_PHASH_DISTANCE for h, c in hashes):
                for h, c in hashes:
                    self.pool.add(h, c)
                return hashes, result
        raise OutOfDistinctScenes(
            f"no RemoteCLIP demo scene at least {MIN_PHASH_DISTANCE} pHash bits from the "
            f"world's other pictures after {_ATTEMPTS} draws (scene #{i}): the renderer has "
            "run out of distinct scenes; ask for fewer with a smaller --n-remoteclip")

    def scene(self, i: int, names: dict[str, str], encode: Callable[[Image.Image], bytes],
              size: int = SIDE, classes: tuple[str, ...] = DETECTION_CLASSES,
              accept: Callable[[list[Obj]], bool] = bool,
              ) -> tuple[bytes, str, dict[str, Any], list[Obj], int]:
        """A distinct detection scene whose objects (those ``names`` has a class for) pass
        ``accept`` (default: at least one): (encoded bytes, scene class, meta, objects,
        pHash)."""
        classes = tuple(c for c in classes if c != "residential" or "building" in names)
        cls = classes[i % len(classes)]

        def draw(rng: np.random.Generator) -> Any:
            img, meta = scenes.render_scene(cls, rng, size)
            objs = _objects(meta, names, size, size)
            if not accept(objs):
                return None
            body = encode(img)
            return [body], (body, meta, objs)

        hashes, (body, meta, objs) = self.distinct(i, draw)
        return body, cls, meta, objs, hashes[0][0]


# ----------------------------------------------------------------------------- detection


def _dota(b: _Builder, n: int) -> None:
    for j in range(n):
        body, cls, _, objs, h = b.scene(scene_index(100, j), DOTA_NAMES, _png)
        name = f"P{j + 1:04d}"
        gsd = None if j % 4 == 3 else ("null" if j % 4 == 2 else f"{0.3 + 0.05 * (j % 3):g}")
        b.write(f"{DOTA}/images/{name}.png", body)
        b.write(f"{DOTA}/labelTxt/{name}.txt", dota_text(objs, gsd))
        b.add(DOTA, f"images/{name}.png", annotation=f"labelTxt/{name}.txt", scene_class=cls,
              width=SIDE, height=SIDE, phash=_hex(h), objs=objs)

    # kept, with one box partly outside (clipped) and one wholly outside (dropped)
    body, cls, _, objs, h = b.scene(150, DOTA_NAMES, _png)
    o = objs[0]
    objs = objs + [dict(o, box=[SIDE - 10, 40, SIDE + 15, 60], difficult=0),
                   dict(o, box=[SIDE + 20, 10, SIDE + 40, 30], difficult=0)]
    b.write(f"{DOTA}/images/P0904.png", body)
    b.write(f"{DOTA}/labelTxt/P0904.txt", dota_text(objs, "0.3", rotate_every=0))
    b.add(DOTA, "images/P0904.png", planted="dota_clipped_boxes", annotation="labelTxt/P0904.txt",
          scene_class=cls, width=SIDE, height=SIDE, phash=_hex(h), objs=objs)

    # a label file of malformed lines only (its image is fine)
    body, cls, _, _, h = b.scene(151, DOTA_NAMES, _png)
    b.write(f"{DOTA}/images/P0901.png", body)
    b.write(f"{DOTA}/labelTxt/P0901.txt",
            "imagesource:GoogleEarth\ngsd:0.3\nthis line is not a DOTA object\n"
            "12.0 34.0 plane 0\n1 2 3 4 5 6 7 eight ship 0\n")
    b.add(DOTA, "images/P0901.png", planted="dota_label_malformed",
          annotation="labelTxt/P0901.txt", scene_class=cls, width=SIDE, height=SIDE,
          phash=_hex(h))

    # a label file whose image does not exist
    b.write(f"{DOTA}/labelTxt/P0902.txt", dota_text(
        [{"label": "plane", "class": "airplane", "box": [10, 10, 40, 40], "difficult": 0}],
        "0.3"))
    b.add(DOTA, "images/P0902.png", planted="dota_image_missing",
          annotation="labelTxt/P0902.txt")

    # an image without a label file
    body, cls, _, _, h = b.scene(152, DOTA_NAMES, _png)
    b.write(f"{DOTA}/images/P0903.png", body)
    b.add(DOTA, "images/P0903.png", planted="dota_annotation_missing", annotation=None,
          scene_class=cls, width=SIDE, height=SIDE, phash=_hex(h))


def _large_scene(b: _Builder) -> None:
    """DOTA P9999: 4×3 distinct 550 px scenes side by side, their boxes offset."""
    W, H = LARGE_CELL * LARGE_COLS, LARGE_CELL * LARGE_ROWS
    canvas = Image.new("RGB", (W, H))
    objs: list[Obj] = []
    classes = ("parking_lot", "airport", "harbor", "industrial", "highway", "lake")
    for c in range(LARGE_COLS * LARGE_ROWS):
        body, _, _, cell_objs, _ = b.scene(
            300 + c, DOTA_NAMES, lambda im: _png(im, 1), size=LARGE_CELL,
            classes=classes[c % len(classes):] + classes[:c % len(classes)])
        dx, dy = (c % LARGE_COLS) * LARGE_CELL, (c // LARGE_COLS) * LARGE_CELL
        with Image.open(io.BytesIO(body)) as im:
            canvas.paste(im.convert("RGB"), (dx, dy))
        for o in cell_objs:
            x0, y0, x1, y1 = o["box"]
            objs.append(dict(o, box=[x0 + dx, y0 + dy, x1 + dx, y1 + dy]))
    body = _png(canvas, 1)
    h, crops = _decoded_hashes(body)
    b.pool.add(h, crops)
    b.write(f"{DOTA}/images/P9999.png", body)
    b.write(f"{DOTA}/labelTxt/P9999.txt", dota_text(objs, "0.3"))
    b.add(DOTA, "images/P9999.png", planted="large_scene", annotation="labelTxt/P9999.txt",
          width=W, height=H, phash=_hex(h), objs=objs)


def _voc(b: _Builder, n: int) -> None:
    for j in range(n):
        body, cls, _, objs, h = b.scene(scene_index(400, j), VOC_NAMES, _jpeg)
        name = f"{j + 1:05d}"
        b.write(f"{VOC}/JPEGImages/{name}.jpg", body)
        b.write(f"{VOC}/Annotations/{name}.xml", voc_xml(f"{name}.jpg", SIDE, SIDE, objs))
        b.add(VOC, f"JPEGImages/{name}.jpg", annotation=f"Annotations/{name}.xml",
              scene_class=cls, width=SIDE, height=SIDE, phash=_hex(h), objs=objs)
    body, cls, _, _, h = b.scene(450, VOC_NAMES, _jpeg)
    b.write(f"{VOC}/JPEGImages/00901.jpg", body)
    b.write(f"{VOC}/Annotations/00901.xml", "this is not XML: 00901.jpg ship 10 10 40 40\n")
    b.add(VOC, "JPEGImages/00901.jpg", planted="voc_not_xml", annotation="Annotations/00901.xml",
          scene_class=cls, width=SIDE, height=SIDE, phash=_hex(h))
    body, cls, _, objs, h = b.scene(451, VOC_NAMES, _jpeg)
    outside = [dict(objs[0], box=[SIDE + 30, 20, SIDE + 70, 60])]
    b.write(f"{VOC}/JPEGImages/00902.jpg", body)
    b.write(f"{VOC}/Annotations/00902.xml", voc_xml("00902.jpg", SIDE, SIDE, outside))
    b.add(VOC, "JPEGImages/00902.jpg", planted="voc_box_outside",
          annotation="Annotations/00902.xml", scene_class=cls, width=SIDE, height=SIDE,
          phash=_hex(h), objs=outside)


def _coco_add(b: _Builder, file_name: str, w: int, h: int, objs: list[Obj]) -> None:
    image_id = len(b.coco_images) + 1
    b.coco_images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    for o in objs:
        x0, y0, x1, y1 = o["box"]
        b.coco_annotations.append({
            "id": len(b.coco_annotations) + 1, "image_id": image_id,
            "category_id": _COCO_IDS[o["label"]], "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})


def _coco(b: _Builder, n: int) -> None:
    for j in range(n):
        body, cls, _, objs, h = b.scene(scene_index(500, j), COCO_NAMES, _png)
        name = f"{j + 1:012d}.png"
        b.write(f"{COCO}/images/{name}", body)
        _coco_add(b, name, SIDE, SIDE, objs)
        b.add(COCO, f"images/{name}", annotation="annotations/instances_train.json",
              scene_class=cls, width=SIDE, height=SIDE, phash=_hex(h), objs=objs)
    missing = [{"label": "ship", "class": "boat", "box": [30, 30, 60, 50], "difficult": 0}]
    _coco_add(b, f"{901:012d}.png", SIDE, SIDE, missing)
    b.add(COCO, f"images/{901:012d}.png", planted="coco_image_missing",
          annotation="annotations/instances_train.json", objs=missing)
    body, cls, _, objs, h = b.scene(550, COCO_NAMES, _png)
    flat = [dict(o, box=[o["box"][0], o["box"][1], o["box"][0], o["box"][3]]) for o in objs[:3]]
    name = f"{902:012d}.png"
    b.write(f"{COCO}/images/{name}", body)
    _coco_add(b, name, SIDE, SIDE, flat)
    b.add(COCO, f"images/{name}", planted="coco_degenerate_boxes",
          annotation="annotations/instances_train.json", scene_class=cls, width=SIDE,
          height=SIDE, phash=_hex(h), objs=flat)


def _yolo(b: _Builder, n: int) -> None:
    b.write(f"{YOLO}/classes.txt", "\n".join(YOLO_CLASSES) + "\n")
    for j in range(n):
        body, cls, _, objs, h = b.scene(scene_index(600, j), YOLO_NAMES, _jpeg)
        name = f"img_{j + 1:04d}"
        b.write(f"{YOLO}/images/{name}.jpg", body)
        b.write(f"{YOLO}/labels/{name}.txt", yolo_text(objs, SIDE, SIDE))
        b.add(YOLO, f"images/{name}.jpg", annotation=f"labels/{name}.txt", scene_class=cls,
              width=SIDE, height=SIDE, phash=_hex(h), objs=objs)
    body, cls, _, objs, h = b.scene(650, YOLO_NAMES, _jpeg)
    bad = [dict(o, label=str(len(YOLO_CLASSES) + 34)) for o in objs[:2]]
    b.write(f"{YOLO}/images/img_0901.jpg", body)
    b.write(f"{YOLO}/labels/img_0901.txt", yolo_text(bad, SIDE, SIDE))
    b.add(YOLO, "images/img_0901.jpg", planted="yolo_unknown_class",
          annotation="labels/img_0901.txt", scene_class=cls, width=SIDE, height=SIDE,
          phash=_hex(h), objs=bad, boxes="[]", dropped_objects=len(bad))


def _same_scene(b: _Builder) -> None:
    """One picture in all four detection formats (see the module docstring)."""
    from pipelines.records import make_key

    common = {k: v for k, v in DOTA_NAMES.items()
              if all(k in names for names in LABELS.values())}

    def draw(rng: np.random.Generator) -> Any:
        img, meta = scenes.render_scene("airport", rng, SIDE)
        objs = _objects(meta, common, SIDE, SIDE)
        png, jpg = _png(img), _jpeg(img)
        if len(objs) < 2 or len(png) <= len(jpg):
            return None
        hp, hj = _decoded_hashes(png)[0], _decoded_hashes(jpg)[0]
        if (hp ^ hj).bit_count() > MAX_COPY_DISTANCE:
            return None
        return [png], (png, jpg, meta, objs)

    hashes, (png, jpg, _, objs) = b.distinct(700, draw)
    h = _hex(hashes[0][0])
    rename = {fmt: [dict(o, label=LABELS[fmt][o["class"]]) for o in objs] for fmt in LABELS}
    b.write(f"{DOTA}/images/same_scene.png", png)
    b.write(f"{DOTA}/labelTxt/same_scene.txt", dota_text(rename[DOTA], "0.3", rotate_every=2))
    b.write(f"{VOC}/JPEGImages/same_scene.jpg", jpg)
    b.write(f"{VOC}/Annotations/same_scene.xml",
            voc_xml("same_scene.jpg", SIDE, SIDE, rename[VOC]))
    b.write(f"{COCO}/images/same_scene.png", png)
    _coco_add(b, "same_scene.png", SIDE, SIDE, rename[COCO])
    b.write(f"{YOLO}/images/same_scene.jpg", jpg)
    b.write(f"{YOLO}/labels/same_scene.txt", yolo_text(rename[YOLO], SIDE, SIDE))
    copies = {DOTA: ("images/same_scene.png", "labelTxt/same_scene.txt"),
              COCO: ("images/same_scene.png", "annotations/instances_train.json"),
              VOC: ("JPEGImages/same_scene.jpg", "Annotations/same_scene.xml"),
              YOLO: ("images/same_scene.jpg", "labels/same_scene.txt")}
    survivor_src = min((DOTA, COCO), key=lambda s: make_key(s, _sid(copies[s][0])))
    survivor = make_key(survivor_src, _sid(copies[survivor_src][0]))
    for src, (img_rel, ann) in copies.items():
        if src == survivor_src:
            expect, shared = ("kept", None, None), None
        else:
            expect = ("duplicate", "dedup", "sha256" if src in (DOTA, COCO) else "phash")
            shared = survivor
        b.add(src, img_rel, planted="same_scene", expect=expect, annotation=ann,
              scene_class="airport", width=SIDE, height=SIDE, phash=h, objs=rename[src],
              duplicate_group="same_scene", shared_key=shared)


def _write_coco(b: _Builder) -> None:
    doc = {"info": {"description": "rs-corpus demo (COCO boxes, iSAID category names)",
                    "version": "1.0"},
           "images": b.coco_images, "annotations": b.coco_annotations,
           "categories": [{"id": i, "name": name, "supercategory": "object"}
                          for i, name, _ in COCO_CATEGORIES]}
    b.write(f"{COCO}/annotations/instances_train.json", json.dumps(doc, indent=1) + "\n")


# ----------------------------------------------------------------------------- masks


def mask_boxes(binary: np.ndarray) -> list[list[int]]:
    """Boxes ``[x0, y0, x1, y1]`` (pixel edges: x1, y1 exclusive) of the outer borders of a
    binary mask's 8-connected components, in scan order of their first pixel: holes are
    filled first (4-connected background, the complement of 8-connected foreground), so a
    component inside another's hole is part of that one, as ``cv2.RETR_EXTERNAL`` sees it."""
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(binary)
    labels, _ = ndimage.label(filled, structure=np.ones((3, 3), dtype=bool))
    out = []
    for sl in ndimage.find_objects(labels):
        if sl is not None:
            out.append([int(sl[1].start), int(sl[0].start), int(sl[1].stop), int(sl[0].stop)])
    return out


_LOVEDA_COLOURS: dict[int, tuple[int, int, int]] = {
    0: (0, 0, 0), 1: (128, 126, 104), 2: (178, 162, 150), 3: (112, 112, 114),
    4: (42, 72, 104), 5: (176, 154, 120), 6: (44, 78, 42), 7: (138, 160, 82),
}


def _paint(rng: np.random.Generator, classes: np.ndarray,
           colours: dict[int, tuple[int, int, int]]) -> Image.Image:
    """A picture from a class map: each class its colour, blotches and grain over all."""
    S = classes.shape[0]
    lut = np.zeros((max(colours) + 1, 3), np.float32)
    for k, c in colours.items():
        lut[k] = scenes._c(rng, c, 12)
    arr = lut[classes]
    arr += (scenes._smooth_noise(rng, S, 8) * 10)[..., None]
    arr += rng.normal(0, 5, arr.shape).astype(np.float32)
    return scenes._to_img(arr)


def _loveda_layout(rng: np.random.Generator, S: int = SIDE) -> np.ndarray:
    m = Image.new("L", (S, S), 1)
    d = ImageDraw.Draw(m)
    for _ in range(int(rng.integers(1, 4))):  # agriculture fields
        x, y = rng.uniform(0, 0.7, 2) * S
        w, h = rng.uniform(0.15, 0.4, 2) * S
        d.rectangle((x, y, x + w, y + h), fill=7)
    for _ in range(int(rng.integers(1, 3))):  # forest blobs
        cx, cy = rng.uniform(0.1, 0.9, 2) * S
        d.ellipse((cx - rng.uniform(15, 45), cy - rng.uniform(15, 45),
                   cx + rng.uniform(15, 45), cy + rng.uniform(15, 45)), fill=6)
    if rng.random() < 0.6:  # barren patch
        x, y = rng.uniform(0, 0.8, 2) * S
        d.rectangle((x, y, x + rng.uniform(15, 40), y + rng.uniform(15, 40)), fill=5)
    if rng.random() < 0.7:  # water
        cx, cy = rng.uniform(0.2, 0.8, 2) * S
        d.ellipse((cx - rng.uniform(12, 35), cy - rng.uniform(12, 35),
                   cx + rng.uniform(12, 35), cy + rng.uniform(12, 35)), fill=4)
    for _ in range(int(rng.integers(1, 3))):  # straight roads across
        if rng.random() < 0.5:
            y = rng.uniform(0.1, 0.9) * S
            d.line([(0, y), (S, y + rng.uniform(-30, 30))], fill=3, width=int(rng.integers(4, 8)))
        else:
            x = rng.uniform(0.1, 0.9) * S
            d.line([(x, 0), (x + rng.uniform(-30, 30), S)], fill=3, width=int(rng.integers(4, 8)))
    for _ in range(int(rng.integers(3, 9))):  # buildings
        x, y = rng.uniform(0, 0.92, 2) * S
        d.rectangle((x, y, x + rng.uniform(6, 18), y + rng.uniform(6, 18)), fill=2)
    if rng.random() < 0.3:  # a no-data strip on one edge
        wdt = int(rng.integers(8, 24))
        d.rectangle((0, 0, wdt, S), fill=0)
    return np.asarray(m, dtype=np.uint8)


def _loveda_boxes(classes: np.ndarray) -> list[list[Any]]:
    out = []
    for k in LOVEDA_BOXED:
        out += [[LOVEDA_TABLE[k], *map(float, bx)] for bx in mask_boxes(classes == k)]
    return out


def _loveda(b: _Builder, n: int) -> None:
    def picture(i: int, layout: Callable[[np.random.Generator], np.ndarray]) -> Any:
        def draw(rng: np.random.Generator) -> Any:
            classes = layout(rng)
            body = _png(_paint(rng, classes, _LOVEDA_COLOURS))
            return [body], (body, classes)

        return b.distinct(i, draw)

    for j in range(n):
        hashes, (body, classes) = picture(scene_index(800, j), _loveda_layout)
        name = f"{j + 1:04d}"
        b.write(f"{LOVEDA}/images/{name}.png", body)
        b.write(f"{LOVEDA}/masks/{name}.png", _png(Image.fromarray(classes, "L")))
        boxes = _loveda_boxes(classes)
        b.add(LOVEDA, f"images/{name}.png", annotation=f"masks/{name}.png", width=SIDE,
              height=SIDE, phash=_hex(hashes[0][0]), boxes=json.dumps(boxes),
              objects=json.dumps([{"label": x[0], "class": x[0], "box": x[1:], "difficult": 0}
                                  for x in boxes]), dropped_objects=0)
    # a mask of another size than its image
    hashes, (body, classes) = picture(850, _loveda_layout)
    b.write(f"{LOVEDA}/images/0901.png", body)
    small = Image.fromarray(classes, "L").resize((SIDE * 3 // 4, SIDE * 3 // 4),
                                                  Image.Resampling.NEAREST)
    b.write(f"{LOVEDA}/masks/0901.png", _png(small))
    b.add(LOVEDA, "images/0901.png", planted="loveda_size_mismatch", annotation="masks/0901.png",
          width=SIDE, height=SIDE, phash=_hex(hashes[0][0]))

    # background and a no-data strip only: nothing to caption
    def bare(rng: np.random.Generator) -> np.ndarray:
        m = np.ones((SIDE, SIDE), np.uint8)
        m[:, : int(rng.integers(10, 40))] = 0
        return m

    def bare_draw(rng: np.random.Generator) -> Any:
        classes = bare(rng)
        # the picture shows fallow land with ploughing marks, so it hashes apart
        img = _paint(rng, classes, _LOVEDA_COLOURS)
        d = ImageDraw.Draw(img)
        step = int(rng.integers(9, 17))
        for k in range(-SIDE, SIDE, step):
            d.line([(k, 0), (k + SIDE * rng.uniform(0.3, 1.0), SIDE)], fill=(100, 96, 80), width=2)
        body = _png(img)
        return [body], (body, classes)

    hashes, (body, classes) = b.distinct(851, bare_draw)
    b.write(f"{LOVEDA}/images/0902.png", body)
    b.write(f"{LOVEDA}/masks/0902.png", _png(Image.fromarray(classes, "L")))
    b.add(LOVEDA, "images/0902.png", planted="loveda_background_only",
          annotation="masks/0902.png", width=SIDE, height=SIDE, phash=_hex(hashes[0][0]),
          boxes="[]", objects="[]", dropped_objects=0)


_POTSDAM_INDEX = {name: k for k, name in enumerate(POTSDAM_TABLE)}
_POTSDAM_COLOURS: dict[int, tuple[int, int, int]] = {
    0: (150, 150, 148), 1: (168, 92, 74), 2: (120, 160, 90), 3: (40, 92, 40),
    4: (200, 30, 30), 5: (140, 110, 80),
}
_BOUNDARY = 6  # class index of the black boundary in a Potsdam layout


def _potsdam_layout(rng: np.random.Generator, S: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Class indices (order of :data:`POTSDAM_TABLE`): gardens, houses, trees, cars on the
    impervious ground; (the label map with the class borders as 6 = black no-data lines, the
    map without them: what the picture is painted from)."""
    m = Image.new("L", (S, S), _POTSDAM_INDEX["impervious surfaces"])
    d = ImageDraw.Draw(m)
    for _ in range(int(rng.integers(2, 4))):
        x, y = rng.uniform(0, 0.7, 2) * S
        d.rectangle((x, y, x + rng.uniform(30, 80), y + rng.uniform(30, 80)),
                    fill=_POTSDAM_INDEX["low vegetation"])
    for _ in range(int(rng.integers(2, 5))):
        x, y = rng.uniform(0, 0.8, 2) * S
        d.rectangle((x, y, x + rng.uniform(20, 50), y + rng.uniform(20, 50)),
                    fill=_POTSDAM_INDEX["building"])
    for _ in range(int(rng.integers(4, 10))):
        cx, cy = rng.uniform(0, 1, 2) * S
        r = rng.uniform(6, 14)
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_POTSDAM_INDEX["tree"])
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.uniform(0, 0.95, 2) * S
        w, h = (12, 6) if rng.random() < 0.5 else (6, 12)
        d.rectangle((x, y, x + w, y + h), fill=_POTSDAM_INDEX["car"])
    if rng.random() < 0.6:
        x, y = rng.uniform(0, 0.9, 2) * S
        d.rectangle((x, y, x + rng.uniform(5, 15), y + rng.uniform(5, 15)),
                    fill=_POTSDAM_INDEX["clutter"])
    raw = np.asarray(m, dtype=np.uint8)
    idx = raw.copy()
    edge = np.zeros_like(idx, dtype=bool)
    dx = idx[:, 1:] != idx[:, :-1]
    dy = idx[1:, :] != idx[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    idx[edge] = _BOUNDARY
    return idx, raw


def _potsdam_mask(idx: np.ndarray) -> np.ndarray:
    lut = np.zeros((_BOUNDARY + 1, 3), np.uint8)
    for name, k in _POTSDAM_INDEX.items():
        lut[k] = POTSDAM_TABLE[name]
    lut[_BOUNDARY] = POTSDAM_NODATA
    return lut[idx]


def _potsdam(b: _Builder, n: int) -> None:
    def draw(rng: np.random.Generator) -> Any:
        idx, raw = _potsdam_layout(rng)
        body = _png(_paint(rng, raw, _POTSDAM_COLOURS))
        return [body], (body, idx)

    for j in range(n + 1):
        hashes, (body, idx) = b.distinct(scene_index(900, j), draw)
        mask = _potsdam_mask(idx)
        planted = j == n
        name = "top_potsdam_7_7" if planted else f"top_potsdam_{2 + j // 4}_{10 + j % 4}"
        if planted:  # ~40% of the mask painted a colour the table does not have
            mask = mask.copy()
            mask[: SIDE * 2 // 5, :] = UNKNOWN_COLOUR
        b.write(f"{POTSDAM}/images/{name}.png", body)
        b.write(f"{POTSDAM}/masks/{name}.png", _png(Image.fromarray(mask, "RGB")))
        boxes = [] if planted else [
            [cls, *map(float, bx)] for cls in POTSDAM_BOXED
            for bx in mask_boxes(idx == _POTSDAM_INDEX[cls])]
        b.add(POTSDAM, f"images/{name}.png", annotation=f"masks/{name}.png", width=SIDE,
              height=SIDE, phash=_hex(hashes[0][0]), boxes=json.dumps(boxes),
              objects=json.dumps([{"label": x[0], "class": x[0], "box": x[1:], "difficult": 0}
                                  for x in boxes]), dropped_objects=0,
              **({"planted": "potsdam_unknown_colour"} if planted else {}))


# ----------------------------------------------------------------------------- RSICD


def _tokens(s: str) -> list[str]:
    return [t for t in "".join(ch if ch.isalnum() or ch == "'" else " "
                               for ch in s.lower()).split() if t]


def _rsicd(b: _Builder, n_train: int, n_test: int) -> None:
    images = []
    test_entries = []
    classes = scenes.CLASSES
    for k in range(n_train + n_test):
        test = k >= n_train
        cls = (DETECTION_CLASSES[k % len(DETECTION_CLASSES)] if test
               else classes[k % len(classes)])

        i = scene_index(1000, k)

        def draw(rng: np.random.Generator, cls: str = cls, test: bool = test, i: int = i) -> Any:
            img, meta = scenes.render_scene(cls, rng, RSICD_SIDE)
            objs = _objects(meta, YOLO_NAMES, RSICD_SIDE, RSICD_SIDE)
            if test and not objs:
                return None  # a test image must carry YOLO boxes (its copy is labelled)
            body = _jpeg(img)
            caps: list[str] = []
            for t in range(40):
                c = scenes.caption_scene(cls, meta, np.random.default_rng(
                    [b.seed, STREAM, i, t]))
                if c not in caps:
                    caps.append(c)
                if len(caps) == 5:
                    break
            while len(caps) < 5:
                caps.append(caps[0])  # a class with few phrasings
            return [body], (body, caps, objs)

        hashes, (body, caps, objs) = b.distinct(i, draw)
        fn = f"{cls}_{k + 1}.jpg"
        b.write(f"{RSICD}/images/{fn}", body)
        entry = {"filename": fn, "imgid": k, "split": "test" if test else "train",
                 "sentids": [k * 5 + s for s in range(5)],
                 "sentences": [{"tokens": _tokens(c), "raw": c, "imgid": k, "sentid": k * 5 + s}
                               for s, c in enumerate(caps)]}
        images.append(entry)
        kw = {"planted": "rsicd_test_split"} if test else {}
        b.add(RSICD, f"images/{fn}", annotation="dataset_rsicd.json", scene_class=cls,
              caption=caps[0], width=RSICD_SIDE, height=RSICD_SIDE,
              phash=_hex(hashes[0][0]), **kw)
        if test:
            b.write(f"{RSICD_TEST}/images/{fn}", body)
            test_entries.append(entry)
            if len(test_entries) == 1:  # planted among the YOLO training images
                b.write(f"{YOLO}/images/img_0902.jpg", body)
                b.write(f"{YOLO}/labels/img_0902.txt", yolo_text(objs, RSICD_SIDE, RSICD_SIDE))
                b.add(YOLO, "images/img_0902.jpg", planted="yolo_benchmark_copy",
                      annotation="labels/img_0902.txt", scene_class=cls, width=RSICD_SIDE,
                      height=RSICD_SIDE, phash=_hex(hashes[0][0]), objs=objs,
                      shared_key=b.truth[-1]["key"])
    b.write(f"{RSICD}/dataset_rsicd.json",
            json.dumps({"images": images, "dataset": "rsicd"}, indent=1) + "\n")
    b.write(f"{RSICD_TEST}/dataset_rsicd_test.json",
            json.dumps({"images": test_entries, "dataset": "rsicd"}, indent=1) + "\n")


# ----------------------------------------------------------------------------- entry point


def annotation_specs(root: str) -> list[str]:
    """The recipe's ``--annotations`` specs (``name=format:ROOT``) under ``root``."""
    return [f"{name}={fmt}:{root}/{name}" for name, fmt in FORMATS.items()]


def _countable(objs: list[Obj]) -> bool:
    """Some category of the objects has 1 to 10 of them (worth a counting item)."""
    counts: dict[str, int] = {}
    for o in objs:
        counts[o["label"]] = counts.get(o["label"], 0) + 1
    return any(1 <= c <= 10 for c in counts.values())


def _dota_val(b: _Builder, n: int) -> None:
    """A held-out DOTA-format set (RemoteCount is mostly DOTA val): never a training source,
    so it has no truth rows; ``heldout.txt`` names it for ``pipelines.remotecount``."""
    classes = ("airport", "industrial", "lake", "baseball_field", "river", "highway")
    for j in range(n):
        body, _, _, objs, _ = b.scene(scene_index(1200, j), DOTA_NAMES, _png, classes=classes,
                                      accept=_countable)
        name = f"P{j + 1:04d}"
        b.write(f"{HELDOUT}/images/{name}.png", body)
        b.write(f"{HELDOUT}/labelTxt/{name}.txt", dota_text(objs, "0.3"))


def build_remoteclip(out_dir: str, seed: int = 0, n: int = 24) -> dict[str, Any]:
    """Write the RemoteCLIP sources and their truth into ``out_dir`` (a world folder; see
    the module docstring): ``max(2, n // 4)`` clean images per detection and mask dataset,
    ``max(4, n // 3)`` RSICD train and ``max(2, n // 8)`` test images, plus the shared scene,
    the large scene and the planted cases; ``max(4, n // 3)`` held-out ``dota_val`` images.

    Returns ``{"rows", "by_source", "expected", "planted", "annotations": [specs],
    "heldout": spec, "decontam": "rsicd_test=DIR", "same_scene_survivor": key, "truth"}``.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    root, truth_path = fresh_part(out_dir, FOLDER, TRUTH)
    b = _Builder(out_dir, seed)
    k = max(2, n // 4)
    _dota(b, k)
    _large_scene(b)
    _voc(b, k)
    _coco(b, k)
    _yolo(b, k)
    _same_scene(b)
    _write_coco(b)
    _loveda(b, k)
    _potsdam(b, k)
    _rsicd(b, max(4, n // 3), max(2, n // 8))
    _dota_val(b, max(4, n // 3))
    # absolute roots: the listings are handed to the recipe and to remotecount as they are
    # (the only files whose bytes depend on where the world is)
    abs_root = os.path.abspath(root)
    b.write(ANNOTATIONS_FILE, "\n".join(annotation_specs(abs_root)) + "\n")
    b.write(HELDOUT_FILE, f"{HELDOUT}=dota:{abs_root}/{HELDOUT}\n")
    rows = write_truth(b.truth, _TRUTH_SCHEMA, truth_path)

    survivor = next(r["key"] for r in rows if r["planted"] == "same_scene"
                    and r["expected"] == "kept")
    return {
        "rows": len(rows),
        "by_source": tally(rows, "source"),
        "expected": tally(rows, "expected"),
        "planted": tally(rows, "planted"),
        "annotations": annotation_specs(os.path.abspath(root)),
        "heldout": f"{HELDOUT}=dota:{os.path.abspath(root)}/{HELDOUT}",
        "decontam": f"{RSICD_TEST}={os.path.join(root, RSICD_TEST)}",
        "same_scene_survivor": survivor,
        "truth": truth_path,
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the world folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=24)
    a = ap.parse_args(argv)
    print(json.dumps(build_remoteclip(a.out, a.seed, a.n), indent=1))


if __name__ == "__main__":
    main()
