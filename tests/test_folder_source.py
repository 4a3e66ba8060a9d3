"""The captioned-folder source and the ``local`` recipe: your own images with captions."""

from __future__ import annotations

import io
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines.records import REJECTS, make_key
from pipelines.sources.folder import ReadCaptionedFolder, row_to_record, safe_relpath


def _jpeg(path, seed=0, size=(96, 80)):
    """A textured picture (distinct seeds are far apart by pHash, unlike flat colours)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    coarse.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("rel, ok", [
    ("a/b.jpg", "a/b.jpg"), ("./a//b.jpg", "a/b.jpg"), ("a/../b.jpg", "b.jpg"),
    ("../b.jpg", None), ("a/../../b.jpg", None), ("/etc/passwd", None), ("C:\\x.jpg", None),
    ("gs://bucket/x.jpg", None), ("", None), (None, None), ("a\x00b", None),
])
def test_safe_relpath(rel, ok):
    assert safe_relpath(rel) == ok


def _rec(row, **kw):
    return row_to_record(row, root="/data/mine", subset="local", source="mine", order="0",
                         fallback_id="line 1", **kw)


def test_rows_become_records_with_every_caption_and_the_geo_fields():
    r = _rec({"file_name": "x/a.jpg", "caption": "an aerial  view", "captions": '["two", "three"]',
              "lat": "45.5", "lon": -3, "license": "cc0", "season": "winter"})
    assert (r["key"], r["source_id"], r["url"]) == (make_key("mine", "x/a.jpg"), "x/a.jpg",
                                                   "/data/mine/x/a.jpg")
    assert r["caption"] == "an aerial view" and r["captions"] == ["an aerial view", "two",
                                                                  "three"]
    assert (r["lat"], r["lon"], r["license"], r["caption_kind"]) == (45.5, -3.0, "cc0", "human")
    assert json.loads(r["extra"]) == {"season": "winter"}
    assert _rec({"file_name": "a.jpg", "text": "t", "id": 17})["source_id"] == "17"
    assert _rec({"path": "a.jpg", "title": "t", "caption_kind": "blip2"})["caption_kind"] == "blip2"


@pytest.mark.parametrize("row, reason", [
    ({"file_name": "../a.jpg", "caption": "x"}, "path_outside_folder"),
    ({"file_name": "/a.jpg", "caption": "x"}, "path_outside_folder"),
    ({"caption": "x"}, "malformed_row"),
    (["not", "an", "object"], "malformed_row"),
    ({"file_name": "a.jpg", "caption": "  "}, "empty_caption"),
    ({"file_name": "a.jpg", "caption": "x" * 5000}, "caption_too_long"),
    ({"file_name": "a.jpg", "caption": "x", "lat": 91, "lon": 0}, "bad_coordinates"),
    ({"file_name": "a.jpg", "caption": "x", "lat": "north", "lon": 0}, "bad_coordinates"),
    ({"file_name": "a.jpg", "caption": "x", "lat": 10}, "bad_coordinates"),
    ({"file_name": "a.jpg", "caption": "x", "caption_kind": "poem"}, "bad_caption_kind"),
])
def test_bad_rows_are_rejects_with_a_reason(row, reason):
    rec, rej = _rec(row)
    assert (rej.stage, rej.reason) == ("read", reason)
    assert rec["key"] and rec["source"] == "mine"


def _read(folder, **kw):
    with TestPipeline() as p:
        out = p | ReadCaptionedFolder(str(folder), **kw)
        return out


def test_txt_layout_and_tables_in_three_formats(tmp_path):
    # .txt beside each image: every line a caption; an image without its .txt is a reject
    txt = tmp_path / "txt"
    _jpeg(txt / "a" / "one.jpg")
    (txt / "a" / "one.txt").write_text("first caption\n\nsecond caption\n")
    _jpeg(txt / "two.png")
    with TestPipeline() as p:
        out = p | ReadCaptionedFolder(str(txt))
        assert_that(out["records"] | beam.Map(lambda r: (r["source_id"], r["captions"])),
                    equal_to([("a/one.jpg", ["first caption", "second caption"])]))
        assert_that(out[REJECTS] | beam.Map(lambda r: (r["source_id"], r["reason"])),
                    equal_to([("two.png", "missing_caption")]), label="rejects")
    # the same rows as CSV, JSON lines and parquet
    rows = [{"file_name": "a/one.jpg", "caption": "c1"}, {"file_name": "../up.jpg",
                                                          "caption": "c2"}]
    for name in ("metadata.csv", "metadata.jsonl", "captions.parquet"):
        d = tmp_path / name.split(".")[1]
        _jpeg(d / "a" / "one.jpg")
        if name.endswith(".csv"):
            (d / name).write_text("file_name,caption\na/one.jpg,c1\n../up.jpg,c2\n")
        elif name.endswith(".jsonl"):
            (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            pq.write_table(pa.Table.from_pylist(rows), d / name)
        with TestPipeline() as p:
            out = p | ReadCaptionedFolder(str(d))
            assert_that(out["records"] | beam.Map(lambda r: (r["source_id"], r["caption"])),
                        equal_to([("a/one.jpg", "c1")]))
            assert_that(out[REJECTS] | beam.Map(lambda r: r["reason"]),
                        equal_to(["path_outside_folder"]), label="rejects")


def test_a_missing_folder_or_an_unreadable_table_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ReadCaptionedFolder(str(tmp_path / "nope"))
    (tmp_path / "metadata.csv").write_bytes(b"file_name,caption\n\xff\xfe,bad\n")
    with pytest.raises(Exception, match="not UTF-8"), TestPipeline() as p:
        _ = p | ReadCaptionedFolder(str(tmp_path))


def test_local_recipe_end_to_end(tmp_path):
    """make build-local on a folder: shards of the good images, every line accounted for,
    reads confined to the folder (a symlink out of it is refused)."""
    from pipelines.recipes import local

    folder = tmp_path / "mine"
    for i in range(5):
        _jpeg(folder / "img" / f"{i}.jpg", seed=i)
    outside = tmp_path / "outside.jpg"
    _jpeg(outside, seed=99)
    os.symlink(outside, folder / "img" / "link.jpg")
    (folder / "img" / "broken.jpg").write_bytes(b"these bytes are not an image")
    lines = [{"file_name": f"img/{i}.jpg", "captions": [f"aerial view {i}", f"scene {i}"]}
             for i in range(5)]
    lines += [{"file_name": "img/link.jpg", "caption": "outside"},
              {"file_name": "img/broken.jpg", "caption": "broken"},
              {"file_name": "img/none.jpg", "caption": "missing"},
              {"file_name": "img/0.jpg", "caption": "the same image again"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    stats = local.run(["--local", str(folder), "--output", str(out), "--embed=false"])
    assert (stats["input"], stats["kept"], stats["rejected"], stats["duplicates"]) == (9, 5, 4, 0)
    reasons = sorted((r["source_id"], r["stage"], r["reason"])
                     for r in pq.read_table(str(out / "rejects")).to_pylist())
    assert reasons == [("img/0.jpg", "read", "duplicate_id"),
                       ("img/broken.jpg", "decode", "not_an_image"),
                       ("img/link.jpg", "fetch", "path_not_allowed"),
                       ("img/none.jpg", "fetch", "file_not_found")]
    samples = list(wds.WebDataset(str(out / "shards" / "local-00000.tar"),
                                  shardshuffle=False).decode())
    assert len(samples) == 5
    assert all(s["json"]["captions"] == [s["txt"], s["txt"].replace("aerial view", "scene")]
               for s in samples)
