"""Box-to-Caption (RemoteCLIP B2C): captions true of their boxes, boxes in the written image."""

from __future__ import annotations

import io
import re
from collections import Counter
from fractions import Fraction

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines.records import REJECTS, Reject
from pipelines.stages.box_captions import (
    RESIZE_MODES,
    BoxToCaption,
    box_caption,
    box_to_captions,
    class_key,
    content_frame,
    in_centre,
    load_classes,
    load_templates,
    parse_templates,
    plural_of,
    written_boxes,
)
from pipelines.stages.images import RESIZE_MODES as DECODE_RESIZE_MODES
from pipelines.stages.images import ImageConfig, normalise_image

TEMPLATES = load_templates()
CLASSES = load_classes()
RAW_POOL = [
    # demo world, DOTA (hyphenated), iSAID (capitalised, underscored), DIOR, LoveDA, ISPRS,
    # and one name the class file does not list
    "airplane", "boat", "building", "car", "storage_tank", "tree", "baseball_diamond",
    "bridge", "umbrella", "small-vehicle", "large-vehicle", "plane", "ship", "harbor",
    "Small_Vehicle", "Ground_Track_Field", "golffield", "Expressway-toll-station", "water",
    "low vegetation", "barren", "hot-air balloon",
]
QUANTITY = TEMPLATES.quantity_words
NUMBER = {w: i for i, w in enumerate(TEMPLATES.number_words)}


# --- a parser for what the captions claim -------------------------------------------------


