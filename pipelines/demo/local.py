"""The demo world's captioned folder: the ``local`` subset, with planted bad rows.

``build_local(out_dir, seed)`` writes, next to the PUB11 part of a world (build that first)::

    {out}/local/images/<class>/loc-NNNN.jpg   aerial scenes (a seed stream PUB11 never draws)
    {out}/local/metadata.jsonl                Hugging Face ImageFolder-style caption table:
                                              file_name, caption, captions (three per image,
                                              each true to the pixels), lat/lon, license
    {out}/local_truth.parquet                 one row per table line: where it must end

Planted cases (:data:`PLANTED_KINDS`): a missing file, undecodable bytes, an empty caption,
paths that leave the folder (``../``, absolute), a symlink to an image outside the folder, a
line naming an image twice, impossible coordinates, a line that is not JSON, and one image
whose bytes PUB11 also serves: built together, the copy in ``local`` is kept and PUB11's row
becomes its duplicate (your captions beat web alt text). Same seed → same bytes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.demo import scenes

FOLDER = "local"
TRUTH = "local_truth.parquet"
SOURCE = "local"  # the folder's name: the recipe's default source name
STREAM = 7001  # seed stream of local scenes (pub11.py uses 1-11, benchmarks.py 9001)
CAPTIONS_PER_IMAGE = 3
MIN_PHASH_DISTANCE = 12

PLANTED_KINDS: dict[str, tuple[str, str | None, str | None]] = {
    "missing_file": ("rejected", "fetch", "file_not_found"),
    "undecodable": ("rejected", "decode", "not_an_image"),
    "empty_caption": ("rejected", "read", "empty_caption"),
    "parent_path": ("rejected", "read", "path_outside_folder"),
    "absolute_path": ("rejected", "read", "path_outside_folder"),
    "symlink_out": ("rejected", "fetch", "path_not_allowed"),
    "repeated_line": ("rejected", "read", "duplicate_id"),
    "bad_coordinates": ("rejected", "read", "bad_coordinates"),
    "malformed_line": ("rejected", "read", "malformed_row"),
    "shared_with_pub11": ("kept", None, None),
}

_TRUTH_SCHEMA = pa.schema([
    ("source", pa.string()), ("row", pa.int64()), ("source_id", pa.string()),
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("is_rs", pa.bool_()), ("scene_class", pa.string()), ("everyday_kind", pa.string()),
    ("planted", pa.string()), ("expected", pa.string()), ("expected_stage", pa.string()),
    ("expected_reason", pa.string()), ("duplicate_group", pa.string()),
    ("image", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("phash", pa.string()), ("objects", pa.string()), ("boxes", pa.string()),
    ("shared_key", pa.string()),
])


def _rng(seed: int, i: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM, i, attempt])


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _pool(out_dir: str) -> Any:
    """The crop-aware pHash pool of every PUB11 picture (local scenes must be far from them)."""
    from pipelines.demo.pub11 import _hashes, _PhashPool

    pool = _PhashPool()
    gt = pq.read_table(os.path.join(out_dir, "ground_truth.parquet")).to_pylist()
    # the pictures PUB11 serves: its clean and copied scenes and everyday photos (the planted
    # bad files are not pictures, and need no distance)
    for name in sorted({r["image"] for r in gt if r["image"] and r["phash"]}):
        with Image.open(os.path.join(out_dir, "www", "img", name)) as im:
            h, crops = _hashes(im)
        pool.add(h, crops)
    return pool


def build_local(out_dir: str, seed: int = 0, n: int = 30) -> dict[str, Any]:
    """Write the captioned folder and its truth into ``out_dir`` (a built PUB11 world)."""
    from pipelines.demo.pub11 import _hashes
    from pipelines.records import make_key
    from pipelines.sources.folder import safe_relpath

    folder = os.path.join(out_dir, FOLDER)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, "images"))
    pool = _pool(out_dir)
    lines: list[Any] = []  # table lines, in order (a dict, or raw text for a broken line)
    truth: list[dict[str, Any]] = []

    def add(line: Any, **t: Any) -> None:
        row = len(lines)
        lines.append(line)
        name = line.get("file_name") if isinstance(line, dict) else None
        sid = (safe_relpath(name) if name else None) or f"line {row + 1}"
        kind = t.pop("planted", None)
        exp = PLANTED_KINDS[kind] if kind else ("kept", None, None)
        truth.append({"source": SOURCE, "row": row, "source_id": sid,
                      "key": make_key(SOURCE, sid), "url": None,
                      "caption": line.get("caption") if isinstance(line, dict) else None,
                      "is_rs": t.pop("is_rs", True), "planted": kind, "expected": exp[0],
                      "expected_stage": exp[1], "expected_reason": exp[2], **t})

    def scene(i: int, cls: str) -> tuple[Image.Image, dict, list[str]]:
        for attempt in range(20):
            rng = _rng(seed, i, attempt)
            img, meta = scenes.render_scene(cls, rng, 256)
            h, crops = _hashes(img)
            if pool.min_distance(h, crops) >= MIN_PHASH_DISTANCE:
                pool.add(h, crops)
                caps = list(dict.fromkeys(scenes.caption_scene(cls, meta, _rng(seed, i, 100 + k))
                                          for k in range(CAPTIONS_PER_IMAGE * 2)))
                return img, meta, caps[:CAPTIONS_PER_IMAGE]
        raise RuntimeError(f"no distinct local {cls} scene after 20 draws (#{i})")

    def write(rel: str, data: bytes) -> str:
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return rel

    clean = []
    for i in range(n):
        cls = scenes.CLASSES[i % len(scenes.CLASSES)]
        img, meta, caps = scene(i, cls)
        rel = write(f"images/{cls}/loc-{i:04d}.jpg", _jpeg(img))
        rng = _rng(seed, i, 999)
        line = {"file_name": rel, "caption": caps[0], "captions": caps, "license": "cc-by-4.0"}
        if i % 2 == 0:
            line["lat"] = round(float(rng.uniform(-60, 70)), 5)
            line["lon"] = round(float(rng.uniform(-180, 180)), 5)
        clean.append(line)
        add(line, scene_class=cls, image=rel, width=img.width, height=img.height,
            objects=json.dumps(meta["objects"], sort_keys=True))

    def planted_scene(j: int) -> tuple[str, list[str]]:
        cls = scenes.CLASSES[j % len(scenes.CLASSES)]
        img, _, caps = scene(1000 + j, cls)
        return write(f"images/planted/p-{j:02d}.jpg", _jpeg(img)), caps

    add({"file_name": "images/missing/gone.jpg", "caption": "aerial view of a farm"},
        planted="missing_file")
    write("images/planted/undecodable.jpg", bytes(_rng(seed, 2000).integers(0, 256, 4000,
                                                                            dtype=np.uint8)))
    add({"file_name": "images/planted/undecodable.jpg", "caption": "aerial view of a lake"},
        planted="undecodable", is_rs=False)
    rel, caps = planted_scene(0)
    add({"file_name": rel, "caption": "   "}, planted="empty_caption")
    add({"file_name": "../www/img/rs-00000.jpg", "caption": "aerial view of a harbor"},
        planted="parent_path", is_rs=False)
    add({"file_name": "/etc/passwd", "caption": "satellite image of a forest"},
        planted="absolute_path", is_rs=False)
    # relative, so the world's bytes do not depend on where it is built
    os.symlink(os.path.join("..", "..", "..", "www", "img", "rs-00002.jpg"),
               os.path.join(folder, "images", "planted", "link-out.jpg"))
    add({"file_name": "images/planted/link-out.jpg", "caption": "drone photo of a river"},
        planted="symlink_out", is_rs=False)
    add(dict(clean[1], caption=clean[1]["caption"] + " (again)"), planted="repeated_line")
    rel, caps = planted_scene(1)
    add({"file_name": rel, "caption": caps[0], "lat": 123.4, "lon": 10.0},
        planted="bad_coordinates")
    add('{"file_name": "images/planted/p-01.jpg", "caption": ', planted="malformed_line",
        is_rs=False)
    # an image PUB11 serves too: the first clean PUB11 scene the ground truth keeps
    gt = pq.read_table(os.path.join(out_dir, "ground_truth.parquet")).to_pylist()
    shared = min((r for r in gt if r["expected"] == "kept" and not r["planted"] and r["is_rs"]
                  and not r["duplicate_group"]), key=lambda r: r["key"])
    with open(os.path.join(out_dir, "www", "img", shared["image"]), "rb") as f:
        rel = write("images/shared/from-the-web.jpg", f.read())
    add({"file_name": rel, "caption": f"our own photo: {shared['caption']}"},
        planted="shared_with_pub11", scene_class=shared["scene_class"], image=rel,
        shared_key=shared["key"])

    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line, sort_keys=True)) + "\n")
    rows = [{k: t.get(k) for k in _TRUTH_SCHEMA.names} for t in truth]
    pq.write_table(pa.Table.from_pylist(rows, schema=_TRUTH_SCHEMA),
                   os.path.join(out_dir, TRUTH), compression="snappy")
    return {"rows": len(lines), "clean": n, "planted": len(lines) - n,
            "shared_pub11_key": shared["key"]}
