"""A RemoteCount-style counting benchmark from held-out detection annotations.

RemoteCLIP's RemoteCount (947 images, mostly DOTA val; 13 categories; counts 1-10) is not
public. This builds the same kind of set from any detection dataset the RemoteCLIP head reads
(DOTA, VOC, COCO, YOLO)::

    python -m pipelines.remotecount --annotations dota=dota:/data/DOTA/val \\
        [--annotations ...] --out DIR [--seed 0] [--max_items N] [--classes FILE]

Each dataset is read by the very reader the training build uses
(:func:`pipelines.sources.annotations.list_spec` + ``read_item``: same conventions, same
clipping, same rejects), so what is counted is what a training record would hold. Class
names become caption phrases through ``recipes/data/remoteclip_classes.json``
(:func:`pipelines.stages.box_captions.load_classes`: "small-vehicle" → "small vehicle",
"plane" → "airplane"); one image's objects are counted per phrase, so two raw names of one
phrase add up.

**Items.** For each image and each category with 1 to 10 objects: ``{"filename", "category"
(the singular phrase), "count", "caption": "a satellite image of {count word} {phrase}",
"dataset", "source_id"}`` — the count as a word ("one" .. "ten"; the benchmark's
``swap_count`` replaces it with each candidate), the phrase plural above one. Categories with
more than ten objects give no item (counted as ``over_ten``).

**Copies.** An image whose pHash (as ``Decode`` computes it) lies within
:data:`MAX_HAMMING` bits (dedup's crop-aware distance and threshold) of an image already
taken, in (dataset, source_id) order, gives no item: the benchmark would hold the same
picture twice. It is still listed in the manifest (``duplicate_of``), so a training build
excludes every copy.

**``--max_items``.** Items are shuffled with ``numpy.random.default_rng(seed)`` and the first
N kept; the output is then sorted by (filename, category). Same input and seed → the same
files byte for byte.

**Outputs** (any Beam filesystem): ``DIR/images/<dataset>-<source_id>.<ext>`` (the image's
own bytes; ``/`` in a source_id becomes ``-``); ``DIR/dataset_remotecount.json``, the item
list :func:`pipelines.sources.benchmarks.counting_items` reads (named ``dataset*`` so that
``find_json(DIR)`` picks it before the manifest: ``DIR`` itself is a valid bench path, and a
``--decontam`` path through its ``images/``); and ``DIR/manifest.json``: ``{"generator",
"seed", "max_items", "specs", "images": [{"dataset", "source_id", "key", "filename",
"duplicate_of"}]}``, one entry per image behind an item and per copy of one (``key`` =
``make_key(dataset, source_id)``, what a training build of the same datasets gives that
image; a copy has ``filename`` None and ``duplicate_of`` the kept image's key): the
recipe's ``--holdout`` reads it (``dataset``, ``source_id``) and keeps them all out of
training.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.records import make_key
from pipelines.sinks.shards import join, matching, write_atomic

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten")
MIN_COUNT, MAX_COUNT = 1, 10
#: pHash distance up to which two images are one picture (dedup's default threshold)
MAX_HAMMING = 4
COUNTING_JSON = "dataset_remotecount.json"  # ``dataset*.json``: what find_json takes first
MANIFEST = "manifest.json"
GENERATOR = "rs-corpus-remotecount/1"
SUBSET = "remotecount"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def counting_caption(count: int, singular: str, plural: str) -> str:
    """"a satellite image of three storage tanks"."""
    if not MIN_COUNT <= count <= MAX_COUNT:
        raise ValueError(f"count {count} is outside {MIN_COUNT}..{MAX_COUNT}")
    return f"a satellite image of {NUMBER_WORDS[count]} {singular if count == 1 else plural}"


def image_items(objects: Iterable[Sequence[Any]], phrase: Any) -> tuple[list[dict[str, Any]],
                                                                        int]:
    """The counting items of one image's ``_objects`` (``[label, x0, y0, x1, y1]``):
    (``[{"category", "count", "caption"}]`` sorted by category, how many categories had more
    than ten objects). ``phrase(label)`` → (singular, plural)."""
    counts: dict[str, int] = {}
    plurals: dict[str, str] = {}
    for o in objects:
        singular, plural = phrase(o[0])
        counts[singular] = counts.get(singular, 0) + 1
        plurals[singular] = plural
    items, over = [], 0
    for cat in sorted(counts):
        n = counts[cat]
        if n > MAX_COUNT:
            over += 1
            continue
        items.append({"category": cat, "count": n,
                      "caption": counting_caption(n, cat, plurals[cat])})
    return items, over


def output_name(dataset: str, source_id: str, image_path: str) -> str:
    """``<dataset>-<source_id>.<ext>`` with ``/`` and other unsafe characters as ``-``."""
    ext = posixpath.splitext(image_path)[1].lower() or ".img"
    return _UNSAFE.sub("-", f"{dataset}-{source_id}") + ext


def _hashes(body: bytes) -> tuple[int, list[int]] | None:
    from pipelines.stages.images import normalise_image, split_hashes

    out = normalise_image(body)
    phash = getattr(out, "phash", None)
    if phash is None:
        return None
    return int(phash, 16), split_hashes(out.phash_crops)


def read_images(specs: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every readable image of the detection datasets ``specs`` (``name=format:root``):
    ``[{"dataset", "source_id", "path", "body", "objects"}]`` in (spec, source_id) order,
    and ``{reason: n}`` of what the reader rejected."""
    from pipelines.sources import annotations

    images: list[dict[str, Any]] = []
    rejected: dict[str, int] = {}
    names = set()
    for text in specs:
        spec = annotations.parse_spec(text)
        if spec.format not in annotations.DETECTION_FORMATS:
            raise ValueError(f"{text!r}: remotecount reads detection annotations "
                             f"({', '.join(annotations.DETECTION_FORMATS)}), not {spec.format}")
        if spec.name in names:
            raise ValueError(f"dataset name {spec.name!r} given twice")
        names.add(spec.name)
        for item in annotations.list_spec(spec):
            for out in annotations.read_item(item, subset=SUBSET):
                if isinstance(out, tuple):
                    reason = out[1].reason
                    rejected[reason] = rejected.get(reason, 0) + 1
                    continue
                images.append({"dataset": out["source"], "source_id": out["source_id"],
                               "path": out["url"], "body": out["_body"],
                               "objects": out["_objects"] or []})
    return images, dict(sorted(rejected.items()))


