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
from pipelines.records import stable_hash
from pipelines.sinks.shards import (
    AccountingError,
    WriteBuild,
    WriteSubset,
    build_stats,
    clear_previous,
    num_files,
    shard_rows,
    spills,
    write_tar,
)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def kept(i, subset="pub11"):
    return {
        "key": f"{i:020x}", "subset": subset, "source": "laion" if i % 2 else "coyo",
        "source_id": str(i), "url": f"http://x/{i}.jpg", "caption": f"aerial view {i}",
        "caption_kind": "web", "captions": [f"aerial view {i}"], "width": 32,
        "height": 32, "sha256": "0" * 64, "phash": "0" * 16, "rs_score": 0.9,
        "tags": {"landuse": "forest"}, "_image": jpeg((i * 20 % 255, 80, 120)),
    }


REJ = [{"key": "f" * 20, "subset": "pub11", "source": "laion", "source_id": "99",
        "url": None, "caption": "x", "stage": "read", "reason": "missing_url"}]
DUP = [{"key": "e" * 20, "subset": "pub11", "source": "coyo", "source_id": "98",
        "url": "http://x/1.jpg", "stage": "url_dedup", "duplicate_of": f"{1:020x}",
        "method": "url", "similarity": 1.0}]


def build(out, rows, rejects=REJ, dups=DUP, inputs=None, per_shard=4, subsets=("pub11",)):
    inputs = inputs if inputs is not None else rows + rejects + dups
    with TestPipeline() as p:
        pc = lambda name, xs: p | name >> beam.Create(xs, reshuffle=False)
        {
            "inputs": pc("I", [{"source": r["source"], "subset": r["subset"]} for r in inputs]),
            "kept": pc("K", rows),
            "rejects": pc("R", rejects),
            "duplicates": pc("D", dups),
        } | WriteBuild(str(out), "rs5m", list(subsets), {"recipe": "rs5m"}, per_shard)


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
        assert _read(fa) == _read(fb), fa


def test_a_local_build_spills_pictures_and_leaves_no_spill(tmp_path, monkeypatch):
    """A local build passes picture references through the shard GroupByKey (each picture is
    written to a spill file once, read back once by its shard writer); its shards are the
    bytes of the same rows tarred from memory, and the spill folder is gone afterwards."""
    from pipelines.sinks import shards

    reads = []
    real = shards._SpillReader.__call__

    def counting(self, row):
        reads.append(shards.SPILL_REF in row)
        return real(self, row)

    monkeypatch.setattr(shards._SpillReader, "__call__", counting)
    rows = [kept(i) for i in range(9)]
    build(tmp_path, rows, per_shard=100)  # one shard: compare it with the rows tarred directly
    assert reads == [True] * 9
    expected = io.BytesIO()
    write_tar(expected, *shard_rows(dict(r, shard="pub11-00000.tar") for r in rows))
    assert _read(tmp_path / "shards" / "pub11-00000.tar") == expected.getvalue()
    assert not (tmp_path / "_spill").exists()
    assert spills(str(tmp_path)) and spills("out/rs5m")
    assert not spills("gs://bucket/rs5m") and not spills("s3://bucket/rs5m")


@pytest.mark.parametrize("names", [
    ["0123456789abcdef0123.jpg", "0123456789abcdef0123.txt", "0123456789abcdef0123.json"],
    ["a" * 99, "b" * 100, "d" * 60 + "/" + "c" * 60, "é-non-ascii.txt", "x.jpg"],
])
def test_the_tar_writer_writes_what_tarfile_writes(names):
    """The sink's own USTAR writer (three members a sample, without tarfile's per-field
    machinery) gives tarfile's bytes, empty, short and block-sized members alike."""
    import random
    import tarfile

    from pipelines.sinks.shards import _tar_info, _TarWriter

    rng = random.Random(len(names))
    members = [(n, rng.randbytes(size)) for n, size in zip(names, [0, 1, 511, 512, 1025])]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
    ours = io.BytesIO()
    writer = _TarWriter(ours)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    assert ours.getvalue() == expected.getvalue()
    with tarfile.open(fileobj=io.BytesIO(ours.getvalue())) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members


