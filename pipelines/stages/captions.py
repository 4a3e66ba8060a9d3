"""Caption stage: K candidate captions per image from a local BLIP-2/BLIP model (RS3's captioner).

    records ─ RunInference(HFCaptioner) ─ caption_decision ─┬─ records (``generated``)
                                                             └─ rejects (stage "caption")

``generated`` is the list of candidates in generation order (beam search: best beam first),
each whitespace-normalised; empty candidates and exact repeats of an earlier candidate are
dropped (so a record may keep fewer than K). RotationPick (``pipelines.stages.caption_pick``)
then scores them and MetaCaption builds the final caption.

Rejects: ``caption_failed`` — the image did not decode for the captioner or the model raised
on the record; ``empty_caption`` — no candidate has any text.

Real weights (RS5M used BLIP-2 OPT-6.7B in fp16, 5 candidates per image)::

    huggingface-cli download Salesforce/blip2-opt-6.7b --local-dir /models/blip2-opt-6.7b
    --captioner /models/blip2-opt-6.7b --caption_precision fp16 --caption_candidates 5

``gs://`` / ``s3://`` model directories work too (copied once per worker process). On a GPU
worker the handler runs in bf16/fp16; on CPU in fp32 (slow for billion-parameter models: the
demo uses the tiny BLIP-2 of ``pipelines.demo.tiny_blip2``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from pipelines.records import MAIN, REJECTS, Reject
from pipelines.stages.routing import routed

STAGE = "caption"
CAPTION_FAILED = "caption_failed"
EMPTY_CAPTION = "empty_caption"
FIELD = "generated"


def normalise_candidates(candidates: Iterable[str | None]) -> list[str]:
    """Whitespace-normalised candidates in order; empty ones and exact repeats dropped."""
    out: list[str] = []
    for c in candidates:
        text = " ".join(str(c or "").split())
        if text and text not in out:
            out.append(text)
    return out


def caption_decision(record: dict[str, Any], inference: list[str] | None
                     ) -> dict[str, Any] | Reject:
    """The record with ``generated``, or a ``caption_failed`` / ``empty_caption`` Reject."""
    if inference is None:
        return Reject(stage=STAGE, reason=CAPTION_FAILED,
                      detail="the image did not decode for the captioner or the model failed")
    generated = normalise_candidates(inference)
    if not generated:
        return Reject(stage=STAGE, reason=EMPTY_CAPTION,
                      detail=f"all {len(inference)} candidates were empty")
    return {**record, FIELD: generated}


_route = routed(caption_decision)


class Caption(beam.PTransform):
    """Records with ``_image`` → ``records`` (with ``generated``) + ``rejects``.

    Either ``handler`` (an ``HFCaptioner``, or any handler with the same inference) or
    ``model_dir`` plus ``HFCaptioner`` keyword arguments (precision, device, batch_size,
    candidates, num_beams, do_sample, top_p, temperature, max_new_tokens, min_new_tokens,
    prompt, seed, image_field).
    """

    def __init__(self, model_dir: str | None = None, *, handler: Any = None,
                 **handler_kwargs: Any) -> None:
        super().__init__()
        if handler is not None:
            if model_dir is not None or handler_kwargs:
                raise ValueError("Caption takes either a handler or model_dir + handler kwargs")
            self.handler = handler
        else:
            if not model_dir:
                raise ValueError("Caption needs model_dir (a local BLIP-2/BLIP directory) "
                                 "or a handler")
            from pipelines.models.captioner import HFCaptioner

            self.handler = HFCaptioner(model_dir, **handler_kwargs)

    def expand(self, records):
        return (
            records
            | "Captioner" >> RunInference(self.handler)
            | "CaptionRoute" >> beam.FlatMap(_route).with_outputs(REJECTS, main=MAIN)
        )
