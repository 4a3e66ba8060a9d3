"""The decode/normalise stage: geometry, orientation, colour modes, bad inputs, hashes."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from pipelines.records import REJECTS, Reject
from pipelines.stages.images import (
    Decode,
    DecodeDoFn,
    ImageConfig,
    NormalisedImage,
    hamming,
    normalise_image,
    to_rgb,
)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
# PNG output: colour checks are exact, not blurred by JPEG.
EXACT = ImageConfig(resize_mode="no", encode_format="png", min_image_size=1)


def encode(img: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def decoded(result: NormalisedImage) -> Image.Image:
    assert isinstance(result, NormalisedImage), result
    img = Image.open(io.BytesIO(result.data))
    img.load()
    return img


def quadrants(w: int, h: int, colours, mode: str = "RGB") -> Image.Image:
    """An image whose four quadrants (TL, TR, BL, BR) have the given colours."""
    img = Image.new(mode, (w, h))
    tl, tr, bl, br = colours
    img.paste(tl, (0, 0, w // 2, h // 2))
    img.paste(tr, (w // 2, 0, w, h // 2))
    img.paste(bl, (0, h // 2, w // 2, h))
    img.paste(br, (w // 2, h // 2, w, h))
    return img


def quadrant_colours(img: Image.Image):
    w, h = img.size
    return [
        img.getpixel(p)
        for p in [
            (w // 4, h // 4),
            (3 * w // 4, h // 4),
            (w // 4, 3 * h // 4),
            (3 * w // 4, 3 * h // 4),
        ]
    ]


def close(a, b, tol=12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width``x``height`` RGB, with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# --- geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, size_in, size_out",
    [
        ("no", (400, 300), (400, 300)),
        ("keep_ratio", (400, 300), (171, 128)),
        ("keep_ratio", (300, 400), (128, 171)),
        ("center_crop", (400, 300), (128, 128)),
        ("border", (400, 300), (128, 128)),
        ("border", (300, 400), (128, 128)),
    ],
)
def test_resize_mode_output_size(smooth_image, mode, size_in, size_out):
    data = encode(smooth_image(1, size_in))
    got = normalise_image(data, ImageConfig(image_size=128, resize_mode=mode))
    assert isinstance(got, NormalisedImage)
    assert (got.width, got.height) == size_out
    assert decoded(got).size == size_out
    assert (got.original_width, got.original_height) == size_in


def test_border_pads_with_black_and_centres():
    data = encode(Image.new("RGB", (400, 300), (200, 180, 160)), "PNG")
    out = decoded(normalise_image(data, ImageConfig(image_size=128, resize_mode="border")))
    # 400x300 -> 128x96, padded with 16 black rows above and below.
    assert close(out.getpixel((64, 3)), BLACK, 6) and close(out.getpixel((64, 124)), BLACK, 6)
    assert close(out.getpixel((64, 20)), (200, 180, 160), 6)
    assert close(out.getpixel((64, 107)), (200, 180, 160), 6)
    assert close(out.getpixel((2, 64)), (200, 180, 160), 6)  # no side bars


def test_center_crop_keeps_the_middle():
    img = Image.new("RGB", (300, 100), RED)
    img.paste(GREEN, (100, 0, 200, 100))
    img.paste(BLUE, (200, 0, 300, 100))
    cfg = ImageConfig(image_size=128, resize_mode="center_crop", encode_format="png")
    out = decoded(normalise_image(encode(img, "PNG"), cfg))
    # 300x100 -> 384x128, the centre 128 columns are the green third.
    assert out.size == (128, 128)
    assert all(close(out.getpixel((x, 64)), GREEN, 2) for x in (5, 64, 122))


def test_keep_ratio_keeps_everything():
    img = Image.new("RGB", (300, 100), RED)
    img.paste(BLUE, (200, 0, 300, 100))
    cfg = ImageConfig(
        image_size=64, resize_mode="keep_ratio", encode_format="png", min_image_size=1
    )
    out = decoded(normalise_image(encode(img, "PNG"), cfg))
    assert out.size == (192, 64)
    assert close(out.getpixel((2, 32)), RED, 2) and close(out.getpixel((189, 32)), BLUE, 2)


@pytest.mark.parametrize(
    "mode, size_in, flag, size_out",
    [
        ("border", (100, 80), True, (100, 80)),  # smaller than image_size: untouched
        ("border", (100, 80), False, (128, 128)),  # upscaled then padded
        ("center_crop", (100, 80), True, (100, 80)),
        ("keep_ratio", (300, 200), True, (192, 128)),  # bigger: resized anyway
        ("keep_ratio", (160, 100), True, (160, 100)),  # smaller side 100 <= 128
    ],
)
def test_resize_only_if_bigger(smooth_image, mode, size_in, flag, size_out):
    cfg = ImageConfig(
        image_size=128, resize_mode=mode, resize_only_if_bigger=flag, min_image_size=10
    )
    got = normalise_image(encode(smooth_image(4, size_in)), cfg)
    assert (got.width, got.height) == size_out


def test_large_jpeg_uses_draft_and_matches_full_decode(smooth_image, monkeypatch):
    big = smooth_image(5, (2400, 1800))
    data = encode(big, quality=92)
    calls = []
    real_draft = JpegImageFile.draft

    def spy(self, mode, size):
        calls.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    cfg = ImageConfig(image_size=256, resize_mode="keep_ratio", encode_format="png")
    got = normalise_image(data, cfg)
    assert calls, "a 2400x1800 JPEG shrunk to 256 should be decoded at reduced scale"
    assert (got.width, got.height) == (341, 256)
    assert (got.original_width, got.original_height) == (2400, 1800)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((341, 256), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(decoded(got), np.int16) - np.asarray(full, np.int16))
    assert diff.mean() < 2.0


# --- orientation ---------------------------------------------------------------------------


def exif_oriented_jpeg(upright: Image.Image, orientation: int = 6) -> bytes:
    # Orientation 6: "rotate 90 degrees clockwise to display", so store it rotated anticlockwise.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, quality=95, exif=exif.tobytes())


def test_exif_orientation_6_comes_out_upright():
    upright = quadrants(96, 128, [RED, GREEN, BLUE, WHITE])
    data = exif_oriented_jpeg(upright)
    assert Image.open(io.BytesIO(data)).size == (128, 96)  # stored sideways
    got = normalise_image(data, ImageConfig(resize_mode="no", min_image_size=1))
    out = decoded(got)
    assert out.size == (96, 128)
    assert (got.original_width, got.original_height) == (96, 128)
    tl, tr, bl, br = quadrant_colours(out)
    assert close(tl, RED) and close(tr, GREEN) and close(bl, BLUE) and close(br, WHITE)
    assert 0x0112 not in out.getexif()  # no EXIF written


def test_exif_orientation_with_draft_and_resize():
    upright = quadrants(1200, 1600, [RED, GREEN, BLUE, WHITE])
    got = normalise_image(
        exif_oriented_jpeg(upright), ImageConfig(image_size=150, resize_mode="keep_ratio")
    )
    assert (got.width, got.height) == (150, 200)
    assert (got.original_width, got.original_height) == (1200, 1600)
    tl, tr, bl, br = quadrant_colours(decoded(got))
    assert close(tl, RED) and close(tr, GREEN) and close(bl, BLUE) and close(br, WHITE)


# --- colour modes --------------------------------------------------------------------------


def test_palette_image_converted_to_rgb():
    img = quadrants(80, 80, [RED, GREEN, BLUE, WHITE]).convert("P", palette=Image.Palette.ADAPTIVE)
    assert img.mode == "P"
    out = decoded(normalise_image(encode(img, "PNG"), EXACT))
    assert out.mode == "RGB"
    assert quadrant_colours(out) == [RED, GREEN, BLUE, WHITE]


def test_palette_transparency_composited_on_white():
    img = Image.new("P", (80, 80), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    img.paste(1, (40, 0, 80, 80))
    out = decoded(normalise_image(encode(img, "PNG", transparency=0), EXACT))
    assert out.getpixel((10, 40)) == WHITE and out.getpixel((70, 40)) == RED


def test_cmyk_jpeg_converted_to_rgb():
    cmyk = quadrants(
        96, 96, [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)], mode="CMYK"
    )
    data = encode(cmyk, quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decoded(normalise_image(data, EXACT))
    tl, tr, bl, br = quadrant_colours(out)
    assert close(tl, (0, 255, 255)) and close(tr, (255, 0, 255))  # cyan, magenta
    assert close(bl, (255, 255, 0)) and close(br, BLACK)  # yellow, black


def test_16bit_grey_is_scaled_not_clipped():
    values = np.array([0, 1000, 32768, 65535], dtype=np.uint16)
    arr = np.repeat(np.repeat(values[None, :], 64, axis=0), 16, axis=1)  # 64 x 64
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decoded(normalise_image(data, EXACT))
    row = [out.getpixel((x, 32)) for x in (8, 24, 40, 56)]
    assert row == [(0, 0, 0), (4, 4, 4), (128, 128, 128), (255, 255, 255)]


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (90, 90), (0, 0, 0, 0))  # fully transparent black
    img.paste((255, 0, 0, 255), (30, 0, 60, 90))
    img.paste((255, 0, 0, 128), (60, 0, 90, 90))
    out = decoded(normalise_image(encode(img, "PNG"), EXACT))
    assert out.getpixel((10, 45)) == WHITE
    assert out.getpixel((45, 45)) == RED
    assert close(out.getpixel((75, 45)), (255, 127, 127), 1)


def test_la_composited_on_white():
    img = Image.new("LA", (64, 64), (0, 0))
    img.paste((0, 255), (32, 0, 64, 64))
    out = decoded(normalise_image(encode(img, "PNG"), EXACT))
    assert out.getpixel((10, 10)) == WHITE and out.getpixel((50, 10)) == BLACK


@pytest.mark.parametrize(
    "arr, expected",
    [
        (np.array([[0, 255]], dtype=np.int32), [0, 255]),  # 8-bit range kept
        (np.array([[0, 65535]], dtype=np.int32), [0, 255]),  # 16-bit range scaled
        (np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),  # unit floats
        (np.array([[-10.0, 90.0]], dtype=np.float32), [0, 255]),  # anything else stretched
    ],
)
def test_to_rgb_of_int_and_float_modes(arr, expected):
    img = Image.fromarray(arr)
    assert img.mode in ("I", "F")
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    assert [rgb.getpixel((x, 0))[0] for x in range(arr.shape[1])] == expected


# --- bad inputs ----------------------------------------------------------------------------


def test_truncated_jpeg(smooth_image):
    data = encode(smooth_image(6, (256, 256)))
    got = normalise_image(data[: len(data) // 2])
    assert isinstance(got, Reject) and (got.stage, got.reason) == ("decode", "truncated_image")


@pytest.mark.parametrize(
    "data",
    [b"definitely not an image" * 10, b"<!doctype html><html></html>", b"\x89PNG\r\n\x1a\n", b""],
)
def test_not_an_image(data):
    got = normalise_image(data)
    assert isinstance(got, Reject) and got.reason == "not_an_image"


def test_only_configured_formats_are_decoded(smooth_image):
    data = encode(smooth_image(16, (100, 100)), "PCX")  # PIL reads PCX; we do not by default
    got = normalise_image(data)
    assert isinstance(got, Reject) and got.reason == "not_an_image"
    got = normalise_image(data, ImageConfig(formats=("JPEG", "PCX")))
    assert isinstance(got, NormalisedImage) and got.width == 256


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("size", [(30000, 30000), (10000, 9000)])
def test_bomb_header_rejected_without_decoding(load_spy, size):
    # 30000^2 trips PIL's own hard limit at open; 10000x9000 passes PIL but not max_pixels.
    got = normalise_image(png_header_only(*size))
    assert isinstance(got, Reject) and got.reason == "decompression_bomb"
    assert load_spy == []


def test_max_pixels_is_configurable(load_spy, smooth_image):
    data = encode(smooth_image(7, (1200, 1000)), "PNG")
    got = normalise_image(data, ImageConfig(max_pixels=1_000_000))
    assert isinstance(got, Reject) and got.reason == "decompression_bomb"
    assert "1200x1000" in got.detail
    assert load_spy == []
    assert isinstance(normalise_image(data, ImageConfig(max_pixels=1_200_000)), NormalisedImage)


def test_too_small_and_bad_aspect_ratio(smooth_image, load_spy):
    got = normalise_image(encode(smooth_image(8, (40, 300))))
    assert isinstance(got, Reject) and got.reason == "too_small"
    got = normalise_image(encode(smooth_image(8, (400, 100))), ImageConfig(max_aspect_ratio=3.0))
    assert isinstance(got, Reject) and got.reason == "bad_aspect_ratio"
    assert load_spy == []  # both decided from the header
    got = normalise_image(encode(smooth_image(8, (300, 100))), ImageConfig(max_aspect_ratio=3.0))
    assert isinstance(got, NormalisedImage)


# --- determinism and hashes ----------------------------------------------------------------


def test_deterministic_output_and_sha256_of_input(smooth_image):
    data = encode(smooth_image(9, (500, 375)))
    a, b = normalise_image(data), normalise_image(bytes(data))
    assert a == b
    assert a.sha256 == hashlib.sha256(data).hexdigest()
    assert len(a.phash) == 16 and int(a.phash, 16) >= 0
    out = decoded(a)
    assert out.format == "JPEG" and not out.info.get("progressive") and len(out.getexif()) == 0


def test_phash_survives_resize_and_recompression(smooth_image):
    original = smooth_image(10, (480, 360))
    copy = original.resize((300, 225), Image.Resampling.BILINEAR)
    a = normalise_image(encode(original, quality=95))
    b = normalise_image(encode(copy, quality=60))
    c = normalise_image(encode(smooth_image(11, (480, 360)), quality=95))
    assert a.sha256 != b.sha256
    assert hamming(a.phash, b.phash) <= 4
    assert hamming(a.phash, c.phash) >= 16


def test_phash_ignores_border_padding(smooth_image):
    data = encode(smooth_image(12, (480, 270)))
    border = normalise_image(data, ImageConfig(resize_mode="border"))
    crop = normalise_image(data, ImageConfig(resize_mode="no"))
    assert hamming(border.phash, crop.phash) <= 4


def test_hamming():
    assert hamming("0" * 16, "f" * 16) == 64
    assert hamming("00ff", "0f0f") == 8
    assert hamming("abcdef0123456789", "abcdef0123456789") == 0


def test_config_validation():
    with pytest.raises(ValueError):
        ImageConfig(resize_mode="stretch")
    with pytest.raises(ValueError):
        ImageConfig(encode_format="bmp")


# --- Beam ----------------------------------------------------------------------------------


def record(key: str, body: bytes | None) -> dict:
    return {
        "key": key,
        "subset": "t",
        "source": "demo",
        "source_id": key,
        "url": f"u/{key}",
        "caption": "c",
        "_body": body,
    }


def test_decode_dofn(smooth_image):
    data = encode(smooth_image(13, (320, 240)))
    ok, bad = (
        list(DecodeDoFn(ImageConfig(image_size=64)).process(record("k1", data))),
        list(DecodeDoFn().process(record("k2", b"nope"))),
    )
    assert len(ok) == 1 and "_body" not in ok[0]
    row = ok[0]
    assert (row["width"], row["height"], row["original_width"], row["original_height"]) == (
        64,
        64,
        320,
        240,
    )
    assert row["sha256"] == hashlib.sha256(data).hexdigest() and len(row["phash"]) == 16
    assert row["_image"][:2] == b"\xff\xd8" and row["caption"] == "c"
    assert len(bad) == 1 and isinstance(bad[0], beam.pvalue.TaggedOutput)
    assert bad[0].tag == REJECTS
    assert (bad[0].value["key"], bad[0].value["stage"], bad[0].value["reason"]) == (
        "k2",
        "decode",
        "not_an_image",
    )


def test_decode_transform_in_a_pipeline(smooth_image):
    good = encode(smooth_image(14, (200, 150)))
    records = [
        record("k1", good),
        record("k2", good[:300]),
        record("k3", encode(smooth_image(15, (20, 20)))),
    ]
    with TestPipeline() as p:
        out = p | beam.Create(records) | Decode(ImageConfig(image_size=96))
        assert_that(
            out.records | "Sizes" >> beam.Map(lambda r: (r["key"], r["width"], r["height"])),
            equal_to([("k1", 96, 96)]),
            label="ok",
        )
        assert_that(
            out[REJECTS] | "Why" >> beam.Map(lambda r: (r["key"], r["reason"])),
            equal_to([("k2", "truncated_image"), ("k3", "too_small")]),
            label="rejects",
        )


def test_perceptual_hashes_match_imagehash_and_carry_crop_hashes():
    import imagehash

    from pipelines.demo.scenes import CLASSES, render_scene
    from pipelines.stages.images import CROP_SCALES, perceptual_hashes, split_hashes

    rng = np.random.default_rng(12)
    for i, size in enumerate((64, 129, 256, 300, 517)):
        img = render_scene(CLASSES[i % len(CLASSES)], rng, size)[0]
        full, crops = perceptual_hashes(img)
        assert full == str(imagehash.phash(img))  # bit for bit
        assert len(split_hashes(crops)) == len(CROP_SCALES)
        assert perceptual_hashes(img, crops=False) == (full, "")
        # a centre crop's own full hash is within a few bits of the matching crop hash
        w, h = img.size
        dx, dy = round(w * 0.05), round(h * 0.05)
        cropped = int(str(imagehash.phash(img.crop((dx, dy, w - dx, h - dy)))), 16)
        assert (cropped ^ split_hashes(crops)[CROP_SCALES.index(0.90)]).bit_count() <= 4


# --- ordinary pictures: the same output as before the image guard (issue 16) ---------------


def _reference_normalise(data: bytes, cfg: ImageConfig) -> tuple:
    """The decode stage as it was before the guard, for 8-bit pictures (RGB, L, 1, P without
    transparency, CMYK): open, draft, decode, EXIF transpose, convert the whole picture to
    RGB, ``resize(reducing_gap=3)``; the helpers it shares with today's module did not change."""
    import math

    from PIL import ImageOps

    from pipelines.stages import images as m

    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
        ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        scale = m._resize_plan(ow, oh, cfg)
        if scale is not None and scale < 1 and isinstance(img, JpegImageFile):
            img.draft(None, (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
        img.load()
        picture = ImageOps.exif_transpose(img) if orientation != 1 else img
        picture = picture if picture.mode == "RGB" else picture.convert("RGB")
        if scale is not None:
            size = m._target_size(ow, oh, scale, cfg)
            if picture.size != size:
                picture = picture.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        phash, crops = m.perceptual_hashes(picture, cfg.crop_hashes)
        out = m._finish_geometry(picture, cfg, scale is not None)
        return m._encode(out, cfg), out.size, (ow, oh), phash, crops


@pytest.fixture(scope="module")
def ordinary_pictures(smooth_image) -> dict[str, bytes]:
    smooth = smooth_image
    exif = Image.Exif()
    exif[0x0112] = 6
    big = smooth(31, (2400, 1800))
    mid = smooth(32, (1601, 1203))  # box-reduced by 2 on the way to 256 (border)
    return {
        "jpeg rgb (draft)": encode(big, quality=90),
        "jpeg rgb exif 6": encode(smooth(33, (1600, 1200)), quality=90, exif=exif.tobytes()),
        "png rgb": encode(mid, "PNG"),
        "png L": encode(mid.convert("L"), "PNG"),
        "png P": encode(mid.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "png 1": encode(mid.convert("1"), "PNG"),
        "jpeg CMYK": encode(smooth(34, (1200, 1000)).convert("CMYK"), quality=90),
        "tiff CMYK": encode(smooth(35, (1301, 977)).convert("CMYK"), "TIFF"),
        "gif P": encode(smooth(36, (900, 700)), "GIF"),
    }


@pytest.mark.parametrize(
    "cfg",
    [
        ImageConfig(),
        ImageConfig(image_size=128, resize_mode="keep_ratio"),
        ImageConfig(resize_mode="center_crop", encode_format="png"),
        ImageConfig(resize_mode="no"),
    ],
    ids=["border", "keep_ratio", "center_crop", "no"],
)
def test_ordinary_pictures_are_bit_identical_to_before(cfg, ordinary_pictures):
    for name, data in ordinary_pictures.items():
        got = normalise_image(data, cfg)
        assert isinstance(got, NormalisedImage), (name, got)
        data_out, size, original, phash, crops = _reference_normalise(data, cfg)
        assert got.data == data_out, name
        assert ((got.width, got.height), (got.original_width, got.original_height)) == (
            size,
            original,
        ), name
        assert (got.phash, got.phash_crops) == (phash, crops), name


def test_phash_resize_is_pillows_lanczos_bit_for_bit() -> None:
    """The pHash's 32x32 reduction (cached fixed-point coefficients and BLAS products) equals
    Pillow's LANCZOS resize pixel for pixel, so the pHash stays imagehash.phash's."""
    import numpy as np

    from pipelines.stages.images import _lanczos_32

    rng = np.random.default_rng(14)
    for trial in range(300):
        w, h = (int(v) for v in rng.integers(20, 600, 2))
        kind = trial % 4
        if kind == 0:
            a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        elif kind == 1:
            a = np.full((h, w), int(rng.integers(0, 256)), np.uint8)
        elif kind == 2:  # hard edges: over- and undershoot clipped to 0..255
            a = (rng.integers(0, 2, (h, w)) * 255).astype(np.uint8)
        else:
            a = np.clip(np.add.outer(np.arange(h), np.arange(w)) * rng.random() * 3, 0,
                        255).astype(np.uint8)
        g = Image.fromarray(a, "L")
        want = np.asarray(g.resize((32, 32), Image.LANCZOS), np.float64)
        assert np.array_equal(_lanczos_32(g), want), (w, h, kind)


def test_crop_reductions_in_one_product_are_each_crops_own_bit_for_bit() -> None:
    """The centre crops' 32x32 reductions, made for all crops in two products, equal each
    crop reduced alone (so the crop hashes are what they were), at sizes where a crop side
    is exactly 32, under 32 (Pillow's own code) and odd."""
    from pipelines.stages.images import _lanczos_32, _lanczos_32_crops

    rng = np.random.default_rng(15)
    sizes = [(128, 128), (128, 97), (255, 130), (34, 34), (33, 40), (200, 32), (31, 64)]
    sizes += [tuple(int(v) for v in rng.integers(32, 300, 2)) for _ in range(40)]
    for trial, (w, h) in enumerate(sizes):
        a = (rng.integers(0, 2, (h, w)) * 255 if trial % 3 == 0
             else rng.integers(0, 256, (h, w))).astype(np.uint8)
        g = Image.fromarray(a, "L")
        boxes = []
        for s in (0.95, 0.90, 0.85, 0.80, 1.0):
            dx, dy = (w - w * s) / 2, (h - h * s) / 2
            boxes.append((round(dx), round(dy), round(w - dx), round(h - dy)))
        for box, got in zip(boxes, _lanczos_32_crops(g, boxes), strict=True):
            assert np.array_equal(got, _lanczos_32(g.crop(box))), (w, h, box)