def test_the_tally_counts_and_lists_across_merged_bundles():
    """The sink's one combine gives per-kind counts and lists, however the runner splits and
    merges its inputs."""
    from pipelines.sinks.shards import _Tally

    items = [("inputs", "laion"), ("inputs", "coyo"), ("inputs", "laion"), ("kept", "laion"),
             ("rejected", ("laion", "fetch", "http_404")), ("dups", ("coyo", "dedup", "phash")),
             ("shards", ("pub11-00000.tar", 1, 0)), ("files", ("pub11-00000.parquet", 1)),
             ("rejected", ("laion", "fetch", "http_404"))]
    fn = _Tally()
    whole = fn.extract_output(fn.add_inputs(fn.create_accumulator(), items))
    parts = [fn.add_inputs(fn.create_accumulator(), items[i::3]) for i in range(3)]
    merged = fn.extract_output(fn.merge_accumulators([fn.create_accumulator(), *parts]))
    expected = {"inputs": {"laion": 2, "coyo": 1}, "kept": {"laion": 1},
                "rejected": {("laion", "fetch", "http_404"): 2},
                "dups": {("coyo", "dedup", "phash"): 1},
                "shards": [("pub11-00000.tar", 1, 0)], "files": [("pub11-00000.parquet", 1)]}
    assert whole == expected and merged == expected


def test_clear_previous_removes_a_killed_builds_spill(tmp_path):
    dead = tmp_path / "_spill" / "pub11"
    dead.mkdir(parents=True)
    (dead / "0123.bin").write_bytes(b"x" * 10)
    clear_previous(str(tmp_path), ["pub11"])
    assert not (tmp_path / "_spill").exists()


def test_broken_accounting_fails_the_job(tmp_path):
    rows = [kept(i) for i in range(3)]
    with pytest.raises(Exception, match="accounting invariant broken"):
        build(tmp_path, rows, inputs=rows + REJ + DUP + [{"source": "laion", "subset": "pub11"}])
    assert not (tmp_path / "stats.json").exists()


def test_build_stats_checks_per_source():
    with pytest.raises(AccountingError, match="coyo"):
        build_stats(recipe="r", subset="s", input_by_source={"laion": 1, "coyo": 1},
                    kept={"laion": 2}, rejected={}, duplicates={}, shards=1)


def test_shards_must_hold_what_was_kept(tmp_path):
    """A runner that loses elements inside the shard GroupByKey must fail the build."""
    ws = WriteSubset(str(tmp_path), "rs5m", "pub11", {})
    with pytest.raises(AccountingError, match="shards hold 1 samples but 2 were kept"):
        ws._finish({"inputs": {"laion": 2}, "kept": {"laion": 2}, "rejected": {}, "dups": {},
                    "shards": [("pub11-00000.tar", 1, 0)], "files": []})
    assert not (tmp_path / "subsets" / "pub11" / "stats.json").exists()


def test_embeddings_must_hold_what_was_kept(tmp_path):
    """The subset's stats.json waits for the embeddings parts and checks their row count."""
    ws = WriteSubset(str(tmp_path), "rs5m", "pub11", {}, embeddings_dir=str(tmp_path / "e"))
    args = {"inputs": {"laion": 2}, "kept": {"laion": 2}, "rejected": {}, "dups": {},
            "files": []}
    with pytest.raises(AccountingError, match="embeddings folder holds 1 rows but 2"):
        ws._finish({**args, "shards": [("pub11-00000.tar", 2, 1)]})
    assert not (tmp_path / "subsets" / "pub11" / "stats.json").exists()
    ws._finish({**args, "shards": [("pub11-00000.tar", 1, 1), ("pub11-00001.tar", 1, 1)]})
    manifest = json.loads((tmp_path / "subsets" / "pub11" / "manifest.json").read_text())
    assert manifest["embedding_parts"] == 2
    assert (tmp_path / "subsets" / "pub11" / "stats.json").exists()


