"""Train an open_clip model on rs-corpus shards (torchrun DDP, or one process).

    torchrun --standalone --nproc_per_node=2 -m trainer.train --data out/rs5m --output out/train
    python -m trainer.train --data out/rs5m --steps 200          # world size 1, no torchrun
    make train [DATA=out/rs5m] [OUTPUT=out/train] [NPROC=1] [ARGS='--steps 300 --peft lora']

DDP uses nccl on GPU and gloo on CPU. Writes, under ``--output``::

    checkpoints/latest.pt, step_N.pt   see trainer/checkpoint.py (open_clip-loadable state_dict)
    checkpoints/merged.pt              LoRA runs: the merged model as a plain open_clip checkpoint
    model/open_clip_config.json        the model's config in open_clip's hub layout (+ weights
                                       at the end), so ``local-dir:OUTPUT/model`` loads it
    metrics.jsonl, tb/, summary.json   loss, lr, logit scale, samples/s, skipped samples,
                                       captions longer than the text context

``--resume latest`` continues model, optimiser, grad scaler, schedule, step and data position;
the data order is a deterministic function of (seed, step, rank) (see trainer/data.py), so with
``--deterministic`` a resumed run repeats an uninterrupted run's losses exactly.
Flags accept dashes or underscores (``--batch-size`` / ``--batch_size``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_mod
from .augment import RSAugment
from .data import DataState, StreamConfig, dataset_size, expand_urls, make_loader, parse_mix
from .loss import LOSSES, build_loss, clamp_logit_scale, contrastive_loss, forward_counting
from .model import PEFT_KINDS, build_model, count_parameters, plain_state_dict
from .optim import build_optimizer, cosine_lr, set_lr

log = logging.getLogger("trainer")

DEFAULT_MODEL = "data/demo/models/tiny-clip"
PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_fp16")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name: str, **kw: Any) -> None:
        names = [name]
        if "-" in name[2:]:
            names.append("--" + name[2:].replace("-", "_"))
        ap.add_argument(*names, **kw)

    # --- data
    add("--data", default="out/rs5m",
        help="shards: a build output dir (→ shards/*.tar), dir, glob, brace range, URL or pipe:; "
             "several joined with '::'")
    add("--mix", default=None, help="subset weights, e.g. pub11=0.6,rs3=0.4 (default: by shards)")
    add("--caption-choice", default="first", choices=["first", "random"],
        help="first: the primary caption ({key}.txt); random: one of the sample's captions "
             "per visit, the next one at each visit (resume-exact)")
    add("--workers", type=int, default=1, help="DataLoader workers per rank")
    add("--shuffle-buffer", type=int, default=256)
    add("--aug-rotate-any", action="store_true", help="also rotate by an arbitrary angle")
    add("--aug-scale-min", type=float, default=0.5, help="random resized crop: min area")
    add("--no-aug", action="store_true", help="disable RS augmentations (resize + crop only)")
    add("--log-keys", action="store_true", help="write the keys each rank consumed to keys/")
    # --- model
    add("--model", default=DEFAULT_MODEL, help="arch name or local open_clip dir / local-dir:DIR")
    add("--pretrained", default=None, help="local checkpoint file (else dir weights / random)")
    add("--loss", default="clip", choices=LOSSES)
    add("--count-loss", type=float, default=0.0,
        help="weight of the counting loss (Paiss et al. 2023): captions stating a count of "
             "1..10 also train against twins with other counts (0: off)")
    add("--count-sigma", type=float, default=0.0,
        help="soft, ordinal target for the counting loss: weight exp(-(ln k - ln n)^2/2s^2) "
             "on a twin of count k for true count n (0: the true caption alone)")
    add("--count-negatives", type=int, default=1,
        help="counterfactual twins per counting caption, 1..9 (1: Paiss et al.; 9: every "
             "other count of 1..10)")
    add("--peft", default="none", choices=PEFT_KINDS)
    add("--lora-r", type=int, default=8)
    add("--lora-alpha", type=float, default=16.0)
    add("--lora-dropout", type=float, default=0.0)
    add("--adapter-dim", type=int, default=16)
    add("--export-merged", default=None,
        help="LoRA: write the merged model here (default OUTPUT/checkpoints/merged.pt)")
    add("--grad-checkpointing", action="store_true")
    # --- optimisation
    add("--batch-size", type=int, default=32, help="per rank, per accumulation step")
    add("--accum-freq", type=int, default=1,
        help="accumulate N batches into one contrastive batch (open_clip's feature caching)")
    add("--lr", type=float, default=1e-3)
    add("--wd", type=float, default=0.1)
    add("--beta1", type=float, default=0.9)
    add("--beta2", type=float, default=0.98)
    add("--eps", type=float, default=1e-6)
    add("--warmup", type=int, default=15, help="warmup steps")
    add("--epochs", type=float, default=None, help="passes over the data (needs sizes.json)")
    add("--steps", type=int, default=None, help="optimizer steps (default: 150, or --epochs)")
    add("--stop-at-step", type=int, default=None,
        help="stop (and checkpoint) at this step without changing the schedule")
    add("--grad-clip-norm", type=float, default=1.0)
    add("--precision", default="fp32", choices=PRECISIONS,
        help="amp = amp_fp16 on GPU (GradScaler); amp_bf16 also works on CPU")
    # --- run
    add("--output", default="out/train")
    add("--resume", default=None, help="'latest' or a checkpoint path")
    add("--seed", type=int, default=0)
    add("--device", default="auto", help="auto | cpu | cuda")
    add("--deterministic", action="store_true",
        help="torch.use_deterministic_algorithms(True) (exact resume on CPU)")
    add("--log-every", type=int, default=10, help="log every N steps (always step 1)")
    add("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    add("--no-step-files", action="store_true", help="keep only latest.pt")
    add("--no-progress", action="store_true", help="no tqdm bar")
    add("--threads", type=int, default=None,
        help="torch CPU threads per rank (CPU default: the cores split over ranks and their "
             "data workers, at least 1; oversubscribed BLAS threads are several times slower)")
    return ap


# ---------------------------------------------------------------------------- distributed


def init_distributed(device_arg: str) -> tuple[int, int, int, torch.device]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, local_rank, device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------- main


class Metrics:
    """JSONL + TensorBoard on rank 0."""

    def __init__(self, output: str, enabled: bool, fresh: bool):
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.path = os.path.join(output, "metrics.jsonl")
            if fresh and os.path.exists(self.path):  # a new run; a resumed one appends
                os.unlink(self.path)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output, "tb"))
            except Exception as exn:  # noqa: BLE001 - TB is optional
                log.warning("TensorBoard disabled: %r", exn)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def autocast_ctx(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "amp_bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a GPU (use amp_bf16 or fp32 on CPU)")
    return torch.autocast(device_type="cuda", dtype=torch.float16)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; return the run summary (also written to OUTPUT/summary.json)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", force=True,
    )
    for ours in ("trainer", "pipelines"):  # open_clip logs every step at INFO on the root logger
        logging.getLogger(ours).setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return run(argv)[0]


def run(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], Any]:
    """Train; return (summary, the trainer's ``BuiltModel``) — tests compare embeddings with it."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.count_loss < 0:
        ap.error("--count-loss must be >= 0")
    if not 1 <= args.count_negatives <= 9:
        ap.error("--count-negatives must be in 1..9")
    if args.count_sigma < 0:
        ap.error("--count-sigma must be >= 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    try:
        return _run(args)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.set_num_threads(saved[1])


def _run(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    rank, world, _, device = init_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        procs = world * (1 + max(0, args.workers))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(args.seed)
    out_dir = args.output
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    model_dir = os.path.abspath(os.path.join(out_dir, "model"))
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)

    # ---- model, optimiser, resume
    built = build_model(
        args.model, args.pretrained, device=device, loss=args.loss, peft=args.peft,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        adapter_dim=args.adapter_dim, grad_checkpointing=args.grad_checkpointing,
    )
    model = built.model
    trainable, total = count_parameters(model)
    resume_path = ckpt_mod.resolve_resume(args.resume, out_dir)
    ck = ckpt_mod.load_training_checkpoint(resume_path) if resume_path else None
    if ck is not None:
        model.load_state_dict(ck.get("train_state_dict") or ck["state_dict"], strict=True)
    opt = build_optimizer(model, args.lr, args.wd, (args.beta1, args.beta2), args.eps)
    use_scaler = args.precision in ("amp", "amp_fp16")
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    step = 0
    samples_seen = 0
    if ck is not None:
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step = int(ck["step"])
        samples_seen = int(ck.get("samples_seen", 0))
        log.info("resumed from %s at step %d", resume_path, step)
    elif args.resume:
        log.info("--resume %s: no checkpoint yet, starting fresh", args.resume)
    if rank == 0:
        ckpt_mod.write_model_dir(model_dir, built.model_cfg, built.preprocess_cfg,
                                 {"architecture": built.arch, "trained_from": args.model})
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = ddp if ddp is not None else model
    loss_fn = build_loss(args.loss, rank, world)

    # ---- data
    urls = expand_urls(args.data)
    n_data = dataset_size(urls)
    per_step = args.batch_size * world * args.accum_freq
    if args.steps is not None:
        total_steps = args.steps
    elif args.epochs is not None:
        if n_data is None:
            raise ValueError("--epochs needs sizes.json beside the shards; pass --steps")
        total_steps = max(1, math.ceil(args.epochs * n_data / per_step))
    else:
        total_steps = 150
    stop_at = min(total_steps, args.stop_at_step or total_steps)
    data_state = DataState(args.workers)
    start_positions: dict[int, int] = {}
    if ck is not None and ck.get("data_state"):
        ds = ck["data_state"]
        if int(ds["world_size"]) == world and int(ds["workers"]) == max(1, args.workers):
            data_state.load_state_dict(ds["ranks"][rank])
            start_positions = dict(data_state.next_position)
        else:
            log.warning("checkpoint data state is for world %s × %s workers, not %d × %d: "
                        "starting fresh data streams", ds["world_size"], ds["workers"], world,
                        max(1, args.workers))
    info = built.preprocess_cfg
    image_size = built.model_cfg["vision_cfg"].get("image_size", 224)
    augment = RSAugment(
        image_size, info["mean"], info["std"],
        scale=(args.aug_scale_min, 1.0) if not args.no_aug else (1.0, 1.0),
        rot90=not args.no_aug, hflip=not args.no_aug, vflip=not args.no_aug,
        rotate_any=args.aug_rotate_any, interpolation=info.get("interpolation", "bicubic"),
    )
    stream = StreamConfig(urls=urls, batch_size=args.batch_size, seed=args.seed,
                          caption_choice=args.caption_choice, rank=rank,
                          world_size=world, mix=parse_mix(args.mix),
                          shuffle_buffer=args.shuffle_buffer, start_positions=start_positions,
                          batches_consumed=step * args.accum_freq if start_positions else 0,
                          log_keys=args.log_keys,
                          counterfactuals=args.count_negatives if args.count_loss > 0 else 0,
                          count_sigma=args.count_sigma if args.count_loss > 0 else 0.0)
    loader = make_loader(stream, augment, built.tokenizer, args.workers)
    log.info("data: %d shards (%s samples), world %d × batch %d × accum %d = %d samples/step; "
             "%d steps; %d/%d parameters trainable", len(urls), n_data, world, args.batch_size,
             args.accum_freq, per_step, total_steps, trainable, total)

    metrics = Metrics(out_dir, rank == 0, fresh=ck is None)
    keys_file = None
    if args.log_keys:
        os.makedirs(os.path.join(out_dir, "keys"), exist_ok=True)
        keys_file = open(  # noqa: SIM115 - open for the whole run, closed after the loop
            os.path.join(out_dir, "keys", f"rank{rank}.txt"), "a", encoding="utf-8")

    def epoch_of(n: int) -> int:
        return int(n // n_data) if n_data else 0

    def save(at_step: int) -> str | None:
        states = all_gather_objects(data_state.state_dict(), world)
        path = None
        if rank == 0:
            obj = {
                "state_dict": plain_state_dict(built),
                "model": model_dir,
                "arch": built.arch,
                "step": at_step,
                "epoch": epoch_of(samples_seen),
                "samples_seen": samples_seen,
                "peft": args.peft,
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None,
                "data_state": {"world_size": world, "workers": max(1, args.workers),
                               "ranks": states},
                "args": {k: v for k, v in vars(args).items()},
                "trainer": "rs-corpus trainer.train",
            }
            if args.peft in ("lora", "adapter"):
                obj["train_state_dict"] = ckpt_mod.cpu_state_dict(model.state_dict())
            path = ckpt_mod.save_training_checkpoint(obj, ckpt_dir, at_step,
                                                     keep_step_files=not args.no_step_files)
        barrier()
        return path

    # ---- loop
    pbar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        pbar = tqdm(total=stop_at, initial=step, desc="train", dynamic_ncols=True)
    it = iter(loader)
    t0 = time.time()
    t_last, step_last = time.time(), step
    first_loss = last_loss = None
    saved_at = -1
    while step < stop_at:
        lr = cosine_lr(step, args.lr, args.warmup, total_steps)
        set_lr(opt, lr)
        batches = [next(it) for _ in range(args.accum_freq)]
        for b in batches:
            data_state.update(b)
            if keys_file is not None:
                keys_file.write("".join(f"{step + 1}\t{k}\n" for k in b["keys"]))
        imgs = [b["image"].to(device, non_blocking=True) for b in batches]
        txts = [b["text"].to(device, non_blocking=True) for b in batches]
        cf_txts = [b["cf_text"].to(device, non_blocking=True) if "cf_text" in b else None
                   for b in batches]
        cf_masks = [b["cf_mask"].to(device) if "cf_mask" in b else None for b in batches]
        cf_tgts = [b["cf_target"].to(device) if "cf_target" in b else None for b in batches]
        cnt_val = 0.0
        opt.zero_grad(set_to_none=True)
        if args.accum_freq == 1:
            with autocast_ctx(args.precision, device):
                out, cnt = forward_counting(fwd, imgs[0], txts[0], cf_txts[0], cf_masks[0],
                                            cf_tgts[0])
                loss = contrastive_loss(loss_fn, out)
                if cnt is not None:
                    cnt_val = float(cnt.detach())
                    loss = loss + args.count_loss * cnt
            scaler.scale(loss).backward()
        else:
            # open_clip's accumulation: cache every micro-batch's features without grad, then
            # recompute each with grad against the cached rest (one big contrastive batch)
            with torch.no_grad(), autocast_ctx(args.precision, device):
                cached = [fwd(i, t) for i, t in zip(imgs, txts, strict=True)]
            for j in range(args.accum_freq):
                sync = (ddp.no_sync() if ddp is not None and j < args.accum_freq - 1
                        else contextlib.nullcontext())
                with sync, autocast_ctx(args.precision, device):
                    out, cnt = forward_counting(fwd, imgs[j], txts[j], cf_txts[j], cf_masks[j],
                                                cf_tgts[j])
                    feats = {
                        k: torch.cat([out[k] if i == j else c[k] for i, c in enumerate(cached)])
                        for k in ("image_features", "text_features")
                    }
                    feats["logit_scale"] = out["logit_scale"]
                    feats["logit_bias"] = out.get("logit_bias")
                    loss = contrastive_loss(loss_fn, feats)
                    if cnt is not None:  # this micro-batch's share of the mean
                        cnt_val += float(cnt.detach()) / args.accum_freq
                        loss = loss + args.count_loss * cnt / args.accum_freq
                scaler.scale(loss).backward()
        if args.grad_clip_norm and args.grad_clip_norm > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], args.grad_clip_norm)
        scaler.step(opt)
        scaler.update()
        clamp_logit_scale(model)
        step += 1
        samples_seen += per_step
        loss_val = float(loss.detach())
        if pbar is not None:
            pbar.update(1)
        if step == 1 or step % args.log_every == 0 or step == stop_at:
            sums = all_reduce_sum(
                [loss_val, data_state.n_errors, data_state.n_over_context, data_state.n_captions,
                 cnt_val], world, device)
            now = time.time()
            sps = (step - step_last) * per_step / max(1e-9, now - t_last)
            t_last, step_last = now, step
            row = {
                "step": step, "epoch": samples_seen / n_data if n_data else None,
                "samples_seen": samples_seen, "loss": sums[0] / world, "lr": lr,
                "logit_scale": float(model.logit_scale.detach().exp().mean()),
                "samples_per_s": sps, "skipped_samples": int(sums[1]),
                "captions_over_context": int(sums[2]), "captions": int(sums[3]),
                "wall_s": now - t0,
            }
            if args.count_loss > 0:
                row["count_loss"] = sums[4] / world
            if first_loss is None:
                first_loss = row["loss"]
            last_loss = row["loss"]
            metrics.write(row)
            if pbar is not None:
                pbar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{sps:.1f}")
        if step % args.save_every == 0 or step == stop_at:
            save(step)
            saved_at = step
    if saved_at != step:
        save(step)
    if pbar is not None:
        pbar.close()
    wall = time.time() - t0
    if keys_file is not None:
        keys_file.close()

    # ---- reports and exports
    sums = all_reduce_sum([data_state.n_errors, data_state.n_over_context, data_state.n_captions],
                          world, device)
    summary = {
        "steps": step, "total_steps": total_steps, "first_logged_loss": first_loss,
        "last_logged_loss": last_loss, "wall_s": wall, "world_size": world,
        "samples_seen": samples_seen, "skipped_samples": int(sums[0]),
        "captions_over_context": int(sums[1]), "captions": int(sums[2]),
        "context_length": int(built.model_cfg.get("text_cfg", {}).get("context_length", 77)),
        "trainable_parameters": trainable, "parameters": total, "peft": args.peft,
        "count_loss": args.count_loss, "count_negatives": args.count_negatives,
        "count_sigma": args.count_sigma,
        "checkpoint": os.path.join(ckpt_dir, "latest.pt"),
    }
    if rank == 0:
        pct = 100.0 * summary["captions_over_context"] / max(1, summary["captions"])
        log.info("captions longer than the %d-token context (tokenizer, before truncation): "
                 "%d of %d (%.1f%%); corrupt samples skipped: %d", summary["context_length"],
                 summary["captions_over_context"], summary["captions"], pct,
                 summary["skipped_samples"])
        sd = plain_state_dict(built)
        if args.peft != "adapter":  # adapters cannot be merged into plain open_clip weights
            ckpt_mod.write_model_dir(model_dir, built.model_cfg, built.preprocess_cfg,
                                     {"architecture": built.arch, "trained_from": args.model,
                                      "step": step}, state_dict=sd)
        if args.peft == "lora" or args.export_merged:
            dst = args.export_merged or os.path.join(ckpt_dir, "merged.pt")
            ckpt_mod.atomic_save({"state_dict": sd, "model": model_dir, "arch": built.arch,
                                  "step": step, "epoch": epoch_of(samples_seen),
                                  "peft": "merged-" + args.peft}, dst)
            summary["merged"] = dst
            log.info("merged model → %s", dst)
        if first_loss is not None:
            log.info("loss: first logged %.4f → last logged %.4f over %d steps (%.1f s)",
                     first_loss, last_loss, step, wall)
        ckpt_mod.atomic_write_text(json.dumps(summary, indent=2) + "\n",
                                   os.path.join(out_dir, "summary.json"))
    metrics.close()
    barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return summary, built


if __name__ == "__main__":
    main()
    sys.exit(0)
