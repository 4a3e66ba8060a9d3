"""Held-out evaluation sets of the demo world, in the formats of the real benchmarks.

``build_demo_benchmarks(out_dir, seed)`` renders scenes the corpus build never saw — every
picture comes from ``np.random.default_rng([seed, 9001, task, i, attempt])``, a seed stream
that :mod:`pipelines.demo.pub11` (streams 1–11) never draws from — and writes::

    {out_dir}/scenes/<class>/<class>_NNN.jpg     scene classification, class-per-folder,
                                                 every class of scenes.CLASSES
    {out_dir}/scenes/split.json                  {"train": [...], "test": [...]}: the first
                                                 60% of each class train the probes (enough
                                                 for 32-shot), the rest is the test split
    {out_dir}/retrieval/images/ret_NNNN.jpg      5-caption retrieval,
    {out_dir}/retrieval/dataset_demo.json        Karpathy JSON (split "test")
    {out_dir}/counting/images/cnt_NNNN.jpg       RemoteCount-style counting:
    {out_dir}/counting/annotations.json          [{"filename", "category", "count" (1-10),
                                                   "caption"}], counts from meta["objects"]
    {out_dir}/fine/roof_shape/<class>/*.png      SkyScript-style fine-grained set: roof shapes
    {out_dir}/fine/roof_shape/split.json         (flat, gabled, hipped) of buildings drawn in a
                                                 place the SkyScript build never reads, cut as
                                                 its tiles are (pipelines.demo.skyscript)
    {out_dir}/benchmarks.json                    seed, sizes, generator version; written last

The same seed gives byte-identical files. ``python -m pipelines.demo.benchmarks --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

import numpy as np
from PIL import Image

from pipelines.demo import scenes

GENERATOR_VERSION = "rs-corpus-demo-bench/1.2"
STREAM = 9001
TASK_SCENES, TASK_RETRIEVAL, TASK_COUNTING = 1, 2, 3
JPEG_QUALITY = 90
MANIFEST = "benchmarks.json"

#: what a counted object is called in a counting caption (singular)
COUNT_NOUNS: dict[str, str] = {
    "car": "car",
    "airplane": "airplane",
    "boat": "boat",
    "building": "building",
    "storage_tank": "storage tank",
    "umbrella": "beach umbrella",
    "bridge": "bridge",
    "baseball_diamond": "baseball field",
}
#: scene classes whose objects land in 1..10 often enough to be worth rendering for counting
COUNT_CLASSES = ("airport", "industrial", "lake", "beach", "highway", "farmland", "harbor",
                 "parking_lot", "river")


def _rng(seed: int, task: int, i: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM, task, i, attempt])


def _save(img: Image.Image, path: str) -> None:
    img.save(path, "JPEG", quality=JPEG_QUALITY)


def _plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def counting_caption(cls: str, category: str, n: int) -> str:
    """"an aerial image of an airport with 3 airplanes": the count in digits, the scene named."""
    name = scenes.CLASS_NAMES[cls][0]
    art = "an" if name[0] in "aeiou" else "a"
    return f"an aerial image of {art} {name} with {n} {_plural(COUNT_NOUNS[category], n)}"


def build_demo_benchmarks(out_dir: str, seed: int = 0, per_class: int = 60,
                          retrieval_per_class: int = 6, captions_per_image: int = 5,
                          counting_items: int = 100, size: int = 256,
                          fine_per_class: int = 40) -> dict[str, Any]:
    """Write the three demo evaluation sets to ``out_dir`` (replacing what is there)."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    # scene classification
    n = 0
    split: dict[str, list[str]] = {"train": [], "test": []}
    n_train = min(per_class - 1, max(1, round(per_class * 0.6)))
    for ci, cls in enumerate(scenes.CLASSES):
        d = os.path.join(tmp, "scenes", cls)
        os.makedirs(d)
        for j in range(per_class):
            img, _ = scenes.render_scene(cls, _rng(seed, TASK_SCENES, ci * 100000 + j), size)
            _save(img, os.path.join(d, f"{cls}_{j:03d}.jpg"))
            split["train" if j < n_train else "test"].append(f"{cls}/{cls}_{j:03d}.jpg")
            n += 1
    with open(os.path.join(tmp, "scenes", "split.json"), "w") as f:
        json.dump(split, f, indent=0)

    # retrieval: several independent captions of one picture
    rdir = os.path.join(tmp, "retrieval")
    os.makedirs(os.path.join(rdir, "images"))
    images = []
    k = 0
    for j in range(retrieval_per_class):
        for ci, cls in enumerate(scenes.CLASSES):
            rng = _rng(seed, TASK_RETRIEVAL, k)
            img, meta = scenes.render_scene(cls, rng, size)
            caps: list[str] = []
            for _ in range(100):
                if len(caps) == captions_per_image:
                    break
                c = scenes.caption_scene(cls, meta, rng)
                if c not in caps:
                    caps.append(c)
            while len(caps) < captions_per_image:  # a class with few phrasings
                caps.append(scenes.caption_scene(cls, meta, rng))
            fn = f"ret_{k:04d}.jpg"
            _save(img, os.path.join(rdir, "images", fn))
            images.append({"filename": fn, "imgid": k, "split": "test", "class": cls,
                           "sentences": [{"raw": c, "sentid": k * captions_per_image + s}
                                         for s, c in enumerate(caps)]})
            k += 1
    with open(os.path.join(rdir, "dataset_demo.json"), "w") as f:
        json.dump({"dataset": "demo", "images": images}, f, indent=1)

    # counting: true counts 1..10 of one object type per image
    cdir = os.path.join(tmp, "counting")
    os.makedirs(os.path.join(cdir, "images"))
    items = []
    quota = -(-counting_items // 10)  # at most this many images per true count ...
    per_count = dict.fromkeys(range(1, 11), 0)
    budget = 4 * counting_items  # ... until this many renders, then any count is taken
    renders = 0
    i = 0
    while len(items) < counting_items:
        cls = COUNT_CLASSES[i % len(COUNT_CLASSES)]
        rng = _rng(seed, TASK_COUNTING, i)
        i += 1
        renders += 1
        img, meta = scenes.render_scene(cls, rng, size)
        cats = sorted(c for c, v in meta["objects"].items() if c in COUNT_NOUNS and 1 <= v <= 10
                      and (renders > budget or per_count[v] < quota))
        if not cats:
            continue
        cat = cats[int(rng.integers(len(cats)))]
        cnt = int(meta["objects"][cat])
        per_count[cnt] += 1
        fn = f"cnt_{len(items):04d}.jpg"
        _save(img, os.path.join(cdir, "images", fn))
        items.append({"filename": fn, "class": cls, "category": COUNT_NOUNS[cat], "count": cnt,
                      "caption": counting_caption(cls, cat, cnt)})
    with open(os.path.join(cdir, "annotations.json"), "w") as f:
        json.dump(items, f, indent=1)

    # fine-grained: roof shapes of buildings the SkyScript build never saw
    from pipelines.demo.skyscript import build_fine_benchmark

    fine = build_fine_benchmark(os.path.join(tmp, "fine"), seed, n_per_class=fine_per_class)
    fine["root"] = "fine/roof_shape"  # not the temporary folder it was written to

    manifest = {
        "generator": GENERATOR_VERSION, "seed": seed, "stream": STREAM, "size": size,
        "scenes": {"classes": list(scenes.CLASSES), "per_class": per_class, "images": n,
                   "train": len(split["train"]), "test": len(split["test"])},
        "retrieval": {"images": len(images), "captions_per_image": captions_per_image},
        "counting": {"items": len(items),
                     "counts": {str(c): sum(1 for it in items if it["count"] == c)
                                for c in range(1, 11)}},
        "fine": fine,
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return manifest


def ensure_demo_benchmarks(out_dir: str, seed: int = 0, **kw: Any) -> dict[str, Any]:
    """The manifest of ``out_dir``, building the sets first if missing or built otherwise."""
    mf = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(mf):
        with open(mf) as f:
            m = json.load(f)
        if m.get("seed") == seed and m.get("generator") == GENERATOR_VERSION and not kw:
            return m
    return build_demo_benchmarks(out_dir, seed, **kw)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/demo/bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per_class", type=int, default=60)
    a = ap.parse_args(argv)
    m = build_demo_benchmarks(a.out, a.seed, per_class=a.per_class)
    print(json.dumps(m, indent=1))


if __name__ == "__main__":
    main()
