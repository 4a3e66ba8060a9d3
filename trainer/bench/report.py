"""Write a bench run: ``results.json``, ``results.md`` and ``fewshot.png``.

``results.md`` puts the published figure beside ours wherever model and dataset match a row
of ``published_results.csv`` (columns ``paper, model, backbone, task, dataset, metric, value,
note``). A model matches a published ``(model, backbone)`` when its run name is
``<model>-<backbone>`` or ``<model> <backbone>`` (case-insensitive, e.g.
``--name RemoteCLIP-ViT-B-32``); a dataset matches through the registry's ``published`` name;
metrics share names (``top1``, ``i2t_R@1``..., ``mean_recall``, ``Rsu``...).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

PUBLISHED_CSV = Path(__file__).resolve().parent / "data" / "published_results.csv"
SCHEMA = "rs-corpus/bench-results/1"


def load_published(path: str | Path | None = None) -> list[dict[str, str]]:
    p = Path(path) if path else PUBLISHED_CSV
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", s.lower())


def published_for(model_name: str, dataset: str | None, protocol: str, metric: str,
                  rows: list[dict[str, str]]) -> list[dict[str, str]]:
    if not dataset:
        return []
    n = _norm(model_name)
    out = []
    for r in rows:
        if r["dataset"] != dataset or r["task"] != protocol or r["metric"] != metric:
            continue
        if n == _norm(f"{r['model']}{r['backbone']}"):
            out.append(r)
    return out


def _fmt(v: float, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4f}" if unit == "ratio" else f"{v:.2f}"


def _param_key(rec: dict[str, Any]) -> str:
    p = rec["params"]
    if rec["protocol"] == "zeroshot":
        return f"prompts={p.get('prompt_set')}"
    if rec["protocol"] == "fewshot":
        return f"{p.get('shots')}-shot"
    if rec["protocol"] == "knn":
        return f"k={p.get('k')}"
    return ""


def markdown(records: list[dict[str, Any]], models: list[str],
             published: list[dict[str, str]], notes: list[str] | None = None) -> str:
    """One row per (dataset, protocol, setting, metric), one column per model, then the
    published figures for models whose names match."""
    rows: dict[tuple, dict[str, Any]] = {}
    order: list[tuple] = []
    for r in records:
        key = (r["dataset"], r["protocol"], _param_key(r), r["metric"])
        if key not in rows:
            rows[key] = {"unit": r["unit"], "published_dataset": r.get("published_dataset")}
            order.append(key)
        rows[key][r["model"]] = r["value"]
    lines = ["# Benchmark results", ""]
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    lines += [("Scores in percent (SeLo: 0–1; Ras lower is better). Ties count against the "
               "model (see trainer/bench/protocols.py)."), ""]
    head = ["dataset", "protocol", "setting", "metric"] + models + ["published"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for key in order:
        row = rows[key]
        ds, proto, setting, metric = key
        pubs = []
        for m in models:
            for p in published_for(m, row["published_dataset"], proto, metric, published):
                pubs.append(f"{p['value']} ({p['paper']}: {p['model']} {p['backbone']}"
                            + (f"; {p['note']}" if p.get("note") else "") + ")")
        cells = [ds, proto, setting, metric] + [_fmt(row.get(m), row["unit"]) for m in models]
        cells.append("<br>".join(pubs) if pubs else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fewshot_plot(records: list[dict[str, Any]], path: str | Path) -> bool:
    """Top-1 vs shots (log2 axis), one panel per dataset, one line per model; False if no
    few-shot results."""
    fs = [r for r in records if r["protocol"] == "fewshot"]
    if not fs:
        return False
    try:
        import matplotlib
    except ImportError:  # the tables do not need it
        import logging

        logging.getLogger(__name__).warning("matplotlib is not installed: no fewshot.png")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_ds: dict[str, dict[str, list[tuple[int, float, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for r in fs:
        by_ds[r["dataset"]][r["model"]].append(
            (int(r["params"]["shots"]), r["value"], float(r["params"].get("std", 0.0))))
    n = len(by_ds)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    for ax, (ds, per_model) in zip(axes[0], sorted(by_ds.items())):
        for model, pts in sorted(per_model.items()):
            pts.sort()
            xs, ys, sd = zip(*pts)
            ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(output: str | Path, records: list[dict[str, Any]], models: list[dict[str, Any]],
          published_csv: str | Path | None = None, notes: list[str] | None = None
          ) -> dict[str, str]:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"schema": SCHEMA, "models": models, "notes": notes or [], "results": records}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    md = markdown(records, [m["name"] for m in models], load_published(published_csv), notes)
    (out / "results.md").write_text(md)
    files = {"json": str(out / "results.json"), "markdown": str(out / "results.md")}
    if fewshot_plot(records, out / "fewshot.png"):
        files["fewshot"] = str(out / "fewshot.png")
    return files
