"""Apache Beam ``RunInference`` model handlers for open_clip image towers.

Both handlers take records (dicts) whose ``_image`` field holds the normalised JPEG bytes and
return one ``PredictionResult(example=record, inference=...)`` per record:

* ``OpenClipImageEmbedder``: inference = float32 ``[embed_dim]`` L2-normalised image embedding;
* ``RSScorer``: inference = ``RSInference(score, embedding)`` — the RS probe's probability and
  the embedding it was computed from (free to keep: later stages may reuse it).

A record whose image does not decode gets ``inference=None`` (the stage decides what that
means) instead of failing the whole bundle.

The handlers hold only strings and numbers, so Beam pickles them cheaply to every worker;
``load_model`` runs on the worker, once per process (``RunInference`` shares the loaded model
across the threads of a process), picks ``cuda`` when the worker has a GPU and ``device`` is
None, and reads weights from local paths only (see ``open_clip_loader``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import open_clip
import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from pipelines.models.open_clip_loader import (
    decode_image,
    forward_images,
    input_dtype,
    load_open_clip,
    resolve_device,
)

log = logging.getLogger(__name__)

Record = dict[str, Any]


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[-1])


class RSInference(NamedTuple):
    """``RSScorer``'s inference for one record."""

    score: float  # P(remote-sensing image) from the probe
    embedding: np.ndarray  # float32 [embed_dim], L2-normalised


