"""End to end: the RemoteCLIP recipe on a small demo world (every annotation format, both mask
styles, a caption set, a large scene, planted bad annotations and a benchmark copy).

One world and one DirectRunner build are shared by the module; the tests then check the
build's promises: accounting, the ground truth, captions true of their images, leakage
control, the counting benchmark read by the harness, determinism and translation.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.demo import scoring
from pipelines.demo.recipes import recipe_args
from pipelines.demo.remoteclip import build_remoteclip
from pipelines.demo.tiny_models import build_tiny_clip
from pipelines.recipes import remoteclip
from pipelines.records import stable_hash

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rcworld")
    build_remoteclip(str(root), seed=3, n=8)
    build_tiny_clip(str(root / "models" / "tiny-clip"), seed=3)
    return root


def run_build(root, out, *extra):
    return remoteclip.run([*recipe_args(str(root), "remoteclip"), "--output", str(out),
                           "--samples_per_shard", "20", *extra])


@pytest.fixture(scope="module")
def build(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("rcout")
    return out, run_build(world, out)


def _truth(world):
    return pq.read_table(str(world / "remoteclip_truth.parquet")).to_pylist()


def _index(out):
    return pq.read_table(str(out / "index")).to_pylist()


def test_accounting_and_every_row_where_the_ground_truth_says(world, build):
    out, stats = build
    assert stats["subsets"] == ["remoteclip"]
    assert stats["input"] == stats["kept"] + stats["rejected"] + stats["duplicates"]
    rows = scoring.outcomes(str(out), str(world))
    assert rows and all(r["outcome"] is not None for r in rows), "a row vanished"
    bad = scoring.mismatches(rows)
    assert not bad, scoring.report(str(out), str(world))
    planted = {r["planted"] for r in rows if r["planted"]}
    assert {"large_scene", "same_scene", "yolo_benchmark_copy", "potsdam_unknown_colour",
            "voc_not_xml", "yolo_unknown_class"} <= planted
    sources = {r["source"] for r in _index(out)}
    assert sources == {"dota", "voc", "coco", "yolo", "loveda", "potsdam", "rsicd"}


def test_every_caption_is_true_of_its_image(world, build):
    """Counts equal the ground truth's objects, and the captions are Box-to-Caption's over the
    truth's boxes mapped into the written image (positional sentences included); for the
    mask datasets the truth's boxes are the drawn shapes, so Mask-to-Box is checked too."""
    from pipelines.stages.box_captions import box_to_captions, load_classes, written_boxes

    out, _ = build
    names = load_classes()
    truth = {(t["source"], t["source_id"]): t for t in _truth(world)}
    checked, kinds = 0, set()
    for r in _index(out):
        if r["caption_kind"] not in ("box2caption", "mask2box") or "@" in r["source_id"]:
            continue  # (tiles: the large scene's truth is per scene)
        t = truth[(r["source"], r["source_id"])]
        objects = json.loads(t["boxes"])
        want = Counter(names.normalise(o[0]) for o in objects)
        assert Counter(b["label"] for b in r["boxes"]) == want, r["source_id"]
        mapped = written_boxes(objects, (r["original_width"], r["original_height"]),
                               (r["width"], r["height"]), "border")
        expected = box_to_captions(mapped, (r["width"], r["height"]),
                                   np.random.default_rng(stable_hash(r["key"])))
        assert r["captions"] == expected and r["caption"] == expected[0], r["source_id"]
        checked += 1
        kinds.add(r["caption_kind"])
    assert checked >= 10 and kinds == {"box2caption", "mask2box"}


def test_the_same_scene_in_four_formats_gives_the_same_boxes_and_captions(world):
    from pipelines.sources.annotations import list_spec, parse_spec, read_item
    from pipelines.stages.box_captions import box_to_captions, load_classes

    names = load_classes()
    same = [t for t in _truth(world) if t["planted"] == "same_scene"]
    assert sorted(t["source"] for t in same) == ["coco", "dota", "voc", "yolo"]
    specs = {s.split("=", 1)[0]: s for s in
             (world / "remoteclip" / "annotations.txt").read_text().split()}
    got = {}
    for t in same:
        spec = parse_spec(specs[t["source"]])
        item = next(i for i in list_spec(spec, 2**30)
                    if t["source_id"] in json.dumps(i, default=str))
        rec = next(x for x in read_item(item, subset="remoteclip", max_bytes=2**30, tile=None,
                                        tile_overlap=0.2, tile_max_pixels=4 * 10**8,
                                        counters=None) if isinstance(x, dict))
        boxes = [[names.normalise(o[0]), *o[1:5]] for o in rec["_objects"]]
        got[t["source"]] = (boxes, box_to_captions(boxes, rec["_image_size"],
                                                   np.random.default_rng(0)))
    first = got["dota"]
    for fmt, (boxes, captions) in got.items():
        assert np.allclose(np.array([b[1:] for b in boxes]),
                           np.array([b[1:] for b in first[0]]), atol=1e-6), fmt
        assert [b[0] for b in boxes] == [b[0] for b in first[0]] and captions == first[1], fmt


