"""``python -m trainer.bench`` end to end on a small demo benchmark, checkpoints saved here the
way the trainer and the published projects save them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.demo import benchmarks
from pipelines.demo.tiny_models import build_tiny_clip
from trainer.bench.__main__ import main, model_specs
from trainer.bench.models import BenchModel, ModelSpec, resolve_checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small demo benchmark, the untrained tiny model, and a trainer-style run directory
    whose ``checkpoints/latest.pt`` holds perturbed weights."""
    root = tmp_path_factory.mktemp("bench")
    bench = root / "bench"
    benchmarks.build_demo_benchmarks(str(bench), seed=0, per_class=4, retrieval_per_class=1,
                                     counting_items=10, size=96, fine_per_class=5)
    tiny = build_tiny_clip(str(root / "tiny-clip"), seed=0)
    run = root / "run"
    build_tiny_clip(str(run / "model"), seed=0)  # open_clip hub layout, as the trainer writes it
    net = BenchModel(ModelSpec("t", tiny)).net
    g = torch.Generator().manual_seed(3)
    sd = {k: (v + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
          for k, v in net.state_dict().items()}
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "latest.pt"
    torch.save({"state_dict": sd, "model": str(run / "model"), "epoch": 1}, ckpt)
    return {"root": root, "bench": bench, "tiny": Path(tiny), "run": run, "ckpt": ckpt, "sd": sd}


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_benchmark_is_deterministic_and_well_formed(world, tmp_path):
    again = tmp_path / "again"
    benchmarks.build_demo_benchmarks(str(again), seed=0, per_class=4, retrieval_per_class=1,
                                     counting_items=10, size=96, fine_per_class=5)
    assert _digest(again) == _digest(world["bench"])
    b = world["bench"]
    assert sorted(p.name for p in (b / "scenes").iterdir() if p.is_dir()) == \
        sorted(benchmarks.scenes.CLASSES)
    split = json.loads((b / "scenes" / "split.json").read_text())
    assert len(split["train"]) == len(split["test"]) == 26
    ret = json.loads((b / "retrieval" / "dataset_demo.json").read_text())
    assert all(len(im["sentences"]) == 5 and im["split"] == "test" for im in ret["images"])
    cnt = json.loads((b / "counting" / "annotations.json").read_text())
    assert len(cnt) == 10 and all(1 <= it["count"] <= 10 and str(it["count"]) in it["caption"]
                                  for it in cnt)


def _run(world, out, *extra):
    return main(["--checkpoint", str(world["ckpt"]), "--output", str(out),
                 "--demo-dir", str(world["bench"]), "--baseline-model", str(world["tiny"]),
                 "--prompts", "remoteclip", "--shots", "1,2", "--seeds", "0,1", "-q", *extra])


def test_cli_scores_baseline_and_checkpoint_side_by_side_and_reuses_cache(world, tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "out"
    assert _run(world, out) == 0
    data = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in data["models"]]
    assert names == ["tiny-untrained", "run/latest"]
    got = {(r["model"], r["dataset"], r["protocol"]) for r in data["results"]}
    for m in names:
        for ds, proto in [("demo-scenes", "zeroshot"), ("demo-scenes", "linear_probe"),
                          ("demo-scenes", "knn"), ("demo-scenes", "fewshot"),
                          ("demo-retrieval", "retrieval"), ("demo-counting", "counting"),
                          ("demo-roof-shape", "zeroshot")]:
            assert (m, ds, proto) in got
    cnt = {r["metric"]: r for r in data["results"]
           if r["model"] == "run/latest" and r["protocol"] == "counting"}
    assert {"top1", "top10", "prior_top1", "within_category_r"} <= set(cnt)
    assert cnt["within_category_r"]["unit"] == "ratio"
    assert -1.0 <= cnt["within_category_r"]["value"] <= 1.0
    zs = [r for r in data["results"] if r["protocol"] == "zeroshot" and r["metric"] == "top1"]
    assert all(r["params"]["prompt_set"] == "remoteclip" for r in zs)
    assert all(r["params"]["n_images"] == 26 for r in zs if r["dataset"] == "demo-scenes")
    md = (out / "results.md").read_text()
    assert "| tiny-untrained | run/latest |" in md
    assert (out / "fewshot.png").is_file()
    keys = {m["key"] for m in data["models"]}
    assert {p.name for p in (out / "cache").iterdir()} == keys
    assert len(list((out / "cache").rglob("*.npz"))) == 8  # 2 models x 4 sets

    # a second run embeds nothing: every feature comes from OUTPUT/cache
    def boom(*a, **k):
        raise AssertionError("re-embedded despite the cache")

    monkeypatch.setattr(BenchModel, "embed_images", boom)
    monkeypatch.setattr(BenchModel, "embed_texts", boom)
    assert _run(world, out, "--protocols", "zeroshot,retrieval,counting") == 0
    again = json.loads((out / "results.json").read_text())["results"]
    first = [r for r in data["results"] if r["protocol"] in ("zeroshot", "retrieval", "counting")]
    assert [r["value"] for r in again] == [r["value"] for r in first]


def test_checkpoint_resolution_trainer_layout(world, tmp_path):
    model, pre = resolve_checkpoint(str(world["ckpt"]))
    assert model == str(world["run"] / "model") and pre == str(world["ckpt"])
    # no "model" entry: the run's model/ directory beside checkpoints/ supplies the architecture
    bare = world["run"] / "checkpoints" / "epoch_1.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in world["sd"].items()}}, bare)
    assert resolve_checkpoint(str(bare)) == (str(world["run"] / "model"), str(bare))
    a = BenchModel(ModelSpec("a", *resolve_checkpoint(str(bare))))
    b = BenchModel(ModelSpec("b", *resolve_checkpoint(str(world["ckpt"]))))
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k])
    assert a.key == b.key  # same weights, one feature cache, whatever the file looks like
    # a missing checkpoint is a note, not a crash; an orphan file is an error with advice
    specs, notes = model_specs([("checkpoint", str(tmp_path / "nope.pt")), ("name", "x")])
    assert specs == [] and "not found" in notes[0]
    orphan = tmp_path / "orphan.pt"
    torch.save({"state_dict": world["sd"]}, orphan)
    with pytest.raises(ValueError, match="--model"):
        resolve_checkpoint(str(orphan))


