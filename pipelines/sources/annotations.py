"""Annotated RS datasets (DOTA, VOC, COCO, YOLO, semantic masks, Karpathy captions) → the
RemoteCLIP head's records: one record per image, or per tile of a large scene.

**Spec syntax** (``--annotations``, repeatable; :func:`parse_spec`)::

    name=format:root          dota, voc, coco, yolo, karpathy, mask_index, mask_rgb
    name=mask_rgb[table]:root a mask dataset whose class table is not named ``name``
    name=karpathy:root/x.json a caption set whose caption JSON is named (that JSON only)
    name=root                 the format detected from the layout (:func:`detect_format`)

``name`` (letters, digits, ``_.-``) is the record's ``source``. A mask spec's class table
(``_mask["table"]``, e.g. ``loveda``, ``potsdam``) is the bracketed name, else ``name``:
``vaihingen=mask_rgb[potsdam]:/data/vaihingen`` reads Vaihingen with the Potsdam colour table.
A ``root`` may be any Beam filesystem path: ``name=gs://b/x`` is a root (``gs`` followed by
``//`` is no format), ``name=coco:gs://b/x`` a COCO root there.

**Where roots are listed.** Inside the pipeline: each dataset is listed by one worker
(``FileSystems.match(root/**)``), which also detects a gs:// or s3:// root's format. The
launcher lists nothing in a bucket; it only checks a local root and detects a local root's
format (cheap, so a typo fails before the pipeline starts). Naming a caption set's JSON
(``rsicd=karpathy:gs://b/rsicd/dataset_rsicd.json``) lets the RemoteCLIP recipe hand it to
decontamination without listing the set (:func:`caption_set_path`).

**Layouts** (folder names as written; the annotation of ``P/<image dir>/R.ext`` is
``P/<annotation dir>/R.<ext>``, so ``train/images/`` beside ``train/labelTxt/`` works too):

==========  =======================  ===========================  =========================
format      images                   annotations                  detected by
==========  =======================  ===========================  =========================
dota        ``images/``              ``labelTxt/*.txt``           both folders
voc         ``JPEGImages/``          ``Annotations/*.xml``        both folders
yolo        ``images/``              ``labels/*.txt``             both + ``classes.txt``,
                                                                  ``data.yaml`` or
                                                                  ``dataset.yaml`` at root
mask_*      ``images/``              ``masks/`` (also             both; index vs rgb from the
            (``images_png/``)        ``masks_png/``), any image   first mask's mode (``L``,
                                     extension, same stem         ``P``, ``I`` → index)
coco        ``file_name`` found in   ``annotations/*.json``       that folder
            ``images/<split>/``,
            ``<split>/``, ``images/``,
            root, else one unique
            ``…/file_name``
karpathy    ``filepath/filename``,   ``*.json`` at root with an   such a JSON + an
            ``images/``, ``imgs/``,  ``images`` list              ``images/`` or ``imgs/``
            root, ``<any dir>/``                                  folder
==========  =======================  ===========================  =========================

(``<split>`` is the JSON's stem, and its stem without the part up to the first ``_``:
``instances_train2017`` → ``train2017``.) YOLO's class list: ``classes.txt`` (one name a
line, at the root or in ``labels/``) or ``names:`` of ``data.yaml``/``dataset.yaml`` (a list,
or a ``{index: name}`` map). Not supported: DIOR's ``JPEGImages-trainval``-style folders,
Potsdam's ``*_RGB.tif``/``*_label.tif`` stems (rename into ``images/`` + ``masks/``).
Detection looks at the whole listing; two layouts at once is an error (name the format).

**Records** (spec ``/tmp/rc/spec.md``): ``source`` = name; ``source_id`` = the image's path
below the root without extension and without the layout's image folder segment
(``images/``, ``JPEGImages/``, ``images_png/``, ``imgs/``), so ``images/P0001.png`` →
``P0001`` and ``train/images/P0001.png`` → ``train/P0001``; ``key = make_key(name,
source_id)``; ``url`` the image's full path; ``_body`` the file's own bytes.
``_objects``: ``[label, x0, y0, x1, y1]`` in pixels of the image as read, after each format's
convention (DOTA oriented corners → min/max; VOC 1-based inclusive → ``[xmin-1, ymin-1, xmax,
ymax]``; COCO ``[x, y, w, h]`` → ``[x, y, x+w, y+h]``; YOLO centre/size × the image size;
YOLO polygon lines, ``class x1 y1 x2 y2 …``, → their min/max), clipped to ``[0, w] × [0, h]``;
a box with no positive width and height after clipping is dropped and counted in
``_dropped_objects``, as are objects of a class the dataset's list lacks (COCO, YOLO).
``difficult`` objects are kept (their count is in ``extra``). ``_image_size``: ``[w, h]`` of
the image as read (the frame of ``_objects``); when the annotation states another size it is
kept in ``extra["annotation_size"]``. ``gsd_m``: DOTA's ``gsd`` header when it is a number.
``extra`` (JSON): ``format`` and the format's details (DOTA ``imagesource``/``gsd``, VOC
``filename``, COCO ``image_id``/``json``, Karpathy ``imgid``/``split``, ``difficult``).
Mask records carry ``_mask`` ``{"path", "style", "table"}`` and no ``_objects`` (MaskToBox
makes them); Karpathy records carry ``caption`` (the first train sentence), ``captions`` (all,
whitespace-normalised) and ``caption_kind`` ``"human"``. Karpathy's ``restval`` split counts
as train (Karpathy's own convention: the rest of val used for training).

**Tiles** (``tile`` given; detection formats only: masks and captions describe whole images
and pass whole). An image wider or taller than ``tile`` is decoded once (``tile_max_pixels``,
default 400 MP: a 20,000 px DOTA scene; above, ``too_large``) and cut into ``tile`` × ``tile``
windows (:func:`tile_windows`, the DOTA devkit's rule: a step of ``tile * (1 - overlap)``,
the last window flush with the edge). A box is kept in a tile when at least half of its area
lies inside, clipped to the tile (:func:`tile_objects`); a tile with no kept box is dropped
(Beam counter ``tiles_empty``). **A scene yields N tile records** (source_id
``{scene}@{x0}_{y0}_{tile}``, ``_body`` the tile as PNG, ``_dropped_objects`` the boxes cut by
the tile's edge with less than half inside); a scene none of whose tiles keeps a box is one
``no_objects`` reject. The kit counts a source's records + rejects as the subset's input, so
**for tiled scenes ``input`` counts tiles**, not scenes. Smaller images pass whole.

**Rejects** (stage ``read``, :data:`REASONS`): ``annotation_malformed`` (does not parse, wrong
shape, an XML with entity declarations, a YOLO root without class names),
``annotation_missing`` (an image without its annotation file: dota, voc, yolo, masks),
``image_missing``, ``image_unreadable`` (no image header we accept, a read error),
``unknown_class`` (every object's class unknown to the dataset's list: COCO, YOLO),
``no_objects``, ``no_captions`` (a Karpathy train image without a sentence), ``too_large``
(a file over ``max_bytes``, a COCO/Karpathy JSON over ``max_json_bytes``, a scene over
``tile_max_pixels``), ``path_outside_root`` (a JSON's file name that is absolute or climbs
out with ``..``; any file that resolves through a symlink outside the root),
``duplicate_image_name`` (a second image with an annotated image's stem, ``a.png`` beside
``a.jpg``: the first by name takes the annotation, the other is this reject).

**Safety.** Every file is read with a byte cap; XML is parsed by ``defusedxml`` when it is
installed, else by expat with every entity declaration refused (billion laughs, quadratic
blow-up) and no external entity ever resolved; YAML with ``safe_load``. COCO and Karpathy
JSONs are read once, in the listing DoFn, which emits one item per image (plain dicts).
Known limit: boxes are taken in the stored pixel frame; a JPEG with an EXIF rotation is
turned upright by ``Decode`` and its boxes would not follow (RS datasets ship none).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple
from xml.etree import ElementTree as ET
from xml.parsers import expat

import apache_beam as beam
import numpy as np

from pipelines import image_guard, records
from pipelines.records import MAIN, REJECTS
from pipelines.sources import archives
from pipelines.sources.archives import ArchiveError, rejected, tagged
from pipelines.sources.benchmarks import BenchmarkFormatError, inside, is_image

try:  # the maintained guard when present; the expat fallback below refuses the same
    from defusedxml import DefusedXmlException as _DefusedError
    from defusedxml.ElementTree import fromstring as _defused_fromstring
except ImportError:  # pragma: no cover - depends on the environment
    _DefusedError = None
    _defused_fromstring = None

STAGE = "read"
FORMATS = ("dota", "voc", "coco", "yolo", "mask_index", "mask_rgb", "karpathy")
DETECTION_FORMATS = ("dota", "voc", "coco", "yolo")
REASONS = (
    "annotation_malformed",
    "annotation_missing",
    "image_missing",
    "image_unreadable",
    "unknown_class",
    "no_objects",
    "no_captions",
    "too_large",
    "path_outside_root",
    "duplicate_image_name",
)
#: the most bytes of an image (a 20,000 px DOTA PNG is a few hundred MB)
DEFAULT_MAX_BYTES = archives.DEFAULT_MAX_BYTES
#: the most bytes of a COCO / Karpathy JSON (iSAID's train JSON is the big one)
DEFAULT_MAX_JSON_BYTES = 1 << 30
#: the most bytes of one per-image annotation file (a dense DOTA scene's is a few MB)
MAX_ANNOTATION_BYTES = 64 << 20
#: the most bytes of a YOLO names file
MAX_NAMES_BYTES = 1 << 20
#: the most pixels of a scene decoded for tiling
DEFAULT_TILE_MAX_PIXELS = 400_000_000
#: a Karpathy image of these splits is read (``restval``: Karpathy's extra training images)
TRAIN_SPLITS = ("train", "restval")
#: folder segments dropped from source_id (the layouts' image folders)
IMAGE_DIRS = ("images", "JPEGImages", "images_png", "imgs")
YOLO_NAME_FILES = ("classes.txt", "labels/classes.txt", "data.yaml", "dataset.yaml")
MASK_DIRS = (("images", "masks"), ("images_png", "masks_png"))
#: PIL modes of an index mask (anything else, RGB/RGBA, is colour-coded)
INDEX_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_FORMAT_PREFIX = re.compile(r"^(?P<fmt>[A-Za-z_]+)(?:\[(?P<table>[A-Za-z0-9_.\-]+)\])?:"
                            r"(?!//)(?P<root>.+)$")

# a raw object: [label, x0, y0, x1, y1, difficult]; ``_objects`` keeps the first five
RawObject = list[Any]
Box = list[Any]


class AnnotationError(ArchiveError):
    """A bad entry; ``reason`` is one of :data:`REASONS`."""


# --- specs and detection ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AnnotationSpec:
    name: str
    format: str | None
    root: str
    table: str | None = None  # masks only: the class table (default: name)
    #: karpathy only: the caption JSON's name at the root, when the spec names it
    #: (``name=karpathy:ROOT/dataset.json``); None: every root-level caption JSON
    caption_json: str | None = None


def is_remote(root: str) -> bool:
    return "://" in root


def parse_spec(text: str, *, detect: bool | None = None) -> AnnotationSpec:
    """``name=format:root``, ``name=mask_rgb[table]:root``, ``name=karpathy:root/file.json``
    or ``name=root`` → a spec.

    Without a format, ``detect`` lists the root and calls :func:`detect_format`
    (``detect=False`` leaves ``format`` None; the default, None, detects a local root only:
    a gs:// or s3:// root is detected by the worker that lists it, :func:`detected`, so the
    launcher never lists a bucket). A karpathy root ending in ``.json`` names the caption
    JSON: the dataset is that file's folder, its images those of that JSON alone. Raises
    ValueError on a bad name, an unknown format, a table on a format other than masks."""
    name, sep, rest = str(text).strip().partition("=")
    name, rest = name.strip(), rest.strip()
    if not sep or not _NAME.match(name) or not rest:
        raise ValueError(f"annotation spec {text!r}: expected name=format:root or name=root")
    fmt: str | None = None
    table: str | None = None
    m = _FORMAT_PREFIX.match(rest)
    if m:
        fmt, table, rest = m["fmt"], m["table"], m["root"]
        if fmt not in FORMATS:
            raise ValueError(f"annotation spec {text!r}: unknown format {fmt!r} "
                             f"(one of {', '.join(FORMATS)})")
        if table and not fmt.startswith("mask_"):
            raise ValueError(f"annotation spec {text!r}: a [table] is for mask formats only")
    root = rest.rstrip("/") or "/"
    if "://" not in root:
        root = os.path.abspath(root)
    caption_json = None
    if fmt == "karpathy" and root.lower().endswith(".json"):
        root, caption_json = posixpath.split(root)
        root = root.rstrip("/") or "/"
    if fmt is not None and fmt.startswith("mask_"):
        table = table or name
    if detect is None:
        detect = not is_remote(root)
    spec = AnnotationSpec(name, fmt, root, table, caption_json)
    return detected(spec) if detect else spec


def detected(spec: AnnotationSpec) -> AnnotationSpec:
    """``spec`` with its format found from the root's layout when it names none
    (:func:`detect_format`: lists the root), and a mask spec's class table."""
    fmt, table = spec.format, spec.table
    if fmt is None:
        fmt = detect_format(spec.root)
    if fmt.startswith("mask_"):
        table = table or spec.name
    return dataclasses.replace(spec, format=fmt, table=table)


