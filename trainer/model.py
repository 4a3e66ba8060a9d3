"""The model being trained: any open_clip architecture, local weights or random init, plus PEFT.

``--model`` is what ``pipelines.models.open_clip_loader.load_open_clip`` accepts: an
architecture name (ours in ``pipelines/models/configs`` or open_clip's) — random init unless
``--pretrained FILE`` — or a local model directory (``DIR`` / ``local-dir:DIR``) whose weights
are used unless ``--pretrained`` overrides them. Nothing is ever fetched from a hub.

PEFT (``--peft``):

* ``lock-image`` / ``lock-text``: open_clip's LiT-style tower locking (frozen tower).
* ``lora``: ``peft`` LoRA on every transformer block's attention and MLP of both towers.
  open_clip's blocks use ``nn.MultiheadAttention``, which calls ``F.multi_head_attention_forward``
  with ``out_proj.weight`` directly: a LoRA wrapper on the ``out_proj`` Linear alone would be
  trained but **never used in the forward**. peft (≥ 0.14) has a dedicated LoRA layer for
  ``nn.MultiheadAttention`` (target ``attn``) that adapts both the packed q/k/v projection
  (``in_proj``) and ``out_proj`` and merges them into the weights for each forward; so the
  targets are ``attn`` + the MLP's ``c_fc`` and ``c_proj`` (plain Linears). Trainable: the LoRA
  matrices only. Checkpoints carry the merged weights as a plain open_clip ``state_dict``.
* ``adapter``: a bottleneck adapter (down → GELU → up, up zero-initialised so training starts
  from the unchanged model) after each residual block's MLP (a forward hook adds the adapter to
  the MLP output; the adapter lives at ``<block>.mlp_adapter``). Only adapters train. Adapters
  are non-linear, so they cannot be merged: such checkpoints need ``load_trained_model``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from torch import nn

from pipelines.models.open_clip_loader import (
    load_open_clip,
    model_config,
    register_configs,
    resolve_model_dir,
)

from .loss import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE

log = logging.getLogger(__name__)

PEFT_KINDS = ("none", "lock-image", "lock-text", "lora", "adapter")
LORA_TARGETS = ("attn", "c_fc", "c_proj")


@dataclass
class BuiltModel:
    model: nn.Module  # the open_clip CLIP (PEFT layers injected in place)
    tokenizer: Any
    model_cfg: dict
    preprocess_cfg: dict
    arch: str | None
    peft: str
    peft_model: Any = None  # the peft.PeftModel wrapper for LoRA


def architecture_name(model: str) -> str | None:
    d = resolve_model_dir(model)
    if d is None:
        return model
    import json

    cfg = json.loads((d / "open_clip_config.json").read_text())
    return cfg.get("rs_corpus", {}).get("architecture")


class BottleneckAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def _adapter_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return module._rs_adapter(output)


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    from open_clip.transformer import ResidualAttentionBlock

    return [m for m in model.modules()
            if isinstance(m, ResidualAttentionBlock) and hasattr(m, "mlp")]


def add_adapters(model: nn.Module, hidden: int) -> int:
    """Freeze ``model`` and add a zero-init bottleneck adapter after every block's MLP."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for block in residual_blocks(model):
        dim = block.mlp.c_proj.out_features
        adapter = BottleneckAdapter(dim, hidden).to(next(block.parameters()).device)
        block.add_module("mlp_adapter", adapter)
        # not a submodule of mlp (keeps the mlp's keys unchanged); the hook finds it here
        object.__setattr__(block.mlp, "_rs_adapter", adapter)
        block.mlp.register_forward_hook(_adapter_hook)
        n += 1
    return n


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float,
             targets: tuple[str, ...] = LORA_TARGETS) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     bias="none")
    return get_peft_model(model, cfg)  # injects in place; only LoRA params stay trainable


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def build_model(
    model: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    loss: str = "clip",
    peft: str = "none",
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    adapter_dim: int = 16,
    grad_checkpointing: bool = False,
) -> BuiltModel:
    if peft not in PEFT_KINDS:
        raise ValueError(f"--peft must be one of {PEFT_KINDS}")
    register_configs()
    net, _, tokenizer = load_open_clip(model, pretrained, device=device, precision="fp32")
    cfg = copy.deepcopy(model_config(model))
    if loss == "siglip" and net.logit_bias is None:
        with torch.no_grad():
            net.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
        net.logit_bias = nn.Parameter(torch.full_like(net.logit_scale, SIGLIP_INIT_LOGIT_BIAS))
        cfg["init_logit_bias"] = SIGLIP_INIT_LOGIT_BIAS
        cfg["init_logit_scale"] = SIGLIP_INIT_LOGIT_SCALE
    net.output_dict = True
    net.train()
    pp = open_clip.get_model_preprocess_cfg(net)
    preprocess_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}
    peft_model = None
    if peft == "lock-image":
        net.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    elif peft == "lock-text":
        net.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    elif peft == "lora":
        peft_model = add_lora(net, lora_r, lora_alpha, lora_dropout)
    elif peft == "adapter":
        add_adapters(net, adapter_dim)
    if grad_checkpointing:
        net.set_grad_checkpointing(True)
    trainable, total = count_parameters(net)
    log.info("model %s: %d parameters, %d trainable (%.3f%%, peft=%s)",
             model, total, trainable, 100.0 * trainable / max(1, total), peft)
    return BuiltModel(net, tokenizer, cfg, preprocess_cfg, architecture_name(model), peft,
                      peft_model)


def plain_state_dict(built: BuiltModel) -> dict[str, torch.Tensor]:
    """open_clip-loadable weights (LoRA merged in; adapter runs: base + adapter tensors)."""
    from .checkpoint import cpu_state_dict

    if built.peft == "lora":
        merged = copy.deepcopy(built.peft_model).merge_and_unload()
        return cpu_state_dict(merged.state_dict())
    return cpu_state_dict(built.model.state_dict())


def load_trained_model(checkpoint: str, device: str = "cpu") -> nn.Module:
    """Any trainer checkpoint as a ready model (adapter runs included), eval mode."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    args = ck.get("args", {})
    if ck.get("peft") != "adapter":
        net, _, _ = load_open_clip(ck["model"], checkpoint, device=device)
        return net
    net, _, _ = load_open_clip(ck["model"], None, device=device)
    add_adapters(net, int(args.get("adapter_dim", 16)))
    net.load_state_dict(ck["state_dict"], strict=True)
    return net.eval()
