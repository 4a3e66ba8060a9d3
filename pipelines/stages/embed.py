"""Embedding stage: open_clip image AND caption embeddings for every record, and its clip_score.

    records ─ RunInference(OpenClipImageTextEmbedder) ─ embed_decision ─┬─ records
                                                                        └─ rejects (undecodable)

Kept records carry ``_img_emb`` and ``_txt_emb`` (float32, L2-normalised; working fields the
sink drops, read by the CLIP-score filter, semantic dedup, decontamination and the embeddings
writer ``pipelines.sinks.embeddings``) and ``clip_score`` = the cosine of the two.

The handler (``pipelines.models.handlers.OpenClipImageTextEmbedder``) takes any open_clip
architecture with a local checkpoint, or a local open_clip model directory; ``batch_size``;
``device`` (cuda when the worker has one); ``precision`` fp32 | bf16 | fp16 (the low
precisions are for GPUs). RunInference loads one model per worker process. Every forward
pass, image and text, runs as a full padded batch, so embeddings and scores are the same
whatever batches Beam forms.

Real weights, e.g. in the PUB11 recipe::

    --clip_model ViT-B-32 --clip_pretrained /models/RemoteCLIP-ViT-B-32.pt   # name + checkpoint
    --clip_model /models/SkyCLIP-ViT-L-14                                    # open_clip HF dir
    --clip_precision bf16 --clip_batch_size 256                              # on GPU workers

With real CLIP weights the semantic-dedup and decontamination cosines default to 0.95
(``--semdedup_eps 0.05``, ``--decontam_cosine 0.95``); the demo's random-weight tiny model needs
0.9998 and 0.99995 because it puts distinct images at cosine 0.999+.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import RunInference

from pipelines.records import MAIN, REJECTS, Reject
from pipelines.stages.routing import routed

STAGE = "embed"
UNDECODABLE = "undecodable"
IMAGE_FIELD = "_img_emb"
TEXT_FIELD = "_txt_emb"


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Cosine of an image and a caption embedding (both L2-normalised)."""
    return float(np.dot(np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)))


def embed_decision(record: dict[str, Any], inference: Any) -> dict[str, Any] | Reject:
    """The record with its embeddings and ``clip_score``, or an ``undecodable`` Reject."""
    if inference is None:
        return Reject(stage=STAGE, reason=UNDECODABLE, detail="image did not decode for CLIP")
    return {**record, IMAGE_FIELD: inference.image, TEXT_FIELD: inference.text,
            "clip_score": float(np.float32(inference.score))}


_route = routed(embed_decision)


def _unembedded(record: dict[str, Any]):
    yield {**record, "clip_score": None}


class Embed(beam.PTransform):
    """Records with ``_image`` and ``caption`` → ``records`` (embedded) + ``rejects``.

    ``enabled=False``: no model; every record passes with ``clip_score=None``.
    """

    def __init__(self, model: str | None, pretrained: str | None = None,
                 device: str | None = None, precision: str = "fp32", batch_size: int = 32,
                 enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self.handler = None
        if enabled:
            if not model:
                raise ValueError("Embed needs a model (or enabled=False)")
            from pipelines.models.handlers import OpenClipImageTextEmbedder

            self.handler = OpenClipImageTextEmbedder(model, pretrained, device=device,
                                                     precision=precision,
                                                     batch_size=batch_size)

    def expand(self, records):
        if not self.enabled:
            return records | "NoEmbed" >> beam.FlatMap(_unembedded).with_outputs(
                REJECTS, main=MAIN)
        return (
            records
            | "ClipEmbed" >> RunInference(self.handler)
            | "EmbedRoute" >> beam.FlatMap(_route).with_outputs(REJECTS, main=MAIN)
        )
