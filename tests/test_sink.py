import glob
import io
import json
import os

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image

import schemas
from pipelines.sinks.shards import AccountingError, WriteBuild, build_stats


def jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def kept(i):
    return {
        "key": f"{i:020x}", "subset": "pub11", "source": "laion" if i % 2 else "coyo",
        "source_id": str(i), "url": f"http://x/{i}.jpg", "caption": f"aerial view {i}",
        "caption_kind": "alt_text", "captions": [f"aerial view {i}"], "width": 32,
        "height": 32, "sha256": "0" * 64, "phash": "0" * 16, "rs_score": 0.9,
        "tags": {"landuse": "forest"}, "_image": jpeg((i * 20 % 255, 80, 120)),
    }


REJ = [{"key": "f" * 20, "subset": "pub11", "source": "laion", "source_id": "99",
        "url": None, "caption": "x", "stage": "read", "reason": "missing_url"}]
DUP = [{"key": "e" * 20, "subset": "pub11", "source": "coyo", "source_id": "98",
        "url": "http://x/1.jpg", "stage": "url_dedup", "duplicate_of": f"{1:020x}",
        "method": "url", "similarity": 1.0}]


def build(out, rows, rejects=REJ, dups=DUP, inputs=None, per_shard=4):
    inputs = inputs if inputs is not None else rows + rejects + dups
    with TestPipeline() as p:
        pc = lambda name, xs: p | name >> beam.Create(xs, reshuffle=False)  # noqa: E731
        {
            "inputs": pc("I", [{"source": r["source"]} for r in inputs]),
            "kept": pc("K", rows),
            "rejects": pc("R", rejects),
            "duplicates": pc("D", dups),
        } | WriteBuild(str(out), "rs5m", "pub11", {"recipe": "rs5m"}, per_shard)


def test_layout_counts_and_webdataset_reads_it(tmp_path):
    rows = [kept(i) for i in range(10)]
    build(tmp_path, rows)
    shards = sorted(glob.glob(str(tmp_path / "shards" / "pub11-*.tar")))
    assert [os.path.basename(s) for s in shards] == [f"pub11-0000{i}.tar" for i in range(3)]
    assert not glob.glob(str(tmp_path / "**" / "*.incomplete*"), recursive=True)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["input"], stats["kept"], stats["rejected"], stats["duplicates"]) == (12, 10, 1, 1)
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == 10 and sorted(sizes) == [os.path.basename(s) for s in shards]
    seen = []
    for sample in wds.WebDataset(shards, shardshuffle=False).decode("pil"):
        assert sample["jpg"].size == (32, 32)
        meta = sample["json"]
        assert meta["key"] == sample["__key__"] and sample["txt"] == meta["caption"]
        assert meta["tags"] == {"landuse": "forest"}
        seen.append(sample["__key__"])
    assert sorted(seen) == sorted(r["key"] for r in rows)
    for shard in shards:  # the index mirrors each shard row for row, keys sorted
        index = pq.read_table(shard.replace("shards", "index").replace(".tar", ".parquet"))
        schemas.check_version(index.schema, schemas.SAMPLE_SCHEMA)
        keys = index.column("key").to_pylist()
        assert keys == sorted(keys) and len(keys) == sizes[os.path.basename(shard)]
        tar_keys = [s["__key__"] for s in wds.WebDataset(shard, shardshuffle=False)]
        assert tar_keys == keys
    rej = pq.read_table(glob.glob(str(tmp_path / "rejects" / "*.parquet"))[0])
    assert rej.column("reason").to_pylist() == ["missing_url"]
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == list(sizes)


def test_same_rows_in_any_order_give_identical_bytes(tmp_path):
    rows = [kept(i) for i in range(9)]
    build(tmp_path / "a", rows)
    build(tmp_path / "b", list(reversed(rows)))
    files_a = sorted(glob.glob(str(tmp_path / "a" / "**" / "*.*"), recursive=True))
    assert len(files_a) > 5
    for fa in files_a:
        fb = fa.replace(str(tmp_path / "a"), str(tmp_path / "b"))
        assert open(fa, "rb").read() == open(fb, "rb").read(), fa


def test_broken_accounting_fails_the_job(tmp_path):
    rows = [kept(i) for i in range(3)]
    with pytest.raises(Exception, match="accounting invariant broken"):
        build(tmp_path, rows, inputs=rows + REJ + DUP + [{"source": "laion"}])
    assert not (tmp_path / "stats.json").exists()


def test_build_stats_checks_per_source():
    with pytest.raises(AccountingError, match="coyo"):
        build_stats(recipe="r", subset="s", input_by_source={"laion": 1, "coyo": 1},
                    kept={"laion": 2}, rejected={}, duplicates={}, shards=1)


def test_shards_must_hold_what_was_kept(tmp_path):
    """A runner that loses elements inside the shard GroupByKey must fail the build."""
    wb = WriteBuild(str(tmp_path), "rs5m", "pub11", {})
    with pytest.raises(AccountingError, match="shards hold 1 samples but 2 were kept"):
        wb._finish(None, inputs=[("laion", 2)], kept=[("laion", 2)], rejected=[], dups=[],
                   shards=[("pub11-00000.tar", 1)], files=[])
    assert not (tmp_path / "stats.json").exists()


def test_embeddings_must_hold_what_was_kept(tmp_path):
    """stats.json waits for the embeddings folder and checks its row count."""
    wb = WriteBuild(str(tmp_path), "rs5m", "pub11", {})
    args = {"inputs": [("laion", 2)], "kept": [("laion", 2)], "rejected": [], "dups": [],
            "shards": [("pub11-00000.tar", 2)], "files": []}
    with pytest.raises(AccountingError, match="embeddings folder holds 1 rows but 2"):
        wb._finish(None, **args, embeddings=[(0, 1)])
    assert not (tmp_path / "stats.json").exists()
    wb._finish(None, **args, embeddings=[(0, 1), (1, 1)])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["embedding_parts"] == 2 and (tmp_path / "stats.json").exists()
