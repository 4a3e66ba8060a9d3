"""Training data: webdataset shards → deterministic, resumable batches of (image, tokens).

The stream a data worker reads is a pure function of ``(seed, rank, worker)``; a checkpoint
stores, per rank and worker, how far into that stream training got, and a resumed run
fast-forwards there (reading but not decoding the skipped samples). How the stream is built::

    shard list (one per subset)          ``expand_urls``: a build output dir → ``shards/*.tar``,
        │                                 globs, brace ranges, URLs, ``pipe:`` commands
        ▼
    resampled shard draws                draw i of global worker g: Random(f"{seed}/{g}/{i}")
        │                                 picks a subset by the ``--mix`` weights, then a shard
        ▼                                 of that subset (with replacement: an infinite stream)
    split by node and worker             a subset with ≥ G shards (G = world × workers) is split
        │                                 shard-wise (global worker g owns shards g, g+G, ...);
        ▼                                 a smaller one sample-wise (sample j of each shard goes
    samples (url_opener → tar expander    to worker j mod G), so ranks never see the same
      → group_by_keys)                    sample even when the corpus is one shard
        ▼
    seeded shuffle buffer                Random(f"{seed}/{g}/shuffle")
        ▼
    position p = 0, 1, 2, ...            ── resume skips positions < saved position here ──
        ▼
    decode + RS augment + tokenize       augmentation RNG = Random(f"{seed}/{g}/aug/{p}");
        ▼                                 a sample that fails (corrupt JPEG, missing text) is
    batches (in the worker)              skipped, warned about and counted, never fatal

``torch.utils.data.DataLoader`` hands batches out round-robin over its workers, so which
worker's stream produced training batch b is fixed too (a resumed loader rotates its workers'
stream ids by the number of batches already consumed, so the round-robin carries on): the whole run is a deterministic
function of (seed, step, rank) for a fixed world size and worker count. A resume with a
different world size or worker count starts fresh streams (logged) rather than guessing.

Captions longer than the text encoder's context are counted with the model's own tokenizer
*before* truncation (``n_over_context`` / ``n_captions`` per batch; the trainer reports them).

**Several captions per sample.** ``{key}.txt`` is the primary caption (what open_clip's own
trainer reads); ``{key}.json`` holds every candidate in ``captions``. With
``caption_choice="random"`` the k-th visit of a sample trains on caption ``(h(seed, key) + k)
mod n``: a random start per sample, then the next caption at each visit, so any ``n`` visits
use every caption. A sample's visit count is how many times its worker has drawn its shard
(counted in the stream itself), so the choice is a function of (seed, key, stream position)
and a resumed run, which replays the stream up to where it stopped, draws the same captions.
``"first"`` (the default) trains on ``{key}.txt``.

**Counterfactual counts** (``counterfactuals=K``, the trainer's ``--count-loss``): each
caption that states a count of 1..10 objects also yields ``K`` twins with other counts
(``trainer/counts.py``; the count and the new values drawn from ``(seed, stream, position)``),
batched as ``cf_text`` ``[B, K, context]`` with ``cf_mask`` marking the rows that have them.

**Build folders.** A build output folder (``shards/`` beside ``stats.json``) is read only when
its ``stats.json`` exists and has our schema's major version: a build that failed or was
killed leaves no ``stats.json``, and its shards may not match its sizes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from pipelines.image_guard import open_rgb
from trainer.counts import counterfactual_twins, soft_targets

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://")

# per-process counter of samples skipped by the handler (each DataLoader worker has its own;
# batches carry the worker's running total to the trainer)
_ERRORS = {"count": 0}


def warn_and_count(exn: BaseException) -> bool:
    """webdataset handler: log the error, count it, and continue with the next sample."""
    _ERRORS["count"] += 1
    n = _ERRORS["count"]
    if n <= 10 or n % 100 == 0:
        log.warning("skipping a corrupt sample (%d so far in this worker): %r", n, exn)
    return True


# --------------------------------------------------------------------------------------- urls


def _is_remote(s: str) -> bool:
    return s.startswith(_REMOTE) or "://" in s


BUILD_HINT = "run `make build-rs5m` (or give --data a build folder, a glob or a brace range)"


def check_build_folder(folder: str) -> None:
    """Refuse a build folder whose build did not complete (no ``stats.json``) or that another
    major schema version wrote."""
    from schemas import check_doc_version

    stats = os.path.join(folder, "stats.json")
    if not os.path.isfile(stats):
        raise FileNotFoundError(
            f"{folder} has no stats.json: its build did not complete (failed or killed), so "
            f"its shards and sizes may disagree; {BUILD_HINT}")
    with open(stats, encoding="utf-8") as f:
        check_doc_version(json.load(f), stats)


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs of ``spec``: ``::``-separated (open_clip style) entries, each a build output
    directory (→ its ``shards/*.tar``, once its ``stats.json`` says it completed), a directory
    of tars, a local glob, a brace range (``a-{00000..00009}.tar``), a URL or a ``pipe:``
    command. A local entry that names nothing is an error that says what to run."""
    from braceexpand import braceexpand

    entries = [spec] if isinstance(spec, str) else list(spec)
    parts = [p for e in entries for p in str(e).split("::") if p]
    urls: list[str] = []
    for part in parts:
        if _is_remote(part):
            urls.extend(braceexpand(part))
            continue
        if os.path.isdir(part):
            sub = os.path.join(part, "shards")
            is_build = os.path.isdir(sub) or any(
                os.path.exists(os.path.join(part, n)) for n in ("stats.json", "manifest.json"))
            if is_build:
                check_build_folder(part)
            d = sub if os.path.isdir(sub) else part
            found = sorted(glob.glob(os.path.join(d, "*.tar")))
            if not found:
                raise FileNotFoundError(f"no shards in {part} (no *.tar in {d}): {BUILD_HINT}")
            urls.extend(found)
            continue
        for p in braceexpand(part):
            hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
            if not hits or not all(os.path.isfile(h) for h in hits):
                missing = p if not hits else next(h for h in hits if not os.path.isfile(h))
                raise FileNotFoundError(f"no shards in {missing}: {BUILD_HINT}")
            urls.extend(hits)
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def subset_of(url: str) -> str:
    """The subset a shard belongs to: its file name up to the last ``-`` (``pub11-00003.tar``)."""
    name = url.rstrip("/").split("/")[-1].split()[-1]
    stem = name.split(".")[0]
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


