"""Running the protocols: every model on every dataset (:func:`evaluate`), one runner per
task (classification: zero-shot, linear probe, k-NN, few-shot; retrieval; counting; SeLo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.bench import protocols as P
from trainer.bench.datasets import (
    ClassificationData,
    CountingData,
    RetrievalData,
    SeLoData,
    fingerprint,
    load,
)
from trainer.bench.models import BenchModel, FeatureCache
from trainer.bench.registry import DatasetSpec, fill_template, prompt_templates

log = logging.getLogger("trainer.bench")

CLASSIFICATION_PROTOCOLS = ("zeroshot", "linear_probe", "knn", "fewshot")
ALL_PROTOCOLS = CLASSIFICATION_PROTOCOLS + ("retrieval", "counting", "selo")


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
         unit: str | None = None, **params: Any) -> dict[str, Any]:
    unit = unit or ("ratio" if protocol == "selo" else "percent")
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
    cand = t.reshape(len(data.paths), len(P.COUNT_CANDIDATES), -1)
    m = P.counting(x, cand, data.counts)
    prior = P.counting_prior(data.categories, data.counts)["top1"]
    recs = [_rec(model, spec, "counting", k, v, n_images=len(data.paths),
                 candidates="1..10") for k, v in m.items()] + [
        _rec(model, spec, "counting", "prior_top1", prior, n_images=len(data.paths),
             candidates="1..10", reference="the category alone (leave-one-out), no image")]
    r = P.counting_within_category_r(x, cand, data.categories, data.counts)
    if math.isfinite(r):  # no category with differing counts: nothing to say
        recs.append(_rec(model, spec, "counting", "within_category_r", r, unit="ratio",
                         n_images=len(data.paths), candidates="1..10",
                         reference="picked vs true count within each category, weighted mean"))
    return recs


#: AIR-SLT scenes are ~10k x 10k, above the default bomb limits; still refuse past these
SELO_MAX_PIXELS = 20_000 * 20_000
SELO_MAX_DECODED_BYTES = 4 * 2**30


@contextlib.contextmanager
def _open_large(path: str):
    """A large benchmark scene as RGB, under raised (still finite) limits given to the guard
    for this one call: no process-wide PIL setting is touched."""
    from pipelines.image_guard import open_rgb

    im = open_rgb(path, max_pixels=SELO_MAX_PIXELS, max_decoded_bytes=SELO_MAX_DECODED_BYTES)
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
