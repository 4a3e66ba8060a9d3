"""``python -m pipelines.report OUTPUT [--out DIR] [--seed N] [--max-samples N] ...``

``--synthetic N`` first writes a synthetic build of N kept rows into OUTPUT (for timing the
report on a large index; see :mod:`pipelines.report.synthetic`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pipelines.report import Caps, build_report


def main(argv: list[str] | None = None) -> None:
    d = Caps()
    ap = argparse.ArgumentParser(prog="python -m pipelines.report",
                                 description="Write OUTPUT/report/index.html and its charts.")
    ap.add_argument("output", help="a build folder (with stats.json)")
    ap.add_argument("--out", help="where to write (default OUTPUT/report)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampled views")
    ap.add_argument("--max-samples", type=int, default=d.grid,
                    help=f"kept samples shown per subset (default {d.grid})")
    ap.add_argument("--grid-shards", type=int, default=d.grid_shards,
                    help=f"shards per subset the grid reads (default {d.grid_shards})")
    ap.add_argument("--caption-sample", type=int, default=d.caption_sample,
                    help="captions tokenised per subset when the build has no count "
                         f"(default {d.caption_sample})")
    ap.add_argument("--map-points", type=int, default=d.map_points,
                    help=f"points drawn on the map (default {d.map_points})")
    ap.add_argument("--synthetic", type=int, metavar="N",
                    help="first write a synthetic build of N kept rows into OUTPUT")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.synthetic:
        from pipelines.report.synthetic import write_synthetic

        t = time.perf_counter()
        write_synthetic(a.output, a.synthetic, seed=a.seed)
        print(f"synthetic build of {a.synthetic:,} rows in {a.output} "
              f"({time.perf_counter() - t:.1f} s)")
    if not os.path.isfile(os.path.join(a.output, "stats.json")):
        raise SystemExit(f"{a.output} has no stats.json: build it first "
                         f"(make build-rs5m OUTPUT={a.output})")
    caps = Caps(grid=a.max_samples, grid_shards=a.grid_shards,
                caption_sample=a.caption_sample, map_points=a.map_points)
    t = time.perf_counter()
    path = build_report(a.output, a.out, seed=a.seed, caps=caps)
    print(f"wrote {path} ({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
