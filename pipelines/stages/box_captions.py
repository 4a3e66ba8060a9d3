"""Box-to-Caption (RemoteCLIP's B2C): detection boxes → five rule-based captions.

RemoteCLIP turned detection and segmentation annotations into captions with rules it never
published beyond their outline (five captions an image: two positional, three counting; more
than 10 instances are a quantity word, not a number). This module is that outline written
down, with every rule stated so that a caption is always *true of its boxes*
(``tests/test_box_captions.py`` checks it over hundreds of random box sets).

Pure functions first (callable in a REPL), then the Beam stage :class:`BoxToCaption`
(stage ``"box2caption"``).

**The five captions** (:func:`box_to_captions`):

1. what is in the centre: every class with at least one box whose *centre* lies in the
   **central region**, with how many of its boxes do; when none does, a sentence saying the
   centre holds no object;
2. what is not: every class with at least one box whose centre lies outside the central
   region, with how many of its boxes do (a class can be in both sentences); when every box is
   central, a sentence saying there is nothing else;
3. – 5. counting: each names 1 to 3 (``max_counted_classes``) classes drawn at random from
   those present, with their counts in the whole image, in a phrasing drawn at random.

**Central region** (:func:`in_centre`): the middle cell of a 3x3 grid over the picture, the
same grid as the georeference stage's ``target_position``: a box with centre
``(cx, cy) = ((x0 + x1) / 2, (y0 + y1) / 2)`` in a ``W`` x ``H`` picture is central iff
``int(3 cx / W) == 1`` and ``int(3 cy / H) == 1``, i.e. ``W/3 <= cx < 2W/3`` and
``H/3 <= cy < 2H/3`` (half-open thirds; a centre on the right or bottom edge belongs to the last
third). The picture is the one the boxes describe: in ``border`` mode the picture inside the
padding (the padding is no part of the scene), after a centre crop the cropped picture.

**Counts**: exact up to ``max_exact`` (10): number words ("three cars"; "one car", singular) or,
with probability ``digit_share`` a sentence, digits ("3 cars"; never to open a sentence); above,
a quantity word ("many", "lots of", "a large number of", "numerous") with the plural. Lists
read "two cars, one ship and many storage tanks", classes ordered by count (most first), then
name.

**Randomness**: everything random (template, digits or words, the counted classes) is drawn
from the ``rng`` passed in; the stage passes ``np.random.default_rng(stable_hash(key))``, so a
record gets the same captions on every worker and rerun.

**Templates** are data (``recipes/data/remoteclip_templates.json``, or a file of the same
shape): families ``centre``, ``centre_none``, ``elsewhere``, ``elsewhere_none``, ``count``
(placeholders ``{objects}``, ``{be}``, ``{there_be}``), ``quantity_words``, ``number_words``
(0..10), ``digit_share``, ``max_exact``, ``counting_captions`` (3), ``max_counted_classes``.

**Class names** (``recipes/data/remoteclip_classes.json``): the raw class name is normalised
(lower case; ``-``, ``_`` and runs of spaces become one space: "Small_Vehicle",
"small-vehicle" → "small vehicle") and looked up for its caption phrase, singular and plural
("plane" → "airplane"/"airplanes", DOTA's meaning; DIOR's "golffield" → "golf course";
LoveDA's "water" → "body of water"/"bodies of water"). Every singular phrase maps to itself,
so normalising twice changes nothing. A name not in the file is used as normalised, with an
English plural by rule (counted as ``unlisted_class``). The same file holds the mask tables of
the Mask-to-Box stage (``pipelines/stages/mask_boxes.py``).

**Boxes in the written image** (:func:`written_boxes`): the Decode stage resized the picture
(``ImageConfig.resize_mode``); the ``boxes`` column holds each object in the *written*
picture's pixels (``width`` x ``height``), mapped from the original picture
(``original_width`` x ``original_height``) the annotations are in: ``no`` and ``keep_ratio``
scale each axis by written/original; ``border`` scales by the longer side and adds the centred
padding; ``center_crop`` scales by the shorter side and subtracts the crop offset, then clips
to the written picture and drops a box with nothing left inside it. The rounding is the
Decode stage's (``pipelines/stages/images.py``), so a box lands on its pixels (tested
against ``normalise_image``). Boxes are clipped to the original picture first and an object
with no positive extent is dropped. EXIF orientation is not applied to boxes: annotation
datasets ship upright pictures.

**The stage**: ``_objects`` ([label, x0, y0, x1, y1], original pixels) → caption (the first
of the five), captions (all five), caption_kind ``box2caption`` (``mask2box`` when
``_from_mask`` is true), labels (sorted unique normalised class names), boxes (BOX dicts,
label = the normalised singular name). A record without ``_objects`` that has a caption
already (a Karpathy retrieval set's human captions) passes unchanged. Reject (stage
``box2caption``): ``no_objects`` (no ``_objects`` and no caption, an empty list, or nothing
left after mapping into the written picture).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines.records import MAIN, REJECTS, Reject, stable_hash
from pipelines.stages.meta_captions import join_labels
from pipelines.stages.routing import CountingDoFn

STAGE = "box2caption"
DEFAULT_TEMPLATES = "remoteclip_templates.json"
DEFAULT_CLASSES = "remoteclip_classes.json"
#: ImageConfig.resize_mode values (pipelines/stages/images.py RESIZE_MODES)
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
PLACEHOLDERS = frozenset({"objects", "be", "there_be"})
LIST_FAMILIES = ("centre", "elsewhere", "count")
NONE_FAMILIES = ("centre_none", "elsewhere_none")


# --- data files ----------------------------------------------------------------------------


def _read_text(path: str | None, default: str) -> str:
    if path is None:
        return resources.files("pipelines.recipes").joinpath("data", default).read_text(
            encoding="utf-8")
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def _placeholders(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


@dataclasses.dataclass(frozen=True)
class CaptionTemplates:
    """The B2C sentence templates and counting words (see the module docstring)."""

    centre: tuple[str, ...]
    centre_none: tuple[str, ...]
    elsewhere: tuple[str, ...]
    elsewhere_none: tuple[str, ...]
    count: tuple[str, ...]
    quantity_words: tuple[str, ...]
    number_words: tuple[str, ...]
    digit_share: float = 0.25
    max_exact: int = 10
    counting_captions: int = 3
    max_counted_classes: int = 3


def parse_templates(doc: Mapping[str, Any]) -> CaptionTemplates:
    """:class:`CaptionTemplates` from the JSON document, checked: every family non-empty, list
    templates hold ``{objects}`` once and only known placeholders, "none" sentences none,
    number words for 0..max_exact."""
    families: dict[str, tuple[str, ...]] = {}
    for name in LIST_FAMILIES + NONE_FAMILIES:
        items = doc.get(name)
        if not items or not all(isinstance(t, str) and t.strip() for t in items):
            raise ValueError(f"template family {name!r} must be a non-empty list of sentences")
        for t in items:
            names = _placeholders(t)
            if name in NONE_FAMILIES and names:
                raise ValueError(f"{name}: {t!r} may hold no placeholder")
            if name in LIST_FAMILIES and (names.count("objects") != 1
                                          or set(names) - PLACEHOLDERS):
                raise ValueError(f"{name}: {t!r} must hold {{objects}} once and only "
                                 f"{sorted(PLACEHOLDERS)}")
        families[name] = tuple(items)
    max_exact = int(doc.get("max_exact", 10))
    numbers = tuple(str(w) for w in doc.get("number_words") or ())
    if max_exact < 1 or len(numbers) < max_exact + 1:
        raise ValueError(f"number_words must name 0..max_exact ({max_exact})")
    quantity = tuple(str(w) for w in doc.get("quantity_words") or () if str(w).strip())
    if not quantity:
        raise ValueError("quantity_words must not be empty")
    share = float(doc.get("digit_share", 0.25))
    if not 0.0 <= share <= 1.0:
        raise ValueError("digit_share must be in [0, 1]")
    counting, per = int(doc.get("counting_captions", 3)), int(doc.get("max_counted_classes", 3))
    if counting < 0 or per < 1:
        raise ValueError("counting_captions must be >= 0 and max_counted_classes >= 1")
    return CaptionTemplates(**families, quantity_words=quantity, number_words=numbers,
                            digit_share=share, max_exact=max_exact, counting_captions=counting,
                            max_counted_classes=per)


def load_templates(path: str | None = None) -> CaptionTemplates:
    """Templates from ``path`` (any Beam filesystem) or the bundled RemoteCLIP file."""
    if path is None:
        return _default_templates()
    return parse_templates(json.loads(_read_text(path, DEFAULT_TEMPLATES)))


@lru_cache(maxsize=1)
def _default_templates() -> CaptionTemplates:
    return parse_templates(json.loads(_read_text(None, DEFAULT_TEMPLATES)))


def class_key(label: Any) -> str:
    """The lookup key of a raw class name: lower case, ``-``/``_``/whitespace runs → one
    space ("Small_Vehicle", "small-vehicle" → "small vehicle")."""
    return re.sub(r"[\s_\-]+", " ", str(label)).strip().lower()


def plural_of(noun: str) -> str:
    """An English plural by rule, for a class name the file does not list."""
    if not noun:
        return noun
    last = noun.rsplit(" ", 1)[-1]
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


@dataclasses.dataclass(frozen=True)
class MaskTable:
    """A mask dataset's classes: ``classes`` id → raw name, ``colours`` ((r, g, b), id) for
    RGB-coded masks, ``nodata`` ids, ``used`` the raw names turned into boxes."""

    name: str
    classes: Mapping[int, str]
    colours: tuple[tuple[tuple[int, int, int], int], ...] = ()
    nodata: frozenset[int] = frozenset()
    used: tuple[str, ...] = ()

    def used_classes(self) -> dict[int, str]:
        """id → raw name of the classes RemoteCLIP boxed for this dataset."""
        used = set(self.used)
        return {i: n for i, n in self.classes.items() if n in used and i not in self.nodata}


@dataclasses.dataclass(frozen=True)
class ClassNames:
    """Caption phrases of raw class names, and the mask tables."""

    names: Mapping[str, tuple[str, str]]
    tables: Mapping[str, MaskTable] = dataclasses.field(default_factory=dict)

    def phrase(self, label: Any) -> tuple[str, str]:
        """(singular, plural) caption phrase of a raw class name."""
        key = class_key(label)
        found = self.names.get(key)
        return found if found is not None else (key, plural_of(key))

    def known(self, label: Any) -> bool:
        return class_key(label) in self.names

    def normalise(self, label: Any) -> str:
        """The normalised (singular) name of a raw class name."""
        return self.phrase(label)[0]


def parse_classes(doc: Mapping[str, Any]) -> ClassNames:
    """:class:`ClassNames` from the JSON document, checked: keys normalised, every singular
    phrase a key of itself (normalising is idempotent), table ids integers, colours RGB
    triples of known ids, used names among the table's classes."""
    names: dict[str, tuple[str, str]] = {}
    for key, value in (doc.get("names") or {}).items():
        if key != class_key(key):
            raise ValueError(f"class key {key!r} is not normalised (want {class_key(key)!r})")
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(value)):
            raise ValueError(f"class {key!r}: want [singular, plural], not {value!r}")
        names[key] = (str(value[0]), str(value[1]))
    for key, (singular, _) in names.items():
        back = names.get(class_key(singular))
        if back is None or back[0] != singular:
            raise ValueError(f"class {key!r}: singular {singular!r} must map to itself")
    tables: dict[str, MaskTable] = {}
    for tname, t in (doc.get("tables") or {}).items():
        classes = {int(i): str(n) for i, n in (t.get("classes") or {}).items()}
        colours = []
        for rgb, cid in t.get("colours") or ():
            rgb = tuple(int(c) for c in rgb)
            if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb) or int(cid) not in classes:
                raise ValueError(f"table {tname!r}: bad colour entry {rgb!r} -> {cid!r}")
            colours.append((rgb, int(cid)))
        if len({c for c, _ in colours}) != len(colours):
            raise ValueError(f"table {tname!r}: a colour appears twice")
        nodata = frozenset(int(i) for i in t.get("nodata") or ())
        used = tuple(str(n) for n in t.get("used") or ())
        unknown = set(used) - set(classes.values())
        if unknown:
            raise ValueError(f"table {tname!r}: used classes {sorted(unknown)} not in classes")
        tables[tname] = MaskTable(tname, classes, tuple(colours), nodata, used)
    return ClassNames(names, tables)


