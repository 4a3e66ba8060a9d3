"""The demo world's RemoteCLIP sources (``pipelines.demo.remoteclip``) and the RemoteCount
builder (``pipelines.remotecount``).

One small world (PUB11 + local + RS3, then the RemoteCLIP part) is built per module; a copy
of its base gets the RemoteCLIP part again, for the byte-identity check. Annotation files are
parsed here by each format's own convention, independently of the sources module.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.demo import remoteclip as rc
from pipelines.records import make_key

SEED = 5
READ_REASONS = {"annotation_malformed", "image_missing", "annotation_missing", "unknown_class",
                "no_objects", "too_large", "path_outside_root"}
MASK_REASONS = {"mask_missing", "mask_unreadable", "mask_size_mismatch", "unknown_mask_colour",
                "no_objects"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    from pipelines.demo.local import build_local
    from pipelines.demo.pub11 import build_pub11
    from pipelines.demo.rs3 import build_rs3

    a = str(tmp_path_factory.mktemp("rc_world_a"))
    build_pub11(a, "http://127.0.0.1:9", seed=SEED, n_rs=12, n_non_rs=6, n_probe=4)
    build_local(a, seed=SEED, n=6)
    build_rs3(a, seed=SEED, n_fmow=4, n_ben=4, n_millionaid=4)
    b = str(tmp_path_factory.mktemp("rc_world_b"))
    shutil.rmtree(b)
    shutil.copytree(a, b, symlinks=True)
    summary = rc.build_remoteclip(a, seed=SEED)
    rc.build_remoteclip(b, seed=SEED)
    return a, b, summary


@pytest.fixture(scope="module")
def world(worlds):
    return worlds[0]


@pytest.fixture(scope="module")
def truth(world):
    return pq.read_table(os.path.join(world, rc.TRUTH)).to_pylist()


def _root(world: str, source: str) -> str:
    return os.path.join(world, rc.FOLDER, source)


# ----------------------------------------------------------------------------- parsers
# Each format read by its documented convention (formats.md), to [label, x0, y0, x1, y1].


def parse_dota(path: str) -> list[list]:
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 1 and ":" in parts[0]:
            continue  # imagesource:/gsd: header
        xy = [float(v) for v in parts[:8]]
        out.append([parts[8], min(xy[0::2]), min(xy[1::2]), max(xy[0::2]), max(xy[1::2])])
    return out


def parse_voc(path: str) -> list[list]:
    root = ET.parse(path).getroot()
    out = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        out.append([obj.find("name").text, x0 - 1, y0 - 1, x1, y1])  # 1-based inclusive
    return out


def parse_coco(path: str) -> dict[str, list[list]]:
    doc = json.loads(Path(path).read_text())
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    by_id = {im["id"]: im["file_name"] for im in doc["images"]}
    out: dict[str, list[list]] = {fn: [] for fn in by_id.values()}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        out[by_id[a["image_id"]]].append([cats[a["category_id"]], x, y, x + w, y + h])
    return out


def parse_yolo(path: str, names: list[str], w: int, h: int) -> list[list]:
    out = []
    for line in Path(path).read_text().splitlines():
        c, cx, cy, bw, bh = line.split()
        cx, cy, bw, bh = float(cx), float(cy), float(bw), float(bh)
        out.append([names[int(c)], (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                    (cy + bh / 2) * h])
    return out


def _demo_class(fmt: str, label: str) -> str:
    return {v: k for k, v in rc.LABELS[fmt].items()}[label]


# ----------------------------------------------------------------------------- the world


def test_build_is_byte_identical_for_a_seed(worlds, tmp_path):
    a, b, _ = worlds
    cmp = filecmp.dircmp(os.path.join(a, rc.FOLDER), os.path.join(b, rc.FOLDER))

    listings = (rc.ANNOTATIONS_FILE, rc.HELDOUT_FILE)  # they name the world's own path

    def walk(d: filecmp.dircmp, rel: str = "") -> int:
        assert not d.left_only and not d.right_only, (rel, d.left_only, d.right_only)
        files = [f for f in d.common_files if rel or f not in listings]
        _, mismatch, errors = filecmp.cmpfiles(d.left, d.right, files, shallow=False)
        assert not mismatch and not errors, (rel, mismatch, errors)
        return len(files) + sum(walk(sub, f"{rel}/{n}") for n, sub in d.subdirs.items())

    assert walk(cmp) > 100
    for name in listings:
        assert Path(a, rc.FOLDER, name).read_text().replace(a, "W") == \
            Path(b, rc.FOLDER, name).read_text().replace(b, "W")
    assert Path(a, rc.TRUTH).read_bytes() == Path(b, rc.TRUTH).read_bytes()
    # and the seed matters
    other = str(tmp_path / "other")
    rc.build_remoteclip(other, seed=SEED + 1, n=4)
    p = "remoteclip/dota/images/P0001.png"
    assert Path(a, p).read_bytes() != Path(other, p).read_bytes()


def test_summary_and_annotations_file(world, worlds, truth):
    summary = worlds[2]
    assert summary["rows"] == len(truth)
    assert set(summary["by_source"]) == set(rc.FORMATS)
    root = os.path.join(os.path.abspath(world), rc.FOLDER)
    lines = Path(world, rc.FOLDER, rc.ANNOTATIONS_FILE).read_text().split()
    assert lines == summary["annotations"] == [f"{n}={f}:{root}/{n}"
                                               for n, f in rc.FORMATS.items()]
    assert f"loveda=mask_index:{root}/loveda" in lines
    assert f"potsdam=mask_rgb:{root}/potsdam" in lines
    for line in lines:
        assert os.path.isdir(line.split(":", 1)[1])
    heldout = Path(world, rc.FOLDER, rc.HELDOUT_FILE).read_text().strip()
    assert heldout == summary["heldout"] == f"dota_val=dota:{root}/dota_val"
    assert os.listdir(os.path.join(root, "dota_val", "labelTxt"))
    assert summary["decontam"].startswith("rsicd_test=")
    assert os.path.isfile(os.path.join(summary["decontam"].split("=", 1)[1],
                                       "dataset_rsicd_test.json"))


def test_truth_columns_and_keys(truth):
    cols = set(truth[0])
    for c in ("source", "source_id", "key", "planted", "expected", "expected_stage",
              "expected_reason", "objects", "boxes", "format", "dropped_objects"):
        assert c in cols
    for r in truth:
        assert r["key"] == make_key(r["source"], r["source_id"])
        assert r["format"] == rc.FORMATS[r["source"]]
        assert "/" not in r["source_id"] and "." not in r["source_id"]
    keys = [(r["source"], r["source_id"]) for r in truth]
    assert len(keys) == len(set(keys))


def test_source_ids_follow_the_reader_rule(truth):
    annotations = pytest.importorskip("pipelines.sources.annotations")
    for r in truth:
        if r["image"]:
            rel = r["image"].split("/", 2)[2]  # remoteclip/<source>/<rel>
            assert annotations.source_id_of(rel) == r["source_id"]


def test_every_planted_case_is_present_with_its_expectation(world, truth):
    by_kind: dict[str, list[dict]] = {}
    for r in truth:
        if r["planted"]:
            by_kind.setdefault(r["planted"], []).append(r)
    assert set(by_kind) == set(rc.PLANTED_KINDS)
    for kind, rows in by_kind.items():
        source, expected, stage, reason = rc.PLANTED_KINDS[kind]
        if kind == "same_scene":
            continue  # its own test
        for r in rows:
            assert (r["source"], r["expected"], r["expected_stage"], r["expected_reason"]) == (
                source, expected, stage, reason), kind
            if stage == "read":
                assert reason in READ_REASONS
            if stage == "mask2box":
                assert reason in MASK_REASONS
    one = {k: v[0] for k, v in by_kind.items()}

    def path(r: dict, rel: str | None = None) -> str:
        return os.path.join(_root(world, r["source"]), rel or r["annotation"])

    # the files are what the case says
    r = one["dota_label_malformed"]
    def valid(line: str) -> bool:
        parts = line.split()
        try:
            [float(v) for v in parts[:8]]
        except ValueError:
            return False
        return len(parts) in (9, 10)

    text = [ln for ln in Path(path(r)).read_text().splitlines() if " " in ln]
    assert text and not any(valid(ln) for ln in text)
    assert os.path.isfile(os.path.join(world, r["image"]))
    r = one["dota_image_missing"]
    assert os.path.isfile(path(r)) and not os.path.exists(os.path.join(world, r["image"]))
    r = one["dota_annotation_missing"]
    assert os.path.isfile(os.path.join(world, r["image"]))
    assert not os.path.exists(path(r, "labelTxt/P0903.txt"))
    with pytest.raises(ET.ParseError):
        ET.parse(path(one["voc_not_xml"]))
    r = one["voc_box_outside"]
    boxes = parse_voc(path(r))
    assert len(boxes) == 1 and boxes[0][1] >= r["width"]
    coco = parse_coco(os.path.join(_root(world, "coco"), "annotations/instances_train.json"))
    r = one["coco_image_missing"]
    assert coco[f"{r['source_id']}.png"] and not os.path.exists(os.path.join(world, r["image"]))
    r = one["coco_degenerate_boxes"]
    degenerate = coco[f"{r['source_id']}.png"]
    assert degenerate and all(b[3] - b[1] <= 0 or b[4] - b[2] <= 0 for b in degenerate)
    r = one["yolo_unknown_class"]
    n_classes = len(Path(_root(world, "yolo"), "classes.txt").read_text().split("\n")) - 1
    lines = Path(path(r)).read_text().split("\n")[:-1]
    assert lines and all(int(ln.split()[0]) >= n_classes for ln in lines)
    r = one["potsdam_unknown_colour"]
    mask = np.asarray(Image.open(path(r)).convert("RGB")).reshape(-1, 3)
    known = np.zeros(len(mask), bool)
    for colour in (*rc.POTSDAM_TABLE.values(), rc.POTSDAM_NODATA):
        known |= (mask == colour).all(axis=1)
    assert (~known).mean() > 0.3
    r = one["loveda_size_mismatch"]
    assert Image.open(path(r)).size != Image.open(os.path.join(world, r["image"])).size
    r = one["loveda_background_only"]
    assert set(np.unique(np.asarray(Image.open(path(r))))) <= {0, 1}
    r = one["large_scene"]
    assert r["width"] > 2048 and r["height"] > 1024 and r["expected"] == "tiled"
    assert Image.open(os.path.join(world, r["image"])).size == (r["width"], r["height"])
    assert len(json.loads(r["objects"])) == len(parse_dota(path(r))) > 20
    r = one["dota_clipped_boxes"]
    assert r["expected"] == "kept" and r["dropped_objects"] == 1
    assert max(b[3] for b in json.loads(r["boxes"])) == r["width"]  # one box clipped


def test_benchmark_copy_is_a_test_split_image(world, truth):
    copy = next(r for r in truth if r["planted"] == "yolo_benchmark_copy")
    tests = [r for r in truth if r["planted"] == "rsicd_test_split"]
    assert tests and all(r["expected"] == "not_read" for r in tests)
    original = next(r for r in tests if r["key"] == copy["shared_key"])
    body = Path(world, copy["image"]).read_bytes()
    assert body == Path(world, original["image"]).read_bytes()
    name = os.path.basename(original["image"])
    assert Path(world, "remoteclip/rsicd_test/images", name).read_bytes() == body
    split = {im["filename"]: im["split"] for im in json.loads(
        Path(world, "remoteclip/rsicd/dataset_rsicd.json").read_text())["images"]}
    assert split[name] == "test"
    assert {"train", "test"} == set(split.values())
    bench = json.loads(Path(world, "remoteclip/rsicd_test/dataset_rsicd_test.json").read_text())
    assert {im["split"] for im in bench["images"]} == {"test"}
    assert all(len(im["sentences"]) == 5 for im in bench["images"])
    assert copy["boxes"] and json.loads(copy["boxes"])  # labelled: it reaches decontam


def test_rsicd_is_karpathy_with_five_sentences(world, truth):
    from pipelines.sources.benchmarks import karpathy_images

    doc = Path(world, "remoteclip/rsicd/dataset_rsicd.json")
    ims = karpathy_images(str(doc), "train")
    assert ims and all(len(im.sentences) == 5 for im in ims)
    rows = {r["source_id"]: r for r in truth if r["source"] == "rsicd"}
    for im in ims:
        assert rows[os.path.splitext(im.filename)[0]]["caption"] == im.sentences[0]


def test_the_same_scene_has_the_same_boxes_in_all_four_formats(world, truth):
    d, v, c, y = (_root(world, s) for s in ("dota", "voc", "coco", "yolo"))
    names = Path(y, "classes.txt").read_text().split("\n")[:-1]
    size = Image.open(os.path.join(d, "images/same_scene.png")).size
    parsed = {
        "dota": parse_dota(os.path.join(d, "labelTxt/same_scene.txt")),
        "voc": parse_voc(os.path.join(v, "Annotations/same_scene.xml")),
        "coco": parse_coco(os.path.join(c, "annotations/instances_train.json"))["same_scene.png"],
        "yolo": parse_yolo(os.path.join(y, "labels/same_scene.txt"), names, *size),
    }
    canon = {fmt: sorted([_demo_class(fmt, b[0]), *(round(x, 6) for x in b[1:])] for b in boxes)
             for fmt, boxes in parsed.items()}
    assert canon["dota"] and canon["dota"] == canon["voc"] == canon["coco"] == canon["yolo"]
    # DOTA holds at least one genuinely rotated rectangle among them
    lines = [ln.split() for ln in Path(d, "labelTxt/same_scene.txt").read_text().splitlines()]
    assert any(len(ln) == 10 and len({ln[0], ln[2], ln[4], ln[6]}) > 2 for ln in lines)
    # same bytes per encoding; the truth keeps one, the others are its duplicates
    png, jpg = (Path(d, "images/same_scene.png").read_bytes(),
                Path(v, "JPEGImages/same_scene.jpg").read_bytes())
    assert Path(c, "images/same_scene.png").read_bytes() == png
    assert Path(y, "images/same_scene.jpg").read_bytes() == jpg and len(png) > len(jpg)
    rows = {r["source"]: r for r in truth if r["planted"] == "same_scene"}
    assert set(rows) == {"dota", "voc", "coco", "yolo"}
    survivor = min((rows["dota"], rows["coco"]), key=lambda r: r["key"])
    assert survivor["expected"] == "kept"
    for r in rows.values():
        assert r["duplicate_group"] == "same_scene"
        assert sorted(json.loads(r["boxes"]), key=lambda b: b[1:]) == sorted(
            ([b[0], *map(float, b[1:])] for b in parsed[r["source"]]), key=lambda b: b[1:])
        if r is not survivor:
            assert (r["expected"], r["expected_stage"], r["shared_key"]) == (
                "duplicate", "dedup", survivor["key"])
            assert r["expected_reason"] == ("sha256" if r["source"] in ("dota", "coco")
                                            else "phash")


def test_truth_boxes_are_the_annotation_files_boxes(world, truth):
    """Every kept detection row: its truth boxes are its file's boxes, clipped."""
    names = Path(_root(world, "yolo"), "classes.txt").read_text().split("\n")[:-1]
    coco = parse_coco(os.path.join(_root(world, "coco"), "annotations/instances_train.json"))
    checked = 0
    for r in truth:
        if r["expected"] != "kept" or r["format"] not in rc.LABELS:
            continue
        ann = os.path.join(_root(world, r["source"]), r["annotation"])
        w, h = r["width"], r["height"]
        if r["format"] == "dota":
            got = parse_dota(ann)
        elif r["format"] == "voc":
            got = parse_voc(ann)
        elif r["format"] == "coco":
            got = coco[os.path.basename(r["image"])]
        else:
            got = parse_yolo(ann, names, w, h)
        clipped = [[b[0], max(0, b[1]), max(0, b[2]), min(w, b[3]), min(h, b[4])] for b in got]
        clipped = [[b[0], *(round(x, 6) for x in b[1:])] for b in clipped
                   if b[3] > b[1] and b[4] > b[2]]
        assert clipped == [[b[0], *(round(x, 6) for x in b[1:])]
                           for b in json.loads(r["boxes"])], r["source_id"]
        assert len(got) - len(clipped) == r["dropped_objects"]
        checked += 1
    assert checked >= 16