def parse_mix(mix: str | None) -> dict[str, float] | None:
    """``"pub11=0.6,rs3=0.4"`` → ``{"pub11": 0.6, "rs3": 0.4}``."""
    if not mix:
        return None
    out: dict[str, float] = {}
    for item in mix.split(","):
        name, _, w = item.partition("=")
        if not name or not w:
            raise ValueError(f"--mix wants subset=weight[,subset=weight...], got {mix!r}")
        out[name.strip()] = float(w)
        if out[name.strip()] < 0:
            raise ValueError("mix weights must be >= 0")
    return out


def dataset_size(urls: Sequence[str]) -> int | None:
    """Total sample count from the ``sizes.json`` files beside local shards (None if unknown)."""
    total = 0
    cache: dict[str, dict] = {}
    for u in urls:
        if _is_remote(u):
            return None
        d, name = os.path.split(os.path.abspath(u))
        if d not in cache:
            p = os.path.join(d, "sizes.json")
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as f:
                    cache[d] = json.load(f)
            else:
                cache[d] = {}
        if name not in cache[d]:
            return None
        total += int(cache[d][name])
    return total


# ------------------------------------------------------------------------------- the stream


@dataclass
class StreamConfig:
    urls: list[str]
    batch_size: int
    seed: int = 0
    #: "first": the primary caption ({key}.txt); "random": one of the row's ``captions`` per
    #: visit, (h(seed, key) + visit) mod n (see the module docstring)
    caption_choice: str = "first"
    rank: int = 0
    world_size: int = 1
    mix: dict[str, float] | None = None
    shuffle_buffer: int = 256
    # per worker stream: first stream position still to train on (resume)
    start_positions: dict[int, int] = field(default_factory=dict)
    # batches this rank already consumed: DataLoader worker w of a resumed run plays stream
    # (w + consumed) mod workers, so the round-robin continues where the interrupted run was
    batches_consumed: int = 0
    log_keys: bool = False
    #: also batch this many counterfactual-count twins of each caption that states a count
    counterfactuals: int = 0
    #: > 0: batch ``cf_target``, the count loss's soft target (``counts.soft_targets``)
    count_sigma: float = 0.0


@dataclass
class _Plan:
    subsets: list[str]
    weights: list[float]
    shards: dict[str, list[str]]
    modulo: dict[str, tuple[int, int] | None]  # subset → (g, G) sample-wise split, or None


def plan_shards(urls: Sequence[str], mix: dict[str, float] | None, g: int, G: int) -> _Plan:
    """Which shards global worker ``g`` of ``G`` reads, per subset, and how they are split."""
    by_subset: dict[str, list[str]] = {}
    for u in urls:
        by_subset.setdefault(subset_of(u), []).append(u)
    if mix:
        unknown = set(mix) - set(by_subset)
        if unknown:
            raise ValueError(f"--mix names subsets with no shards: {sorted(unknown)} "
                             f"(have {sorted(by_subset)})")
        subsets = [s for s in sorted(by_subset) if mix.get(s, 0) > 0]
        weights = [mix[s] for s in subsets]
    else:  # proportional to shard count
        subsets = sorted(by_subset)
        weights = [float(len(by_subset[s])) for s in subsets]
    if not subsets:
        raise ValueError("every subset has weight 0")
    shards, modulo = {}, {}
    for s in subsets:
        lst = by_subset[s]
        if len(lst) >= G:
            shards[s], modulo[s] = lst[g::G], None
        else:
            shards[s], modulo[s] = list(lst), (g, G)
    return _Plan(subsets, weights, shards, modulo)