def load_classes(path: str | None = None) -> ClassNames:
    """Class names from ``path`` (any Beam filesystem) or the bundled RemoteCLIP file."""
    if path is None:
        return _default_classes()
    return parse_classes(json.loads(_read_text(path, DEFAULT_CLASSES)))


@lru_cache(maxsize=1)
def _default_classes() -> ClassNames:
    return parse_classes(json.loads(_read_text(None, DEFAULT_CLASSES)))


# --- boxes ---------------------------------------------------------------------------------


def _box(obj: Any) -> tuple[Any, float, float, float, float] | None:
    """(label, x0, y0, x1, y1) of a ``[label, x0, y0, x1, y1]`` list or a BOX dict; None when
    malformed or not finite."""
    try:
        if isinstance(obj, Mapping):
            label, coords = obj["label"], (obj["x0"], obj["y0"], obj["x1"], obj["y1"])
        else:
            label, coords = obj[0], obj[1:5]
        x0, y0, x1, y1 = (float(v) for v in coords)
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if label is None or not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    return label, x0, y0, x1, y1


def in_centre(box: Sequence[float], width: float, height: float) -> bool:
    """Whether the centre of ``box`` (x0, y0, x1, y1) lies in the central region: the middle
    cell of a 3x3 grid over a ``width`` x ``height`` picture (half-open thirds, as
    ``georef.grid_position``)."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    col = min(math.floor(3.0 * cx / width), 2)
    row = min(math.floor(3.0 * cy / height), 2)
    return col == 1 and row == 1


def _scaled(w: int, h: int, scale: float) -> tuple[int, int]:
    # as pipelines/stages/images.py _scaled: round half up, at least one pixel
    return max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))


def _geometry(original_size: Sequence[float], written_size: Sequence[float],
              resize_mode: str) -> tuple[float, float, float, float, float, float]:
    """(sx, sy, dx, dy, content_w, content_h): written = original * s + d; the picture's
    content occupies [dx', dx' + content_w) (border: inside the padding; else the whole
    written picture), where dx' = max(dx, 0)."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {resize_mode!r}")
    ow, oh = int(original_size[0]), int(original_size[1])
    ww, wh = int(written_size[0]), int(written_size[1])
    if ow <= 0 or oh <= 0 or ww <= 0 or wh <= 0:
        raise ValueError(f"sizes must be positive: original {original_size}, written "
                         f"{written_size}")
    if (ow, oh) == (ww, wh):  # not resized (or already the target): identity
        return 1.0, 1.0, 0.0, 0.0, float(ww), float(wh)
    if resize_mode == "border" and ww == wh:
        side = ww
        scale = side / max(ow, oh)
        iw, ih = (side, _scaled(ow, oh, scale)[1]) if ow >= oh else (_scaled(ow, oh, scale)[0],
                                                                      side)
        px, py = (side - iw) // 2, (side - ih) // 2
        return iw / ow, ih / oh, float(px), float(py), float(iw), float(ih)
    if resize_mode == "center_crop" and ww == wh:
        side = ww
        scale = side / min(ow, oh)
        iw, ih = (side, _scaled(ow, oh, scale)[1]) if ow <= oh else (_scaled(ow, oh, scale)[0],
                                                                      side)
        cx, cy = (iw - side) // 2, (ih - side) // 2
        return iw / ow, ih / oh, float(-cx), float(-cy), float(ww), float(wh)
    # no / keep_ratio (and a square output of a mode whose padding or crop was a no-op):
    # each axis scaled to the written size
    return ww / ow, wh / oh, 0.0, 0.0, float(ww), float(wh)


