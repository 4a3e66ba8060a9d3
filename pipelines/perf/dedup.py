"""``make perf-dedup``: SemDeDup (``pipelines.stages.semdedup``) against exact search, N = 10^4..10^6.

What is measured (``python -m pipelines.perf.dedup --help``):

1. Synthetic corpus: N L2-normalised 512-d float32 embeddings drawn around ``N/500`` topic
   directions (so k-means has structure to find), plus planted near-duplicate groups: 2% of the
   rows are bases with 1–4 variants each, ``normalise(base + noise)`` with cosine to the base
   between ~0.96 and ~0.999. Seeded: the same N gives the same array. ``--topic_weight 0``
   makes the background isotropic (no cluster structure: the hard case for k-means cells).
2. Ours: the *pure-function core* of the SemDeDup stage (``semdedup_arrays``: seeded-sample
   spherical k-means with faiss, boundary replication, in-cluster exact cosines, union-find) —
   not the Beam pipeline, whose per-record overheads would dominate at 10^6 on 2 cores; the
   Beam wrapper calls exactly these functions.
3. Exact: brute force with faiss ``IndexFlatIP.range_search`` (exact inner products), every
   pair with cosine ≥ 1 − ε. For N ≤ ``--exact_max`` (default 2·10^4) all rows are queries.
   Above it (10^5: ~10 min, 10^6: ~30 h of inner products on 2 cores) a seeded random subset
   of ``--queries`` rows is
   searched against all N, recall/precision are computed over pairs that involve a sampled row,
   and the brute-force time is extrapolated linearly (time × N / queries). The table says which.
4. Per N, in its own subprocess: wall time of ours, brute-force time (measured or
   extrapolated), speedup, peak RSS of the subprocess (data + both methods), pair recall and
   precision vs exact, and the share of rows each removes.

The last line printed is ``recall <r> speedup <x>`` for the largest N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from pipelines.stages.semdedup import SemDedupConfig, exact_pairs, normalise, semdedup_arrays

DIM = 512


def synthetic(n: int, seed: int = 0, dim: int = DIM, dup_share: float = 0.02,
              chunk: int = 100_000, topic_weight: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [n, dim] float32 normalised, group id per row: -1 or the base's index)."""
    rng = np.random.default_rng(seed)
    n_topics = max(1, n // 500)
    topics = normalise(rng.standard_normal((n_topics, dim), dtype=np.float32))
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        t = rng.integers(0, n_topics, m)
        noise = normalise(rng.standard_normal((m, dim), dtype=np.float32))
        x[s : s + m] = normalise(topic_weight * topics[t]
                                 + math.sqrt(max(0.0, 1 - topic_weight**2)) * noise)
    group = np.full(n, -1, np.int64)
    # plant groups: pick bases, overwrite following random rows with variants
    n_bases = int(n * dup_share / 3.5)
    perm = rng.permutation(n)
    bases, pos = perm[:n_bases], n_bases
    for b in bases:
        k = int(rng.integers(1, 5))
        for v in perm[pos : pos + k]:
            r = rng.uniform(0.05, 0.28)
            noise = rng.standard_normal(dim).astype(np.float32) * (r / math.sqrt(dim))
            x[v] = normalise(x[b] + noise)
            group[v] = b
        group[b] = b
        pos += k
    return x, group


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(n: int, cfg: SemDedupConfig, exact_max: int, queries: int, seed: int,
            topic_weight: float = 0.6) -> dict:
    x, _ = synthetic(n, seed, topic_weight=topic_weight)
    t0 = time.perf_counter()
    res = semdedup_arrays(x, cfg)
    t_ours = time.perf_counter() - t0
    found = res["pairs"]
    if n <= exact_max:
        t0 = time.perf_counter()
        exact = exact_pairs(x, cfg.threshold)
        t_exact = time.perf_counter() - t0
        q = None
        mode = "measured"
    else:
        q = np.sort(np.random.default_rng(seed + 1).choice(n, size=queries, replace=False))
        t0 = time.perf_counter()
        exact = exact_pairs(x, cfg.threshold, queries=q)
        t_exact = (time.perf_counter() - t0) * n / queries
        mode = f"extrapolated from {queries} queries"
        qs = set(q.tolist())
        found = {p: s for p, s in found.items() if p[0] in qs or p[1] in qs}
    hit = len(set(found) & set(exact))
    recall = hit / len(exact) if exact else 1.0
    precision = hit / len(found) if found else 1.0
    out: dict[str, Any] = {
        "n": n, "ours_s": t_ours, "exact_s": t_exact, "exact_mode": mode,
        "speedup": t_exact / t_ours, "peak_rss_mb": _rss_mb(), "recall": recall,
        "precision": precision, "exact_pairs": len(exact), "found_pairs": len(found),
        "clusters": len(res["centroids"]), "replication": res["replication"],
        "removed_share": len(res["dropped"]) / n,
    }
    if q is None:
        from pipelines.stages.semdedup import resolve

        exact_drop = resolve(((a, b, s) for (a, b), s in exact.items()), lambda i: (0.0, i))
        both = len(set(exact_drop) & set(res["dropped"]))
        out["drop_recall"] = both / len(exact_drop) if exact_drop else 1.0
        out["drop_precision"] = both / len(res["dropped"]) if res["dropped"] else 1.0
    return out


def _fmt(rows: list[dict]) -> str:
    head = ["N", "clusters", "repl", "ours s", "exact s", "speedup", "peak MB", "pairs",
            "recall", "precision", "drop rec", "removed", "exact"]
    body = [[f"{r['n']:,}", r["clusters"], f"{r['replication']:.2f}", f"{r['ours_s']:.1f}",
             f"{r['exact_s']:.1f}", f"{r['speedup']:.1f}x", f"{r['peak_rss_mb']:.0f}",
             r["exact_pairs"], f"{r['recall']:.4f}", f"{r['precision']:.4f}",
             f"{r['drop_recall']:.4f}" if "drop_recall" in r else "-",
             f"{100 * r['removed_share']:.2f}%", r["exact_mode"]] for r in rows]
    cells = [head] + [[str(c) for c in b] for b in body]
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w[i]) for i, c in enumerate(row)) for row in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.perf.dedup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--eps", type=float, default=SemDedupConfig.eps)
    ap.add_argument("--cluster_size", type=int, default=SemDedupConfig.cluster_size)
    ap.add_argument("--margin", type=float, default=SemDedupConfig.margin)
    ap.add_argument("--max_extra", type=int, default=SemDedupConfig.max_extra)
    ap.add_argument("--sample_size", type=int, default=SemDedupConfig.sample_size)
    ap.add_argument("--exact_max", type=int, default=20_000,
                    help="largest N searched exhaustively; above: sampled queries")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--topic_weight", type=float, default=0.6,
                    help="how strongly rows gather around topics (0: isotropic, the hard case)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cfg = SemDedupConfig(eps=a.eps, cluster_size=a.cluster_size, margin=a.margin,
                         max_extra=a.max_extra, sample_size=a.sample_size, seed=a.seed)
    if a.one:
        print(json.dumps(measure(a.one, cfg, a.exact_max, a.queries, a.seed, a.topic_weight)))
        return 0
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        cmd = [sys.executable, "-m", "pipelines.perf.dedup", "--one", str(n)] + [
            f"--{k}={v}" for k, v in vars(a).items() if k not in ("one", "sizes")
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"N={n:,}: ours {rows[-1]['ours_s']:.1f}s recall {rows[-1]['recall']:.4f}",
              file=sys.stderr, flush=True)
    print(f"SemDeDup core (eps {cfg.eps}, cluster_size {cfg.cluster_size}, margin {cfg.margin}, "
          f"max_extra {cfg.max_extra}) vs exact faiss IndexFlatIP range search; 512-d float32; "
          f"{os.cpu_count()} CPUs")
    print(_fmt(rows))
    last = rows[-1]
    print(f"recall {last['recall']:.4f} speedup {last['speedup']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