def _claims(caption: str, phrases: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """{singular: (count token, noun as written)} for every "<count> <class phrase>" in
    ``caption``; a class named twice fails."""
    nouns = sorted({p for pair in phrases.values() for p in pair}, key=len, reverse=True)
    counts = sorted([*NUMBER, *QUANTITY], key=len, reverse=True)
    pattern = re.compile(r"(?<![\w-])(?P<count>\d+|" + "|".join(map(re.escape, counts))
                         + r") (?P<noun>" + "|".join(map(re.escape, nouns)) + r")(?![\w-])",
                         re.IGNORECASE)
    back = {form: singular for singular, pair in phrases.items() for form in pair}
    out: dict[str, tuple[str, str]] = {}
    for m in pattern.finditer(caption):
        singular = back[m.group("noun")]
        assert singular not in out, f"{singular!r} named twice in {caption!r}"
        out[singular] = (m.group("count").lower(), m.group("noun"))
    return out


def _check_claim(claim: tuple[str, str], n: int, singular: str, plural: str, caption: str):
    token, noun = claim
    if n > TEMPLATES.max_exact:
        assert token in QUANTITY, f"{n} {plural} written as {token!r}: {caption!r}"
        assert noun == plural
    else:
        value = int(token) if token.isdigit() else NUMBER.get(token)
        assert value == n, f"{n} {plural} written as {token!r}: {caption!r}"
        assert noun == (singular if n == 1 else plural), caption


def _expected_central(box, w, h) -> bool:
    """The written-down rule, in exact arithmetic: W/3 <= cx < 2W/3 and H/3 <= cy < 2H/3
    (a centre on the far edge belongs to the last third)."""
    cx = (Fraction(box[1]) + Fraction(box[3])) / 2
    cy = (Fraction(box[2]) + Fraction(box[4])) / 2
    return 3 * cx >= w and 3 * cx < 2 * w and 3 * cy >= h and 3 * cy < 2 * h


def _random_boxes(rng: np.random.Generator) -> tuple[list, tuple[int, int]]:
    w, h = int(rng.integers(17, 700)) * 3, int(rng.integers(17, 700)) * 3
    raw = rng.choice(RAW_POOL, size=int(rng.integers(1, 7)), replace=False)
    boxes = []
    for name in raw:
        n = int(rng.choice([1, 1, 2, 3, 5, 9, 10, 11, 12, 25]))
        for _ in range(n):
            if rng.random() < 0.25:  # integer boxes, centres exactly on the grid lines
                bw, bh = 2 * int(rng.integers(1, w // 8)), 2 * int(rng.integers(1, h // 8))
                cx = int(rng.choice([w // 3, 2 * w // 3, int(rng.integers(0, w))]))
                cy = int(rng.choice([h // 3, 2 * h // 3, int(rng.integers(0, h))]))
            else:
                bw, bh = rng.uniform(1, w / 4), rng.uniform(1, h / 4)
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            boxes.append([str(name), cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
    return boxes, (w, h)


def _check_captions(boxes, size, captions) -> None:
    w, h = size
    phrases = {CLASSES.phrase(b[0])[0]: CLASSES.phrase(b[0]) for b in boxes}
    total, centre, elsewhere = Counter(), Counter(), Counter()
    for b in boxes:
        s = CLASSES.phrase(b[0])[0]
        total[s] += 1
        (centre if _expected_central(b, w, h) else elsewhere)[s] += 1
    assert len(captions) == 2 + TEMPLATES.counting_captions
    for caption in captions:
        assert caption[0].isupper() and caption.endswith("."), caption
        assert "{" not in caption and "}" not in caption and "  " not in caption, caption
    for caption, expected, none in ((captions[0], centre, TEMPLATES.centre_none),
                                    (captions[1], elsewhere, TEMPLATES.elsewhere_none)):
        claims = _claims(caption, phrases)
        assert set(claims) == set(expected), f"{caption!r}: want {dict(expected)}"
        if not expected:
            assert caption in none
        for s, n in expected.items():
            _check_claim(claims[s], n, s, phrases[s][1], caption)
    for caption in captions[2:]:
        claims = _claims(caption, phrases)
        assert 1 <= len(claims) <= TEMPLATES.max_counted_classes, caption
        for s, claim in claims.items():
            _check_claim(claim, total[s], s, phrases[s][1], caption)


# --- the caption rules ---------------------------------------------------------------------


def test_every_caption_is_true_of_its_boxes():
    rng = np.random.default_rng(20240611)
    seen = Counter()
    for _ in range(400):
        boxes, size = _random_boxes(rng)
        captions = box_to_captions(boxes, size, np.random.default_rng(int(rng.integers(2**32))))
        _check_captions(boxes, size, captions)
        seen["centre_none"] += captions[0] in TEMPLATES.centre_none
        seen["elsewhere_none"] += captions[1] in TEMPLATES.elsewhere_none
        seen["quantity"] += any(q in c for c in captions for q in QUANTITY)
        seen["digits"] += any(re.search(r"\d", c) for c in captions)
    # the random sets exercise every branch of the rules
    assert all(seen[k] > 0 for k in ("centre_none", "elsewhere_none", "quantity", "digits")), seen


def test_central_region_rule_on_the_grid_lines():
    w = h = 300
    assert in_centre((90, 90, 110, 110), w, h)  # centre (100, 100): on the first line, in
    assert not in_centre((190, 140, 210, 160), w, h)  # cx = 200 = 2W/3: the right third
    assert in_centre((189.8, 140, 210, 160), w, h)  # cx = 199.9
    assert not in_centre((140, 290, 160, 310), w, h)  # cy = 300, on the bottom edge
    assert not in_centre((0, 0, 10, 10), w, h)
    caps = box_to_captions([["car", 140, 140, 160, 160]], (w, h), np.random.default_rng(0))
    assert caps[1] in TEMPLATES.elsewhere_none and "car" in caps[0]


def test_quantity_words_above_ten_and_exact_counts_up_to_ten():
    rng = np.random.default_rng(5)
    for n in (10, 11, 40):
        for seed in range(20):
            boxes = [["car", 10 + i, 10, 12 + i, 12] for i in range(n)]
            captions = box_to_captions(boxes, (300, 300), np.random.default_rng(seed))
            for c in captions[2:]:
                if n > 10:
                    assert any(f"{q} cars" in c.lower() for q in QUANTITY), c
                    assert not re.search(r"\d", c), c
                else:
                    assert re.search(r"\b(ten|10) cars\b", c, re.IGNORECASE), c
    del rng


def test_one_is_singular_with_its_verb():
    captions = box_to_captions([["small-vehicle", 0, 0, 5, 5]], (90, 90),
                               np.random.default_rng(3), TEMPLATES, CLASSES)
    assert captions[0] in TEMPLATES.centre_none
    assert re.search(r"\b(one|1) small vehicle\b", captions[1], re.IGNORECASE)
    assert "small vehicles" not in captions[1] and " are " not in captions[1], captions[1]


def test_no_boxes_no_captions():
    assert box_to_captions([], (100, 100), np.random.default_rng(0)) == []
    assert box_to_captions([["car", 5, 5, 5, 9]], (100, 100), np.random.default_rng(0)) == []


# --- class names and templates -------------------------------------------------------------


def test_class_names_normalise_idempotently():
    assert class_key("Small_Vehicle") == class_key("small-vehicle") == "small vehicle"
    assert CLASSES.phrase("small-vehicle") == ("small vehicle", "small vehicles")
    assert CLASSES.phrase("storage-tank") == ("storage tank", "storage tanks")
    assert CLASSES.phrase("plane") == ("airplane", "airplanes")
    assert CLASSES.phrase("store_tank") == ("storage tank", "storage tanks")
    assert CLASSES.phrase("golffield")[0] == "golf course"
    assert CLASSES.phrase("water") == ("body of water", "bodies of water")
    for demo in ("airplane", "boat", "building", "car", "storage_tank", "tree",
                 "baseball_diamond", "bridge", "umbrella"):
        assert CLASSES.known(demo), demo
    for singular, _ in CLASSES.names.values():
        assert CLASSES.normalise(singular) == singular
    assert not CLASSES.known("hot-air balloon")
    assert CLASSES.phrase("hot-air balloon") == ("hot air balloon", "hot air balloons")
    assert plural_of("bus") == "buses" and plural_of("ferry") == "ferries"
    assert plural_of("day") == "days"


def test_class_file_holds_every_dataset_class():
    dota = ["plane", "ship", "storage-tank", "baseball-diamond", "tennis-court",
            "basketball-court", "ground-track-field", "harbor", "bridge", "large-vehicle",
            "small-vehicle", "helicopter", "roundabout", "soccer-ball-field", "swimming-pool",
            "container-crane", "airport", "helipad"]
    dior = ["airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney",
            "dam", "Expressway-Service-area", "Expressway-toll-station", "golffield",
            "groundtrackfield", "harbor", "overpass", "ship", "stadium", "storagetank",
            "tenniscourt", "trainstation", "vehicle", "windmill"]
    hrrsd = ["airplane", "baseball_diamond", "basketball_court", "bridge", "crossroad",
             "ground_track_field", "harbor", "parking_lot", "ship", "storage_tank",
             "T_junction", "tennis_court", "vehicle"]
    isaid = ["ship", "store_tank", "baseball_diamond", "tennis_court", "basketball_court",
             "Ground_Track_Field", "Bridge", "Large_Vehicle", "Small_Vehicle", "Helicopter",
             "Swimming_pool", "Roundabout", "Soccer_ball_field", "plane", "Harbor"]
    masks = [n for t in CLASSES.tables.values() for n in t.classes.values() if n != "no-data"
             and n != "boundary"]
    missing = [n for n in dota + dior + hrrsd + isaid + masks if not CLASSES.known(n)]
    assert missing == []
    assert CLASSES.phrase("T_junction") == ("T-junction", "T-junctions")


def test_templates_are_checked():
    with pytest.raises(ValueError, match="objects"):
        parse_templates({**_template_doc(), "count": ["There are cars."]})
    with pytest.raises(ValueError, match="no placeholder"):
        parse_templates({**_template_doc(), "centre_none": ["Nothing near {objects}."]})
    with pytest.raises(ValueError, match="number_words"):
        parse_templates({**_template_doc(), "number_words": ["zero", "one"]})
    # template text holds no count word of its own (a caption's counts are its lists')
    for family in ("centre", "centre_none", "elsewhere", "elsewhere_none", "count"):
        for t in getattr(TEMPLATES, family):
            assert _claims(t.replace("{objects}", ""), {"x": ("object", "objects")}) == {}
            assert not re.search(r"\b(" + "|".join([*NUMBER, *QUANTITY]) + r")\b", t.lower()), t


def _template_doc() -> dict:
    return {
        "centre": ["{objects} {be} central."], "centre_none": ["Nothing central."],
        "elsewhere": ["{objects} {be} elsewhere."], "elsewhere_none": ["Nothing else."],
        "count": ["There {there_be} {objects}."], "quantity_words": ["many"],
        "number_words": ["zero", "one", "two", "three", "four", "five", "six", "seven",
                         "eight", "nine", "ten"],
    }


# --- boxes in the written image ------------------------------------------------------------


def _picture(size, rects) -> bytes:
    arr = np.full((size[1], size[0], 3), 128, np.uint8)
    for (x0, y0, x1, y1), colour in rects:
        arr[y0:y1, x0:x1] = COLOURS[colour]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
RECTS = [((0, 0, 40, 30), "red"), ((360, 170, 400, 200), "blue"), ((180, 80, 220, 120), "green")]


def test_resize_modes_are_the_decode_stages():
    assert set(RESIZE_MODES) == set(DECODE_RESIZE_MODES)


@pytest.mark.parametrize("mode", ["border", "keep_ratio", "center_crop", "no"])
def test_written_boxes_land_on_their_pixels(mode):
    """Each mode on a 400x200 picture, decoded by the real Decode stage: every mapped box
    covers its rectangle's colour, and the picture just outside it is background."""
    cfg = ImageConfig(image_size=128, resize_mode=mode, encode_format="png", min_image_size=1,
                      crop_hashes=False)
    out = normalise_image(_picture((400, 200), RECTS), cfg)
    assert not isinstance(out, Reject)
    arr = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB")).astype(int)
    objects = [[c, *r] for r, c in RECTS]
    boxes = written_boxes(objects, (400, 200), (out.width, out.height), mode)
    for b in boxes:
        colour = np.array(COLOURS[b["label"]])
        x0, y0, x1, y1 = (round(b[k]) for k in ("x0", "y0", "x1", "y1"))
        inner = arr[y0 + 2:y1 - 2, x0 + 2:x1 - 2]
        assert inner.size and np.abs(inner - colour).max() < 40, (mode, b)
        if x1 + 2 < out.width:
            assert np.abs(arr[(y0 + y1) // 2, x1 + 2] - colour).max() > 80, (mode, b)
        if y1 + 2 < out.height:
            assert np.abs(arr[y1 + 2, (x0 + x1) // 2] - colour).max() > 80, (mode, b)
    got = {b["label"]: [round(b[k], 3) for k in ("x0", "y0", "x1", "y1")] for b in boxes}
    red, blue, green = "red", "blue", "green"
    if mode == "border":  # 128 x 64 content, padded 32 rows above and below
        assert (out.width, out.height) == (128, 128)
        assert got[red] == [0.0, 32.0, 12.8, 41.6]
        assert got[blue] == [115.2, 86.4, 128.0, 96.0]
        assert content_frame((400, 200), (128, 128), mode) == (0.0, 32.0, 128.0, 64.0)
    elif mode == "keep_ratio":  # 256 x 128, no padding
        assert got[red] == [0.0, 0.0, 25.6, 19.2]
        assert got[blue] == [230.4, 108.8, 256.0, 128.0]
    elif mode == "center_crop":  # 256 x 128, cropped 64 columns a side: corners gone
        assert set(got) == {green}
        assert got[green] == [51.2, 51.2, 76.8, 76.8]
    else:
        assert got[red] == [0.0, 0.0, 40.0, 30.0] and got[blue] == [360.0, 170.0, 400.0, 200.0]


def test_written_boxes_clip_and_drop():
    boxes = written_boxes([["car", -10, -10, 20, 20], ["car", 500, 0, 600, 10],
                           ["car", 5, 5, 5, 9], ["car", "x", 0, 1, 1], ["car", 10, 10, 30, 40]],
                          (400, 200), (400, 200), "no")
    assert [[b["x0"], b["y0"], b["x1"], b["y1"]] for b in boxes] == [[0, 0, 20, 20],
                                                                     [10, 10, 30, 40]]
    # a box straddling the centre crop keeps its visible part
    part = written_boxes([["car", 50, 50, 150, 100]], (400, 200), (128, 128), "center_crop")
    assert [round(part[0][k], 3) for k in ("x0", "y0", "x1", "y1")] == [0.0, 32.0, 32.0, 64.0]
    with pytest.raises(ValueError):
        written_boxes([["car", 0, 0, 1, 1]], (400, 200), (128, 128), "stretch")


# --- the stage -----------------------------------------------------------------------------


def _record(key="k1", objects=None, **extra) -> dict:
    base = {"key": key, "subset": "remoteclip", "source": "dota", "source_id": key,
            "url": f"/data/{key}.png", "caption": None, "original_width": 400,
            "original_height": 200, "width": 128, "height": 128, "_image_size": [400, 200],
            "_objects": objects if objects is not None else
            [["small-vehicle", 190, 90, 210, 110], ["small-vehicle", 0, 0, 10, 10],
             ["plane", 300, 20, 380, 90]]}
    base.update(extra)
    return base


def test_box_caption_sets_the_columns():
    out = box_caption(_record(), TEMPLATES, CLASSES)
    assert out["caption"] == out["captions"][0] and len(out["captions"]) == 5
    assert out["caption_kind"] == "box2caption"
    assert out["labels"] == ["airplane", "small vehicle"]
    assert out["boxes"][0] == {"label": "small vehicle", "x0": pytest.approx(60.8),
                               "y0": pytest.approx(60.8), "x1": pytest.approx(67.2),
                               "y1": pytest.approx(67.2)}
    assert re.search(r"\b(one|1) small vehicle\b", out["caption"], re.IGNORECASE)
    assert "airplane" not in out["caption"]
    assert box_caption(_record(_from_mask=True), TEMPLATES, CLASSES)["caption_kind"] == \
        "mask2box"


def test_same_key_same_captions_other_keys_differ():
    a = box_caption(_record("same"), TEMPLATES, CLASSES)["captions"]
    assert box_caption(_record("same"), TEMPLATES, CLASSES)["captions"] == a
    others = {tuple(box_caption(_record(f"k{i}"), TEMPLATES, CLASSES)["captions"])
              for i in range(20)}
    assert len(others) > 5


def test_centre_is_the_pictures_not_the_paddings():
    """A 4:1 picture padded to a square: an object in the picture's top third lies in the
    square's middle third, and is still not in the centre."""
    rec = _record(objects=[["car", 190, 10, 210, 30]], original_width=400, original_height=100,
                  _image_size=[400, 100])
    out = box_caption(rec, TEMPLATES, CLASSES)
    assert in_centre([out["boxes"][0][k] for k in ("x0", "y0", "x1", "y1")], 128, 128)
    assert out["caption"] in TEMPLATES.centre_none


def test_box_caption_passes_and_rejects():
    human = {"key": "h", "caption": "many planes parked.", "captions": ["many planes parked."],
             "caption_kind": "human"}
    assert box_caption(human, TEMPLATES, CLASSES) is human
    assert box_caption({"key": "n", "caption": None}, TEMPLATES, CLASSES).reason == "no_objects"
    assert box_caption(_record(objects=[]), TEMPLATES, CLASSES).reason == "no_objects"
    gone = box_caption(_record(objects=[["car", 0, 0, 10, 10]]), TEMPLATES, CLASSES,
                       resize_mode="center_crop")
    assert isinstance(gone, Reject) and gone.stage == "box2caption"
    assert gone.reason == "no_objects"


def test_beam_stage_routes_rejects():
    human = {"key": "h", "subset": "remoteclip", "source": "rsicd", "source_id": "h",
             "url": None, "caption": "a port.", "captions": ["a port."], "caption_kind": "human"}
    records = [_record("a"), human, _record("b", objects=[])]
    with TestPipeline() as p:
        out = p | beam.Create(records) | BoxToCaption()
        assert_that(out.records | "Kinds" >> beam.Map(lambda r: (r["key"], r["caption_kind"])),
                    equal_to([("a", "box2caption"), ("h", "human")]), label="records")
        assert_that(out[REJECTS] | "Reasons" >> beam.Map(lambda r: (r["key"], r["stage"],
                                                                     r["reason"])),
                    equal_to([("b", "box2caption", "no_objects")]), label="rejects")
    with pytest.raises(ValueError):
        BoxToCaption(resize_mode="stretch")
