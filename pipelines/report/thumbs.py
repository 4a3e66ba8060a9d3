"""Thumbnails of the sampled samples, read from the build's tar shards.

Only the members asked for are read: each shard named by the index's ``shard`` column is opened
once and its 512-byte headers walked (seeking over the data, checksums checked) until every
wanted ``{key}.jpg`` has been seen; members of a shard are sorted by key, so the walk stops at
the last wanted one. Only regular-file members whose name is exactly ``{key}.jpg`` and whose
size is under a cap are read, into memory — nothing is extracted to disk. A tar with anything
but plain USTAR headers (pax or GNU long names) is walked with ``tarfile`` instead, the same
way (``next()`` and ``extractfile``, never ``extract``). The pixels are opened
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


def _walk_ustar(f, names: set[str]) -> dict[str, bytes] | None:
    """The wanted members of a plain USTAR tar (the sink's), by reading only the 512-byte
    headers and seeking over the data; None when the archive uses anything else (pax or GNU
    long names, a bad header): the caller then walks it with ``tarfile``."""
    out: dict[str, bytes] = {}
    left = set(names)
    while left:
        hdr = f.read(512)
        if len(hdr) < 512:
            return None
        if hdr == b"\0" * 512:
            break
        if hdr[257:262] != b"ustar":
            return None
        chk = int(hdr[148:156].strip(b"\0 ") or b"0", 8)
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            return None
        flag = hdr[156:157]
        if flag not in (b"0", b"\0", b"5", b"1", b"2"):
            return None  # pax/GNU headers and the rest: let tarfile read them
        name = hdr[0:100].split(b"\0", 1)[0]
        prefix = hdr[345:500].split(b"\0", 1)[0]
        full = ((prefix + b"/" if prefix else b"") + name).decode("utf-8", "replace")
        size = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
        if full in left and flag in (b"0", b"\0") and size <= MAX_MEMBER_BYTES:
            left.discard(full)
            out[full] = f.read(size)
            f.seek(-size % 512, os.SEEK_CUR)
        else:
            f.seek(size + (-size % 512), os.SEEK_CUR)
    return out


def _walk_tarfile(path: str, names: set[str]) -> dict[str, bytes]:
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
            with open(path, "rb") as f:
                found = _walk_ustar(f, by_shard[shard])
            if found is None:
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
