"""RotationPick: choose among the caption candidates the one CLIP finds true at every rotation.

    records ─ RunInference(OpenClipRotationScorer) ─ pick_decision ─┬─ records
                                                                     └─ rejects ("caption_pick")

RS3 kept, besides BLIP-2's top candidate, the candidate picked by a "rotation-invariant" rule
whose exact form is unpublished. Ours, written down (``rotation_invariant_pick``):

    score(c) = mean over r in {0°, 90°, 180°, 270°} of cos(image_emb(rotate(image, r)),
                                                            text_emb(c))
    pick     = argmax_c score(c), ties to the earlier candidate (generation order)

Why the mean over rotations: an overhead image has no "up", so a caption that is right about
the scene should match every orientation; a caption that matches one orientation only (CLIP's
upright-photo bias, e.g. "a tall building" on a 0° view) is penalised on the other three.

Sets ``generated_scores`` (list[float], aligned with ``generated``) and ``generated_pick``
(int index into ``generated``). Reject ``caption_pick_failed``: the image did not decode, the
record has no candidates, or the model raised on the record.

The CLIP model is the recipe's ``--clip_model`` (an open_clip architecture + local checkpoint,
or a local open_clip directory; ``load_open_clip``). Images and texts run as full padded
batches (as in ``OpenClipImageTextEmbedder``), so scores never depend on batch company.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference
from PIL import Image

from pipelines.models.handlers import LoadedClip, OpenClipImageTextEmbedder
from pipelines.models.open_clip_loader import decode_image, forward_images
from pipelines.records import MAIN, REJECTS, Reject
from pipelines.stages.routing import routed

log = logging.getLogger(__name__)

STAGE = "caption_pick"
PICK_FAILED = "caption_pick_failed"
ROTATIONS = (0, 90, 180, 270)
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
              270: Image.Transpose.ROTATE_270}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n == 0, 1.0, n)


def rotation_invariant_pick(image_embs: np.ndarray, text_embs: np.ndarray
                            ) -> tuple[list[float], int]:
    """(score per candidate, index of the pick) under the rotation-invariant rule.

    ``image_embs``: [4, d], the image embedded at 0°, 90°, 180° and 270°; ``text_embs``:
    [K, d], the K candidates in generation order (any norm: both are L2-normalised here).

    score(c) = mean over the 4 rotations r of cos(image_embs[r], text_embs[c]);
    pick = argmax score, ties to the earlier candidate (``np.argmax`` returns the first
    maximum). Scores are computed in float64 and returned as float32-rounded Python floats.
    """
    img = _unit(image_embs)
    txt = _unit(text_embs)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"shapes {img.shape} and {txt.shape}: want [R, d] and [K, d]")
    if len(txt) == 0:
        raise ValueError("no candidates to pick from")
    scores = (txt @ img.T).mean(axis=1)  # [K]
    rounded = [float(np.float32(s)) for s in scores]
    return rounded, int(np.argmax(np.asarray(rounded)))


def rotations(image: Image.Image) -> list[Image.Image]:
    """``image`` turned by 0°, 90°, 180° and 270° (counter-clockwise; the mean does not care)."""
    return [image if r == 0 else image.transpose(_TRANSPOSE[r]) for r in ROTATIONS]


class RotationScores(NamedTuple):
    """``OpenClipRotationScorer``'s inference for one record."""

    scores: list[float]
    pick: int


