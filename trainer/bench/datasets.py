"""Loaders for the four evaluation formats. Each returns a plain object of paths and labels;
images are decoded only when a model embeds them (and then cached, see ``trainer.bench``).

The formats themselves (class folders, Karpathy JSON, RemoteCount, AIR-SLT) and their path
safety live in :mod:`pipelines.sources.benchmarks`, which decontamination reads too; this
module adds what scoring needs (normalised class names, label arrays).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipelines.sources import benchmarks as fmt
from trainer.bench.registry import normalise_classname

guess_task = fmt.guess_task


@dataclasses.dataclass
class ClassificationData:
    name: str
    classes: list[str]  # folder names, sorted; label = index
    classnames: list[str]  # normalised English names, same order
    paths: list[Path]
    labels: np.ndarray  # int64 [N]
    splits: np.ndarray  # str [N]: "train" | "val" | "test" | "whole"

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


@dataclasses.dataclass
class RetrievalData:
    name: str
    paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # int64 [n_captions]: index of the caption's image


@dataclasses.dataclass
class CountingData:
    name: str
    paths: list[Path]
    categories: list[str]
    counts: np.ndarray  # int64 [N]
    captions: list[str]


@dataclasses.dataclass
class SeLoData:
    name: str
    paths: list[Path]
    queries: list[str]
    regions: list[list[np.ndarray]]  # per sample: polygons, each float [K, 2] (x, y)


def load_classification(root: Path, name: str, split: str = "whole") -> ClassificationData:
    """Class-per-folder images. ``split``: "whole" (every image is a test image; probes draw
    their own train split), "test" (``ROOT/train`` + ``ROOT/test`` folders), or a split file."""
    entries = fmt.class_folder_images(str(root), split)
    classes = sorted({e[0] for e in entries})
    index = {c: i for i, c in enumerate(classes)}
    return ClassificationData(
        name=name,
        classes=classes,
        classnames=[normalise_classname(c, name) for c in classes],
        paths=[Path(e[1]) for e in entries],
        labels=np.asarray([index[e[0]] for e in entries], np.int64),
        splits=np.asarray([e[2] for e in entries]),
    )


def load_retrieval(root: Path, name: str, split: str = "test") -> RetrievalData:
    """Karpathy-style captions; ``split`` "whole" keeps every image."""
    jf = fmt.find_json(str(root))
    paths: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    for im in fmt.karpathy_images(jf, split):
        if not im.sentences:
            continue
        paths.append(Path(im.path))
        for s in im.sentences:
            captions.append(s)
            owner.append(len(paths) - 1)
    if not paths:
        raise ValueError(f"{name}: no images with split={split!r} in {jf}")
    return RetrievalData(name, paths, captions, np.asarray(owner, np.int64))


def load_counting(root: Path, name: str, split: str = "whole") -> CountingData:
    items = fmt.counting_items(fmt.find_json(str(root)))
    return CountingData(
        name=name,
        paths=[Path(it["path"]) for it in items],
        categories=[it["category"] for it in items],
        counts=np.asarray([it["count"] for it in items], np.int64),
        captions=[it["caption"] for it in items],
    )


def load_selo(root: Path, name: str, split: str = "whole") -> SeLoData:
    items = fmt.selo_items(fmt.find_json(str(root)))
    return SeLoData(name, [Path(it["path"]) for it in items], [it["query"] for it in items],
                    [[np.asarray(p, np.float64).reshape(-1, 2) for p in it["regions"]]
                     for it in items])


LOADERS = {
    "classification": load_classification,
    "retrieval": load_retrieval,
    "counting": load_counting,
    "selo": load_selo,
}


def load(task: str, root: Path, name: str, split: str = "whole"):
    return LOADERS[task](Path(root), name, split)


def fingerprint(paths: list[Path], *texts: list[str]) -> str:
    """A hash of what a dataset holds (paths, sizes, mtimes, texts): the feature cache key."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for group in texts:
        for t in group:
            h.update(t.encode() + b"\n")
        h.update(b"\1")
    return h.hexdigest()[:16]