def _shard_samples(url: str, handler: Callable) -> Iterator[dict[str, Any]]:
    from webdataset import tariterators

    src = tariterators.url_opener([{"url": url}], handler=handler)
    files = tariterators.tar_file_expander(src, handler=handler)
    yield from tariterators.group_by_keys(files, handler=handler)


def raw_stream(plan: _Plan, seed: int, g: int, handler: Callable = warn_and_count
               ) -> Iterator[dict[str, Any]]:
    """Infinite resampled stream of undecoded samples of global worker ``g``; each sample
    carries ``__visit__``: how many times before this worker drew the sample's shard."""
    draw = empty = 0
    visits: dict[str, int] = {}
    while True:
        rng = random.Random(f"{seed}/{g}/{draw}")
        subset = rng.choices(plan.subsets, weights=plan.weights)[0]
        url = rng.choice(plan.shards[subset])
        mod = plan.modulo[subset]
        visit = visits.get(url, 0)
        visits[url] = visit + 1
        n = 0
        for j, sample in enumerate(_shard_samples(url, handler)):
            if mod is not None and j % mod[1] != mod[0]:
                continue
            n += 1
            sample["__subset__"] = subset
            sample["__visit__"] = visit
            yield sample
        empty = empty + 1 if n == 0 else 0
        if empty >= 100:
            raise RuntimeError(f"100 shard draws in a row gave no samples (last: {url})")
        draw += 1


def seeded_shuffle(it: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer whose output order is a function of the input order and ``rng``."""
    if size <= 1:
        yield from it
        return
    buf: list[Any] = []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        out, buf[i] = buf[i], x
        yield out
    rng.shuffle(buf)
    yield from buf


class CaptionTokenizer:
    """Tokenize captions to ``[context_length]`` and report each caption's untruncated length."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.context_length = int(getattr(tokenizer, "context_length", 77))
        # open_clip's SimpleTokenizer: one BPE pass gives both the length and the tokens
        self._fast = (
            hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id")
            and getattr(tokenizer, "reduction_fn", None) is None
        )

    def __call__(self, text: str) -> tuple[torch.Tensor, int]:
        if self._fast:
            tok = self.tokenizer
            ids = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
            n = len(ids)
            if n > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = tok.eot_token_id
            out = torch.zeros(self.context_length, dtype=torch.long)
            out[: len(ids)] = torch.tensor(ids)
            return out, n
        tokens = self.tokenizer([text])[0]
        inner = getattr(self.tokenizer, "tokenizer", None)  # HF tokenizers
        n = len(inner(text)["input_ids"]) if inner is not None else int((tokens != 0).sum())
        return tokens, n


def caption_index(seed: int, key: str, visit: int, n: int) -> int:
    """Which of ``n`` captions the ``visit``-th visit of ``key`` trains on: a per-sample random
    start, then the next one each visit (any n visits use every caption)."""
    import hashlib

    start = int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(),
                           "big")
    return (start + int(visit)) % n


def choose_caption(sample: dict[str, Any], choice: str = "first", seed: int = 0) -> str:
    """The caption a visit of ``sample`` trains on (``caption_choice``)."""
    if "txt" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no txt")
    primary = sample["txt"].decode("utf-8")
    if choice == "first" or "json" not in sample:
        return primary
    captions = json.loads(sample["json"]).get("captions") or []
    captions = [c for c in captions if isinstance(c, str) and c]
    if len(captions) < 2:
        return primary
    return captions[caption_index(seed, sample["__key__"], sample.get("__visit__", 0),
                                  len(captions))]


def _decode(sample: dict[str, Any], choice: str = "first", seed: int = 0
            ) -> tuple[Image.Image, str]:
    img_bytes = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if img_bytes is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image")
    text = choose_caption(sample, choice, seed)
    # shards are input too: the same format allow-list and bomb guards as the pipelines
    return open_rgb(img_bytes), text


class ShardBatches(torch.utils.data.IterableDataset):
    """Batches of one rank's stream; each DataLoader worker reads its own sub-stream."""

    def __init__(self, cfg: StreamConfig, augment: Callable[[Image.Image, random.Random], Any],
                 tokenizer: Any):
        super().__init__()
        self.cfg = cfg
        self.augment = augment
        self.tok = CaptionTokenizer(tokenizer)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        cfg = self.cfg
        w = (w + cfg.batches_consumed) % nw
        g, G = cfg.rank * nw + w, cfg.world_size * nw
        plan = plan_shards(cfg.urls, cfg.mix, g, G)
        if info is not None:  # a data worker: leave the cores to the training process
            torch.set_num_threads(1)
        stream = seeded_shuffle(raw_stream(plan, cfg.seed, g), cfg.shuffle_buffer,
                                random.Random(f"{cfg.seed}/{g}/shuffle"))
        start = int(cfg.start_positions.get(w, 0))
        _ERRORS["count"] = 0
        images, texts, keys, cfs, targets = [], [], [], [], []
        k = int(cfg.counterfactuals)
        no_cf = torch.zeros(k, self.tok.context_length, dtype=torch.long)
        hard = torch.zeros(k + 1)
        hard[0] = 1.0
        n_over = n_caps = 0
        for pos, sample in enumerate(stream):
            if pos < start:  # resume: fast-forward without decoding
                continue
            try:
                img, text = _decode(sample, cfg.caption_choice, cfg.seed)
                x = self.augment(img, random.Random(f"{cfg.seed}/{g}/aug/{pos}"))
                tokens, n_tok = self.tok(text)
                true, cf = (counterfactual_twins(text, random.Random(f"{cfg.seed}/{g}/cf/{pos}"),
                                                 k) if k else (0, []))
                cf_tokens = torch.stack([self.tok(c)[0] for c, _ in cf]) if cf else None
                target = (torch.tensor(soft_targets(true, [v for _, v in cf], cfg.count_sigma))
                          if cf and cfg.count_sigma > 0 else hard)
            except Exception as exn:  # noqa: BLE001 - corrupt data must not kill a run
                warn_and_count(exn)
                continue
            images.append(x)
            texts.append(tokens)
            keys.append(sample["__key__"])
            cfs.append(cf_tokens)
            targets.append(target)
            n_caps += 1
            n_over += int(n_tok > self.tok.context_length)
            if len(images) == cfg.batch_size:
                batch = {
                    "image": torch.stack(images),
                    "text": torch.stack(texts),
                    "keys": keys if cfg.log_keys else [],
                    "worker": w,
                    "next_position": pos + 1,
                    "n_errors": _ERRORS["count"],
                    "n_over_context": n_over,
                    "n_captions": n_caps,
                }
                if k:
                    batch["cf_text"] = torch.stack([no_cf if c is None else c for c in cfs])
                    batch["cf_mask"] = torch.tensor([c is not None for c in cfs])
                    if cfg.count_sigma > 0:
                        batch["cf_target"] = torch.stack(targets)
                yield batch
                images, texts, keys, cfs, targets = [], [], [], [], []
                n_over = n_caps = 0


def _collate(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def make_loader(cfg: StreamConfig, augment: Callable, tokenizer: Any, workers: int
                ) -> torch.utils.data.DataLoader:
    ds = ShardBatches(cfg, augment, tokenizer)
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, collate_fn=_collate,
        persistent_workers=False, prefetch_factor=2 if workers > 0 else None,
    )


class DataState:
    """What the trainer knows about how far each worker's stream has been consumed."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.next_position: dict[int, int] = {}
        self.errors: dict[int, int] = {}
        self.errors_before = 0  # skipped in earlier runs (before a resume)
        self.n_over_context = 0
        self.n_captions = 0

    def update(self, batch: dict[str, Any]) -> None:
        w = int(batch["worker"])
        self.next_position[w] = int(batch["next_position"])
        self.errors[w] = int(batch["n_errors"])
        self.n_over_context += int(batch["n_over_context"])
        self.n_captions += int(batch["n_captions"])

    @property
    def n_errors(self) -> int:
        return self.errors_before + sum(self.errors.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "next_position": {str(k): v for k, v in self.next_position.items()},
            "n_errors": self.n_errors,
            "n_over_context": self.n_over_context,
            "n_captions": self.n_captions,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.next_position = {int(k): int(v) for k, v in sd.get("next_position", {}).items()}
        self.errors = {}
        self.errors_before = int(sd.get("n_errors", 0))
        self.n_over_context = int(sd.get("n_over_context", 0))
        self.n_captions = int(sd.get("n_captions", 0))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.data SPEC``: check that ``SPEC`` names readable shards (what
    ``make train`` runs before starting torchrun), in one line either way."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m trainer.data SHARDS (a build folder, glob, brace range...)")
        return 2
    try:
        urls = expand_urls(args[0])
    except (FileNotFoundError, ValueError) as e:
        print(f"train: {e}")
        return 2
    n = dataset_size(urls)
    print(f"train: {len(urls)} shards in {args[0]}" + (f", {n} samples" if n is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
