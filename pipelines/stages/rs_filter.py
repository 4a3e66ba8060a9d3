"""RS-image filter: keep the records whose image an RS probe on CLIP embeddings calls aerial.

RS5M filtered its keyword-matched web images with a trained "RS detector"; ours is the linear
probe of ``pipelines.models.rs_probe`` on the open_clip image embedding, run inside
``RunInference`` (``pipelines.models.handlers.RSScorer``: batched, one model per worker
process, cuda when present).

    records ─ RunInference(RSScorer) ─ rs_decision ─┬─ records  (rs_score set)
                                                    └─ rejects  (stage rs_filter, reason non_rs,
                                                                 score = the probe's probability)

``rs_decision`` is the whole policy and is a plain function. ``RSFilter(enabled=False)`` keeps
every record with ``rs_score=None`` (the column exists in every build).
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult, RunInference

from pipelines.records import MAIN, REJECTS, Reject, reject_row

STAGE = "rs_filter"
NON_RS = "non_rs"
UNDECODABLE = "undecodable"


def rs_decision(record: dict[str, Any], score: float | None, threshold: float) -> dict | Reject:
    """The record with ``rs_score`` set if ``score >= threshold``, else a ``non_rs`` Reject.

    ``score=None`` means the image could not be embedded (it did not decode).
    """
    if score is None:
        return Reject(stage=STAGE, reason=UNDECODABLE, detail="image did not decode for CLIP")
    score = float(score)
    if score < threshold:
        return Reject(
            stage=STAGE,
            reason=NON_RS,
            detail=f"rs_score {score:.4f} < threshold {threshold:.4f}",
            score=score,
        )
    return {**record, "rs_score": score}


class _Route(beam.DoFn):
    """PredictionResult → the kept record (main) or a reject row (``rejects``)."""

    def __init__(self, threshold: float | None, embedding_field: str | None,
                 probe_path: str | None = None) -> None:
        self.threshold = threshold
        self.embedding_field = embedding_field
        self.probe_path = probe_path

    def setup(self) -> None:
        if self.threshold is None:  # the probe's own threshold, read on the worker
            from pipelines.models.rs_probe import RSProbe

            self.threshold = RSProbe.load(self.probe_path).threshold

    def process(self, result: PredictionResult):
        record, inference = result.example, result.inference
        score = None if inference is None else inference.score
        out = rs_decision(record, score, self.threshold)
        if isinstance(out, Reject):
            yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, out))
            return
        if self.embedding_field:
            out[self.embedding_field] = inference.embedding
        yield out


def _unscored(record: dict[str, Any]):
    yield {**record, "rs_score": None}


class RSFilter(beam.PTransform):
    """Records with ``_image`` → ``records`` (RS images, ``rs_score`` set) + ``rejects``.

    Returns a ``DoOutputsTuple``: ``result.records`` / ``result["records"]`` and
    ``result[REJECTS]`` (reject rows, ``reject_row`` format).

    Args:
      model: open_clip architecture or local model directory; None → the probe's.
      pretrained: local checkpoint for ``model``; None → the probe's (when ``model`` is too).
      probe_path: RS probe JSON (``python -m pipelines.models.rs_probe train``).
      threshold: keep ``rs_score >= threshold``; None → the probe's threshold.
      device: cpu | cuda; None → cuda on workers that have one.
      enabled: False → no model, no probe: every record passes with ``rs_score=None``.
      embedding_field: if set, kept records carry their CLIP embedding (float32 array) in this
        field (name it with a leading underscore so the sink drops it).
    """

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        probe_path: str | None = None,
        threshold: float | None = None,
        device: str | None = None,
        enabled: bool = True,
        precision: str = "fp32",
        batch_size: int = 32,
        embedding_field: str | None = None,
    ) -> None:
        super().__init__()
        self.enabled = enabled
        self.embedding_field = embedding_field
        self.threshold = threshold
        self.scorer = None
        if not enabled:
            return
        if not probe_path:
            raise ValueError("RSFilter needs probe_path (or enabled=False)")
        from pipelines.models.handlers import RSScorer

        # the probe's threshold (when --rs_threshold is not given) is read on the workers, so
        # a gs:// probe costs the launcher no bucket access; its model (when --rs_model is not
        # given) is read here: the scorer's configuration depends on it
        self.probe_path = probe_path
        self.threshold = None if threshold is None else float(threshold)
        if not model:
            from pipelines.models.rs_probe import RSProbe

            probe = RSProbe.load(probe_path)
            model, pretrained = probe.model, pretrained or probe.pretrained
        self.scorer = RSScorer(model, pretrained, probe_path, device=device,
                               precision=precision, batch_size=batch_size)

    def expand(self, records: beam.PCollection):
        if not self.enabled:
            return records | "NoRSFilter" >> beam.FlatMap(_unscored).with_outputs(
                REJECTS, main=MAIN
            )
        return (
            records
            | "RSScore" >> RunInference(self.scorer)
            | "RSDecide" >> beam.ParDo(_Route(self.threshold, self.embedding_field,
                                              self.probe_path)).with_outputs(
                REJECTS, main=MAIN
            )
        )
