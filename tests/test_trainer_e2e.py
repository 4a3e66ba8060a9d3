"""Trainer end to end: in-process runs, resume, open_clip loading, LoRA export, torchrun DDP.

Tiny shards and the tiny CLIP are built by the fixtures in test_trainer.py. CPU only; every run
is a handful of steps at batch 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import write_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
ARCH = "RS-Tiny-ViT"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    from pipelines.demo.tiny_models import build_tiny_clip

    return build_tiny_clip(str(tmp_path_factory.mktemp("models") / "tiny-clip"), seed=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("corpus"), {"pub11": [24, 24], "rs3": [16]})


def _train(corpus_dir, model_dir, out, *extra) -> tuple[dict, object]:
    from trainer.train import run

    argv = ["--data", str(corpus_dir), "--model", str(model_dir), "--output", str(out),
            "--batch-size", "8", "--workers", "0", "--log-every", "1", "--no-progress",
            "--device", "cpu", "--lr", "2e-3", "--warmup", "2", "--shuffle-buffer", "16",
            *extra]
    return run(argv)


def _inputs():
    import open_clip

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 64, 64, generator=g)
    t = open_clip.get_tokenizer(ARCH)(["a red field", "a blue lake", "a yellow road"])
    return x, t


@torch.no_grad()
def _embed(model):
    model.eval()
    x, t = _inputs()
    return model.encode_image(x), model.encode_text(t)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def test_checkpoint_loads_in_open_clip_with_same_embeddings(corpus, tiny_model_dir, tmp_path):
    import open_clip

    from pipelines.models.open_clip_loader import CONFIG_DIR, load_open_clip

    out = tmp_path / "run"
    summary, built = _train(corpus, tiny_model_dir, out, "--steps", "4")
    latest = out / "checkpoints" / "latest.pt"
    assert latest.is_file() and not latest.is_symlink()
    ck = torch.load(latest, map_location="cpu", weights_only=True)
    assert ck["step"] == 4 and ck["arch"] == ARCH and "optimizer" in ck
    assert not any(k.startswith("module.") for k in ck["state_dict"])
    assert (Path(ck["model"]) / "open_clip_config.json").is_file()
    expected = _embed(built.model)
    # open_clip itself, from the architecture name + our checkpoint
    open_clip.add_model_config(CONFIG_DIR)
    oc = open_clip.create_model(ARCH, pretrained=str(latest), pretrained_text=False)
    for a, b in zip(_embed(oc), expected, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # the bench's path: load_open_clip(<model dir>, pretrained=latest.pt); and the dir alone
    for m in (load_open_clip(ck["model"], str(latest))[0],
              load_open_clip(f"local-dir:{out / 'model'}")[0]):
        for a, b in zip(_embed(m), expected, strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    # observability
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["captions"] > 0 and r["samples_per_s"] > 0 for r in rows)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    assert summary["captions"] == 32 and summary["first_logged_loss"] == rows[0]["loss"]
    assert not [p for p in os.listdir(out / "checkpoints") if p.endswith(".tmp")]


def test_resume_repeats_the_uninterrupted_run(corpus, tiny_model_dir, tmp_path):
    """Deterministic CPU mode (use_deterministic_algorithms, fixed seed, workers=0): the resumed
    run's per-step losses and final weights equal the uninterrupted run's (tolerance 1e-6 abs;
    in practice they are bitwise equal)."""
    common = ("--steps", "8", "--deterministic", "--seed", "5", "--save-every", "3",
              "--no-step-files")
    _train(corpus, tiny_model_dir, tmp_path / "a", *common)
    _train(corpus, tiny_model_dir, tmp_path / "b", *common, "--stop-at-step", "5")
    ck = torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=True)
    assert ck["step"] == 5
    _train(corpus, tiny_model_dir, tmp_path / "b", *common, "--resume", "latest")
    la = {r["step"]: r["loss"] for r in _metrics(tmp_path / "a")}
    lb = {r["step"]: r["loss"] for r in _metrics(tmp_path / "b")}
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    for s, loss in la.items():
        assert abs(loss - lb[s]) <= 1e-6, (s, loss, lb[s])
    assert la[8] != la[1]
    sa = torch.load(tmp_path / "a" / "checkpoints" / "latest.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 8
    for k, v in sa["state_dict"].items():
        assert torch.allclose(v, sb["state_dict"][k], atol=1e-6), k


def test_resume_with_two_data_workers(corpus, tiny_model_dir, tmp_path):
    """Two DataLoader workers, stopped after an odd number of batches: the resumed loader
    rotates its workers' streams so the round-robin carries on (same losses as uninterrupted)."""
    common = ("--steps", "6", "--deterministic", "--seed", "2", "--workers", "2",
              "--save-every", "100", "--no-step-files")
    _train(corpus, tiny_model_dir, tmp_path / "a", *common)
    _train(corpus, tiny_model_dir, tmp_path / "b", *common, "--stop-at-step", "3")
    _train(corpus, tiny_model_dir, tmp_path / "b", *common, "--resume", "latest")
    la = {r["step"]: r["loss"] for r in _metrics(tmp_path / "a")}
    lb = {r["step"]: r["loss"] for r in _metrics(tmp_path / "b")}
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    for s, loss in la.items():
        assert abs(loss - lb[s]) <= 1e-6, (s, loss, lb[s])


