"""``python -m pipelines.plan``: worker-hours, wall time and cost of a build, from measured rates.

    python -m pipelines.plan --recipe rs5m --n 5000000 --workers 100 --gpu-workers 8 \\
        --cpu-price 0.19 --gpu-price 1.20 --rate caption=gpu:20

For every stage the recipe runs (``recipes.<name>.stages`` of the rates file: stage → share of
the N images that pass through it), the table shows the images it processes, the device, one
worker's rate, the worker-hours (images / rate / 3600), the wall hours at the given worker count
(CPU stages on ``--workers``, GPU stages on ``--gpu-workers``) and, when prices are given, the
cost (worker-hours × price per worker-hour). No prices live in code: they are flags.

The rates are ours: ``pipelines/recipes/data/plan_rates.json`` holds what the perf targets
measured on the project's build machine (2 shared vCPUs, no GPU), each with its source; a stage
nobody measured here has no rate and is left out of the totals, loudly. ``--rates FILE`` reads
another file (measure on your own workers), ``--rate STAGE=[cpu:|gpu:]IMAGES_PER_S`` overrides
one stage. The wall time adds the stages up as if they ran one after another (an upper bound:
Beam fuses and overlaps them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_RATES = Path(__file__).resolve().parent / "recipes" / "data" / "plan_rates.json"
DEVICES = ("cpu", "gpu")


@dataclasses.dataclass(frozen=True)
class StageRate:
    name: str
    device: str
    images_per_s: float | None
    kind: str  # measured | derived (from a measurement) | given (--rate) | none
    source: str
    parallel: bool = True


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: str
    device: str
    images: int
    images_per_s: float | None
    kind: str
    worker_hours: float | None
    wall_hours: float | None
    cost: float | None


@dataclasses.dataclass(frozen=True)
class Plan:
    recipe: str
    n: int
    workers: int
    gpu_workers: int
    stages: list[StagePlan]
    missing: list[str]

    def worker_hours(self, device: str) -> float:
        return sum(s.worker_hours or 0.0 for s in self.stages if s.device == device)

    @property
    def wall_hours(self) -> float:
        return sum(s.wall_hours or 0.0 for s in self.stages)

    @property
    def cost(self) -> float | None:
        costs = [s.cost for s in self.stages if s.worker_hours is not None]
        return None if any(c is None for c in costs) else sum(costs)


def load_rates(path: str | Path = DEFAULT_RATES) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parse_override(text: str) -> tuple[str, str | None, float]:
    """``STAGE=[cpu:|gpu:]IMAGES_PER_S`` → (stage, device or None, rate)."""
    stage, sep, value = text.partition("=")
    if not sep or not stage:
        raise ValueError(f"--rate {text!r}: expected STAGE=[cpu:|gpu:]IMAGES_PER_S")
    device = None
    if ":" in value:
        device, value = value.split(":", 1)
        if device not in DEVICES:
            raise ValueError(f"--rate {text!r}: device must be one of {DEVICES}")
    rate = float(value)
    if not rate > 0:
        raise ValueError(f"--rate {text!r}: the rate must be > 0 images/s")
    return stage, device, rate


def stage_rates(doc: dict[str, Any], overrides: Sequence[str] = ()) -> dict[str, StageRate]:
    def kind(s: dict[str, Any]) -> str:
        if s.get("images_per_s") is None:
            return "none"
        return "measured" if s.get("measured") else "derived"

    rates = {name: StageRate(name, s["device"], s.get("images_per_s"), kind(s),
                             s.get("source", ""), s.get("parallel", True))
             for name, s in doc["stages"].items()}
    for text in overrides:
        stage, device, rate = parse_override(text)
        if stage not in rates:
            raise ValueError(f"--rate: unknown stage {stage!r} (known: {sorted(rates)})")
        old = rates[stage]
        rates[stage] = StageRate(stage, device or old.device, rate, "given", "--rate",
                                 old.parallel)
    return rates


def plan(doc: dict[str, Any], recipe: str, n: int, workers: int, gpu_workers: int | None = None,
         cpu_price: float | None = None, gpu_price: float | None = None,
         overrides: Sequence[str] = ()) -> Plan:
    """The build plan of ``recipe`` for ``n`` images at ``workers`` CPU and ``gpu_workers`` GPU
    workers (default: as many as CPU ones); prices are per worker-hour."""
    if recipe not in doc["recipes"]:
        raise ValueError(f"no rates for recipe {recipe!r} (known: {sorted(doc['recipes'])})")
    if n <= 0 or workers <= 0:
        raise ValueError("--n and --workers must be positive")
    gpu_workers = workers if gpu_workers is None else gpu_workers
    if gpu_workers <= 0:
        raise ValueError("--gpu-workers must be positive")
    rates = stage_rates(doc, overrides)
    price = {"cpu": cpu_price, "gpu": gpu_price}
    count = {"cpu": workers, "gpu": gpu_workers}
    rows, missing = [], []
    for stage, share in doc["recipes"][recipe]["stages"].items():
        r = rates[stage]
        images = round(n * share)
        if r.images_per_s is None:
            missing.append(stage)
            rows.append(StagePlan(stage, r.device, images, None, "none", None, None, None))
            continue
        hours = images / r.images_per_s / 3600
        cost = None if price[r.device] is None else hours * price[r.device]
        # a stage that is one global computation (semantic dedup's clustering) is not spread
        wall = hours / count[r.device] if r.parallel else hours
        rows.append(StagePlan(stage, r.device, images, r.images_per_s, r.kind, hours, wall,
                              cost))
    return Plan(recipe, n, workers, gpu_workers, rows, missing)


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def render(p: Plan, doc: dict[str, Any]) -> str:
    head = ["stage", "device", "images", "img/s/worker", "rate", "worker-h", "wall h", "cost"]
    body = [[s.stage, s.device.upper(), f"{s.images:,}", _num(s.images_per_s, ",.1f"),
             s.kind,
             _num(s.worker_hours, ",.1f"), _num(s.wall_hours, ",.2f"), _num(s.cost, ",.2f")]
            for s in p.stages]
    cost = p.cost
    body.append(["TOTAL", "", "", "", "",
                 f"{p.worker_hours('cpu') + p.worker_hours('gpu'):,.1f}",
                 f"{p.wall_hours:,.2f}", _num(cost, ",.2f")])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    title = (f"Plan: {p.recipe}, {p.n:,} images, {p.workers} CPU workers, "
             f"{p.gpu_workers} GPU workers; {doc.get('worker', '')}")
    lines = [title,
             "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i >= 2 else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in body]
    lines.append(f"CPU worker-hours {p.worker_hours('cpu'):,.1f}, GPU worker-hours "
                 f"{p.worker_hours('gpu'):,.1f}; wall time {p.wall_hours:,.2f} h "
                 f"(~{math.ceil(p.wall_hours * 60):,} min, stages one after another: an upper "
                 "bound)")
    if cost is None and p.stages:
        lines.append("cost: give --cpu-price and --gpu-price (per worker-hour) for a cost")
    if p.missing:
        lines.append(f"NOT IN THE TOTALS: no rate measured here for {', '.join(p.missing)} "
                     "(pass --rate STAGE=[cpu:|gpu:]IMAGES_PER_S, or --rates FILE)")
    note = doc["recipes"][p.recipe].get("note")
    if note:
        lines.append(f"recipe: {note}")
    lines.append("rates: " + doc.get("about", ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="rs5m")
    ap.add_argument("--n", type=int, required=True, help="images entering the build")
    ap.add_argument("--workers", type=int, default=100, help="CPU workers (default %(default)s)")
    ap.add_argument("--gpu-workers", type=int, help="GPU workers (default: --workers)")
    ap.add_argument("--cpu-price", type=float, help="price of a CPU worker-hour")
    ap.add_argument("--gpu-price", type=float, help="price of a GPU worker-hour")
    ap.add_argument("--rates", default=str(DEFAULT_RATES),
                    help="per-stage rates JSON (default: ours, %(default)s)")
    ap.add_argument("--rate", action="append", default=[],
                    help="STAGE=[cpu:|gpu:]IMAGES_PER_S: override one stage (repeatable)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    doc = load_rates(args.rates)
    try:
        p = plan(doc, args.recipe, args.n, args.workers, args.gpu_workers, args.cpu_price,
                 args.gpu_price, args.rate)
    except ValueError as e:
        ap.error(str(e))
    if args.json:
        print(json.dumps({**dataclasses.asdict(p), "cpu_worker_hours": p.worker_hours("cpu"),
                          "gpu_worker_hours": p.worker_hours("gpu"),
                          "wall_hours": p.wall_hours, "cost": p.cost}, indent=2))
    else:
        print(render(p, doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
