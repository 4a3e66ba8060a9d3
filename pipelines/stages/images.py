"""Decode, check, normalise and re-encode images (img2dataset's resizer, plus hashes).

:func:`normalise_image` is the pure function: bytes in, a :class:`NormalisedImage` or a
``Reject`` (stage ``"decode"``) out. It never raises on bad bytes. Order of work, cheapest
first, so that bad inputs cost little:

1. open the header only with ``pipelines.image_guard`` (an allow-list of formats,
   :data:`~pipelines.image_guard.ALLOWED_FORMATS`; no ICO, TGA, PPM or legacy decoders) and
   refuse, before any pixel is decoded: decompression bombs by pixels (``max_pixels``),
   too-small / too-elongated images, then bombs by decoded bytes (``max_decoded_bytes``:
   bytes a pixel of the decoded mode x pixels x copies, the decoder's own buffers, the RGB
   result and the output's hash and encoding, for this image's plan; see ``image_guard``);
2. when a JPEG is shrunk a lot, ask libjpeg to decode at 1/2, 1/4 or 1/8 scale (``draft``);
3. inside a decode slot (at most ``decode_slots`` decodes at once in the process, the core
   count by default, however many fetch threads call us): decode, apply the EXIF
   orientation, convert any mode to RGB (alpha composited on white, 16-bit scaled to
   8-bit) *while* box-reducing a picture much bigger than the target (strip by strip, so no
   full-size working copy is made), then resize with img2dataset's ``resize_mode``
   semantics. For 8-bit pictures this is bit for bit Pillow's ``resize(reducing_gap=3)`` of
   the converted picture, as before; 16-bit, ``I``/``F`` and alpha pictures match the
   former output to within one grey level (float32 instead of float64 scaling);
4. encode deterministically (fixed quality and subsampling, no EXIF/ICC, no progressive or
   optimised Huffman tables) and hash: ``sha256`` of the input bytes (img2dataset's hash) and
   a 64-bit DCT ``phash`` of the picture (before padding/cropping, so every resize mode
   of the same picture hashes alike), plus ``phash_crops``: the pHashes of the picture's
   centre crops at :data:`CROP_SCALES`, so dedup and decontamination also catch a copy that
   was cropped by up to 10% a side (see ``stages/dedup.py``).

Reject reasons: ``not_an_image``, ``truncated_image``, ``decompression_bomb``, ``too_small``,
``bad_aspect_ratio``, ``decode_error``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import scipy.fftpack  # imported here, not per call: 64 fetch threads contend for import locks
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile  # MPO (multi-picture JPEG) included

from pipelines import image_guard
from pipelines.image_guard import ImageRefused, to_rgb
from pipelines.records import MAIN, REJECTS, Reject, reject_row
from pipelines.stages.routing import CountingDoFn

STAGE = "decode"
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
_ENCODERS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ORIENTATION_TAG = 0x0112
# Let libjpeg decode at the smallest DCT scale (1/2, 1/4, 1/8) that is still at least the target
# size, then resample properly. A gap of 2 (PIL's thumbnail default) never fires for a 2x
# shrink, the commonest web case; measured on 512->256: decode+resize 10 ms -> 3 ms per image,
# PSNR 43.5 dB against the gap-2 output, pHash within 0.3 bits on average.
_DRAFT_REDUCING_GAP = 1.0


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Image checks and normalisation; names follow img2dataset's flags."""

    image_size: int = 256
    resize_mode: str = "border"  # no | keep_ratio | center_crop | border
    resize_only_if_bigger: bool = False
    min_image_size: int = 64  # reject when the smaller side is below this
    # Reject when long side / short side exceeds this (img2dataset's flag; its default is no
    # limit). 10 keeps panoramas and wide RS swaths, and refuses what is no picture to pair
    # with a caption: banners, spacer lines, a 64x1,000,000 "image" (a 26 px high strip
    # after border padding, a tenth of the picture after a centre crop).
    max_aspect_ratio: float = 10.0
    # Reject above this many pixels, from the header, before decoding (img2dataset's
    # max_image_area; PIL's own default bomb limit, which we do not consult at open time).
    max_pixels: int = image_guard.DEFAULT_MAX_PIXELS
    # Reject, from the header, a picture whose decoding and conversion would hold more than
    # this many bytes (see image_guard.working_bytes): a 16-bit or float picture costs 2-4x
    # an 8-bit one at equal pixels, a WebP 4x. 512 MiB: shrunk to image_size, PNG/TIFF/
    # BMP/GIF pictures of any mode and 4:2:0 JPEGs pass up to max_pixels.
    max_decoded_bytes: int = image_guard.DEFAULT_MAX_DECODED_BYTES
    # Decodes at once in this process, whatever the fetch thread count (None: the cores).
    decode_slots: int | None = None
    encode_format: str = "jpg"  # jpg | png | webp
    # Decoders PIL may use (PIL names), tried in order: image_guard.ALLOWED_FORMATS, the
    # raster formats of the web and RS archives, each with a magic number. Not ICO (decodes
    # while opening), TGA (no magic number), PPM, EPS (Ghostscript) or the legacy rest.
    formats: tuple[str, ...] = image_guard.ALLOWED_FORMATS
    encode_quality: int = 95
    # also hash the centre crops (``phash_crops``, ~1 ms an image) for crop-aware dedup
    crop_hashes: bool = True

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        if self.encode_format.lower() not in _ENCODERS:
            raise ValueError(f"encode_format must be one of {sorted(_ENCODERS)}")
        if self.image_size <= 0 or self.max_pixels <= 0 or self.max_decoded_bytes <= 0:
            raise ValueError("image_size, max_pixels and max_decoded_bytes must be positive")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError("encode_quality must be in 1..100")
        if not self.max_aspect_ratio >= 1:
            raise ValueError("max_aspect_ratio must be >= 1")
        if self.decode_slots is not None and self.decode_slots < 1:
            raise ValueError("decode_slots must be None (the cores) or >= 1")
        image_guard.check_formats(self.formats)