def _folders(files: Iterable[str]) -> dict[str, set[str]]:
    """``{prefix: {folder names directly below it that hold files}}`` of a listing."""
    out: dict[str, set[str]] = {}
    for rel in files:
        parts = rel.split("/")
        for i in range(len(parts) - 1):
            out.setdefault("/".join(parts[:i]), set()).add(parts[i])
    return out


def _has_pair(folders: dict[str, set[str]], a: str, b: str) -> bool:
    return any({a, b} <= segs for segs in folders.values())


def _mask_style(root: str, files: dict[str, int]) -> str:
    """``mask_index`` or ``mask_rgb`` from the PIL mode of the first mask (header only)."""
    for rel in files:
        parts = rel.split("/")
        if any(m in parts[:-1] for _, m in MASK_DIRS) and is_image(rel):
            data = archives.read_capped(archives.rel_join(root, rel), DEFAULT_MAX_BYTES)
            try:
                with image_guard.open_image(data, max_pixels=1 << 40,
                                            max_decoded_bytes=None) as img:
                    return "mask_index" if img.mode in INDEX_MODES else "mask_rgb"
            except image_guard.ImageRefused as e:
                raise ValueError(f"{root}: cannot read mask {rel} to tell its style "
                                 f"({e}); name mask_index or mask_rgb") from e
    raise ValueError(f"{root}: no mask image found")