def test_masks_hold_table_values_and_their_boxes(world, truth):
    rows = [r for r in truth if r["source"] in ("loveda", "potsdam") and not r["planted"]]
    assert len(rows) >= 4
    colours = {tuple(c) for c in (*rc.POTSDAM_TABLE.values(), rc.POTSDAM_NODATA)}
    for r in rows:
        mask = Image.open(os.path.join(_root(world, r["source"]), r["annotation"]))
        assert mask.size == (r["width"], r["height"])
        arr = np.asarray(mask)
        if r["source"] == "loveda":
            assert mask.mode == "L" and set(np.unique(arr)) <= set(rc.LOVEDA_TABLE)
        else:
            assert mask.mode == "RGB"
            assert {tuple(c) for c in np.unique(arr.reshape(-1, 3), axis=0)} <= colours
            assert (arr == 0).all(axis=2).any()  # black boundary lines
        boxes = json.loads(r["boxes"])
        assert boxes
        for label, x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
            if r["source"] == "loveda":
                k = {v: k for k, v in rc.LOVEDA_TABLE.items()}[label]
                assert k in rc.LOVEDA_BOXED and (arr[int(y0):int(y1), int(x0):int(x1)] == k).any()
            else:
                assert label in rc.POTSDAM_BOXED
                region = arr[int(y0):int(y1), int(x0):int(x1)].reshape(-1, 3)
                assert (region == rc.POTSDAM_TABLE[label]).all(axis=1).any()


