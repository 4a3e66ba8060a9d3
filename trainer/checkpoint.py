"""Checkpoints: atomic writes, plain open_clip ``state_dict``, everything needed to resume.

``OUTPUT/checkpoints/latest.pt`` (a real file, never a symlink) and ``step_NNNNNNNN.pt`` hold::

    state_dict         open_clip-loadable weights, no ``module.`` prefix (LoRA merged in)
    model              the model directory written beside the run (OUTPUT/model, open_clip hub
                       layout) — ``load_open_clip(ckpt["model"], pretrained=path)`` works
    arch               the architecture name the run started from (when known)
    step, epoch, samples_seen, peft, args
    train_state_dict   (PEFT runs) the weights as trained: LoRA/adapter tensors included
    optimizer, scaler, data_state   for ``--resume latest``

Every file is written to a temporary name in the same directory and ``os.replace``d, so a
reader (or a crash) never sees half a checkpoint. Only rank 0 writes; all ranks barrier after.
Everything in it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def strip_module_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in sd.items()}


def cpu_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in strip_module_prefix(sd).items()}


def _atomic(path: str, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``:
    a reader sees the old file or the new one, never half of one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: str, dst: str) -> None:
    _atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(path, write)


def save_training_checkpoint(obj: dict[str, Any], ckpt_dir: str, step: int,
                             keep_step_files: bool = True) -> str:
    """Write ``step_N.pt`` (optional) and ``latest.pt`` atomically; return latest's path."""
    latest = os.path.join(ckpt_dir, "latest.pt")
    if keep_step_files:
        step_path = os.path.join(ckpt_dir, f"step_{step:08d}.pt")
        atomic_save(obj, step_path)
        atomic_copy(step_path, latest)
    else:
        atomic_save(obj, latest)
    return latest


def resolve_resume(resume: str | None, output: str) -> str | None:
    """``latest`` → OUTPUT/checkpoints/latest.pt when it exists (else None: a fresh start)."""
    if not resume:
        return None
    if resume == "latest":
        p = os.path.join(output, "checkpoints", "latest.pt")
        return p if os.path.isfile(p) else None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return resume


def load_training_checkpoint(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_model_dir(model_dir: str, model_cfg: dict, preprocess_cfg: dict, extra: dict,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``model_dir`` in open_clip's hub layout (config; weights when given), atomically."""
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "rs_corpus": extra}
    atomic_write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n",
                      os.path.join(model_dir, CONFIG_NAME))
    if state_dict is not None:
        from safetensors.torch import save_file

        path = os.path.join(model_dir, WEIGHTS_NAME)
        fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.", suffix=".tmp", dir=model_dir)
        os.close(fd)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp,
                  metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
