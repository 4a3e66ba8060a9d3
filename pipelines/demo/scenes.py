"""A synthetic remote-sensing world whose pixels and captions agree.

Every scene class is drawn top-down with numpy + PIL: a textured background, the class's
structures (fields, roofs, runways, cars, boats...), sun shadows, then lighting jitter, sensor
noise and a random 90° orientation, so two renders of one class are never alike but always
read as that class. What is counted is recorded as it is drawn: ``meta["objects"]`` holds the
number of every countable object actually on the image and ``meta["boxes"]`` their boxes in
the final (rotated) pixel frame, so a counting or detection benchmark can trust them.

``render_everyday`` draws the opposite: ground-level "photos" (sky or wall on top, ground or
table below, a large subject in the middle) with everyday captions; they train and test the
RS / non-RS image filter.

Everything is a pure function of the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
Box = tuple[str, float, float, float, float]

#: the aerial scene classes, in a fixed order (class index = position)
CLASSES: tuple[str, ...] = (
    "forest",
    "lake",
    "farmland",
    "residential",
    "airport",
    "highway",
    "beach",
    "parking_lot",
    "industrial",
    "desert",
    "river",
    "baseball_field",
    "harbor",
)

#: how a caption names each class; the first is the canonical name (zero-shot prompts use it)
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "forest": ("forest", "woodland"),
    "lake": ("lake",),
    "farmland": ("farmland", "cropland"),
    "residential": ("residential area", "residential neighborhood", "housing estate"),
    "airport": ("airport",),
    "highway": ("highway", "motorway"),
    "beach": ("beach",),
    "parking_lot": ("parking lot",),
    "industrial": ("industrial area", "industrial zone"),
    "desert": ("desert",),
    "river": ("river",),
    "baseball_field": ("baseball field",),
    "harbor": ("harbor", "marina"),
}

#: the ground-level subjects of ``render_everyday``
EVERYDAY_KINDS: tuple[str, ...] = (
    "person",
    "cat",
    "dog",
    "house",
    "car",
    "bicycle",
    "cup",
    "food",
    "flowers",
)

#: caption openers / closers; each contains a term of the RS5M keyword list
RS_PREFIXES: tuple[str, ...] = (
    "aerial view of",
    "satellite image of",
    "drone shot of",
    "overhead view of",
    "remote sensing image of",
    "an aerial photograph of",
    "orthophoto of",
    "high resolution satellite imagery of",
    "bird's eye view of",
    "UAV image of",
    "top-down view of",
)
RS_SUFFIXES: tuple[str, ...] = (
    ", seen from above",
    ", aerial view",
    " in a satellite image",
    ", photographed from the air",
    ", drone photo",
    " (aerial photo)",
)

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve")


# ----------------------------------------------------------------------------- helpers


def _c(rng: np.random.Generator, base: RGB, jitter: float) -> RGB:
    """``base`` with every channel moved by up to ``jitter``."""
    v = np.asarray(base, dtype=np.float64) + rng.uniform(-jitter, jitter, 3)
    return tuple(int(x) for x in np.clip(v, 0, 255))  # type: ignore[return-value]


def _shade(col: RGB, f: float) -> RGB:
    return tuple(int(max(0, min(255, c * f))) for c in col)  # type: ignore[return-value]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a ``cells``×``cells`` random grid, bicubically upsampled."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _texture(
    rng: np.random.Generator, size: int, base: RGB, low: float = 12.0, high: float = 6.0,
    cells: int = 6,
) -> np.ndarray:
    """A float HxWx3 ground texture around ``base``: blotches plus grain."""
    lum = _smooth_noise(rng, size, cells) * low + rng.standard_normal((size, size)) * high
    tint = _smooth_noise(rng, size, max(2, cells // 2)) * (low * 0.4)
    arr = np.empty((size, size, 3), dtype=np.float32)
    arr[:] = np.asarray(base, dtype=np.float32)
    arr += lum[..., None]
    arr[..., 0] += tint
    arr[..., 2] -= tint
    return arr


def _to_img(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _rect(cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    """Corners of a ``w``×``h`` rectangle centred on (cx, cy), rotated by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    pts = []
    for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        pts.append((cx + dx * c - dy * s, cy + dx * s + dy * c))
    return pts


def _bbox(pts: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def _overlaps(box: tuple[float, float, float, float], boxes: list[Box], pad: float = 1.0) -> bool:
    x0, y0, x1, y1 = box
    for _, a0, b0, a1, b1 in boxes:
        if x0 < a1 + pad and a0 < x1 + pad and y0 < b1 + pad and b0 < y1 + pad:
            return True
    return False


def _tree(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, y: float, r: float,
          green: RGB) -> None:
    """One tree crown seen from above: shadow, crown, sunlit side."""
    draw.ellipse((x - r + r * 0.45, y - r + r * 0.45, x + r + r * 0.45, y + r + r * 0.45),
                 fill=_shade(green, 0.35))
    draw.ellipse((x - r, y - r, x + r, y + r), fill=green)
    h = r * 0.5
    draw.ellipse((x - r * 0.6, y - r * 0.6, x - r * 0.6 + h * 1.4, y - r * 0.6 + h * 1.4),
                 fill=_shade(green, 1.25))


def _scatter_trees(draw, rng, size, n, r_range, ok: Callable[[float, float], bool] | None,
                   greens=((45, 85, 40), (60, 100, 45), (35, 70, 35))) -> int:
    """Draw up to ``n`` trees where ``ok(x, y)``; the number drawn."""
    drawn = 0
    for _ in range(n):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(*r_range)
        if ok is not None and not ok(x, y):
            continue
        _tree(draw, rng, x, y, r, _c(rng, greens[int(rng.integers(len(greens)))], 12))
        drawn += 1
    return drawn


_CAR_COLOURS: tuple[RGB, ...] = (
    (235, 235, 235), (200, 200, 205), (170, 30, 30), (35, 60, 160), (25, 25, 28),
    (230, 200, 40), (30, 110, 60), (120, 125, 130),
)


def _car(draw, rng, cx, cy, length, width, horizontal: bool) -> Box:
    """A car from above (body, darker windscreen); its box."""
    col = _CAR_COLOURS[int(rng.integers(len(_CAR_COLOURS)))]
    col = _c(rng, col, 10)
    w, h = (length, width) if horizontal else (width, length)
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    draw.rectangle((x0 + 1, y0 + 1, x1 + 1, y1 + 1), fill=(30, 30, 32))  # shadow
    draw.rounded_rectangle((x0, y0, x1, y1), radius=max(1, int(width / 4)), fill=col)
    glass = (40, 50, 60) if sum(col) > 200 else (140, 150, 160)
    if horizontal:
        draw.rectangle((x0 + w * 0.6, y0 + 1, x0 + w * 0.75, y1 - 1), fill=glass)
    else:
        draw.rectangle((x0 + 1, y0 + h * 0.25, x1 - 1, y0 + h * 0.4), fill=glass)
    return ("car", x0, y0, x1, y1)


def _airplane(draw, cx, cy, span, angle, col=(238, 238, 240)) -> Box:
    """An airliner from above: fuselage, swept wings, tailplane; its box."""
    L = span * 1.05
    c, s = math.cos(angle), math.sin(angle)

    def tr(pts):
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]

    fus = tr([(-L / 2, -span * 0.06), (L / 2 - span * 0.08, -span * 0.06), (L / 2, 0),
              (L / 2 - span * 0.08, span * 0.06), (-L / 2, span * 0.06)])
    wing = tr([(span * 0.12, -span * 0.05), (-span * 0.12, -span / 2), (-span * 0.22, -span / 2),
               (-span * 0.08, 0), (-span * 0.22, span / 2), (-span * 0.12, span / 2),
               (span * 0.12, span * 0.05)])
    tail = tr([(-L / 2 + span * 0.14, 0), (-L / 2, -span * 0.2), (-L / 2 - span * 0.04, -span * 0.2),
               (-L / 2 + span * 0.02, 0), (-L / 2 - span * 0.04, span * 0.2), (-L / 2, span * 0.2)])
    off = span * 0.06
    for poly in (fus, wing, tail):
        draw.polygon([(x + off, y + off) for x, y in poly], fill=(55, 58, 60))
    for poly in (wing, tail, fus):
        draw.polygon(poly, fill=col)
    return ("airplane", *_bbox(fus + wing + tail))


def _boat(draw, rng, cx, cy, length, angle) -> Box:
    width = length * rng.uniform(0.28, 0.38)
    c, s = math.cos(angle), math.sin(angle)
    hull = [(-length / 2, -width / 2), (length * 0.25, -width / 2), (length / 2, 0),
            (length * 0.25, width / 2), (-length / 2, width / 2)]
    pts = [(cx + x * c - y * s, cy + x * s + y * c) for x, y in hull]
    col = _c(rng, [(245, 245, 245), (230, 230, 220), (40, 70, 150), (200, 60, 40)][
        int(rng.integers(4))], 8)
    draw.polygon([(x + 1.5, y + 1.5) for x, y in pts], fill=(20, 35, 50))
    draw.polygon(pts, fill=col)
    deck = [(cx + x * 0.45 * c - y * 0.5 * s, cy + x * 0.45 * s + y * 0.5 * c) for x, y in hull]
    draw.polygon(deck, fill=_shade(col, 0.8) if sum(col) > 400 else (220, 220, 215))
    return ("boat", *_bbox(pts))


def _building(draw, rng, x0, y0, x1, y1, roof: RGB, gable: bool = True) -> Box:
    """A building from above: shadow, roof (two shades when gabled); its box."""
    sh = max(2.0, min(x1 - x0, y1 - y0) * 0.25)
    draw.rectangle((x0 + sh, y0 + sh, x1 + sh, y1 + sh), fill=(45, 48, 45))
    draw.rectangle((x0, y0, x1, y1), fill=roof)
    if gable:
        if x1 - x0 >= y1 - y0:
            draw.rectangle((x0, (y0 + y1) / 2, x1, y1), fill=_shade(roof, 0.78))
        else:
            draw.rectangle(((x0 + x1) / 2, y0, x1, y1), fill=_shade(roof, 0.78))
    return ("building", x0, y0, x1, y1)


# ----------------------------------------------------------------------------- scenes
# Each ``_draw_<class>(rng, size)`` returns (float HxWx3 array, boxes, details) before the
# shared finishing (lighting, noise, orientation); ``details`` feeds the caption.


def _draw_forest(rng, S):
    img = _to_img(_texture(rng, S, _c(rng, (38, 66, 34), 8), low=14, high=8))
    d = ImageDraw.Draw(img)
    details: dict[str, Any] = {}
    clearing = None
    if rng.random() < 0.35:
        cx, cy, r = rng.uniform(0.25, 0.75) * S, rng.uniform(0.25, 0.75) * S, rng.uniform(
            0.1, 0.18) * S
        d.ellipse((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8), fill=_c(rng, (120, 130, 70), 15))
        clearing = (cx, cy, r)
        details["clearing"] = True
    if rng.random() < 0.3:
        y = rng.uniform(0.2, 0.8) * S
        d.line([(0, y), (S / 2, y + rng.uniform(-0.2, 0.2) * S), (S, y + rng.uniform(-0.2, 0.2) * S)],
               fill=_c(rng, (150, 125, 90), 10), width=max(2, S // 60), joint="curve")
        details["track"] = True
    r0 = S / rng.uniform(22, 32)
    n = int(S * S / (r0 * r0) * rng.uniform(0.45, 0.65))

    def ok(x, y):
        if clearing is None:
            return True
        cx, cy, r = clearing
        return (x - cx) ** 2 + ((y - cy) / 0.8) ** 2 > r * r

    greens = ((35, 75, 35), (50, 92, 40), (30, 62, 32), (65, 100, 50))
    if rng.random() < 0.3:  # autumn
        greens = greens + ((150, 110, 40), (120, 70, 30))
        details["autumn"] = True
    trees = _scatter_trees(d, rng, S, n, (r0 * 0.7, r0 * 1.3), ok, greens)
    return np.asarray(img, dtype=np.float32), [], details | {"tree": trees}


def _water(rng, S, base: RGB) -> np.ndarray:
    arr = _texture(rng, S, base, low=6, high=3, cells=4)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    a = rng.uniform(0, math.pi)
    f = rng.uniform(0.25, 0.45)
    ripple = np.sin((xx * math.cos(a) + yy * math.sin(a)) * f + _smooth_noise(rng, S, 5) * 3)
    arr += (ripple * 5)[..., None]
    return arr


def _blob_mask(rng, S, cx, cy, r, wobble=0.25) -> Image.Image:
    n = 48
    k = rng.integers(2, 6, 3)
    ph = rng.uniform(0, 2 * math.pi, 3)
    amp = rng.uniform(0, wobble, 3)
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        rr = r * (1 + sum(amp[j] * math.sin(k[j] * t + ph[j]) for j in range(3)) / 1.5)
        pts.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
    m = Image.new("L", (S, S), 0)
    ImageDraw.Draw(m).polygon(pts, fill=255)
    return m


def _draw_lake(rng, S):
    land_kind = "fields" if rng.random() < 0.5 else "trees"
    land = _texture(rng, S, _c(rng, (95, 120, 60) if land_kind == "fields" else (45, 75, 40), 10),
                    low=14, high=7)
    water_col = _c(rng, [(30, 70, 110), (35, 90, 100), (25, 55, 85)][int(rng.integers(3))], 8)
    water = _water(rng, S, water_col)
    cx, cy = rng.uniform(0.4, 0.6, 2) * S
    mask = _blob_mask(rng, S, cx, cy, rng.uniform(0.28, 0.38) * S)
    shore = mask.filter(ImageFilter.MaxFilter(5))
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255
    ms = np.asarray(shore, dtype=np.float32)[..., None] / 255
    sand = np.asarray(_c(rng, (170, 160, 120), 10), dtype=np.float32)
    arr = land * (1 - ms) + sand * (ms - m) + water * m
    img = _to_img(arr)
    d = ImageDraw.Draw(img)
    mk = np.asarray(mask)
    trees = 0
    if land_kind == "trees":
        trees = _scatter_trees(d, rng, S, int(S * 0.9), (S / 45, S / 28),
                               lambda x, y: np.asarray(shore)[int(y), int(x)] == 0)
    boxes: list[Box] = []
    for _ in range(int(rng.integers(0, 4))):
        L = S * rng.uniform(0.04, 0.06)
        for _try in range(20):
            x, y = rng.uniform(0.1, 0.9, 2) * S
            if mk[int(y), int(x)] and mk[int(y + L), int(x)] and mk[int(y - L), int(x)] \
                    and mk[int(y), int(min(S - 1, x + L))] and mk[int(y), int(max(0, x - L))]:
                b = _boat(d, rng, x, y, L, rng.uniform(0, math.pi))
                if not _overlaps(b[1:], boxes, 2):
                    boxes.append(b)
                break
    details = {"land": land_kind, "tree": trees, "boat": len(boxes)}
    return np.asarray(img, dtype=np.float32), boxes, details


_CROPS: dict[str, RGB] = {
    "green": (80, 130, 50),
    "yellow": (200, 180, 90),
    "brown": (130, 100, 70),
    "light green": (140, 170, 80),
    "dark green": (45, 90, 40),
}


def _draw_farmland(rng, S):
    img = _to_img(_texture(rng, S, _c(rng, (120, 105, 80), 8), low=8, high=5))
    d = ImageDraw.Draw(img)
    angle = rng.uniform(0, math.pi / 2) if rng.random() < 0.6 else 0.0
    ca, sa = math.cos(angle), math.sin(angle)
    names = list(_CROPS)
    weights = rng.dirichlet(np.ones(len(names)) * 0.7)
    area: dict[str, float] = {}
    cx = cy = S / 2
    half = S * 0.75
    u = -half
    gap = max(1.5, S / 110)
    while u < half:
        w = rng.uniform(0.12, 0.3) * S
        v = -half
        while v < half:
            length = rng.uniform(0.15, 0.45) * S
            crop = names[int(rng.choice(len(names), p=weights))]
            col = _c(rng, _CROPS[crop], 10)
            mu, mv = u + w / 2, v + length / 2
            px, py = cx + mu * ca - mv * sa, cy + mu * sa + mv * ca
            poly = _rect(px, py, w - gap, length - gap, angle)
            d.polygon(poly, fill=col)
            # crop rows: darker lines along the field
            rows_every = rng.uniform(3, 6)
            k = -w / 2 + rows_every
            dark = _shade(col, 0.85)
            while k < w / 2 - 1:
                a = (px + k * ca - (-length / 2 + 1) * sa, py + k * sa + (-length / 2 + 1) * ca)
                b = (px + k * ca - (length / 2 - 1) * sa, py + k * sa + (length / 2 - 1) * ca)
                d.line([a, b], fill=dark, width=1)
                k += rows_every
            # the visible share of the field
            x0, y0, x1, y1 = _bbox(poly)
            vis = max(0.0, min(x1, S) - max(x0, 0)) * max(0.0, min(y1, S) - max(y0, 0))
            area[crop] = area.get(crop, 0.0) + vis
            v += length
        u += w
    boxes: list[Box] = []
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 3))):
            x, y = rng.uniform(0.1, 0.85, 2) * S
            w, h = rng.uniform(0.05, 0.09, 2) * S
            bb = (x, y, x + w, y + h)
            if not _overlaps(bb, boxes, 4):
                boxes.append(_building(d, rng, *bb, _c(rng, (150, 60, 50), 20)))
    total = sum(area.values()) or 1.0
    colours = [c for c, a in sorted(area.items(), key=lambda kv: (-kv[1], kv[0])) if a / total > 0.12]
    details = {"colours": colours[:3], "building": len(boxes)}
    return np.asarray(img, dtype=np.float32), boxes, details


_ROOFS: dict[str, RGB] = {
    "red": (165, 70, 55),
    "brown": (120, 85, 65),
    "grey": (130, 130, 135),
    "dark": (70, 70, 80),
    "white": (215, 215, 210),
}


def _draw_residential(rng, S):
    img = _to_img(_texture(rng, S, _c(rng, (85, 115, 65), 10), low=10, high=6))
    d = ImageDraw.Draw(img)
    block = rng.uniform(0.2, 0.32) * S
    street = rng.uniform(0.035, 0.05) * S
    road_col = _c(rng, (115, 115, 118), 8)
    off_x, off_y = rng.uniform(0, block, 2)
    xs = np.arange(-block + off_x, S + block, block)
    ys = np.arange(-block + off_y, S + block, block)
    for x in xs:
        d.rectangle((x, 0, x + street, S), fill=road_col)
    for y in ys:
        d.rectangle((0, y, S, y + street), fill=road_col)
    palette = list(_ROOFS)
    main_roof = palette[int(rng.integers(len(palette)))]
    boxes: list[Box] = []
    roof_count: dict[str, int] = {}
    trees = 0
    for bx in xs:
        for by in ys:
            x0, y0 = bx + street + 2, by + street + 2
            inner = block - street - 4
            if inner <= 6:
                continue
            per_row = int(rng.integers(2, 4))
            cell = inner / per_row
            for row in range(2):
                for col in range(per_row):
                    if rng.random() < 0.1:
                        continue
                    hw = cell * rng.uniform(0.55, 0.75)
                    hh = inner / 2 * rng.uniform(0.45, 0.6)
                    hx = x0 + col * cell + (cell - hw) / 2
                    hy = y0 + (2 if row == 0 else inner - hh - 2)
                    bb = (hx, hy, hx + hw, hy + hh)
                    if bb[2] < 0 or bb[3] < 0 or bb[0] > S or bb[1] > S:
                        continue
                    roof = main_roof if rng.random() < 0.6 else palette[int(rng.integers(len(palette)))]
                    b = _building(d, rng, *bb, _c(rng, _ROOFS[roof], 10))
                    # only buildings mostly inside the frame count
                    if bb[0] >= -1 and bb[1] >= -1 and bb[2] <= S + 1 and bb[3] <= S + 1:
                        boxes.append(b)
                        roof_count[roof] = roof_count.get(roof, 0) + 1
            # a garden tree or two between the rows
            for _ in range(int(rng.integers(0, 3))):
                tx = x0 + rng.uniform(0.1, 0.9) * inner
                ty = y0 + inner / 2 + rng.uniform(-0.05, 0.05) * inner
                if 0 <= tx < S and 0 <= ty < S:
                    _tree(d, rng, tx, ty, S / rng.uniform(40, 55), _c(rng, (45, 90, 40), 10))
                    trees += 1
    top = max(roof_count.items(), key=lambda kv: (kv[1], kv[0]))[0] if roof_count else main_roof
    details = {"roof": top, "building": len(boxes), "tree": trees}
    return np.asarray(img, dtype=np.float32), boxes, details


def _draw_airport(rng, S):
    img = _to_img(_texture(rng, S, _c(rng, (110, 130, 75), 10), low=10, high=6))
    d = ImageDraw.Draw(img)
    rw = rng.uniform(0.08, 0.11) * S
    ry = rng.uniform(0.18, 0.3) * S
    d.rectangle((-2, ry, S + 2, ry + rw), fill=_c(rng, (75, 75, 78), 5))
    x = 0.0
    while x < S:  # centre line dashes
        d.rectangle((x, ry + rw / 2 - 1, x + S * 0.04, ry + rw / 2 + 1), fill=(235, 235, 230))
        x += S * 0.08
    for i in range(6):  # threshold stripes
        yy = ry + rw * (0.12 + i * 0.14)
        d.rectangle((S * 0.02, yy, S * 0.1, yy + rw * 0.07), fill=(235, 235, 230))
    ty = ry + rw + rng.uniform(0.05, 0.08) * S
    d.rectangle((-2, ty, S + 2, ty + rw * 0.45), fill=_c(rng, (95, 95, 98), 5))
    for xx in rng.uniform(0.15, 0.85, 2) * S:
        d.rectangle((xx, ry + rw, xx + rw * 0.45, ty), fill=_c(rng, (95, 95, 98), 5))
    apron_y = ty + rw * 0.45 + S * 0.03
    apron_col = _c(rng, (165, 165, 160), 8)
    d.rectangle((S * 0.05, apron_y, S * 0.95, S * 0.86), fill=apron_col)
    boxes: list[Box] = []
    term = (S * rng.uniform(0.08, 0.2), S * 0.87, S * rng.uniform(0.7, 0.92), S * 0.97)
    boxes.append(_building(d, rng, *term, _c(rng, (200, 200, 205), 10), gable=False))
    n = int(rng.integers(1, 7))
    span = S * rng.uniform(0.09, 0.12)
    ang = -math.pi / 2 if rng.random() < 0.7 else math.pi / 2
    slots = np.arange(S * 0.05 + span * 0.7, S * 0.95 - span * 0.6, span * 1.25)
    chosen = sorted(rng.choice(len(slots), size=min(n, len(slots)), replace=False))
    yc = (apron_y + S * 0.86) / 2
    for i in chosen:
        boxes.append(_airplane(d, slots[i], yc, span, ang))
    if rng.random() < 0.3:  # one on the runway
        boxes.append(_airplane(d, rng.uniform(0.3, 0.7) * S, ry + rw / 2, span, 0.0))
    planes = sum(1 for b in boxes if b[0] == "airplane")
    details = {"airplane": planes, "building": 1}
    return np.asarray(img, dtype=np.float32), boxes, details


def _draw_highway(rng, S):
    land = "fields" if rng.random() < 0.5 else "trees"
    img = _to_img(_texture(rng, S, _c(rng, (105, 125, 70) if land == "fields" else (55, 85, 45),
                                      10), low=14, high=7))
    d = ImageDraw.Draw(img)
    trees = 0
    if land == "trees":
        trees = _scatter_trees(d, rng, S, int(S * 0.5), (S / 45, S / 30), None)
    lane = rng.uniform(0.035, 0.045) * S
    lanes = int(rng.integers(2, 4))
    median = lane * 0.6
    total = 2 * lanes * lane + median
    y0 = rng.uniform(0.25, 0.75) * S - total / 2
    road = _c(rng, (85, 85, 88), 5)
    boxes: list[Box] = []
    crossing = rng.random() < 0.35
    if crossing:
        x0 = rng.uniform(0.25, 0.7) * S
        d.rectangle((x0, -2, x0 + lane * 2, S + 2), fill=_c(rng, (100, 100, 100), 5))
    d.rectangle((-2, y0 - 2, S + 2, y0 + total + 2), fill=(150, 150, 145))
    carriage = [(y0, y0 + lanes * lane), (y0 + lanes * lane + median, y0 + total)]
    for a, b in carriage:
        d.rectangle((-2, a, S + 2, b), fill=road)
        for k in range(1, lanes):
            yy = a + k * lane
            x = rng.uniform(0, S * 0.05)
            while x < S:
                d.line([(x, yy), (x + S * 0.03, yy)], fill=(225, 225, 215), width=1)
                x += S * 0.07
    d.rectangle((-2, y0 + lanes * lane, S + 2, y0 + lanes * lane + median),
                fill=_c(rng, (80, 110, 60), 8))
    clen, cwid = lane * 1.6, lane * 0.65
    for a, _b in carriage:
        for k in range(lanes):
            cy = a + (k + 0.5) * lane
            x = rng.uniform(-S * 0.1, S * 0.1)
            while x < S:
                x += rng.exponential(S * 0.22) + clen * 1.5
                if clen / 2 <= x <= S - clen / 2:
                    bb = (x - clen / 2, cy - cwid / 2, x + clen / 2, cy + cwid / 2)
                    if not _overlaps(bb, boxes, 2):
                        boxes.append(_car(d, rng, x, cy, clen, cwid, True))
    details = {"land": land, "lanes": 2 * lanes, "crossing": crossing, "car": len(boxes),
               "tree": trees}
    return np.asarray(img, dtype=np.float32), boxes, details