def test_clean_pictures_are_far_from_every_other_picture(world, truth):
    from pipelines.stages.dedup import distance

    pool = rc._world_pool(world)  # PUB11, local and RS3 pictures only
    assert pool.pool.hashes
    intended = {"same_scene", "yolo_benchmark_copy", "large_scene"}
    seen: list[tuple[str, int, list[int]]] = []
    for r in truth:
        if not r["image"] or r["planted"] in intended:
            continue
        p = os.path.join(world, r["image"])
        if not os.path.isfile(p):
            continue
        h, crops = rc._decoded_hashes(Path(p).read_bytes())
        assert pool.min_distance(h, crops) >= rc.MIN_PHASH_DISTANCE, r["image"]
        for other, h2, c2 in seen:
            assert distance(h, crops, h2, c2) >= rc.MIN_PHASH_DISTANCE, (r["image"], other)
        seen.append((r["image"], h, crops))
    assert len(seen) > 40


# ----------------------------------------------------------------------------- RemoteCount


def _detection_specs(world: str) -> list[str]:
    return [f"{n}={f}:{os.path.join(world, 'remoteclip', n)}"
            for n, f in rc.FORMATS.items() if f in ("dota", "voc", "coco", "yolo")]


@pytest.fixture(scope="module")
def remotecount(world, tmp_path_factory):
    from pipelines.remotecount import build_remotecount

    out = str(tmp_path_factory.mktemp("remotecount"))
    summary = build_remotecount(_detection_specs(world), out, seed=1)
    return out, summary


