"""End to end: the RS5M recipe (PUB11, RS3 and the captioned folder) on a small demo world
served on 127.0.0.1.

One world (with its tiny CLIP, RS probe and briefly trained tiny BLIP-2) and one DirectRunner
build of the three subsets are shared by the module (they are the slow part); the tests then
check the build's promises one by one.
"""

import glob
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipelines.demo import scoring
from pipelines.demo.local import build_local
from pipelines.demo.pub11 import build_pub11
from pipelines.demo.recipes import recipe_args
from pipelines.demo.rs3 import build_rs3
from pipelines.demo.server import DemoServer
from pipelines.demo.tiny_models import build_tiny_models
from pipelines.recipes import rs5m

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    with DemoServer(str(root / "www")) as srv:
        build_pub11(str(root), base_url=srv.base_url, seed=3, n_rs=60, n_non_rs=30)
        build_local(str(root), seed=3, n=20)
        build_rs3(str(root), seed=3, n_fmow=8, n_ben=8, n_millionaid=8)
        build_tiny_models(str(root / "models"), seed=3, probe_data=str(root / "probe"))
        from pipelines.demo.tiny_blip2 import build_tiny_blip2

        build_tiny_blip2(str(root / "models" / "tiny-blip2"), seed=3, steps=250)
        yield root, srv


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run_build(world_root, out, *extra):
    return rs5m.run([*recipe_args(str(world_root)), "--output", str(out),
                     "--samples_per_shard", "40", *extra])


@pytest.fixture(scope="module")
def build(world, tmp_path_factory):
    root, _ = world
    out = tmp_path_factory.mktemp("out")
    stats = run_build(root, out)
    return out, stats


def _files(folder):
    return sorted(glob.glob(os.path.join(folder, "**", "*.*"), recursive=True))


def test_accounting_holds_per_subset_and_matches_the_input(world, build):
    root, _ = world
    out, stats = build
    n_pub11 = sum(pq.read_metadata(f).num_rows
                  for f in glob.glob(str(root / "pub11/*/*.parquet")))
    n_local = len((root / "local" / "metadata.jsonl").read_text().splitlines())
    n_rs3 = pq.read_metadata(str(root / "rs3_truth.parquet")).num_rows
    assert stats["subsets"] == ["local", "pub11", "rs3"]
    per = {s["subset"]: s for s in stats["by_subset"]}
    assert per["pub11"]["input"] == n_pub11 and per["local"]["input"] == n_local
    assert per["rs3"]["input"] == n_rs3
    assert stats["input"] == n_pub11 + n_local + n_rs3
    for doc in [stats, *per.values()]:
        assert doc["input"] == doc["kept"] + doc["rejected"] + doc["duplicates"]
    assert stats["kept"] > 0 and stats["rejected"] > 0 and stats["duplicates"] > 0
    assert json.loads((out / "stats.json").read_text()) == stats
    for s in ("local", "pub11", "rs3"):
        sub = json.loads((out / "subsets" / s / "stats.json").read_text())
        assert (sub["input"], sub["kept"]) == (per[s]["input"], per[s]["kept"])
    heads = json.loads((out / "manifest.json").read_text())["heads"]
    assert heads["pub11"]["stages"] == ["Read", "Keywords", "UniqueIds", "UrlDedup",
                                        "FetchDecode", "Dedup", "RSFilter"]
    assert heads["rs3"]["stages"] == ["Read", "UniqueIds", "Decode", "Dedup", "Georeference",
                                      "Caption", "RotationPick", "MetaCaption"]
    assert heads["local"]["priority"] < heads["rs3"]["priority"] < heads["pub11"]["priority"]