def _draw_beach(rng, S):
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    a = rng.uniform(-0.4, 0.4)
    base = rng.uniform(0.4, 0.6) * S
    shore = base + (xx - S / 2) * math.tan(a) + np.sin(xx / S * rng.uniform(4, 9)
                                                         + rng.uniform(0, 6)) * S * 0.03
    dist = yy - shore  # > 0: water
    sand = _texture(rng, S, _c(rng, (215, 195, 150), 8), low=8, high=6)
    wet = np.asarray(_c(rng, (170, 150, 115), 6), dtype=np.float32)
    shallow = np.asarray(_c(rng, (70, 170, 175), 10), dtype=np.float32)
    deep = np.asarray(_c(rng, (25, 75, 130), 10), dtype=np.float32)
    t = np.clip(dist / (S * 0.35), 0, 1)[..., None]
    water = _water(rng, S, (0, 0, 0)) + shallow * (1 - t) + deep * t
    arr = np.where((dist > 0)[..., None], water, sand)
    wetband = ((dist <= 0) & (dist > -S * 0.025))[..., None]
    arr = np.where(wetband, wet + (arr - sand) * 0.5, arr)
    foam = np.zeros((S, S), np.float32)
    for k in range(3):
        off = S * (0.01 + 0.04 * k)
        band = np.exp(-((dist - off - np.sin(xx / S * 25 + k) * 1.5) ** 2) / 3.0)
        foam += band * (0.9 - 0.25 * k)
    arr = arr * (1 - np.clip(foam, 0, 1)[..., None]) + 245 * np.clip(foam, 0, 1)[..., None]
    img = _to_img(arr)
    d = ImageDraw.Draw(img)
    boxes: list[Box] = []
    for _ in range(int(rng.integers(0, 9))):
        for _try in range(10):
            x = rng.uniform(0.05, 0.95) * S
            y = rng.uniform(0.03, 0.97) * S
            r = S * rng.uniform(0.018, 0.026)
            if dist[int(y), int(x)] < -S * 0.06 and dist[int(y), int(x)] + r < 0:
                bb = (x - r, y - r, x + r, y + r)
                if not _overlaps(bb, boxes, 3):
                    col = _c(rng, [(220, 50, 50), (40, 90, 200), (240, 200, 40), (250, 250, 250)][
                        int(rng.integers(4))], 10)
                    d.ellipse((x - r + 2, y - r + 2, x + r + 2, y + r + 2), fill=(120, 105, 80))
                    d.ellipse(bb, fill=col)
                    d.line([(x - r, y), (x + r, y)], fill=_shade(col, 0.7))
                    boxes.append(("umbrella", *bb))
                break
    details = {"umbrella": len(boxes)}
    return np.asarray(img, dtype=np.float32), boxes, details


def _draw_parking_lot(rng, S):
    img = _to_img(_texture(rng, S, _c(rng, (92, 92, 96), 8), low=8, high=7))
    d = ImageDraw.Draw(img)
    border = S * rng.uniform(0.05, 0.1)
    d.rectangle((0, 0, S, border), fill=_c(rng, (80, 115, 60), 8))
    trees = _scatter_trees(d, rng, S, int(S / 20), (S / 60, S / 40), lambda x, y: y < border - 2)
    stall_w = S * rng.uniform(0.045, 0.06)
    stall_l = stall_w * 2.1
    aisle = stall_l * 0.9
    occupancy = rng.uniform(0.25, 0.95)
    boxes: list[Box] = []
    y = border + S * 0.03
    line_col = (225, 225, 220)
    while y + 2 * stall_l < S - S * 0.02:
        for r in range(2):  # a double row of stalls
            yr = y + r * stall_l
            x = S * 0.04
            d.line([(x, yr + stall_l * r), (S - S * 0.04, yr + stall_l * r)], fill=line_col)
            while x + stall_w < S - S * 0.04:
                d.line([(x, yr), (x, yr + stall_l)], fill=line_col, width=1)
                if rng.random() < occupancy:
                    cx, cy = x + stall_w / 2, yr + stall_l / 2
                    boxes.append(_car(d, rng, cx, cy, stall_l * 0.78, stall_w * 0.68, False))
                x += stall_w
            d.line([(x, yr), (x, yr + stall_l)], fill=line_col, width=1)
        y += 2 * stall_l + aisle
    details = {"car": len(boxes), "tree": trees, "occupancy": occupancy}
    return np.asarray(img, dtype=np.float32), boxes, details