def build_remotecount(specs: Sequence[str], out: str, seed: int = 0,
                      max_items: int | None = None, classes: str | None = None
                      ) -> dict[str, Any]:
    """Write the counting set of ``specs`` to ``out`` (see the module docstring); returns a
    summary: items, images, counts per true count and per category, what was skipped."""
    from pipelines.stages.box_captions import load_classes
    from pipelines.stages.dedup import distance

    if max_items is not None and max_items < 1:
        raise ValueError("max_items must be at least 1")
    names = load_classes(classes)
    images, rejected = read_images(specs)
    taken: list[tuple[dict[str, Any], tuple[int, list[int]]]] = []
    copies: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (copy, the image it copies)
    candidates: list[dict[str, Any]] = []
    used_names: set[str] = set()
    over_ten = no_items = unreadable = 0
    for im in images:
        items, over = image_items(im["objects"], names.phrase)
        over_ten += over
        if not items:
            no_items += 1
            continue
        hashes = _hashes(im["body"])
        if hashes is None:
            unreadable += 1
            continue
        first = next((t for t, h in taken if distance(hashes[0], hashes[1], h[0], h[1])
                      <= MAX_HAMMING), None)
        if first is not None:
            copies.append((im, first))
            continue
        taken.append((im, hashes))
        fn = output_name(im["dataset"], im["source_id"], im["path"])
        if fn in used_names:  # two ids that sanitise alike
            stem, ext = posixpath.splitext(fn)
            fn = f"{stem}-{make_key(im['dataset'], im['source_id'])[:8]}{ext}"
        used_names.add(fn)
        im["filename"] = fn
        for it in items:
            candidates.append({"filename": fn, **it, "dataset": im["dataset"],
                               "source_id": im["source_id"]})
    chosen = candidates
    if max_items is not None and len(candidates) > max_items:
        order = np.random.default_rng(seed).permutation(len(candidates))
        chosen = [candidates[i] for i in sorted(order[:max_items].tolist())]
    chosen = sorted(chosen, key=lambda it: (it["filename"], it["category"]))
    used = {it["filename"] for it in chosen}

    for old in matching(join(out, "images", "*")):
        FileSystems.delete([old])
    manifest = []
    kept_images = [im for im, _ in taken if im["filename"] in used]
    for im in kept_images:
        write_atomic(join(out, "images", im["filename"]), im["body"])
        manifest.append({"dataset": im["dataset"], "source_id": im["source_id"],
                         "key": make_key(im["dataset"], im["source_id"]),
                         "filename": im["filename"], "duplicate_of": None})
    for im, first in copies:
        if first["filename"] in used:
            manifest.append({"dataset": im["dataset"], "source_id": im["source_id"],
                             "key": make_key(im["dataset"], im["source_id"]), "filename": None,
                             "duplicate_of": make_key(first["dataset"], first["source_id"])})
    manifest.sort(key=lambda r: (r["dataset"], r["source_id"]))
    write_atomic(join(out, COUNTING_JSON), (json.dumps(chosen, indent=1) + "\n").encode())
    doc = {"generator": GENERATOR, "seed": seed, "max_items": max_items, "specs": list(specs),
           "images": manifest}
    write_atomic(join(out, MANIFEST), (json.dumps(doc, indent=1) + "\n").encode())

    def tally(key: str) -> dict[str, int]:
        c: dict[str, int] = {}
        for it in chosen:
            c[str(it[key])] = c.get(str(it[key]), 0) + 1
        if key == "count":
            return dict(sorted(c.items(), key=lambda kv: int(kv[0])))
        return dict(sorted(c.items()))

    return {
        "items": len(chosen), "images": len(kept_images),
        "counts": tally("count"), "categories": tally("category"),
        "skipped": {"rejected": rejected, "no_items": no_items, "over_ten": over_ten,
                    "copies": len(copies), "unreadable": unreadable,
                    "not_chosen": len(candidates) - len(chosen)},
        "out": out, "seed": seed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--annotations", action="append", required=True,
                    help="name=format:root of a held-out detection dataset (repeatable, or "
                         "comma-separated); format dota, voc, coco or yolo")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_items", type=int, default=None)
    ap.add_argument("--classes", default=None,
                    help="class-name JSON (default: recipes/data/remoteclip_classes.json)")
    a = ap.parse_args(argv)
    specs = [s.strip() for spec in a.annotations for s in spec.split(",") if s.strip()]
    summary = build_remotecount(specs, a.out, a.seed, a.max_items, a.classes)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
