"""Smoke test of the perf-ingest harness: tiny N, our side only, no timing assertions.

img2dataset (and its .venv-perf) is never touched here: CI must not need it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.perf import ingest


def test_world_is_deterministic_and_cached(tmp_path: Path) -> None:
    root, captions = ingest.make_world(tmp_path, 3, 64, "texture", processes=1)
    first = [(root / "img" / f"{i:06d}.jpg").read_bytes() for i in range(3)]
    assert len(captions) == 3 and len(set(first)) == 3
    with Image.open(io.BytesIO(first[0])) as im:
        assert (im.format, im.size) == ("JPEG", (64, 64))
    again = tmp_path / "again"
    root2, captions2 = ingest.make_world(again, 3, 64, "texture", processes=1)
    assert captions2 == captions
    assert [(root2 / "img" / f"{i:06d}.jpg").read_bytes() for i in range(3)] == first


def test_count_samples_needs_jpg_txt_json(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for name in ("k1.jpg", "k1.txt", "k1.json", "k2.jpg", "k2.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    samples, complete, newest = ingest.count_samples(tmp_path)
    assert (samples, complete) == (2, 1) and newest is not None


def test_img2dataset_command_matches_our_settings(tmp_path: Path) -> None:
    s = ingest.Settings(processes=2, threads=8, image_size=128, resize_mode="center_crop",
                        encode_quality=90, samples_per_shard=50, timeout=5,
                        running_mode="in_memory", in_flight=None)
    cmd = ingest.img2dataset_command(Path("/x/img2dataset"), tmp_path / "u.parquet",
                                     tmp_path / "o", s)
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert flags["--image_size"] == "128" and flags["--resize_mode"] == "center_crop"
    assert flags["--encode_quality"] == "90" and flags["--processes_count"] == "2"
    assert flags["--thread_count"] == "8" and flags["--number_sample_per_shard"] == "50"
    assert flags["--output_format"] == "webdataset" and flags["--retries"] == "0"
    ours = ingest.ours_command(tmp_path / "u.parquet", tmp_path / "o", s)
    assert "--_ours" in ours and ours[ours.index("--image_size") + 1] == "128"


def test_ratio_and_median_run() -> None:
    def run(tool: str, wall: float) -> ingest.RunResult:
        return ingest.RunResult(tool, wall, 1.0, 1.0, 0.1, 1.0, 0.1, 100, 100, 1, 0, "x.log")

    runs = [run("ours", w) for w in (10.0, 5.0, 20.0)]
    assert ingest.median_run(runs).wall_s == 10.0
    best = {"ours": run("ours", 10.0), "img2dataset": run("img2dataset", 20.0)}
    assert ingest.ratio(best) == pytest.approx(2.0)
    assert ingest.ratio({"ours": best["ours"]}) is None


@pytest.mark.timeout(300)
def test_harness_runs_our_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 6
    args = ingest._parser().parse_args([
        "--n", str(n), "--size", "96", "--image_size", "64", "--images", "texture",
        "--tools", "ours", "--warmup", "0", "--repeats", "1", "--processes", "1",
        "--threads", "4", "--running_mode", "in_memory", "--workdir", str(tmp_path),
        "--stragglers", "0.5:1",
    ])
    best = ingest.benchmark(args)
    out = capsys.readouterr().out
    assert set(best) == {"ours"}
    ours = best["ours"]
    assert (ours.rc, ours.samples, ours.complete, ours.failures) == (0, n, n, {}), ours.log
    assert ours.wall_s > 0 and ours.startup_s is not None and ours.active_s is not None
    assert any(line.startswith("ours ") for line in out.splitlines()), out
    assert "WARNING" not in out
    # the straggler round: every 2nd URL answers after 1 s, and every sample still lands
    slow_urls = pq.read_table(tmp_path / f"urls-slow-{n}" / "urls.parquet").column("url")
    assert sum("/slow/1/img/" in u for u in slow_urls.to_pylist()) == n // 2
    table_part = out.split("perf-ingest with stragglers: N=6")[1]
    row = next(line for line in table_part.splitlines() if line.startswith("ours "))
    assert row.split()[6] == "yes" and float(row.split()[1]) >= 1.0, row
    assert ingest.benchmark.all_ok
    stats = json.loads((tmp_path / "out-ours" / "stats.json").read_text())
    assert (stats["input"], stats["kept"], stats["rejected"]) == (n, n, 0)
    with tarfile.open(next((tmp_path / "out-ours" / "shards").glob("*.tar"))) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        with Image.open(tar.extractfile(jpg)) as im:  # type: ignore[arg-type]
            assert im.size == (64, 64)