def _draw_industrial(rng, S):
    img = _to_img(_texture(rng, S, _c(rng, (150, 145, 130), 8), low=10, high=7))
    d = ImageDraw.Draw(img)
    boxes: list[Box] = []
    road = _c(rng, (100, 100, 100), 5)
    ry = rng.uniform(0.4, 0.6) * S
    d.rectangle((-2, ry, S + 2, ry + S * 0.05), fill=road)
    roofs = ((205, 205, 205), (170, 175, 180), (90, 120, 160), (225, 225, 220), (150, 90, 70))
    for _ in range(int(rng.integers(2, 7))):
        for _try in range(15):
            w, h = rng.uniform(0.18, 0.4) * S, rng.uniform(0.12, 0.25) * S
            x, y = rng.uniform(0.0, S - w), rng.uniform(0.0, S - h)
            bb = (x, y, x + w, y + h)
            if y < ry + S * 0.05 + 2 and y + h > ry - 2:
                continue
            if not _overlaps(bb, boxes, S * 0.04):
                col = _c(rng, roofs[int(rng.integers(len(roofs)))], 8)
                b = _building(d, rng, *bb, col, gable=False)
                for k in range(1, int(w // (S * 0.04))):  # roof panels
                    d.line([(x + k * S * 0.04, y), (x + k * S * 0.04, y + h)],
                           fill=_shade(col, 0.88))
                boxes.append(b)
                break
    tanks = 0
    for _ in range(int(rng.integers(0, 7))):
        for _try in range(15):
            r = rng.uniform(0.03, 0.06) * S
            x, y = rng.uniform(r, S - r), rng.uniform(r, S - r)
            bb = (x - r, y - r, x + r, y + r)
            if y + r > ry - 2 and y - r < ry + S * 0.05 + 2:
                continue
            if not _overlaps(bb, boxes, 3):
                d.ellipse((x - r + r * 0.4, y - r + r * 0.4, x + r + r * 0.4, y + r + r * 0.4),
                          fill=(60, 60, 58))
                d.ellipse(bb, fill=_c(rng, (230, 230, 225), 8))
                d.ellipse((x - r * 0.7, y - r * 0.7, x + r * 0.7, y + r * 0.7),
                          outline=(190, 190, 185))
                boxes.append(("storage_tank", *bb))
                tanks += 1
                break
    details = {"building": len(boxes) - tanks, "storage_tank": tanks}
    return np.asarray(img, dtype=np.float32), boxes, details


def _draw_desert(rng, S):
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    base = _c(rng, (210, 170, 115), 12)
    arr = _texture(rng, S, base, low=10, high=5)
    a = rng.uniform(0, math.pi)
    wl = rng.uniform(0.12, 0.25) * S
    u = (xx * math.cos(a) + yy * math.sin(a)) + _smooth_noise(rng, S, 4) * wl * 0.5
    phase = (u / wl) % 1.0
    # a dune: long gentle windward slope, short dark slip face
    shade = np.where(phase < 0.75, phase / 0.75 * 22 - 8, -30 + (phase - 0.75) * 40)
    arr += shade[..., None]
    ripples = np.sin((xx * math.cos(a + 0.3) + yy * math.sin(a + 0.3)) * 1.1) * 3
    arr += ripples[..., None]
    details: dict[str, Any] = {"dunes": True}
    img = _to_img(arr)
    if rng.random() < 0.3:
        d = ImageDraw.Draw(img)
        y = rng.uniform(0.2, 0.8) * S
        d.line([(0, y), (S, y + rng.uniform(-0.3, 0.3) * S)], fill=_c(rng, (160, 130, 95), 8),
               width=max(2, S // 80))
        details["track"] = True
    return np.asarray(img, dtype=np.float32), [], details


def _draw_river(rng, S):
    land = ["fields", "woodland", "meadows"][int(rng.integers(3))]
    base = {"fields": (110, 125, 70), "woodland": (50, 80, 42), "meadows": (95, 135, 70)}[land]
    img = _to_img(_texture(rng, S, _c(rng, base, 10), low=14, high=7))
    d = ImageDraw.Draw(img)
    amp = rng.uniform(0.08, 0.2) * S
    wl = rng.uniform(0.6, 1.2) * S
    ph = rng.uniform(0, 2 * math.pi)
    y0 = rng.uniform(0.35, 0.65) * S
    width = rng.uniform(0.07, 0.13) * S
    pts = [(x, y0 + amp * math.sin(2 * math.pi * x / wl + ph)) for x in np.linspace(-10, S + 10, 60)]
    d.line(pts, fill=_c(rng, (170, 160, 120), 8), width=int(width * 1.35), joint="curve")
    water = _c(rng, [(40, 80, 110), (90, 95, 70), (50, 95, 105)][int(rng.integers(3))], 6)
    d.line(pts, fill=water, width=int(width), joint="curve")
    d.line([(x, y + 2) for x, y in pts], fill=_shade(water, 1.12), width=max(1, int(width / 5)))
    trees = 0
    if land == "woodland":
        def ok(x, y):
            ry = y0 + amp * math.sin(2 * math.pi * x / wl + ph)
            return abs(y - ry) > width * 0.9
        trees = _scatter_trees(d, rng, S, int(S * 0.8), (S / 45, S / 30), ok)
    boxes: list[Box] = []
    if rng.random() < 0.4:
        bx = rng.uniform(0.25, 0.75) * S
        by = y0 + amp * math.sin(2 * math.pi * bx / wl + ph)
        half = width * 1.1
        d.rectangle((bx - S * 0.02 + 2, by - half + 2, bx + S * 0.02 + 2, by + half + 2),
                    fill=(40, 45, 45))
        d.rectangle((bx - S * 0.02, by - half, bx + S * 0.02, by + half), fill=(150, 150, 145))
        d.rectangle((-2, by - half - S * 0.012, bx - S * 0.02, by - half), fill=(120, 120, 118))
        boxes.append(("bridge", bx - S * 0.02, by - half, bx + S * 0.02, by + half))
    details = {"land": land, "bridge": len(boxes), "tree": trees}
    return np.asarray(img, dtype=np.float32), boxes, details


def _draw_baseball_field(rng, S):
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    arr = _texture(rng, S, _c(rng, (70, 130, 55), 8), low=6, high=4)
    stripe = rng.uniform(0.05, 0.08) * S
    arr += (((xx + yy) // stripe) % 2 * 10 - 5)[..., None]  # mowing stripes
    img = _to_img(arr)
    d = ImageDraw.Draw(img)
    n = 1 if rng.random() < 0.7 else 2
    boxes: list[Box] = []
    dirt = _c(rng, (175, 120, 80), 10)
    for i in range(n):
        side = S * (0.62 if n == 1 else 0.45)
        hx = S * (0.18 if n == 1 else (0.08 + i * 0.5))
        hy = S * 0.85
        # the outfield arc and the infield dirt, seen with home plate at the bottom
        r_in = side * 0.55
        d.pieslice((hx - r_in, hy - r_in, hx + r_in, hy + r_in), 270, 360, fill=dirt)
        base = side * 0.3
        diamond = [(hx, hy), (hx + base, hy), (hx + base, hy - base), (hx, hy - base)]
        d.polygon(diamond, fill=_c(rng, (80, 140, 60), 6))
        for p in diamond:
            d.rectangle((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=(240, 240, 240))
        d.line([(hx, hy), (hx + side, hy)], fill=(240, 240, 240), width=1)
        d.line([(hx, hy), (hx, hy - side)], fill=(240, 240, 240), width=1)
        d.arc((hx - side, hy - side, hx + side, hy + side), 270, 360, fill=(120, 100, 80), width=2)
        m = base / 2
        d.ellipse((hx + m - 4, hy - m - 4, hx + m + 4, hy - m + 4), fill=dirt)
        boxes.append(("baseball_diamond", hx, hy - side, hx + side, hy))
    trees = _scatter_trees(d, rng, S, int(S * 0.15), (S / 50, S / 35),
                           lambda x, y: y < S * 0.12 or x > S * 0.9)
    details = {"baseball_diamond": n, "tree": trees}
    return np.asarray(img, dtype=np.float32), boxes, details


def _draw_harbor(rng, S):
    quay = rng.uniform(0.7, 0.8) * S
    water = _water(rng, S, _c(rng, (35, 70, 95), 8))
    concrete = _texture(rng, S, _c(rng, (150, 150, 145), 6), low=6, high=5)
    yy = np.mgrid[0:S, 0:S][0]
    arr = np.where((yy >= quay)[..., None], concrete, water)
    img = _to_img(arr)
    d = ImageDraw.Draw(img)
    d.rectangle((-2, quay, S + 2, quay + 3), fill=(110, 110, 105))
    boxes: list[Box] = []
    bld = []
    for _ in range(int(rng.integers(1, 4))):
        w = rng.uniform(0.1, 0.2) * S
        x = rng.uniform(0, S - w)
        bb = (x, quay + S * 0.06, x + w, min(S - 2, quay + S * 0.06 + rng.uniform(0.08, 0.15) * S))
        if not _overlaps(bb, bld, 4):
            bld.append(_building(d, rng, *bb, _c(rng, (190, 90, 60), 15), gable=False))
    n_piers = int(rng.integers(2, 5))
    spacing = S / (n_piers + 0.5)
    pier_w = S * 0.025
    boat_len = S * rng.uniform(0.06, 0.09)
    fill = rng.uniform(0.3, 0.9)
    for k in range(n_piers):
        px = spacing * (k + 0.75)
        top = rng.uniform(0.1, 0.3) * S
        d.rectangle((px - pier_w / 2, top, px + pier_w / 2, quay), fill=_c(rng, (165, 160, 150), 6))
        for side in (-1, 1):
            y = top + boat_len * 0.1
            while y + boat_len * 0.4 < quay - 2:
                bw = boat_len * 0.36
                cx = px + side * (pier_w / 2 + bw / 2 + 1)
                if rng.random() < fill:
                    b = _boat(d, rng, cx, y + boat_len * 0.2, boat_len * rng.uniform(0.8, 1.0),
                              -math.pi / 2 if rng.random() < 0.5 else math.pi / 2)
                    if not _overlaps(b[1:], boxes, 0.5):
                        boxes.append(b)
                y += bw * 1.5
    details = {"boat": len(boxes), "building": len(bld)}
    return np.asarray(img, dtype=np.float32), boxes + bld, details


_DRAW: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, list[Box], dict]]] = {
    "forest": _draw_forest,
    "lake": _draw_lake,
    "farmland": _draw_farmland,
    "residential": _draw_residential,
    "airport": _draw_airport,
    "highway": _draw_highway,
    "beach": _draw_beach,
    "parking_lot": _draw_parking_lot,
    "industrial": _draw_industrial,
    "desert": _draw_desert,
    "river": _draw_river,
    "baseball_field": _draw_baseball_field,
    "harbor": _draw_harbor,
}

#: the object types counted in ``meta["objects"]``
COUNTABLE = ("airplane", "baseball_diamond", "boat", "bridge", "building", "car", "storage_tank",
             "tree", "umbrella")


# ----------------------------------------------------------------------------- finishing


def _box_rot90(box: Box, S: int, k: int, flip: bool) -> list[Any]:
    label, x0, y0, x1, y1 = box
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(S), x1), min(float(S), y1)
    if flip:
        x0, x1 = S - x1, S - x0
    for _ in range(k):  # np.rot90 turns counter-clockwise: (x, y) -> (y, S - x)
        x0, y0, x1, y1 = y0, S - x1, y1, S - x0
    return [label, round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)]


def _finish_aerial(arr: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int, bool]:
    """Lighting jitter, haze, sensor noise, slight blur; then a random 90° turn / mirror."""
    S = arr.shape[0]
    gain = rng.uniform(0.82, 1.15)
    cast = rng.uniform(0.94, 1.06, 3).astype(np.float32)
    arr = arr * gain * cast
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    g = rng.uniform(-0.08, 0.08, 2)
    arr = arr * (1 + g[0] * (xx - 0.5) + g[1] * (yy - 0.5))[..., None]
    haze = rng.uniform(0, 0.15)
    arr = arr * (1 - haze) + haze * np.asarray(_c(rng, (190, 195, 205), 10), np.float32)
    arr = arr + rng.normal(0, rng.uniform(2, 5), arr.shape).astype(np.float32)
    img = _to_img(arr).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7)))
    out = np.asarray(img)
    flip = bool(rng.random() < 0.5)
    if flip:
        out = out[:, ::-1]
    k = int(rng.integers(4))
    out = np.ascontiguousarray(np.rot90(out, k))
    return out, k, flip


