"""pipelines.plan: the arithmetic of worker-hours, wall time and cost, and the rates file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipelines import plan as planner

DOC = {
    "about": "test rates",
    "worker": "one test worker",
    "stages": {
        "fetch": {"device": "cpu", "images_per_s": 100.0, "measured": True},
        "caption": {"device": "gpu", "images_per_s": None, "measured": False},
        "embed": {"device": "cpu", "images_per_s": 10.0, "measured": True},
        "dedup": {"device": "cpu", "images_per_s": 1000.0, "measured": True, "parallel": False},
    },
    "recipes": {"r": {"stages": {"fetch": 1.0, "caption": 0.5, "embed": 1.0, "dedup": 1.0}}},
}


def test_worker_hours_wall_time_and_cost():
    p = planner.plan(DOC, "r", n=360_000, workers=10, gpu_workers=2, cpu_price=0.5,
                     gpu_price=3.0, overrides=["caption=gpu:50"])
    by = {s.stage: s for s in p.stages}
    assert by["fetch"].worker_hours == pytest.approx(1.0)  # 360k / 100 img/s = 3600 s
    assert by["fetch"].wall_hours == pytest.approx(0.1)  # on 10 workers
    assert by["embed"].worker_hours == pytest.approx(10.0)
    assert by["caption"].images == 180_000 and by["caption"].kind == "given"
    assert by["caption"].worker_hours == pytest.approx(1.0)  # 180k / 50
    assert by["caption"].wall_hours == pytest.approx(0.5)  # on 2 GPU workers
    assert by["dedup"].wall_hours == by["dedup"].worker_hours == pytest.approx(0.1)  # global
    assert p.worker_hours("cpu") == pytest.approx(11.1)
    assert p.worker_hours("gpu") == pytest.approx(1.0)
    assert p.wall_hours == pytest.approx(0.1 + 0.5 + 1.0 + 0.1)
    assert p.cost == pytest.approx(11.1 * 0.5 + 1.0 * 3.0)
    assert not p.missing


def test_a_stage_without_a_rate_is_left_out_loudly():
    p = planner.plan(DOC, "r", n=360_000, workers=10, cpu_price=0.5)
    assert p.missing == ["caption"]
    assert p.worker_hours("gpu") == 0 and p.gpu_workers == 10
    assert p.cost == pytest.approx(11.1 * 0.5)
    text = planner.render(p, DOC)
    assert "NOT IN THE TOTALS" in text and "caption" in text


def test_no_prices_no_cost():
    p = planner.plan(DOC, "r", n=1000, workers=1, overrides=["caption=5"])
    assert p.cost is None
    assert "give --cpu-price and --gpu-price" in planner.render(p, DOC)


@pytest.mark.parametrize("bad", ["caption", "=5", "caption=tpu:5", "caption=-1", "nope=5"])
def test_bad_overrides_are_refused(bad):
    with pytest.raises(ValueError):
        planner.plan(DOC, "r", n=10, workers=1, overrides=[bad])


def test_our_rates_file_states_its_sources():
    doc = planner.load_rates()
    assert "measured" in doc["about"] and "THIS machine" in doc["about"]
    for name, s in doc["stages"].items():
        assert s["device"] in planner.DEVICES, name
        assert s.get("source"), name
        if s["measured"]:
            assert s["images_per_s"] > 0, name
    assert doc["stages"]["fetch_decode"]["images_per_s"] == pytest.approx(95.1)
    for recipe in doc["recipes"].values():
        assert set(recipe["stages"]) <= set(doc["stages"])
        assert all(0 < share <= 1 for share in recipe["stages"].values())


def test_cli_prints_the_rs5m_table():
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.plan", "--recipe", "rs5m", "--n", "5000000",
         "--workers", "50", "--cpu-price", "0.2", "--gpu-price", "1.5"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.startswith("Plan: rs5m, 5,000,000 images, 50 CPU workers")
    for stage in ("fetch_decode", "rs_filter", "caption", "embed", "semdedup", "TOTAL"):
        assert stage in out
    doc = json.loads(subprocess.run(
        [sys.executable, "-m", "pipelines.plan", "--recipe", "rs5m", "--n", "5000000",
         "--json", "--rate", "caption=gpu:20"],
        capture_output=True, text=True, check=True, timeout=60).stdout)
    assert doc["missing"] == [] and doc["gpu_worker_hours"] == pytest.approx(2e6 / 20 / 3600)