def _karpathy_jsons(root: str, files: dict[str, int]) -> list[str]:
    """Root-level ``*.json`` files that hold a Karpathy ``images`` list (read capped)."""
    out = []
    for rel, size in files.items():
        if "/" in rel or not rel.lower().endswith(".json") or size > DEFAULT_MAX_JSON_BYTES:
            continue
        try:
            doc = _read_json(archives.rel_join(root, rel), DEFAULT_MAX_JSON_BYTES)
        except ArchiveError:
            continue
        ims = doc.get("images") if isinstance(doc, dict) else None
        if isinstance(ims, list) and ims and isinstance(ims[0], dict) \
                and "filename" in ims[0]:
            out.append(rel)
    return out


def caption_set_path(spec: AnnotationSpec) -> str:
    """The caption JSON of a karpathy spec, for decontamination: the one the spec names
    (``name=karpathy:ROOT/file.json``: nothing listed or read), else
    :func:`caption_set_json` of its root (lists the root, reads its root-level JSONs)."""
    if spec.caption_json:
        return archives.rel_join(spec.root, spec.caption_json)
    return caption_set_json(spec.root)


def caption_set_json(root: str) -> str:
    """The full path of a ``karpathy`` root's caption JSON (the first root-level ``*.json``,
    by name, holding a Karpathy ``images`` list): what the recipe hands decontamination so
    the set's own test/val images are held out. FileNotFoundError when there is none."""
    root = root.rstrip("/") or "/"
    found = _karpathy_jsons(root, archives.list_files(root))
    if not found:
        raise FileNotFoundError(f"{root}: no Karpathy caption JSON (*.json with 'images')")
    return archives.rel_join(root, found[0])


def detect_format(root: str) -> str:
    """The format of a dataset folder from its layout (table in the module docstring).
    Raises ValueError when no layout, or more than one, matches."""
    root = root.rstrip("/") or "/"
    files = archives.list_files(root)
    if not files:
        raise ValueError(f"{root}: no files (or not a folder)")
    folders = _folders(files)
    top = folders.get("", set())
    found = []
    if _has_pair(folders, "images", "labelTxt"):
        found.append("dota")
    if _has_pair(folders, "JPEGImages", "Annotations"):
        found.append("voc")
    if _has_pair(folders, "images", "labels") and any(n in files for n in YOLO_NAME_FILES):
        found.append("yolo")
    if any(_has_pair(folders, i, m) for i, m in MASK_DIRS):
        found.append("mask")
    if any(r.startswith("annotations/") and r.count("/") == 1 and r.lower().endswith(".json")
           for r in files):
        found.append("coco")
    if (top & {"images", "imgs"}) and _karpathy_jsons(root, files):
        found.append("karpathy")
    if len(found) != 1:
        what = "no known layout" if not found else f"several layouts ({', '.join(found)})"
        raise ValueError(f"{root}: {what}; name the format: name=format:root with format one "
                         f"of {', '.join(FORMATS)}")
    return _mask_style(root, files) if found[0] == "mask" else found[0]


# --- safe reading -------------------------------------------------------------------------


def _read_text(path: str, max_bytes: int = MAX_ANNOTATION_BYTES) -> bytes:
    try:
        return archives.read_capped(path, max_bytes)
    except ArchiveError as e:
        reason = "too_large" if e.reason == "too_large" else "annotation_malformed"
        raise AnnotationError(reason, e.detail) from e


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # old DOTA/VOC exports; a label is ASCII anyway


def _read_json(path: str, max_bytes: int) -> Any:
    data = _read_text(path, max_bytes)
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AnnotationError("annotation_malformed", f"{posixpath.basename(path)}: not JSON "
                                                      f"({type(e).__name__}: "
                                                      f"{str(e)[:120]})") from e


class _Refused(Exception):
    pass


def _refuse(*_args: Any) -> None:
    raise _Refused("XML entity declarations and external entities are refused")


def _expat_tree(data: bytes) -> ET.Element:
    """XML → ElementTree, via expat with every entity declaration refused: without a
    declaration no entity can expand (billion laughs, quadratic blow-up), and parameter /
    external entities are never parsed or fetched."""
    builder = ET.TreeBuilder()
    p = expat.ParserCreate()
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    p.EntityDeclHandler = _refuse
    p.UnparsedEntityDeclHandler = _refuse
    p.ExternalEntityRefHandler = _refuse
    p.buffer_text = True
    p.StartElementHandler = builder.start
    p.EndElementHandler = builder.end
    p.CharacterDataHandler = builder.data
    p.Parse(data, True)
    return builder.close()


def safe_xml(data: bytes) -> ET.Element:
    """The root element of untrusted XML, or :class:`AnnotationError`
    (``annotation_malformed``) for bad XML and for any entity declaration."""
    try:
        if _defused_fromstring is not None:
            return _defused_fromstring(data)
        return _expat_tree(data)
    except _Refused as e:
        raise AnnotationError("annotation_malformed", str(e)) from e
    except Exception as e:  # ParseError, ExpatError, defusedxml's refusals
        if _DefusedError is not None and isinstance(e, _DefusedError):
            raise AnnotationError("annotation_malformed",
                                  f"XML entities refused ({type(e).__name__})") from e
        raise AnnotationError("annotation_malformed",
                              f"not XML ({type(e).__name__}: {str(e)[:120]})") from e


# --- pure parsers -------------------------------------------------------------------------


def _finite(token: Any, what: str) -> float:
    try:
        v = float(token)
    except (TypeError, ValueError) as e:
        raise AnnotationError("annotation_malformed", f"{what} is {str(token)[:40]!r}, "
                                                      "not a number") from e
    if not math.isfinite(v):
        raise AnnotationError("annotation_malformed", f"{what} is {token!r}")
    return v


def parse_dota(text: str) -> tuple[dict[str, Any], list[RawObject]]:
    """A DOTA ``labelTxt`` file → (header, objects).

    Header lines (``key:value``, no spaces: ``imagesource:GoogleEarth``, ``gsd:0.146``) give
    ``{key: value}``, ``gsd`` as a float, or None for ``null``/anything not a number. Object
    lines ``x1 y1 … x4 y4 category [difficult]`` → ``[category, min x, min y, max x, max y,
    difficult]`` (the oriented box's horizontal hull; a missing difficult is 0). Blank lines are
    skipped; any other line is ``annotation_malformed``."""
    header: dict[str, Any] = {}
    objects: list[RawObject] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 1 and ":" in parts[0]:
            key, _, value = parts[0].partition(":")
            header[key.strip().lower()] = value.strip()
            continue
        if len(parts) not in (9, 10):
            raise AnnotationError("annotation_malformed",
                                  f"line {n}: {len(parts)} fields, DOTA has 9 or 10")
        xy = [_finite(t, f"line {n} coordinate") for t in parts[:8]]
        difficult = False
        if len(parts) == 10:
            try:
                difficult = int(parts[9]) != 0
            except ValueError as e:
                raise AnnotationError("annotation_malformed",
                                      f"line {n}: difficult is {parts[9][:20]!r}") from e
        xs, ys = xy[0::2], xy[1::2]
        objects.append([parts[8], min(xs), min(ys), max(xs), max(ys), difficult])
    if "gsd" in header:
        try:
            g = float(header["gsd"])
            header["gsd"] = g if math.isfinite(g) and g > 0 else None
        except ValueError:
            header["gsd"] = None
    return header, objects


