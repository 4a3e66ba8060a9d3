"""Open untrusted image bytes without letting them eat the machine (no Beam, no torch).

Used by the decode stage (``pipelines/stages/images.py``), and meant for every other place
that opens pictures it did not make: the trainer's data workers and the benchmark harness
(:func:`open_rgb`). Three guards, all decided from the header, before any pixel is decoded:

**Formats: an allow-list** (:data:`ALLOWED_FORMATS`). Every allowed format starts with a magic
number, so no bytes are ever *read as* one of them by accident:

=========  ======================================================================================
JPEG       the web (MPO, the multi-picture JPEG, comes with it)
PNG        the web, rendered RS maps and tiles
WEBP       the web
GIF        the web (first frame)
TIFF       RS archives (GeoTIFF/COG, 8/16-bit, float); also scanned documents
BMP        old web pages, some RS label-only archives
JPEG2000   RS archives (Sentinel-2 ships JP2)
AVIF       the web, when this Pillow is built with libavif
=========  ======================================================================================

Left out, and why:

- ``ICO`` (and ``CUR``, the same container): Pillow decodes the icon's entry *while opening*
  (``IcoImagePlugin._open`` calls ``load()``), before anyone can look at its size: an ICO
  whose 256x256 entry held a 9000x9000 PNG cost +1.5 GB in ``Image.open``. Favicons are no
  training pictures anyway. ICO cannot be enabled (:data:`UNGUARDABLE_FORMATS`).
- ``TGA``: no magic number. Pillow's plugin takes any bytes whose 18-byte header parses, so
  other files (an ICO, once) were decoded as TGA noise, and an RLE TGA of 2.5 MB claims
  9000x9000 pixels.
- ``PPM`` (PBM/PGM/PPM/PFM): unused on the web and in RS archives; a loose text header, and
  it decodes straight into the expensive 16-bit and float modes.
- ``EPS``: runs Ghostscript, an external interpreter, on the bytes. Cannot be enabled.
- The legacy rest (``BLP``, ``BUFR``, ``DCX``, ``DDS``, ``DIB``, ``FITS``, ``FLI``, ``FTEX``,
  ``GBR``, ``GRIB``, ``HDF5``, ``ICNS``, ``IM``, ``IMT``, ``IPTC``, ``MCIDAS``, ``MPEG``,
  ``MSP``, ``PCD``, ``PCX``, ``PIXAR``, ``PSD``, ``QOI``, ``SGI``, ``SPIDER``, ``SUN``,
  ``WMF``, ``XBM``, ``XPM``, ``XVTHUMB``): not found in web crawls or RS archives, little-used
  decoders (attack surface we do not need), several without a magic number (``IM``,
  ``IMT``, ``IPTC``, ``PCD``, ``SPIDER``) or with a weak one (``DIB``). A caller may still
  list any of them in ``formats`` on purpose (the byte budget then still applies).

**Bombs: by pixels and by decoded bytes.** ``max_pixels`` (default PIL's own 89.5 MP, the
img2dataset ``max_image_area`` meaning) refuses a picture by its area; the byte budget
refuses it by what decoding and converting it would hold in memory:

    working bytes = pixels x bytes/pixel of the decoded mode x copies of it in that mode
                    + the format decoder's own buffers (:func:`decoder_bytes`: JPEG
                      coefficients, libwebp's canvases, OpenJPEG's int32 planes, ...)
                    + 4 bytes x pixels of the 8-bit RGB result (none when the decoded picture
                      already is the unshrunk RGB result)
                    + the bounded conversion strips (:data:`STRIP_PIXELS` x 32 bytes)

(:func:`working_bytes`; Pillow holds ``1``/``L``/``P`` in 1 byte a pixel, ``I;16*`` in 2,
every other mode, ``RGB`` included, in 4). ``max_decoded_bytes`` defaults to 512 MiB,
1.5x the 341 MiB of the largest RGB picture ``max_pixels`` admits. What it lets through, in
megapixels (bytes a pixel in brackets; "shrunk" is the decode stage's default resize):

==============================================  ==========================================
shrunk: PNG/BMP/GIF/TIFF, any mode; 4:2:0 JPEG   up to ``max_pixels`` (1-4; JPEG 3)
shrunk: 4:4:4 JPEG / CMYK JPEG                   89 / 67 (6 / 8)
shrunk: WebP / AVIF / JPEG2000 RGB / JP2 16-bit  34 / 38 / 27 / 67 (16 / 14 / 20 / 8)
unshrunk (``resize_mode="no"``): RGB / L, P      67 / 60 (8 / 9, with the output's encoding)
unshrunk: 16-bit / RGBA, CMYK, ``I``, ``F``      54 / 45 (10 / 12)
==============================================  ==========================================

so the common web and RS pictures pass whatever their mode, and what costs more is capped
by what it really costs (a 3 KB WebP of 9000x9000 holds 1.2 GB while it decodes). A 16-bit
10980x10980 Sentinel-2 GeoTIFF (230 MiB decoded) passes once ``max_pixels`` is raised for
it; the same tile as JPEG2000 needs ``max_decoded_bytes`` of ~1 GiB (OpenJPEG's int32
planes). With the decode slots at the core count, a worker holds at most cores x 512 MiB
in decodes. PIL's own process-wide ``Image.MAX_IMAGE_PIXELS`` is not consulted at open
time: our limits are the guard, and raising them needs no global state changed (PIL still
applies its own inside some decoders: GIF frames, TIFF strips and tiles).

**Conversion without big copies** (:func:`to_rgb`): any mode to 8-bit RGB, optionally
box-reduced on the way. Conversions that need a working copy (16-bit scaling, ``I``/``F``
ranges, alpha compositing on white, palette/CMYK/grey expansion while shrinking) run on
horizontal strips of :data:`STRIP_PIXELS` pixels, each strip converted then box-reduced, so
nothing but the decoded picture and the (reduced) result is ever full size. 16-bit is scaled
with integers, ``I``/``F`` in float32; no float64 copy is made.

Refusals raise :class:`ImageRefused` (``reason``, ``detail``), with the decode stage's
reasons (:data:`REASONS`).
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import threading
from collections.abc import Callable
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, features

REASONS = (
    "not_an_image",
    "truncated_image",
    "decompression_bomb",
    "too_small",
    "bad_aspect_ratio",
    "decode_error",
)

#: decoders allowed on untrusted bytes, tried in this order (see the module docstring)
ALLOWED_FORMATS: tuple[str, ...] = (
    "JPEG",
    "PNG",
    "WEBP",
    "GIF",
    "TIFF",
    "BMP",
    "JPEG2000",
) + (("AVIF",) if features.check("avif") else ())

#: formats no caller may enable: what they do happens before any guard can look
UNGUARDABLE_FORMATS = {
    "ICO": "decodes its image while opening, before any size check",
    "CUR": "an ICO container: decodes while opening",
    "EPS": "runs Ghostscript on the bytes",
}

#: PIL's default bomb limit (img2dataset's max_image_area is the same idea)
DEFAULT_MAX_PIXELS = 89_478_485
#: 512 MiB: see the module docstring
DEFAULT_MAX_DECODED_BYTES = 512 * 2**20
#: conversion strips: this many pixels at a time (~8 MiB of working arrays a strip)
STRIP_PIXELS = 1 << 18
_STRIP_BYTES_PER_PIXEL = 32  # strip crop + numpy copies + 8-bit strip + RGB/RGBA strip, rounded up
_RGB_BYTES_PER_PIXEL = 4  # Pillow stores RGB as 32 bits a pixel
#: Pillow's ``resize(reducing_gap=3.0)``: box-reduce while still 3x above the target
REDUCING_GAP = 3.0
_WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageRefused(Exception):
    """An image we will not decode: ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)  # (reason, detail) as args: it pickles across processes
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


