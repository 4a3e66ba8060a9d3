"""Loaders for the four evaluation formats. Each returns a plain object of paths and labels;
images are decoded only when a model embeds them (and then cached, see ``trainer.bench``).

* classification: class-per-folder (``ROOT/<class>/<image>``), optionally with ``ROOT/train``
  and ``ROOT/test`` each holding the class folders, or a split file (JSON
  ``{"train": [relpath...], "val": [...], "test": [...]}``, paths relative to ROOT).
* retrieval: Karpathy-style JSON (``{"images": [{"filename", "filepath"?, "split",
  "sentences": [{"raw"}...]}]}``, RSICD/RSITMD/UCM-captions releases), images in
  ``ROOT/images`` (or beside the JSON, or under ``filepath``).
* counting: RemoteCount-style JSON, a list (or ``{"annotations": [...]}``) of
  ``{"filename", "category", "count" (1-10), "caption"}`` where ``caption`` states the true count.
* selo: AIR-SLT-style JSON, a list of ``{"image"|"jpg_name", "query"|"caption",
  "regions"|"points": [[[x, y], ...], ...]}`` (ground-truth polygons in pixels).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from trainer.bench.registry import normalise_classname

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


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


def guess_task(root: Path) -> str:
    """Which loader a dataset path needs, from its contents."""
    if root.is_dir():
        subdirs = [d for d in root.iterdir() if d.is_dir()]
        jsons = sorted(root.glob("*.json"))
        if jsons and not any(any(_is_image(f) for f in d.iterdir()) for d in subdirs
                             if d.name not in ("images", "imgs")):
            return guess_task(jsons[0])
        return "classification"
    data = json.loads(root.read_text())
    if isinstance(data, dict) and "images" in data:
        return "retrieval"
    items = data.get("annotations", data) if isinstance(data, dict) else data
    if items and isinstance(items, list):
        first = items[0]
        if "count" in first:
            return "counting"
        if "points" in first or "regions" in first:
            return "selo"
    raise ValueError(f"cannot tell which benchmark format {root} is")


def load_classification(root: Path, name: str, split: str = "whole") -> ClassificationData:
    """Class-per-folder images. ``split``: "whole" (every image is a test image; probes draw
    their own train split), "test" (``ROOT/train`` + ``ROOT/test`` folders), or a split file."""
    root = Path(root)
    entries: list[tuple[str, Path, str]] = []  # (class, path, split)
    if split not in ("whole", "test"):
        sf = Path(split)
        if not sf.is_absolute() and not sf.exists():
            sf = root / split
        table = json.loads(sf.read_text())
        for part, rels in table.items():
            for rel in rels:
                p = root / rel
                entries.append((p.parent.name, p, part))
    elif split == "test" or ((root / "train").is_dir() and (root / "test").is_dir()):
        for part in ("train", "val", "test"):
            d = root / part
            if d.is_dir():
                for c in sorted(x for x in d.iterdir() if x.is_dir()):
                    entries += [(c.name, p, part) for p in sorted(c.iterdir()) if _is_image(p)]
    else:
        for c in sorted(x for x in root.iterdir() if x.is_dir()):
            entries += [(c.name, p, "whole") for p in sorted(c.iterdir()) if _is_image(p)]
    if not entries:
        raise FileNotFoundError(f"{name}: no class folders with images under {root}")
    classes = sorted({e[0] for e in entries})
    index = {c: i for i, c in enumerate(classes)}
    return ClassificationData(
        name=name,
        classes=classes,
        classnames=[normalise_classname(c, name) for c in classes],
        paths=[e[1] for e in entries],
        labels=np.asarray([index[e[0]] for e in entries], np.int64),
        splits=np.asarray([e[2] for e in entries]),
    )


def _find_json(root: Path) -> Path:
    if root.is_file():
        return root
    for pat in ("dataset*.json", "*.json"):
        hits = sorted(root.glob(pat))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"no JSON annotation file in {root}")


def _image_path(base: Path, filename: str, filepath: str | None = None) -> Path:
    cands = ([base / filepath / filename] if filepath else []) + [
        base / "images" / filename, base / "imgs" / filename, base / filename]
    for c in cands:
        if c.is_file():
            return c
    return cands[0] if filepath else base / "images" / filename


def load_retrieval(root: Path, name: str, split: str = "test") -> RetrievalData:
    """Karpathy-style captions; ``split`` "whole" keeps every image."""
    jf = _find_json(Path(root))
    base = jf.parent
    data = json.loads(jf.read_text())
    paths: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    for im in data["images"]:
        if split != "whole" and im.get("split", "test") != split:
            continue
        sents = [s["raw"] if isinstance(s, dict) else str(s) for s in im["sentences"]]
        if not sents:
            continue
        paths.append(_image_path(base, im["filename"], im.get("filepath")))
        for s in sents:
            captions.append(s.strip())
            owner.append(len(paths) - 1)
    if not paths:
        raise ValueError(f"{name}: no images with split={split!r} in {jf}")
    return RetrievalData(name, paths, captions, np.asarray(owner, np.int64))


def _items(jf: Path) -> list[dict]:
    data = json.loads(jf.read_text())
    return data.get("annotations", data) if isinstance(data, dict) else data


def load_counting(root: Path, name: str, split: str = "whole") -> CountingData:
    jf = _find_json(Path(root))
    items = _items(jf)
    return CountingData(
        name=name,
        paths=[_image_path(jf.parent, it.get("filename") or it["image"]) for it in items],
        categories=[str(it["category"]) for it in items],
        counts=np.asarray([int(it["count"]) for it in items], np.int64),
        captions=[str(it["caption"]) for it in items],
    )


def load_selo(root: Path, name: str, split: str = "whole") -> SeLoData:
    jf = _find_json(Path(root))
    items = _items(jf)
    paths, queries, regions = [], [], []
    for it in items:
        fn = it.get("image") or it.get("jpg_name") or it["filename"]
        paths.append(_image_path(jf.parent, fn))
        queries.append(str(it.get("query") or it["caption"]))
        polys = it.get("regions") or it["points"]
        regions.append([np.asarray(p, np.float64).reshape(-1, 2) for p in polys])
    return SeLoData(name, paths, queries, regions)


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