@dataclasses.dataclass
class LoadedClip:
    """What ``load_model`` returns: the model and what it takes to feed it."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    probe: Any = None  # RSProbe for RSScorer
    tokenizer: Any = None  # open_clip tokenizer (OpenClipImageTextEmbedder embeds captions)


class OpenClipImageEmbedder(ModelHandler[Record, PredictionResult, LoadedClip]):
    """Records with ``_image`` bytes → L2-normalised open_clip image embeddings.

    Args:
      model: open_clip architecture name or local model directory (``load_open_clip``).
      pretrained: local checkpoint file for ``model`` (None: the directory's weights / random).
      device: "cpu", "cuda", "cuda:1"; None → cuda when the worker has one.
      precision: fp32 | bf16 | fp16.
      batch_size: the most records per forward pass (``BatchElements`` max_batch_size).
      min_batch_size: the fewest records ``BatchElements`` waits for.
      image_field: the record field holding the encoded image.
    """

    metrics_namespace = "rs_corpus.open_clip_embedder"

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        device: str | None = None,
        precision: str = "fp32",
        batch_size: int = 32,
        min_batch_size: int = 1,
        image_field: str = "_image",
    ) -> None:
        super().__init__(min_batch_size=min_batch_size, max_batch_size=batch_size)
        if not model:
            raise ValueError("model is required (an open_clip architecture or a local directory)")
        if batch_size < 1 or min_batch_size < 1 or min_batch_size > batch_size:
            raise ValueError(f"bad batch sizes: min {min_batch_size}, max {batch_size}")
        self._model = model
        self._pretrained = pretrained
        self._device = device
        self._precision = precision
        self._batch_size = batch_size
        self._min_batch_size = min_batch_size
        self._image_field = image_field

    # ---- ModelHandler -----------------------------------------------------------------------
    def load_model(self) -> LoadedClip:
        dev = resolve_device(self._device)
        net, preprocess, tokenizer = load_open_clip(
            self._model, self._pretrained, device=dev, precision=self._precision
        )
        log.info("%s: loaded %s (%s) on %s", type(self).__name__, self._model,
                 self._pretrained or "own weights", dev)
        return LoadedClip(net, preprocess, dev, input_dtype(net), tokenizer=tokenizer)

    def run_inference(
        self,
        batch: Sequence[Record],
        model: LoadedClip,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        embeddings, _ = self.embed(batch, model)
        return [
            PredictionResult(example=rec, inference=emb, model_id=self._model)
            for rec, emb in zip(batch, embeddings, strict=True)
        ]

    def get_num_bytes(self, batch: Sequence[Record]) -> int:
        return sum(len(rec.get(self._image_field) or b"") for rec in batch)

    def get_metrics_namespace(self) -> str:
        return self.metrics_namespace

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": self._min_batch_size, "max_batch_size": self._batch_size}

    # ---- helpers --------------------------------------------------------------------------
    def embed(
        self, batch: Sequence[Record], model: LoadedClip, token_stats: bool = False
    ) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
        """Per record: normalised float32 embedding (None where the image does not decode),
        and its token stats (None unless ``token_stats``; see ``forward_images``)."""
        tensors, ok = [], []
        for i, rec in enumerate(batch):
            try:
                tensors.append(model.preprocess(decode_image(rec[self._image_field])))
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - any undecodable payload is a per-record fault
                Metrics.counter(self.metrics_namespace, "undecodable_images").inc()
                log.warning("%s: cannot decode %s: %s", type(self).__name__, rec.get("key"), e)
        embs: list[np.ndarray | None] = [None] * len(batch)
        stats: list[np.ndarray | None] = [None] * len(batch)
        if tensors:
            with torch.inference_mode():
                x = torch.stack(tensors).to(device=model.device, dtype=model.dtype)
                # Always run a full batch: kernels pick their blocking by shape, so a
                # record's embedding would otherwise depend (in the last bits) on how many
                # records shared its batch, and outputs would not be byte-identical.
                n = x.shape[0]
                if n < self._batch_size:
                    x = torch.cat([x, x.new_zeros((self._batch_size - n, *x.shape[1:]))])
                e, s = forward_images(model.model, x, token_stats)
                e, s = e[:n], (None if s is None else s[:n])
                e = e.cpu().numpy().astype(np.float32)
                s = None if s is None else s.cpu().numpy().astype(np.float32)
            for j, i in enumerate(ok):
                embs[i] = e[j].copy()
                if s is not None:
                    stats[i] = s[j].copy()
        return embs, stats


class RSScorer(OpenClipImageEmbedder):
    """Records with ``_image`` → ``RSInference(score, embedding)`` from an RS probe.

    ``model``/``pretrained`` default to the ones the probe was trained with (``probe.model``);
    the probe JSON is read on the worker in ``load_model``.
    """

    metrics_namespace = "rs_corpus.rs_scorer"

    def __init__(
        self,
        model: str | None,
        pretrained: str | None,
        probe_path: str,
        device: str | None = None,
        precision: str = "fp32",
        batch_size: int = 32,
        min_batch_size: int = 1,
        image_field: str = "_image",
    ) -> None:
        if not probe_path:
            raise ValueError("probe_path is required (a JSON from `pipelines.models.rs_probe`)")
        self._probe_path = probe_path
        if not model:
            from pipelines.models.rs_probe import RSProbe

            probe = RSProbe.load(probe_path)
            if not probe.model:
                raise ValueError(f"{probe_path} names no model: pass model=")
            model, pretrained = probe.model, pretrained or probe.pretrained
        super().__init__(model, pretrained, device, precision, batch_size, min_batch_size,
                         image_field)

    def load_model(self) -> LoadedClip:
        from pipelines.models.rs_probe import RSProbe

        probe = RSProbe.load(self._probe_path)
        loaded = super().load_model()
        # fail at load, not on the first batch, when probe and model do not belong together
        size = _pair(open_clip.get_model_preprocess_cfg(loaded.model)["size"])
        probe_x = torch.zeros((1, 3, *size), device=loaded.device, dtype=loaded.dtype)
        with torch.inference_mode():
            e, s = forward_images(loaded.model, probe_x, probe.needs_token_stats)
        dim = e.shape[-1] + (0 if s is None else s.shape[-1])
        if dim != probe.dim:
            raise ValueError(
                f"RS probe {self._probe_path} ({probe.features}) expects {probe.dim}-d inputs but "
                f"{self._model} gives {dim}-d: the probe was trained for {probe.model!r}"
            )
        loaded.probe = probe
        return loaded

    def run_inference(
        self,
        batch: Sequence[Record],
        model: LoadedClip,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        probe = model.probe
        embeddings, stats = self.embed(batch, model, probe.needs_token_stats)
        good = [i for i, e in enumerate(embeddings) if e is not None]
        scores = iter([])
        if good:
            x = probe.inputs(
                np.stack([embeddings[i] for i in good]),
                np.stack([stats[i] for i in good]) if probe.needs_token_stats else None,
            )
            # padded to a full batch for the same reason as in ``embed``
            pad = np.zeros((max(0, self._batch_size - len(x)), x.shape[1]), dtype=x.dtype)
            scores = iter(probe.score(np.concatenate([x, pad]))[: len(x)].tolist())
        out = []
        for rec, emb in zip(batch, embeddings, strict=True):
            inf = None if emb is None else RSInference(float(next(scores)), emb)
            out.append(PredictionResult(example=rec, inference=inf, model_id=self._model))
        return out


class ClipInference(NamedTuple):
    """``OpenClipImageTextEmbedder``'s inference for one record."""

    image: np.ndarray  # float32 [embed_dim], L2-normalised
    text: np.ndarray  # float32 [embed_dim], L2-normalised
    score: float  # cosine of the two: the record's clip_score


class OpenClipImageTextEmbedder(OpenClipImageEmbedder):
    """Records with ``_image`` bytes and a caption → ``ClipInference(image, text, score)``.

    Same arguments as ``OpenClipImageEmbedder`` plus ``text_field`` (default ``caption``).
    Text, like images, always runs as a full ``batch_size`` batch (padded with empty
    captions), so a record's embeddings never depend on which records shared its batch.
    """

    metrics_namespace = "rs_corpus.open_clip_image_text"

    def __init__(self, *args: Any, text_field: str = "caption", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._text_field = text_field

    def embed_text(self, texts: Sequence[str], model: LoadedClip) -> np.ndarray:
        """float32 [len(texts), D] L2-normalised caption embeddings (full, padded batches)."""
        out = []
        for s in range(0, len(texts), self._batch_size):
            chunk = list(texts[s : s + self._batch_size])
            n = len(chunk)
            tokens = model.tokenizer(chunk + [""] * (self._batch_size - n))
            with torch.inference_mode():
                t = model.model.encode_text(tokens.to(model.device))
                t = torch.nn.functional.normalize(t.float(), dim=-1)[:n]
            out.append(t.cpu().numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def run_inference(
        self,
        batch: Sequence[Record],
        model: LoadedClip,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        images, _ = self.embed(batch, model)
        texts = self.embed_text([str(r.get(self._text_field) or "") for r in batch], model)
        out = []
        for rec, img, txt in zip(batch, images, texts, strict=True):
            inf = None
            if img is not None:
                inf = ClipInference(img, txt.copy(), float(np.dot(img, txt)))
            out.append(PredictionResult(example=rec, inference=inf, model_id=self._model))
        return out
