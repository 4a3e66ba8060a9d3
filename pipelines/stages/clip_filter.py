"""CLIP-score filter: keep image–caption pairs whose ``clip_score`` is high enough.

Two policies (pure functions below, Beam wrapper ``ClipScoreFilter``):

* absolute: keep ``clip_score >= threshold`` (LAION-5B: 0.28 with ViT-B/32);
* top p% per source (SkyScript / DataComp style): inside each source, order records by
  (clip_score descending, key ascending) and keep the first ``ceil(p/100 · n)``. The order is a
  total order, so ties are broken the same way on every runner. The cutoff is computed over the
  whole corpus: one (score, key) per record of a source is gathered on one worker (~100 bytes a
  record: tens of millions of rows per source fit; beyond, use the absolute threshold).

Rejects: stage ``clip_filter``, reason ``low_clip_score``, ``score`` = the clip_score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import apache_beam as beam

from pipelines.records import REJECTS, Reject, reject_row

STAGE = "clip_filter"
LOW = "low_clip_score"
MAIN = "records"


def _order(score: float, key: str) -> tuple[float, str]:
    return (-float(score), key)


def threshold_decision(record: dict[str, Any], threshold: float) -> dict[str, Any] | Reject:
    score = record.get("clip_score")
    if score is None or score < threshold:
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
    if score is None or cutoff is None or _order(score, record["key"]) > tuple(cutoff):
        return Reject(stage=STAGE, reason=LOW,
                      detail=f"not in the top {percent:g}% of {record['source']} by clip_score"
                             f" (cutoff {-cutoff[0]:.4f})" if cutoff else "no clip_score",
                      score=score)
    return record


class _Collect(beam.CombineFn):
    def create_accumulator(self):
        return []

    def add_input(self, acc, item):
        acc.append(item)
        return acc

    def merge_accumulators(self, accs):
        return [x for a in accs for x in a]

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
            cutoffs = (
                out
                | "ScoreBySource" >> beam.Map(
                    lambda r: (r["source"], (r.get("clip_score"), r["key"])))
                | "Scored" >> beam.Filter(lambda kv: kv[1][0] is not None)
                | "CollectScores" >> beam.CombinePerKey(_Collect())
                | "Cutoff" >> beam.MapTuple(lambda s, items: (s, top_cutoff(items, p)))
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
