"""Contrastive losses: open_clip's own ``ClipLoss`` / ``SigLipLoss`` (reused, not rewritten).

``clip``: symmetric InfoNCE with the model's learnable temperature. Under DDP each rank gathers
the other ranks' features *with* gradient (``gather_with_grad``) and computes the loss only for
its own rows against all columns (``local_loss``): the same gradient as the global loss at
1/world of the memory. ``siglip``: sigmoid loss with learnable scale and bias; across ranks
open_clip exchanges text features with neighbours.
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


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    import math

    model.logit_scale.clamp_(0, math.log(LOGIT_SCALE_MAX))
