"""The annotation sources (``pipelines/sources/annotations.py``): each parser on hand-written
samples, layout detection, tiles, the Beam source on ``tmp_path`` datasets, and one scene
annotated in DOTA, VOC, COCO and YOLO giving the same ``_objects``."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from PIL import Image

from pipelines.records import make_key
from pipelines.sources import annotations as ann
from pipelines.sources.annotations import AnnotationError

# --- helpers ------------------------------------------------------------------------------


def _png(w: int, h: int, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "L":
        img = Image.fromarray(rng.integers(0, 8, (h, w), dtype=np.uint8), "L")
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _write(root: Path, rel: str, data: bytes | str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        p.write_text(data)
    else:
        p.write_bytes(data)
    return p


def _close(a: list, b: list, tol: float = 1e-6) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x[0] != y[0] or any(abs(float(u) - float(v)) > tol for u, v in zip(x[1:5], y[1:5],
                                                                               strict=True)):
            return False
    return True


def _read_all(spec: ann.AnnotationSpec, **kw) -> tuple[list[dict], list[tuple]]:
    """(records, [(source_id, reason)]) of a spec through the pure lister + reader."""
    records, rejects = [], []
    for it in ann.list_spec(spec):
        for out in ann.read_item(it, subset="remoteclip", **kw):
            if isinstance(out, tuple):
                rejects.append((out[0]["source_id"], out[1].reason))
            else:
                records.append(out)
    return records, rejects


# --- spec ---------------------------------------------------------------------------------


def test_parse_spec_explicit_and_masks(tmp_path):
    s = ann.parse_spec(f"dota=dota:{tmp_path}/")
    assert (s.name, s.format, s.root, s.table) == ("dota", "dota", str(tmp_path), None)
    s = ann.parse_spec(f"vaihingen=mask_rgb[potsdam]:{tmp_path}")
    assert (s.format, s.table) == ("mask_rgb", "potsdam")
    s = ann.parse_spec(f"loveda=mask_index:{tmp_path}")
    assert s.table == "loveda"  # the table defaults to the name
    s = ann.parse_spec("isaid=coco:gs://bucket/isaid/")
    assert (s.format, s.root) == ("coco", "gs://bucket/isaid")
    s = ann.parse_spec("x=gs://bucket/x", detect=False)  # gs// is a root, not a format
    assert (s.format, s.root) == (None, "gs://bucket/x")
    with pytest.raises(ValueError, match="unknown format"):
        ann.parse_spec(f"x=dotaa:{tmp_path}")
    with pytest.raises(ValueError, match="mask formats only"):
        ann.parse_spec(f"x=dota[t]:{tmp_path}")
    with pytest.raises(ValueError):
        ann.parse_spec(f"bad name=dota:{tmp_path}")
    with pytest.raises(ValueError):
        ann.parse_spec("justaname")


# --- parsers ------------------------------------------------------------------------------

DOTA_TEXT = """imagesource:GoogleEarth
gsd:null
10 20 60 20 60 80 10 80 plane 0
50 0 100 50 50 100 0 50 small-vehicle 1