# --- formats ------------------------------------------------------------------------------


def check_formats(formats: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``formats`` upper-cased; ValueError for names Pillow does not know or that cannot be
    guarded (:data:`UNGUARDABLE_FORMATS`)."""
    if isinstance(formats, str) or not all(isinstance(f, str) for f in formats):
        raise ValueError(f"formats must be a sequence of Pillow format names, not {formats!r}")
    names = tuple(f.upper() for f in formats)
    bad = [f for f in names if f in UNGUARDABLE_FORMATS]
    if bad:
        raise ValueError(
            "formats that cannot be guarded: "
            + "; ".join(f"{f} {UNGUARDABLE_FORMATS[f]}" for f in bad)
        )
    if any(f not in Image.OPEN for f in names):
        Image.init()
    unknown = [f for f in names if f not in Image.OPEN]
    if unknown:
        raise ValueError(f"formats unknown to Pillow: {unknown}")
    return names


def _identify(fp: IO[bytes], formats: tuple[str, ...]) -> ImageFile.ImageFile:
    """Image.open's identification loop over ``formats``, without PIL's process-wide bomb
    check (ours is authoritative, and needs no global state changed to be raised)."""
    prefix = fp.read(16)
    for name in formats:
        name = name.upper()
        if name in UNGUARDABLE_FORMATS:
            continue
        if name not in Image.OPEN:
            Image.init()
        entry = Image.OPEN.get(name)
        if entry is None:
            continue
        factory, accept = entry
        verdict = accept(prefix) if accept else True
        if not verdict or isinstance(verdict, str):  # a str: "plugin present, codec missing"
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # not this format
    raise ImageRefused("not_an_image", f"not one of the image formats {', '.join(formats)}")


def _open_regular_file(path: str | os.PathLike[str]) -> IO[bytes]:
    """``path`` opened for reading, refused unless it is a regular file (a FIFO would block
    forever, a device never ends)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageRefused(
                "not_an_image", f"{os.fspath(path)!r} is not a regular file "
                f"(mode {stat.filemode(st.st_mode)})"
            )
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# --- the header checks --------------------------------------------------------------------


def bytes_per_pixel(mode: str) -> int:
    """Bytes a pixel of ``mode`` takes in Pillow's memory (RGB is stored in 32 bits)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4  # every other Pillow mode is 32 bits a pixel; the safe guess for unknown ones


def reduced_size(size: tuple[int, int], factor: tuple[int, int]) -> tuple[int, int]:
    """The size of ``Image.reduce(factor)`` of a picture of ``size``."""
    return math.ceil(size[0] / factor[0]), math.ceil(size[1] / factor[1])


def reduce_factors(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The box reduction ``Image.resize(target, reducing_gap=3.0)`` applies first (Pillow's
    own formula), so that reducing with it then resizing with ``box`` is bit for bit
    Pillow's resize."""
    fx = int(size[0] / target[0] / REDUCING_GAP) or 1
    fy = int(size[1] / target[1] / REDUCING_GAP) or 1
    return fx, fy


def decoder_bytes(img: Image.Image) -> int:
    """Bytes the format's decoder holds beside the decoded picture while it decodes ``img``
    (call it on the header, before ``draft``). Measured with Pillow 12 on 6000x4000 pictures
    (peak RSS of a decode, less the decoded picture), then rounded up:

    - JPEG: the DCT coefficients of every component at full resolution, 2 bytes each (3
      bytes a pixel at 4:2:0, 6 at 4:4:4; ``draft`` does not shrink them). libjpeg keeps them
      for progressive and multi-scan files; the header cannot tell multi-scan baseline files
      from single-scan ones, so they are counted for every JPEG.
    - WEBP: 12 bytes a pixel (libwebp's animation decoder, which Pillow uses for every
      WebP, keeps two RGBA canvases, and Pillow copies the frame out once more).
    - JPEG2000: 5 bytes a band a pixel, plus 1 (OpenJPEG decodes into int32 planes, then
      Pillow packs them).
    - AVIF: 10 bytes a pixel (YUV planes, up to 16 bits 4:4:4, and an RGB buffer).
    - TIFF: one strip or tile, unpacked (a single-strip TIFF is one more full copy).
    - PNG, GIF, BMP: row buffers only (0).
    - anything else (formats enabled on purpose): one more copy of the decoded picture.
    """
    w, h = img.size
    pixels = w * h
    fmt = img.format
    bands = len(img.getbands())
    if fmt in ("JPEG", "MPO"):
        layers = [la for la in getattr(img, "layer", None) or [] if la[1] > 0 and la[2] > 0]
        if not layers:
            return pixels * bands * 2
        hmax, vmax = max(la[1] for la in layers), max(la[2] for la in layers)
        return sum(
            math.ceil(w * la[1] / hmax / 8) * math.ceil(h * la[2] / vmax / 8) * 64 * 2
            for la in layers
        )
    if fmt == "WEBP":
        return pixels * 12
    if fmt == "JPEG2000":
        return pixels * (5 * bands + 1)
    if fmt == "AVIF":
        return pixels * 10
    if fmt == "TIFF":
        return _tiff_buffer_bytes(img)
    if fmt in ("PNG", "GIF", "BMP"):
        return 0
    return pixels * bytes_per_pixel(img.mode)


def _tiff_buffer_bytes(img: Image.Image) -> int:
    """One strip or tile of a TIFF, at no less than 4 bytes a pixel (libtiff's RGBA path)."""
    w, h = img.size
    tags = getattr(img, "tag_v2", {})
    bits = tags.get(258, 8)
    bits = sum(bits) if isinstance(bits, tuple) else int(bits) * int(tags.get(277, 1))
    per_pixel = max(4, math.ceil(bits / 8))
    if 322 in tags and 323 in tags:  # tiled
        return int(tags[322]) * int(tags[323]) * per_pixel
    rows = min(int(tags.get(278, h)), h)
    return max(1, rows) * w * per_pixel


def working_bytes(
    mode: str,
    size: tuple[int, int],
    *,
    mode_copies: int = 1,
    rgb_size: tuple[int, int] | None = None,
    extra_bytes: int = 0,
) -> int:
    """Peak bytes of decoding a ``size`` picture in ``mode`` and converting it with
    :func:`to_rgb`: ``mode_copies`` full-size copies in the decoded mode (the decoded picture;
    2 when an EXIF rotation copies it), the 8-bit RGB result of ``rgb_size`` (the full size
    unless it is shrunk on the way; nothing when the decoded picture already is the unshrunk
    RGB result), the conversion strips, and ``extra_bytes`` (the decoder's own buffers,
    :func:`decoder_bytes`; what the caller does with the result)."""
    w, h = size
    rgb = size if rgb_size is None else rgb_size
    converts = mode != "RGB" or tuple(rgb) != (w, h)
    total = w * h * bytes_per_pixel(mode) * mode_copies + extra_bytes
    if converts:
        total += rgb[0] * rgb[1] * _RGB_BYTES_PER_PIXEL
    if mode != "RGB":
        total += min(w * h, STRIP_PIXELS) * _STRIP_BYTES_PER_PIXEL
    return total


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageRefused("decode_error", f"header claims {w}x{h}")
    if w * h > max_pixels:
        raise ImageRefused(
            "decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}"
        )


def check_geometry(size: tuple[int, int], min_side: int, max_aspect_ratio: float) -> None:
    w, h = size
    if min(w, h) < min_side:
        raise ImageRefused("too_small", f"{w}x{h}: smaller side < {min_side}")
    aspect = max(w, h) / min(w, h)
    if aspect > max_aspect_ratio:
        raise ImageRefused("bad_aspect_ratio", f"{w}x{h}: {aspect:.2f} > {max_aspect_ratio}")


def check_budget(
    mode: str,
    size: tuple[int, int],
    max_decoded_bytes: int,
    *,
    mode_copies: int = 1,
    rgb_size: tuple[int, int] | None = None,
    extra_bytes: int = 0,
) -> int:
    """The :func:`working_bytes` of the plan, or ImageRefused("decompression_bomb") above
    ``max_decoded_bytes``."""
    need = working_bytes(
        mode, size, mode_copies=mode_copies, rgb_size=rgb_size, extra_bytes=extra_bytes
    )
    if need > max_decoded_bytes:
        w, h = size
        raise ImageRefused(
            "decompression_bomb",
            f"{w}x{h} {mode}: decoding and converting needs ~{need} bytes"
            f" > max_decoded_bytes {max_decoded_bytes}",
        )
    return need


def open_image(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
    min_side: int = 1,
    max_aspect_ratio: float = math.inf,
) -> ImageFile.ImageFile:
    """The header of ``source`` (bytes, or a path to a regular file), checked; no pixel
    decoded. Raises :class:`ImageRefused`.

    Checks, in order: one of ``formats``; ``max_pixels``; ``min_side``; ``max_aspect_ratio``;
    the byte budget of decoding it and converting it to a full-size RGB picture
    (``max_decoded_bytes``; None when the caller checks its own plan with
    :func:`check_budget`). Close the image (or use it in a ``with``) to close a file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageRefused("not_an_image", "empty input")
        fp: IO[bytes] = io.BytesIO(bytes(source))
        owns_file = False
    else:
        fp = _open_regular_file(source)
        owns_file = True
    try:
        img = _identify(fp, tuple(formats))
        if owns_file:
            img._exclusive_fp = True  # as Image.open(path): closing the image closes the file
        try:
            check_pixels(img.size, max_pixels)
            check_geometry(img.size, min_side, max_aspect_ratio)
            if max_decoded_bytes is not None:
                check_budget(
                    img.mode, img.size, max_decoded_bytes, extra_bytes=decoder_bytes(img)
                )
        except BaseException:
            img.close()
            raise
        return img
    except BaseException:
        if owns_file:
            fp.close()
        raise


def refusal(exc: BaseException) -> ImageRefused:
    """A decoding error as the reject it stands for."""
    if isinstance(exc, ImageRefused):
        return exc
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageRefused("decompression_bomb", str(exc))
    if isinstance(exc, MemoryError):
        return ImageRefused("decode_error", f"MemoryError: {exc}")
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (OSError, EOFError, SyntaxError)) and "truncat" in message.lower():
        return ImageRefused("truncated_image", message)
    return ImageRefused("decode_error", message)


def open_rgb(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    min_side: int = 1,
    max_aspect_ratio: float = math.inf,
    max_side: int | None = None,
) -> Image.Image:
    """``source`` (bytes, or a path to a regular file) decoded as 8-bit RGB, under the
    guards of :func:`open_image`, or :class:`ImageRefused`.

    For consumers that only need the pixels (trainer, benchmarks): the stored orientation,
    alpha composited on white, 16-bit and float modes scaled as :func:`to_rgb` says. With
    ``max_side``, a bigger picture is shrunk (JPEG decoded at a reduced scale, others
    box-reduced while converting, then Lanczos) so its longer side is ``max_side``."""
    with open_image(
        source,
        formats=formats,
        max_pixels=max_pixels,
        max_decoded_bytes=None,
        min_side=min_side,
        max_aspect_ratio=max_aspect_ratio,
    ) as img:
        try:
            target = None
            w, h = img.size
            decoder = decoder_bytes(img)  # before draft: JPEG coefficients stay full size
            if max_side is not None and max(w, h) > max_side:
                s = max_side / max(w, h)
                target = (max(1, round(w * s)), max(1, round(h * s)))
                if img.format in ("JPEG", "MPO"):
                    img.draft(None, target)  # libjpeg's 1/2..1/8 scale, still >= target
            size = img.size
            factor = reduce_factors(size, target) if target else (1, 1)
            check_budget(
                img.mode,
                size,
                max_decoded_bytes,
                rgb_size=reduced_size(size, factor),
                extra_bytes=decoder,
            )
            img.load()
            rgb = to_rgb(img, factor)
            if target is not None and rgb.size != target:
                box = (0.0, 0.0, size[0] / factor[0], size[1] / factor[1])
                rgb = rgb.resize(target, Image.Resampling.LANCZOS, box=box)
            return rgb
        except ImageRefused:
            raise
        except Exception as e:
            raise refusal(e) from e


# --- conversion ---------------------------------------------------------------------------


def _on_white(img: Image.Image) -> Image.Image:
    """Alpha (or palette/colour-key transparency) composited on white; call it on strips."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_to_rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a).convert("RGB")


def _16bit_to_rgb(strip: Image.Image) -> Image.Image:
    """Grey in 0..65535 (``I;16*``, or ``I`` in that range) → RGB: ``round(v * 255 / 65535)``
    in integers, as ``(v + 128) // 257`` (no v/257 lies on a .5 tie)."""
    a = np.asarray(strip).astype(np.uint32)
    a += 128
    a //= 257
    return _grey_to_rgb(a.astype(np.uint8))


def _value_range(img: Image.Image) -> tuple[float, float]:
    """(min, max) of the finite values of an ``I``/``F`` picture, without a full-size copy;
    (0, 0) when it has none."""
    lo, hi = img.getextrema()  # in C; NaN is skipped unless it is the first pixel, inf is not
    if img.mode == "I" or (math.isfinite(lo) and math.isfinite(hi)):
        return float(lo), float(hi)
    lo, hi = math.inf, -math.inf
    for strip in _strips(img, 1):
        a = np.asarray(strip)
        finite = a[np.isfinite(a)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _int_or_float_converter(img: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """The strip converter for an ``I``/``F`` picture: the value range is decided on the whole
    picture. ``F`` in [0, 1] is scaled by 255; values in 0..255 are taken as 8-bit, in
    0..65535 as 16-bit; anything else is min–max stretched. NaN → 0, ±inf → 255/0."""
    lo, hi = _value_range(img)
    is_float = img.mode == "F"
    if is_float and lo >= 0.0 and hi <= 1.0:
        full_scale: float | None = 1.0
    elif lo >= 0 and hi <= 255:
        full_scale = 255.0
    elif lo >= 0 and hi <= 65535:
        full_scale = 65535.0
    else:
        full_scale = None

    if not is_float and full_scale == 255.0:
        return lambda strip: _grey_to_rgb(np.asarray(strip).astype(np.uint8))
    if not is_float and full_scale == 65535.0:
        return _16bit_to_rgb

    def convert(strip: Image.Image) -> Image.Image:
        x = np.asarray(strip).astype(np.float32)  # float32 at most, a strip at a time
        if full_scale is not None:
            x *= np.float32(255.0 / full_scale)
        elif hi > lo:
            x -= np.float32(lo)
            x *= np.float32(255.0 / (hi - lo))
        else:
            x[...] = 0.0
        np.nan_to_num(x, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.rint(x, out=x)
        np.clip(x, 0.0, 255.0, out=x)
        return _grey_to_rgb(x.astype(np.uint8))

    return convert


def _strips(img: Image.Image, rows_multiple: int) -> Any:
    """Horizontal strips of about STRIP_PIXELS pixels, ``rows_multiple`` rows aligned."""
    w, h = img.size
    rows = max(1, STRIP_PIXELS // max(1, w))
    rows = max(rows_multiple, rows // rows_multiple * rows_multiple)
    for top in range(0, h, rows):
        yield img.crop((0, top, w, min(h, top + rows)))


def _convert_in_strips(
    img: Image.Image, convert: Callable[[Image.Image], Image.Image], factor: tuple[int, int]
) -> Image.Image:
    """``convert`` (a per-pixel op to RGB) of ``img``, box-reduced by ``factor``, a strip at
    a time: bit for bit ``convert(img).reduce(factor)``, since the strips are aligned on the
    reduction's blocks."""
    reducing = factor != (1, 1)
    out = Image.new("RGB", reduced_size(img.size, factor))
    top = 0
    for strip in _strips(img, factor[1]):
        rgb = convert(strip)
        if reducing:
            rgb = rgb.reduce(factor)
        out.paste(rgb, (0, top // factor[1]))
        top += strip.height
    return out


def to_rgb(img: Image.Image, factor: tuple[int, int] = (1, 1)) -> Image.Image:
    """Any PIL mode → 8-bit RGB, box-reduced by ``factor`` (``Image.reduce``) on the way.

    Alpha (LA, PA, RGBA, palette or colour-key transparency) is composited on white. 16-bit
    grey (``I;16*``) is scaled by 255/65535, not clipped. 32-bit ``I`` holds whatever its
    source put there: 0..255 is taken as 8-bit, 0..65535 as 16-bit, anything else is min–max
    stretched; ``F`` in [0, 1] is scaled by 255, otherwise treated like ``I``.

    Work that needs a copy runs on strips (see the module docstring). Per pixel the result is
    the same as converting the whole picture, then reducing it; ``I``/``F`` scaling is done in
    float32, so a value within ~1e-5 of a rounding boundary may land one level off."""
    mode = img.mode
    fx, fy = factor
    reducing = fx > 1 or fy > 1
    if mode == "RGB":  # (Image.reduce: JPEG2000 files shadow it with an attribute)
        return Image.Image.reduce(img, factor) if reducing else img
    if mode in _ALPHA_MODES or (mode in ("P", "L", "1") and "transparency" in img.info):
        convert: Callable[[Image.Image], Image.Image] = _on_white
    elif mode.startswith("I;16"):
        convert = _16bit_to_rgb
    elif mode in ("I", "F"):
        convert = _int_or_float_converter(img)
    elif not reducing:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX, ...: one copy, the result
    else:
        def convert(strip: Image.Image) -> Image.Image:
            return strip.convert("RGB")
    return _convert_in_strips(img, convert, (fx, fy))


# --- decode slots -------------------------------------------------------------------------


def core_count() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def decode_slots(n: int | None = None) -> threading.BoundedSemaphore:
    """The process-wide semaphore of ``n`` decode slots (None: :func:`core_count`): however
    many threads fetch, at most ``n`` pictures are decoded and converted at once. One
    semaphore per size, so that every caller asking for the same size shares it."""
    n = core_count() if n is None else n
    if n < 1:
        raise ValueError(f"decode slots must be >= 1, not {n}")
    with _SLOTS_LOCK:
        slots = _SLOTS.get(n)
        if slots is None:
            slots = _SLOTS[n] = threading.BoundedSemaphore(n)
        return slots


def _forget_slots() -> None:  # a forked child must not inherit slots held by parent threads
    global _SLOTS_LOCK
    _SLOTS.clear()
    _SLOTS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_slots)