def test_every_row_lands_where_the_ground_truth_says(world, build):
    root, _ = world
    out, _ = build
    rows = scoring.outcomes(str(out), str(root))
    assert all(r["outcome"] is not None for r in rows), "a row vanished"
    bad = scoring.mismatches(rows)
    assert not bad, scoring.report(str(out), str(root))
    # every planted bad row is rejected with a reason that names it
    for r in rows:
        if r["planted"] and r["expected"] == "rejected":
            assert r["outcome"] == "rejected", r
            assert r["got_reason"], r
        if r["planted"] and r["expected"] == "duplicate":
            assert r["outcome"] == "duplicate", r


def test_an_image_in_both_subsets_is_kept_once_in_the_folder(world, build):
    """The folder's copy wins over the web's (kit.PRIORITY_OWN < PRIORITY_WEB)."""
    root, _ = world
    out, _ = build
    rows = scoring.outcomes(str(out), str(root))
    local = next(r for r in rows if r["planted"] == "shared_with_pub11")
    web = next(r for r in rows if r["subset"] == "pub11" and r["key"] == local["shared_key"])
    assert local["outcome"] == "kept"
    assert (web["outcome"], web["got_stage"], web["got_reason"]) == ("duplicate", "dedup",
                                                                     "sha256")
    dup = next(d for d in pq.read_table(str(out / "duplicates")).to_pylist()
               if d["key"] == web["key"])
    assert dup["subset"] == "pub11" and dup["duplicate_of"] == local["key"]


def test_rs_filter_removes_most_non_rs_keyword_hits(world, build):
    root, _ = world
    out, _ = build
    s = scoring.rs_filter_scores(scoring.outcomes(str(out), str(root)))
    assert s["tn"] + s["fp"] > 0, "the world must plant non-RS rows that pass the keywords"
    assert s["non_rs_rejected"] >= 0.8, s
    assert s["precision"] >= 0.9 and s["recall"] >= 0.8, s


