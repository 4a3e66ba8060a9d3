"""Evaluation datasets in their public formats: the one reader that decontamination
(``pipelines.stages.decontam``) and the benchmark harness (``trainer.bench``) both use.

Formats (paths local, or on any Beam filesystem: gs://, s3://):

* **classification**: class-per-folder (``ROOT/<class>/<image>``), optionally with ``ROOT/train``
  and ``ROOT/test`` (and ``val``) each holding the class folders, or a split file (JSON
  ``{"train": [relpath...], "val": [...], "test": [...]}``, paths relative to ROOT);
* **retrieval**: Karpathy-style JSON (``{"images": [{"filename", "filepath"?, "split",
  "sentences": [{"raw"}...]}]}``, the RSICD/RSITMD/UCM-captions releases), images in
  ``ROOT/images``, ``ROOT/imgs``, beside the JSON, or under ``filepath``;
* **counting**: RemoteCount-style JSON, a list (or ``{"annotations": [...]}``) of
  ``{"filename", "category", "count" (1-10), "caption"}``;
* **selo**: AIR-SLT-style JSON, a list of ``{"image"|"jpg_name", "query"|"caption",
  "regions"|"points": [[[x, y], ...], ...]}``.

Annotation files are input too: a file name that is absolute, climbs out with ``..`` or
resolves (through a symlink) outside the dataset's folder is refused with
:class:`BenchmarkFormatError` naming the entry, so a benchmark JSON cannot make us read
``/etc/...``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from typing import Any

from apache_beam.io.filesystems import FileSystems

from pipelines.sinks.shards import join, matching

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
TASKS = ("classification", "retrieval", "counting", "selo")


class BenchmarkFormatError(ValueError):
    """A benchmark file that is malformed, or names a path outside its dataset folder."""


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTS)


def _remote(path: str) -> bool:
    return "://" in path


def dirname(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if _remote(path) else os.path.dirname(path)


def exists(path: str) -> bool:
    return FileSystems.exists(path) if _remote(path) else os.path.exists(path)


def is_file(path: str) -> bool:
    if _remote(path):
        return bool(FileSystems.match([path])[0].metadata_list)
    return os.path.isfile(path)


def read_json(path: str) -> Any:
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            return json.loads(f.read())
    except ValueError as e:
        raise BenchmarkFormatError(f"{path}: not valid JSON ({e})") from e


def inside(root: str, rel: str, what: str = "path") -> str:
    """``root``/``rel``, refused unless it stays inside ``root`` (symlinks resolved on disk)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise BenchmarkFormatError(f"{what} {rel!r} is not a file name")
    r = rel.replace("\\", "/")
    if r.startswith("/") or "://" in r or (len(r) > 1 and r[1] == ":"):
        raise BenchmarkFormatError(f"{what} {rel!r} is absolute: benchmark files name images "
                                   f"relative to their folder {root}")
    norm = posixpath.normpath(r)
    if norm == ".." or norm.startswith("../"):
        raise BenchmarkFormatError(f"{what} {rel!r} leaves the dataset folder {root}")
    path = join(root, norm)
    if not _remote(root) and os.path.exists(path):
        real_root = os.path.realpath(root)
        if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
            raise BenchmarkFormatError(f"{what} {rel!r} resolves outside the dataset folder "
                                       f"{root} (a symlink)")
    return path


