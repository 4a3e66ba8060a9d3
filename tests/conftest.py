"""Shared pytest fixtures. Fixtures are built by code; nothing is downloaded."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.demo.server import DemoServer


def _smooth_random_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A deterministic picture with structure at several scales (good for pHash tests)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    base = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, base.shape, dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo world: ``img/a.jpg`` (320x240), ``img/b.png`` (200x200), ``img/c.jpg``."""
    root = tmp_path_factory.mktemp("demo_world")
    img = root / "img"
    img.mkdir()
    (img / "a.jpg").write_bytes(_encode(_smooth_random_image(1), "JPEG", quality=90))
    (img / "b.png").write_bytes(_encode(_smooth_random_image(2, (200, 200)), "PNG"))
    (img / "c.jpg").write_bytes(_encode(_smooth_random_image(3, (256, 192)), "JPEG", quality=90))
    return root


@pytest.fixture(scope="session")
def smooth_image():
    """``smooth_image(seed, size=(320, 240)) -> PIL.Image``: deterministic structured RGB."""
    return _smooth_random_image


@pytest.fixture
def demo_server(demo_root: Path) -> Iterator[DemoServer]:
    """A fresh DemoServer (fresh request counters) on an ephemeral 127.0.0.1 port."""
    with DemoServer(demo_root) as srv:
        yield srv


@pytest.fixture
def load_spy(monkeypatch):
    """Records every pixel decode (ImageFile.load) so tests can prove none happened."""
    from PIL import ImageFile

    calls = []
    real = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls
