"""``python -m trainer.bench`` (``make bench``): score CLIP models side by side.

Models (any number, in the order given; ``--name`` names the model given just before it)::

    --checkpoint out/train/checkpoints/latest.pt          # a trainer / open_clip_train checkpoint
    --model ViT-B-32 --pretrained /models/GeoRSCLIP.pt    # arch (or model dir) + weights file
    --model /models/SkyCLIP-ViT-L-14                      # an open_clip model directory
    --name GeoRSCLIP-ViT-B-32                             # names the model before it

A name of the form <model>-<backbone> as published_results.csv spells them (GeoRSCLIP-ViT-B-32,
RemoteCLIP-ViT-L-14, SkyCLIP-50-ViT-B-32, CLIP-ViT-B-32) puts the published figures beside ours.

Datasets: ``--datasets AID,RESISC45,RSICD`` (known names, under ``--data-root``) or
``NAME=PATH`` entries. Without ``--datasets`` the demo benchmark in ``--demo-dir`` is used
(``make bench`` builds it first: ``python -m pipelines.demo bench-sets``) and the untrained
tiny model is scored beside the checkpoint(s) (``--no-baseline`` to leave it out).

Writes ``OUTPUT/results.json``, ``OUTPUT/results.md``, ``OUTPUT/fewshot.png`` and the feature
cache ``OUTPUT/cache/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from trainer.bench import report
from trainer.bench.evaluate import ALL_PROTOCOLS, Options, evaluate
from trainer.bench.models import TINY_BASELINE_DIR, BenchModel, ModelSpec, resolve_checkpoint
from trainer.bench.registry import DEMO_DATASETS, KNOWN, prompt_sets, resolve

log = logging.getLogger("trainer.bench")


class _ModelAction(argparse.Action):
    """Collects --checkpoint / --model / --pretrained / --name in command-line order."""

    def __call__(self, parser, ns, value, option_string=None):
        items = getattr(ns, "model_items", None) or []
        items.append((self.dest, value))
        ns.model_items = items


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    for flag, dest, helptext in [
        ("--checkpoint", "checkpoint", "a checkpoint file (repeatable)"),
        ("--model", "model", "an architecture name or open_clip model dir (repeatable)"),
        ("--pretrained", "pretrained", "weights file for the preceding --model"),
        ("--name", "name", "name of the preceding model in the tables"),
    ]:
        ap.add_argument(flag, dest=dest, action=_ModelAction, help=helptext)
    ap.add_argument("--output", default="out/bench")
    ap.add_argument("--datasets", type=_csv, default=None,
                    help=f"comma list; known: {', '.join(sorted(KNOWN))}; or NAME=PATH")
    ap.add_argument("--data-root", default="data/bench")
    ap.add_argument("--split", action="append", default=[], metavar="NAME=SPLIT",
                    help="override a dataset's split: whole | test | a split-file path "
                         "(JSON {train, val, test} of paths relative to the dataset)")
    ap.add_argument("--demo-dir", default="data/demo/bench")
    ap.add_argument("--baseline", dest="baseline", action="store_true", default=None,
                    help="also score the untrained tiny model (default: only on the demo sets)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false")
    ap.add_argument("--baseline-model", default=TINY_BASELINE_DIR,
                    help="the untrained tiny model dir (`python -m pipelines.demo bench-sets` "
                         "builds it)")
    ap.add_argument("--protocols", type=_csv, default=list(ALL_PROTOCOLS))
    ap.add_argument("--prompts", type=_csv, default=None,
                    help=f"zero-shot prompt sets (default: each dataset's); {prompt_sets()}")
    ap.add_argument("--shots", type=lambda s: [int(x) for x in _csv(s)], default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=[0, 1, 2])
    ap.add_argument("--knn-k", type=int, default=20)
    ap.add_argument("--selo-scales", type=lambda s: [int(x) for x in _csv(s)], default=[256, 512, 768])
    ap.add_argument("--selo-box", type=int, default=50,
                    help="SeLo peak smoothing kernel, pixels (the reference's 50 for AIR-SLT)")
    ap.add_argument("--selo-peak", type=int, default=1000,
                    help="SeLo peak window, pixels (the reference's 1000 for AIR-SLT)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-cache", action="store_true", help="do not read or write OUTPUT/cache")
    ap.add_argument("--published", default=None, help="published_results.csv (default: bundled)")
    ap.add_argument("-q", "--quiet", action="store_true")
    ns = ap.parse_args(argv)
    if not hasattr(ns, "model_items") or ns.model_items is None:
        ns.model_items = []
    bad = sorted(set(ns.protocols) - set(ALL_PROTOCOLS))
    if bad:
        ap.error(f"unknown protocols {bad}; known: {list(ALL_PROTOCOLS)}")
    return ns


def model_specs(items: list[tuple[str, str]]) -> tuple[list[ModelSpec], list[str]]:
    """(models, notes): a missing checkpoint file is skipped with a note, not fatal."""
    specs: list[ModelSpec] = []
    notes: list[str] = []
    last: ModelSpec | None = None  # the spec --pretrained / --name apply to
    skipped = False
    for kind, value in items:
        if kind == "checkpoint":
            if not os.path.isfile(value):
                notes.append(f"checkpoint {value} not found: skipped (run `make train` first?)")
                last, skipped = None, True
                continue
            model, pre = resolve_checkpoint(value)
            stem = os.path.splitext(os.path.basename(value))[0]
            run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(value))))
            last = ModelSpec(f"{run}/{stem}" if run else stem, model, pre)
            specs.append(last)
            skipped = False
        elif kind == "model":
            last = ModelSpec(os.path.basename(value.rstrip("/")) or value, value)
            specs.append(last)
            skipped = False
        elif kind == "pretrained":
            if last is None or last.pretrained is not None:
                raise SystemExit("--pretrained must follow the --model it belongs to")
            last.pretrained = None if value.lower() == "none" else value
            if last.pretrained:
                last.name = f"{last.name}:{os.path.splitext(os.path.basename(value))[0]}"
        elif kind == "name":
            if last is None:
                if skipped:
                    continue
                raise SystemExit("--name must follow the --checkpoint/--model it names")
            last.name = value
    names = [s.name for s in specs]
    for i, s in enumerate(specs):  # unique column names
        if names.count(s.name) > 1:
            s.name = f"{s.name}#{i + 1}"
    return specs, notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    specs, notes = model_specs(args.model_items)
    demo = args.datasets is None
    if demo:
        if not os.path.isfile(os.path.join(args.demo_dir, "benchmarks.json")):
            log.error("no demo benchmark in %s: run `make bench` (it builds one) or "
                      "`python -m pipelines.demo bench-sets --out %s`, or pass --datasets",
                      args.demo_dir, os.path.dirname(args.demo_dir.rstrip("/")) or ".")
            return 2
        names = list(DEMO_DATASETS)
        with open(os.path.join(args.demo_dir, "benchmarks.json"), encoding="utf-8") as f:
            seed = json.load(f).get("seed")
        notes.append(f"demo benchmark {args.demo_dir} (seed {seed}): scenes the corpus build "
                     "never saw")
    else:
        names = args.datasets
    baseline = demo if args.baseline is None else args.baseline
    if baseline:
        if not os.path.isdir(args.baseline_model):
            log.error("no baseline model in %s: run `make bench` (it builds one) or "
                      "`python -m pipelines.demo bench-sets`, or pass --no-baseline",
                      args.baseline_model)
            return 2
        specs.insert(0, ModelSpec("tiny-untrained", args.baseline_model))
    if not specs:
        for n in notes:
            log.error(n)
        log.error("no model to score: pass --checkpoint, or --model [--pretrained]")
        return 2
    datasets = [resolve(n, args.data_root, args.demo_dir) for n in names]
    overrides = dict(x.split("=", 1) for x in args.split)
    datasets = [(dataclasses.replace(s, split=overrides[s.name]) if s.name in overrides else s, p)
                for s, p in datasets]
    for spec, path in datasets:
        if not path.exists():
            raise SystemExit(f"dataset {spec.name}: {path} not found (set --data-root or "
                             f"pass {spec.name}=PATH)")
    models = []
    for s in specs:
        log.info("loading %s (%s, weights %s)", s.name, s.model, s.pretrained)
        models.append(BenchModel(s, device=args.device, precision=args.precision,
                                 batch_size=args.batch_size))
    opt = Options(protocols=tuple(args.protocols),
                  prompts=tuple(args.prompts) if args.prompts else None,
                  shots=tuple(args.shots), seeds=tuple(args.seeds), knn_k=args.knn_k,
                  selo_scales=tuple(args.selo_scales), selo_box=args.selo_box,
                  selo_peak=args.selo_peak)
    cache_root = None if args.no_cache else os.path.join(args.output, "cache")
    records = evaluate(models, datasets, cache_root, opt)
    model_info = [{"name": m.name, "model": m.spec.model, "pretrained": m.spec.pretrained,
                   "key": m.key} for m in models]
    files = report.write(args.output, records, model_info, args.published, notes)
    log.info("%d results in %.1fs: %s", len(records), time.time() - t0, files)
    if not args.quiet:
        with open(files["markdown"]) as f:
            sys.stdout.write(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
