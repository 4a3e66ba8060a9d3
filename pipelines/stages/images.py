"""Decode, check, normalise and re-encode images (img2dataset's resizer, plus hashes).

:func:`normalise_image` is the pure function: bytes in, a :class:`NormalisedImage` or a
``Reject`` (stage ``"decode"``) out. It never raises on bad bytes. Order of work, cheapest
first, so that bad inputs cost little:

1. open the header only (PIL is lazy) and refuse decompression bombs before any pixel is
   decoded; refuse too-small / too-elongated images from the header too;
2. when a JPEG is shrunk a lot, ask libjpeg to decode at 1/2, 1/4 or 1/8 scale (``draft``);
3. decode, apply the EXIF orientation, convert any mode to RGB (alpha composited on white,
   16-bit scaled to 8-bit), resize with img2dataset's ``resize_mode`` semantics;
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

from pipelines.records import REJECTS, Reject, reject_row

STAGE = "decode"
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
_ENCODERS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ORIENTATION_TAG = 0x0112
# Let libjpeg decode at the smallest DCT scale (1/2, 1/4, 1/8) that is still at least the target
# size, then resample properly. A gap of 2 (PIL's thumbnail default) never fires for a 2x
# shrink, the commonest web case; measured on 512->256: decode+resize 10 ms -> 3 ms per image,
# PSNR 43.5 dB against the gap-2 output, pHash within 0.3 bits on average.
_DRAFT_REDUCING_GAP = 1.0
_WHITE = (255, 255, 255)


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Image checks and normalisation; names follow img2dataset's flags."""

    image_size: int = 256
    resize_mode: str = "border"  # no | keep_ratio | center_crop | border
    resize_only_if_bigger: bool = False
    min_image_size: int = 64  # reject when the smaller side is below this
    max_aspect_ratio: float = float("inf")  # reject when long side / short side exceeds this
    # Reject above this many pixels, from the header, before decoding (img2dataset's
    # max_image_area; PIL's own default bomb limit). PIL itself refuses images above twice
    # Image.MAX_IMAGE_PIXELS at open time, whatever this says.
    max_pixels: int = 89_478_485
    encode_format: str = "jpg"  # jpg | png | webp
    # Decoders PIL may use (PIL names). Raster formats found on the web and in RS archives;
    # the rest (EPS runs Ghostscript, plus dozens of legacy formats) is attack surface we
    # do not need on untrusted bytes.
    formats: tuple[str, ...] = (
        "JPEG",
        "PNG",
        "WEBP",
        "GIF",
        "TIFF",
        "BMP",
        "JPEG2000",
        "PPM",
        "TGA",
        "ICO",
        "AVIF",
    )
    encode_quality: int = 95
    # also hash the centre crops (``phash_crops``, ~1 ms an image) for crop-aware dedup
    crop_hashes: bool = True

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {self.resize_mode!r}")
        if self.encode_format.lower() not in _ENCODERS:
            raise ValueError(f"encode_format must be one of {sorted(_ENCODERS)}")
        if self.image_size <= 0 or self.max_pixels <= 0:
            raise ValueError("image_size and max_pixels must be positive")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError("encode_quality must be in 1..100")


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


def _phashes(grays: list[Image.Image]) -> list[str]:
    """``imagehash.phash`` of each grey image (bit for bit), with the DCTs done in one batch."""
    px = np.stack([np.asarray(g.resize((32, 32), Image.LANCZOS), dtype=np.float64)
                   for g in grays])
    low = scipy.fftpack.dct(scipy.fftpack.dct(px, axis=1), axis=2)[:, :8, :8].reshape(len(grays), 64)
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
        return _phashes([gray])[0], ""
    factor = max(1, min(gray.size) // CROP_HASH_SIDE)
    small = gray.reduce(factor) if factor > 1 else gray
    w, h = small.size
    centres = []
    for s in CROP_SCALES:
        dx, dy = (w - w * s) / 2, (h - h * s) / 2
        centres.append(small.crop((round(dx), round(dy), round(w - dx), round(h - dy))))
    full, *cropped = _phashes([gray, *centres])
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
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


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


# --- colour -------------------------------------------------------------------------------


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _array_to_8bit(arr: np.ndarray, full_scale: float | None) -> Image.Image:
    """Grey array → RGB: scaled from ``[0, full_scale]``, or min–max stretched when None."""
    a = arr.astype(np.float64)
    if full_scale is None:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    else:
        a = a * (255.0 / full_scale)
    a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
    out = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB.

    Alpha (LA, PA, RGBA, palette transparency) is composited on white. 16-bit grey
    (``I;16*``) is scaled by 255/65535, not clipped. 32-bit ``I`` holds whatever its source
    put there: 0..255 is taken as 8-bit, 0..65535 as 16-bit, anything else is min–max
    stretched; ``F`` in [0, 1] is scaled by 255, otherwise treated like ``I``.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    ):
        return _on_white(img)
    if mode.startswith("I;16"):
        return _array_to_8bit(np.asarray(img), 65535.0)
    if mode in ("I", "F"):
        arr = np.asarray(img)
        finite = arr[np.isfinite(arr)] if mode == "F" else arr
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            return _array_to_8bit(arr, 1.0)
        if lo >= 0 and hi <= 255:
            return _array_to_8bit(arr, 255.0)
        if lo >= 0 and hi <= 65535:
            return _array_to_8bit(arr, 65535.0)
        return _array_to_8bit(arr, None)
    # 1, L, P, CMYK (Adobe-inverted JPEGs are un-inverted by the decoder), YCbCr, RGBX, ...
    return img.convert("RGB")


