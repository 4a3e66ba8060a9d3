"""End to end: the PUB11 recipe on a small demo world served on 127.0.0.1.

One world and one DirectRunner build are shared by the module (they are the slow part); the
tests then check the build's promises one by one.
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
from pipelines.demo.pub11 import build_pub11
from pipelines.demo.server import DemoServer
from pipelines.demo.tiny_models import build_tiny_models
from pipelines.recipes import rs5m

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    with DemoServer(str(root / "www")) as srv:
        build_pub11(str(root), base_url=srv.base_url, seed=3, n_rs=60, n_non_rs=30)
        build_tiny_models(str(root / "models"), seed=3, probe_data=str(root / "probe"))
        yield root, srv


def run_build(world_root, out, *extra):
    return rs5m.run(["--demo_world", str(world_root), "--output", str(out),
                     "--samples_per_shard", "40", *extra])


@pytest.fixture(scope="module")
def build(world, tmp_path_factory):
    root, _ = world
    out = tmp_path_factory.mktemp("out")
    stats = run_build(root, out)
    return out, stats


def _files(folder):
    return sorted(glob.glob(os.path.join(folder, "**", "*.*"), recursive=True))


def test_accounting_holds_and_matches_the_input(world, build):
    root, _ = world
    out, stats = build
    n_input = sum(pq.read_metadata(f).num_rows for f in glob.glob(str(root / "pub11/*/*.parquet")))
    assert stats["input"] == n_input
    assert stats["input"] == stats["kept"] + stats["rejected"] + stats["duplicates"]
    assert stats["kept"] > 0 and stats["rejected"] > 0 and stats["duplicates"] > 0
    assert json.loads((out / "stats.json").read_text()) == stats


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


def test_rs_filter_removes_most_non_rs_keyword_hits(world, build):
    root, _ = world
    out, _ = build
    s = scoring.rs_filter_scores(scoring.outcomes(str(out), str(root)))
    assert s["tn"] + s["fp"] > 0, "the world must plant non-RS rows that pass the keywords"
    assert s["non_rs_rejected"] >= 0.8, s
    assert s["precision"] >= 0.9 and s["recall"] >= 0.8, s


def test_shards_are_read_by_webdataset(build):
    out, stats = build
    shards = sorted(glob.glob(str(out / "shards" / "pub11-*.tar")))
    assert len(shards) == stats["shards"] >= 2
    n = 0
    for sample in wds.WebDataset(shards, shardshuffle=False).decode("pil"):
        assert sample["jpg"].mode == "RGB" and max(sample["jpg"].size) == 256
        assert sample["txt"] == sample["json"]["caption"]
        assert 0.0 <= sample["json"]["rs_score"] <= 1.0
        n += 1
    assert n == stats["kept"]


def test_second_run_gives_byte_identical_shards_and_index(world, build, tmp_path):
    root, _ = world
    out, _ = build
    again = tmp_path / "again"
    run_build(root, again)
    for sub in ("shards", "index", "rejects", "duplicates"):
        a, b = _files(str(out / sub)), _files(str(again / sub))
        assert [os.path.relpath(f, out) for f in a] == [os.path.relpath(f, again) for f in b]
        for fa, fb in zip(a, b, strict=True):
            assert open(fa, "rb").read() == open(fb, "rb").read(), fa


def test_stats_command_prints_the_stage_table(build):
    out, stats = build
    proc = subprocess.run([sys.executable, "-m", "pipelines.stats", str(out)],
                          capture_output=True, text=True, check=True)
    assert "keyword hits" in proc.stdout and "non-RS" in proc.stdout
    total = next(line for line in proc.stdout.splitlines() if line.startswith("TOTAL"))
    assert total.split()[1] == str(stats["input"]) and total.split()[-1] == str(stats["kept"])
    assert "CLIP tokens" in proc.stdout


def test_dataflow_translation_dry_run(world, tmp_path):
    root, _ = world
    result = rs5m.run([
        "--runner=DataflowRunner", "--dry_run=True", "--project=rs-corpus-test",
        "--region=us-central1", "--temp_location=gs://rs-corpus-test/tmp",
        "--demo_world", str(root), "--output", "gs://rs-corpus-test/out",
    ])
    assert result is None  # translated, not submitted


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
            assert open(fa, "rb").read() == open(fb, "rb").read(), fa
    assert stats["kept"] == json.loads((out / "stats.json").read_text())["kept"]


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
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "smoke" / "out.log").read_text()
    assert "Train Epoch: 0" in log and "Contrastive_loss" in log
    assert (tmp_path / "logs" / "smoke" / "checkpoints" / "epoch_1.pt").exists()
