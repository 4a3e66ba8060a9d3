"""The report's charts: matplotlib (Agg), PNG files written beside ``index.html``.

PNGs carry no software/date metadata, so the same build and seed give the same bytes.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import PathPatch
from matplotlib.path import Path
from matplotlib.ticker import MaxNLocator

from pipelines.report import basemap

COLOURS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2",
           "#FF9DA6", "#9D755D", "#BAB0AC"]
plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                     "svg.hashsalt": "rs-corpus"})


def _save(fig, folder: str, name: str) -> str:
    fig.savefig(os.path.join(folder, name), dpi=100, metadata={"Software": None},
                bbox_inches="tight")
    plt.close(fig)
    return name


def funnel(folder: str, name: str, title: str, steps: list[str],
           per_source: dict[str, list[int]]) -> str:
    """Horizontal bars, one per step (what remains), stacked by source, totals written."""
    sources = sorted(per_source)
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(steps) + 1.1))
    y = np.arange(len(steps))[::-1]
    left = np.zeros(len(steps))
    for i, s in enumerate(sources):
        v = np.array(per_source[s], dtype=float)
        ax.barh(y, v, left=left, color=COLOURS[i % len(COLOURS)], label=s, height=0.7)
        left += v
    peak = max(left.max(), 1)
    for yy, total in zip(y, left, strict=True):
        ax.text(total + peak * 0.01, yy, f"{int(total):,}", va="center", fontsize=8)
    ax.set_yticks(y, steps)
    ax.set_xlim(0, peak * 1.15)
    ax.set_xlabel("samples remaining")
    ax.set_title(title, loc="left")
    if len(sources) > 1:
        ax.legend(fontsize=7, loc="lower right", frameon=False)
    return _save(fig, folder, name)


def caption_lengths(folder: str, name: str, title: str, lengths: np.ndarray,
                    context: int) -> str:
    fig, ax = plt.subplots(figsize=(6, 2.6))
    if len(lengths):
        hi = max(int(lengths.max()), context + 5)
        bins = np.arange(0, hi + 3, max(1, (hi + 2) // 60))
        ax.hist(np.clip(lengths, 0, hi), bins=bins, color=COLOURS[0])
    ax.axvline(context, color="#E45756", lw=1.5)
    ax.text(context, ax.get_ylim()[1] * 0.95, f" context {context}", color="#E45756",
            va="top", fontsize=8)
    ax.set_xlabel("training caption, CLIP tokens (start/end included)")
    ax.set_ylabel("samples")
    ax.set_title(title, loc="left")
    return _save(fig, folder, name)


def bars(folder: str, name: str, title: str, items: list[tuple[str, int]]) -> str:
    items = items[::-1]
    fig, ax = plt.subplots(figsize=(5, 0.28 * len(items) + 0.9))
    ax.barh(range(len(items)), [n for _, n in items], color=COLOURS[2])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yticks(range(len(items)), [str(k)[:40] for k, _ in items], fontsize=8)
    ax.set_title(title, loc="left")
    return _save(fig, folder, name)


def world_map(folder: str, name: str, points: list[tuple[str, float, float]]) -> str:
    """Equirectangular world, land from the shipped Natural Earth rings, a dot per sample."""
    fig, ax = plt.subplots(figsize=(13, 6.6))
    ax.set_facecolor("#DCEBF5")
    verts, codes = [], []
    for ring in basemap.land_rings():
        verts += list(ring)
        codes += [Path.MOVETO] + [Path.LINETO] * (len(ring) - 2) + [Path.CLOSEPOLY]
    ax.add_patch(PathPatch(Path(verts, codes), facecolor="#F3F1EA", edgecolor="#9A9A9A",
                           lw=0.4))
    subsets = sorted({p[0] for p in points})
    dense = len(points) > 2000  # many points: smaller and lighter, so the land shows through
    for i, s in enumerate(subsets):
        lat = [p[1] for p in points if p[0] == s]
        lon = [p[2] for p in points if p[0] == s]
        ax.scatter(lon, lat, s=3 if dense else 9, color=COLOURS[i % len(COLOURS)],
                   alpha=0.35 if dense else 0.75,
                   edgecolors="none", label=f"{s} ({len(lat):,} shown)")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.grid(color="white", lw=0.5)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, folder, name)
