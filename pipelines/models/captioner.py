"""Apache Beam ``RunInference`` handler for LOCAL Hugging Face image-to-text captioners.

``HFCaptioner(model_dir)`` takes records whose ``_image`` field holds JPEG/PNG bytes and returns
one ``PredictionResult(example=record, inference=[K caption strings])`` per record, the K
candidates in generation order (for beam search: best beam first). A record whose image does
not decode, or on which the model raises, gets ``inference=None`` (the Caption stage rejects
it as ``caption_failed``); the bundle goes on.

Models: a directory in Hugging Face format (``save_pretrained`` / ``huggingface-cli download
ORG/REPO --local-dir DIR``), detected from ``config.json``'s ``model_type``:

* ``blip-2`` → ``Blip2ForConditionalGeneration`` (OPT or Flan-T5 language model), e.g.
  ``Salesforce/blip2-opt-2.7b``, ``blip2-opt-6.7b`` (RS5M's captioner), ``blip2-flan-t5-xl``;
* ``blip`` → ``BlipForConditionalGeneration``, e.g. ``Salesforce/blip-image-captioning-large``.

Loaded with ``local_files_only=True``; ``gs://``/``s3://`` directories are first copied to the
worker's local cache (``open_clip_loader.localize``: every file under the prefix, once per
process). Anything that is not a directory after that (hub names such as
``Salesforce/blip2-opt-2.7b``, URLs) is refused: nothing downloads.

Generation (one ``generate`` call per batch; the batch is padded to ``batch_size`` with copies
of its first image so every call has the same shapes — a record's captions then never depend,
even in the last bits, on which records shared its batch):

* default: beam search with ``num_beams = K`` beams, ``num_return_sequences = K``;
* ``do_sample=True`` (``num_beams`` None/1): multinomial sampling with ``top_p`` and
  ``temperature``, K independent samples per record. Sampling is **per record**: every
  (record, candidate) row draws from its own ``torch.Generator`` seeded by
  ``stable_hash(seed, record key, candidate index)`` (the key is the record's ``key``, or the
  SHA-256 of its image bytes), so a record's sampled captions are the same whatever batch it
  lands in and on every rerun (``_PerRowSampler``: the sampling is done in a logits processor and
  ``generate`` then just takes the one token left);
* ``do_sample=True`` with ``num_beams > 1`` (beam-search sampling): ``generate`` samples across
  the whole batch, so torch is seeded per batch from the stable hash of the batch's keys: the
  same batch gives the same captions, but a record's captions depend on its batch-mates.

The prompt (``prompt=``, e.g. ``"a satellite image of"``) conditions the model; the
candidates are what the model generated AFTER it (the prompt is not repeated in them).

Precision: ``bf16`` (default) | ``fp16`` | ``fp32``; on CPU always fp32 (half precision on CPU
is slow and, for fp16, unsupported by many kernels) — a log line says so. Device None → cuda
when the worker has one. One model per worker process (RunInference's shared model); with
``share_across_processes=True`` one per machine instead (Beam's large-model mode: the SDK
processes of a Dataflow GPU VM share one copy in GPU memory rather than holding one each).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from pipelines.models.open_clip_loader import decode_image, localize, resolve_device
from pipelines.records import stable_hash

log = logging.getLogger(__name__)

Record = dict[str, Any]

PRECISIONS = ("bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: config.json ``model_type`` → the family this handler drives
FAMILIES = ("blip-2", "blip")


def model_family(model_dir: str) -> str:
    """``"blip-2"`` or ``"blip"`` from ``model_dir/config.json``'s ``model_type``."""
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory: "
                                "config.json is missing")
    with open(cfg_path, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{cfg_path}: model_type {model_type!r} is not a supported captioner "
                         f"(one of {FAMILIES}: BLIP-2 with OPT/Flan-T5, BLIP)")
    return model_type


def local_model_dir(model_dir: str) -> str:
    """The local directory holding ``model_dir`` (gs://, s3:// copied once per process).

    Refuses anything that is not a directory then: hub names and URLs would download.
    """
    if not model_dir or not isinstance(model_dir, str):
        raise ValueError("model_dir is required: a local, gs:// or s3:// model directory")
    local = localize(model_dir)
    if not os.path.isdir(local):
        raise ValueError(
            f"captioner model_dir={model_dir!r} is not a directory. rs-corpus loads models from "
            "files only (local disk, or gs://, s3://... through Beam's FileSystems): download "
            "it first, e.g. `huggingface-cli download Salesforce/blip2-opt-2.7b --local-dir DIR`,"
            " and pass DIR.")
    return local