def content_frame(original_size: Sequence[float], written_size: Sequence[float],
                  resize_mode: str) -> tuple[float, float, float, float]:
    """(x, y, w, h) of the picture's content in the written picture: the area inside the
    padding in ``border`` mode, the whole written picture otherwise."""
    _, _, dx, dy, cw, ch = _geometry(original_size, written_size, resize_mode)
    return max(dx, 0.0), max(dy, 0.0), cw, ch


def written_boxes(objects: Sequence[Any], original_size: Sequence[float],
                  written_size: Sequence[float], resize_mode: str = "border"
                  ) -> list[dict[str, Any]]:
    """BOX dicts ``{"label", "x0", "y0", "x1", "y1"}`` of ``objects`` (``[label, x0, y0, x1,
    y1]`` in the original picture's pixels) in the written picture's pixels.

    Clipped to the original picture, mapped as the Decode stage resized it (see the module
    docstring), clipped to the written picture; an object with no positive width and height
    left (degenerate, outside, cropped away) is dropped. Malformed objects are dropped.
    """
    sx, sy, dx, dy, _, _ = _geometry(original_size, written_size, resize_mode)
    ow, oh = float(original_size[0]), float(original_size[1])
    ww, wh = float(written_size[0]), float(written_size[1])
    out = []
    for obj in objects:
        box = _box(obj)
        if box is None:
            continue
        label, x0, y0, x1, y1 = box
        x0, x1 = sorted((min(max(x0, 0.0), ow), min(max(x1, 0.0), ow)))
        y0, y1 = sorted((min(max(y0, 0.0), oh), min(max(y1, 0.0), oh)))
        if x1 <= x0 or y1 <= y0:
            continue
        bx0, bx1 = (min(max(x0 * sx + dx, 0.0), ww), min(max(x1 * sx + dx, 0.0), ww))
        by0, by1 = (min(max(y0 * sy + dy, 0.0), wh), min(max(y1 * sy + dy, 0.0), wh))
        if bx1 <= bx0 or by1 <= by0:
            continue
        out.append({"label": str(label), "x0": bx0, "y0": by0, "x1": bx1, "y1": by1})
    return out


