"""``make bench``: score CLIP checkpoints on the evaluations of RS5M, RemoteCLIP and SkyScript.

Pieces, one file each:

* :mod:`trainer.bench.registry` — known datasets, class-name normalisation, prompt sets;
* :mod:`trainer.bench.datasets` — loaders for the four formats (class-per-folder, Karpathy
  captions, RemoteCount, AIR-SLT);
* :mod:`trainer.bench.protocols` — the metrics as pure functions of embeddings;
* :mod:`trainer.bench.report` — ``results.json``, ``results.md`` (published figures beside
  ours), ``fewshot.png``;
* this module — loading models (:class:`BenchModel`), embedding with an on-disk cache
  (``OUTPUT/cache/<model-key>/<dataset>.npz``, plain arrays, read with
  ``allow_pickle=False``), and running the protocols (:func:`evaluate`).

Real weights (GeoRSCLIP, RemoteCLIP, SkyCLIP) go through the same path as ours::

    python -m trainer.bench --model ViT-B-32 --pretrained /models/RemoteCLIP-ViT-B-32.pt \\
        --name RemoteCLIP-ViT-B-32 --datasets AID,RESISC45,RSICD --data-root /data/rs
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.bench import protocols as P
from trainer.bench.datasets import (
    ClassificationData,
    CountingData,
    RetrievalData,
    SeLoData,
    fingerprint,
    load,
)
from trainer.bench.registry import DatasetSpec, fill_template, prompt_templates

log = logging.getLogger(__name__)

CLASSIFICATION_PROTOCOLS = ("zeroshot", "linear_probe", "knn", "fewshot")
ALL_PROTOCOLS = CLASSIFICATION_PROTOCOLS + ("retrieval", "counting", "selo")
TINY_BASELINE_DIR = "data/demo/models/tiny-clip"


# ----------------------------------------------------------------------------- models


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
            from PIL import Image

            for im in images:
                if isinstance(im, (str, Path)):
                    with Image.open(im) as f:
                        yield f.convert("RGB")
                else:
                    yield im.convert("RGB")

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


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class Options:
    protocols: tuple[str, ...] = ALL_PROTOCOLS
    prompts: tuple[str, ...] | None = None  # None: each dataset's own sets
    shots: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seeds: tuple[int, ...] = (0, 1, 2)
    knn_k: int = 20
    probe_test_frac: float = 0.5
    fewshot_C: float = 10.0
    selo_scales: tuple[int, ...] = (256, 512, 768)
    selo_box: int = 50
    selo_peak: int = 1000


def _rec(model: BenchModel, spec: DatasetSpec, protocol: str, metric: str, value: float,
         **params: Any) -> dict[str, Any]:
    unit = "ratio" if protocol == "selo" else "percent"
    return {"model": model.name, "model_key": model.key, "dataset": spec.name,
            "published_dataset": spec.published, "task": spec.task, "protocol": protocol,
            "metric": metric, "value": float(value), "unit": unit, "params": params}


def _image_features(model: BenchModel, cache: FeatureCache, paths: list[Path]) -> np.ndarray:
    return cache.get("images", fingerprint(paths), lambda: model.embed_images(paths))


def run_classification(model: BenchModel, spec: DatasetSpec, data: ClassificationData,
                       cache: FeatureCache, opt: Options) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    x = _image_features(model, cache, data.paths)
    y = data.labels
    C = len(data.classes)
    eval_idx = np.arange(len(y)) if spec.split == "whole" else data.indices("test")
    if "zeroshot" in opt.protocols:
        for ps in (opt.prompts or spec.prompts):
            templates = prompt_templates(ps)
            texts = [fill_template(t, c) for c in data.classnames for t in templates]
            temb = cache.get(f"prompts__{ps}", fingerprint([], texts),
                             lambda texts=texts: model.embed_texts(texts))
            m = P.zeroshot(x[eval_idx], temb.reshape(C, len(templates), -1), y[eval_idx])
            for k, v in m.items():
                recs.append(_rec(model, spec, "zeroshot", k, v, prompt_set=ps,
                                 n_templates=len(templates), split=spec.split,
                                 n_images=len(eval_idx), n_classes=C))
    probes = [p for p in ("linear_probe", "knn", "fewshot") if p in opt.protocols]
    if probes:
        if len(data.indices("train")):
            tr, te = data.indices("train"), data.indices("test")
            split_desc = "train/test"
        else:
            tr, te = P.stratified_split(y, opt.probe_test_frac, seed=0)
            split_desc = f"stratified {1 - opt.probe_test_frac:.0%}/{opt.probe_test_frac:.0%} (seed 0)"
        if len(tr) == 0 or len(te) == 0:
            log.warning("%s: too few images per class for a train/test split: no probes",
                        spec.name)
            return recs
        common = {"split": split_desc, "n_train": len(tr), "n_test": len(te), "n_classes": C}
        if "linear_probe" in probes:
            m, best_c = P.linear_probe(x[tr], y[tr], x[te], y[te], C)
            for k, v in m.items():
                recs.append(_rec(model, spec, "linear_probe", k, v, C=best_c,
                                 C_grid=list(P.DEFAULT_CS), val_frac=0.2, **common))
        if "knn" in probes:
            for k, v in P.knn(x[tr], y[tr], x[te], y[te], C, k=opt.knn_k).items():
                recs.append(_rec(model, spec, "knn", k, v, k=opt.knn_k, **common))
        if "fewshot" in probes:
            fs = P.fewshot(x[tr], y[tr], x[te], y[te], C, opt.shots, opt.seeds, opt.fewshot_C)
            for n, m in fs.items():
                recs.append(_rec(model, spec, "fewshot", "top1", m["top1"], shots=n,
                                 seeds=list(opt.seeds), std=m["top1_std"], C=opt.fewshot_C,
                                 **common))
    return recs


def run_retrieval(model: BenchModel, spec: DatasetSpec, data: RetrievalData,
                  cache: FeatureCache, opt: Options) -> list[dict[str, Any]]:
    x = _image_features(model, cache, data.paths)
    t = cache.get("captions", fingerprint([], data.captions),
                  lambda: model.embed_texts(data.captions))
    m = P.retrieval(x, t, data.caption_image)
    return [_rec(model, spec, "retrieval", k, v, split=spec.split, n_images=len(data.paths),
                 n_captions=len(data.captions)) for k, v in m.items()]


def run_counting(model: BenchModel, spec: DatasetSpec, data: CountingData,
                 cache: FeatureCache, opt: Options) -> list[dict[str, Any]]:
    x = _image_features(model, cache, data.paths)
    texts = [c for cap, n in zip(data.captions, data.counts)
             for c in P.counting_captions(cap, int(n))]
    t = cache.get("counting", fingerprint([], texts), lambda: model.embed_texts(texts))
    m = P.counting(x, t.reshape(len(data.paths), len(P.COUNT_CANDIDATES), -1), data.counts)
    return [_rec(model, spec, "counting", k, v, n_images=len(data.paths),
                 candidates="1..10") for k, v in m.items()]


#: AIR-SLT scenes are ~10k x 10k, above PIL's default bomb limit; still refuse past this
SELO_MAX_PIXELS = 20_000 * 20_000


@contextlib.contextmanager
def _open_large(path: str):
    """Open a large benchmark scene with a raised, still finite, bomb limit, restored after
    (PIL's limit is process-wide: leaving it raised would unguard everything else)."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = SELO_MAX_PIXELS
    try:
        im = Image.open(path)
        im.load()
    finally:
        Image.MAX_IMAGE_PIXELS = before
    with im:
        yield im


def run_selo(model: BenchModel, spec: DatasetSpec, data: SeLoData, cache: FeatureCache,
             opt: Options) -> list[dict[str, Any]]:
    per: list[dict[str, float]] = []
    q = cache.get("selo_queries", fingerprint([], data.queries),
                  lambda: model.embed_texts(data.queries))
    for i, (path, polys) in enumerate(zip(data.paths, data.regions)):
        with _open_large(path) as im:
            W, H = im.size
            wins = P.selo_windows(H, W, opt.selo_scales)

            def crops(im=im, wins=wins):
                return model.embed_images([im.crop(w) for w in wins])

            fp = fingerprint([path], [str(opt.selo_scales)])
            e = cache.get(f"selo_windows_{i}", fp, crops)
        prob = P.selo_probmap(H, W, wins, e @ q[i])
        per.append(P.selo_metrics(prob, polys, box=opt.selo_box, peak=opt.selo_peak))
    return [_rec(model, spec, "selo", k, float(np.mean([p[k] for p in per])),
                 scales=list(opt.selo_scales), n_queries=len(per), box=opt.selo_box,
                 peak=opt.selo_peak) for k in ("Rsu", "Ras", "Rda", "Rmi")]


RUNNERS = {"classification": run_classification, "retrieval": run_retrieval,
           "counting": run_counting, "selo": run_selo}
TASK_PROTOCOLS = {"classification": CLASSIFICATION_PROTOCOLS, "retrieval": ("retrieval",),
                  "counting": ("counting",), "selo": ("selo",)}


def evaluate(models: Sequence[BenchModel], datasets: Sequence[tuple[DatasetSpec, Path]],
             cache_root: str | Path | None, opt: Options | None = None) -> list[dict[str, Any]]:
    """Every model on every dataset with every applicable protocol in ``opt.protocols``."""
    opt = opt or Options()
    records: list[dict[str, Any]] = []
    for spec, path in datasets:
        if not set(TASK_PROTOCOLS[spec.task]) & set(opt.protocols):
            continue
        data = load(spec.task, path, spec.name, spec.split)
        for m in models:
            cache = FeatureCache(cache_root, m.key, spec.name)
            recs = RUNNERS[spec.task](m, spec, data, cache, opt)
            log.info("%s on %s: %d results (cache: %d hit, %d computed)", m.name, spec.name,
                     len(recs), cache.hits, cache.misses)
            records += recs
    return records