def test_shards_are_read_by_webdataset(build):
    out, stats = build
    shards = sorted(glob.glob(str(out / "shards" / "*.tar")))
    assert len(shards) == stats["shards"] >= 3
    n = geo = 0
    kinds, n_captions = set(), []
    for sample in wds.WebDataset(shards, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        assert sample["jpg"].mode == "RGB" and max(sample["jpg"].size) == 256
        assert sample["txt"] == meta["caption"] == meta["captions"][0]
        kinds.add((meta["subset"], meta["caption_kind"]))
        if meta["subset"] == "pub11":
            assert 0.0 <= meta["rs_score"] <= 1.0
        elif meta["subset"] == "rs3":
            assert meta["caption"].endswith(meta["generated"][meta["generated_pick"]])
        else:  # the folder's rows: up to three captions each, half with coordinates
            assert meta["rs_score"] is None
            n_captions.append(len(meta["captions"]))
            geo += meta["lat"] is not None and -90 <= meta["lat"] <= 90
        n += 1
    assert n == stats["kept"]
    assert kinds == {("pub11", "web"), ("local", "human"), ("rs3", "meta+blip2"),
                     ("rs3", "blip2")}
    assert max(n_captions) == 3 and geo >= 5
    # shard numbers are contiguous per subset, so brace ranges name every shard
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    for subset in ("pub11", "local", "rs3"):
        names = sorted(k for k in sizes if k.startswith(subset + "-"))
        assert names == [f"{subset}-{i:05d}.tar" for i in range(len(names))]


def test_second_run_gives_byte_identical_shards_and_index(world, build, tmp_path):
    root, _ = world
    out, _ = build
    again = tmp_path / "again"
    run_build(root, again)
    for sub in ("shards", "index", "rejects", "duplicates"):
        a, b = _files(str(out / sub)), _files(str(again / sub))
        assert [os.path.relpath(f, out) for f in a] == [os.path.relpath(f, again) for f in b]
        for fa, fb in zip(a, b, strict=True):
            assert _read(fa) == _read(fb), fa


def test_stats_command_prints_a_stage_table_per_subset(build):
    out, stats = build
    proc = subprocess.run([sys.executable, "-m", "pipelines.stats", str(out)],
                          capture_output=True, text=True, check=True)
    assert "keyword hits" in proc.stdout and "non-RS" in proc.stdout
    assert "Subset pub11" in proc.stdout and "Subset local" in proc.stdout
    assert "Subset rs3" in proc.stdout
    per = {s["subset"]: s for s in stats["by_subset"]}
    totals = [line.split() for line in proc.stdout.splitlines() if line.startswith("TOTAL")]
    assert [(t[1], t[-1]) for t in totals] == [
        (str(per[s]["input"]), str(per[s]["kept"])) for s in stats["subsets"]]
    assert "CLIP tokens" in proc.stdout


DATAFLOW = ["--runner=DataflowRunner", "--dry_run=True", "--project=rs-corpus-test",
            "--region=us-central1", "--temp_location=gs://rs-corpus-test/tmp"]


def _has(names, *parts):
    return any(all(p in n for p in parts) for n in names)


def test_dataflow_translation_dry_run(world, tmp_path):
    root, _ = world
    names = rs5m.run([*recipe_args(str(root)), *DATAFLOW, "--output", "gs://rs-corpus-test/out"])
    # both heads, the shared tail and the sink's writers per subset are in the graph
    for stage in ("Read[pub11]", "Keywords[pub11]", "UniqueIds[pub11]", "UrlDedup[pub11]",
                  "FetchDecode[pub11]", "Dedup[pub11]", "RSFilter[pub11]",
                  "Read[local]", "UniqueIds[local]", "ReadDecode[local]",
                  "Read[rs3]", "Decode[rs3]", "Georeference[rs3]", "Caption[rs3]",
                  "RotationPick[rs3]", "MetaCaption[rs3]"):
        assert _has(names, stage), stage
    for stage in ("Tail/Dedup[tail]", "Tail/Embed[tail]"):
        assert _has(names, stage), stage
    assert not _has(names, "SemanticDedup") and not _has(names, "Decontaminate")
    for subset in ("pub11", "local", "rs3"):
        for writer in ("Shards", "Rejects", "Duplicates", "Finish"):
            assert _has(names, f"Subset[{subset}]/{writer}"), (subset, writer)
    assert _has(names, "Tail/Write/Merge")


def test_dataflow_translation_dry_run_with_every_new_stage(world, tmp_path):
    root, _ = world
    bench = tmp_path / "bench" / "c0"
    bench.mkdir(parents=True)
    src = min((root / "www" / "img").glob("*.jpg"))
    (bench / "x.jpg").write_bytes(src.read_bytes())
    names = rs5m.run([
        *recipe_args(str(root)), *DATAFLOW, "--output", "gs://rs-corpus-test/out",
        "--subsets", "pub11", "--semdedup=true", "--clip_top_percent=50", "--clip_threshold=-1",
        "--embeddings_dir=gs://rs-corpus-test/emb", f"--decontam=b={bench.parent}",
    ])
    for stage in ("Tail/ClipFilter[tail]", "Tail/Decontaminate[tail]",
                  "Tail/SemanticDedup[tail]", "Subset[pub11]/Shards"):
        assert _has(names, stage), stage
    assert not _has(names, "[local]")  # --subsets pub11: the folder is not read
    assert not _has(names, "[rs3]")
    assert not _has(names, "Tail/Dedup[tail]")  # one subset that dedups itself


def test_portable_runner_loopback_end_to_end(world, build, tmp_path):
    root, _ = world
    out, _ = build
    port = tmp_path / "portable"
    stats = run_build(root, port, "--runner=PortableRunner", "--job_endpoint=embed",
                      "--environment_type=LOOPBACK")
    for sub in ("shards", "index"):
        a, b = _files(str(out / sub)), _files(str(port / sub))
        assert len(a) == len(b) > 0
        for fa, fb in zip(a, b, strict=True):
            assert _read(fa) == _read(fb), fa
    assert stats["kept"] == json.loads((out / "stats.json").read_text())["kept"]


def test_rebuilding_one_subset_leaves_the_other_and_the_merged_documents_right(build,
                                                                               world, tmp_path):
    import shutil

    root, _ = world
    out, stats = build
    again = tmp_path / "again"
    shutil.copytree(out, again)
    pub11 = {f: _read(f) for f in _files(str(again)) if "pub11" in f or "rs3" in f}
    run_build(root, again, "--subsets", "local")
    for f, data in pub11.items():  # the other subset's files: untouched
        assert _read(f) == data, f
    for sub in ("shards", "index", "rejects"):  # the rebuilt subset: the same bytes again
        for f in glob.glob(str(out / sub / "local-*")):
            assert _read(f) == _read(str(again / sub / os.path.basename(f))), f
    assert json.loads((again / "stats.json").read_text()) == stats
    assert (json.loads((again / "sizes.json").read_text())
            == json.loads((out / "sizes.json").read_text()))


def test_help_lists_our_flags_and_beams():
    for recipe in ("rs5m", "local"):
        proc = subprocess.run([sys.executable, "-m", f"pipelines.recipes.{recipe}", "--help"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        for flag in ("--local", "--output", "--subsets", "--samples_per_shard", "--fetch_deadline",
                     "--allow_networks", "--runner", "--temp_location", "--direct_num_workers",
                     "--accelerator"):
            assert flag in proc.stdout, (recipe, flag)
        for flag in ("--input", "--fmow", "--bigearthnet", "--millionaid", "--captioner",
                     "--caption_candidates", "--caption_precision"):
            assert (flag in proc.stdout) == (recipe == "rs5m"), (recipe, flag)


def test_open_clip_train_trains_on_the_shards(world, build, tmp_path):
    root, _ = world
    out, stats = build
    shards = sorted(glob.glob(str(out / "shards" / "pub11-*.tar")))
    spec = "::".join(shards)
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "open_clip_train.main",
         "--train-data", spec, "--dataset-type", "webdataset",
         "--train-num-samples", str(stats["kept"]), "--batch-size", "8", "--epochs", "1",
         "--model", f"local-dir:{root / 'models' / 'tiny-clip'}", "--workers", "0",
         "--device", "cpu", "--lr", "1e-4", "--warmup", "1", "--log-every-n-steps", "1",
         "--logs", str(tmp_path / "logs"), "--name", "smoke", "--save-frequency", "1",
         "--report-to", ""],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "smoke" / "out.log").read_text()
    assert "Train Epoch: 0" in log and "Contrastive_loss" in log
    assert (tmp_path / "logs" / "smoke" / "checkpoints" / "epoch_1.pt").exists()


def test_embeddings_semantic_dedup_and_decontamination(world, build, tmp_path, capsys):
    """Issue 3 end to end: planted benchmark copies are rejected under their benchmark, the
    embeddings folder matches the shards row for row, and the accounting still holds."""
    import io
    import shutil

    from PIL import Image

    from pipelines.sinks.embeddings import load_embeddings

    root, _ = world
    out, first = build
    index = pq.read_table(str(out / "index")).to_pylist()
    picks = sorted((r for r in index if "/img/" in r["url"]), key=lambda r: r["key"])[:4]
    files = [root / "www" / "img" / r["url"].split("/img/")[-1] for r in picks]
    cls = tmp_path / "bench" / "scenes"
    for i, f in enumerate(files[:3]):
        (cls / f"class{i}").mkdir(parents=True)
    shutil.copy(files[0], cls / "class0" / "a.jpg")  # exact copy
    shutil.copy(files[1], cls / "class1" / "b.jpg")
    buf = io.BytesIO()  # an altered (re-encoded, resized) copy
    im = Image.open(files[2]).convert("RGB")
    im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(buf, "JPEG", quality=60)
    (cls / "class2" / "c.jpg").write_bytes(buf.getvalue())
    ret = tmp_path / "bench" / "captions"
    (ret / "images").mkdir(parents=True)
    shutil.copy(files[3], ret / "images" / "d.jpg")
    (ret / "dataset_caps.json").write_text(json.dumps(
        {"images": [{"filename": "d.jpg", "split": "test", "sentences": [{"raw": "x"}]}]}))

    b2 = tmp_path / "b2"
    capsys.readouterr()
    stats = run_build(root, b2, "--subsets", "pub11", "--semdedup=true",
                      "--write_embeddings=true",
                      "--decontam", f"scenes={cls}", "--decontam", f"caps={ret}")
    printed = capsys.readouterr().out
    assert stats["input"] == stats["kept"] + stats["rejected"] + stats["duplicates"]
    assert stats["input"] == next(s["input"] for s in first["by_subset"] if s["subset"] == "pub11")
    rejects = [r for r in pq.read_table(str(b2 / "rejects")).to_pylist()
               if r["stage"] == "decontam"]
    got = {r["key"]: r["detail"] for r in rejects}
    assert set(got) == {r["key"] for r in picks}, got
    assert got[picks[0]["key"]].startswith("scenes: class0/a.jpg (")
    assert got[picks[2]["key"]].startswith("scenes: class2/c.jpg (")
    assert got[picks[3]["key"]].startswith("caps: d.jpg (")
    assert all(r["reason"] == "benchmark_overlap" for r in rejects)
    assert "Decontamination" in printed and "scenes" in printed and "caps" in printed
    # every kept row has a clip_score; the embeddings folder is aligned with the shards
    index2 = []
    for f in sorted(glob.glob(str(b2 / "index" / "pub11-*.parquet"))):
        index2 += pq.read_table(f).to_pylist()
    assert len(index2) == stats["kept"] and all(r["clip_score"] is not None for r in index2)
    img, txt, meta = load_embeddings(str(b2 / "embeddings" / "pub11"))
    assert img.shape[0] == txt.shape[0] == meta.num_rows == stats["kept"]
    assert meta["key"].to_pylist() == [r["key"] for r in index2]
    assert meta["shard"].to_pylist() == [r["shard"] for r in index2]
    # stats.json/manifest.json were written after the embeddings parts, and count them
    parts = glob.glob(str(b2 / "embeddings" / "pub11" / "img_emb" / "*.npy"))
    manifest = json.loads((b2 / "subsets" / "pub11" / "manifest.json").read_text())
    assert manifest["embedding_parts"] == len(parts)
    dups = pq.read_table(str(b2 / "duplicates")).to_pylist()
    assert all(d["similarity"] >= 0.9998 - 1e-6 for d in dups if d["method"] == "semantic")


def _rs3_rows(out):
    return pq.read_table(str(out / "index"), filters=[("subset", "=", "rs3")]).to_pylist()


def test_rs3_captions_fit_the_context_and_keep_the_whole_generated_caption(world, build):
    import numpy as np

    from pipelines.models.open_clip_loader import load_tokenizer

    root, _ = world
    out, _ = build
    rows = _rs3_rows(out)
    assert len(rows) >= 10
    tokenizer, context = load_tokenizer(str(root / "models" / "tiny-clip"))
    for r in rows:
        gen = r["generated"]
        assert 1 <= len(gen) <= 5 and len(r["generated_scores"]) == len(gen)
        pick = r["generated_pick"]
        scores = np.asarray(r["generated_scores"])
        assert pick == int(np.argmax(scores)), r  # argmax, ties to the earlier candidate
        assert r["caption"] == r["captions"][0]
        assert r["caption"].endswith(gen[pick]), r
        assert r["caption_tokens"] <= context, r
        if r["caption_kind"] == "meta+blip2":
            assert r["caption"] == f"{r['meta_caption']} {gen[pick]}"
        else:
            assert not r["meta_caption"] and r["caption"] == gen[pick]
        # nothing is truncated: the end-of-text token is inside the context
        ids = tokenizer(r["captions"])
        assert (ids[:, -1] == 0).all() or (ids == tokenizer.eot_token_id).any(1).all(), r
    fmow = [r for r in rows if r["source"].startswith("fmow")]
    assert fmow and all(r["caption_kind"] == "meta+blip2" and r["labels"] for r in fmow)
    proc = subprocess.run([sys.executable, "-m", "pipelines.stats", str(out)],
                          capture_output=True, text=True, check=True)
    table = [line.split() for line in proc.stdout.splitlines() if line.startswith("rs3 ")]
    assert {t[1] for t in table} >= {"bigearthnet", "millionaid"}
    assert all(t[-1] == "0.0%" for t in table), proc.stdout


def test_rs3_geo_fields_come_from_the_raster_and_one_utm_notation(build):
    import re

    import rasterio
    from rasterio.warp import transform as warp

    out, _ = build
    rows = _rs3_rows(out)
    assert all(re.fullmatch(r"\d{1,2}[NS]", r["utm_zone"]) for r in rows if r["utm_zone"])
    ben = [r for r in rows if r["source"] == "bigearthnet"]
    hemispheres = set()
    for r in ben:
        patch = os.path.basename(r["url"].rstrip("/"))
        with rasterio.open(os.path.join(r["url"], f"{patch}_B04.tif")) as src:
            x, y = src.transform @ (src.width / 2, src.height / 2)
            (lon,), (lat,) = warp(src.crs, "EPSG:4326", [x], [y])
            assert r["crs"] == f"EPSG:{src.crs.to_epsg()}"
        assert (r["lat"], r["lon"]) == pytest.approx((lat, lon), abs=1e-6)
        assert r["utm_zone"] == f"{src.crs.to_epsg() % 100}{'N' if lat >= 0 else 'S'}"
        assert r["gsd_m"] == pytest.approx(10.0)
        month = int(r["acquired"][5:7])
        north = {12: "winter", 1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring",
                 6: "summer", 7: "summer", 8: "summer"}.get(month, "autumn")
        flip = {"winter": "summer", "summer": "winter", "spring": "autumn", "autumn": "spring"}
        assert r["season"] == (north if lat >= 0 else flip[north]), r
        hemispheres.add(lat >= 0)
    assert hemispheres == {True, False}


def test_accelerator_hint_sits_on_the_model_stages_only(world):
    """On Dataflow only the model stages ask for GPUs (right fitting): exactly the
    transforms inside Caption, RotationPick, RSFilter and the tail's Embed carry the hint."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from local_builds import accelerator_split

    from pipelines.recipes import kit

    root, _ = world
    acc = "type:nvidia-l4;count:1;install-nvidia-driver"
    cfg, beam_args = kit.parse(rs5m.RECIPE, [*recipe_args(str(root)), *DATAFLOW,
                                             "--output", "gs://rs-corpus-test/out",
                                             "--accelerator", acc])
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    kit.compose(p, rs5m.RECIPE, kit.resolve(rs5m.RECIPE, cfg), cfg, "DataflowRunner")
    proto = p.to_runner_api()
    hinted, plain = accelerator_split(proto, acc)
    models = ("Caption[rs3]", "RotationPick[rs3]", "RSFilter[pub11]", "Tail/Embed[tail]")
    for name in hinted:
        assert any(m in name for m in models), name
    for m in models:  # the stage and its RunInference carry the hint
        assert any(m in n and "RunInference" in n for n in hinted), m
    for stage in ("FetchDecode[pub11]", "Decode[rs3]", "Georeference[rs3]",
                  "MetaCaption[rs3]", "Tail/Dedup[tail]", "Tail/Write"):
        assert any(stage in n for n in plain) and not any(stage in n for n in hinted), stage