# --- captions ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Count:
    singular: str
    plural: str
    n: int


def count_phrase(n: int, singular: str, plural: str, templates: CaptionTemplates,
                 rng: np.random.Generator, digits: bool | None = None) -> str:
    """"one car", "three cars" / "3 cars" (``digits``; None: drawn with probability
    ``digit_share``), and above ``max_exact`` a quantity word: "many cars"."""
    if n > templates.max_exact:
        word = templates.quantity_words[int(rng.integers(len(templates.quantity_words)))]
        return f"{word} {plural}"
    if digits is None:
        digits = bool(rng.random() < templates.digit_share)
    number = str(n) if digits else templates.number_words[n]
    return f"{number} {singular if n == 1 else plural}"


def _ordered(counts: Mapping[str, int], plural: Mapping[str, str]) -> list[_Count]:
    """Most first, then by name: the order lists are written in."""
    return [_Count(s, plural[s], n) for s, n in sorted(counts.items(), key=lambda kv: (-kv[1],
                                                                                      kv[0]))]


def _fill(template: str, items: Sequence[_Count], templates: CaptionTemplates,
          rng: np.random.Generator) -> str:
    digits = bool(rng.random() < templates.digit_share)  # one style a sentence
    digits = digits and not template.startswith("{objects}")  # no sentence opens with digits
    objects = join_labels([count_phrase(c.n, c.singular, c.plural, templates, rng, digits)
                           for c in items])
    be = "is" if len(items) == 1 and items[0].n == 1 else "are"
    there_be = "is" if items[0].n == 1 else "are"
    text = template.format(objects=objects, be=be, there_be=there_be)
    return text[:1].upper() + text[1:]


