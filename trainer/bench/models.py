"""Models and features of the benchmark harness: which weights to load (:class:`ModelSpec`,
:func:`resolve_checkpoint`), a loaded model that embeds images and texts (:class:`BenchModel`,
through the one loader ``pipelines.models.open_clip_loader``), and the on-disk feature cache
(``OUTPUT/cache/<model-key>/<dataset>.npz``, plain arrays, read with ``allow_pickle=False``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.image_guard import open_rgb

#: where ``make bench`` finds the untrained tiny model (the demo builds it)
TINY_BASELINE_DIR = "data/demo/models/tiny-clip"


@dataclasses.dataclass
class ModelSpec:
    """What to load: ``model`` is an architecture name or an open_clip model directory,
    ``pretrained`` a local weights file (or None: the directory's own weights / random)."""

    name: str
    model: str
    pretrained: str | None = None


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """A trainer checkpoint → (model, pretrained) for ``load_open_clip``.

    The architecture comes from, in order: the checkpoint's ``"model"`` entry (an arch name or
    a model directory, relative paths tried from the CWD and from the checkpoint's run
    directory), then ``<run>/model/open_clip_config.json`` beside ``<run>/checkpoints/``.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    model: str | None = None
    if p.suffix != ".safetensors":
        ck = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(ck, dict) and isinstance(ck.get("model"), str):
            model = ck["model"].removeprefix("local-dir:")
        del ck
    if model is not None and not _is_arch(model):
        for cand in (Path(model), run_dir / model, run_dir / Path(model).name):
            if (cand / "open_clip_config.json").is_file():
                model = str(cand)
                break
    if model is None or not (_is_arch(model) or Path(model).is_dir()):
        cand = run_dir / "model"
        if (cand / "open_clip_config.json").is_file():
            model = str(cand)
    if model is None:
        raise ValueError(
            f"{path}: cannot tell the architecture (no 'model' entry, no {run_dir}/model/); "
            "pass --model ARCH_OR_DIR --pretrained PATH instead")
    return model, str(p)


def _is_arch(name: str) -> bool:
    import open_clip

    from pipelines.models.open_clip_loader import register_configs

    register_configs()
    return name.replace("/", "-") in open_clip.list_models()


def model_key(net: torch.nn.Module, precision: str = "fp32") -> str:
    """A short hash of the loaded weights (every state-dict tensor's bytes, in key order), so
    the feature cache follows the weights, not the file: the same weights saved as a trainer
    checkpoint, a ``module.``-prefixed ``epoch_N.pt`` or a safetensors file share one cache,
    and a checkpoint overwritten with new weights gets a new one."""
    h = hashlib.sha256(f"{precision}\0".encode())
    for k, v in sorted(net.state_dict().items()):
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}\0{t.dtype}\0{tuple(v.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class BenchModel:
    """A loaded CLIP model that embeds image files and texts (L2-normalised float32)."""

    def __init__(self, spec: ModelSpec, device: str = "cpu", precision: str = "fp32",
                 batch_size: int = 64):
        from pipelines.models.open_clip_loader import load_open_clip

        self.spec = spec
        self.name = spec.name
        self.net, self.preprocess, self.tokenizer = load_open_clip(
            spec.model, spec.pretrained, device=device, precision=precision)
        self.key = model_key(self.net, precision)
        self.batch_size = batch_size

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """Paths or PIL images → [N, D]."""
        from pipelines.models.open_clip_loader import encode_images

        def gen():
            for im in images:
                # benchmark files are input: the pipelines' format allow-list and bomb guards
                yield open_rgb(im) if isinstance(im, (str, Path)) else im.convert("RGB")

        return encode_images(self.net, self.preprocess, gen(), batch_size=self.batch_size)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        from pipelines.models.open_clip_loader import model_device

        dev = model_device(self.net)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 256):
                tok = self.tokenizer(list(texts[i:i + 256])).to(dev)
                e = self.net.encode_text(tok).float()
                out.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------- cache


class FeatureCache:
    """``root/<model-key>/<dataset>.npz``: named arrays, each stored with the fingerprint of
    what it was computed from (``<name>.fp``); a changed dataset or prompt set recomputes only
    that array. Written with ``np.savez`` to a temporary name and renamed; read with
    ``allow_pickle=False``."""

    def __init__(self, root: str | Path | None, key: str, dataset: str):
        self.path = Path(root) / key / f"{dataset}.npz" if root else None
        self.arrays: dict[str, np.ndarray] = {}
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.is_file():
            with np.load(self.path, allow_pickle=False) as z:
                self.arrays = {k: z[k] for k in z.files}

    def get(self, name: str, fp: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if name in self.arrays and str(self.arrays.get(name + ".fp", "")) == fp:
            self.hits += 1
            return self.arrays[name]
        self.misses += 1
        arr = np.asarray(compute(), np.float32)
        self.arrays[name] = arr
        self.arrays[name + ".fp"] = np.asarray(fp)
        self._save()
        return arr

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        with open(tmp, "wb") as f:
            np.savez(f, **self.arrays)
        os.replace(tmp, self.path)


