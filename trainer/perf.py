"""Training throughput: our trainer vs ``open_clip_train.main`` on the same shards and model.

    make perf-train [ARGS='--steps 30 --batch-size 32']
    python -m trainer.perf --data out/rs5m --model data/demo/models/tiny-clip

Both run as subprocesses, one after the other, on the same shards, the same model
(``local-dir:`` of the tiny CLIP by default), the same per-step batch, the same DataLoader
worker count and the same CPU thread count (``OMP_NUM_THREADS`` and ``--threads``), both reading
an infinite resampled stream (open_clip: ``--dataset-resampled`` with one "epoch" of all steps),
fp32, CPU. Throughput is measured the same way for both, from per-step times (open_clip: its
per-step ``Batch (t)`` rate with ``--log-every-n-steps 1``; ours: ``wall_s`` of every step in
metrics.jsonl), skipping the first ``--skip`` steps (start-up, first batches):
samples/s = steps × batch / Σ step time; same optimiser settings (AdamW, wd 0.1, grad-norm
clip 1.0, warmup 5). ``--repeats N`` alternates the two N times and reports medians. The last
line printed is ``ratio <ours/open_clip>``.
No timing is asserted anywhere: on a shared machine the numbers move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from .data import expand_urls

_OC_RATE = re.compile(r"Train Epoch: \d+ .*?Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,")


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def rate_from_step_times(times: Sequence[float], batch: int) -> float:
    return len(times) * batch / sum(times) if times and sum(times) > 0 else float("nan")


def run_ours(args: argparse.Namespace, work: str) -> float:
    out = os.path.join(work, "ours")
    cmd = [sys.executable, "-m", "trainer.train", "--data", args.data, "--model", args.model,
           "--output", out, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--log-every", "1", "--save-every", "1000000000",
           "--no-step-files", "--no-progress", "--device", "cpu", "--lr", str(args.lr),
           "--warmup", "5", "--seed", "0", "--grad-clip-norm", "1.0", "--wd", "0.1"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t = time.time()
    subprocess.run(cmd, check=True, env=_env(args.threads), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL if not args.verbose else None)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    walls = {r["step"]: r["wall_s"] for r in rows}
    times = [walls[s] - walls[s - 1] for s in range(args.skip + 1, args.steps + 1)
             if s in walls and s - 1 in walls]
    print(f"ours: {len(times)} timed steps, process wall {time.time() - t:.1f} s", flush=True)
    return rate_from_step_times(times, args.batch_size)


def run_open_clip(args: argparse.Namespace, work: str) -> float:
    urls = expand_urls(args.data)
    cmd = [sys.executable, "-m", "open_clip_train.main",
           "--train-data", "::".join(urls), "--dataset-type", "webdataset",
           "--dataset-resampled", "--train-num-samples", str(args.steps * args.batch_size),
           "--epochs", "1", "--batch-size", str(args.batch_size),
           "--model", f"local-dir:{args.model}" if not args.model.startswith("local-dir:")
           else args.model,
           "--device", "cpu", "--workers", str(args.workers), "--lr", str(args.lr),
           "--warmup", "5", "--log-every-n-steps", "1", "--logs", os.path.join(work, "oc"),
           "--name", "perf", "--save-frequency", "0", "--seed", "0", "--precision", "fp32",
           "--grad-clip-norm", "1.0", "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98",
           "--eps", "1e-6"]
    t = time.time()
    proc = subprocess.run(cmd, env=_env(args.threads), capture_output=True, text=True,
                          check=False)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(text[-4000:])
        raise RuntimeError("open_clip_train.main failed")
    rates = [float(m.group(1)) for m in _OC_RATE.finditer(text)]
    # one log line per step; the first is step 0 ("[0/N]"), skip start-up like ours
    times = [args.batch_size / r for r in rates[args.skip:] if r > 0]
    print(f"open_clip_train: {len(times)} timed steps, process wall {time.time() - t:.1f} s",
          flush=True)
    return rate_from_step_times(times, args.batch_size)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.perf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="out/rs5m")
    ap.add_argument("--model", default="data/demo/models/tiny-clip", help="local model dir")
    ap.add_argument("--batch-size", "--batch_size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="untimed start-up steps")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both (default: cores / (1 + workers), our trainer's "
                         "own default, pinned for both so neither wins on thread count)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternate the two runs N times and report each one's median")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.model = args.model.removeprefix("local-dir:")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // (1 + args.workers))
    threads = f"{args.threads} CPU threads each (OMP_NUM_THREADS / --threads)"
    print(f"batch {args.batch_size}, {args.steps} steps ({args.skip} untimed), "
          f"{args.workers} data worker(s), {threads}", flush=True)
    import statistics

    mine, oc = [], []
    for i in range(max(1, args.repeats)):
        with tempfile.TemporaryDirectory(prefix="perf-train-") as work:
            mine.append(run_ours(args, work))
            print(f"[{i}] ours samples/s {mine[-1]:.2f}", flush=True)
            oc.append(run_open_clip(args, work))
            print(f"[{i}] open_clip_train samples/s {oc[-1]:.2f}", flush=True)
    ours, theirs = statistics.median(mine), statistics.median(oc)
    print(f"ours samples/s {ours:.2f}")
    print(f"open_clip_train samples/s {theirs:.2f}")
    print(f"ratio {ours / theirs:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