def test_lora_run_exports_a_merged_open_clip_model(corpus, tiny_model_dir, tmp_path):
    import open_clip

    from pipelines.models.open_clip_loader import CONFIG_DIR, load_open_clip

    out = tmp_path / "lora"
    summary, built = _train(corpus, tiny_model_dir, out, "--steps", "3", "--peft", "lora",
                            "--lora-r", "4", "--lr", "2e-2")
    assert summary["trainable_parameters"] < summary["parameters"] / 100
    merged = out / "checkpoints" / "merged.pt"
    assert merged.is_file() and summary["merged"] == str(merged)
    expected = _embed(built.model)  # LoRA layers still unmerged in the trainer's model
    base = _embed(load_open_clip(tiny_model_dir)[0])
    assert not torch.allclose(expected[0], base[0], atol=1e-4)  # LoRA actually changed it
    open_clip.add_model_config(CONFIG_DIR)
    for path in (merged, out / "checkpoints" / "latest.pt"):
        oc = open_clip.create_model(ARCH, pretrained=str(path), pretrained_text=False)
        for a, b in zip(_embed(oc), expected, strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    # resume of a LoRA run restores the LoRA tensors, not the merged ones
    ck = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert any("lora_B" in k for k in ck["train_state_dict"])


def test_adapter_siglip_accum_run(corpus, tiny_model_dir, tmp_path):
    from pipelines.models.open_clip_loader import load_open_clip
    from trainer.model import load_trained_model

    out = tmp_path / "adapter"
    summary, built = _train(corpus, tiny_model_dir, out, "--steps", "2", "--peft", "adapter",
                            "--adapter-dim", "8", "--loss", "siglip", "--accum-freq", "2",
                            "--grad-checkpointing", "--aug-rotate-any", "--lr", "1e-2")
    rows = _metrics(out)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert summary["samples_seen"] == 2 * 2 * 8
    latest = str(out / "checkpoints" / "latest.pt")
    expected = _embed(built.model)
    for a, b in zip(_embed(load_trained_model(latest)), expected, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # the model dir's config carries SigLIP's logit bias, so the trained config builds
    assert load_open_clip(str(out / "model"))[0].logit_bias is not None
    ck = torch.load(latest, weights_only=True)
    assert "logit_bias" in ck["state_dict"] and ck["peft"] == "adapter"


def test_torchrun_two_ranks_on_cpu(tmp_path, tiny_model_dir):
    root = write_shards(tmp_path / "corpus", {"pub11": [12, 12], "rs3": [12]},
                        corrupt=False, long_caption=False)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer.train", "--data", str(root), "--model", tiny_model_dir,
           "--output", str(out), "--steps", "3", "--batch-size", "6", "--workers", "0",
           "--log-every", "1", "--no-progress", "--log-keys", "--device", "cpu",
           "--shuffle-buffer", "8"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = []
    for r in (0, 1):
        lines = (out / "keys" / f"rank{r}.txt").read_text().split()
        keys.append(set(lines[1::2]))
        assert len(lines) == 2 * 3 * 6
    assert not (keys[0] & keys[1]), "ranks consumed the same samples"
    ck = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert ck["step"] == 3 and ck["samples_seen"] == 3 * 2 * 6
    assert len(ck["data_state"]["ranks"]) == 2 and ck["data_state"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in ck["state_dict"])
    assert sorted(os.listdir(out / "checkpoints")) == ["latest.pt", "step_00000003.pt"]
    from pipelines.models.open_clip_loader import load_open_clip

    m, _, _ = load_open_clip(ck["model"], str(out / "checkpoints" / "latest.pt"))
    assert all(torch.isfinite(e).all() for e in _embed(m))
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]


def test_count_loss_run_logs_the_counting_loss(tiny_model_dir, tmp_path):
    counted = write_shards(tmp_path / "counted", {"pub11": [24]}, corrupt=False,
                           long_caption=False, counted=True)
    out = tmp_path / "count"
    summary, _ = _train(counted, tiny_model_dir, out, "--steps", "2", "--count-loss", "1",
                        "--count-negatives", "9")
    rows = _metrics(out)
    assert summary["count_loss"] == 1.0 and summary["count_negatives"] == 9 and len(rows) == 2
    # half the captions state a count: every batch of 8 has twins, so the loss is logged;
    # ten candidates, near chance at the start: about log 10
    assert all(1.0 < r["count_loss"] < 5 and r["loss"] > r["count_loss"] for r in rows)
    # the soft, ordinal target: a lower bound above 0 (its entropy), logged the same way
    summary, _ = _train(counted, tiny_model_dir, tmp_path / "soft", "--steps", "2",
                        "--count-loss", "1", "--count-negatives", "9", "--count-sigma", "0.3")
    rows = _metrics(tmp_path / "soft")
    assert summary["count_sigma"] == 0.3 and len(rows) == 2
    assert all(1.0 < r["count_loss"] < 5 for r in rows)
    with pytest.raises(SystemExit):
        _train(counted, tiny_model_dir, tmp_path / "bad", "--steps", "1", "--count-loss", "-1")
    with pytest.raises(SystemExit):
        _train(counted, tiny_model_dir, tmp_path / "bad", "--steps", "1", "--count-loss", "1",
               "--count-sigma", "-0.1")
    with pytest.raises(SystemExit):
        _train(counted, tiny_model_dir, tmp_path / "bad", "--steps", "1", "--count-negatives", "0")