def effective_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the model runs in: ``precision`` on GPUs, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type == "cpu" and precision != "fp32":
        log.info("HFCaptioner: precision %s asked for but the device is the CPU: running fp32",
                 precision)
        return torch.float32
    return _DTYPES[precision]


def record_seed(seed: int, key: str, candidate: int) -> int:
    """The sampling seed of one (record, candidate) row: stable across processes and runs."""
    return stable_hash(f"{seed}\x1f{key}\x1f{candidate}") & ((1 << 63) - 1)


def record_key(record: Record, image_field: str = "_image") -> str:
    """The record's ``key``, or the SHA-256 of its image bytes when it has none."""
    key = record.get("key")
    if key:
        return str(key)
    return hashlib.sha256(record.get(image_field) or b"").hexdigest()


class _PerRowSampler:
    """A ``LogitsProcessor`` that samples each row with its own generator.

    Applies temperature and top-p itself (``generate``'s own warpers run after custom logits
    processors, too late), draws one token per row from that row's ``torch.Generator`` (on the
    CPU, so the draw is the same on any device) and returns scores that are ``-inf`` everywhere
    but on the drawn token, so greedy ``generate`` takes exactly the sampled token.
    """

    def __init__(self, generators: Sequence[torch.Generator], temperature: float | None,
                 top_p: float | None) -> None:
        self.generators = list(generators)
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        s = scores.float()
        if self.temperature is not None and self.temperature != 1.0:
            s = s / self.temperature
        if self.top_p is not None and self.top_p < 1.0:
            from transformers.generation.logits_process import TopPLogitsWarper

            s = TopPLogitsWarper(top_p=self.top_p)(input_ids, s)
        probs = torch.softmax(s, dim=-1).cpu()
        if probs.shape[0] != len(self.generators):
            raise RuntimeError(f"sampler has {len(self.generators)} generators for "
                               f"{probs.shape[0]} rows")
        picks = torch.stack([torch.multinomial(probs[r], 1, generator=g)
                             for r, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, picks.to(scores.device), 0.0)
        return out


@dataclasses.dataclass
class LoadedCaptioner:
    """What ``load_model`` returns: the model and what it takes to feed it."""

    model: torch.nn.Module
    image_processor: Any
    tokenizer: Any
    family: str  # "blip-2" | "blip"
    device: torch.device
    dtype: torch.dtype
    #: the language-model prompt ids (BLIP-2: image placeholders + tokenised prompt;
    #: BLIP: the tokenised prompt or None)
    input_ids: list[int] | None
    #: how many leading tokens of ``generate``'s output are the prompt, not the caption
    prefix_len: int
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class HFCaptioner(ModelHandler[Record, PredictionResult, LoadedCaptioner]):
    """Records with ``_image`` bytes → K caption candidates from a local BLIP-2/BLIP directory.

    Args:
      model_dir: local (or gs://, s3://) Hugging Face model directory (config.json +
        safetensors + processor files).
      precision: bf16 | fp16 | fp32 (fp32 whenever the device is the CPU).
      device: "cpu", "cuda", "cuda:1"; None → cuda when the worker has one.
      batch_size: records per ``generate`` call (``BatchElements`` max_batch_size).
      candidates: K, the captions returned per record.
      num_beams: beams of beam search; None → K (or 1 when sampling).
      do_sample: sample instead of beam search (see the module docstring for seeding).
      top_p, temperature: sampling parameters (None: the model's defaults / off).
      max_new_tokens, min_new_tokens: caption length bounds in tokens.
      prompt: text the language model continues (None: captioning from the image alone).
      seed: sampling seed (with ``do_sample``).
      image_field: the record field holding the encoded image.
      share_across_processes: one model per machine, shared by its processes (large models
        on multi-process GPU workers), instead of one per process.
    """

    metrics_namespace = "rs_corpus.captioner"

    def __init__(
        self,
        model_dir: str,
        precision: str = "bf16",
        device: str | None = None,
        batch_size: int = 8,
        candidates: int = 5,
        num_beams: int | None = None,
        do_sample: bool = False,
        top_p: float | None = None,
        temperature: float | None = None,
        max_new_tokens: int = 30,
        min_new_tokens: int | None = None,
        prompt: str | None = None,
        seed: int = 0,
        image_field: str = "_image",
        share_across_processes: bool = False,
    ) -> None:
        super().__init__(max_batch_size=batch_size)
        if not model_dir:
            raise ValueError("model_dir is required (a local Hugging Face BLIP-2/BLIP directory)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if batch_size < 1 or candidates < 1 or max_new_tokens < 1:
            raise ValueError(f"bad sizes: batch_size {batch_size}, candidates {candidates}, "
                             f"max_new_tokens {max_new_tokens}")
        if min_new_tokens is not None and not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens {min_new_tokens} not in 0..{max_new_tokens}")
        if num_beams is None:
            num_beams = 1 if do_sample else candidates
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if num_beams > 1 and num_beams < candidates:
            raise ValueError(f"beam search returns at most num_beams ({num_beams}) candidates; "
                             f"{candidates} asked for")
        if num_beams == 1 and not do_sample and candidates > 1:
            raise ValueError("greedy decoding (num_beams=1, do_sample=False) gives one caption: "
                             "use candidates=1, beams, or do_sample")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self._model_dir = model_dir
        self._precision = precision
        self._device = device
        self._batch_size = batch_size
        self._k = candidates
        self._num_beams = num_beams
        self._do_sample = do_sample
        self._top_p = top_p
        self._temperature = temperature
        self._max_new_tokens = max_new_tokens
        self._min_new_tokens = min_new_tokens
        self._prompt = prompt or None
        self._seed = seed
        self._image_field = image_field
        self._share = share_across_processes

    @property
    def candidates(self) -> int:
        return self._k

    # ---- ModelHandler -----------------------------------------------------------------------
    def load_model(self) -> LoadedCaptioner:
        from transformers import (
            AutoImageProcessor,
            AutoTokenizer,
            Blip2ForConditionalGeneration,
            BlipForConditionalGeneration,
        )

        local = local_model_dir(self._model_dir)
        family = model_family(local)
        dev = resolve_device(self._device)
        dtype = effective_dtype(self._precision, dev)
        cls = Blip2ForConditionalGeneration if family == "blip-2" else BlipForConditionalGeneration
        model = cls.from_pretrained(local, local_files_only=True, dtype=dtype)
        model.to(dev).eval()
        image_processor = AutoImageProcessor.from_pretrained(local, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
        input_ids, prefix_len = self._prompt_ids(model, tokenizer, family)
        log.info("HFCaptioner: %s (%s) on %s, %s, batch size %d, %d candidates, %s",
                 self._model_dir, family, dev, str(dtype).removeprefix("torch."),
                 self._batch_size, self._k,
                 "sampling" if self._do_sample else f"{self._num_beams} beams")
        return LoadedCaptioner(model, image_processor, tokenizer, family, dev, dtype, input_ids,
                               prefix_len)

    def _prompt_ids(self, model: Any, tokenizer: Any, family: str) -> tuple[list[int] | None,
                                                                             int]:
        """(input ids fed to ``generate``, how many output tokens are prompt, not caption)."""
        text = self._prompt or ""
        if family == "blip-2":
            cfg = model.config
            image_token = getattr(cfg, "image_token_index", None)
            if image_token is None:
                raise ValueError(
                    f"{self._model_dir}: config.json has no image_token_index. This is an old "
                    "BLIP-2 export; re-download the model (its current config and processor "
                    "add the <image> placeholder token) or add the token and the index.")
            ids = [int(image_token)] * int(cfg.num_query_tokens)
            ids += tokenizer(text, add_special_tokens=True)["input_ids"]
            # decoder-only LMs return prompt + caption; encoder-decoders the caption only
            return ids, (0 if cfg.use_decoder_only_language_model is False else len(ids))
        if not text:
            return None, 1  # BLIP starts from [bos] and returns it
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        return ids, len(ids) - 1  # BLIP swaps [CLS] for bos and drops the final [SEP]

    def run_inference(
        self,
        batch: Sequence[Record],
        model: LoadedCaptioner,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        captions = self.caption(batch, model)
        return [PredictionResult(example=rec, inference=c, model_id=self._model_dir)
                for rec, c in zip(batch, captions, strict=True)]

    def get_num_bytes(self, batch: Sequence[Record]) -> int:
        return sum(len(rec.get(self._image_field) or b"") for rec in batch)

    def get_metrics_namespace(self) -> str:
        return self.metrics_namespace

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"max_batch_size": self._batch_size}

    def share_model_across_processes(self) -> bool:
        return self._share

    # ---- captioning -------------------------------------------------------------------------
    def caption(self, batch: Sequence[Record], model: LoadedCaptioner) -> list[list[str] | None]:
        """Per record: K caption strings, or None (undecodable image / the model failed)."""
        images, ok = [], []
        for i, rec in enumerate(batch):
            try:
                images.append(decode_image(rec[self._image_field]))
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - any undecodable payload is a per-record fault
                Metrics.counter(self.metrics_namespace, "undecodable_images").inc()
                log.warning("HFCaptioner: cannot decode %s: %s", rec.get("key"), e)
        out: list[list[str] | None] = [None] * len(batch)
        if not images:
            return out
        keys = [record_key(batch[i], self._image_field) for i in ok]
        try:
            got = self._generate(images, keys, model, pad_to=self._batch_size)
        except Exception as e:  # noqa: BLE001 - isolate the record(s) that make the model fail
            log.warning("HFCaptioner: batch of %d failed (%s); captioning one by one",
                        len(images), e)
            got = []
            for im, key in zip(images, keys, strict=True):
                try:
                    got.append(self._generate([im], [key], model, pad_to=1)[0])
                except Exception as e1:  # noqa: BLE001
                    Metrics.counter(self.metrics_namespace, "caption_failures").inc()
                    log.warning("HFCaptioner: model failed on %s: %s", key, e1)
                    got.append(None)
        for i, caps in zip(ok, got, strict=True):
            out[i] = caps
        Metrics.counter(self.metrics_namespace, "captioned").inc(
            sum(c is not None for c in out))
        return out

    def generate_kwargs(self) -> dict[str, Any]:
        """The ``generate`` arguments (apart from inputs and the per-row sampler)."""
        kw: dict[str, Any] = {"max_new_tokens": self._max_new_tokens}
        if self._min_new_tokens is not None:
            kw["min_new_tokens"] = self._min_new_tokens
        if self._do_sample and self._num_beams == 1:
            # rows are expanded by us (K per record) and sampled by _PerRowSampler
            kw.update(do_sample=False, num_beams=1, num_return_sequences=1)
        else:
            kw.update(do_sample=self._do_sample, num_beams=self._num_beams,
                      num_return_sequences=self._k)
            if self._do_sample:
                if self._top_p is not None:
                    kw["top_p"] = self._top_p
                if self._temperature is not None:
                    kw["temperature"] = self._temperature
        return kw

    def _generate(self, images: list[Any], keys: list[str], model: LoadedCaptioner,
                  pad_to: int) -> list[list[str]]:
        n = len(images)
        with model.lock:  # the image processor and tokenizer are not thread-safe
            pixels = model.image_processor(images, return_tensors="pt")["pixel_values"]
        if n < pad_to:  # same shapes every call: see the module docstring
            pixels = torch.cat([pixels, pixels[:1].expand(pad_to - n, *pixels.shape[1:])])
        rows = pixels.shape[0]
        per_row_sampling = self._do_sample and self._num_beams == 1
        kw = self.generate_kwargs()
        expand = self._k if per_row_sampling else 1
        if expand > 1:
            pixels = pixels.repeat_interleave(expand, dim=0)
        pixels = pixels.to(device=model.device, dtype=model.dtype)
        inputs: dict[str, Any] = {"pixel_values": pixels}
        if model.input_ids is not None:
            ids = torch.tensor([model.input_ids], dtype=torch.long, device=model.device)
            inputs["input_ids"] = ids.expand(pixels.shape[0], -1).clone()
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if per_row_sampling:
            gens = []
            for r in range(rows):
                key = keys[r] if r < n else keys[0]  # padding rows copy the first record
                for j in range(self._k):
                    gens.append(torch.Generator().manual_seed(record_seed(self._seed, key, j)))
            kw["logits_processor"] = [_PerRowSampler(gens, self._temperature, self._top_p)]
        with torch.inference_mode():
            if self._do_sample and not per_row_sampling:
                batch_seed = stable_hash(f"{self._seed}\x1f" + "\x1f".join(keys))
                devices = [model.device] if model.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(batch_seed & ((1 << 63) - 1))
                    seqs = model.model.generate(**inputs, **kw)
            else:
                seqs = model.model.generate(**inputs, **kw)
        seqs = self._strip_prompt(seqs, inputs.get("input_ids"), model)
        with model.lock:
            texts = model.tokenizer.batch_decode(seqs[: n * self._k].cpu(),
                                                 skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return [texts[i * self._k:(i + 1) * self._k] for i in range(n)]

    @staticmethod
    def _strip_prompt(seqs: torch.Tensor, input_ids: torch.Tensor | None,
                      model: LoadedCaptioner) -> torch.Tensor:
        """The generated tokens without the prompt tokens ``generate`` echoes back."""
        p = model.prefix_len
        if p == 0:
            return seqs
        if model.family == "blip-2" and input_ids is not None:
            head = seqs[:, :p]
            # only cut what is really the echoed prompt (versions differ on echoing)
            if head.shape[1] == p and torch.equal(head, input_ids[:1].expand_as(head)):
                return seqs[:, p:]
            return seqs
        return seqs[:, p:]