def _pick(family: Sequence[str], rng: np.random.Generator) -> str:
    return family[int(rng.integers(len(family)))]


def box_to_captions(boxes: Sequence[Any], image_size: Sequence[float],
                    rng: np.random.Generator, templates: CaptionTemplates | None = None,
                    classes: ClassNames | None = None) -> list[str]:
    """The B2C captions of ``boxes`` (``[label, x0, y0, x1, y1]`` or BOX dicts, pixels of a
    ``(width, height)`` picture): the centre sentence, the elsewhere sentence, then
    ``counting_captions`` (3) counting sentences; [] when no box is usable.

    See the module docstring for the rules; every random choice is drawn from ``rng``.
    """
    templates = templates or load_templates()
    classes = classes or load_classes()
    width, height = float(image_size[0]), float(image_size[1])
    if not (width > 0 and height > 0):
        raise ValueError(f"image_size must be positive, not {image_size!r}")
    total: Counter[str] = Counter()
    centre: Counter[str] = Counter()
    elsewhere: Counter[str] = Counter()
    plural: dict[str, str] = {}
    for obj in boxes:
        box = _box(obj)
        if box is None or box[3] <= box[1] or box[4] <= box[2]:
            continue
        singular, plural_form = classes.phrase(box[0])
        plural[singular] = plural_form
        total[singular] += 1
        (centre if in_centre(box[1:], width, height) else elsewhere)[singular] += 1
    if not total:
        return []
    captions = []
    if centre:
        captions.append(_fill(_pick(templates.centre, rng), _ordered(centre, plural), templates,
                              rng))
    else:
        captions.append(_pick(templates.centre_none, rng))
    if elsewhere:
        captions.append(_fill(_pick(templates.elsewhere, rng), _ordered(elsewhere, plural),
                              templates, rng))
    else:
        captions.append(_pick(templates.elsewhere_none, rng))
    names = sorted(total)
    order = rng.permutation(len(templates.count))
    for i in range(templates.counting_captions):
        k = int(rng.integers(1, min(templates.max_counted_classes, len(names)) + 1))
        chosen = [names[j] for j in rng.choice(len(names), size=k, replace=False)]
        items = [_Count(s, plural[s], total[s]) for s in chosen]
        template = templates.count[int(order[i % len(order)])]
        captions.append(_fill(template, items, templates, rng))
    return captions