def test_remotecount_items_load_in_both_readers(remotecount):
    from pipelines.sources.benchmarks import benchmark_images, counting_items, guess_task
    from trainer.bench.datasets import load_counting
    from trainer.bench.protocols import swap_count

    out, summary = remotecount
    items = counting_items(os.path.join(out, "dataset_remotecount.json"))
    assert len(items) == summary["items"] >= 8
    assert all(1 <= it["count"] <= 10 and os.path.isfile(it["path"]) for it in items)
    data = load_counting(Path(out), "remotecount")  # the folder: one JSON in it
    assert len(data.paths) == len(items) and set(data.counts.tolist()) <= set(range(1, 11))
    assert guess_task(out) == "counting"
    assert len(benchmark_images(out)) == summary["images"]  # usable as a --decontam set
    assert len(os.listdir(os.path.join(out, "images"))) == summary["images"]
    for it in items:
        assert it["caption"].startswith("a satellite image of ")
        assert swap_count(it["caption"], it["count"], 7) != it["caption"]


def test_remotecount_counts_are_the_truth(world, truth, remotecount):
    from pipelines.stages.box_captions import load_classes

    out, _ = remotecount
    names = load_classes()
    rows = {(r["source"], r["source_id"]): r for r in truth}
    items = json.loads(Path(out, "dataset_remotecount.json").read_text())
    for it in items:
        boxes = json.loads(rows[(it["dataset"], it["source_id"])]["boxes"])
        assert it["count"] == sum(1 for b in boxes if names.normalise(b[0]) == it["category"])
        # no planted reject ever makes it in
        assert rows[(it["dataset"], it["source_id"])]["expected"] in ("kept", "duplicate")


