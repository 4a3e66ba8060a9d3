"""MillionAID → RS3 records (no metadata but the class folders of ``train/``).

Layout: ``train/`` holds the 10,000 labelled images in a three-level class hierarchy (8
first-level classes, 28 second-level, 51 leaves), one folder per level:
``train/agriculture_land/arable_land/dry_field/P0335343.jpg``; ``test/`` holds the 990,848
unlabelled images flat. Checked with ``search``: public code loads a train image from
``Million-AID/train/agriculture_land/arable_land/dry_field/P0335343.jpg``, and the Hugging Face
copy of MillionAID's train split (jonathan-roberts1/Million-AID) carries three labels per
image, ``label_1`` (8 classes: agriculture land, commercial land, industrial land, public
service land, residential land, transportation land, unutilized land, water area),
``label_2`` (28) and ``label_3`` (51), e.g. "commercial land / commercial area / commercial
area" (so a leaf may repeat its parent's name).

Every ``.jpg``/``.jpeg``/``.png``/``.tif``/``.tiff`` under a root is an entry. Under a
``train/`` folder (the first path part), the folders between ``train/`` and the file are the
class path: ``labels`` = that path, leaf last, folder names verbatim (``dry_field``), and
``_meta`` = ``{"hierarchy": [...]}``; anywhere else (``test/``) ``labels`` and ``_meta`` are
None. ``source`` is ``millionaid``, ``source_id`` the path below the root without the
extension, ``url`` the full path, ``_body`` the file's bytes (``Decode`` judges them: a
non-image named ``.jpg`` is rejected there as ``not_an_image``).

License: ``"CC BY-NC-ND 4.0"``, as the Hugging Face copy's card states it, pointing at the
MillionAID challenge's terms and conditions; checked with ``search``.

Rejects (stage ``read``): ``too_large`` (over ``max_bytes``), ``image_unreadable`` (the
file cannot be read).
"""

from __future__ import annotations

import functools
import posixpath
from typing import Any

import apache_beam as beam

from pipelines.sources import archives
from pipelines.sources.archives import ArchiveError, Outcome, base_record, rejected

LICENSE = "CC BY-NC-ND 4.0"
SOURCE = "millionaid"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
TRAIN = "train"


def hierarchy(rel: str) -> list[str] | None:
    """``train/a/b/c/P1.jpg`` → ``["a", "b", "c"]``; None outside ``train/`` or with no
    class folder."""
    parts = rel.split("/")
    if len(parts) >= 3 and parts[0] == TRAIN:
        return parts[1:-1]
    return None


def list_images(files: dict[str, int], root: str) -> list[dict[str, Any]]:
    """The entries of a MillionAID root from its listing (``{rel path: size}``), sorted."""
    items = []
    for rel in sorted(files):
        if posixpath.splitext(rel)[1].lower() not in IMAGE_EXTS:
            continue
        items.append({
            "source": SOURCE,
            "source_id": posixpath.splitext(rel)[0],
            "url": archives.rel_join(root, rel),
            "rel": rel,
            "size": files[rel],
        })
    return items


def list_root(root: str) -> list[dict[str, Any]]:
    return list_images(archives.list_files(root), root)


def read_image(item: dict[str, Any], *, subset: str,
               max_bytes: int = archives.DEFAULT_MAX_BYTES) -> Outcome:
    """One listed image → a record with its class path and bytes, or (record, Reject)."""
    rec = base_record(SOURCE, item["source_id"], item["url"], subset, LICENSE)
    path = hierarchy(item["rel"])
    if path:
        rec["labels"] = list(path)
        rec["_meta"] = {"hierarchy": list(path)}
    try:
        archives.check_size(item["url"], item.get("size") or 0, max_bytes)
        rec["_body"] = archives.read_capped(item["url"], max_bytes)
    except ArchiveError as e:
        return rejected(rec, e.reason, e.detail)
    return rec


class ReadMillionAID(beam.PTransform):
    """MillionAID roots (comma-separated local, gs:// or s3:// folders) → ``{"records",
    "rejects"}``."""

    def __init__(self, roots: str, subset: str = "rs3",
                 max_bytes: int = archives.DEFAULT_MAX_BYTES) -> None:
        super().__init__()
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.roots = archives.split_roots(roots)
        archives.check_roots(self.roots)
        self.subset = subset
        self.max_bytes = max_bytes

    def expand(self, pbegin: Any) -> Any:
        return pbegin | "MillionAID" >> archives.ReadArchive(
            self.roots, list_root,
            functools.partial(read_image, subset=self.subset, max_bytes=self.max_bytes),
            self.subset, LICENSE, "read_millionaid")
