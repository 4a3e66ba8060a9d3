"""``make stats OUTPUT=dir``: the build's per-source stage table, in RS5M's shape, from DuckDB.

DuckDB reads ``index/``, ``rejects/`` and ``duplicates/`` directly (they are plain parquet), so
the table is recomputed from what was written, not from the job's counters: it is also a check
of the files. Columns follow RS5M's PUB11 table (keyword hits → downloaded → invalid →
duplicates → non-RS → kept), with the rows the paper did not count (unreadable rows, URL
repeats) in their own columns so every input row is somewhere.

Caption lengths are counted in CLIP BPE tokens (open_clip's tokenizer, the one the trainer
uses), with the share of captions that do not fit the 77-token context (75 + start/end).
"""

from __future__ import annotations

import os
import sys

import duckdb
import numpy as np

COLUMNS = [
    ("input", "input"),
    ("read_invalid", "unreadable"),
    ("keyword_hits", "keyword hits"),
    ("url_repeats", "url repeats"),
    ("downloaded", "downloaded"),
    ("invalid", "invalid"),
    ("duplicates", "duplicates"),
    ("non_rs", "non-RS"),
    ("kept", "kept"),
]

STAGE_SQL = """
WITH kept AS (SELECT source, count(*) AS n FROM {index} GROUP BY source),
rej AS (
  SELECT source,
    count(*) FILTER (WHERE stage = 'read') AS read_invalid,
    count(*) FILTER (WHERE stage = 'keywords') AS no_keyword,
    count(*) FILTER (WHERE stage = 'fetch') AS fetch_failed,
    count(*) FILTER (WHERE stage = 'decode') AS invalid,
    count(*) FILTER (WHERE stage = 'rs_filter') AS non_rs,
    count(*) FILTER (WHERE stage NOT IN ('read','keywords','fetch','decode','rs_filter'))
      AS other_rejects
  FROM {rejects} GROUP BY source),
dup AS (
  SELECT source,
    count(*) FILTER (WHERE stage = 'url_dedup') AS url_repeats,
    count(*) FILTER (WHERE stage <> 'url_dedup') AS duplicates
  FROM {duplicates} GROUP BY source),
src AS (SELECT source FROM kept UNION SELECT source FROM rej UNION SELECT source FROM dup)
SELECT src.source,
  coalesce(kept.n,0) + coalesce(read_invalid,0) + coalesce(no_keyword,0)
    + coalesce(fetch_failed,0) + coalesce(invalid,0) + coalesce(non_rs,0)
    + coalesce(other_rejects,0) + coalesce(url_repeats,0) + coalesce(duplicates,0) AS input,
  coalesce(read_invalid,0) AS read_invalid,
  coalesce(kept.n,0) + coalesce(fetch_failed,0) + coalesce(invalid,0) + coalesce(non_rs,0)
    + coalesce(other_rejects,0) + coalesce(url_repeats,0) + coalesce(duplicates,0)
    AS keyword_hits,
  coalesce(url_repeats,0) AS url_repeats,
  coalesce(kept.n,0) + coalesce(invalid,0) + coalesce(non_rs,0) + coalesce(other_rejects,0)
    + coalesce(duplicates,0) AS downloaded,
  coalesce(invalid,0) AS invalid,
  coalesce(duplicates,0) AS duplicates,
  coalesce(non_rs,0) AS non_rs,
  coalesce(kept.n,0) AS kept
FROM src LEFT JOIN kept USING (source) LEFT JOIN rej USING (source)
  LEFT JOIN dup USING (source)
ORDER BY src.source
"""


def _table(output: str, folder: str, columns: str) -> str:
    """A DuckDB relation over ``folder``'s parquet files, or an empty one with ``columns``."""
    pattern = os.path.join(output, folder, "*.parquet")
    con = duckdb.connect()
    if con.execute(f"SELECT count(*) FROM glob('{pattern}')").fetchone()[0]:
        return f"read_parquet('{pattern}')"
    cols = ", ".join(f"NULL::VARCHAR AS {c}" for c in columns.split(","))
    return f"(SELECT {cols} WHERE false)"


def stage_table(output: str) -> list[dict]:
    con = duckdb.connect()
    sql = STAGE_SQL.format(
        index=_table(output, "index", "source,caption"),
        rejects=_table(output, "rejects", "source,stage,reason"),
        duplicates=_table(output, "duplicates", "source,stage,method"),
    )
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def reason_table(output: str) -> list[tuple[str, str, str, int]]:
    """(outcome, stage, reason, count) over the whole build, largest first."""
    con = duckdb.connect()
    rejects = _table(output, "rejects", "source,stage,reason")
    dups = _table(output, "duplicates", "source,stage,method")
    return con.execute(
        f"""SELECT 'rejected', stage, reason, count(*) FROM {rejects} GROUP BY ALL
            UNION ALL
            SELECT 'duplicate', stage, method, count(*) FROM {dups} GROUP BY ALL
            ORDER BY 4 DESC, 1, 2, 3"""
    ).fetchall()


def caption_token_lengths(output: str) -> np.ndarray:
    from open_clip.tokenizer import _tokenizer

    con = duckdb.connect()
    index = _table(output, "index", "source,caption")
    captions = [r[0] for r in con.execute(f"SELECT caption FROM {index}").fetchall()]
    return np.array([len(_tokenizer.encode(c)) for c in captions], dtype=np.int64)


def _fmt_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def report(output: str, context_length: int = 77) -> str:
    rows = stage_table(output)
    total = {k: sum(r[k] for r in rows) for k, _ in COLUMNS}
    body = [[r["source"]] + [r[k] for k, _ in COLUMNS] for r in rows]
    body.append(["TOTAL"] + [total[k] for k, _ in COLUMNS])
    out = ["Per-source stages (RS5M PUB11 shape):",
           _fmt_table(["source"] + [label for _, label in COLUMNS], body), ""]
    reasons = reason_table(output)
    if reasons:
        out += ["Rejects and duplicates by reason:",
                _fmt_table(["outcome", "stage", "reason", "count"], [list(r) for r in reasons]),
                ""]
    lengths = caption_token_lengths(output)
    if len(lengths):
        q = np.percentile(lengths, [5, 25, 50, 75, 95]).round(1)
        over = float((lengths > context_length - 2).mean() * 100)
        out += [
            "Caption length in CLIP tokens (kept samples):",
            _fmt_table(
                ["n", "mean", "p5", "p25", "p50", "p75", "p95", "max",
                 f"> {context_length} ctx"],
                [[len(lengths), round(float(lengths.mean()), 1), *q, int(lengths.max()),
                  f"{over:.1f}%"]],
            ),
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m pipelines.stats OUTPUT_DIR")
    if not os.path.isdir(argv[0]):
        raise SystemExit(f"no build output at {argv[0]}")
    print(report(argv[0]))


if __name__ == "__main__":
    main()