def test_remotecount_manifest_lists_every_image_used(remotecount, truth):
    out, summary = remotecount
    items = json.loads(Path(out, "dataset_remotecount.json").read_text())
    manifest = json.loads(Path(out, "manifest.json").read_text())["images"]
    listed = {(m["dataset"], m["source_id"]) for m in manifest}
    assert {(it["dataset"], it["source_id"]) for it in items} <= listed
    used = [m for m in manifest if m["filename"]]
    assert len(used) == summary["images"] == len(os.listdir(os.path.join(out, "images")))
    for m in manifest:
        assert m["key"] == make_key(m["dataset"], m["source_id"])
    # the shared scene is counted once; its copies are listed for exclusion
    same = [m for m in manifest if m["source_id"] == "same_scene"]
    assert len(same) == 4 and sum(1 for m in same if m["filename"]) == 1
    kept = next(m for m in same if m["filename"])
    assert all(m["duplicate_of"] == kept["key"] for m in same if m is not kept)


def test_remotecount_is_deterministic_and_max_items_subsamples(world, remotecount, tmp_path):
    from pipelines.remotecount import build_remotecount

    out, _ = remotecount
    again = str(tmp_path / "again")
    build_remotecount(_detection_specs(world), again, seed=1)
    for name in ("dataset_remotecount.json", "manifest.json"):
        assert Path(out, name).read_bytes() == Path(again, name).read_bytes()
    small = str(tmp_path / "small")
    s = build_remotecount(_detection_specs(world), small, seed=1, max_items=5)
    items = json.loads(Path(small, "dataset_remotecount.json").read_text())
    assert s["items"] == len(items) == 5
    everything = json.loads(Path(out, "dataset_remotecount.json").read_text())
    assert all(it in everything for it in items)
    assert len(os.listdir(os.path.join(small, "images"))) == s["images"] <= 5


