"""Hostile image bytes cannot eat the machine: formats, bombs by pixels and by bytes,
conversions without full-size working copies, bounded concurrent decodes (issue 16).

Memory is asserted only through deterministic mechanisms: "rejected before decoding" (a spy
on ``ImageFile.load``), the byte-budget decision (a spy on ``image_guard.check_budget``),
tracemalloc's peak of numpy (and Python) allocations, and the sizes of the pictures handed
to Pillow's alpha compositing."""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines import image_guard
from pipelines.image_guard import ImageRefused, open_image, open_rgb
from pipelines.records import Reject
from pipelines.stages import images
from pipelines.stages.images import ImageConfig, NormalisedImage, normalise_image

# --- helpers -------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_header_only(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG signature + IHDR claiming ``width``x``height`` and a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def ico_with_png(side: int) -> bytes:
    """An ICO with one entry that says 256x256 (size bytes 0) and holds a side x side PNG."""
    png = encode(Image.new("RGBA", (side, side), (10, 20, 30, 255)), "PNG")
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def rle_tga(w: int, h: int) -> bytes:
    """A run-length truecolour TGA of one colour: a few bytes per 128 pixels."""
    header = struct.pack("<BBBHHBHHHHBB", 0, 0, 10, 0, 0, 0, 0, 0, w, h, 24, 0x20)
    row = bytes([0xFF, 40, 80, 120]) * (w // 128)
    if w % 128:
        row += bytes([0x80 | (w % 128 - 1), 40, 80, 120])
    return header + row * h


@pytest.fixture
def budget_spy(monkeypatch):
    """Records the byte-budget decisions: (mode, size, bytes needed, max_decoded_bytes)."""
    calls = []
    real = image_guard.check_budget

    def spy(mode, size, max_decoded_bytes, **kw):
        need = image_guard.working_bytes(mode, size, **kw)
        calls.append((mode, size, need, max_decoded_bytes))
        return real(mode, size, max_decoded_bytes, **kw)

    monkeypatch.setattr(image_guard, "check_budget", spy)
    return calls


def numpy_peak(fn, *args, **kw):
    """(fn's result, the peak bytes of Python and numpy allocations while it ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn(*args, **kw)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


# Today's (pre-guard) conversions, verbatim: the reference for the expensive modes' pixels.
def _old_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _old_array_to_8bit(arr: np.ndarray, full_scale: float | None) -> Image.Image:
    a = arr.astype(np.float64)
    if full_scale is None:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    else:
        a = a * (255.0 / full_scale)
    a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
    out = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(out).convert("RGB")


def _old_to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    ):
        return _old_on_white(img)
    if mode.startswith("I;16"):
        return _old_array_to_8bit(np.asarray(img), 65535.0)
    if mode in ("I", "F"):
        arr = np.asarray(img)
        finite = arr[np.isfinite(arr)] if mode == "F" else arr
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            return _old_array_to_8bit(arr, 1.0)
        if lo >= 0 and hi <= 255:
            return _old_array_to_8bit(arr, 255.0)
        if lo >= 0 and hi <= 65535:
            return _old_array_to_8bit(arr, 65535.0)
        return _old_array_to_8bit(arr, None)
    return img.convert("RGB")


def _old_output(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Today's picture for ``data`` at ``size``: convert the whole picture, then resize."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = _old_to_rgb(img)
        out = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(out, np.int16)


def _pixels(result: NormalisedImage) -> np.ndarray:
    assert isinstance(result, NormalisedImage), result
    return np.asarray(Image.open(io.BytesIO(result.data)).convert("RGB"), np.int16)


def _structured(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random field in [0, 1] with some noise: (h, w) float64."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 8)) * 255).astype(np.uint8))
    a = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), np.float64) / 255.0
    return np.clip(a + rng.normal(0, 0.02, a.shape), 0.0, 1.0)


# --- formats -------------------------------------------------------------------------------


def test_the_allow_list_is_the_default():
    assert ImageConfig().formats == image_guard.ALLOWED_FORMATS
    assert {"JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "JPEG2000"} <= set(ImageConfig().formats)
    for excluded in ("ICO", "CUR", "TGA", "PPM", "EPS", "PSD", "PCX"):
        assert excluded not in ImageConfig().formats
    with pytest.raises(ValueError, match="ICO"):
        ImageConfig(formats=("PNG", "ICO"))  # decodes while opening: cannot be enabled
    with pytest.raises(ValueError, match="NOPE"):
        ImageConfig(formats=("NOPE",))


def test_ico_is_not_an_image_and_is_not_decoded(load_spy):
    data = ico_with_png(1500)
    got = normalise_image(data)
    assert isinstance(got, Reject) and got.reason == "not_an_image"
    assert load_spy == []  # Pillow's ICO plugin would have decoded the PNG inside while opening
    # and no allowed format takes it for something else (every one has a magic number)
    Image.init()
    for fmt in image_guard.ALLOWED_FORMATS:
        accept = Image.OPEN[fmt][1]
        verdict = accept(data[:16]) if accept else True
        assert accept is not None and (not verdict or isinstance(verdict, str)), fmt
    with pytest.raises(ImageRefused) as e:
        open_image(data)
    assert e.value.reason == "not_an_image"


def test_tga_is_not_an_image(load_spy):
    data = rle_tga(2000, 2000)  # 1.2 MB of RLE claiming 4 MP; TGA has no magic number
    Image.init()
    assert Image.open(io.BytesIO(data), formats=("TGA",)).size == (2000, 2000)  # PIL takes it
    got = normalise_image(data)
    assert isinstance(got, Reject) and got.reason == "not_an_image"
    assert load_spy == []


# --- bombs from the header -----------------------------------------------------------------


def test_a_64_by_a_million_header_is_bad_aspect_ratio(load_spy):
    assert ImageConfig().max_aspect_ratio == 10.0
    got = normalise_image(png_header_only(64, 1_000_000))  # 64 MP: passes max_pixels
    assert isinstance(got, Reject) and got.reason == "bad_aspect_ratio"
    assert "64x1000000" in got.detail
    assert load_spy == []


def test_the_byte_budget_refuses_before_decoding(load_spy, budget_spy):
    # 16-bit grey 5000x5000 unshrunk: 50 MB decoded + a 100 MB RGB picture + its encoding
    data = png_header_only(5000, 5000, bit_depth=16, colour_type=0)
    cfg = ImageConfig(resize_mode="no", max_decoded_bytes=100 * 2**20)
    got = normalise_image(data, cfg)
    assert isinstance(got, Reject) and got.reason == "decompression_bomb"
    assert "bytes" in got.detail and "I;16" in got.detail and "5000x5000" in got.detail
    assert load_spy == []
    ((mode, size, need, limit),) = budget_spy
    assert (mode, size, limit) == ("I;16", (5000, 5000), 100 * 2**20)
    assert need >= 5000 * 5000 * (2 + 4)  # the decoded picture and its RGB copy at least


def test_webp_budget_counts_libwebps_canvases(load_spy):
    # 1.4 KB of lossless WebP that decodes through 4 RGBA copies of 36 MP (~576 MB)
    data = encode(Image.new("RGB", (6000, 6000), (20, 30, 40)), "WEBP", lossless=True)
    assert len(data) < 10_000
    got = normalise_image(data)
    assert isinstance(got, Reject) and got.reason == "decompression_bomb"
    assert "max_decoded_bytes" in got.detail
    assert load_spy == []
    small = encode(Image.new("RGB", (1000, 1000), (20, 30, 40)), "WEBP", lossless=True)
    assert isinstance(normalise_image(small), NormalisedImage)


# --- expensive modes: bounded and the same pixels ------------------------------------------


@pytest.fixture(scope="module")
def png16_9400() -> bytes:
    """The attack picture: 16-bit grey 9400x9400 that compresses to ~190 KB."""
    a = np.zeros((9400, 9400), np.uint16)
    a[1000:3000, 2000:6000] = 40000
    a[5000:9000, 100:900] = 65535
    return encode(Image.fromarray(a), "PNG")


def test_16bit_9400_png_is_normalised_with_a_bounded_working_set(png16_9400, budget_spy):
    pixels = 9400 * 9400
    got, peak = numpy_peak(normalise_image, png16_9400)
    assert isinstance(got, NormalisedImage) and (got.width, got.height) == (256, 256)
    # no full-size numpy copy: less than one byte a pixel (today: float64 copies, 8 a pixel)
    assert peak < pixels
    # budget: the decoded 16-bit picture (177 MB) and a small RGB one, not 4 full-size copies
    ((mode, size, need, limit),) = budget_spy
    assert (mode, size) == ("I;16", (9400, 9400))
    assert need < pixels * 2 + 20 * 2**20 < limit
    out = _pixels(got)
    assert abs(out[int(2000 / 9400 * 256), int(4000 / 9400 * 256), 0] - 156) <= 2  # 40000/257
    assert abs(out[int(7000 / 9400 * 256), int(500 / 9400 * 256), 0] - 255) <= 2
    assert out[int(4000 / 9400 * 256), int(8000 / 9400 * 256), 0] <= 2


def _big_and_small(kind: str) -> tuple[bytes, bytes]:
    """(a 3600x3600 picture of ``kind``, a 700x530 one with structure)."""

    def make(size: tuple[int, int], structured: bool) -> bytes:
        w, h = size
        g = _structured(size, 3) if structured else np.zeros((h, w))
        if not structured:
            g[h // 7 : h // 2, w // 5 : w // 2] = 0.8
            g[2 * h // 3 :, :] = 0.3
        if kind == "P+transparency":
            idx = (g * 15).astype(np.uint8)
            img = Image.frombytes("P", (w, h), idx.tobytes())
            img.putpalette([c for i in range(16) for c in (i * 16, 255 - i * 16, 128)] + [0] * 720)
            return encode(img, "PNG", transparency=3)
        if kind == "I":  # a range that is stretched (neither 8- nor 16-bit)
            return encode(Image.fromarray((g * 3e6 - 1e6).astype(np.int32), "I"), "TIFF",
                          compression="tiff_adobe_deflate")
        if kind == "F":
            f = (g * 7.3 - 2.1).astype(np.float32)
            f[: h // 20, : w // 20] = np.nan
            return encode(Image.fromarray(f, "F"), "TIFF", compression="tiff_adobe_deflate")
        if kind == "I;16":
            return encode(Image.fromarray((g * 65535).astype(np.uint16)), "PNG")
        raise AssertionError(kind)

    return make((3600, 3600), False), make((700, 530), True)


@pytest.mark.parametrize(
    "kind, budget_mib",
    [("P+transparency", 24), ("I", 64), ("F", 64), ("I;16", 40)],
)
def test_expensive_modes_are_bounded_and_keep_their_pixels(kind, budget_mib, monkeypatch,
                                                           budget_spy):
    big, small = _big_and_small(kind)
    pixels = 3600 * 3600

    # compositing on white never gets a picture bigger than a conversion strip
    composited: list[int] = []
    real_composite = Image.alpha_composite

    def spy(im1, im2):
        composited.append(im2.width * im2.height)
        return real_composite(im1, im2)

    monkeypatch.setattr(Image, "alpha_composite", spy)
    got, peak = numpy_peak(normalise_image, big)
    assert isinstance(got, NormalisedImage), got
    assert peak < pixels  # no full-size numpy copy (today: 8 bytes a pixel for I/F/I;16)
    if kind == "P+transparency":
        assert composited and max(composited) <= image_guard.STRIP_PIXELS + 3600
    monkeypatch.setattr(Image, "alpha_composite", real_composite)

    # a budget near what it needs: passes, and the decision says so
    budget_spy.clear()
    cfg = ImageConfig(max_decoded_bytes=budget_mib * 2**20)
    assert isinstance(normalise_image(big, cfg), NormalisedImage)
    ((_, size, need, limit),) = budget_spy
    assert size == (3600, 3600) and limit / 2 < need <= limit

    # the pixels of a small version: today's within one grey level, shrunk and unshrunk
    shrink = ImageConfig(image_size=64, resize_mode="keep_ratio", encode_format="png",
                         min_image_size=1)
    got = normalise_image(small, shrink)
    assert (got.width, got.height) == (85, 64)
    assert np.abs(_pixels(got) - _old_output(small, (85, 64))).max() <= 1
    same = ImageConfig(resize_mode="no", encode_format="png", min_image_size=1)
    assert np.abs(_pixels(normalise_image(small, same)) - _old_output(small, (700, 530))).max() <= 1


# --- concurrency ---------------------------------------------------------------------------


def test_decode_slots_bound_concurrent_decodes(monkeypatch, smooth_image):
    data = encode(smooth_image(21, (320, 240)), "JPEG")
    cfg = ImageConfig(image_size=64, decode_slots=2)
    inside = 0
    most = 0
    lock = threading.Lock()
    pair = threading.Barrier(2, timeout=30)  # proves two decodes do overlap
    real = images._decode_and_convert

    def instrumented(*args, **kw):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            pair.wait()
            return real(*args, **kw)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(images, "_decode_and_convert", instrumented)
    results: list = [None] * 8

    def work(i: int) -> None:
        results[i] = normalise_image(data, cfg)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(isinstance(r, NormalisedImage) for r in results), results
    assert most == 2


def test_decode_slots_are_per_size_and_default_to_the_cores():
    assert image_guard.decode_slots(3) is image_guard.decode_slots(3)
    assert image_guard.decode_slots(None) is image_guard.decode_slots(image_guard.core_count())
    assert image_guard.core_count() == len(os.sched_getaffinity(0))
    cfg = ImageConfig(decode_slots=3)
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # Beam pickles it: no semaphore inside
    with pytest.raises(ValueError):
        ImageConfig(decode_slots=0)


# --- open_rgb ------------------------------------------------------------------------------


def test_open_rgb_refuses_bombs_icos_and_non_regular_files(tmp_path, load_spy):
    with pytest.raises(ImageRefused) as e:
        open_rgb(png_header_only(10000, 9000))
    assert e.value.reason == "decompression_bomb" and "pixels" in e.value.detail
    with pytest.raises(ImageRefused) as e:  # 128 MB decoded + 256 MB of RGB
        open_rgb(png_header_only(8000, 8000, bit_depth=16, colour_type=0),
                 max_decoded_bytes=256 * 2**20)
    assert e.value.reason == "decompression_bomb" and "bytes" in e.value.detail
    load_spy.clear()
    with pytest.raises(ImageRefused) as e:
        open_rgb(ico_with_png(1500))
    assert e.value.reason == "not_an_image"
    assert load_spy == []

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome: list = []

    def try_fifo() -> None:
        try:
            open_rgb(fifo)
        except ImageRefused as err:
            outcome.append(err)

    t = threading.Thread(target=try_fifo, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert outcome and outcome[0].reason == "not_an_image" and "regular file" in outcome[0].detail
    with pytest.raises(ImageRefused, match="regular file"):
        open_rgb(tmp_path)  # a directory
    with pytest.raises(ImageRefused, match="regular file"):
        open_rgb("/dev/zero")
    # the typed error crosses process boundaries (DataLoader workers)
    err = pickle.loads(pickle.dumps(outcome[0]))
    assert (err.reason, err.detail) == (outcome[0].reason, outcome[0].detail)


def test_open_rgb_decodes_files_and_bytes(tmp_path, smooth_image):
    img = smooth_image(22, (640, 480))
    path = tmp_path / "a.png"
    path.write_bytes(encode(img, "PNG"))
    from_path = open_rgb(path)
    assert from_path.mode == "RGB" and from_path.size == (640, 480)
    assert np.array_equal(np.asarray(from_path), np.asarray(img))
    assert np.array_equal(np.asarray(open_rgb(path.read_bytes())), np.asarray(img))

    grey16 = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    rgb = open_rgb(encode(Image.fromarray(grey16), "PNG"))
    assert [rgb.getpixel((x, 0)) for x in range(4)] == [(0,) * 3, (4,) * 3, (128,) * 3, (255,) * 3]

    big = smooth_image(23, (2400, 1800))
    shrunk = open_rgb(encode(big, "JPEG", quality=92), max_side=300)
    assert shrunk.size == (300, 225)
    ref = big.resize((300, 225), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(shrunk, np.int16) - np.asarray(ref, np.int16)).mean() < 3


def test_to_rgb_reduce_is_convert_then_reduce():
    """The strip-wise conversion is per pixel the whole-picture one, reduce included."""
    rng = np.random.default_rng(5)
    p = Image.frombytes("P", (1001, 703), rng.integers(0, 40, (703, 1001), np.uint8).tobytes())
    p.putpalette(rng.integers(0, 256, 768, np.uint8).tobytes())
    p.info["transparency"] = 7
    for img in (p, p.convert("RGB").convert("CMYK"), p.convert("L")):
        for factor in ((1, 1), (2, 3), (7, 7)):
            ref = _old_to_rgb(img)
            ref = ref.reduce(factor) if factor != (1, 1) else ref
            assert np.array_equal(
                np.asarray(image_guard.to_rgb(img, factor)), np.asarray(ref)
            ), (img.mode, factor)