def render_scene(
    cls: str, rng: np.random.Generator, size: int = 256
) -> tuple[Image.Image, dict[str, Any]]:
    """An aerial image of scene class ``cls`` and its meta.

    meta: ``class``; ``objects`` (count per countable type drawn, e.g. ``{"car": 12}``; a
    type absent from the dict was not drawn); ``boxes`` (``[label, x0, y0, x1, y1]`` in pixels
    of the returned image, one per counted object); ``details`` (what the caption may say).
    """
    if cls not in _DRAW:
        raise ValueError(f"unknown scene class {cls!r}; one of {CLASSES}")
    arr, boxes, details = _DRAW[cls](rng, size)
    out, k, flip = _finish_aerial(arr, rng)
    counts: dict[str, int] = {}
    for key in COUNTABLE:
        n = details.get(key)
        if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0:
            counts[key] = int(n)
    boxed: dict[str, int] = {}
    for b in boxes:
        boxed[b[0]] = boxed.get(b[0], 0) + 1
    for label, n in boxed.items():  # a boxed object type is counted by its boxes
        counts[label] = n
    meta = {
        "class": cls,
        "objects": dict(sorted(counts.items())),
        "boxes": [_box_rot90(b, size, k, flip) for b in boxes],
        "details": {k2: (v.item() if isinstance(v, np.generic) else v)
                    for k2, v in details.items() if k2 not in COUNTABLE},
    }
    return Image.fromarray(out), meta


# ----------------------------------------------------------------------------- captions


def _num(rng: np.random.Generator, n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) and rng.random() < 0.5 else str(n)


def _count_phrase(rng, n: int, word: str) -> str:
    return f"{_num(rng, n)} {word if n == 1 else word + 's'}"


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _body(cls: str, meta: dict[str, Any], rng: np.random.Generator) -> str:
    """The noun phrase of a caption: what the picture shows, consistent with ``meta``."""
    name_options = CLASS_NAMES[cls]
    name = name_options[int(rng.integers(len(name_options)))] if rng.random() < 0.4 \
        else name_options[0]
    obj = meta.get("objects", {})
    det = meta.get("details", {})
    say_count = rng.random() < 0.6

    def pick(opts):
        return opts[int(rng.integers(len(opts)))]

    if cls == "forest":
        extra = []
        if det.get("clearing"):
            extra.append("a small clearing")
        if det.get("track"):
            extra.append("a dirt track")
        adj = "autumn " if det.get("autumn") else pick(["dense ", "", "thick ", "green "])
        if det.get("autumn") and name == "woodland":
            adj = "autumn "
        s = f"{adj}{name}"
        return f"a {s} with {_join(extra)}" if extra else f"a {s}"
    if cls == "lake":
        s = f"a lake surrounded by {'fields' if det.get('land') == 'fields' else 'trees'}"
        if obj.get("boat"):
            s += f" with {_count_phrase(rng, obj['boat'], 'boat')}" if say_count else (
                " with a boat" if obj["boat"] == 1 else " with a few boats")
        return s
    if cls == "farmland":
        cols = det.get("colours") or ["green"]
        s = pick([f"{name} with {_join(cols)} fields", f"{_join(cols)} fields of {name}",
                  f"a patchwork of {_join(cols)} crop fields, {name}"])
        if obj.get("building"):
            s += f" and {_count_phrase(rng, obj['building'], 'farm building')}"
        return s
    if cls == "residential":
        roof = det.get("roof", "red")
        roof_word = {"dark": "dark", "grey": "grey", "white": "white", "red": "red",
                     "brown": "brown"}[roof]
        if say_count and obj.get("building"):
            return f"a {name} with {_count_phrase(rng, obj['building'], 'house')}"
        return pick([f"a {name} with {roof_word} roofs", f"a dense {name} with streets and houses",
                     f"houses with {roof_word} roofs in a {name}"])
    if cls == "airport":
        n = obj.get("airplane", 0)
        if say_count:
            return pick([f"an airport with a runway and {_count_phrase(rng, n, 'airplane')}",
                         f"an airport, {_count_phrase(rng, n, 'plane')} parked near the terminal"
                         if n else "an airport runway and terminal"])
        return pick(["an airport runway and terminal", "an airport with parked planes"
                     if n > 1 else "an airport with a runway"])
    if cls == "highway":
        s = f"a {det.get('lanes', 4)}-lane {name}" if rng.random() < 0.5 else f"a {name}"
        s += pick([" through fields", " between fields"]) if det.get("land") == "fields" else \
            " through trees"
        if det.get("crossing"):
            s += " crossing a smaller road"
        if say_count and obj.get("car"):
            s += f" with {_count_phrase(rng, obj['car'], 'car')}"
        return s
    if cls == "beach":
        s = pick(["a sandy beach with turquoise water", "a beach and the sea",
                  "a beach with waves breaking on the sand"])
        n = obj.get("umbrella", 0)
        if n and say_count:
            s += f" and {_count_phrase(rng, n, 'beach umbrella')}"
        return s
    if cls == "parking_lot":
        n = obj.get("car", 0)
        occ = det.get("occupancy", 0.5)
        if say_count or n == 0:
            return f"a parking lot with {_count_phrase(rng, n, 'car')}"
        fullness = "nearly full" if occ > 0.75 else "half empty" if occ < 0.45 else "busy"
        return pick([f"a {fullness} parking lot", "rows of parked cars in a parking lot"])
    if cls == "industrial":
        nb, nt = obj.get("building", 0), obj.get("storage_tank", 0)
        parts = []
        if nb:
            parts.append(_count_phrase(rng, nb, "warehouse") if say_count or nb == 1
                         else "warehouses")
        if nt:
            parts.append(_count_phrase(rng, nt, "storage tank") if say_count or nt == 1
                         else "storage tanks")
        return f"an {name} with {_join(parts)}" if parts else f"an {name}"
    if cls == "desert":
        s = pick(["sand dunes in the desert", "a desert with wind-blown dunes",
                  "a sandy desert with dunes"])
        if det.get("track"):
            s += " crossed by a track"
        return s
    if cls == "river":
        s = pick(["a winding river", "a river", "a meandering river"]) + \
            f" through {det.get('land', 'fields')}"
        if obj.get("bridge"):
            s += " with a bridge"
        return s
    if cls == "baseball_field":
        n = obj.get("baseball_diamond", 1)
        return "a baseball field" if n == 1 else pick(["two baseball fields",
                                                      "two baseball fields side by side"])
    if cls == "harbor":
        n = obj.get("boat", 0)
        if say_count:
            return f"a {name} with {_count_phrase(rng, n, 'boat')} moored at the piers"
        return pick([f"a {name} with boats and piers", f"boats moored in a {name}"])
    raise ValueError(cls)


def scene_phrase(cls: str, meta: dict[str, Any], rng: np.random.Generator) -> str:
    """The noun phrase of a caption without the RS opener ("a parking lot with 12 cars")."""
    return _body(cls, meta, rng)


def names_scene(caption: str, cls: str) -> bool:
    """Whether ``caption`` names scene class ``cls`` (one of ``CLASS_NAMES[cls]``, whole words)."""
    text = " ".join(caption.lower().split())
    return any(re.search(rf"\b{re.escape(name)}\b", text) for name in CLASS_NAMES[cls])


