"""PUB11 of the demo world: LAION-style parquet with planted bad rows, and its ground truth.

RS5M's PUB11 part is eleven public web image-text sets (LAION-2B-en, COYO-700M, CC12M, ...)
filtered down to remote-sensing pairs. This module writes a small stand-in that a pipeline can
be scored against, row by row:

``{out}/pub11/<source>/part-00000.parquet``
    three sources with the column spellings the real sets use: ``laion2b-en`` (``SAMPLE_ID``,
    ``URL``, ``TEXT``, ...), ``coyo-700m`` (``id``, ``url``, ``text``, ``image_phash``, ...)
    and ``cc12m-web`` (``url``, ``caption`` as a *binary* column, so a caption can be invalid
    UTF-8). Rows are aerial scenes with RS captions, everyday photos with everyday captions,
    everyday photos whose captions contain an RS keyword (the RS *image* filter must drop
    them), and planted cases: every way a web row goes wrong (:data:`PLANTED_KINDS`).
``{out}/www/img/``
    the files behind the URLs, served by :mod:`pipelines.demo.server` (URL contract there).
``{out}/ground_truth.parquet``
    one row per parquet row: what it shows and where a correct pipeline puts it.
``{out}/probe/{rs,non_rs}/``
    labelled images from another random stream, to train the RS / non-RS probe.
``{out}/world.json``
    seed, base URL, parameters, counts, classes and the generator version; written last.

Same ``seed`` and ``base_url`` → byte-identical files (fixed JPEG/PNG/WEBP settings, parquet
without timestamps). Duplicates in the ground truth follow the dedup stage's survivor rule
(:mod:`pipelines.stages.dedup`): for identical URLs or bytes the smallest record key survives,
for a recompressed or resized copy the original (more pixels, then more bytes) survives; every
row of one ``duplicate_group`` shows the same picture.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import struct
import zlib
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.demo import scenes

log = logging.getLogger(__name__)

#: bump whenever the bytes of a generated world change for the same seed
# 1.1: cropped copies; crop-aware distinctness. 1.2: hostile rows (ids, caps, local paths and
# buckets, metadata and private addresses, drips, WebP bomb, ICO, extreme aspect ratio) and
# the captioned folder beside (pipelines.demo.local)
GENERATOR_VERSION = "rs-corpus-demo-world/1.4"
DEFAULT_BASE_URL = "http://127.0.0.1:8707"
#: nothing listens on the discard port: connection refused
DEAD_BASE_URL = "http://127.0.0.1:9"
SOURCES = ("laion2b-en", "coyo-700m", "cc12m-web")
PART = "part-00000"
JPEG_QUALITY = 90
COPY_QUALITY = 40
RESIZED_SCALE = 0.7
CROP_SIDE = 0.05  # a cropped copy loses 5% of each side (centred)
SLOW_SECONDS = 6  # beyond the fetch stage's 3 s timeout
BIG_FILE_SIDE = 900  # a 900×900 noise PNG is ~2.4 MB, over a 2 MB byte cap
TINY_SIDE = 16
BOMB_SIZES = ((30000, 30000), (40000, 20000))
#: distinct pictures are at least this many pHash bits apart (dedup uses <= 4)
MIN_PHASH_DISTANCE = 12
#: a recompressed / resized copy is at most this many bits from its original
MAX_COPY_DISTANCE = 2
ROW_GROUP_SIZE = 64

#: planted case -> (expected outcome, stage, reason) under a correct pipeline. For the
#: duplicate cases the planted row is the copy; which member of a group survives follows the
#: dedup survivor rule, so ``ground_truth.parquet`` has the per-row answer.
PLANTED_KINDS: dict[str, tuple[str, str | None, str | None]] = {
    # read: the row is unusable as text
    "empty_caption": ("rejected", "read", "empty_caption"),
    "caption_not_utf8": ("rejected", "read", "caption_not_utf8"),
    "missing_url": ("rejected", "read", "missing_url"),
    # keywords
    "excluded_phrase": ("rejected", "keywords", "excluded_phrase"),
    # fetch
    "connection_refused": ("rejected", "fetch", "connection_error"),
    "http_404": ("rejected", "fetch", "http_404"),
    "http_500": ("rejected", "fetch", "http_500"),
    "http_503": ("rejected", "fetch", "http_503"),
    "slow_response": ("rejected", "fetch", "timeout"),
    "robots_noai": ("rejected", "fetch", "robots_noai"),
    "too_large": ("rejected", "fetch", "too_large"),
    "empty_body": ("rejected", "fetch", "empty_body"),
    # decode
    "html_as_image": ("rejected", "decode", "not_an_image"),
    "truncated_jpeg": ("rejected", "decode", "truncated_image"),
    "decompression_bomb": ("rejected", "decode", "decompression_bomb"),
    "tiny_image": ("rejected", "decode", "too_small"),
    # dedup (reason = the duplicates/ method)
    "repeated_url": ("duplicate", "dedup", "url"),
    "same_bytes": ("duplicate", "dedup", "sha256"),
    "recompressed_copy": ("duplicate", "dedup", "phash"),
    "resized_copy": ("duplicate", "dedup", "phash"),
    "cropped_copy": ("duplicate", "dedup", "phash_crop"),
    # the RS image filter: everyday photos whose captions pass the keyword filter
    "rs_keyword_decoy": ("rejected", "rs_filter", "non_rs"),
    # good rows a careless fetcher or decoder loses
    "redirect": ("kept", None, None),
    "flaky_503": ("kept", None, None),
    "rate_limited_429": ("kept", None, None),
    "palette_png": ("kept", None, None),
    "cmyk_jpeg": ("kept", None, None),
    "gray16_png": ("kept", None, None),
    "exif_rotated": ("kept", None, None),
    "rgba_png": ("kept", None, None),
    "webp": ("kept", None, None),
    # hostile rows: each must be refused, counted, and must not cost the build its time
    "duplicate_id": ("rejected", "read", "duplicate_id"),
    "caption_too_long": ("rejected", "read", "caption_too_long"),
    "local_path": ("rejected", "fetch", "unsupported_scheme"),
    "bucket_url": ("rejected", "fetch", "unsupported_scheme"),
    "metadata_address": ("rejected", "fetch", "address_refused"),
    "private_redirect": ("rejected", "fetch", "address_refused"),
    "header_drip": ("rejected", "fetch", "timeout"),
    "body_drip": ("rejected", "fetch", "timeout"),
    "webp_bomb": ("rejected", "decode", "decompression_bomb"),
    "ico_file": ("rejected", "decode", "not_an_image"),
    "extreme_aspect": ("rejected", "decode", "bad_aspect_ratio"),
}
#: a drip sends a byte every this many seconds, under the fetch timeout (the demo's deadline
#: of 5 s ends it); a WebP of this side decodes into more than the decode byte budget
DRIP_SECONDS = 0.5
WEBP_BOMB_SIDE = 8000
EXTREME_ASPECT = (64, 1_000_000)
#: how many rows of each planted case (rs_keyword_decoy: n_non_rs // 3 instead)
PLANTED_COPIES = 2

#: captions of everyday photos that pass the RS5M keyword list (per everyday kind)
DECOY_CAPTIONS: dict[str, tuple[str, ...]] = {
    "person": ("aerial yoga class in a bright studio", "runway fashion show, model in a {c} dress",
               "drone racing pilot smiling at the camera"),
    "cat": ("my cat watching the drone in the garden",),
    "dog": ("our dog waiting at the airport",),
    "house": ("house for sale near the airport", "new house, aerial photography available on request"),
    "car": ("airport shuttle car, {c}", "{c} car with satellite navigation for sale"),
    "bicycle": ("{c} bicycle parked in the parking lot",),
    "cup": ("coffee in the airport lounge", "morning coffee before the drone show"),
    "food": ("harbor view restaurant, fresh fish on a plate", "bird's eye chili peppers on a plate"),
    "flowers": ("flowers at the harbor market", "{c} flowers in the airport lounge"),
}
#: everyday photos whose captions hit an exclusion of the keyword list
EXCLUDED_CAPTIONS: tuple[tuple[str, str], ...] = (
    ("house", "satellite dish on the roof of a house, photo"),
    ("car", "satellite radio installed in my new car"),
)
#: non-UTF-8 caption bytes (Latin-1 and cp1252 text, as old crawls have them)
NON_UTF8_CAPTIONS: tuple[bytes, ...] = (
    "aerial view of the harbor of Portim\xe3o".encode("latin-1"),
    "\u201csatellite image\u201d of a river near Bras\xedlia".encode("cp1252"),
)
_HTML = (
    b"<!DOCTYPE html>\n<html><head><title>Image not available</title></head>\n"
    b"<body><h1>Sorry</h1><p>This image was removed by its owner.</p></body></html>\n"
)


@dataclasses.dataclass
class _Row:
    url: str | None
    caption: str | bytes | None
    is_rs: bool
    scene_class: str | None = None
    everyday_kind: str | None = None
    planted: str | None = None
    expected: str = "kept"
    expected_stage: str | None = None
    expected_reason: str | None = None
    duplicate_group: str | None = None
    image: str | None = None  # file name under www/img
    width: int | None = None
    height: int | None = None
    phash: str | None = None
    objects: dict[str, int] | None = None
    boxes: list | None = None
    source: str = ""
    source_id: str = ""
    row: int = -1
    key: str = ""
    nbytes: int = 0  # size of the file behind the URL


def _rng(seed: int, stream: int, i: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, i, attempt])


# streams of the seed: independent pictures whatever the other counts are
_S_RS, _S_EVERYDAY, _S_PLANTED, _S_CAPTION, _S_META, _S_PROBE_RS, _S_PROBE_NON_RS = (
    1, 2, 3, 4, 5, 10, 11)


def _encode(img: Image.Image, fmt: str = "JPEG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        kw.setdefault("quality", JPEG_QUALITY)
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _phash(img: Image.Image) -> int:
    import imagehash  # heavy (scipy): only when building

    return int(str(imagehash.phash(img)), 16)


def _hashes(img: Image.Image) -> tuple[int, list[int]]:
    """(full pHash, centre-crop pHashes) as the pipeline's decode stage computes them."""
    from pipelines.stages.images import perceptual_hashes, split_hashes

    full, crops = perceptual_hashes(img.convert("RGB"))
    return int(full, 16), split_hashes(crops)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def decompression_bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR claims ``width``×``height`` RGB over a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


class _PhashPool:
    """pHashes of the distinct pictures so far; a new picture must be far from all of them,
    by dedup's crop-aware distance (full hash against full and centre-crop hashes)."""

    def __init__(self) -> None:
        self.hashes: list[int] = []
        self.crops: list[list[int]] = []

    def min_distance(self, h: int, crops: list[int] = ()) -> int:
        if not self.hashes:
            return 64
        full = np.asarray(self.hashes, dtype=np.uint64)
        d = np.bitwise_count(full ^ np.uint64(h))
        if self.crops and self.crops[0]:
            d = np.minimum(d, np.bitwise_count(np.asarray(self.crops, np.uint64)
                                               ^ np.uint64(h)).min(axis=1))
        for c in crops:
            d = np.minimum(d, np.bitwise_count(full ^ np.uint64(c)))
        return int(d.min())

    def add(self, h: int, crops: list[int] = ()) -> None:
        self.hashes.append(h)
        self.crops.append(list(crops))


class _World:
    def __init__(self, out_dir: str, base_url: str, seed: int) -> None:
        self.out = out_dir
        self.base = base_url.rstrip("/")
        self.seed = seed
        self.img_dir = os.path.join(out_dir, "www", "img")
        self.pool = _PhashPool()
        self.rows: list[_Row] = []
        self.planted_i = 0
        self.redraws = 0
        self.sizes: dict[str, int] = {}

    # --- files and pictures -------------------------------------------------------------
    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.img_dir, name)
        if os.path.exists(path):
            raise FileExistsError(path)  # every picture file is written once
        with open(path, "wb") as f:
            f.write(data)
        self.sizes[name] = len(data)
        return name

    def url(self, path: str) -> str:
        return self.base + path

    def distinct_scene(
        self, stream: int, i: int, cls: str, size: int
    ) -> tuple[Image.Image, dict, int, np.random.Generator]:
        """A scene of ``cls`` whose pHash is far from every picture so far (re-drawn if not)."""
        for attempt in range(20):
            rng = _rng(self.seed, stream, i, attempt)
            img, meta = scenes.render_scene(cls, rng, size)
            h, crops = _hashes(img)
            if self.pool.min_distance(h, crops) >= MIN_PHASH_DISTANCE:
                self.pool.add(h, crops)
                return img, meta, h, rng
            self.redraws += 1
        raise RuntimeError(f"no distinct {cls} scene after 20 draws (stream {stream}, #{i})")

    def distinct_everyday(self, stream: int, i: int, kind: str, size: int):
        for attempt in range(20):
            rng = _rng(self.seed, stream, i, attempt)
            img, caption, kind = scenes.render_everyday_kind(kind, rng, size)
            h, crops = _hashes(img)
            if self.pool.min_distance(h, crops) >= MIN_PHASH_DISTANCE:
                self.pool.add(h, crops)
                return img, caption, h, rng
            self.redraws += 1
        raise RuntimeError(f"no distinct {kind} photo after 20 draws (stream {stream}, #{i})")

    def next_planted(self) -> int:
        self.planted_i += 1
        return self.planted_i

    def planted_scene(self, classes: tuple[str, ...] | None = None, size: int = 256):
        """A fresh distinct RS scene for a planted row: (img, meta, caption, cls, phash)."""
        i = self.next_planted()
        pick = _rng(self.seed, _S_PLANTED, i, 999)
        options = classes or scenes.CLASSES
        cls = options[int(pick.integers(len(options)))]
        img, meta, h, rng = self.distinct_scene(_S_PLANTED, i, cls, size)
        caption = scenes.caption_scene(cls, meta, rng)
        return img, meta, caption, cls, h