def test_remotecount_unit_rules():
    from pipelines.remotecount import build_remotecount, counting_caption, image_items
    from pipelines.stages.box_captions import load_classes

    names = load_classes()
    objs = ([["plane", 0, 0, 1, 1]] * 2 + [["airplane", 0, 0, 1, 1]]
            + [["small-vehicle", 0, 0, 1, 1]] * 11 + [["storage-tank", 0, 0, 1, 1]])
    items, over = image_items(objs, names.phrase)
    assert over == 1  # eleven small vehicles: no item
    assert items == [
        {"category": "airplane", "count": 3, "caption": "a satellite image of three airplanes"},
        {"category": "storage tank", "count": 1,
         "caption": "a satellite image of one storage tank"}]
    with pytest.raises(ValueError):
        counting_caption(11, "car", "cars")
    with pytest.raises(ValueError, match="detection"):
        build_remotecount(["potsdam=mask_rgb:/nonexistent"], "/tmp/never")


def test_remotecount_from_the_held_out_set_and_the_recipe_holdout(world, tmp_path):
    """``heldout.txt`` through the CLI; its manifest reads as the recipe's ``--holdout``."""
    from pipelines.remotecount import main

    spec = Path(world, rc.FOLDER, rc.HELDOUT_FILE).read_text().strip()
    out = str(tmp_path / "heldout")
    assert main(["--annotations", spec, "--out", out, "--seed", "0"]) == 0
    items = json.loads(Path(out, "dataset_remotecount.json").read_text())
    assert items and {it["dataset"] for it in items} == {"dota_val"}
    assert all(1 <= it["count"] <= 10 for it in items)
    recipe = pytest.importorskip("pipelines.recipes.remoteclip")
    held = recipe.read_holdout(os.path.join(out, "manifest.json"))
    assert {(it["dataset"], it["source_id"]) for it in items} <= held