def caption_scene(cls: str, meta: dict[str, Any], rng: np.random.Generator) -> str:
    """An alt-text-like English caption of a rendered scene, true to its ``meta``.

    It always names the class (a name from ``CLASS_NAMES[cls]``) and always carries a
    remote-sensing term (aerial, satellite, drone, ...), as the RS rows of the demo world must.
    """
    body = _body(cls, meta, rng)
    if rng.random() < 0.7:
        prefix = RS_PREFIXES[int(rng.integers(len(RS_PREFIXES)))]
        text = f"{prefix} {body}"
    else:
        text = body + RS_SUFFIXES[int(rng.integers(len(RS_SUFFIXES)))]
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


# ----------------------------------------------------------------------------- everyday


_EVERYDAY_CAPTIONS: dict[str, tuple[str, ...]] = {
    "person": ("a man in a {c} shirt standing in the park on a sunny day",
               "portrait of a woman outdoors", "a person in a {c} jacket standing on the lawn",
               "my friend posing for a photo in the garden"),
    "cat": ("a {c} cat sitting on the grass", "my {c} cat enjoying the sun",
            "cute {c} kitten in the yard", "a cat looking at the camera"),
    "dog": ("a {c} dog playing in the park", "happy {c} puppy on the lawn",
            "our dog waiting for a walk"),
    "house": ("front of a {c} house with a garden", "a cozy {c} house for sale",
              "old {c} cottage on a quiet street"),
    "car": ("a {c} car on the street, side view", "used {c} hatchback for sale",
            "my new {c} car"),
    "bicycle": ("a {c} bicycle leaning on a wall", "vintage {c} bike in the sun",
                "city bicycle for sale, {c} frame"),
    "cup": ("a cup of coffee on a wooden table", "{c} mug of tea on the table",
            "morning coffee in a {c} cup"),
    "food": ("a plate of pasta on the table", "homemade dinner on a white plate",
             "delicious salad served on a plate"),
    "flowers": ("a vase of {c} flowers on the table", "{c} tulips in a glass vase",
                "fresh bouquet of {c} roses"),
}

_COLOURS: dict[str, RGB] = {
    "red": (190, 40, 40), "blue": (40, 70, 180), "black": (30, 30, 30), "white": (235, 235, 235),
    "grey": (130, 130, 130), "yellow": (230, 200, 50), "green": (50, 140, 60),
    "brown": (120, 80, 50), "orange": (230, 130, 40), "pink": (235, 140, 170),
}

#: the colours a subject of each kind may have (a green cat would be odd alt text)
_KIND_COLOURS: dict[str, tuple[str, ...]] = {
    "cat": ("black", "white", "grey", "brown", "orange"),
    "dog": ("black", "white", "grey", "brown"),
    "flowers": ("red", "yellow", "white", "orange", "pink"),
}


def _sky(rng, S, horizon: int) -> np.ndarray:
    kind = int(rng.integers(3))
    top, bottom = [((40, 90, 180), (170, 200, 235)), ((60, 60, 110), (240, 160, 90)),
                   ((150, 155, 165), (205, 205, 210))][kind]
    t = np.linspace(0, 1, horizon, dtype=np.float32)[:, None, None]
    top_c = np.asarray(_c(rng, top, 10), np.float32)
    bot_c = np.asarray(_c(rng, bottom, 10), np.float32)
    sky = top_c * (1 - t) + bot_c * t
    return np.broadcast_to(sky, (horizon, S, 3)).copy()


def _ground(rng, S, horizon: int, base: RGB, grain: float = 8) -> np.ndarray:
    h = S - horizon
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    c = np.asarray(_c(rng, base, 10), np.float32)
    g = c * (0.75 + 0.35 * t)  # nearer is brighter and more detailed
    g = np.broadcast_to(g, (h, S, 3)).copy()
    g += (rng.standard_normal((h, S)) * grain * (0.3 + t[..., 0]))[..., None]
    return g


def render_everyday(rng: np.random.Generator, size: int = 256) -> tuple[Image.Image, str, str]:
    """A ground-level everyday "photo" (not remote sensing), its caption, and its kind.

    Outdoor kinds: sky gradient above a horizon, ground below; indoor kinds: a wall above a
    table edge. The subject is large, central and upright; the frame is never rotated.
    """
    S = size
    kind = EVERYDAY_KINDS[int(rng.integers(len(EVERYDAY_KINDS)))]
    return _render_everyday_kind(kind, rng, S)


