"""CLIP-score filter: keep image–caption pairs whose ``clip_score`` is high enough.

Two policies (pure functions below, Beam wrapper ``ClipScoreFilter``):

* absolute: keep ``clip_score >= threshold`` (LAION-5B: 0.28 with ViT-B/32);
* top p% per source (SkyScript / DataComp style): inside each source, order records by
  (clip_score descending, key ascending) and keep the first ``ceil(p/100 · n)``. The order is a
  total order, so ties are broken the same way on every runner. The cutoff is exact and its
  memory bounded: a first pass builds each source's histogram of scores over
  :data:`BINS` fixed bins of [-1, 1] (a sparse counter, a few MB at most); the bin that holds
  the ``ceil(p/100 · n)``-th record is the boundary bin, and only the (score, key) of that
  bin's records are gathered and sorted to find the cut inside it (about n / 10^4 records for
  CLIP scores, which spread over ~0.3 of the range). Records above the boundary bin are kept,
  those below rejected, without comparing keys.

Rejects: stage ``clip_filter``, reason ``low_clip_score``, ``score`` = the clip_score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import apache_beam as beam

from pipelines.records import MAIN, REJECTS, Reject, reject_row

STAGE = "clip_filter"
LOW = "low_clip_score"


#: histogram bins over the cosine range [-1, 1] (width 3e-5)
BINS = 1 << 16


def _order(score: float, key: str) -> tuple[float, str]:
    return (-float(score), key)


def _valid(score: Any) -> bool:
    return score is not None and not math.isnan(score)


def score_bin(score: float) -> int:
    """The histogram bin of ``score``: monotone in the score, clamped to [0, BINS)."""
    return min(BINS - 1, max(0, math.floor((float(score) + 1.0) / 2.0 * BINS)))


def boundary(hist: dict[int, int], percent: float) -> tuple[int, int]:
    """(boundary bin, how many of its records are kept) for the top ``percent`` of a source
    whose score histogram is ``hist`` (bin → count)."""
    n = sum(hist.values())
    keep = math.ceil(n * percent / 100.0)
    above = 0
    for b in sorted(hist, reverse=True):
        if above + hist[b] >= keep:
            return b, keep - above
        above += hist[b]
    raise ValueError("empty histogram")


def threshold_decision(record: dict[str, Any], threshold: float) -> dict[str, Any] | Reject:
    score = record.get("clip_score")
    if not _valid(score) or score < threshold:
        return Reject(stage=STAGE, reason=LOW,
                      detail=f"clip_score {score if score is None else round(score, 4)} "
                             f"< threshold {threshold}",
                      score=score)
    return record


def top_cutoff(items: Iterable[tuple[float, str]], percent: float) -> tuple[float, str] | None:
    """The order value of the last kept record among ``items`` (score, key) for top ``percent``."""
    order = sorted(_order(s, k) for s, k in items)
    if not order:
        return None
    keep = math.ceil(len(order) * percent / 100.0)
    return order[keep - 1] if keep > 0 else (math.inf, "")


def top_decision(record: dict[str, Any], cutoff: tuple[float, str] | None,
                 percent: float) -> dict[str, Any] | Reject:
    score = record.get("clip_score")
    if not _valid(score) or cutoff is None or _order(score, record["key"]) > tuple(cutoff):
        return Reject(stage=STAGE, reason=LOW,
                      detail=f"not in the top {percent:g}% of {record['source']} by clip_score"
                             f" (cutoff {-cutoff[0]:.4f})" if cutoff else "no clip_score",
                      score=score)
    return record


class _Histogram(beam.CombineFn):
    """bin → count (sparse), per source."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, b):
        acc[b] = acc.get(b, 0) + 1
        return acc

    def merge_accumulators(self, accs):
        out: dict[int, int] = {}
        for a in accs:
            for b, c in a.items():
                out[b] = out.get(b, 0) + c
        return out

    def extract_output(self, acc):
        return acc


class ClipScoreFilter(beam.PTransform):
    """Records with ``clip_score`` → ``records`` + ``rejects`` (absolute and/or top p%)."""

    def __init__(self, threshold: float | None = None, top_percent: float | None = None):
        super().__init__()
        if top_percent is not None and not 0 < top_percent <= 100:
            raise ValueError("top_percent must be in (0, 100]")
        self.threshold = threshold
        self.top_percent = top_percent

    def expand(self, records):
        out = records
        rejects = []
        if self.threshold is not None:
            t = self.threshold

            def absolute(r):
                d = threshold_decision(r, t)
                if isinstance(d, Reject):
                    yield beam.pvalue.TaggedOutput(REJECTS, reject_row(r, d))
                else:
                    yield d

            res = out | "ClipThreshold" >> beam.FlatMap(absolute).with_outputs(REJECTS, main=MAIN)
            out, rejects = res[MAIN], rejects + [res[REJECTS]]
        if self.top_percent is not None:
            p = self.top_percent
            scored = (
                out
                | "ScoreBySource" >> beam.Map(
                    lambda r: (r["source"], (r.get("clip_score"), r["key"])))
                | "Scored" >> beam.Filter(lambda kv: _valid(kv[1][0]))
            )
            bounds = (
                scored
                | "Bin" >> beam.MapTuple(lambda src, item: (src, score_bin(item[0])))
                | "Histogram" >> beam.CombinePerKey(_Histogram())
                | "Boundary" >> beam.MapTuple(lambda src, hist: (src, boundary(hist, p)))
            )

            def in_boundary(kv, bnd):
                src, item = kv
                if score_bin(item[0]) == bnd[src][0]:
                    yield kv

            def cut(kv, bnd):
                src, items = kv
                order = sorted(_order(sc, k) for sc, k in items)
                return src, order[bnd[src][1] - 1]

            cutoffs = (
                scored
                | "BoundaryBin" >> beam.FlatMap(in_boundary, bnd=beam.pvalue.AsDict(bounds))
                | "CollectBoundary" >> beam.CombinePerKey(beam.combiners.ToListCombineFn())
                | "Cutoff" >> beam.Map(cut, bnd=beam.pvalue.AsDict(bounds))
            )

            def top(r, cuts):
                d = top_decision(r, cuts.get(r["source"]), p)
                if isinstance(d, Reject):
                    yield beam.pvalue.TaggedOutput(REJECTS, reject_row(r, d))
                else:
                    yield d

            res = out | "ClipTopPercent" >> beam.FlatMap(
                top, cuts=beam.pvalue.AsDict(cutoffs)).with_outputs(REJECTS, main=MAIN)
            out, rejects = res[MAIN], rejects + [res[REJECTS]]
        if not rejects:
            rejects = [records.pipeline | "NoClipRejects" >> beam.Create([])]
        all_rejects = tuple(rejects) | "ClipRejects" >> beam.Flatten()
        return {MAIN: out, REJECTS: all_rejects}