def _size(rng: np.random.Generator) -> int:
    return int(rng.choice([224, 256, 256, 320]))


def _hex(h: int) -> str:
    return f"{h:016x}"


def _set_expect(row: _Row, kind: str) -> _Row:
    row.planted = kind
    row.expected, row.expected_stage, row.expected_reason = PLANTED_KINDS[kind]
    return row


# ----------------------------------------------------------------------------- rows


def _clean_rs_rows(w: _World, n_rs: int) -> list[_Row]:
    rows = []
    for i in range(n_rs):
        cls = scenes.CLASSES[i % len(scenes.CLASSES)]
        size = _size(_rng(w.seed, _S_RS, i, 999))
        img, meta, h, rng = w.distinct_scene(_S_RS, i, cls, size)
        caption = scenes.caption_scene(cls, meta, rng)
        name = w.write(f"rs-{i:05d}.jpg", _encode(img))
        rows.append(_Row(url=w.url(f"/img/{name}"), caption=caption, is_rs=True, scene_class=cls,
                         image=name, width=img.width, height=img.height, phash=_hex(h),
                         objects=meta["objects"], boxes=meta["boxes"]))
    return rows


def _everyday_rows(w: _World, n_non_rs: int) -> list[_Row]:
    rows = []
    n_decoys = n_non_rs // 3
    for j in range(n_non_rs):
        kind = scenes.EVERYDAY_KINDS[j % len(scenes.EVERYDAY_KINDS)]
        size = _size(_rng(w.seed, _S_EVERYDAY, j, 999))
        img, caption, h, rng = w.distinct_everyday(_S_EVERYDAY, j, kind, size)
        name = w.write(f"ev-{j:05d}.jpg", _encode(img))
        row = _Row(url=w.url(f"/img/{name}"), caption=caption, is_rs=False, everyday_kind=kind,
                   image=name, width=img.width, height=img.height, phash=_hex(h),
                   expected="rejected", expected_stage="keywords", expected_reason="no_keyword")
        if j % 3 == 2 and j // 3 < n_decoys:
            opts = DECOY_CAPTIONS[kind]
            colour = ("red", "blue", "white", "black", "yellow")[int(rng.integers(5))]
            row.caption = opts[int(rng.integers(len(opts)))].format(c=colour)
            _set_expect(row, "rs_keyword_decoy")
        rows.append(row)
    return rows