def _subdirs(root: str) -> list[str]:
    """Names of the folders directly under ``root``."""
    if _remote(root):
        prefix = root.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/", 1)[0] for p in matching(prefix + "*/*")})
    return sorted(d.name for d in os.scandir(root) if d.is_dir())


def _images_in(folder: str) -> list[str]:
    return [p for p in matching(join(folder, "*")) if is_image(p)]


def find_json(root: str) -> str:
    """The annotation JSON of a dataset folder (``dataset*.json`` first), or ``root`` itself."""
    if root.lower().endswith(".json"):
        return root
    for pat in ("dataset*.json", "*.json"):
        hits = matching(join(root, pat))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"no JSON annotation file in {root}")


def guess_task(root: str) -> str:
    """Which of :data:`TASKS` a dataset path holds, from its contents."""
    root = str(root)
    if not root.lower().endswith(".json"):
        subdirs = [d for d in _subdirs(root) if d not in ("images", "imgs")]
        jsons = matching(join(root, "*.json"))
        if jsons and not any(_images_in(join(root, d)) for d in subdirs):
            return guess_task(jsons[0])
        return "classification"
    data = read_json(root)
    if isinstance(data, dict) and "images" in data:
        return "retrieval"
    items = data.get("annotations", data) if isinstance(data, dict) else data
    if items and isinstance(items, list) and isinstance(items[0], dict):
        first = items[0]
        if "count" in first:
            return "counting"
        if "points" in first or "regions" in first:
            return "selo"
    raise BenchmarkFormatError(f"cannot tell which benchmark format {root} is")


# ----------------------------------------------------------------------------- readers


def class_folder_images(root: str, split: str = "whole") -> list[tuple[str, str, str]]:
    """(class folder, image path, split) of a class-per-folder dataset. ``split``: "whole"
    (every image; ``train``/``test`` folders are read with their split when present),
    "test" (``ROOT/train`` + ``ROOT/test`` folders), or the path of a split file."""
    root = str(root).rstrip("/")
    entries: list[tuple[str, str, str]] = []
    if split not in ("whole", "test"):
        sf = split if (os.path.isabs(split) or _remote(split) or exists(split)) \
            else join(root, split)
        table = read_json(sf)
        if not isinstance(table, dict):
            raise BenchmarkFormatError(f"{sf}: a split file maps split names to path lists")
        for part, rels in table.items():
            for rel in rels:
                p = inside(root, rel, f"{sf} entry")
                entries.append((posixpath.basename(dirname(p)), p, part))
    elif split == "test" or {"train", "test"} <= set(_subdirs(root)):
        for part in ("train", "val", "test"):
            d = join(root, part)
            if part in _subdirs(root):
                for c in _subdirs(d):
                    entries += [(c, p, part) for p in _images_in(join(d, c))]
    else:
        for c in _subdirs(root):
            entries += [(c, p, "whole") for p in _images_in(join(root, c))]
    if not entries:
        raise FileNotFoundError(f"no class folders with images under {root}")
    return entries


def _image_path(base: str, filename: str, filepath: str | None = None) -> str:
    """Where a Karpathy/counting/SeLo entry's image is (first existing candidate), inside
    ``base``."""
    cands = ([inside(base, posixpath.join(filepath, filename), "filepath/filename")]
             if filepath else [])
    cands += [inside(base, posixpath.join(d, filename), "filename") if d else
              inside(base, filename, "filename") for d in ("images", "imgs", "")]
    for c in cands:
        if is_file(c):
            return c
    return cands[0]


@dataclasses.dataclass
class CaptionedImage:
    filename: str
    path: str
    split: str
    sentences: list[str]


def karpathy_images(json_path: str, split: str = "test") -> list[CaptionedImage]:
    """Images of a Karpathy-style caption JSON; ``split`` "whole" keeps every image."""
    data = read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BenchmarkFormatError(f"{json_path}: no 'images' list (Karpathy format)")
    base = dirname(json_path)
    out = []
    for im in data["images"]:
        if not isinstance(im, dict) or "filename" not in im:
            raise BenchmarkFormatError(f"{json_path}: an image entry without 'filename'")
        if split != "whole" and im.get("split", "test") != split:
            continue
        sents = [s["raw"] if isinstance(s, dict) else str(s) for s in im.get("sentences", [])]
        sents = [s.strip() for s in sents if s and s.strip()]
        path = _image_path(base, str(im["filename"]), im.get("filepath"))
        out.append(CaptionedImage(str(im["filename"]), path, im.get("split", "test"), sents))
    return out


def _items(json_path: str) -> list[dict]:
    data = read_json(json_path)
    items = data.get("annotations", data) if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
        raise BenchmarkFormatError(f"{json_path}: expected a list of objects")
    return items


def counting_items(json_path: str) -> list[dict[str, Any]]:
    """RemoteCount-style items, each with its image ``path`` resolved inside the folder."""
    base = dirname(json_path)
    return [{"path": _image_path(base, str(it.get("filename") or it["image"])),
             "category": str(it["category"]), "count": int(it["count"]),
             "caption": str(it["caption"])} for it in _items(json_path)]


def selo_items(json_path: str) -> list[dict[str, Any]]:
    """AIR-SLT-style items: image ``path``, ``query`` and ``regions`` (lists of [x, y])."""
    base = dirname(json_path)
    out = []
    for it in _items(json_path):
        fn = it.get("image") or it.get("jpg_name") or it["filename"]
        out.append({"path": _image_path(base, str(fn)),
                    "query": str(it.get("query") or it["caption"]),
                    "regions": it.get("regions") or it["points"]})
    return out


def split_suffix(path: str) -> tuple[str, tuple[str, ...]]:
    """``"d/rsicd.json::imgs@test@val"`` → (``"d/rsicd.json::imgs"``, ``("test", "val")``): a
    caption JSON's splits to read (none: every split)."""
    head, *splits = str(path).split("@")
    if not splits or any(not s or "/" in s or ":" in s for s in splits):
        return str(path), ()
    return head, tuple(splits)


def benchmark_images(path: str) -> list[tuple[str, str]]:
    """(image id relative to the benchmark, full path) of every image of one benchmark, for
    decontamination: a caption JSON (``file.json`` or ``file.json::IMAGE_DIR``; every split,
    or only those named after ``@``: ``file.json@test@val``), a folder holding exactly one
    JSON, or class folders (and images at the top)."""
    path, splits = split_suffix(path)
    json_path, _, image_dir = str(path).partition("::")
    if not json_path.lower().endswith(".json"):
        root = json_path.rstrip("/")
        jsons = matching(join(root, "*.json"))
        if len(jsons) == 1:
            json_path = jsons[0]
        else:
            found = [p for p in matching(join(root, "*", "*")) if is_image(p)]
            found += [p for p in matching(join(root, "*")) if is_image(p)]
            if not found:
                raise FileNotFoundError(
                    f"no benchmark images under {path} (class folders or a JSON)")
            return sorted((p[len(root) + 1:], p) for p in found)
    data = read_json(json_path)
    items = data.get("images", data) if isinstance(data, dict) else data
    entries: list[tuple[str, str | None]] = []  # (file name, Karpathy "filepath")
    for it in items if isinstance(items, list) else []:
        if isinstance(it, str):
            entries.append((it, None))
        elif isinstance(it, dict):
            if splits and it.get("split") not in splits:
                continue
            n = it.get("filename") or it.get("image") or it.get("file_name") or it.get("imgid")
            if n is not None:
                entries.append((str(n), it.get("filepath")))
    base = image_dir or dirname(json_path)
    out = []
    for n, filepath in dict.fromkeys(entries):
        p = _image_path(base, n, filepath if not image_dir else None)
        if not exists(p):
            raise FileNotFoundError(f"{json_path}: image {n!r} not found under {base}")
        out.append((n, p))
    return out