1 1 3 1 3 3 1 3 ship
"""


def test_parse_dota_header_difficult_and_oriented():
    header, objs = ann.parse_dota(DOTA_TEXT)
    assert header == {"imagesource": "GoogleEarth", "gsd": None}
    assert objs[0] == ["plane", 10.0, 20.0, 60.0, 80.0, False]
    # a diamond (oriented) → its horizontal hull; difficult 1 kept and flagged
    assert objs[1] == ["small-vehicle", 0.0, 0.0, 100.0, 100.0, True]
    assert objs[2][0] == "ship" and objs[2][5] is False  # 9 fields: difficult absent = 0
    header, _ = ann.parse_dota("gsd:0.1463\n0 0 1 0 1 1 0 1 plane 0\n")
    assert header["gsd"] == pytest.approx(0.1463)
    for bad in ("0 0 1 0 1 1 0 plane 0\n", "0 0 1 0 1 x 0 1 plane 0\n",
                "0 0 1 0 1 1 0 1 plane hard\n", "0 0 1 0 1 nan 0 1 plane 0\n"):
        with pytest.raises(AnnotationError) as e:
            ann.parse_dota(bad)
        assert e.value.reason == "annotation_malformed"


VOC_XML = b"""<annotation><filename>a.jpg</filename>
<size><width>200</width><height>100</height><depth>3</depth></size>
<object><name>airplane</name><difficult>1</difficult>
<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
<object><name>ship</name><difficult>0</difficult>
<bndbox><xmin>180</xmin><ymin>90</ymin><xmax>230</xmax><ymax>130</ymax></bndbox></object>
</annotation>"""


def test_parse_voc_one_based_and_clipping():
    info, objs = ann.parse_voc(VOC_XML)
    assert info == {"filename": "a.jpg", "width": 200, "height": 100}
    assert objs[0] == ["airplane", 0.0, 0.0, 50.0, 40.0, True]  # 1-based inclusive → edges
    assert objs[1][1:5] == [179.0, 89.0, 230.0, 130.0]
    kept, dropped = ann.clip_objects(objs, 200, 100)
    assert kept[1] == ["ship", 179.0, 89.0, 200.0, 100.0] and dropped == 0
    kept, dropped = ann.clip_objects([["x", 210, 0, 250, 10, False]], 200, 100)
    assert kept == [] and dropped == 1


def test_parse_voc_malformed_and_bombs_refused():
    cases = [
        b"<annotation><object><name>a</name>",  # truncated
        b"<annotation><object><name>a</name></object></annotation>",  # no bndbox
        (b"<annotation><object><name>a</name><bndbox><xmin>x</xmin><ymin>1</ymin>"
         b"<xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>"),
        b"<notvoc/>",
    ]
    bomb = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
            + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1
                                                      else b"&lol;") * 10)
                       for i in range(1, 10))
            + b"]><annotation><filename>&lol9;</filename></annotation>")
    external = (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                b"<annotation><filename>&x;</filename></annotation>")
    for data in [*cases, bomb, external]:
        with pytest.raises(AnnotationError) as e:
            ann.parse_voc(data)
        assert e.value.reason == "annotation_malformed"
    with pytest.raises(AnnotationError, match="refused"):
        ann.parse_voc(bomb)
    # the expat fallback (used when defusedxml is not installed) refuses on its own
    for data in (bomb, external):
        with pytest.raises(Exception, match="refused"):
            ann._expat_tree(data)
    assert ann._expat_tree(VOC_XML).find("filename").text == "a.jpg"
    # a DOCTYPE without entities is fine
    info, _ = ann.parse_voc(b'<?xml version="1.0"?><!DOCTYPE annotation>' + VOC_XML)
    assert info["filename"] == "a.jpg"


def test_parse_coco_bbox_unknown_category_and_shapes():
    doc = {
        "images": [{"id": 2, "file_name": "b.png", "width": 64, "height": 32},
                   {"id": 1, "file_name": "a.png", "width": 64, "height": 32},
                   {"id": 3, "file_name": "c.png"}, {"file_name": "noid.png"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 20]},
            {"id": 2, "image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5]},
            {"id": 3, "image_id": 2, "category_id": 99, "bbox": [0, 0, 5, 5]},
            {"id": 4, "image_id": 3, "category_id": 7, "bbox": [0, 0, 5]},
            {"id": 5, "image_id": 42, "category_id": 7, "bbox": [0, 0, 5, 5]},  # orphan
        ],
        "categories": [{"id": 7, "name": "storage-tank"}],
    }
    ims = {c.file_name: c for c in ann.parse_coco(doc)}
    assert [c.file_name for c in ann.parse_coco(doc)] == sorted(ims)
    assert ims["a.png"].objects == [["storage-tank", 1.0, 2.0, 11.0, 22.0, False]]
    assert ims["a.png"].unknown == 1 and (ims["a.png"].width, ims["a.png"].height) == (64, 32)
    assert ims["b.png"].objects == [] and ims["b.png"].unknown == 1
    assert ims["c.png"].malformed and ims["c.png"].width is None
    assert ims["noid.png"].malformed
    for bad in ([], {"annotations": []}, {"images": {}, "categories": []},
                {"images": [], "annotations": []},  # a captions JSON: no categories
                {"images": [], "categories": [{"id": 1}]}):
        with pytest.raises(AnnotationError):
            ann.parse_coco(bad)


def test_parse_yolo_names_and_clipping():
    names = ann.parse_yolo_names(b"plane\nship\n\n", "classes.txt")
    assert names == ["plane", "ship"]
    assert ann.parse_yolo_names(b"names: [plane, ship]\n", "data.yaml") == names
    assert ann.parse_yolo_names(b"path: x\nnames:\n  0: plane\n  1: ship\n",
                                "dataset.yaml") == names
    for bad, fn in ((b"plane\n\nship\n", "classes.txt"), (b"nc: 2\n", "data.yaml"),
                    (b"names:\n  1: plane\n", "data.yaml"), (b"names: [a, [b\n", "data.yaml")):
        with pytest.raises(AnnotationError):
            ann.parse_yolo_names(bad, fn)
    text = "0 0.5 0.5 0.2 0.4\n5 0.5 0.5 0.1 0.1\n1 1.05 0.5 0.2 0.2\n1 0.1 0.1 0.3 0.1 0.2 0.3\n"
    objs, unknown = ann.parse_yolo(text, names, 200, 100)
    assert unknown == 1  # class 5 is out of range
    assert objs[0] == ["plane", 80.0, 30.0, 120.0, 70.0, False]
    assert objs[1][1:5] == pytest.approx([190.0, 40.0, 230.0, 60.0])  # outside [0, 1]: clip
    assert objs[2][1:5] == pytest.approx([20.0, 10.0, 60.0, 30.0])  # polygon → min/max
    kept, _ = ann.clip_objects(objs, 200, 100)
    assert kept[1][1:5] == pytest.approx([190.0, 40.0, 200.0, 60.0])
    for bad in ("0 0.5 0.5 0.2\n", "x 0.5 0.5 0.2 0.2\n", "0 0.5 0.5 0.2 0.2 0.3\n"):
        with pytest.raises(AnnotationError):
            ann.parse_yolo(bad, names, 10, 10)


def test_karpathy_train_split_only():
    doc = {"images": [
        {"filename": "a.jpg", "split": "train", "imgid": 0,
         "sentences": [{"raw": "  many  planes\tare parked . "}, {"raw": ""},
                       {"tokens": ["a", "runway"]}]},
        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "x"}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "x"}]},
        {"filename": "d.jpg", "split": "restval", "sentences": [{"raw": "a port"}]},
        {"split": "train"}, "junk"]}
    items = ann.karpathy_train_items(doc)
    good = [i for i in items if "error" not in i]
    assert [i["filename"] for i in good] == ["a.jpg", "d.jpg"]
    assert good[0]["sentences"] == ["many planes are parked .", "a runway"]
    assert len([i for i in items if "error" in i]) == 2
    with pytest.raises(AnnotationError):
        ann.karpathy_train_items({"annotations": []})


# --- tiles --------------------------------------------------------------------------------


def test_tile_windows_cover_overlap_and_flush():
    wins = ann.tile_windows(2000, 1500, 1024, 0.2)
    xs = sorted({w[0] for w in wins})
    ys = sorted({w[1] for w in wins})
    assert xs == [0, 819, 976] and ys == [0, 476]  # step 819; last flush with the edge
    assert all(w[2] - w[0] == 1024 and w[3] - w[1] == 1024 for w in wins)
    cover = np.zeros((1500, 2000), bool)
    for x0, y0, x1, y1 in wins:
        cover[y0:y1, x0:x1] = True
    assert cover.all()
    assert ann.tile_windows(500, 3000, 1024, 0.5)[0] == (0, 0, 500, 1024)
    assert ann.tile_windows(100, 100, 1024, 0.2) == [(0, 0, 100, 100)]
    assert len(ann.tile_windows(2048, 1024, 1024, 0.0)) == 2  # no overlap: exact halves
    with pytest.raises(ValueError):
        ann.tile_windows(10, 10, 4, 1.0)


def test_tile_objects_half_rule_and_clipping():
    win = (100, 100, 200, 200)
    objs = [["a", 110, 110, 150, 150],   # inside
            ["b", 180, 120, 220, 160],   # exactly half inside → kept, clipped
            ["c", 190, 120, 230, 160],   # a quarter inside → cut
            ["d", 0, 0, 50, 50]]         # elsewhere
    kept, cut = ann.tile_objects(objs, win)
    assert kept == [["a", 10, 10, 50, 50], ["b", 80, 20, 100, 60]]
    assert cut == 1


def test_scene_tiles_records(tmp_path):
    root = tmp_path / "dota"
    _write(root, "images/S.png", _png(300, 200, seed=3))
    _write(root, "labelTxt/S.txt",
           "10 10 40 10 40 40 10 40 plane 0\n250 150 290 150 290 190 250 190 ship 0\n")
    _write(root, "images/B.png", _png(300, 200, seed=4))
    _write(root, "labelTxt/B.txt", "0 0 300 0 300 200 0 200 harbor 0\n")  # > a tile
    _write(root, "images/small.png", _png(100, 100, seed=5))
    _write(root, "labelTxt/small.txt", "1 1 9 1 9 9 1 9 plane 0\n")
    spec = ann.parse_spec(f"dota=dota:{root}")
    counts: dict[str, int] = {}
    records, rejects = [], []
    for it in ann.list_spec(spec):
        for out in ann.read_item(it, subset="remoteclip", tile=128, tile_overlap=0.25,
                                 counters=counts):
            (rejects if isinstance(out, tuple) else records).append(out)
    assert [(r[0]["source_id"], r[1].reason) for r in rejects] == [("B", "no_objects")]
    by_id = {r["source_id"]: r for r in records}
    assert by_id["small"]["_body"] == (root / "images/small.png").read_bytes()  # whole
    tiles = sorted(k for k in by_id if k.startswith("S@"))
    assert "S@0_0_128" in tiles and "S@172_72_128" in tiles
    t = by_id["S@0_0_128"]
    assert t["_objects"] == [["plane", 10.0, 10.0, 40.0, 40.0]]
    assert t["key"] == make_key("dota", "S@0_0_128") and t["_image_size"] == [128, 128]
    with Image.open(io.BytesIO(t["_body"])) as im:
        assert im.format == "PNG" and im.size == (128, 128)
        src = np.asarray(Image.open(root / "images/S.png"))[0:128, 0:128]
        assert np.array_equal(np.asarray(im), src)
    assert by_id["S@172_72_128"]["_objects"] == [["ship", 78.0, 78.0, 118.0, 118.0]]
    assert counts["tiles"] == len(tiles) and counts["tiles_empty"] > 0
    # the pixel cap refuses a scene before cutting it
    out = [o for it in ann.list_spec(spec) if it["source_id"] == "S"
           for o in ann.read_item(it, subset="r", tile=128, tile_max_pixels=1000)]
    assert [o[1].reason for o in out] == ["too_large"]


# --- one scene, four formats --------------------------------------------------------------

SCENE_W, SCENE_H = 200, 100
SCENE = [["plane", 10.5, 20.25, 60.75, 80.5], ["small-vehicle", 100.0, 10.0, 130.0, 40.0],
         ["storage-tank", 150.5, 50.0, 210.0, 90.0]]  # the last one crosses the right edge
NAMES = ["plane", "small-vehicle", "storage-tank", "ship"]


def _scene_roots(tmp_path: Path) -> dict[str, Path]:
    png = _png(SCENE_W, SCENE_H, seed=9)
    roots = {f: tmp_path / f for f in ("dota", "voc", "coco", "yolo")}
    _write(roots["dota"], "images/P0001.png", png)
    _write(roots["dota"], "labelTxt/P0001.txt", "imagesource:GoogleEarth\ngsd:0.5\n" + "".join(
        f"{x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1} {lab} 0\n" for lab, x0, y0, x1, y1 in SCENE))
    _write(roots["voc"], "JPEGImages/P0001.png", png)
    objs = "".join(f"<object><name>{lab}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}"
                   f"</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
                   f"</object>" for lab, x0, y0, x1, y1 in SCENE)
    _write(roots["voc"], "Annotations/P0001.xml",
           f"<annotation><filename>P0001.png</filename><size><width>{SCENE_W}</width><height>"
           f"{SCENE_H}</height></size>{objs}</annotation>")
    _write(roots["coco"], "images/P0001.png", png)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
    coco = {"images": [{"id": 1, "file_name": "P0001.png", "width": SCENE_W,
                        "height": SCENE_H}],
            "annotations": [{"id": i, "image_id": 1, "category_id": NAMES.index(lab) + 1,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}
                            for i, (lab, x0, y0, x1, y1) in enumerate(SCENE)],
            "categories": cats}
    _write(roots["coco"], "annotations/instances_train.json", json.dumps(coco))
    _write(roots["yolo"], "images/P0001.png", png)
    _write(roots["yolo"], "classes.txt", "\n".join(NAMES) + "\n")
    _write(roots["yolo"], "labels/P0001.txt", "".join(
        f"{NAMES.index(lab)} {(x0 + x1) / 2 / SCENE_W!r} {(y0 + y1) / 2 / SCENE_H!r} "
        f"{(x1 - x0) / SCENE_W!r} {(y1 - y0) / SCENE_H!r}\n" for lab, x0, y0, x1, y1 in SCENE))
    return roots


def test_same_scene_same_objects_in_every_format(tmp_path):
    roots = _scene_roots(tmp_path)
    want = [SCENE[0], SCENE[1], ["storage-tank", 150.5, 50.0, 200.0, 90.0]]  # clipped
    got = {}
    for fmt, root in roots.items():
        assert ann.detect_format(str(root)) == fmt
        records, rejects = _read_all(ann.parse_spec(f"scene={root}"))
        assert rejects == [] and len(records) == 1, fmt
        r = records[0]
        assert r["source_id"] == "P0001" and r["key"] == make_key("scene", "P0001")
        assert r["_image_size"] == [SCENE_W, SCENE_H] and r["_dropped_objects"] == 0
        got[fmt] = r["_objects"]
        assert _close(r["_objects"], want), (fmt, r["_objects"])
    assert len({json.dumps(sorted(o[0] for o in v)) for v in got.values()}) == 1


# --- detection ----------------------------------------------------------------------------


def test_detect_each_layout(tmp_path):
    png = _png(8, 8)
    r = tmp_path / "yaml_yolo"
    _write(r, "images/train/a.png", png)
    _write(r, "labels/train/a.txt", "0 0.5 0.5 0.5 0.5\n")
    _write(r, "data.yaml", "names:\n  0: plane\n")
    assert ann.detect_format(str(r)) == "yolo"
    r = tmp_path / "nested_dota"
    _write(r, "train/images/a.png", png)
    _write(r, "train/labelTxt/a.txt", "")
    assert ann.detect_format(str(r)) == "dota"
    r = tmp_path / "loveda"
    _write(r, "images/a.png", png)
    _write(r, "masks/a.png", _png(8, 8, "L"))
    assert ann.detect_format(str(r)) == "mask_index"
    assert ann.parse_spec(f"loveda={r}").table == "loveda"
    r = tmp_path / "potsdam"
    _write(r, "images/a.png", png)
    _write(r, "masks/a.png", png)
    assert ann.detect_format(str(r)) == "mask_rgb"
    r = tmp_path / "rsicd"
    _write(r, "images/a.jpg", png)
    _write(r, "dataset_rsicd.json", json.dumps(
        {"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]}]}))
    assert ann.detect_format(str(r)) == "karpathy"
    assert ann.caption_set_json(str(r)) == str(r / "dataset_rsicd.json")
    with pytest.raises(FileNotFoundError):
        ann.caption_set_json(str(tmp_path / "loveda"))
    r = tmp_path / "nolabels"  # YOLO folders without a class list: no layout
    _write(r, "images/a.png", png)
    _write(r, "labels/a.txt", "0 0.5 0.5 0.5 0.5\n")
    with pytest.raises(ValueError, match="no known layout"):
        ann.detect_format(str(r))
    _write(r, "labelTxt/a.txt", "")
    _write(r, "classes.txt", "plane\n")
    with pytest.raises(ValueError, match="several layouts"):
        ann.detect_format(str(r))


# --- the Beam source ----------------------------------------------------------------------


def _hostile_roots(tmp_path: Path) -> list[str]:
    png = _png(64, 48, seed=1)
    d = tmp_path / "dota"
    _write(d, "images/ok.png", png)
    _write(d, "labelTxt/ok.txt", "gsd:0.3\n0 0 20 0 20 10 0 10 plane 1\n-5 -5 -1 -5 -1 -1 -5 -1 "
                                 "ship 0\n")
    _write(d, "images/nolabel.png", png)
    _write(d, "labelTxt/noimage.txt", "0 0 1 0 1 1 0 1 plane 0\n")
    _write(d, "images/bad.png", png)
    _write(d, "labelTxt/bad.txt", "0 0 1 plane\n")
    _write(d, "images/empty.png", png)
    _write(d, "labelTxt/empty.txt", "imagesource:GoogleEarth\n")
    _write(d, "images/outside.png", png)
    _write(d, "labelTxt/outside.txt", "100 100 120 100 120 120 100 120 plane 0\n")
    _write(d, "images/notimage.png", b"not a png at all")
    _write(d, "labelTxt/notimage.txt", "0 0 1 0 1 1 0 1 plane 0\n")
    v = tmp_path / "voc"
    _write(v, "JPEGImages/ok.png", png)
    _write(v, "Annotations/ok.xml", VOC_XML)
    _write(v, "JPEGImages/bomb.png", png)
    _write(v, "Annotations/bomb.xml", b'<!DOCTYPE a [<!ENTITY a "aaaa">]><annotation>&a;'
                                      b"</annotation>")
    y = tmp_path / "yolo"
    _write(y, "images/ok.png", png)
    _write(y, "labels/ok.txt", "1 0.5 0.5 0.5 0.5\n9 0.5 0.5 0.5 0.5\n")
    _write(y, "images/unknown.png", png)
    _write(y, "labels/unknown.txt", "7 0.5 0.5 0.5 0.5\n")
    _write(y, "labels/classes.txt", "plane\nship\n")
    c = tmp_path / "coco"
    _write(c, "images/train/a.png", png)
    _write(c, "images/train/unk.png", png)
    _write(c, "images/train/empty.png", png)
    (tmp_path / "secret.png").write_bytes(png)
    (c / "images/train/link.png").symlink_to(tmp_path / "secret.png")
    _write(c, "annotations/instances_train.json", json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                   {"id": 2, "file_name": "gone.png"}, {"id": 3, "file_name": "unk.png"},
                   {"id": 4, "file_name": "../../secret.png"}, {"id": 5, "file_name": "empty.png"},
                   {"id": 6, "file_name": "link.png"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
                        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 10, 10]},
                        {"id": 3, "image_id": 3, "category_id": 5, "bbox": [2, 2, 10, 10]},
                        {"id": 4, "image_id": 6, "category_id": 1, "bbox": [2, 2, 10, 10]}],
        "categories": [{"id": 1, "name": "plane"}]}))
    _write(c, "annotations/broken.json", "{not json")
    k = tmp_path / "karpathy"
    _write(k, "images/a.jpg", png)
    _write(k, "images/b.jpg", png)
    _write(k, "images/t.jpg", png)
    _write(k, "dataset.json", json.dumps({"images": [
        {"filename": "a.jpg", "imgid": 0, "split": "train",
         "sentences": [{"raw": "two  planes ."}, {"raw": "an airport"}]},
        {"filename": "b.jpg", "imgid": 1, "split": "train", "sentences": []},
        {"filename": "t.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "x"}]},
        {"filename": "missing.jpg", "imgid": 3, "split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "/etc/passwd", "imgid": 4, "split": "train", "sentences": [{"raw": "x"}]},
    ]}))
    m = tmp_path / "mask"
    _write(m, "images/a.png", png)
    _write(m, "masks/a.png", _png(64, 48, "L"))
    _write(m, "images/b.png", png)
    return [f"d=dota:{d}", f"v=voc:{v}", f"y=yolo:{y}", f"c=coco:{c}", f"k=karpathy:{k}",
            f"potsdam=mask_rgb[potsdam]:{m}"]


WANT_REJECTS = {
    ("d", "bad", "annotation_malformed"), ("d", "empty", "no_objects"),
    ("d", "noimage", "image_missing"), ("d", "nolabel", "annotation_missing"),
    ("d", "notimage", "image_unreadable"), ("d", "outside", "no_objects"),
    ("v", "bomb", "annotation_malformed"), ("y", "unknown", "unknown_class"),
    ("c", "train/gone", "image_missing"), ("c", "train/unk", "unknown_class"),
    ("c", "../../secret.png", "path_outside_root"), ("c", "train/empty", "no_objects"),
    ("c", "train/link", "path_outside_root"),
    ("c", "annotations/broken", "annotation_malformed"), ("k", "b", "no_captions"),
    ("k", "missing", "image_missing"), ("k", "/etc/passwd", "path_outside_root"),
    ("potsdam", "b", "annotation_missing"),
}


def test_sources_records_and_rejects_pure(tmp_path):
    specs = [ann.parse_spec(s) for s in _hostile_roots(tmp_path)]
    records, rejects = [], set()
    for spec in specs:
        recs, rejs = _read_all(spec)
        records += recs
        rejects |= {(spec.name, sid, reason) for sid, reason in rejs}
    assert rejects == WANT_REJECTS
    by = {(r["source"], r["source_id"]): r for r in records}
    assert set(by) == {("d", "ok"), ("v", "ok"), ("y", "ok"), ("c", "train/a"), ("k", "a"),
                       ("potsdam", "a")}
    d = by[("d", "ok")]
    assert d["_objects"] == [["plane", 0.0, 0.0, 20.0, 10.0]] and d["_dropped_objects"] == 1
    assert d["gsd_m"] == pytest.approx(0.3) and json.loads(d["extra"])["difficult"] == 1
    assert d["url"] == str(tmp_path / "dota/images/ok.png") and d["caption"] is None
    assert by[("y", "ok")]["_objects"] == [["ship", 16.0, 12.0, 48.0, 36.0]]
    assert by[("y", "ok")]["_dropped_objects"] == 1  # the unknown class 9
    assert json.loads(by[("v", "ok")]["extra"])["annotation_size"] == [200, 100]
    assert by[("c", "train/a")]["_objects"] == [["plane", 2.0, 2.0, 12.0, 12.0]]
    k = by[("k", "a")]
    assert (k["caption"], k["captions"], k["caption_kind"]) == (
        "two planes .", ["two planes .", "an airport"], "human")
    assert k["_objects"] is None
    mk = by[("potsdam", "a")]
    assert mk["_mask"] == {"path": str(tmp_path / "mask/masks/a.png"), "style": "rgb",
                           "table": "potsdam"}
    assert mk["_image_size"] == [64, 48] and mk["_objects"] is None
    for r in records:
        assert r["key"] == make_key(r["source"], r["source_id"]) and r["_body"]
        assert r["subset"] == "remoteclip"


def test_caps_refuse_large_files(tmp_path):
    roots = _scene_roots(tmp_path)
    recs, rejs = _read_all(ann.parse_spec(f"s=dota:{roots['dota']}"), max_bytes=100)
    assert recs == [] and rejs == [("P0001", "too_large")]
    items = ann.list_spec(ann.parse_spec(f"s=coco:{roots['coco']}"), max_json_bytes=50)
    assert [(i["source_id"], i["error"][0]) for i in items] == [
        ("annotations/instances_train", "too_large")]


def test_yolo_without_names_is_counted(tmp_path):
    r = tmp_path / "y"
    _write(r, "images/a.png", _png(8, 8))
    _write(r, "labels/a.txt", "0 0.5 0.5 0.5 0.5\n")
    recs, rejs = _read_all(ann.parse_spec(f"y=yolo:{r}"))
    assert recs == [] and rejs == [("a", "annotation_malformed")]


def test_beam_source_matches_pure_reader_and_is_stable(tmp_path):
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    specs = _hostile_roots(tmp_path)
    scene = _scene_roots(tmp_path / "scene")
    specs += [f"scene=dota:{scene['dota']}"]
    want_records = []
    for s in specs:
        want_records += [(r["source"], r["source_id"], r["key"], json.dumps(r["_objects"]))
                         for r in _read_all(ann.parse_spec(s), tile=128)[0]]
    assert ("scene", "P0001@72_0_128", make_key("scene", "P0001@72_0_128")) in {
        w[:3] for w in want_records}
    want_rejects = [(a, b, c) for a, b, c in WANT_REJECTS]
    for _ in range(2):  # twice: same keys, same rows
        with TestPipeline() as p:
            out = p | ann.ReadAnnotations(list(reversed(specs)), "remoteclip", tile=128)
            recs = out["records"] | "R" >> beam.Map(
                lambda r: (r["source"], r["source_id"], r["key"], json.dumps(r["_objects"])))
            rejs = out["rejects"] | "J" >> beam.Map(
                lambda r: (r["source"], r["source_id"], r["reason"]))
            stages = out["rejects"] | "S" >> beam.Map(lambda r: r["stage"]) \
                | beam.Distinct()
            assert_that(recs, equal_to(want_records), label="records")
            assert_that(rejs, equal_to(want_rejects), label="rejects")
            assert_that(stages, equal_to(["read"]), label="stage")
    assert Counter(r for _, _, r in WANT_REJECTS)["path_outside_root"] == 3


def test_read_annotations_validates_arguments(tmp_path):
    with pytest.raises(ValueError):
        ann.ReadAnnotations([], "remoteclip")
    with pytest.raises(ValueError):
        ann.ReadAnnotations([f"x=dota:{tmp_path}"], "remoteclip", tile=0)
    with pytest.raises(FileNotFoundError):
        ann.ReadAnnotations([f"x=dota:{tmp_path}/nope"], "remoteclip")


def test_a_second_image_with_an_annotated_stem_is_a_counted_reject(tmp_path):
    from PIL import Image

    from pipelines.sources.annotations import list_spec, parse_spec, read_item

    root = tmp_path / "dota"
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(root / "images" / "P1.png")
    Image.new("RGB", (64, 64), (10, 90, 90)).save(root / "images" / "P1.jpg")
    (root / "labelTxt" / "P1.txt").write_text("1 1 20 1 20 20 1 20 plane 0\n")
    items = list_spec(parse_spec(f"d=dota:{root}"))
    out = [x for it in items for x in read_item(it, subset="s")]
    kept = [x for x in out if isinstance(x, dict)]
    rejected = [x for x in out if not isinstance(x, dict)]
    assert [r["source_id"] for r in kept] == ["P1"] and kept[0]["url"].endswith("P1.jpg")
    assert [(r[0]["source_id"], r[1].reason) for r in rejected] == [
        ("P1.png", "duplicate_image_name")]
    assert len({r["key"] for r in kept} | {r[0]["key"] for r in rejected}) == 2


def test_a_coco_image_named_twice_is_one_record_and_one_counted_reject(tmp_path):
    import json as _json

    from PIL import Image

    from pipelines.sources.annotations import list_spec, parse_spec, read_item

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(root / "images" / "a.jpg")
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64},
                      {"id": 2, "file_name": "a.jpg", "width": 64, "height": 64}],
           "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 20, 20]}
                           for i in (1, 2)],
           "categories": [{"id": 1, "name": "plane"}]}
    (root / "annotations" / "instances_train.json").write_text(_json.dumps(doc))
    out = [x for it in list_spec(parse_spec(f"c=coco:{root}"))
           for x in read_item(it, subset="s")]
    assert [x["source_id"] for x in out if isinstance(x, dict)] == ["a"]
    assert [(x[0]["source_id"], x[1].reason) for x in out if not isinstance(x, dict)] == [
        ("a#repeat1", "duplicate_image_name")]


def test_remote_roots_are_detected_by_the_workers_not_at_parse(tmp_path, monkeypatch):
    """A gs:// root without a format is left undetected by parse_spec (the listing worker
    detects it); a karpathy root ending in .json names its caption JSON, which is then the
    only one read and is found without listing."""
    from pipelines.sources import archives as arch

    def refuse(root):
        raise AssertionError(f"listed {root}")

    monkeypatch.setattr(arch, "list_files", refuse)
    s = ann.parse_spec("x=gs://bucket/x")
    assert (s.format, s.root) == (None, "gs://bucket/x")
    s = ann.parse_spec("rsicd=karpathy:gs://bucket/rsicd/dataset_rsicd.json")
    assert (s.root, s.caption_json) == ("gs://bucket/rsicd", "dataset_rsicd.json")
    assert ann.caption_set_path(s) == "gs://bucket/rsicd/dataset_rsicd.json"
    monkeypatch.undo()
    r = tmp_path / "rsicd"
    for name, fn in (("dataset_rsicd.json", "a.png"), ("other.json", "b.png")):
        _write(r, f"images/{fn}", _png(32, 32))
        _write(r, name, json.dumps({"images": [
            {"filename": fn, "imgid": 0, "split": "train", "sentences": [{"raw": "x"}]}]}))
    named = ann.parse_spec(f"rsicd=karpathy:{r}/dataset_rsicd.json")
    assert [it["source_id"] for it in ann.list_spec(named)] == ["a"]
    assert [it["source_id"] for it in ann.list_spec(ann.parse_spec(f"rsicd=karpathy:{r}"))] \
        == ["a", "b"]
    # a spec without a format is detected where it is listed
    assert ann.list_spec(ann.parse_spec(f"rsicd={r}", detect=False))[0]["format"] \
        == "karpathy"
    with pytest.raises(FileNotFoundError, match="caption JSON"):
        ann.list_spec(ann.parse_spec(f"rsicd=karpathy:{r}/nope.json"))
