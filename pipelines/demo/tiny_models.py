"""Tiny, randomly initialised models built by the project (no hub download anywhere).

``build_tiny_clip(out_dir, seed)`` writes the ``RS-Tiny-ViT`` CLIP (see
``pipelines/models/configs/RS-Tiny-ViT.json``: 64 px images, 64-d embeddings, ~3.5 M parameters,
most of them the text token table) in open_clip's HF-hub directory layout::

    tiny-clip/
      open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
      open_clip_model.safetensors  the state dict

so it loads through exactly the path real weights take (``load_open_clip(DIR)``), and
``open_clip_train --model local-dir:DIR`` can fine-tune it. The same seed gives the same bytes.

``build_tiny_models(models_dir, seed)`` builds ``models_dir/tiny-clip/`` and, when labelled
``rs/`` + ``non_rs/`` images are available (``probe_data``, default ``../probe`` beside
``models_dir``), trains the RS-image probe into ``models_dir/rs_probe.json`` (about 10 s on
2 CPU cores for 150 + 150 images)::

    python -m pipelines.demo.tiny_models --out data/demo/models [--probe_data DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

TINY_ARCH = "RS-Tiny-ViT"
TINY_CLIP_DIR = "tiny-clip"
RS_PROBE_FILE = "rs_probe.json"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def tiny_clip_state_dict(seed: int = 0) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict, model) of the randomly initialised tiny CLIP for ``seed`` (CPU, fp32)."""
    import open_clip

    from pipelines.models.open_clip_loader import register_configs

    register_configs()
    # a private RNG scope: the build neither depends on nor disturbs the caller's torch RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(
            TINY_ARCH, pretrained=None, device="cpu", precision="fp32",
            pretrained_image=False, pretrained_text=False,
        )
    model.eval()
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return sd, model


def build_tiny_clip(out_dir: str, seed: int = 0) -> str:
    """Write the tiny CLIP to ``out_dir`` (open_clip directory layout); return ``out_dir``."""
    import open_clip
    from safetensors.torch import save_file

    sd, model = tiny_clip_state_dict(seed)
    pp = open_clip.get_model_preprocess_cfg(model)
    config = {
        "model_cfg": open_clip.get_model_config(TINY_ARCH),
        "preprocess_cfg": {
            "mean": list(pp["mean"]),
            "std": list(pp["std"]),
            "interpolation": pp["interpolation"],
            "resize_mode": pp["resize_mode"],
        },
        "rs_corpus": {"architecture": TINY_ARCH, "seed": seed, "init": "random"},
    }
    os.makedirs(out_dir, exist_ok=True)
    # write to temporary names and rename: a reader never sees half a model
    cfg_tmp = os.path.join(out_dir, f".{CONFIG_NAME}.tmp")
    w_tmp = os.path.join(out_dir, f".{WEIGHTS_NAME}.tmp")
    with open(cfg_tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(sd, w_tmp, metadata={"format": "pt"})
    for tmp in (cfg_tmp, w_tmp):
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; models are shared read-only data
    os.replace(w_tmp, os.path.join(out_dir, WEIGHTS_NAME))
    os.replace(cfg_tmp, os.path.join(out_dir, CONFIG_NAME))
    log.info("tiny CLIP (%s, seed %d) → %s", TINY_ARCH, seed, out_dir)
    return out_dir


def build_tiny_models(
    models_dir: str,
    seed: int = 0,
    probe_data: str | None = None,
    probe_features: str = "embedding+token_stats",
) -> dict[str, str | None]:
    """``models_dir/tiny-clip/`` and, given labelled images, ``models_dir/rs_probe.json``.

    ``probe_data`` is a folder with ``rs/`` and ``non_rs/`` image folders; by default
    ``<parent of models_dir>/probe`` when it exists. Returns the paths written
    (``{"clip": dir, "rs_probe": path or None}``).

    The probe uses the embedding plus the patch-token statistics of the tiny tower by default:
    with random weights the embedding alone reaches ~95% accuracy on the demo world, with the
    token statistics ~99% (see ``pipelines.models.rs_probe``).
    """
    clip_dir = build_tiny_clip(os.path.join(models_dir, TINY_CLIP_DIR), seed)
    if probe_data is None:
        default = os.path.join(os.path.dirname(os.path.abspath(models_dir)), "probe")
        probe_data = default if os.path.isdir(default) else None
    probe_path = None
    if probe_data is not None:
        from pipelines.models.rs_probe import train_rs_probe

        probe_path = os.path.join(models_dir, RS_PROBE_FILE)
        train_rs_probe(
            os.path.join(probe_data, "rs"),
            os.path.join(probe_data, "non_rs"),
            model=clip_dir,
            pretrained=None,
            out_path=probe_path,
            seed=seed,
            features=probe_features,
            device="cpu",  # the demo must give the same probe on any machine
        )
    else:
        log.info("no probe data: %s not written", RS_PROBE_FILE)
    return {"clip": clip_dir, "rs_probe": probe_path}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.demo.tiny_models",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="models folder (tiny-clip/ goes inside)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe_data", help="folder with rs/ and non_rs/ (default: ../probe)")
    ap.add_argument("--probe_features", default="embedding+token_stats",
                    choices=["embedding", "embedding+token_stats"])
    args = ap.parse_args(argv)
    # open_clip logs its every step at INFO on the root logger: show ours only
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    out = build_tiny_models(args.out, args.seed, args.probe_data, args.probe_features)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
