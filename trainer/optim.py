"""AdamW with open_clip's weight-decay exclusions and a stateless warmup + cosine schedule.

No weight decay on gains and biases (every parameter with fewer than 2 dimensions: LayerNorm
weights, biases, ``logit_scale``/``logit_bias``, class embeddings), nor on embeddings (token and
positional embedding tables). The learning rate is a pure function of the step, so resuming
needs nothing but the step.
"""

from __future__ import annotations

import math

import torch


def no_weight_decay(name: str, p: torch.nn.Parameter) -> bool:
    return (
        p.ndim < 2
        or "bias" in name
        or "logit_scale" in name
        or "embedding" in name  # token_embedding, positional_embedding, class_embedding
        or ".ln" in name or name.startswith("ln")
        or ".bn" in name
    )


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(n, p) else decay).append(p)
    groups = []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if decay:
        groups.append({"params": decay, "weight_decay": wd})
    return groups


def build_optimizer(model: torch.nn.Module, lr: float, wd: float,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6
                    ) -> torch.optim.Optimizer:
    groups = param_groups(model, wd)
    if not groups:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * (base_lr - min_lr)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