# --- the stage -----------------------------------------------------------------------------


def _size(record: Mapping[str, Any], w_key: str, h_key: str) -> tuple[int, int] | None:
    try:
        w, h = int(record[w_key]), int(record[h_key])
    except (KeyError, TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def _original_size(record: Mapping[str, Any]) -> tuple[int, int] | None:
    """The decoded picture's size (the pixels the objects are in), else ``_image_size``."""
    size = _size(record, "original_width", "original_height")
    if size is None:
        try:
            w, h = (int(v) for v in record["_image_size"][:2])
            size = (w, h) if w > 0 and h > 0 else None
        except (KeyError, TypeError, ValueError):
            size = None
    return size


def box_caption(record: dict[str, Any], templates: CaptionTemplates, classes: ClassNames,
                resize_mode: str = "border") -> dict[str, Any] | Reject:
    """``record`` with caption, captions, caption_kind, labels and boxes set from its
    ``_objects``, or a Reject (``no_objects``); a record without ``_objects`` that has a
    caption passes unchanged. ``resize_mode``: the Decode stage's ``ImageConfig.resize_mode``.
    """
    objects = record.get("_objects")
    if objects is None:
        if record.get("caption"):
            return record
        return Reject(STAGE, "no_objects", "no _objects and no caption")
    if not objects:
        return Reject(STAGE, "no_objects", "empty _objects")
    original = _original_size(record)
    if original is None:
        return Reject(STAGE, "no_objects", "no image size to place the objects in")
    written = _size(record, "width", "height") or original
    normalised = []
    for obj in objects:
        box = _box(obj)
        if box is not None:
            normalised.append([classes.normalise(box[0]), *box[1:]])
    boxes = written_boxes(normalised, original, written, resize_mode)
    if not boxes:
        return Reject(STAGE, "no_objects",
                      f"none of {len(objects)} objects is left in the written picture")
    fx, fy, fw, fh = content_frame(original, written, resize_mode)
    in_frame = [[b["label"], b["x0"] - fx, b["y0"] - fy, b["x1"] - fx, b["y1"] - fy]
                for b in boxes]
    rng = np.random.default_rng(stable_hash(str(record.get("key", ""))))
    captions = box_to_captions(in_frame, (fw, fh), rng, templates, classes)
    out = dict(record)
    out.update(
        caption=captions[0],
        captions=captions,
        caption_kind="mask2box" if record.get("_from_mask") else "box2caption",
        labels=sorted({b["label"] for b in boxes}),
        boxes=boxes,
    )
    return out


class BoxToCaptionDoFn(CountingDoFn):
    """Record with ``_objects`` → captioned record, or its reject row."""

    stage = STAGE

    def __init__(self, templates: CaptionTemplates, classes: ClassNames,
                 resize_mode: str = "border") -> None:
        super().__init__()
        self.templates = templates
        self.classes = classes
        self.resize_mode = resize_mode

    def process(self, record: dict[str, Any]) -> Iterator[Any]:
        result = box_caption(record, self.templates, self.classes, self.resize_mode)
        if result is record:
            self.count("passed_with_caption")
        elif not isinstance(result, Reject):
            self.count(result["caption_kind"])
            boxes = (_box(o) for o in record["_objects"])
            if any(b is not None and not self.classes.known(b[0]) for b in boxes):
                self.count("unlisted_class")
        yield from self.emit(record, result)


class BoxToCaption(beam.PTransform):
    """Records → ``{"records": captioned records, "rejects": reject rows}``.

    ``templates``/``classes``: JSON files (any Beam filesystem), else the bundled RemoteCLIP
    files; read and checked here, at pipeline construction, so a broken file fails before any
    work. ``resize_mode``: the Decode stage's ``ImageConfig.resize_mode`` (``boxes`` are mapped
    into the written picture with it).
    """

    def __init__(self, templates: str | None = None, classes: str | None = None,
                 resize_mode: str = "border") -> None:
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {resize_mode!r}")
        self.templates = load_templates(templates)
        self.classes = load_classes(classes)
        self.resize_mode = resize_mode

    def expand(self, records: beam.PCollection) -> Any:
        return records | "BoxToCaption" >> beam.ParDo(
            BoxToCaptionDoFn(self.templates, self.classes, self.resize_mode)
        ).with_outputs(REJECTS, main=MAIN)