def test_published_style_state_dicts_load_through_the_user_path(world, tmp_path):
    """GeoRSCLIP / RemoteCLIP release a bare open_clip state dict (.pt / .bin), SkyCLIP an
    open_clip checkpoint: a user passes --model ARCH --pretrained FILE (or a model dir)."""
    from safetensors.torch import save_file

    sd = world["sd"]
    bare = tmp_path / "RemoteCLIP-RS-Tiny-ViT.pt"
    torch.save(sd, bare)
    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    items = [("model", "RS-Tiny-ViT"), ("pretrained", str(bare)), ("name", "RemoteCLIP-tiny"),
             ("model", str(world["tiny"])), ("pretrained", str(st))]
    specs, notes = model_specs(items)
    assert [s.name for s in specs] == ["RemoteCLIP-tiny", "tiny-clip:weights"] and not notes
    ref = BenchModel(ModelSpec("ref", *resolve_checkpoint(str(world["ckpt"]))))
    ims = [np.full((40, 40, 3), v, np.uint8) for v in (30, 120, 200)]
    from PIL import Image

    pil = [Image.fromarray(a) for a in ims]
    want = ref.embed_images(pil)
    for s in specs:
        m = BenchModel(s)
        assert np.allclose(m.embed_images(pil), want, atol=1e-5)
        assert np.allclose(m.embed_texts(["a satellite photo of a river."]),
                           ref.embed_texts(["a satellite photo of a river."]), atol=1e-5)
    # the CLI path, on the demo retrieval set only
    out = tmp_path / "out"
    rc = main(["--model", "RS-Tiny-ViT", "--pretrained", str(bare), "--name", "RemoteCLIP-tiny",
               "--datasets", f"demo-retrieval={world['bench'] / 'retrieval'}",
               "--output", str(out), "-q"])
    assert rc == 0
    recs = json.loads((out / "results.json").read_text())["results"]
    assert {r["metric"] for r in recs} >= {"i2t_R@1", "t2i_R@10", "mean_recall"}
    assert {r["model"] for r in recs} == {"RemoteCLIP-tiny"}  # no baseline off the demo sets


def test_selo_end_to_end_on_a_synthetic_scene(world, tmp_path):
    """An AIR-SLT-style sample: a lake pasted into a desert; the query asks for the lake."""

    from pipelines.demo import scenes

    big, _ = scenes.render_scene("desert", np.random.default_rng([1, 9001, 77]), 256)
    lake, _ = scenes.render_scene("lake", np.random.default_rng([1, 9001, 78]), 128)
    big.paste(lake, (128, 0))
    d = tmp_path / "selo"
    (d / "imgs").mkdir(parents=True)
    big.save(d / "imgs" / "0.jpg")
    (d / "anno.json").write_text(json.dumps([{"jpg_name": "0.jpg", "caption": "a lake",
                                              "points": [[[128, 0], [256, 0], [256, 128],
                                                          [128, 128]]]}]))
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(world["ckpt"]), "--datasets", f"AIR-SLT={d}",
               "--selo-scales", "64,128", "--selo-box", "5", "--selo-peak", "64",
               "--output", str(out), "-q"])
    assert rc == 0
    recs = json.loads((out / "results.json").read_text())["results"]
    got = {r["metric"]: r["value"] for r in recs}
    assert set(got) == {"Rsu", "Ras", "Rda", "Rmi"}
    assert all(0.0 <= v <= 1.0 for v in got.values())
    assert got["Rmi"] == pytest.approx(0.4 * got["Rsu"] + 0.35 * (1 - got["Ras"])
                                       + 0.25 * got["Rda"])
    assert all(r["unit"] == "ratio" and r["published_dataset"] == "AIR-SLT" for r in recs)


def test_selo_scenes_do_not_unguard_pil_for_everyone_else(tmp_path):
    from PIL import Image

    from trainer.bench.evaluate import _open_large

    before = Image.MAX_IMAGE_PIXELS
    Image.new("RGB", (64, 48)).save(tmp_path / "scene.png")
    with _open_large(str(tmp_path / "scene.png")) as im:
        assert im.size == (64, 48)
    assert Image.MAX_IMAGE_PIXELS == before and before is not None


def test_benchmark_images_are_opened_with_the_format_allow_list(world, tmp_path):
    """A benchmark folder is input too: a TGA named .jpg is refused, not decoded."""
    from PIL import Image

    from pipelines.image_guard import ImageRefused

    fake = tmp_path / "x.jpg"
    Image.new("RGB", (16, 16)).save(fake, "TGA")
    model = BenchModel(ModelSpec("t", str(world["tiny"])))
    with pytest.raises(ImageRefused):
        model.embed_images([fake])
