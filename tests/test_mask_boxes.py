"""Mask-to-Box (RemoteCLIP M2B): masks → horizontal boxes by border following."""

from __future__ import annotations

import io

import apache_beam as beam
import cv2
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines.records import REJECTS, Reject
from pipelines.stages.box_captions import BoxToCaption, box_caption, load_classes, load_templates
from pipelines.stages.mask_boxes import (
    UNKNOWN,
    MaskToBox,
    MaskUnreadable,
    mask_box,
    mask_to_boxes,
    read_mask,
    rgb_to_index,
)

CLASSES = load_classes()
POTSDAM = CLASSES.tables["potsdam"]
LOVEDA = CLASSES.tables["loveda"]
ISPRS_RGB = {"boundary": (0, 0, 0), "impervious surfaces": (255, 255, 255),
             "building": (0, 0, 255), "low vegetation": (0, 255, 255), "tree": (0, 255, 0),
             "car": (255, 255, 0), "clutter": (255, 0, 0)}


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG") if mode else Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


# --- shapes → boxes ------------------------------------------------------------------------


def _canvas_with_shapes(rng: np.random.Generator):
    """A 400x300 index canvas with separated solid shapes of classes 1..3: each shape's own
    pixel extent (edges) beside it."""
    canvas = np.zeros((300, 400), np.uint8)
    shapes = []
    cells = [(x, y) for x in range(0, 400, 100) for y in range(0, 300, 100)]
    for i, (cx0, cy0) in enumerate(cells):
        cid = 1 + i % 3
        layer = np.zeros_like(canvas)
        kind = ("rect", "circle", "rotated")[int(rng.integers(3))]
        cx, cy = cx0 + 50 + int(rng.integers(-8, 9)), cy0 + 50 + int(rng.integers(-8, 9))
        if kind == "rect":
            w, h = int(rng.integers(10, 60)), int(rng.integers(10, 60))
            cv2.rectangle(layer, (cx - w // 2, cy - h // 2), (cx + w // 2, cy + h // 2), 1, -1)
        elif kind == "circle":
            cv2.circle(layer, (cx, cy), int(rng.integers(6, 35)), 1, -1)
        else:
            rect = ((cx, cy), (float(rng.integers(15, 60)), float(rng.integers(8, 30))),
                    float(rng.uniform(0, 180)))
            cv2.fillPoly(layer, [cv2.boxPoints(rect).round().astype(np.int32)], 1)
        ys, xs = np.nonzero(layer)
        shapes.append((cid, kind, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)))
        canvas[layer > 0] = cid
    return canvas, shapes


def test_shapes_give_their_own_extent():
    classes = {1: "building", 2: "car", 3: "tree"}
    rng = np.random.default_rng(7)
    kinds = set()
    for _ in range(10):
        canvas, shapes = _canvas_with_shapes(rng)
        boxes = mask_to_boxes(canvas, classes)
        assert len(boxes) == len(shapes)
        for cid, kind, extent in shapes:
            kinds.add(kind)
            best = max(_iou(b[1:], extent) for b in boxes if b[0] == classes[cid])
            assert best >= 0.9, (kind, extent)
            # border following gives exactly the pixel extent, in pixel edges
            assert [classes[cid], *map(float, extent)] in boxes
    assert kinds == {"rect", "circle", "rotated"}


def test_box_is_in_pixel_edges():
    mask = np.zeros((20, 30), np.uint8)
    mask[5:9, 3:8] = 4  # rows 5..8, columns 3..7
    assert mask_to_boxes(mask, {4: "water"}) == [["water", 3.0, 5.0, 8.0, 9.0]]
    mask[:, :] = 4  # the whole picture
    assert mask_to_boxes(mask, {4: "water"}) == [["water", 0.0, 0.0, 30.0, 20.0]]


def test_touching_objects_of_one_class_are_one_box():
    """Documented: a semantic mask has no instances, two buildings wall to wall are one
    region (diagonal contact too: components are 8-connected)."""
    mask = np.zeros((50, 80), np.uint8)
    mask[10:20, 10:30] = 2
    mask[10:20, 30:50] = 2  # shares the edge x = 30
    mask[30:35, 60:65] = 2
    mask[35:40, 65:70] = 2  # touches the one above only at a corner
    mask[10:20, 50:55] = 3  # another class touching: its own box
    boxes = mask_to_boxes(mask, {2: "building", 3: "road"})
    assert boxes == [["building", 10.0, 10.0, 50.0, 20.0], ["building", 60.0, 30.0, 70.0, 40.0],
                     ["road", 50.0, 10.0, 55.0, 20.0]]


def test_hole_and_what_is_inside_it():
    ring = np.zeros((40, 40), np.uint8)
    ring[5:35, 5:35] = 6
    ring[10:30, 10:30] = 0
    ring[18:22, 18:22] = 6  # an island of the same class inside the hole: RETR_EXTERNAL
    assert mask_to_boxes(ring, {6: "forest"}) == [["forest", 5.0, 5.0, 35.0, 35.0]]


def test_min_area_drops_a_speck():
    mask = np.zeros((40, 40), np.uint8)
    mask[5:15, 5:15] = 2
    mask[30, 30:33] = 2  # a 3-pixel speck
    assert len(mask_to_boxes(mask, {2: "building"})) == 2
    assert mask_to_boxes(mask, {2: "building"}, min_area=4) == [["building", 5.0, 5.0, 15.0,
                                                                 15.0]]
    assert len(mask_to_boxes(mask, {2: "building"}, min_area=3)) == 2
    # the area is the component's pixels, not its box: a thin diagonal line of 20 pixels
    diag = np.zeros((40, 40), np.uint8)
    diag[np.arange(20), np.arange(20)] = 2
    assert len(mask_to_boxes(diag, {2: "building"}, min_area=20)) == 1
    assert mask_to_boxes(diag, {2: "building"}, min_area=21) == []
    # a ring's hole is not its area
    ring = np.zeros((40, 40), np.uint8)
    ring[0:30, 0:30] = 2
    ring[1:29, 1:29] = 0  # 116 border pixels
    assert len(mask_to_boxes(ring, {2: "building"}, min_area=116)) == 1
    assert mask_to_boxes(ring, {2: "building"}, min_area=117) == []


# --- colour-coded and index masks ----------------------------------------------------------


def _potsdam_mask() -> np.ndarray:
    rgb = np.zeros((60, 90, 3), np.uint8)
    rgb[:, :] = ISPRS_RGB["impervious surfaces"]
    rgb[5:25, 5:40] = ISPRS_RGB["building"]
    rgb[30:50, 50:80] = ISPRS_RGB["tree"]
    rgb[40:44, 10:18] = ISPRS_RGB["car"]
    rgb[5:20, 60:85] = ISPRS_RGB["clutter"]
    rgb[5:25, 40] = ISPRS_RGB["boundary"]  # eroded boundary: no-data
    rgb[:, 0] = ISPRS_RGB["boundary"]
    return rgb


def test_rgb_potsdam_mask_with_black_boundary():
    ids, unknown = read_mask(_png(_potsdam_mask()), "rgb", POTSDAM)
    assert unknown == 0.0
    boxes = mask_to_boxes(ids, POTSDAM.used_classes())
    assert boxes == [["building", 5.0, 5.0, 40.0, 25.0], ["tree", 50.0, 30.0, 80.0, 50.0],
                     ["car", 10.0, 40.0, 18.0, 44.0]]
    # impervious surfaces, clutter and the boundary are never boxed
    assert {b[0] for b in boxes} == {"building", "tree", "car"}


def test_unknown_colour_is_measured():
    rgb = _potsdam_mask()
    rgb[50:60, 0:9] = (12, 200, 77)  # 90 of 5400 pixels: 1.67%
    ids, unknown = rgb_to_index(rgb, POTSDAM.colours)
    assert unknown == pytest.approx(90 / 5400)
    assert (ids[50:60, 0:9] == UNKNOWN).all() and (ids[:50] != UNKNOWN).all()
    # a colour a few levels off (lossy compression) is found with a tolerance
    rgb2 = _potsdam_mask()
    rgb2[5:25, 5:40] = (3, 2, 250)
    assert rgb_to_index(rgb2, POTSDAM.colours)[1] > 0.1
    ids2, unknown2 = rgb_to_index(rgb2, POTSDAM.colours, tolerance=6)
    assert unknown2 == 0.0 and (ids2[5:25, 5:40] == 2).all()


def test_loveda_index_mask_nodata_and_background_not_boxed():
    mask = np.ones((64, 64), np.uint8)  # background
    mask[:, :4] = 0  # no-data
    mask[10:20, 10:30] = 2  # building
    mask[40:64, 0:64] = 7  # agriculture
    mask[30:34, 40:50] = 4  # water
    ids, unknown = read_mask(_png(mask), "index", LOVEDA)
    assert unknown == 0.0
    boxes = mask_to_boxes(ids, LOVEDA.used_classes())
    assert boxes == [["building", 10.0, 10.0, 30.0, 20.0], ["water", 40.0, 30.0, 50.0, 34.0],
                     ["agriculture", 0.0, 40.0, 64.0, 64.0]]
    assert 0 not in LOVEDA.used_classes() and 1 not in LOVEDA.used_classes()
    # a palette PNG's indices are the class ids
    pal = Image.fromarray(mask, "P")
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    assert np.array_equal(read_mask(buf.getvalue(), "index", LOVEDA)[0], mask)
    # values that are no LoveDA class are unknown
    mask[0:8, 0:8] = 200
    assert read_mask(_png(mask), "index", LOVEDA)[1] == pytest.approx(64 / 4096)


def test_read_mask_refuses_what_is_no_mask():
    with pytest.raises(MaskUnreadable):
        read_mask(b"not a png at all", "index", LOVEDA)
    with pytest.raises(MaskUnreadable, match="no index mask"):
        read_mask(_png(_potsdam_mask()), "index", LOVEDA)
    with pytest.raises(MaskUnreadable, match="decompression_bomb"):
        read_mask(_png(np.zeros((200, 200), np.uint8)), "index", LOVEDA, max_pixels=10_000)
    jpeg = io.BytesIO()
    Image.fromarray(_potsdam_mask()).save(jpeg, "JPEG")
    with pytest.raises(MaskUnreadable):
        read_mask(jpeg.getvalue(), "rgb", POTSDAM)  # lossy formats are not masks
    noisy = np.random.default_rng(0).integers(0, 8, (60, 90), dtype=np.uint8)
    data = _png(noisy)
    assert len(data) > 1000
    with pytest.raises(MaskUnreadable, match="truncat|decode"):
        read_mask(data[: len(data) // 2], "index", LOVEDA)


# --- the stage -----------------------------------------------------------------------------


def _mask_record(key, path, table="loveda", style="index", size=(64, 64), **extra) -> dict:
    rec = {"key": key, "subset": "remoteclip", "source": table, "source_id": key,
           "url": f"/img/{key}.png", "caption": None, "_image_size": list(size),
           "original_width": size[0], "original_height": size[1], "width": 128, "height": 128,
           "_mask": {"path": str(path), "style": style, "table": table}}
    rec.update(extra)
    return rec


@pytest.fixture()
def masks(tmp_path):
    loveda = np.ones((64, 64), np.uint8)
    loveda[10:20, 10:30] = 2
    loveda[40:50, 40:60] = 3
    (tmp_path / "loveda.png").write_bytes(_png(loveda))
    (tmp_path / "background.png").write_bytes(_png(np.ones((64, 64), np.uint8)))
    (tmp_path / "potsdam.tif").write_bytes(_tiff(_potsdam_mask()))
    odd = _potsdam_mask()
    odd[:, 80:] = (12, 200, 77)
    (tmp_path / "odd.png").write_bytes(_png(odd))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return tmp_path


def _tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF")
    return buf.getvalue()


def test_mask_box_sets_objects(masks):
    out = mask_box(_mask_record("a", masks / "loveda.png"), CLASSES)
    assert out["_from_mask"] is True
    assert out["_objects"] == [["building", 10.0, 10.0, 30.0, 20.0],
                               ["road", 40.0, 40.0, 60.0, 50.0]]
    rgb = mask_box(_mask_record("p", masks / "potsdam.tif", "potsdam", "rgb", (90, 60)),
                   CLASSES)
    assert [o[0] for o in rgb["_objects"]] == ["building", "tree", "car"]
    # then Box-to-Caption writes mask2box captions
    captioned = box_caption(out, load_templates(), CLASSES)
    assert captioned["caption_kind"] == "mask2box" and captioned["labels"] == ["building",
                                                                               "road"]
    # a tile of a larger scene: the window of the mask
    tile = mask_box(_mask_record("t", masks / "loveda.png", size=(32, 32),
                                 _mask={"path": str(masks / "loveda.png"), "style": "index",
                                        "table": "loveda", "window": [0, 0, 32, 32]}), CLASSES)
    assert tile["_objects"] == [["building", 10.0, 10.0, 30.0, 20.0]]


def test_mask_box_rejects(masks):
    def reason(rec, **kw):
        out = mask_box(rec, CLASSES, **kw)
        assert isinstance(out, Reject) and out.stage == "mask2box"
        return out.reason

    assert reason(_mask_record("m", masks / "nope.png")) == "mask_missing"
    assert reason(_mask_record("b", masks / "broken.png")) == "mask_unreadable"
    assert reason(_mask_record("c", masks / "loveda.png"), max_bytes=100) == "mask_unreadable"
    assert reason(_mask_record("t", masks / "loveda.png", table="atlantis")) == "mask_unreadable"
    assert reason(_mask_record("s", masks / "loveda.png", size=(64, 65))) == "mask_size_mismatch"
    assert reason(_mask_record("o", masks / "odd.png", "potsdam", "rgb", (90, 60))) == \
        "unknown_mask_colour"
    assert reason(_mask_record("e", masks / "background.png")) == "no_objects"
    # tolerated below the share
    ok = mask_box(_mask_record("o", masks / "odd.png", "potsdam", "rgb", (90, 60)), CLASSES,
                  max_unknown_share=0.2)
    assert ok["_mask_unknown_share"] == pytest.approx(10 / 90)
    plain = {"key": "x", "caption": "a port."}
    assert mask_box(plain, CLASSES) is plain


def test_beam_stages(masks):
    records = [
        _mask_record("a", masks / "loveda.png"),
        _mask_record("m", masks / "nope.png"),
        _mask_record("o", masks / "odd.png", "potsdam", "rgb", (90, 60)),
        {"key": "h", "subset": "remoteclip", "source": "rsicd", "source_id": "h", "url": None,
         "caption": "a port.", "captions": ["a port."], "caption_kind": "human"},
    ]
    with TestPipeline() as p:
        boxed = p | beam.Create(records) | MaskToBox(min_area=4)
        captioned = boxed.records | BoxToCaption()
        assert_that(captioned.records | "Kinds" >> beam.Map(
            lambda r: (r["key"], r["caption_kind"], tuple(r.get("labels") or ()))),
            equal_to([("a", "mask2box", ("building", "road")), ("h", "human", ())]),
            label="records")
        assert_that(boxed[REJECTS] | "Reasons" >> beam.Map(lambda r: (r["key"], r["reason"])),
                    equal_to([("m", "mask_missing"), ("o", "unknown_mask_colour")]),
                    label="rejects")
    with pytest.raises(ValueError):
        MaskToBox(min_area=-1)
