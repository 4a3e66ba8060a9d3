"""Load an open_clip model from LOCAL weights only: one entry point for every stage and the trainer.

``load_open_clip(model, pretrained)`` accepts exactly three shapes of input:

* an architecture name + a local checkpoint file::

      load_open_clip("ViT-B-32", "/models/RemoteCLIP-ViT-B-32.pt")
      load_open_clip("RS-Tiny-ViT", "logs/run/checkpoints/epoch_3.pt")

  The name is one of open_clip's bundled configs or ours in ``pipelines/models/configs/*.json``
  (registered with ``open_clip.add_model_config`` on import). The checkpoint may be an
  ``open_clip_train`` ``epoch_N.pt`` (``{"state_dict": ...}``, possibly with a DDP ``module.``
  prefix), a bare state dict (``.pt``/``.bin``/``.pth``), or a ``.safetensors`` file.
  ``pretrained=None`` gives a randomly initialised model.

* a local directory in open_clip's HF-hub layout (``open_clip_config.json`` holding
  ``model_cfg`` + ``preprocess_cfg``, and ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``), given as a plain path or with open_clip's own
  ``local-dir:`` schema (open_clip >= 3 understands it natively, so the same string works for
  ``open_clip_train --model local-dir:DIR``)::

      load_open_clip("/models/SkyCLIP-ViT-L-14")          # a `huggingface-cli download` dir
      load_open_clip("local-dir:data/demo/models/tiny-clip")

* a directory as above + a checkpoint file: the directory supplies the architecture and
  preprocessing, the file the weights (e.g. a fine-tuned ``epoch_N.pt`` of the tiny model).

Directories and files may also live on any filesystem Beam's ``FileSystems`` knows
(``gs://``, ``s3://``, ...): they are copied once per worker process to local disk
(``$RS_CORPUS_MODEL_CACHE``, default ``<tmp>/rs-corpus-models``) and loaded from there, so a
Dataflow or Flink worker reads the weights the launcher was given (:func:`localize`).

Everything else is refused with ``ValueError``: ``hf-hub:`` names, http(s) URLs, ``pretrained``
tags such as ``"openai"`` or ``"laion2b_s34b_b79k"`` that would make open_clip download, and
model configs that name a hub model or tokenizer (``text_cfg.hf_model_name`` /
``hf_tokenizer_name`` that is not a local directory, SigLIP tokenizers by architecture name):
nothing here ever downloads. Weights are read with ``torch.load(..., weights_only=True)``
(never an arbitrary unpickle) or with safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.factory import load_checkpoint
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_NAME = "open_clip_config.json"
PRECISIONS = ("fp32", "bf16", "fp16")
_HUB_PREFIXES = ("hf-hub:", "hf://", "http://", "https://", "ftp://")
CACHE_ENV = "RS_CORPUS_MODEL_CACHE"
_localize_lock = threading.Lock()

_registered = False


def register_configs() -> None:
    """Make ``pipelines/models/configs/*.json`` known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


register_configs()


def _refuse_remote(what: str, value: str) -> None:
    """Refuse hub names and URLs; a path on a Beam filesystem (gs://, s3://...) is fine."""
    low = value.lower()
    if low.startswith(_HUB_PREFIXES) or ("://" in low and not _is_filesystem_path(value)):
        raise ValueError(
            f"{what}={value!r} points at a model hub or URL; rs-corpus only loads weights from "
            "files (local disk, or gs://, s3://... through Beam's FileSystems). Download the "
            "model yourself (e.g. `huggingface-cli download ORG/REPO --local-dir DIR`) and pass "
            "the directory, or an architecture name plus a checkpoint file."
        )


def _is_filesystem_path(value: str) -> bool:
    """A ``scheme://`` path that one of Beam's filesystems (not the local one) serves."""
    if "://" not in value or value.lower().startswith(("file://",) + _HUB_PREFIXES):
        return False
    from apache_beam.io.filesystems import FileSystems

    try:
        FileSystems.get_filesystem(value)
    except ValueError:
        return False
    return True


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(),
                                                            "rs-corpus-models"))


def localize(path: str) -> str:
    """A local path holding what ``path`` holds: ``path`` itself when it is local, else a copy
    of the file or directory (``gs://b/m/`` → every file under it) made once per process
    (and reused by other processes: the copy is renamed into place only when complete)."""
    if not _is_filesystem_path(path):
        return path.removeprefix("file://")
    from apache_beam.io.filesystems import FileSystems

    base = path.rstrip("/")
    name = base.rsplit("/", 1)[-1] or "model"
    found = FileSystems.match([base + "/**"])[0].metadata_list
    single = not found
    if single:
        found = FileSystems.match([base])[0].metadata_list
        if not found:
            raise FileNotFoundError(f"no model file or directory at {path}")
    files = [m.path for m in found]
    # the copy is named by what it holds (paths, sizes, times): new weights, new copy
    stamp = "\n".join(f"{m.path}\t{m.size_in_bytes}\t{m.last_updated_in_seconds}"
                      for m in sorted(found, key=lambda m: m.path))
    digest = hashlib.sha256(f"{base}\n{stamp}".encode()).hexdigest()[:16]
    dest = cache_root() / f"{digest}-{name}"
    with _localize_lock:
        if dest.exists():
            return str(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=_ensure(cache_root())))
        try:
            for src in files:
                rel = name if single else src[len(base) + 1:]
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with FileSystems.open(src, compression_type="uncompressed") as fin, \
                        open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            final = tmp / name if single else tmp
            try:
                os.rename(final, dest)
            except OSError:  # another process finished first: use its copy
                if not dest.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("copied %s to %s", path, dest)
    return str(dest)


def _ensure(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def hub_references(model_cfg: dict, identifier: str, local_dir: Path | None) -> list[str]:
    """What in an open_clip config would make open_clip download from a hub."""
    text = model_cfg.get("text_cfg", {}) or {}
    found = []
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text.get(key)
        if not name:
            continue
        if key == "hf_tokenizer_name" and local_dir is not None:
            continue  # open_clip reads a local-dir model's tokenizer from the dir itself
        if not os.path.isdir(str(name)):
            found.append(f"text_cfg.{key}={name!r} (a Hugging Face hub name, not a local dir)")
    if local_dir is None and "siglip" in identifier.lower() and not text.get("hf_tokenizer_name"):
        found.append(f"{identifier!r} uses a SigLIP tokenizer that open_clip downloads")
    return found


def _refuse_hub_config(model_cfg: dict, identifier: str, local_dir: Path | None) -> None:
    refs = hub_references(model_cfg, identifier, local_dir)
    if refs:
        raise ValueError(
            f"model {identifier!r} would download from a model hub: {'; '.join(refs)}. "
            "rs-corpus loads local files only: download the text tower and tokenizer and put "
            "their local directories in the config, or use a model directory that holds them.")


def resolve_model_dir(model: str) -> Path | None:
    """The local open_clip model directory ``model`` names, or None if it names an architecture."""
    path = model[len(LOCAL_DIR_PREFIX):] if model.startswith(LOCAL_DIR_PREFIX) else None
    if path is None and os.path.isdir(model):
        path = model
    if path is None:
        return None
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{d} is not an open_clip model directory: {CONFIG_NAME} is missing "
            "(expected the layout of open_clip.push_to_hf_hub / save_for_hf)"
        )
    return d


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" → cuda when available, else cpu; "cuda" without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device")
    return dev


def _check_architecture(model: str) -> None:
    """Refuse a name that is neither one of our configs nor one of open_clip's."""
    if model.replace("/", "-") not in open_clip.list_models():
        raise ValueError(
            f"unknown model {model!r}: neither a local open_clip model directory nor an "
            f"architecture name (ours: {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}; "
            "open_clip's: open_clip.list_models())"
        )


def _local_model(model: Any) -> str:
    """``model`` (a name, a directory, ``local-dir:DIR``) checked, with a directory on a Beam
    filesystem copied to the local cache (``localize``)."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be an open_clip architecture name or a local directory")
    _refuse_remote("model", model)
    if model.startswith(LOCAL_DIR_PREFIX):
        return LOCAL_DIR_PREFIX + localize(model[len(LOCAL_DIR_PREFIX):])
    return localize(model)


def load_open_clip(
    model: str,
    pretrained: str | None = None,
    device: str | torch.device | None = "cpu",
    precision: str = "fp32",
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], Any]:
    """(model in eval mode on ``device``, eval image preprocess, tokenizer) from local weights.

    See the module docstring for what ``model``/``pretrained`` may be. ``device=None`` picks cuda
    when available. ``precision``: fp32 | bf16 | fp16 (open_clip's mixed low precision: matmul
    weights in bf16/fp16, LayerNorms in fp32; feed images in the dtype ``input_dtype`` returns).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model = _local_model(model)
    if pretrained is not None:
        pretrained = os.fspath(pretrained)
        _refuse_remote("pretrained", pretrained)
        pretrained = localize(pretrained)
        if not os.path.isfile(pretrained):
            raise ValueError(
                f"pretrained={pretrained!r} is not a local checkpoint file. Pretrained tags "
                "(e.g. 'openai', 'laion2b_s34b_b79k') are hub downloads and are not supported: "
                "download the weights and pass the file path."
            )
    dev = resolve_device(device)
    register_configs()

    model_dir = resolve_model_dir(model)
    _refuse_hub_config(_config_of(model, model_dir) or {}, model, model_dir)
    common = {
        "precision": precision,
        "device": dev,
        # never fetch default tower weights (timm / HF text towers) from a hub
        "pretrained_image": False,
        "pretrained_text": False,
        "weights_only": True,
    }
    if model_dir is not None:
        oc_name = f"{LOCAL_DIR_PREFIX}{model_dir}"
        # the directory's own weights unless an explicit checkpoint overrides them
        net = open_clip.create_model(oc_name, load_weights=pretrained is None, **common)
        if pretrained is None and _dir_checkpoint(model_dir) is None:
            log.warning("no weights in %s: the model is randomly initialised", model_dir)
    else:
        _check_architecture(model)
        oc_name = model
        # pretrained=None here: we load the file ourselves so open_clip never treats it as a tag
        net = open_clip.create_model(model, pretrained=None, **common)
    if pretrained is not None:
        load_checkpoint(net, pretrained, strict=True, weights_only=True, device="cpu")
        log.info("loaded %s weights from %s", model, pretrained)
    elif model_dir is None:
        log.info("%s: randomly initialised (pretrained=None)", model)
    net.eval()

    preprocess = image_transform_v2(
        PreprocessCfg(**open_clip.get_model_preprocess_cfg(net)), is_train=False
    )
    tokenizer = open_clip.get_tokenizer(oc_name)
    return net, preprocess, tokenizer


def _dir_checkpoint(d: Path) -> Path | None:
    for pat in ("*.safetensors", "*.bin", "*.pth"):
        hits = sorted(d.glob(pat))
        if hits:
            return hits[0]
    return None


def model_config(model: str) -> dict:
    """The open_clip ``model_cfg`` of an architecture name or model directory."""
    _refuse_remote("model", model)
    register_configs()
    if _is_filesystem_path(model.removeprefix(LOCAL_DIR_PREFIX)):
        model = localize(model.removeprefix(LOCAL_DIR_PREFIX))
    cfg = _config_of(model, resolve_model_dir(model))
    if cfg is None:
        raise ValueError(f"unknown model {model!r}")
    return cfg


def _config_of(model: str, model_dir: Path | None) -> dict | None:
    """The ``model_cfg`` of a resolved model directory, or of an architecture name (None if
    open_clip does not know it)."""
    if model_dir is not None:
        cfg = json.loads((model_dir / CONFIG_NAME).read_text())
        return cfg.get("model_cfg", cfg)
    return open_clip.get_model_config(model)


def input_dtype(net: torch.nn.Module) -> torch.dtype:
    """The dtype images must be fed in: that of the image tower's first conv/linear weight."""
    visual = getattr(net, "visual", net)
    for m in visual.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            return m.weight.dtype
    return next(visual.parameters()).dtype


def model_device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def decode_image(data: bytes) -> Image.Image:
    """JPEG/PNG bytes → RGB PIL image."""
    import io

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def forward_images(
    net: torch.nn.Module, x: torch.Tensor, token_stats: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One image-tower pass: (L2-normalised embeddings [B, D], token stats [B, 2C] or None).

    ``token_stats``: the per-channel mean and standard deviation over the spatial grid of the
    tower's last-layer features (ViT patch tokens after the final LayerNorm, ResNet/timm feature
    maps), from open_clip's public ``forward_intermediates`` in the same pass that gives the
    embedding. Thread-safe: the model is never mutated.
    """
    if not token_stats:
        feats = net.encode_image(x)
        return torch.nn.functional.normalize(feats.float(), dim=-1), None
    out = net.visual.forward_intermediates(
        x, indices=1, normalize_intermediates=True, output_fmt="NCHW"
    )
    feats = torch.nn.functional.normalize(out["image_features"].float(), dim=-1)
    grid = out["image_intermediates"][-1].float().flatten(2)  # [B, C, H*W]
    stats = torch.cat([grid.mean(dim=2), grid.std(dim=2, unbiased=False)], dim=1)
    return feats, stats


@torch.inference_mode()
def encode_images(
    net: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    images: Sequence[Image.Image] | Iterable[Image.Image],
    batch_size: int = 64,
    token_stats: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """float32 [N, embed_dim] L2-normalised image embeddings of PIL ``images``.

    With ``token_stats=True``: (embeddings, float32 [N, 2C] token stats; see forward_images).
    """
    dev, dt = model_device(net), input_dtype(net)
    embs: list[np.ndarray] = []
    stats: list[np.ndarray] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        x = torch.stack(batch).to(device=dev, dtype=dt)
        e, s = forward_images(net, x, token_stats)
        embs.append(e.cpu().numpy().astype(np.float32))
        if s is not None:
            stats.append(s.cpu().numpy().astype(np.float32))
        batch.clear()

    for im in images:
        batch.append(preprocess(im))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    if not embs:
        e0 = np.zeros((0, int(getattr(net.visual, "output_dim", 0))), np.float32)
        return (e0, np.zeros((0, 0), np.float32)) if token_stats else e0
    emb = np.concatenate(embs, axis=0)
    return (emb, np.concatenate(stats, axis=0)) if token_stats else emb


def load_tokenizer(model: str) -> tuple[Any, int]:
    """(tokenizer, context length) of an architecture name or local model directory, without
    building the model or reading its weights: for stages that only count or encode text.

    ``model`` takes the shapes ``load_open_clip`` takes for its first argument (a name, a
    directory, ``local-dir:DIR``, or a directory on a Beam filesystem, copied once per process
    like the weights would be, so a later ``load_open_clip`` reuses the copy) and is refused
    the same way: hub names, URLs, and configs whose tokenizer open_clip would download. The
    context length is the tokenizer's (the config's ``text_cfg.context_length``, 77 for CLIP).
    """
    model = _local_model(model)
    register_configs()
    model_dir = resolve_model_dir(model)
    _refuse_hub_config(_config_of(model, model_dir) or {}, model, model_dir)
    if model_dir is not None:
        tokenizer = open_clip.get_tokenizer(f"{LOCAL_DIR_PREFIX}{model_dir}")
    else:
        _check_architecture(model)
        tokenizer = open_clip.get_tokenizer(model)
    context_length = int(getattr(tokenizer, "context_length", 0) or 0)
    if context_length <= 0:
        raise ValueError(f"the tokenizer of {model!r} has no context length")
    return tokenizer, context_length
