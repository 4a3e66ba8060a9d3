"""Thumbnails of the sampled samples, read from the build's tar shards.

Only the members asked for are read: each shard named by the index's ``shard`` column is opened
once and walked with ``tarfile`` (``next()``: headers read, data seeked over; ``extractfile``
for a wanted member, never ``extract``) until every wanted ``{key}.jpg`` has been seen; members
of a shard are sorted by key, so the walk stops at the last wanted one. Only regular-file
members whose name is exactly ``{key}.jpg`` and whose size is under a cap are read, into
memory — nothing is extracted to disk. The pixels are opened
with :func:`pipelines.image_guard.open_rgb` (allow-listed formats, pixel and memory budgets),
shrunk, and embedded in the page as small base64 JPEGs.
"""

from __future__ import annotations

import base64
import io
import os
import re
import tarfile
from collections.abc import Iterable

from pipelines import image_guard

THUMB_SIDE = 160
MAX_MEMBER_BYTES = 32 * 2**20
SHARD_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.tar$")


def _walk_tarfile(path: str, names: set[str]) -> dict[str, bytes]:
    """The wanted regular members of an uncompressed tar: ``tarfile`` reads the headers and
    seeks over the data, and the walk stops once every wanted member was seen."""
    out: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:") as tar:
        left = set(names)
        while left:
            m = tar.next()
            if m is None:
                break
            if m.name in left:
                left.discard(m.name)
                if m.isreg() and m.size <= MAX_MEMBER_BYTES:
                    data = tar.extractfile(m)
                    if data is not None:
                        out[m.name] = data.read()
    return out


def read_members(output: str, wanted: Iterable[tuple[str | None, str]]) -> dict[str, bytes]:
    """{key: the ``{key}.jpg`` bytes} for ``(shard, key)`` pairs (missing ones left out)."""
    by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        if shard and key and SHARD_NAME.match(shard) and ".." not in shard:
            by_shard.setdefault(shard, set()).add(f"{key}.jpg")
    out: dict[str, bytes] = {}
    for shard in sorted(by_shard):
        path = os.path.join(output, "shards", shard)
        if not os.path.isfile(path):
            continue
        try:
            found = _walk_tarfile(path, by_shard[shard])
        except (OSError, ValueError, tarfile.TarError):
            continue
        out.update({name[:-4]: data for name, data in found.items()})
    return out


def data_uri(source: bytes | str, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG ``data:`` URI of the picture (bytes, or a local regular file), or None
    when it cannot be opened under the image guards."""
    try:
        img = image_guard.open_rgb(source, max_side=side)
    except (image_guard.ImageRefused, OSError, ValueError):
        return None
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def local_file(url: str | None) -> str | None:
    """The path of a duplicate's input when it is a local file that still exists (archives,
    your folder), else None (web rows: the page never fetches anything)."""
    if not url:
        return None
    url = url.removeprefix("file://")
    if "://" in url or url.startswith("//"):
        return None
    return url if os.path.isfile(url) else None