class OpenClipRotationScorer(OpenClipImageTextEmbedder):
    """Records with ``_image`` and ``generated`` → ``RotationScores`` (None on failure).

    Same arguments as ``OpenClipImageEmbedder`` (model, pretrained, device, precision,
    batch_size, ...) plus ``text_field`` (default ``generated``: a list of candidates).
    ``batch_size`` is the forward-pass size for both images (4 per record) and texts.
    """

    metrics_namespace = "rs_corpus.rotation_pick"

    def __init__(self, *args: Any, text_field: str = "generated", **kwargs: Any) -> None:
        super().__init__(*args, text_field=text_field, **kwargs)

    def embed_rotations(self, images: Sequence[Image.Image], model: LoadedClip) -> np.ndarray:
        """float32 [len(images), 4, D] L2-normalised embeddings of the four rotations."""
        tensors = [model.preprocess(r) for im in images for r in rotations(im)]
        out = []
        for s in range(0, len(tensors), self._batch_size):
            x = torch.stack(tensors[s : s + self._batch_size])
            n = x.shape[0]
            if n < self._batch_size:  # full batches: see OpenClipImageEmbedder.embed
                x = torch.cat([x, x.new_zeros((self._batch_size - n, *x.shape[1:]))])
            with torch.inference_mode():
                e, _ = forward_images(model.model, x.to(device=model.device, dtype=model.dtype))
            out.append(e[:n].cpu().numpy().astype(np.float32))
        emb = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
        return emb.reshape(len(images), len(ROTATIONS), -1)

    def score_records(self, batch: Sequence[dict[str, Any]], model: LoadedClip
                      ) -> list[RotationScores | None]:
        images, ok = [], []
        for i, rec in enumerate(batch):
            cands = rec.get(self._text_field)
            if not cands or not isinstance(cands, (list, tuple)):
                log.warning("RotationPick: %s has no candidates", rec.get("key"))
                continue
            try:
                images.append(decode_image(rec[self._image_field]))
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - a per-record fault
                Metrics.counter(self.metrics_namespace, "undecodable_images").inc()
                log.warning("RotationPick: cannot decode %s: %s", rec.get("key"), e)
        out: list[RotationScores | None] = [None] * len(batch)
        if not ok:
            return out
        img = self.embed_rotations(images, model)
        texts = [str(c) for i in ok for c in batch[i][self._text_field]]
        txt = self.embed_text(texts, model)
        at = 0
        for j, i in enumerate(ok):
            k = len(batch[i][self._text_field])
            scores, pick = rotation_invariant_pick(img[j], txt[at : at + k])
            at += k
            out[i] = RotationScores(scores, pick)
        return out

    def run_inference(
        self,
        batch: Sequence[dict[str, Any]],
        model: LoadedClip,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        try:
            results = self.score_records(batch, model)
        except Exception as e:  # noqa: BLE001 - isolate the record(s) the model fails on
            log.warning("RotationPick: batch of %d failed (%s); scoring one by one", len(batch), e)
            results = []
            for rec in batch:
                try:
                    results.extend(self.score_records([rec], model))
                except Exception as e1:  # noqa: BLE001
                    Metrics.counter(self.metrics_namespace, "failures").inc()
                    log.warning("RotationPick: model failed on %s: %s", rec.get("key"), e1)
                    results.append(None)
        return [PredictionResult(example=rec, inference=res, model_id=self._model)
                for rec, res in zip(batch, results, strict=True)]


def pick_decision(record: dict[str, Any], inference: RotationScores | None
                  ) -> dict[str, Any] | Reject:
    """The record with ``generated_scores`` and ``generated_pick``, or a Reject."""
    if inference is None:
        return Reject(stage=STAGE, reason=PICK_FAILED,
                      detail="no candidates, undecodable image, or the CLIP model failed")
    return {**record, "generated_scores": list(inference.scores),
            "generated_pick": int(inference.pick)}


_route = routed(pick_decision)


class RotationPick(beam.PTransform):
    """Records with ``_image`` and ``generated`` → ``records`` (scored, picked) + ``rejects``."""

    def __init__(self, clip_model: str, clip_pretrained: str | None = None,
                 device: str | None = None, precision: str = "fp32",
                 batch_size: int = 32) -> None:
        super().__init__()
        if not clip_model:
            raise ValueError("RotationPick needs clip_model (an open_clip architecture with a "
                             "local checkpoint, or a local open_clip directory)")
        self.handler = OpenClipRotationScorer(clip_model, clip_pretrained, device=device,
                                              precision=precision, batch_size=batch_size)

    def expand(self, records):
        return (
            records
            | "RotationScore" >> RunInference(self.handler)
            | "PickRoute" >> beam.FlatMap(_route).with_outputs(REJECTS, main=MAIN)
        )
