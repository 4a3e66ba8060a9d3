"""Contrastive losses: open_clip's own ``ClipLoss`` / ``SigLipLoss`` (reused, not rewritten).

``clip``: symmetric InfoNCE with the model's learnable temperature. Under DDP each rank gathers
the other ranks' features *with* gradient (``gather_with_grad``) and computes the loss only for
its own rows against all columns (``local_loss``): the same gradient as the global loss at
1/world of the memory. ``siglip``: sigmoid loss with learnable scale and bias; across ranks
open_clip exchanges text features with neighbours.

``count_loss`` (``--count-loss W``, added to either): the counting-contrastive loss of Paiss et
al., "Teaching CLIP to Count to Ten" (ICCV 2023). An image whose caption states a count is
scored against its caption and ``K`` counterfactual twins with other counts
(``trainer/counts.py``; ``--count-negatives K``, 1 in the paper):
``-log softmax([s(i, t), s(i, t'_1), …, s(i, t'_K)])[0]`` with the model's temperature.
``--count-sigma S`` trades the one-hot target for a soft one over the same captions, weights
``exp(-(ln k - ln n)² / 2S²)`` for a twin of count ``k`` and a true count ``n``: an ordinal
target, under which a near miss costs less than a far one.
In a contrastive batch the other captions differ in scene as well as count, so the count token
is the one thing the text encoder may ignore; the twin differs in nothing else.
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss, SigLipLoss

LOSSES = ("clip", "siglip")
LOGIT_SCALE_MAX = 100.0  # CLIP's clamp: logit_scale.exp() <= 100
SIGLIP_INIT_LOGIT_SCALE = 2.302585092994046  # log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def build_loss(kind: str, rank: int = 0, world_size: int = 1) -> torch.nn.Module:
    if kind == "clip":
        return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                        rank=rank, world_size=world_size)
    if kind == "siglip":
        return SigLipLoss(cache_labels=True, rank=rank, world_size=world_size)
    raise ValueError(f"--loss must be one of {LOSSES}, got {kind!r}")


def contrastive_loss(loss_fn: torch.nn.Module, out: dict) -> torch.Tensor:
    """Total loss from a model's ``output_dict`` forward."""
    kw = {k: out[k] for k in ("image_features", "text_features", "logit_scale")}
    if isinstance(loss_fn, SigLipLoss) or out.get("logit_bias") is not None:
        kw["logit_bias"] = out["logit_bias"]
    losses = loss_fn(**kw, output_dict=True)
    return sum(losses.values())


def count_loss(image_features: torch.Tensor, text_features: torch.Tensor,
               cf_features: torch.Tensor, logit_scale: torch.Tensor,
               target: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of ``-log softmax([s(i,t), s(i,t'_1..K)])[0]``: row ``r`` is one image
    ``[D]``, its caption ``[D]`` and the caption's counterfactual twins ``[K, D]`` (or ``[D]``
    for one; normalised features). ``target`` ``[N, K+1]`` (rows summing to 1) replaces the
    one-hot on the true caption with a soft target (``--count-sigma``)."""
    if cf_features.dim() == image_features.dim():
        cf_features = cf_features.unsqueeze(1)
    s_true = (image_features * text_features).sum(-1, keepdim=True)
    s_cf = torch.einsum("nd,nkd->nk", image_features, cf_features)
    logits = logit_scale * torch.cat([s_true, s_cf], dim=1)
    if target is None:
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return torch.nn.functional.cross_entropy(logits, target)


def forward_counting(fwd: torch.nn.Module, image: torch.Tensor, text: torch.Tensor,
                     cf_text: torch.Tensor | None, cf_mask: torch.Tensor | None,
                     cf_target: torch.Tensor | None = None,
                     ) -> tuple[dict, torch.Tensor | None]:
    """``fwd(image, text)`` as an output dict, and the count loss of the rows ``cf_mask``
    marks (None when there are none); ``cf_text`` is ``[B, K, context]``. The twins ride in the
    same text batch: one forward, so DistributedDataParallel sees one graph."""
    if cf_text is None or cf_mask is None or not bool(cf_mask.any()):
        return fwd(image, text), None
    n = text.shape[0]
    twins = cf_text[cf_mask]  # [M, K, context]
    out = dict(fwd(image, torch.cat([text, twins.reshape(-1, twins.shape[-1])])))
    tf = out["text_features"]
    out["text_features"] = tf[:n]
    loss = count_loss(out["image_features"][cf_mask], tf[:n][cf_mask],
                      tf[n:].reshape(twins.shape[0], twins.shape[1], -1), out["logit_scale"],
                      None if cf_target is None else cf_target[cf_mask])
    return out, loss


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    import math

    model.logit_scale.clamp_(0, math.log(LOGIT_SCALE_MAX))