# --- the stage ----------------------------------------------------------------------------


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # noqa: BLE001 — a broken EXIF block only costs us the orientation
        return 1


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
    except Image.DecompressionBombError as e:
        return _reject("decompression_bomb", str(e))
    except Image.DecompressionBombWarning as e:  # when warnings are turned into errors
        return _reject("decompression_bomb", str(e))
    except Image.UnidentifiedImageError:
        # (PIL's message embeds the stream's memory address: keep reject rows deterministic.)
        return _reject("not_an_image", f"not one of the image formats {', '.join(cfg.formats)}")
    except MemoryError as e:
        return _reject("decode_error", f"MemoryError: {e}")
    except Exception as e:  # noqa: BLE001 — bad bytes must never take the bundle down
        message = f"{type(e).__name__}: {e}"
        if isinstance(e, (OSError, EOFError, SyntaxError)) and "truncat" in message.lower():
            return _reject("truncated_image", message)
        return _reject("decode_error", message)


def _normalise(data: bytes, cfg: ImageConfig) -> NormalisedImage | Reject:
    sha256 = hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data), formats=cfg.formats) as img:
        # 1. header checks: nothing decoded yet.
        w, h = img.size
        if w <= 0 or h <= 0:
            return _reject("decode_error", f"header claims {w}x{h}")
        if w * h > cfg.max_pixels:
            return _reject(
                "decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}"
            )
        if min(w, h) < cfg.min_image_size:
            return _reject("too_small", f"{w}x{h}: smaller side < {cfg.min_image_size}")
        aspect = max(w, h) / min(w, h)
        if aspect > cfg.max_aspect_ratio:
            return _reject("bad_aspect_ratio", f"{w}x{h}: {aspect:.2f} > {cfg.max_aspect_ratio}")

        orientation = _orientation(img)
        ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        # Scale is symmetric in w and h, so it does not depend on the orientation.
        scale = _resize_plan(ow, oh, cfg)

        # 2. JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale when we shrink a lot.
        if scale is not None and scale < 1 / _DRAFT_REDUCING_GAP and isinstance(img, JpegImageFile):
            want = (
                max(1, math.ceil(w * scale * _DRAFT_REDUCING_GAP)),
                max(1, math.ceil(h * scale * _DRAFT_REDUCING_GAP)),
            )
            img.draft(None, want)

        # 3. decode (truncated data raises here), orient, convert, resize.
        img.load()
        picture, upright = _exif_transpose(img, orientation)
        if not upright:  # broken EXIF: the picture keeps its stored layout
            ow, oh = w, h
        picture = to_rgb(picture)

        resized = scale is not None
        if resized:
            picture = _resample(picture, _target_size(ow, oh, scale, cfg))
        phash, phash_crops = perceptual_hashes(picture, cfg.crop_hashes)
        out = _finish_geometry(picture, cfg, resized)
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


class DecodeDoFn(beam.DoFn):
    """Record with ``_body`` → record with ``_image`` and image fields, or its reject row."""

    def __init__(self, cfg: ImageConfig | None = None) -> None:
        self.cfg = cfg or ImageConfig()
        self._counters: dict[str, Any] = {}

    def _count(self, name: str) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = beam.metrics.Metrics.counter(STAGE, name)
        counter.inc()

    def process(self, record: dict[str, Any]) -> Iterator[Any]:
        body = record.get("_body")
        if body is None:
            result: NormalisedImage | Reject = _reject("not_an_image", "record has no _body")
        else:
            result = normalise_image(body, self.cfg)
        self._count(result.reason if isinstance(result, Reject) else "ok")
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
    """Records with ``_body`` → ``{"ok": decoded records, "rejects": reject rows}``."""

    def __init__(self, cfg: ImageConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ImageConfig()

    def expand(self, records: beam.PCollection) -> Any:
        return records | "Decode" >> beam.ParDo(DecodeDoFn(self.cfg)).with_outputs(
            REJECTS, main="ok"
        )