def test_a_world_asked_for_more_scenes_than_the_renderer_can_draw_says_so(tmp_path):
    """Running out of distinct scenes (a large --n-remoteclip) is a size, not a bug: a named
    error saying which flag to lower, which `pipelines.demo build` prints as one line."""
    b = rc._Builder(str(tmp_path), 0)
    with pytest.raises(rc.OutOfDistinctScenes, match="smaller --n-remoteclip"):
        b.distinct(7, lambda rng: None)  # every draw refused


def test_demo_build_reports_running_out_of_scenes_in_one_line(tmp_path, monkeypatch):
    """`python -m pipelines.demo build --n-remoteclip <too many>` ends with one line naming
    the flag, not a traceback, and leaves no world.json behind (not a finished world)."""
    from pipelines.demo import __main__ as demo_main
    from pipelines.demo import local, pub11, rs3

    out = tmp_path / "world"

    def fake_pub11(out_dir, *a, **k):
        os.makedirs(out_dir, exist_ok=True)
        (Path(out_dir) / "world.json").write_text("{}")
        return {"rows": 0, "rows_by_source": {}, "expected": {}, "is_rs": 0, "planted": {},
                "image_files": 0, "probe": {}}

    def out_of_scenes(*a, **k):
        rc._Builder(str(tmp_path / "empty"), 0).distinct(3, lambda rng: None)

    monkeypatch.setattr(pub11, "build_pub11", fake_pub11)
    monkeypatch.setattr(local, "build_local", lambda *a, **k: {})
    monkeypatch.setattr(rs3, "build_rs3", lambda *a, **k: {})
    monkeypatch.setattr(rc, "build_remoteclip", out_of_scenes)
    with pytest.raises(SystemExit) as exc:
        demo_main.main(["build", "--out", str(out), "--n-remoteclip", "5000"])
    assert str(exc.value.code).startswith("demo: no RemoteCLIP demo scene")
    assert "--n-remoteclip" in str(exc.value.code)
    assert not (out / "world.json").exists()


def test_each_dataset_draws_its_scenes_from_a_range_of_its_own():
    """Large worlds: the j-th scene of one dataset never reuses another dataset's (or a planted
    row's) random stream, which only wasted draws; small worlds keep their old indices."""
    bases = (100, 400, 500, 600, 800, 900, 1000, 1200)  # DOTA .. RSICD, held-out DOTA
    planted = {150, 151, 152, 450, 451, 550, 650, 700, 850, 851} | set(range(300, 312))
    seen: dict[int, tuple[int, int]] = {}
    for base in bases:
        for j in range(3000):
            i = rc.scene_index(base, j)
            assert i not in planted, (base, j)
            assert i not in seen, (base, j, seen.get(i))
            seen[i] = (base, j)
    assert [rc.scene_index(100, j) for j in range(50)] == list(range(100, 150))
    with pytest.raises(ValueError):
        rc.scene_index(100, rc.SPREAD)