def _child_text(el: ET.Element, tag: str) -> str | None:
    c = el.find(tag)
    return c.text.strip() if c is not None and c.text is not None else None


def parse_voc(xml_bytes: bytes) -> tuple[dict[str, Any], list[RawObject]]:
    """A PASCAL VOC XML → (info, objects): info ``{"filename", "width", "height"}`` (None
    where absent), objects ``[name, xmin-1, ymin-1, xmax, ymax, difficult]`` (VOC's 1-based
    inclusive pixels as 0-based edges; not clipped here). Entity declarations are refused
    (:func:`safe_xml`); an object without a name or a numeric ``bndbox`` is
    ``annotation_malformed``."""
    root = safe_xml(xml_bytes)
    if root.tag.lower() != "annotation":
        raise AnnotationError("annotation_malformed", f"root element <{root.tag[:40]}>, "
                                                      "not <annotation>")
    info: dict[str, Any] = {"filename": _child_text(root, "filename"), "width": None,
                            "height": None}
    size = root.find("size")
    if size is not None:
        for k in ("width", "height"):
            t = _child_text(size, k)
            try:
                v = int(float(t)) if t else None
            except ValueError:
                v = None
            info[k] = v if v and v > 0 else None
    objects: list[RawObject] = []
    for i, obj in enumerate(root.iter("object")):
        name = _child_text(obj, "name")
        box = obj.find("bndbox")
        if not name or box is None:
            raise AnnotationError("annotation_malformed",
                                  f"object {i} has no <name> or no <bndbox>")
        c = [_finite(_child_text(box, k), f"object {i} {k}")
             for k in ("xmin", "ymin", "xmax", "ymax")]
        d = _child_text(obj, "difficult")
        difficult = d not in (None, "", "0")
        objects.append([name, c[0] - 1.0, c[1] - 1.0, c[2], c[3], difficult])
    return info, objects


class CocoImage(NamedTuple):
    """One image of a COCO JSON: its objects (``[category name, x, y, x+w, y+h, False]``),
    how many annotations name a category id the JSON lacks, and what is malformed in its
    entries (None when nothing)."""

    file_name: str
    width: int | None
    height: int | None
    objects: list[RawObject]
    unknown: int = 0
    malformed: str | None = None
    image_id: Any = None