def _render_everyday_kind(kind: str, rng: np.random.Generator, S: int):
    indoor = kind in ("cup", "food", "flowers")
    horizon = int(rng.uniform(0.4, 0.62) * S)
    if indoor:
        wall = np.asarray(_c(rng, [(225, 215, 195), (200, 210, 220), (235, 230, 225)][
            int(rng.integers(3))], 10), np.float32)
        t = np.linspace(0, 1, horizon, dtype=np.float32)[:, None, None]
        top = np.broadcast_to(wall * (0.8 + 0.2 * t), (horizon, S, 3)).copy()
        bottom = _ground(rng, S, horizon, (140, 95, 60), grain=4)
        yy = np.arange(S - horizon, dtype=np.float32)[:, None]
        grain = np.sin(yy * 0.9 + np.sin(np.arange(S)[None, :] / 17.0) * 2) * 10
        bottom += grain[..., None]
    else:
        top = _sky(rng, S, horizon)
        ground = [(90, 140, 60), (120, 120, 120), (150, 130, 100)][int(rng.integers(3))]
        bottom = _ground(rng, S, horizon, ground)
    arr = np.concatenate([top, bottom], axis=0)
    img = _to_img(arr)
    d = ImageDraw.Draw(img)
    if not indoor:  # distant hills / trees on the horizon, softened
        bg = Image.new("L", (S, S), 0)
        bd = ImageDraw.Draw(bg)
        pts = [(0, horizon)] + [(x, horizon - rng.uniform(0.02, 0.1) * S)
                                for x in np.linspace(0, S, 9)] + [(S, horizon)]
        bd.polygon(pts, fill=255)
        hill = Image.new("RGB", (S, S), _c(rng, (70, 95, 70), 15))
        img.paste(hill, (0, 0), bg.filter(ImageFilter.GaussianBlur(2)))
        img = img.filter(ImageFilter.GaussianBlur(1.2))  # background out of focus
        d = ImageDraw.Draw(img)
    names = _KIND_COLOURS.get(kind, tuple(n for n in _COLOURS if n != "pink"))
    cname = names[int(rng.integers(len(names)))]
    col = _c(rng, _COLOURS[cname], 12)
    cx = S * rng.uniform(0.4, 0.6)
    base_y = horizon + (S - horizon) * rng.uniform(0.55, 0.8)
    sc = S * rng.uniform(0.85, 1.1)
    # ground shadow, in perspective (a flat ellipse)
    d.ellipse((cx - sc * 0.25, base_y - sc * 0.03, cx + sc * 0.25, base_y + sc * 0.03),
              fill=_shade(np.asarray(img)[min(S - 1, int(base_y)), int(cx)].tolist(), 0.6))
    if kind == "person":
        h = sc * 0.7
        skin = _c(rng, (200, 160, 130), 30)
        d.rounded_rectangle((cx - h * 0.14, base_y - h * 0.78, cx + h * 0.14, base_y - h * 0.4),
                            radius=int(h * 0.05), fill=col)
        d.rectangle((cx - h * 0.12, base_y - h * 0.42, cx - h * 0.02, base_y), fill=(40, 45, 70))
        d.rectangle((cx + h * 0.02, base_y - h * 0.42, cx + h * 0.12, base_y), fill=(40, 45, 70))
        d.ellipse((cx - h * 0.09, base_y - h * 0.98, cx + h * 0.09, base_y - h * 0.78), fill=skin)
        d.ellipse((cx - h * 0.1, base_y - h * 1.0, cx + h * 0.1, base_y - h * 0.9),
                  fill=_c(rng, (60, 40, 25), 20))
    elif kind in ("cat", "dog"):
        h = sc * (0.32 if kind == "cat" else 0.42)
        d.ellipse((cx - h * 0.7, base_y - h * 0.75, cx + h * 0.5, base_y - h * 0.1), fill=col)
        d.rectangle((cx - h * 0.55, base_y - h * 0.3, cx - h * 0.42, base_y), fill=col)
        d.rectangle((cx + h * 0.25, base_y - h * 0.3, cx + h * 0.38, base_y), fill=col)
        d.ellipse((cx + h * 0.25, base_y - h * 1.15, cx + h * 0.75, base_y - h * 0.62), fill=col)
        ear = _shade(col, 0.8)
        if kind == "cat":
            d.polygon([(cx + h * 0.3, base_y - h * 1.0), (cx + h * 0.36, base_y - h * 1.3),
                       (cx + h * 0.46, base_y - h * 1.08)], fill=ear)
            d.polygon([(cx + h * 0.55, base_y - h * 1.08), (cx + h * 0.66, base_y - h * 1.3),
                       (cx + h * 0.72, base_y - h * 1.0)], fill=ear)
            d.line([(cx - h * 0.65, base_y - h * 0.5), (cx - h * 0.95, base_y - h * 0.95)],
                   fill=col, width=max(2, int(h * 0.08)))
        else:
            d.ellipse((cx + h * 0.2, base_y - h * 1.05, cx + h * 0.35, base_y - h * 0.7), fill=ear)
            d.ellipse((cx + h * 0.62, base_y - h * 0.95, cx + h * 0.9, base_y - h * 0.75),
                      fill=_shade(col, 0.9))
        eye = (20, 20, 20) if sum(col) > 150 else (220, 200, 60)
        d.ellipse((cx + h * 0.55, base_y - h * 0.98, cx + h * 0.61, base_y - h * 0.92), fill=eye)
    elif kind == "house":
        w = sc * 0.7
        h = w * 0.55
        x0, x1 = cx - w / 2, cx + w / 2
        d.rectangle((x0, base_y - h, x1, base_y), fill=col)
        d.polygon([(x0 - w * 0.05, base_y - h), (cx, base_y - h - w * 0.3),
                   (x1 + w * 0.05, base_y - h)], fill=_c(rng, (110, 50, 40), 20))
        for fx in (0.15, 0.65):
            d.rectangle((x0 + w * fx, base_y - h * 0.75, x0 + w * (fx + 0.18), base_y - h * 0.45),
                        fill=(170, 200, 220), outline=(240, 240, 240), width=2)
        d.rectangle((cx - w * 0.07, base_y - h * 0.55, cx + w * 0.07, base_y),
                    fill=_c(rng, (90, 60, 40), 15))
    elif kind == "car":
        w = sc * 0.75
        h = w * 0.22
        x0 = cx - w / 2
        d.rounded_rectangle((x0, base_y - h * 1.1, x0 + w, base_y - h * 0.25), radius=int(h * 0.2),
                            fill=col)
        d.polygon([(x0 + w * 0.22, base_y - h * 1.1), (x0 + w * 0.32, base_y - h * 1.75),
                   (x0 + w * 0.68, base_y - h * 1.75), (x0 + w * 0.8, base_y - h * 1.1)], fill=col)
        d.polygon([(x0 + w * 0.27, base_y - h * 1.12), (x0 + w * 0.35, base_y - h * 1.62),
                   (x0 + w * 0.65, base_y - h * 1.62), (x0 + w * 0.75, base_y - h * 1.12)],
                  fill=(150, 180, 200))
        for wx in (0.2, 0.8):
            r = h * 0.42
            d.ellipse((x0 + w * wx - r, base_y - h * 0.25 - r, x0 + w * wx + r,
                       base_y - h * 0.25 + r), fill=(20, 20, 20))
            d.ellipse((x0 + w * wx - r * 0.5, base_y - h * 0.25 - r * 0.5, x0 + w * wx + r * 0.5,
                       base_y - h * 0.25 + r * 0.5), fill=(170, 170, 170))
    elif kind == "bicycle":
        w = sc * 0.6
        r = w * 0.22
        y = base_y - r
        for wx in (cx - w * 0.3, cx + w * 0.3):
            d.ellipse((wx - r, y - r, wx + r, y + r), outline=(25, 25, 25), width=max(2, int(r / 8)))
        lw = max(2, int(r / 7))
        seat = (cx - w * 0.08, y - r * 1.3)
        pedal = (cx, y)
        d.line([(cx - w * 0.3, y), pedal, (cx + w * 0.2, y - r * 1.1), seat, (cx - w * 0.3, y)],
               fill=col, width=lw)
        d.line([(cx + w * 0.3, y), (cx + w * 0.2, y - r * 1.1), (cx + w * 0.22, y - r * 1.5)],
               fill=col, width=lw)
        d.rectangle((seat[0] - r * 0.25, seat[1] - r * 0.12, seat[0] + r * 0.2, seat[1]),
                    fill=(30, 30, 30))
    elif kind == "cup":
        w = sc * 0.32
        h = w * 1.0
        top_y = base_y - h
        d.polygon([(cx - w / 2, top_y), (cx + w / 2, top_y), (cx + w * 0.42, base_y),
                   (cx - w * 0.42, base_y)], fill=col)
        d.ellipse((cx - w * 0.42, base_y - w * 0.08, cx + w * 0.42, base_y + w * 0.08), fill=col)
        d.arc((cx + w * 0.3, top_y + h * 0.2, cx + w * 0.8, top_y + h * 0.7), 270, 90, fill=col,
              width=max(3, int(w * 0.08)))
        d.ellipse((cx - w / 2, top_y - w * 0.12, cx + w / 2, top_y + w * 0.12),
                  fill=_shade(col, 1.15))
        d.ellipse((cx - w * 0.44, top_y - w * 0.09, cx + w * 0.44, top_y + w * 0.09),
                  fill=(70, 40, 20))
    elif kind == "food":
        w = sc * 0.7
        pe = (cx - w / 2, base_y - w * 0.18, cx + w / 2, base_y + w * 0.12)
        d.ellipse(pe, fill=(240, 240, 238))
        d.ellipse((pe[0] + w * 0.1, pe[1] + w * 0.04, pe[2] - w * 0.1, pe[3] - w * 0.04),
                  fill=(225, 225, 222))
        fc = [(220, 170, 60), (200, 60, 40), (80, 150, 60), (150, 90, 50)]
        for _ in range(int(rng.integers(6, 14))):
            fx = cx + rng.uniform(-0.25, 0.25) * w
            fy = base_y - w * 0.03 + rng.uniform(-0.07, 0.05) * w
            rr = w * rng.uniform(0.04, 0.09)
            d.ellipse((fx - rr, fy - rr * 0.6 - rr * 0.5, fx + rr, fy + rr * 0.6 - rr * 0.5),
                      fill=_c(rng, fc[int(rng.integers(len(fc)))], 15))
    elif kind == "flowers":
        w = sc * 0.22
        top_y = base_y - w * 1.4
        d.polygon([(cx - w * 0.35, top_y), (cx + w * 0.35, top_y), (cx + w / 2, base_y - w * 0.5),
                   (cx + w * 0.3, base_y), (cx - w * 0.3, base_y), (cx - w / 2, base_y - w * 0.5)],
                  fill=(170, 200, 210))
        for _ in range(int(rng.integers(5, 10))):
            fx = cx + rng.uniform(-1.2, 1.2) * w
            fy = top_y - rng.uniform(0.4, 1.6) * w
            d.line([(cx + rng.uniform(-0.2, 0.2) * w, top_y), (fx, fy)], fill=(50, 110, 40),
                   width=2)
            rr = w * rng.uniform(0.18, 0.3)
            d.ellipse((fx - rr, fy - rr, fx + rr, fy + rr), fill=_c(rng, col, 20))
            d.ellipse((fx - rr * 0.3, fy - rr * 0.3, fx + rr * 0.3, fy + rr * 0.3),
                      fill=(240, 210, 60))
    else:  # pragma: no cover
        raise ValueError(kind)
    # camera look: vignette, mild noise, no rotation
    arr = np.asarray(img, dtype=np.float32)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    vign = 1 - rng.uniform(0.15, 0.35) * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 2
    arr = arr * vign[..., None] * rng.uniform(0.9, 1.1)
    arr += rng.normal(0, 2.5, arr.shape).astype(np.float32)
    out = _to_img(arr).filter(ImageFilter.GaussianBlur(0.5))
    tmpl = _EVERYDAY_CAPTIONS[kind]
    caption = tmpl[int(rng.integers(len(tmpl)))].format(c=cname)
    if rng.random() < 0.3:
        caption = caption[0].upper() + caption[1:]
    return out, caption, kind


def render_everyday_kind(
    kind: str, rng: np.random.Generator, size: int = 256
) -> tuple[Image.Image, str, str]:
    """``render_everyday`` with the subject chosen by the caller."""
    if kind not in EVERYDAY_KINDS:
        raise ValueError(f"unknown everyday kind {kind!r}; one of {EVERYDAY_KINDS}")
    return _render_everyday_kind(kind, rng, size)