@dataclasses.dataclass(frozen=True)
class NormalisedImage:
    data: bytes  # the encoded image
    width: int
    height: int
    original_width: int  # after EXIF orientation
    original_height: int
    sha256: str  # hex digest of the original input bytes
    phash: str  # 16 hex chars: 64-bit DCT perceptual hash of the decoded picture
    # 16 hex chars per scale of CROP_SCALES: pHashes of the picture's centre crops
    phash_crops: str = ""


#: centre-crop scales (side of the crop / side of the picture) whose pHashes are kept beside the
#: full picture's. A copy cropped by 2.5-10% a side (centred) hashes within a few bits of one of
#: them (measured in tests/test_near_dup_variants.py); a 5% step leaves no gap between scales.
CROP_SCALES = (0.95, 0.90, 0.85, 0.80)
CROP_HASH_SIDE = 128


#: Pillow's fixed-point precision for 8-bit resampling (libImaging/Resample.c: 32 - 8 - 2)
_PRECISION_BITS = 22
_HALF = float(1 << (_PRECISION_BITS - 1))
_INV = 1.0 / (1 << _PRECISION_BITS)
#: products per BLAS call: OpenBLAS starts threads above 65536 x 4 multiply-adds, and 64
#: fetch threads each starting BLAS threads cost more than the whole product
_GEMM_CHUNK = 1 << 18


def _lanczos_filter(x: float) -> float:
    """Pillow's ``lanczos_filter`` (sinc(x) * sinc(x / 3) on [-3, 3)), same double arithmetic."""
    if not -3.0 <= x < 3.0:
        return 0.0
    a = x * math.pi
    b = (x / 3) * math.pi
    return (1.0 if x == 0.0 else math.sin(a) / a) * (1.0 if x / 3 == 0.0 else math.sin(b) / b)