def _positive_int(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return int(v) if v > 0 and v == int(v) else None


def parse_coco(doc: Any) -> list[CocoImage]:
    """A COCO detection JSON → its images, sorted by file name (then id). ``bbox`` only
    (segmentation is not needed for boxes; ``iscrowd`` boxes are kept). Annotations of an
    image id the JSON does not list are ignored. Raises ``annotation_malformed`` when the
    document is not a COCO detection object (no ``images`` or ``categories`` list,
    ``annotations`` not a list, a category without an id or name)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise AnnotationError("annotation_malformed", "no 'images' list (COCO format)")
    anns, cats_raw = doc.get("annotations", []), doc.get("categories")
    if not isinstance(anns, list) or not isinstance(cats_raw, list):
        raise AnnotationError("annotation_malformed", "no 'categories' list, or 'annotations' "
                                                      "not a list (a captions or keypoints "
                                                      "JSON is no detection JSON)")
    cats: dict[Any, str] = {}
    for c in cats_raw:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) \
                or not isinstance(c.get("id"), (int, str)):
            raise AnnotationError("annotation_malformed", f"category {str(c)[:60]} has no "
                                                          "id or name")
        cats[c["id"]] = c["name"]
    images: dict[Any, dict[str, Any]] = {}
    bad: list[CocoImage] = []
    for i, im in enumerate(doc["images"]):
        fn = im.get("file_name") if isinstance(im, dict) else None
        iid = im.get("id") if isinstance(im, dict) else None
        if not isinstance(fn, str) or not fn or not isinstance(iid, (int, str)):
            bad.append(CocoImage(fn if isinstance(fn, str) and fn else f"#image{i}", None,
                                 None, [], 0, "an image entry without file_name or id"))
            continue
        if iid in images:
            continue  # a repeated id: the first entry holds
        images[iid] = {"file_name": fn, "width": _positive_int(im.get("width")),
                       "height": _positive_int(im.get("height")), "objects": [],
                       "unknown": 0, "malformed": None, "image_id": iid}
    for a in anns:
        im = images.get(a.get("image_id")) if isinstance(a, dict) else None
        if im is None:
            continue
        bbox = a.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) for v in bbox)):
            im["malformed"] = im["malformed"] or f"annotation {a.get('id')!r}: bbox " \
                                                 f"{str(bbox)[:60]} is not [x, y, w, h]"
            continue
        name = cats.get(a.get("category_id")) if isinstance(a.get("category_id"),
                                                            (int, str)) else None
        if name is None:
            im["unknown"] += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        im["objects"].append([name, x, y, x + w, y + h, False])
    out = [CocoImage(**im) for im in images.values()] + bad
    return sorted(out, key=lambda c: (c.file_name, str(c.image_id)))


def parse_yolo_names(data: bytes, file_name: str) -> list[str]:
    """Class names from ``classes.txt`` (one a line; trailing blank lines ignored) or a
    dataset YAML's ``names:`` (a list, or ``{index: name}`` with indexes 0..n-1)."""
    text = _decode(data, file_name)
    if file_name.endswith(".txt"):
        lines = [ln.strip() for ln in text.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        if not lines or not all(lines):
            raise AnnotationError("annotation_malformed", f"{file_name}: empty or blank lines")
        return lines
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - PyYAML comes with our dependencies
        raise AnnotationError("annotation_malformed",
                              f"{file_name}: PyYAML is not installed (use classes.txt)") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AnnotationError("annotation_malformed", f"{file_name}: not YAML") from e
    names = doc.get("names") if isinstance(doc, dict) else None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise AnnotationError("annotation_malformed",
                                  f"{file_name}: names indexes are not 0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or \
            not all(isinstance(n, (str, int)) and str(n).strip() for n in names):
        raise AnnotationError("annotation_malformed", f"{file_name}: no 'names' list")
    return [str(n).strip() for n in names]


def parse_yolo(text: str, names: list[str], w: float, h: float
               ) -> tuple[list[RawObject], int]:
    """A YOLO label file → (objects in pixels of a ``w`` × ``h`` image, how many lines name a
    class index outside ``names``). ``class cx cy bw bh`` (normalised centre and size) →
    ``[(cx - bw/2) w, (cy - bh/2) h, (cx + bw/2) w, (cy + bh/2) h]``; a line of
    ``class x1 y1 … xn yn`` (YOLO segment/OBB, n ≥ 3) → the points' min/max. Coordinates
    outside [0, 1] are left for clipping. Any other line is ``annotation_malformed``."""
    objects: list[RawObject] = []
    unknown = 0
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 5 or (len(parts) > 5 and (len(parts) - 1) % 2) or \
                (len(parts) > 5 and len(parts) < 7):
            raise AnnotationError("annotation_malformed",
                                  f"line {n}: {len(parts)} fields, not class cx cy w h")
        try:
            cls = int(parts[0])
        except ValueError as e:
            raise AnnotationError("annotation_malformed",
                                  f"line {n}: class {parts[0][:20]!r} is not an index") from e
        v = [_finite(t, f"line {n} coordinate") for t in parts[1:]]
        if not 0 <= cls < len(names):
            unknown += 1
            continue
        if len(v) == 4:
            cx, cy, bw, bh = v
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        else:
            xs, ys = v[0::2], v[1::2]
            box = [min(xs) * w, min(ys) * h, max(xs) * w, max(ys) * h]
        objects.append([names[cls], *box, False])
    return objects, unknown


def karpathy_train_items(doc: Any) -> list[dict[str, Any]]:
    """The train images (splits :data:`TRAIN_SPLITS`: ``train`` and ``restval``) of a
    Karpathy caption JSON: ``{"filename", "filepath", "imgid", "split", "sentences"}``,
    sentences whitespace-normalised (``raw``, else the ``tokens`` joined), empty ones gone;
    in file order. An entry that is not an object, or a train entry without a file name, is
    ``{"error": detail, "index": i}``. Raises ``annotation_malformed`` without an
    ``images`` list."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise AnnotationError("annotation_malformed", "no 'images' list (Karpathy format)")
    out: list[dict[str, Any]] = []
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict):
            out.append({"index": i, "error": f"images[{i}] is not an object"})
            continue
        if im.get("split") not in TRAIN_SPLITS:
            continue
        fn = im.get("filename")
        if not isinstance(fn, str) or not fn:
            out.append({"index": i, "error": f"images[{i}] has no filename"})
            continue
        sents = []
        for s in im.get("sentences") or []:
            if isinstance(s, dict):
                raw = s.get("raw")
                if not isinstance(raw, str) and isinstance(s.get("tokens"), list):
                    raw = " ".join(str(t) for t in s["tokens"])
            else:
                raw = s
            if isinstance(raw, str) and raw.split():
                sents.append(" ".join(raw.split()))
        fp = im.get("filepath")
        out.append({"filename": fn, "filepath": fp if isinstance(fp, str) and fp else None,
                    "imgid": im.get("imgid"), "split": im["split"], "sentences": sents})
    return out


# --- boxes and tiles ----------------------------------------------------------------------


def clip_objects(objects: Iterable[RawObject], w: float, h: float) -> tuple[list[Box], int]:
    """Objects clipped to ``[0, w] × [0, h]`` → (``[label, x0, y0, x1, y1]`` with positive
    width and height, how many were dropped: nothing left after clipping)."""
    kept: list[Box] = []
    dropped = 0
    for o in objects:
        x0, y0 = max(0.0, float(o[1])), max(0.0, float(o[2]))
        x1, y1 = min(float(w), float(o[3])), min(float(h), float(o[4]))
        if x1 > x0 and y1 > y0:
            kept.append([str(o[0]), x0, y0, x1, y1])
        else:
            dropped += 1
    return kept, dropped


def _starts(length: int, size: int, overlap: float) -> list[int]:
    if length <= size:
        return [0]
    step = max(1, round(size * (1.0 - overlap)))
    starts = list(range(0, length - size, step))
    starts.append(length - size)
    return starts


def tile_windows(w: int, h: int, size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` windows of ``size`` px cutting a ``w`` × ``h`` image, row by row:
    starts every ``round(size * (1 - overlap))`` px, the last one flush with the edge (the
    DOTA devkit's rule); a side not longer than ``size`` is one window of that side."""
    if size <= 0 or not 0.0 <= overlap < 1.0 or w <= 0 or h <= 0:
        raise ValueError("tile_windows needs w, h, size > 0 and 0 <= overlap < 1")
    return [(x0, y0, min(x0 + size, w), min(y0 + size, h))
            for y0 in _starts(h, size, overlap) for x0 in _starts(w, size, overlap)]


def tile_objects(objects: Iterable[Box], window: tuple[int, int, int, int]
                 ) -> tuple[list[Box], int]:
    """The objects of one tile: a box at least half of whose area lies in ``window`` is kept,
    clipped to it and shifted to its origin. Returns (kept, cut): cut counts the boxes that
    overlap the window with less than half their area."""
    wx0, wy0, wx1, wy1 = window
    kept: list[Box] = []
    cut = 0
    for label, x0, y0, x1, y1 in (o[:5] for o in objects):
        area = (x1 - x0) * (y1 - y0)
        ix0, iy0, ix1, iy1 = max(x0, wx0), max(y0, wy0), min(x1, wx1), min(y1, wy1)
        if ix1 <= ix0 or iy1 <= iy0 or area <= 0:
            continue
        if (ix1 - ix0) * (iy1 - iy0) >= 0.5 * area:
            kept.append([label, ix0 - wx0, iy0 - wy0, ix1 - wx0, iy1 - wy0])
        else:
            cut += 1
    return kept, cut


# --- listing ------------------------------------------------------------------------------


def source_id_of(rel: str) -> str:
    """The source_id of an image path below the root: no extension, no image-folder segment
    (the first segment among :data:`IMAGE_DIRS`)."""
    parts = posixpath.splitext(rel)[0].split("/")
    for i, seg in enumerate(parts[:-1]):
        if seg in IMAGE_DIRS:
            del parts[i]
            break
    return "/".join(parts)


def _item(spec: AnnotationSpec, source_id: str, **kw: Any) -> dict[str, Any]:
    return {"name": spec.name, "format": spec.format, "root": spec.root, "table": spec.table,
            "source_id": source_id, "image": None, "image_bytes": None, "url": None, **kw}


def _paired(files: dict[str, int], img_dir: str, ann_dir: str,
            ann_ok: Any) -> dict[str, dict[str, Any]]:
    """``{source_id: {"image", "image_bytes", "ann", "ann_bytes"}}`` pairing
    ``P/<img_dir>/R.*`` with ``P/<ann_dir>/R.*`` (the first by name when a stem repeats; the
    other images of that stem are kept in the slot's ``repeats`` and become rejects)."""
    out: dict[str, dict[str, Any]] = {}
    for rel, size in sorted(files.items()):
        parts = rel.split("/")
        for d, kind in ((img_dir, "image"), (ann_dir, "ann")):
            if d not in parts[:-1]:
                continue
            i = parts.index(d)
            if kind == "image" and not is_image(rel):
                continue
            if kind == "ann" and not ann_ok(rel):
                continue
            sid = posixpath.splitext("/".join(parts[:i] + parts[i + 1:]))[0]
            slot = out.setdefault(sid, {"image": None, "image_bytes": None, "ann": None,
                                        "ann_bytes": None})
            if slot[kind] is None:
                slot[kind], slot[f"{kind}_bytes"] = rel, size
            elif kind == "image":
                slot.setdefault("repeats", []).append(rel)
    return out


def _yolo_names(spec: AnnotationSpec, files: dict[str, int]
                ) -> tuple[list[str] | None, str | None]:
    for rel in YOLO_NAME_FILES:
        if rel in files:
            try:
                if files[rel] > MAX_NAMES_BYTES:
                    raise AnnotationError("annotation_malformed", f"{rel} is too large")
                data = _read_text(archives.rel_join(spec.root, rel), MAX_NAMES_BYTES)
                return parse_yolo_names(data, rel), None
            except ArchiveError as e:
                return None, e.detail
    return None, f"no class names ({', '.join(YOLO_NAME_FILES)}) in the root"


def _list_per_file(spec: AnnotationSpec, files: dict[str, int]) -> list[dict[str, Any]]:
    fmt = spec.format
    names, names_error = (None, None)
    if fmt == "dota":
        pairs = _paired(files, "images", "labelTxt", lambda r: r.endswith(".txt"))
    elif fmt == "voc":
        pairs = _paired(files, "JPEGImages", "Annotations", lambda r: r.lower().endswith(".xml"))
    elif fmt == "yolo":
        pairs = _paired(files, "images", "labels", lambda r: r.endswith(".txt")
                        and posixpath.basename(r) != "classes.txt")
        names, names_error = _yolo_names(spec, files)
    else:  # masks
        pairs = {}
        for img_dir, mask_dir in MASK_DIRS:
            for sid, slot in _paired(files, img_dir, mask_dir, is_image).items():
                pairs.setdefault(sid, slot)
    items = []
    for sid in sorted(pairs):
        p = dict(pairs[sid])
        for rel in p.pop("repeats", []):  # a.png beside a.jpg: one annotation, two images
            items.append(_item(spec, f"{sid}{posixpath.splitext(rel)[1]}",
                               url=archives.rel_join(spec.root, rel),
                               error=("duplicate_image_name",
                                      f"{rel}: its annotation is {p['image']}'s")))
        it = _item(spec, sid, **p, url=archives.rel_join(spec.root, p["image"] or p["ann"]))
        if fmt == "yolo":
            it["names"] = names
            if names_error and p["image"] and p["ann"]:
                it["error"] = ("annotation_malformed", names_error)
        items.append(it)
    return items


class _Images(NamedTuple):
    """The images of a listing: ``by_name`` (basename → paths, for a JSON's file names found
    nowhere standard) and ``dirs`` (the folders that hold images)."""

    by_name: dict[str, list[str]]
    dirs: set[str]


def _images_index(files: dict[str, int]) -> _Images:
    out = _Images({}, set())
    for rel in files:
        if is_image(rel):
            out.by_name.setdefault(posixpath.basename(rel), []).append(rel)
            out.dirs.add(posixpath.dirname(rel))
    return out


def _resolve(spec: AnnotationSpec, files: dict[str, int], index: _Images,
             name: str, dirs: list[str]) -> tuple[str | None, str]:
    """(the listed image ``name`` names, or None; its path relative to the root, for the
    source_id). Raises ``path_outside_root`` for absolute / climbing / symlinked names."""
    try:
        inside(spec.root, name, "file name")
    except BenchmarkFormatError as e:
        raise AnnotationError("path_outside_root", str(e)[:200]) from e
    norm = posixpath.normpath(name.replace("\\", "/"))
    cands = [posixpath.normpath(posixpath.join(d, norm)) for d in dirs]
    for c in cands:
        if c in files:
            return c, c
    hits = index.by_name.get(posixpath.basename(norm), [])
    hits = [h for h in hits if h.endswith("/" + norm)]
    if len(hits) == 1:
        return hits[0], hits[0]
    # missing: named after the first candidate whose folder exists (else the first one)
    return None, next((c for c in cands if posixpath.dirname(c) in index.dirs), cands[0])


def _json_reject(spec: AnnotationSpec, rel: str, e: ArchiveError) -> dict[str, Any]:
    return _item(spec, posixpath.splitext(rel)[0], url=archives.rel_join(spec.root, rel),
                 error=(e.reason, e.detail))


def _add_item(items: dict[str, dict[str, Any]], spec: AnnotationSpec, sid: str,
              item: dict[str, Any]) -> None:
    """``items[sid] = item``; a JSON entry naming an image an earlier entry named is a
    ``duplicate_image_name`` reject of its own (counted, not dropped)."""
    if sid not in items:
        items[sid] = item
        return
    n = sum(1 for k in items if k.startswith(f"{sid}#repeat"))
    dup = f"{sid}#repeat{n + 1}"
    items[dup] = _item(spec, dup, url=item.get("url"),
                       error=("duplicate_image_name", f"an earlier entry already names {sid}"))


def _listing_json(spec: AnnotationSpec, files: dict[str, int], rel: str, max_json_bytes: int,
                  parse: Any, items: dict[str, dict[str, Any]]) -> Any:
    """``parse`` of the JSON at ``rel`` (size-capped), or None with its reject item added."""
    try:
        if files[rel] > max_json_bytes:
            raise AnnotationError("too_large", f"{rel} has {files[rel]} bytes > "
                                               f"max_json_bytes {max_json_bytes}")
        return parse(_read_json(archives.rel_join(spec.root, rel), max_json_bytes))
    except ArchiveError as e:
        items.setdefault(posixpath.splitext(rel)[0], _json_reject(spec, rel, e))
        return None


def _list_coco(spec: AnnotationSpec, files: dict[str, int],
               max_json_bytes: int) -> list[dict[str, Any]]:
    index = _images_index(files)
    items: dict[str, dict[str, Any]] = {}
    jsons = [r for r in files if r.startswith("annotations/") and r.count("/") == 1
             and r.lower().endswith(".json")]
    for rel in jsons:
        path = archives.rel_join(spec.root, rel)
        images = _listing_json(spec, files, rel, max_json_bytes, parse_coco, items)
        if images is None:
            continue
        stem = posixpath.splitext(posixpath.basename(rel))[0]
        splits = list(dict.fromkeys([stem, stem.split("_", 1)[-1]]))
        dirs = [f"images/{s}" for s in splits] + splits + ["images", ""]
        for im in images:
            extra = {"json": rel, "image_id": im.image_id}
            try:
                found, at = _resolve(spec, files, index, im.file_name, dirs)
            except ArchiveError as e:
                it = _item(spec, im.file_name, url=path, error=(e.reason, e.detail))
                items.setdefault(f"\x00{rel}\x00{im.file_name}", it)
                continue
            sid = source_id_of(at)
            it = _item(spec, sid, image=found, image_bytes=files.get(found or ""),
                       url=archives.rel_join(spec.root, at), objects=im.objects,
                       unknown=im.unknown, ann_size=[im.width, im.height]
                       if im.width and im.height else None, extra=extra)
            if im.malformed:
                it["error"] = ("annotation_malformed", f"{rel}: {im.malformed}")
            _add_item(items, spec, sid, it)
    return [items[k] for k in sorted(items)]


def _list_karpathy(spec: AnnotationSpec, files: dict[str, int],
                   max_json_bytes: int) -> list[dict[str, Any]]:
    index = _images_index(files)
    items: dict[str, dict[str, Any]] = {}
    if spec.caption_json:
        if spec.caption_json not in files:
            raise FileNotFoundError(f"{spec.name}: caption JSON "
                                    f"{archives.rel_join(spec.root, spec.caption_json)} "
                                    "not found")
        jsons = [spec.caption_json]
    else:
        jsons = [r for r in files if "/" not in r and r.lower().endswith(".json")]
    for rel in jsons:
        path = archives.rel_join(spec.root, rel)
        entries = _listing_json(spec, files, rel, max_json_bytes, karpathy_train_items, items)
        if entries is None:
            continue
        for en in entries:
            if "error" in en:
                sid = f"{posixpath.splitext(rel)[0]}#{en['index']}"
                items.setdefault(sid, _item(spec, sid, url=path,
                                            error=("annotation_malformed", en["error"])))
                continue
            fn = en["filename"]
            dirs = ([en["filepath"]] if en["filepath"] else []) + ["images", "imgs", ""]
            try:
                found, at = _resolve(spec, files, index, fn, dirs)
            except ArchiveError as e:
                items.setdefault(f"\x00{fn}", _item(spec, fn, url=path,
                                                    error=(e.reason, e.detail)))
                continue
            sid = source_id_of(at)
            _add_item(items, spec, sid, _item(
                spec, sid, image=found, image_bytes=files.get(found or ""),
                url=archives.rel_join(spec.root, at), captions=en["sentences"],
                extra={"json": rel, "imgid": en["imgid"], "split": en["split"]}))
    return [items[k] for k in sorted(items)]


def list_spec(spec: AnnotationSpec, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES
              ) -> list[dict[str, Any]]:
    """The work items of one dataset, sorted by source_id: one per image (an annotation
    without its image, a JSON that does not parse: an item carrying its ``error``). COCO and
    Karpathy JSONs are read here, once, and their objects / sentences travel in the items.
    A spec without a format is detected first (:func:`detected`)."""
    spec = detected(spec)
    if spec.format not in FORMATS:
        raise ValueError(f"{spec.name}: format {spec.format!r} is not one of {FORMATS}")
    files = archives.list_files(spec.root)
    if spec.format == "coco":
        items = _list_coco(spec, files, max_json_bytes)
    elif spec.format == "karpathy":
        items = _list_karpathy(spec, files, max_json_bytes)
    else:
        items = _list_per_file(spec, files)
    items.sort(key=lambda it: it["source_id"])
    return items


# --- reading one item ---------------------------------------------------------------------


def new_record(item: dict[str, Any], subset: str, source_id: str | None = None
               ) -> dict[str, Any]:
    """A record with every field the annotation sources set, empty where not read yet."""
    sid = source_id or item["source_id"]
    name = item["name"]
    return records.new_record(
        subset, name, sid, item.get("url"), license=None, caption=None, captions=None,
        caption_kind=None, labels=None, gsd_m=None, extra=None, _body=None, _objects=None,
        _dropped_objects=None, _mask=None, _image_size=None, _order=f"{name}\x1f{sid}")


def _check_inside(item: dict[str, Any], rel: str) -> str:
    try:
        return inside(item["root"], rel, "file")
    except BenchmarkFormatError as e:
        raise AnnotationError("path_outside_root", str(e)[:200]) from e


def _image_header_size(data: bytes, what: str) -> tuple[int, int]:
    try:
        with image_guard.open_image(data, max_pixels=1 << 62, max_decoded_bytes=None) as img:
            return img.size
    except image_guard.ImageRefused as e:
        raise AnnotationError("image_unreadable", f"{what}: {e.reason}: {e.detail}"[:240]) \
            from e


def _objects_of(item: dict[str, Any], size: tuple[int, int]
                ) -> tuple[list[RawObject], int, dict[str, Any]]:
    """(raw objects, unknown-class count, extra) of a detection item; ``extra`` holds the
    size the annotation states, if any, under ``annotation_size``."""
    fmt = item["format"]
    if fmt == "coco":
        return item.get("objects") or [], int(item.get("unknown") or 0), {}
    path = _check_inside(item, item["ann"])
    if (item.get("ann_bytes") or 0) > MAX_ANNOTATION_BYTES:
        raise AnnotationError("too_large", f"{item['ann']} has {item['ann_bytes']} bytes > "
                                           f"{MAX_ANNOTATION_BYTES}")
    data = _read_text(path)
    if fmt == "voc":
        info, objs = parse_voc(data)
        extra: dict[str, Any] = {"filename": info["filename"]}
        if info["width"] and info["height"]:
            extra["annotation_size"] = [info["width"], info["height"]]
        return objs, 0, extra
    text = _decode(data, item["ann"])
    if fmt == "dota":
        header, objs = parse_dota(text)
        return objs, 0, {k: header[k] for k in sorted(header)}
    objs, unknown = parse_yolo(text, item["names"] or [], size[0], size[1])
    return objs, unknown, {}


def _extra(fmt: str, *parts: dict[str, Any] | None) -> str:
    out: dict[str, Any] = {"format": fmt}
    for p in parts:
        out.update(p or {})
    return json.dumps(out, sort_keys=True, ensure_ascii=False, default=str)


def _read_image(item: dict[str, Any], max_bytes: int) -> bytes:
    path = _check_inside(item, item["image"])
    archives.check_size(path, item.get("image_bytes") or 0, max_bytes)
    return archives.read_capped(path, max_bytes)


def read_item(item: dict[str, Any], *, subset: str, max_bytes: int = DEFAULT_MAX_BYTES,
              tile: int | None = None, tile_overlap: float = 0.2,
              tile_max_pixels: int = DEFAULT_TILE_MAX_PIXELS,
              counters: dict[str, int] | None = None) -> list[archives.Outcome]:
    """One listed item → its records (one, or one per kept tile) or one (record, Reject).
    ``counters`` (optional) gains ``tiles_empty``/``tiles`` counts."""
    rec = new_record(item, subset)
    fmt = item["format"]
    if item.get("error"):
        reason, detail = item["error"]
        return [rejected(rec, reason, detail)]
    try:
        if not item.get("image"):
            where = item.get("ann") or "the annotation"
            raise AnnotationError("image_missing", f"{where} names an image that is not there")
        if fmt not in ("coco", "karpathy") and not item.get("ann"):
            raise AnnotationError("annotation_missing",
                                  f"{item['image']} has no annotation file")
        if fmt == "yolo" and not item.get("names"):
            raise AnnotationError("annotation_malformed", "no YOLO class names")
        raw: list[RawObject] = []
        unknown, extra = 0, {}
        if fmt in DETECTION_FORMATS and fmt != "yolo":
            raw, unknown, extra = _objects_of(item, (0, 0))  # before reading the image
        data = _read_image(item, max_bytes)
        w, h = _image_header_size(data, item["image"])
        if fmt == "yolo":
            raw, unknown, extra = _objects_of(item, (w, h))
        rec["_image_size"] = [w, h]
        base_extra: dict[str, Any] = dict(item.get("extra") or {})
        ann_size = extra.pop("annotation_size", None) or item.get("ann_size")
        if ann_size and list(ann_size) != [w, h]:
            base_extra["annotation_size"] = list(ann_size)
        if fmt == "karpathy":
            caps = item.get("captions") or []
            if not caps:
                raise AnnotationError("no_captions", "no train sentence")
            rec.update(caption=caps[0], captions=list(caps), caption_kind="human",
                       _body=data, extra=_extra(fmt, base_extra))
            return [rec]
        if fmt.startswith("mask_"):
            rec.update(_body=data, extra=_extra(fmt, base_extra), _mask={
                "path": _check_inside(item, item["ann"]),
                "style": "index" if fmt == "mask_index" else "rgb", "table": item["table"]})
            return [rec]
        if not raw and not unknown:
            raise AnnotationError("no_objects", "the annotation has no object")
        if not raw:
            raise AnnotationError("unknown_class", f"all {unknown} objects name a class the "
                                                   "dataset's list lacks")
        difficult = sum(1 for o in raw if len(o) > 5 and o[5])
        if difficult:
            base_extra["difficult"] = difficult
        base_extra.update(extra)
        kept, dropped = clip_objects(raw, w, h)
        if not kept:
            raise AnnotationError("no_objects", f"all {len(raw)} boxes are degenerate or "
                                                "outside the image")
        gsd = base_extra.get("gsd")
        rec["gsd_m"] = float(gsd) if isinstance(gsd, (int, float)) else None
        if tile and max(w, h) > tile:
            return _tiles(item, rec, data, kept, dropped + unknown, base_extra, tile,
                          tile_overlap, tile_max_pixels, counters)
        rec.update(_body=data, _objects=kept, _dropped_objects=dropped + unknown,
                   extra=_extra(fmt, base_extra))
        return [rec]
    except ArchiveError as e:
        return [rejected(rec, e.reason, e.detail)]


def _tiles(item: dict[str, Any], scene: dict[str, Any], data: bytes, kept: list[Box],
           scene_dropped: int, base_extra: dict[str, Any], size: int, overlap: float,
           max_pixels: int, counters: dict[str, int] | None) -> list[archives.Outcome]:
    """A large scene → one record per tile that keeps a box (see the module docstring)."""
    try:
        img = image_guard.open_rgb(data, max_pixels=max_pixels,
                                   max_decoded_bytes=max(max_pixels, 1) * 12)
    except image_guard.ImageRefused as e:
        reason = "too_large" if e.reason == "decompression_bomb" else "image_unreadable"
        raise AnnotationError(reason, f"{item['image']}: {e.detail}"[:240]) from e
    w, h = img.size
    out: list[archives.Outcome] = []
    empty = 0
    for win in tile_windows(w, h, size, overlap):
        objs, cut = tile_objects(kept, win)
        if not objs:
            empty += 1
            continue
        sid = f"{scene['source_id']}@{win[0]}_{win[1]}_{size}"
        rec = new_record(item, scene["subset"], sid)
        rec["gsd_m"] = scene["gsd_m"]
        crop = np.asarray(img.crop(win), dtype=np.uint8)
        ex = dict(base_extra, tile={"scene": scene["source_id"], "window": list(win),
                                    "scene_size": [w, h], "scene_dropped": scene_dropped})
        rec.update(_body=archives.encode_png(crop), _objects=objs, _dropped_objects=cut,
                   _image_size=[win[2] - win[0], win[3] - win[1]],
                   extra=_extra(item["format"], ex))
        out.append(rec)
    img.close()
    if counters is not None:
        counters["tiles_empty"] = counters.get("tiles_empty", 0) + empty
        counters["tiles"] = counters.get("tiles", 0) + len(out)
    if not out:
        raise AnnotationError("no_objects", f"none of the {empty} tiles keeps half a box")
    return out


# --- Beam ---------------------------------------------------------------------------------


class _List(beam.DoFn):
    def __init__(self, max_json_bytes: int) -> None:
        self.max_json_bytes = max_json_bytes

    def process(self, spec_fields: dict[str, Any]) -> Iterator[dict[str, Any]]:
        spec = detected(AnnotationSpec(**spec_fields))  # a bucket's layout: found here
        items = list_spec(spec, self.max_json_bytes)
        if not items:
            raise FileNotFoundError(f"{spec.name}: no {spec.format} entries under {spec.root}")
        yield from items


class _Read(beam.DoFn):
    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self._counters: dict[str, Any] = {}

    def _count(self, name: str, n: int = 1) -> None:
        c = self._counters.get(name)
        if c is None:
            c = self._counters[name] = beam.metrics.Metrics.counter("read_annotations", name)
        c.inc(n)

    def process(self, item: dict[str, Any]) -> Iterator[Any]:
        counts: dict[str, int] = {}
        try:
            outs = read_item(item, counters=counts, **self.kw)
        except Exception as e:  # noqa: BLE001 — a bug or an unforeseen file: count it, go on
            rec = new_record(item, self.kw["subset"])
            outs = [rejected(rec, "image_unreadable", f"{type(e).__name__}: {str(e)[:200]}")]
        for name, n in counts.items():
            self._count(name, n)
        for out in outs:
            self._count(out[1].reason if isinstance(out, tuple) else "ok")
            yield tagged(out)


class ReadAnnotations(beam.PTransform):
    """Annotation specs (:func:`parse_spec` strings) → ``{"records", "rejects"}`` (see the
    module docstring). Each dataset is listed by one worker (its COCO/Karpathy JSONs read
    there, once; a gs:// or s3:// root without a format detected there too), the items are
    spread, then read. The launcher lists nothing in a bucket: it checks that a local root
    is a folder and detects a local root's format (cheap), so a typo fails before the
    pipeline starts."""

    def __init__(self, specs: str | Iterable[str], subset: str = "remoteclip",
                 max_bytes: int = DEFAULT_MAX_BYTES, tile: int | None = None,
                 tile_overlap: float = 0.2, tile_max_pixels: int = DEFAULT_TILE_MAX_PIXELS,
                 max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> None:
        super().__init__()
        texts = [specs] if isinstance(specs, str) else list(specs)
        if not texts:
            raise ValueError("no annotation specs")
        if max_bytes <= 0 or max_json_bytes <= 0 or tile_max_pixels <= 0:
            raise ValueError("max_bytes, max_json_bytes and tile_max_pixels must be positive")
        if tile is not None and (tile <= 0 or not 0.0 <= tile_overlap < 1.0):
            raise ValueError("tile must be positive and 0 <= tile_overlap < 1")
        self.specs = sorted({parse_spec(t) for t in texts},
                            key=lambda s: (s.name, s.root, s.format or "", s.caption_json or ""))
        for s in self.specs:
            if "://" not in s.root:
                archives.check_roots([s.root])
        self.subset = subset
        self.max_json_bytes = max_json_bytes
        self.read_kw = {"subset": subset, "max_bytes": max_bytes, "tile": tile,
                        "tile_overlap": tile_overlap, "tile_max_pixels": tile_max_pixels}

    def expand(self, pbegin: Any) -> Any:
        out = (
            pbegin
            | "Specs" >> beam.Create([dataclasses.asdict(s) for s in self.specs])
            | "List" >> beam.ParDo(_List(self.max_json_bytes))
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_Read(**self.read_kw)).with_outputs(REJECTS, main=MAIN)
        )
        return {MAIN: out[MAIN], REJECTS: out[REJECTS]}


__all__ = [
    "AnnotationError", "AnnotationSpec", "CocoImage", "ReadAnnotations", "caption_set_json",
    "caption_set_path", "clip_objects",
    "detect_format", "detected", "karpathy_train_items", "list_spec", "parse_coco", "parse_dota",
    "parse_spec", "parse_voc", "parse_yolo", "parse_yolo_names", "read_item", "safe_xml",
    "source_id_of", "tile_objects", "tile_windows",
]