def _hostile_rows(w: _World) -> list[_Row]:
    """Rows an attacker writes (issue 16): ids that repeat, megabyte captions, local paths
    and bucket URLs, metadata and private addresses (directly and after a redirect), servers
    that drip, pictures that decode into gigabytes or are not pictures we decode."""
    from urllib.parse import quote

    rows: list[_Row] = []
    B = w.url
    for k in range(PLANTED_COPIES):
        img, meta, cap, cls, h = w.planted_scene()
        name = w.write(f"duplicate_id-{k}.jpg", _encode(img))
        r = _rs_planted_row(w, "duplicate_id", img, meta, cap, cls, h, name, B(f"/img/{name}"))
        r.source = "laion2b-en"  # its SAMPLE_ID repeats an earlier row's (_source_table)
        rows.append(r)
        img, meta, cap, cls, h = w.planted_scene()
        name = w.write(f"caption_too_long-{k}.jpg", _encode(img))
        long = " ".join([cap] * (5000 // len(cap) + 2))
        rows.append(_rs_planted_row(w, "caption_too_long", img, meta, long, cls, h, name,
                                    B(f"/img/{name}")))
        rows.append(_bad_content_row(w, "local_path", ("/proc/self/environ",
                                                       "file:///etc/passwd")[k]))
        rows.append(_bad_content_row(w, "bucket_url", ("gs://rs-corpus-demo/img/a.jpg",
                                                       "s3://rs-corpus-demo/img/b.jpg")[k]))
        rows.append(_bad_content_row(w, "metadata_address", (
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "http://[fd00:ec2::254]/latest/meta-data/")[k]))
        target = ("http://10.0.0.1/img/a.jpg", "http://169.254.169.254/latest/meta-data/")[k]
        rows.append(_bad_content_row(w, "private_redirect",
                                     B(f"/redirect-to?url={quote(target, safe='')}")))
        rows.append(_bad_content_row(w, "header_drip",
                                     B(f"/drip-headers/{DRIP_SECONDS}?id=header_drip-{k}")))
        img, meta, cap, cls, h = w.planted_scene()
        name = w.write(f"body_drip-{k}.jpg", _encode(img))
        rows.append(_rs_planted_row(w, "body_drip", img, meta, cap, cls, h, name,
                                    B(f"/drip-body/{DRIP_SECONDS}/img/{name}")))
        buf = io.BytesIO()  # a few dozen bytes that libwebp decodes into ~1 GB
        Image.new("RGB", (WEBP_BOMB_SIDE, WEBP_BOMB_SIDE), (40 + k, 90, 60)).save(
            buf, "WEBP", lossless=True, method=0)
        name = w.write(f"webp_bomb-{k}.webp", buf.getvalue())
        rows.append(_bad_content_row(w, "webp_bomb", B(f"/img/{name}"), name, WEBP_BOMB_SIDE,
                                     WEBP_BOMB_SIDE))
        img, meta, cap, cls, h = w.planted_scene(size=128)
        buf = io.BytesIO()
        img.save(buf, "ICO", sizes=[(128, 128)])
        name = w.write(f"ico_file-{k}.ico", buf.getvalue())
        r = _rs_planted_row(w, "ico_file", img, meta, cap, cls, None, name, B(f"/img/{name}"))
        r.phash = None
        rows.append(r)
        name = w.write(f"extreme_aspect-{k}.png", decompression_bomb_png(*EXTREME_ASPECT))
        rows.append(_bad_content_row(w, "extreme_aspect", B(f"/img/{name}"), name,
                                     *EXTREME_ASPECT))
    return rows


def _rs_planted_row(w: _World, kind: str, img, meta, caption, cls, h, name, url) -> _Row:
    row = _Row(url=url, caption=caption, is_rs=True, scene_class=cls, image=name,
               width=img.width, height=img.height, phash=_hex(h) if h is not None else None,
               objects=meta["objects"], boxes=meta["boxes"])
    return _set_expect(row, kind)


def _bad_content_row(w: _World, kind: str, url: str | None, image: str | None = None,
                     width: int | None = None, height: int | None = None) -> _Row:
    """A row with an RS caption whose URL gives no usable aerial picture."""
    i = w.next_planted()
    rng = _rng(w.seed, _S_PLANTED, i, 998)
    cls = scenes.CLASSES[int(rng.integers(len(scenes.CLASSES)))]
    _, meta = scenes.render_scene(cls, rng, 128)  # only its caption is used
    caption = scenes.caption_scene(cls, meta, rng)
    row = _Row(url=url, caption=caption, is_rs=False, image=image, width=width, height=height)
    return _set_expect(row, kind)


def _planted_rows(w: _World) -> list[_Row]:
    rows: list[_Row] = []
    B = w.url
    for k in range(PLANTED_COPIES):
        # --- read -------------------------------------------------------------------------
        img, meta, cap, cls, h = w.planted_scene()
        name = w.write(f"empty_caption-{k}.jpg", _encode(img))
        rows.append(_rs_planted_row(w, "empty_caption", img, meta, "", cls, h, name,
                                    B(f"/img/{name}")))
        img, meta, cap, cls, h = w.planted_scene()
        name = w.write(f"caption_not_utf8-{k}.jpg", _encode(img))
        r = _rs_planted_row(w, "caption_not_utf8", img, meta, NON_UTF8_CAPTIONS[k], cls, h, name,
                            B(f"/img/{name}"))
        r.source = "cc12m-web"  # the only source with a binary caption column
        rows.append(r)
        img, meta, cap, cls, h = w.planted_scene()
        rows.append(_rs_planted_row(w, "missing_url", img, meta, cap, cls, h, None, None))
        # --- keywords ---------------------------------------------------------------------
        kind, text = EXCLUDED_CAPTIONS[k % len(EXCLUDED_CAPTIONS)]
        img, _, h, _ = w.distinct_everyday(_S_PLANTED, w.next_planted(), kind, 256)
        name = w.write(f"excluded_phrase-{k}.jpg", _encode(img))
        rows.append(_set_expect(
            _Row(url=B(f"/img/{name}"), caption=text, is_rs=False, everyday_kind=kind, image=name,
                 width=img.width, height=img.height, phash=_hex(h)), "excluded_phrase"))
        # --- fetch ------------------------------------------------------------------------
        rows.append(_bad_content_row(w, "connection_refused",
                                     f"{DEAD_BASE_URL}/img/connection_refused-{k}.jpg"))
        rows.append(_bad_content_row(
            w, "http_404", B(f"/status/404?id=http_404-{k}") if k == 0
            else B(f"/img/http_404-{k}-removed.jpg")))  # a file that does not exist
        rows.append(_bad_content_row(w, "http_500", B(f"/status/500?id=http_500-{k}")))
        rows.append(_bad_content_row(
            w, "http_503", B(f"/status/503?id=http_503-{k}") if k == 0
            else B(f"/flaky/1000000/img/http_503-{k}.jpg")))  # 503 for a million requests
        for kind, route in (("slow_response", f"/slow/{SLOW_SECONDS}/img/"),
                            ("robots_noai", "/noai/img/")):
            img, meta, cap, cls, h = w.planted_scene()
            name = w.write(f"{kind}-{k}.jpg", _encode(img))
            rows.append(_rs_planted_row(w, kind, img, meta, cap, cls, h, name,
                                        B(f"{route}{name}")))
        big_rng = _rng(w.seed, _S_PLANTED, w.next_planted(), 997)
        noise = big_rng.integers(0, 256, (BIG_FILE_SIDE, BIG_FILE_SIDE, 3), dtype=np.uint8)
        name = w.write(f"too_large-{k}.png", _encode(Image.fromarray(noise), "PNG",
                                                     compress_level=1))
        rows.append(_bad_content_row(w, "too_large", B(f"/img/{name}"), name, BIG_FILE_SIDE,
                                     BIG_FILE_SIDE))
        if k == 0:
            rows.append(_bad_content_row(w, "empty_body", B(f"/empty?id=empty_body-{k}")))
        else:
            name = w.write(f"empty_body-{k}.jpg", b"")
            rows.append(_bad_content_row(w, "empty_body", B(f"/img/{name}"), name))
        # --- decode -----------------------------------------------------------------------
        if k == 0:
            rows.append(_bad_content_row(w, "html_as_image", B(f"/html?id=html_as_image-{k}")))
        else:
            name = w.write(f"html_as_image-{k}.jpg", _HTML)
            rows.append(_bad_content_row(w, "html_as_image", B(f"/img/{name}"), name))
        img, meta, cap, cls, h = w.planted_scene()
        data = _encode(img)
        name = w.write(f"truncated_jpeg-{k}.jpg", data[: len(data) * (5 + k) // 10])
        r = _rs_planted_row(w, "truncated_jpeg", img, meta, cap, cls, h, name, B(f"/img/{name}"))
        r.phash = None
        rows.append(r)
        bw, bh = BOMB_SIZES[k % len(BOMB_SIZES)]
        name = w.write(f"decompression_bomb-{k}.png", decompression_bomb_png(bw, bh))
        rows.append(_bad_content_row(w, "decompression_bomb", B(f"/img/{name}"), name, bw, bh))
        img, meta, cap, cls, h = w.planted_scene(size=128)
        tiny = img.resize((TINY_SIDE, TINY_SIDE), Image.Resampling.LANCZOS)
        name = w.write(f"tiny_image-{k}.jpg", _encode(tiny))
        r = _rs_planted_row(w, "tiny_image", tiny, meta, cap, cls, None, name, B(f"/img/{name}"))
        r.objects = r.boxes = None  # the boxes were for the 128 px render
        rows.append(r)
        # --- good rows behind a hurdle ----------------------------------------------------
        for kind, route in (("redirect", "/redirect/img/"), ("flaky_503", "/flaky/2/img/"),
                            ("rate_limited_429", "/ratelimit/img/")):
            img, meta, cap, cls, h = w.planted_scene()
            name = w.write(f"{kind}-{k}.jpg", _encode(img))
            rows.append(_rs_planted_row(w, kind, img, meta, cap, cls, h, name,
                                        B(f"{route}{name}")))
        # --- hard but valid encodings ----------------------------------------------------
        img, meta, cap, cls, h = w.planted_scene()
        pal = img.quantize(colors=96, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        name = w.write(f"palette_png-{k}.png", _encode(pal, "PNG"))
        rows.append(_rs_planted_row(w, "palette_png", img, meta, cap, cls, h, name,
                                    B(f"/img/{name}")))
        img, meta, cap, cls, h = w.planted_scene()
        name = w.write(f"cmyk_jpeg-{k}.jpg", _encode(img.convert("CMYK")))
        rows.append(_rs_planted_row(w, "cmyk_jpeg", img, meta, cap, cls, h, name,
                                    B(f"/img/{name}")))
        # 16-bit panchromatic: a caption without colour words; full 16-bit range, so a
        # decoder that clips instead of scaling sees a white picture
        i = w.next_planted()
        gcls = ("airport", "parking_lot", "harbor", "industrial", "river", "residential")[
            int(_rng(w.seed, _S_PLANTED, i, 999).integers(6))]
        gimg, gmeta, h, grng = w.distinct_scene(_S_PLANTED, i, gcls, 256)
        grey = np.asarray(gimg.convert("L"), dtype=np.uint16) * 257
        name = w.write(f"gray16_png-{k}.png", _encode(Image.fromarray(grey), "PNG"))
        gcap = f"panchromatic satellite image of {scenes.scene_phrase(gcls, gmeta, grng)}"
        rows.append(_rs_planted_row(w, "gray16_png", gimg, gmeta, gcap, gcls, h, name,
                                    B(f"/img/{name}")))
        # EXIF Orientation 6: the pixels are stored turned 90° counter-clockwise
        img, meta, cap, cls, h = w.planted_scene()
        exif = Image.Exif()
        exif[0x0112] = 6
        stored = img.transpose(Image.Transpose.ROTATE_90)
        name = w.write(f"exif_rotated-{k}.jpg", _encode(stored, exif=exif.tobytes()))
        rows.append(_rs_planted_row(w, "exif_rotated", img, meta, cap, cls, h, name,
                                    B(f"/img/{name}")))
        # RGBA with transparent no-data corners, like an exported georeferenced tile
        img, meta, cap, cls, h = w.planted_scene()
        S = img.width
        yy, xx = np.mgrid[0:S, 0:S]
        corner = np.minimum(np.minimum(xx + yy, (S - 1 - xx) + yy),
                            np.minimum(xx + (S - 1 - yy), (S - 1 - xx) + (S - 1 - yy)))
        alpha = np.where(corner < S * 0.12, 0, 255).astype(np.uint8)
        rgba = np.dstack([np.asarray(img) * (alpha[..., None] > 0), alpha]).astype(np.uint8)
        name = w.write(f"rgba_png-{k}.png", _encode(Image.fromarray(rgba), "PNG"))
        rows.append(_rs_planted_row(w, "rgba_png", img, meta, cap, cls, h, name,
                                    B(f"/img/{name}")))
        img, meta, cap, cls, h = w.planted_scene()
        name = w.write(f"webp-{k}.webp", _encode(img, "WEBP", quality=85, method=4))
        rows.append(_rs_planted_row(w, "webp", img, meta, cap, cls, h, name, B(f"/img/{name}")))
    return rows


def _duplicate_rows(w: _World, clean: list[_Row]) -> list[_Row]:
    """Copies of clean RS rows: repeated URL, same bytes, recompressed, resized, cropped
    (2 each)."""
    from pipelines.stages.dedup import DEFAULT_MAX_HAMMING

    kinds = ("repeated_url", "same_bytes", "recompressed_copy", "resized_copy", "cropped_copy")
    need = len(kinds) * PLANTED_COPIES
    if len(clean) < need:
        raise ValueError(f"n_rs must be at least {need} (the duplicate cases copy clean rows)")
    order = [int(i) for i in _rng(w.seed, _S_CAPTION, 0).permutation(len(clean))]
    rows: list[_Row] = []
    g = 0
    for k in range(PLANTED_COPIES):
        for kind in kinds:
            while True:
                if not order:
                    raise RuntimeError("no clean row gives a near-identical copy")
                orig = clean[order.pop(0)]
                path = os.path.join(w.img_dir, orig.image)
                with open(path, "rb") as f:
                    data = f.read()
                src = Image.open(io.BytesIO(data))
                src.load()
                stem = orig.image.rsplit(".", 1)[0]
                if kind in ("repeated_url", "same_bytes"):
                    copy_bytes, copy_img = data, src
                    break
                if kind == "recompressed_copy":
                    copy_img = src
                    copy_bytes = _encode(src, quality=COPY_QUALITY)
                elif kind == "resized_copy":
                    sw = max(1, round(src.width * RESIZED_SCALE))
                    sh = max(1, round(src.height * RESIZED_SCALE))
                    copy_img = src.resize((sw, sh), Image.Resampling.LANCZOS)
                    copy_bytes = _encode(copy_img)
                else:
                    dx, dy = round(src.width * CROP_SIDE), round(src.height * CROP_SIDE)
                    copy_img = src.crop((dx, dy, src.width - dx, src.height - dy))
                    copy_bytes = _encode(copy_img)
                decoded = Image.open(io.BytesIO(copy_bytes))
                full = (_phash(decoded) ^ _phash(src)).bit_count()
                if kind != "cropped_copy" and full <= MAX_COPY_DISTANCE:
                    break
                if kind == "cropped_copy" and full > DEFAULT_MAX_HAMMING:
                    # a genuine crop case (the full pHash misses it), near a crop hash
                    _, crops = _hashes(src)
                    near = min((_phash(decoded) ^ c).bit_count() for c in crops)
                    if near <= MAX_COPY_DISTANCE:
                        break
            g += 1
            group = f"dup-{g:03d}"
            orig.duplicate_group = group
            caption = _recaption(orig, _rng(w.seed, _S_CAPTION, g))
            if kind == "repeated_url":
                url, image = orig.url, orig.image
            elif kind == "same_bytes":
                image = w.write(f"{stem}-mirror.jpg", copy_bytes)
                url = w.url(f"/img/{image}")
            else:
                suffix = {"recompressed_copy": "q40", "resized_copy": "small"}.get(kind, "crop")
                image = w.write(f"{stem}-{suffix}.jpg", copy_bytes)
                url = w.url(f"/img/{image}")
            row = _Row(url=url, caption=caption, is_rs=True, scene_class=orig.scene_class,
                       image=image, width=copy_img.width, height=copy_img.height,
                       phash=_hex(_phash(Image.open(io.BytesIO(copy_bytes)))),
                       objects=orig.objects,
                       boxes=None if kind in ("resized_copy", "cropped_copy") else orig.boxes,
                       duplicate_group=group)
            rows.append(_set_expect(row, kind))
    return rows


def _recaption(orig: _Row, rng: np.random.Generator) -> str:
    """Another alt text for the same picture (web copies rarely share their captions)."""
    # a generic phrase (no counts, no colours), so it cannot contradict the picture
    cls = orig.scene_class or "forest"
    name = scenes.CLASS_NAMES[cls][0]
    article = "an" if name[0] in "aeiou" else "a"
    opener = scenes.RS_PREFIXES[int(rng.integers(len(scenes.RS_PREFIXES)))]
    tail = ("", " (reposted)", ", photo by a reader", " #earthfromabove")[int(rng.integers(4))]
    noun = name if cls in ("farmland", "desert") else f"{article} {name}"
    return f"{opener} {noun}{tail}"


# ----------------------------------------------------------------------------- parquet


def _assign_sources(w: _World, clean: list[_Row], everyday: list[_Row], planted: list[_Row],
                    dups: list[_Row]) -> dict[str, list[_Row]]:
    rng = _rng(w.seed, _S_META, 0)
    p = np.array([0.45, 0.35, 0.20])
    for r in clean + everyday:
        r.source = SOURCES[int(rng.choice(3, p=p))]
    counts: Counter[str] = Counter()
    for r in planted + dups:
        if r.source:
            continue
        kind = r.planted or ""
        r.source = SOURCES[(list(PLANTED_KINDS).index(kind) + counts[kind]) % len(SOURCES)]
        counts[kind] += 1
    # a repeated URL: every second one in the same source as its original, the others in
    # another source, picked so that the copies spread over as many sources as they can
    repeated = [r for r in dups if r.planted == "repeated_url"]
    used: list[str] = []
    for i, r in enumerate(repeated):
        orig = next(o for o in clean if o.duplicate_group == r.duplicate_group)
        if i % 2 == 1:
            r.source = orig.source
            used.append(r.source)
    for i, r in enumerate(repeated):
        if i % 2 == 0:
            orig = next(o for o in clean if o.duplicate_group == r.duplicate_group)
            others = [s for s in SOURCES if s != orig.source]
            r.source = min(others, key=lambda s: (used.count(s), SOURCES.index(s)))
            used.append(r.source)
    by_source: dict[str, list[_Row]] = {s: [] for s in SOURCES}
    for r in clean + everyday + planted + dups:
        by_source[r.source].append(r)
    for si, s in enumerate(SOURCES):  # interleave: planted rows are not bunched together
        perm = _rng(w.seed, _S_META, 1 + si).permutation(len(by_source[s]))
        by_source[s] = [by_source[s][int(i)] for i in perm]
        # a repeated id needs an earlier clean row of its own to repeat: move it after one
        repeats = [r for r in by_source[s] if r.planted == "duplicate_id"]
        clean = [i for i, x in enumerate(by_source[s]) if _is_clean(x)]
        for n, r in enumerate(repeats):
            if by_source[s].index(r) < clean[n]:
                by_source[s].remove(r)
                by_source[s].insert(clean[n], r)
    return by_source


def _is_clean(r: _Row) -> bool:
    """A row a repeated id may repeat: an aerial row that is not itself planted to fail."""
    return r.is_rs and (not r.planted or PLANTED_KINDS[r.planted][0] != "rejected")


def _unique_ids(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    out: list[int] = []
    seen: set[int] = set()
    while len(out) < n:
        for v in rng.integers(lo, hi, n):
            v = int(v)
            if v not in seen and len(out) < n:
                seen.add(v)
                out.append(v)
    return out


def _caption_str(c: str | bytes | None) -> str | None:
    if isinstance(c, bytes):
        try:
            return c.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return c


def _source_table(w: _World, source: str, rows: list[_Row]) -> pa.Table:
    rng = _rng(w.seed, _S_META, 10 + SOURCES.index(source))
    n = len(rows)
    sim = [round(float(rng.normal(0.33 if r.is_rs else 0.30, 0.025)), 4) for r in rows]
    if source == "laion2b-en":
        ids = _unique_ids(rng, n, 10**9, 4 * 10**9)
        # a repeated id: the planted row takes the id of a clean RS row earlier in the file
        # (rows were moved after one in _assign_sources), so that row keeps the key
        used: set[int] = set()
        for i, r in enumerate(rows):
            if r.planted == "duplicate_id":
                j = max(j for j in range(i) if _is_clean(rows[j]) and j not in used)
                used.add(j)
                ids[i] = ids[j]
        lic = ["?" if rng.random() < 0.9 else str(rng.choice(["cc-by", "cc-by-sa", "cc0"]))
               for _ in rows]
        nsfw = ["UNLIKELY" if rng.random() < 0.95 else "UNSURE" for _ in rows]
        for r, i in zip(rows, ids, strict=True):
            r.source_id = str(i)
        return pa.table({
            "SAMPLE_ID": pa.array(ids, pa.int64()),
            "URL": pa.array([r.url for r in rows], pa.string()),
            "TEXT": pa.array([_caption_str(r.caption) for r in rows], pa.string()),
            "HEIGHT": pa.array([r.height for r in rows], pa.int64()),
            "WIDTH": pa.array([r.width for r in rows], pa.int64()),
            "LICENSE": pa.array(lic, pa.string()),
            "NSFW": pa.array(nsfw, pa.string()),
            "similarity": pa.array(sim, pa.float64()),
        })
    if source == "coyo-700m":
        ids = _unique_ids(rng, n, 10**12, 10**13)
        for r, i in zip(rows, ids, strict=True):
            r.source_id = str(i)
        texts = [_caption_str(r.caption) or "" for r in rows]
        return pa.table({
            "id": pa.array(ids, pa.int64()),
            "url": pa.array([r.url for r in rows], pa.string()),
            "text": pa.array([_caption_str(r.caption) for r in rows], pa.string()),
            "width": pa.array([r.width for r in rows], pa.int64()),
            "height": pa.array([r.height for r in rows], pa.int64()),
            "image_phash": pa.array([r.phash for r in rows], pa.string()),
            "text_length": pa.array([len(t) for t in texts], pa.int64()),
            "word_count": pa.array([len(t.split()) for t in texts], pa.int64()),
            "num_faces": pa.array([0 for _ in rows], pa.int64()),
            "clip_similarity_vitb32": pa.array(sim, pa.float64()),
            "clip_similarity_vitl14": pa.array([round(s - 0.06, 4) for s in sim], pa.float64()),
            "nsfw_score_opennsfw2": pa.array(
                [round(float(rng.uniform(0, 0.05)), 4) for _ in rows], pa.float64()),
            "watermark_score": pa.array(
                [round(float(rng.uniform(0, 0.3)), 4) for _ in rows], pa.float64()),
            "aesthetic_score_laion_v2": pa.array(
                [round(float(rng.normal(4.8, 0.4)), 4) for _ in rows], pa.float64()),
        })
    if source == "cc12m-web":
        for i, r in enumerate(rows):
            r.source_id = f"{PART}:{i}"
        caps = [r.caption if isinstance(r.caption, bytes) or r.caption is None
                else r.caption.encode("utf-8") for r in rows]
        return pa.table({
            "url": pa.array([r.url for r in rows], pa.string()),
            "caption": pa.array(caps, pa.binary()),
        })
    raise ValueError(source)


def _resolve_duplicates(rows: list[_Row], sizes: dict[str, int]) -> None:
    """Which member of each duplicate group survives, by the dedup stage's rule."""
    groups: dict[str, list[_Row]] = {}
    for r in rows:
        r.nbytes = sizes.get(r.image or "", 0)
        if r.duplicate_group:
            groups.setdefault(r.duplicate_group, []).append(r)
    for members in groups.values():
        copy = next(r for r in members if r.planted)
        if copy.planted == "repeated_url":  # URL dedup, before fetching: the smallest key
            survivor = min(members, key=lambda r: r.key)
        else:  # content dedup: most pixels, then most bytes, then the smallest key
            survivor = min(members, key=lambda r: (-(r.width or 0) * (r.height or 0),
                                                   -r.nbytes, r.key))
        for r in members:
            if r is survivor:
                r.expected, r.expected_stage, r.expected_reason = "kept", None, None
            else:
                r.expected, r.expected_stage = "duplicate", "dedup"
                r.expected_reason = PLANTED_KINDS[copy.planted or ""][2]


_GT_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("row", pa.int64()),
    ("source_id", pa.string()),
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("is_rs", pa.bool_()),
    ("scene_class", pa.string()),
    ("everyday_kind", pa.string()),
    ("planted", pa.string()),
    ("expected", pa.string()),
    ("expected_stage", pa.string()),
    ("expected_reason", pa.string()),
    ("duplicate_group", pa.string()),
    ("image", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("phash", pa.string()),
    ("objects", pa.string()),
    ("boxes", pa.string()),
])


def _write_parquet(table: pa.Table, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, compression="snappy", row_group_size=ROW_GROUP_SIZE)


# ----------------------------------------------------------------------------- probe


def _probe(w: _World, n_probe: int) -> dict[str, int]:
    rs_dir = os.path.join(w.out, "probe", "rs")
    non_dir = os.path.join(w.out, "probe", "non_rs")
    os.makedirs(rs_dir)
    os.makedirs(non_dir)
    for i in range(n_probe):
        cls = scenes.CLASSES[i % len(scenes.CLASSES)]
        rng = _rng(w.seed, _S_PROBE_RS, i)
        img, _ = scenes.render_scene(cls, rng, _size(rng))
        with open(os.path.join(rs_dir, f"{i:04d}-{cls}.jpg"), "wb") as f:
            f.write(_encode(img))
        kind = scenes.EVERYDAY_KINDS[i % len(scenes.EVERYDAY_KINDS)]
        rng = _rng(w.seed, _S_PROBE_NON_RS, i)
        img, _, _ = scenes.render_everyday_kind(kind, rng, _size(rng))
        with open(os.path.join(non_dir, f"{i:04d}-{kind}.jpg"), "wb") as f:
            f.write(_encode(img))
    return {"rs": n_probe, "non_rs": n_probe}


# ----------------------------------------------------------------------------- entry


def build_pub11(
    out_dir: str,
    base_url: str = DEFAULT_BASE_URL,
    seed: int = 0,
    n_rs: int = 240,
    n_non_rs: int = 120,
    *,
    n_probe: int = 150,
    extra_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the demo PUB11 world into ``out_dir``; returns a summary (also in world.json).

    ``n_rs`` clean aerial rows and ``n_non_rs`` everyday rows (a third of them with captions
    that pass the RS keyword filter), plus :data:`PLANTED_COPIES` rows of every planted case
    and 8 copies of clean rows for the dedup cases. ``n_probe`` images per probe class.
    The generator-owned parts of ``out_dir`` (``www/``, ``pub11/``, ``probe/``,
    ``ground_truth.parquet``, ``world.json``) are replaced; anything else there is left alone.
    """
    from pipelines.records import make_key

    if n_rs < 8 or n_non_rs < 0 or n_probe < 0:
        raise ValueError("need n_rs >= 8, n_non_rs >= 0 and n_probe >= 0")
    for part in ("www", "pub11", "probe"):
        shutil.rmtree(os.path.join(out_dir, part), ignore_errors=True)
    for f in ("ground_truth.parquet", "world.json"):
        if os.path.exists(os.path.join(out_dir, f)):
            os.remove(os.path.join(out_dir, f))
    w = _World(out_dir, base_url, seed)
    os.makedirs(w.img_dir)

    clean = _clean_rs_rows(w, n_rs)
    everyday = _everyday_rows(w, n_non_rs)
    planted = _planted_rows(w) + _hostile_rows(w)
    dups = _duplicate_rows(w, clean)
    by_source = _assign_sources(w, clean, everyday, planted, dups)

    tables = {}
    for s in SOURCES:
        tables[s] = _source_table(w, s, by_source[s])
        for i, r in enumerate(by_source[s]):
            r.row = i
            r.key = make_key(s, r.source_id)
    all_rows = [r for s in SOURCES for r in by_source[s]]
    _resolve_duplicates(all_rows, w.sizes)
    for s in SOURCES:
        _write_parquet(tables[s], os.path.join(out_dir, "pub11", s, f"{PART}.parquet"))

    gt = pa.table({
        "source": [r.source for r in all_rows],
        "row": [r.row for r in all_rows],
        "source_id": [r.source_id for r in all_rows],
        "key": [r.key for r in all_rows],
        "url": [r.url for r in all_rows],
        "caption": [_caption_str(r.caption) for r in all_rows],
        "is_rs": [r.is_rs for r in all_rows],
        "scene_class": [r.scene_class for r in all_rows],
        "everyday_kind": [r.everyday_kind for r in all_rows],
        "planted": [r.planted for r in all_rows],
        "expected": [r.expected for r in all_rows],
        "expected_stage": [r.expected_stage for r in all_rows],
        "expected_reason": [r.expected_reason for r in all_rows],
        "duplicate_group": [r.duplicate_group for r in all_rows],
        "image": [r.image for r in all_rows],
        "width": [r.width for r in all_rows],
        "height": [r.height for r in all_rows],
        "phash": [r.phash for r in all_rows],
        "objects": [json.dumps(r.objects, sort_keys=True) if r.objects is not None else None
                    for r in all_rows],
        "boxes": [json.dumps(r.boxes) if r.boxes is not None else None for r in all_rows],
    }, schema=_GT_SCHEMA)
    _write_parquet(gt, os.path.join(out_dir, "ground_truth.parquet"))

    probe = _probe(w, n_probe)
    summary = {
        "rows": len(all_rows),
        "rows_by_source": {s: len(by_source[s]) for s in SOURCES},
        "expected": dict(sorted(Counter(r.expected for r in all_rows).items())),
        "expected_by_stage": dict(sorted(Counter(
            f"{r.expected_stage}/{r.expected_reason}" for r in all_rows
            if r.expected_stage).items())),
        "is_rs": sum(r.is_rs for r in all_rows),
        "planted": dict(sorted(Counter(r.planted for r in all_rows if r.planted).items())),
        "duplicate_groups": len({r.duplicate_group for r in all_rows if r.duplicate_group}),
        "image_files": len(os.listdir(w.img_dir)),
        "probe": probe,
        "phash_redraws": w.redraws,
    }
    world = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "base_url": w.base,
        "params": {"n_rs": n_rs, "n_non_rs": n_non_rs, "n_probe": n_probe,
                   **(extra_params or {})},
        "sources": list(SOURCES),
        "classes": list(scenes.CLASSES),
        "everyday_kinds": list(scenes.EVERYDAY_KINDS),
        "planted_kinds": {k: {"expected": e, "stage": st, "reason": re}
                          for k, (e, st, re) in PLANTED_KINDS.items()},
        "counts": summary,
    }
    with open(os.path.join(out_dir, "world.json"), "w", encoding="utf-8") as f:
        json.dump(world, f, indent=2, sort_keys=True)
        f.write("\n")
    log.info("demo world: %d rows (%s) in %s", len(all_rows), summary["expected"], out_dir)
    return summary