@functools.lru_cache(maxsize=512)
def _lanczos_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's 8-bit LANCZOS coefficients for ``in_size`` → ``out_size`` (a shrink), as the
    ``in_size`` x ``out_size`` matrix of its fixed-point integers (``precompute_coeffs`` then
    ``normalize_coeffs_8bpc``), in float64, where every product and sum below stays exact."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    ss = 1.0 / filterscale
    m = np.zeros((in_size, out_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = [_lanczos_filter((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in ws:
            ww += w
        for x, w in enumerate(ws):
            k = w / ww if ww != 0.0 else w
            m[x + xmin, xx] = (int(-0.5 + k * (1 << _PRECISION_BITS)) if k < 0
                               else int(0.5 + k * (1 << _PRECISION_BITS)))
    m.setflags(write=False)
    return m


def _exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of integer-valued float64 matrices (exact: every sum stays below 2**53), in
    pieces small enough that BLAS runs each in the calling thread."""
    rows = max(1, _GEMM_CHUNK // max(1, a.shape[1] * b.shape[1]))
    if rows >= a.shape[0]:
        return a @ b
    out = np.empty((a.shape[0], b.shape[1]), np.float64)
    for i in range(0, a.shape[0], rows):
        np.matmul(a[i : i + rows], b, out=out[i : i + rows])
    return out


def _fixed_point(x: np.ndarray) -> np.ndarray:
    """One of Pillow's passes rounded and clipped as it does: products back to 0..255."""
    return np.clip(np.floor((x + _HALF) * _INV), 0, 255)


def _lanczos_32(gray: Image.Image) -> np.ndarray:
    """``np.asarray(gray.resize((32, 32), Image.LANCZOS), float64)``, bit for bit, for a grey
    picture of at least 32x32: Pillow's two fixed-point passes (horizontal, then vertical,
    each rounded and clipped to 0..255) as products with cached coefficient matrices, instead
    of Pillow recomputing ~100 sines per output pixel on every call."""
    w, h = gray.size
    if gray.mode != "L" or w < 32 or h < 32:  # a stretch: Pillow's own code
        return np.asarray(gray.resize((32, 32), Image.LANCZOS), dtype=np.float64)
    x = np.asarray(gray, dtype=np.float64)
    if w != 32:
        x = _fixed_point(_exact_matmul(x, _lanczos_coefficients(w, 32)))
    if h != 32:
        x = _fixed_point(_exact_matmul(_lanczos_coefficients(h, 32).T, x))
    return x


def _coefficients_or_identity(in_size: int) -> np.ndarray:
    """The pass's coefficients for ``in_size`` → 32; Pillow skips a pass whose side is
    already 32, which the identity at full precision reproduces (x + ½ floored is x)."""
    if in_size == 32:
        return np.eye(32) * float(1 << _PRECISION_BITS)
    return _lanczos_coefficients(in_size, 32)


def _lanczos_32_crops(gray: Image.Image, boxes: list[tuple[int, int, int, int]]
                      ) -> list[np.ndarray]:
    """``_lanczos_32(gray.crop(box))`` for each box, bit for bit, in two BLAS products for all
    of them: the horizontal pass of every crop is one product of the whole picture with the
    crops' coefficient matrices side by side (zero outside each crop's columns), the vertical
    pass one batched product (zero outside each crop's rows). Zeros add nothing to the
    integer-valued sums, so each crop's pixels are exactly its own passes' (picture ≤ 32 px a
    side, or a crop under 32 px: Pillow's own code, crop by crop)."""
    w, h = gray.size
    if gray.mode != "L" or any(x1 - x0 < 32 or y1 - y0 < 32 for x0, y0, x1, y1 in boxes):
        return [_lanczos_32(gray.crop(box)) for box in boxes]
    across, down = _crop_passes(w, h, tuple(boxes))
    rows = _fixed_point(_exact_matmul(np.asarray(gray, dtype=np.float64), across))
    return list(_fixed_point(np.matmul(down, rows.reshape(h, len(boxes), 32).transpose(1, 0, 2))))


@functools.lru_cache(maxsize=32)  # ~260 KB an entry at 128 px: web pictures vary in size
def _crop_passes(w: int, h: int, boxes: tuple[tuple[int, int, int, int], ...]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The two passes of :func:`_lanczos_32_crops` for a ``w`` x ``h`` picture: [w, 32k]
    horizontal coefficients side by side, [k, 32, h] vertical ones."""
    k = len(boxes)
    across = np.zeros((w, 32 * k))
    down = np.zeros((k, 32, h))
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        across[x0:x1, 32 * i : 32 * i + 32] = _coefficients_or_identity(x1 - x0)
        down[i, :, y0:y1] = _coefficients_or_identity(y1 - y0).T
    across.setflags(write=False)
    down.setflags(write=False)
    return across, down


def _phashes(gray: Image.Image, crops: list[np.ndarray] = ()) -> list[str]:
    """``imagehash.phash`` of the grey image (bit for bit), then of each of ``crops`` (32x32
    reductions already made), with the DCTs done in one batch."""
    px = np.stack([_lanczos_32(gray), *crops])
    low = scipy.fftpack.dct(scipy.fftpack.dct(px, axis=1), axis=2)[:, :8, :8].reshape(len(px), 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return [row.tobytes().hex() for row in np.packbits(bits, axis=1)]


def perceptual_hashes(picture: Image.Image, crops: bool = True) -> tuple[str, str]:
    """(pHash of ``picture``, pHashes of its centre crops at CROP_SCALES, concatenated hex).

    The full hash is ``imagehash.phash``'s, bit for bit. The crop hashes are taken from the
    grey picture box-reduced to about 128 px first: a pHash only sees 32x32 pixels, and the
    reduction keeps a crop hash within ~0.3 bits of imagehash's on average at a third of the
    cost."""
    gray = picture.convert("L")
    if not crops:
        return _phashes(gray)[0], ""
    factor = max(1, min(gray.size) // CROP_HASH_SIDE)
    small = gray.reduce(factor) if factor > 1 else gray
    w, h = small.size
    boxes = []
    for s in CROP_SCALES:
        dx, dy = (w - w * s) / 2, (h - h * s) / 2
        boxes.append((round(dx), round(dy), round(w - dx), round(h - dy)))
    full, *cropped = _phashes(gray, _lanczos_32_crops(small, boxes))
    return full, "".join(cropped)


def split_hashes(concatenated: str | None) -> list[int]:
    """``"<16 hex><16 hex>..."`` (``phash_crops``) → the 64-bit ints."""
    s = concatenated or ""
    return [int(s[i : i + 16], 16) for i in range(0, len(s), 16)]


def hamming(a_hex: str, b_hex: str) -> int:
    """Number of differing bits between two hex hashes (e.g. two ``phash`` values)."""
    return (int(a_hex, 16) ^ int(b_hex, 16)).bit_count()


def _reject(reason: str, detail: str | None = None) -> Reject:
    return Reject(stage=STAGE, reason=reason, detail=detail)


# --- geometry -----------------------------------------------------------------------------


def _scaled(w: int, h: int, scale: float) -> tuple[int, int]:
    return max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))


def _resize_plan(w: int, h: int, cfg: ImageConfig) -> float | None:
    """The scale factor img2dataset would apply to a ``w``×``h`` picture, or None for none."""
    if cfg.resize_mode == "no":
        return None
    side = min(w, h) if cfg.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
    if cfg.resize_only_if_bigger and side <= cfg.image_size:
        return None
    return cfg.image_size / side


def _target_size(w: int, h: int, scale: float, cfg: ImageConfig) -> tuple[int, int]:
    """Size after scaling: the governing side is exactly image_size, the other rounded."""
    size = cfg.image_size
    if cfg.resize_mode in ("keep_ratio", "center_crop"):
        return (size, _scaled(w, h, scale)[1]) if w <= h else (_scaled(w, h, scale)[0], size)
    return (size, _scaled(w, h, scale)[1]) if w >= h else (_scaled(w, h, scale)[0], size)


def _resample(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    if img.size == size:
        return img
    # reducing_gap: a fast box reduction first while still 3x above the target, then Lanczos;
    # Pillow documents it as indistinguishable from a full Lanczos pass.
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=image_guard.REDUCING_GAP)


def _convert_and_resample(picture: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """``_resample(to_rgb(picture), size)``, with the box reduction that ``reducing_gap``
    makes done while converting (so the RGB conversion never holds a big picture): the
    same pixels as converting first for every per-pixel conversion."""
    if size is None:
        return to_rgb(picture)
    factor = image_guard.reduce_factors(picture.size, size)
    if factor == (1, 1):
        return _resample(to_rgb(picture), size)
    w, h = picture.size
    box = (0.0, 0.0, w / factor[0], h / factor[1])  # as Image.resize does after reducing
    return to_rgb(picture, factor).resize(size, Image.Resampling.LANCZOS, box=box)


def _finish_geometry(img: Image.Image, cfg: ImageConfig, resized: bool) -> Image.Image:
    """Centre crop or pad to a square, as the mode says (only when a resize took place)."""
    if not resized:
        return img
    size = cfg.image_size
    w, h = img.size
    if cfg.resize_mode == "center_crop" and (w, h) != (size, size):
        left, top = (w - size) // 2, (h - size) // 2
        return img.crop((left, top, left + size, top + size))
    if cfg.resize_mode == "border" and (w, h) != (size, size):
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(img, ((size - w) // 2, (size - h) // 2))
        return canvas
    return img


# --- the stage ----------------------------------------------------------------------------


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # noqa: BLE001 — a broken EXIF block only costs us the orientation
        return 1


def _header_orientation(img: Image.Image) -> int | None:
    """The EXIF orientation when the header has it; None when only decoding can tell (Pillow
    decodes a PNG to look for an eXIf chunk after the pixel data)."""
    if img.format == "PNG" and "exif" not in img.info:
        return None
    return _orientation(img)


def _upright(size: tuple[int, int], orientation: int | None) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


#: what the result costs beside the RGB picture, a pixel of the output: its grey copy for the
#: pHash and the encoded bytes (measured: 1.8-2.6 bytes a pixel for unshrunk JPEG/PNG output)
_OUTPUT_BYTES_PER_PIXEL = 4


def _check_budget(
    img: Image.Image,
    orientation: int | None,
    target: tuple[int, int] | None,
    decoder: int,
    cfg: ImageConfig,
) -> None:
    """The byte budget of this image's plan: the decoded picture (twice when an EXIF rotation
    copies it), the decoder's own buffers (``decoder``), the RGB picture, reduced when it
    is shrunk on the way, and the output's hash and encoding."""
    upright = _upright(img.size, orientation)
    factor = image_guard.reduce_factors(upright, target) if target else (1, 1)
    out = target or upright
    image_guard.check_budget(
        img.mode,
        img.size,
        cfg.max_decoded_bytes,
        mode_copies=1 if orientation in (None, 1) else 2,
        rgb_size=image_guard.reduced_size(upright, factor),
        extra_bytes=decoder + out[0] * out[1] * _OUTPUT_BYTES_PER_PIXEL,
    )


def _exif_transpose(img: Image.Image, orientation: int) -> tuple[Image.Image, bool]:
    """(upright image, whether the orientation was applied)."""
    if orientation == 1:
        return img, True
    try:
        return ImageOps.exif_transpose(img), True
    except Exception:  # noqa: BLE001 — show the stored orientation rather than drop the image
        return img, False


def _encode(img: Image.Image, cfg: ImageConfig) -> bytes:
    buf = io.BytesIO()
    fmt = _ENCODERS[cfg.encode_format.lower()]
    if fmt == "JPEG":
        # Explicit 4:2:0 subsampling and baseline/unoptimised tables: the same pixels give the
        # same bytes with every Pillow/libjpeg build we run on.
        img.save(
            buf,
            "JPEG",
            quality=cfg.encode_quality,
            subsampling=2,
            optimize=False,
            progressive=False,
        )
    elif fmt == "PNG":
        img.save(buf, "PNG", optimize=False, compress_level=6)
    else:
        img.save(buf, "WEBP", quality=cfg.encode_quality, method=4, exact=False)
    return buf.getvalue()


def normalise_image(data: bytes, cfg: ImageConfig | None = None) -> NormalisedImage | Reject:
    """``data`` decoded, checked, oriented, converted to RGB, resized and re-encoded."""
    cfg = cfg or ImageConfig()
    if not data:
        return _reject("not_an_image", "empty input")
    try:
        return _normalise(bytes(data), cfg)
    except Image.UnidentifiedImageError:
        # (PIL's message embeds the stream's memory address: keep reject rows deterministic.)
        return _reject("not_an_image", f"not one of the image formats {', '.join(cfg.formats)}")
    except Exception as e:  # noqa: BLE001 — bad bytes must never take the bundle down
        # ImageRefused as it is; bombs (PIL's own checks inside decoders), truncation, the rest
        refused = image_guard.refusal(e)
        return _reject(refused.reason, refused.detail)


def _normalise(data: bytes, cfg: ImageConfig) -> NormalisedImage | Reject:
    sha256 = hashlib.sha256(data).hexdigest()
    # 1. header checks: nothing decoded yet.
    try:
        img = image_guard.open_image(
            data,
            formats=cfg.formats,
            max_pixels=cfg.max_pixels,
            max_decoded_bytes=None,  # checked below, for this image's plan
            min_side=cfg.min_image_size,
            max_aspect_ratio=cfg.max_aspect_ratio,
        )
    except ImageRefused as e:
        return _reject(e.reason, e.detail)
    with img:
        w, h = img.size
        orientation = _header_orientation(img)
        # Scale is symmetric in w and h, so it does not depend on the orientation.
        scale = _resize_plan(w, h, cfg)
        decoder = image_guard.decoder_bytes(img)  # before draft: JPEG coefficients stay full

        # 2. JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale when we shrink a lot.
        if scale is not None and scale < 1 / _DRAFT_REDUCING_GAP and isinstance(img, JpegImageFile):
            want = (
                max(1, math.ceil(w * scale * _DRAFT_REDUCING_GAP)),
                max(1, math.ceil(h * scale * _DRAFT_REDUCING_GAP)),
            )
            img.draft(None, want)

        target = (
            _target_size(*_upright((w, h), orientation), scale, cfg)
            if scale is not None
            else None
        )
        try:
            _check_budget(img, orientation, target, decoder, cfg)
        except ImageRefused as e:
            return _reject(e.reason, e.detail)

        # 3.-4. decode, orient, convert, resize, hash, encode: everything that holds pixels,
        # at most decode_slots at once.
        with image_guard.decode_slots(cfg.decode_slots):
            converted = _decode_and_convert(img, (w, h), orientation, scale, decoder, cfg)
            if isinstance(converted, Reject):
                return converted
            picture, (ow, oh) = converted
            phash, phash_crops = perceptual_hashes(picture, cfg.crop_hashes)
            out = _finish_geometry(picture, cfg, scale is not None)
            return NormalisedImage(
                data=_encode(out, cfg),
                width=out.width,
                height=out.height,
                original_width=ow,
                original_height=oh,
                sha256=sha256,
                phash=phash,
                phash_crops=phash_crops,
            )


def _decode_and_convert(
    img: Image.Image,
    size: tuple[int, int],
    orientation: int | None,
    scale: float | None,
    decoder: int,
    cfg: ImageConfig,
) -> tuple[Image.Image, tuple[int, int]] | Reject:
    """Decode (truncated data raises here), orient, convert to RGB and resize: (the RGB
    picture, its upright original size), or a Reject."""
    img.load()
    if orientation is None:  # a PNG: its EXIF is only known now
        orientation = _orientation(img)
        if orientation != 1:  # the rotation copies the picture: check the budget again
            upright_size = _upright(size, orientation)
            target = _target_size(*upright_size, scale, cfg) if scale is not None else None
            try:
                _check_budget(img, orientation, target, decoder, cfg)
            except ImageRefused as e:
                return _reject(e.reason, e.detail)
    picture, upright = _exif_transpose(img, orientation)
    # broken EXIF: the picture keeps its stored layout
    ow, oh = _upright(size, orientation) if upright else size
    target = _target_size(ow, oh, scale, cfg) if scale is not None else None
    return _convert_and_resample(picture, target), (ow, oh)


class DecodeDoFn(CountingDoFn):
    """Record with ``_body`` → record with ``_image`` and image fields, or its reject row."""

    stage = STAGE

    def __init__(self, cfg: ImageConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ImageConfig()

    def process(self, record: dict[str, Any]) -> Iterator[Any]:
        body = record.get("_body")
        if body is None:
            result: NormalisedImage | Reject = _reject("not_an_image", "record has no _body")
        else:
            result = normalise_image(body, self.cfg)
        self.count(result.reason if isinstance(result, Reject) else "ok")
        yield decoded_output(record, result, len(body or b""))


def decoded_output(record: dict[str, Any], result: NormalisedImage | Reject,
                   original_bytes: int) -> Any:
    """``record`` (its ``_body`` dropped) with the image fields of ``result``, or its reject
    row tagged ``rejects``."""
    if isinstance(result, Reject):
        return beam.pvalue.TaggedOutput(REJECTS, reject_row(record, result))
    out = {k: v for k, v in record.items() if k != "_body"}
    out.update(
        _image=result.data,
        width=result.width,
        height=result.height,
        original_width=result.original_width,
        original_height=result.original_height,
        sha256=result.sha256,
        phash=result.phash,
        _phash_crops=result.phash_crops,
        # dedup prefers the least recompressed copy: more original bytes at equal pixels
        _original_bytes=original_bytes,
    )
    return out


class Decode(beam.PTransform):
    """Records with ``_body`` → ``{"records": decoded records, "rejects": reject rows}``."""

    def __init__(self, cfg: ImageConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ImageConfig()

    def expand(self, records: beam.PCollection) -> Any:
        return records | "Decode" >> beam.ParDo(DecodeDoFn(self.cfg)).with_outputs(
            REJECTS, main=MAIN
        )