def test_shard_numbers_are_contiguous(tmp_path):
    """Rows hashed into buckets 0 and 2 of 3 still make shards 00000 and 00001: a brace range
    {00000..N} names every shard and nothing else."""
    n = num_files(9, 4)
    rows = [kept(i) for i in range(200) if stable_hash(f"{i:020x}") % n != 1][:9]
    assert len(rows) == 9 and {stable_hash(r["key"]) % n for r in rows} == {0, 2}
    build(tmp_path, rows, inputs=rows + REJ + DUP)
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "shards" / "*.tar")))
    assert names == ["pub11-00000.tar", "pub11-00001.tar"]
    assert sorted(json.loads((tmp_path / "sizes.json").read_text())) == names
    index = pq.read_table(str(tmp_path / "index")).column("shard").to_pylist()
    assert sorted(set(index)) == names


def test_a_repeated_key_fails_the_build(tmp_path):
    """Two kept rows with one key would give a tar webdataset refuses to read."""
    rows = [kept(i) for i in range(3)]
    twin = dict(kept(1), source_id="another-row", url="http://x/other.jpg")
    with pytest.raises(Exception, match="is kept twice"):
        build(tmp_path, rows + [twin], inputs=rows + [twin] + REJ + DUP)
    assert not (tmp_path / "stats.json").exists()


def test_a_row_of_another_subset_fails_the_build(tmp_path):
    rows = [kept(i) for i in range(3)] + [kept(7, subset="rs3")]
    with pytest.raises(Exception, match="subset 'rs3' reached a sink that writes only"):
        build(tmp_path, rows)


def _two_subsets(out, n_local=5):
    a = [kept(i) for i in range(6)]
    b = [kept(100 + i, subset="local") for i in range(n_local)]
    rej_b = [dict(REJ[0], key="d" * 20, subset="local", source="mine")]
    build(out, a + b, rejects=REJ + rej_b, dups=DUP, subsets=("pub11", "local"))
    return a, b, rej_b


def test_two_subsets_write_their_own_files_and_merged_documents(tmp_path):
    a, b, _ = _two_subsets(tmp_path)
    assert glob.glob(str(tmp_path / "shards" / "local-*.tar"))
    assert glob.glob(str(tmp_path / "rejects" / "local-*.parquet"))
    stats = json.loads((tmp_path / "stats.json").read_text())
    schemas.check_doc_version(stats)
    assert stats["subsets"] == ["local", "pub11"] and stats["subset"] is None
    assert (stats["input"], stats["kept"]) == (len(a + b) + 3, len(a + b))
    per = {s["subset"]: s for s in stats["by_subset"]}
    assert (per["local"]["input"], per["local"]["kept"], per["local"]["rejected"]) == (6, 5, 1)
    assert (per["pub11"]["input"], per["pub11"]["kept"]) == (8, 6)
    for s, row in per.items():
        sub = json.loads((tmp_path / "subsets" / s / "stats.json").read_text())
        assert sub["input"] == row["input"] == sub["kept"] + sub["rejected"] + sub["duplicates"]
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(a + b)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["subsets"]) == ["local", "pub11"] and manifest["shards"] == list(sizes)


def test_rebuilding_one_subset_keeps_the_other_and_the_merge_right(tmp_path):
    a, _, _ = _two_subsets(tmp_path)
    pub11_files = {p: _read(p)
                   for p in glob.glob(str(tmp_path / "*" / "pub11-*"))}
    # the local subset again, alone and smaller: the earlier local files must go, pub11 stay
    removed = clear_previous(str(tmp_path), ["local"])
    assert any("local-" in p for p in removed) and not (tmp_path / "stats.json").exists()
    assert not (tmp_path / "shards" / "sizes.json").exists()
    smaller = [kept(100 + i, subset="local") for i in range(2)]
    build(tmp_path, smaller, rejects=[], dups=[], subsets=("local",))
    for p, data in pub11_files.items():
        assert _read(p) == data, p
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["subsets"] == ["local", "pub11"]
    assert stats["kept"] == len(a) + 2 and stats["input"] == len(a) + 2 + 2
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    local = [k for k in sizes if k.startswith("local-")]
    assert sum(sizes[k] for k in local) == 2
    assert sorted(local) == sorted(os.path.basename(p) for p in
                                   glob.glob(str(tmp_path / "shards" / "local-*.tar")))