def test_a_test_split_image_among_the_sources_is_removed_and_reported(world, build, capsys):
    out, _ = build
    rejects = [r for r in pq.read_table(str(out / "rejects")).to_pylist()
               if r["stage"] == "decontam"]
    assert [(r["source"], r["reason"]) for r in rejects] == [("yolo", "benchmark_overlap")]
    assert rejects[0]["detail"].startswith("rsicd_test: ")
    from pipelines.stages.decontam import removed_by_source

    assert removed_by_source(str(out)) == [("remoteclip", "yolo", "rsicd_test", 1)]
    # the caption set's own test images are never read as training samples
    assert not any(r["source"] == "rsicd" and r["source_id"].startswith("test")
                   for r in _index(out))


def test_large_scenes_are_cut_into_tiles_with_their_boxes(world, build):
    out, _ = build
    tiles = [r for r in _index(out) if "@" in r["source_id"]]
    assert len(tiles) >= 4
    for r in tiles:
        assert r["boxes"] and all(0 <= b["x0"] < b["x1"] <= r["width"] and
                                  0 <= b["y0"] < b["y1"] <= r["height"] for b in r["boxes"])


def test_remotecount_is_read_and_scored_by_the_bench(world, tmp_path):
    from pipelines.remotecount import build_remotecount
    from trainer.bench.__main__ import main as bench_main

    spec = (world / "remoteclip" / "heldout.txt").read_text().split()
    summary = build_remotecount(spec, str(tmp_path / "rc"), seed=0)
    assert summary["items"] > 0
    manifest = json.loads((tmp_path / "rc" / "manifest.json").read_text())
    held = remoteclip.read_holdout(str(tmp_path / "rc" / "manifest.json"))
    assert len(held) == len(manifest["images"]) > 0
    rc = bench_main(["--model", "RS-Tiny-ViT", "--pretrained",
                     str(world / "models" / "tiny-clip" / "open_clip_model.safetensors"),
                     "--name", "tiny", "--datasets", f"remotecount={tmp_path / 'rc'}",
                     "--output", str(tmp_path / "bench"), "--device", "cpu"])
    assert rc == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())["results"]
    top = {r["metric"]: r["value"] for r in results if r["protocol"] == "counting"}
    assert top["top10"] == 100.0 and 0 <= top["top1"] <= 100


def test_a_holdout_manifest_keeps_its_images_out(world, build, tmp_path):
    """Images a counting benchmark used are rejected (``holdout``/``held_out``), counted."""
    out, stats = build
    kept = sorted(_index(out), key=lambda r: r["key"])[:2]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"images": [
        {"dataset": r["source"], "source_id": r["source_id"].split("@")[0]} for r in kept]}))
    again = run_build(world, tmp_path / "held", "--holdout", str(manifest))
    rejects = [r for r in pq.read_table(str(tmp_path / "held" / "rejects")).to_pylist()
               if r["stage"] == "holdout"]
    assert {r["source_id"].split("@")[0] for r in rejects} == {
        r["source_id"].split("@")[0] for r in kept}
    assert all(r["reason"] == "held_out" for r in rejects)
    assert again["input"] == stats["input"]
    assert again["input"] == again["kept"] + again["rejected"] + again["duplicates"]


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _files(folder):
    return sorted(glob.glob(os.path.join(folder, "**", "*.*"), recursive=True))


def test_second_run_gives_byte_identical_shards(world, build, tmp_path):
    out, _ = build
    again = tmp_path / "again"
    run_build(world, again)
    for sub in ("shards", "index", "rejects", "duplicates"):
        a, b = _files(str(out / sub)), _files(str(again / sub))
        assert [os.path.relpath(f, out) for f in a] == [os.path.relpath(f, again) for f in b]
        for fa, fb in zip(a, b, strict=True):
            assert _read(fa) == _read(fb), fa


def test_dataflow_translation_dry_run(world):
    names = remoteclip.run([*recipe_args(str(world), "remoteclip"), "--runner=DataflowRunner",
                            "--dry_run=True", "--project=rs-corpus-test",
                            "--region=us-central1", "--temp_location=gs://rs-corpus-test/tmp",
                            "--output", "gs://rs-corpus-test/out"])
    for stage in ("Read[remoteclip]", "UniqueIds[remoteclip]", "Decode[remoteclip]",
                  "Dedup[remoteclip]", "MaskToBox[remoteclip]", "BoxToCaption[remoteclip]",
                  "Tail/Embed[tail]", "Tail/Decontaminate[tail]", "Subset[remoteclip]/Shards"):
        assert any(stage in n for n in names), stage


def test_help_lists_the_recipe_s_flags_and_beams():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipelines.recipes.remoteclip", "--help"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--annotations", "--tile", "--tile_overlap", "--mask_min_area", "--holdout",
                 "--decontam_hamming", "--output", "--runner"):
        assert flag in proc.stdout, flag
