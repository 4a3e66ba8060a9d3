"""``make stats OUTPUT=dir``: a build's stage table per subset, from DuckDB.

DuckDB reads ``index/``, ``rejects/`` and ``duplicates/`` directly (they are plain parquet), so
the tables are recomputed from what was written, not from the job's counters: they are also a
check of the files. One table per subset, one row per source, with the recipe's columns:

* ``pub11`` follows RS5M's PUB11 table (keyword hits → downloaded → invalid → duplicates →
  non-RS → kept), with the rows the paper did not count (unreadable rows, URL repeats) in
  their own columns so every input row is somewhere;
* every other subset is a funnel: input, then the rows each stage took out (rejected ✗ or
  duplicate ≡, stages in pipeline order), then kept.

Training-caption lengths are counted in CLIP tokens with the start and end tokens (the build's
own count, ``caption_tokens``, where the recipe fitted captions to its model's tokenizer; else
open_clip's BPE tokenizer, the trainer's default), per subset and source, with the share of
captions that do not fit the 77-token context.
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


#: the order stages run in, over every recipe (a stage not listed goes last, by name)
STAGE_ORDER = ("read", "keywords", "url_dedup", "fetch", "decode", "georef", "caption",
               "dedup", "rs_filter", "embed", "clip_filter", "decontam", "semantic_dedup")


def _table(output: str, folder: str, columns: str, subset: str | None = None) -> str:
    """A DuckDB relation over ``folder``'s parquet files (of one subset, if given), or an
    empty one with ``columns``."""
    pattern = os.path.join(output, folder, f"{subset}-*.parquet" if subset else "*.parquet")
    con = duckdb.connect()
    if con.execute(f"SELECT count(*) FROM glob('{pattern}')").fetchone()[0]:
        return f"read_parquet('{pattern}')"
    cols = ", ".join(f"NULL::VARCHAR AS {c}" for c in columns.split(","))
    return f"(SELECT {cols} WHERE false)"


def subsets_of(output: str) -> list[str]:
    """The subsets of a build folder: those ``stats.json`` lists, else those with files."""
    import json

    try:
        with open(os.path.join(output, "stats.json"), encoding="utf-8") as f:
            listed = json.load(f).get("subsets")
        if listed:
            return list(listed)
    except (OSError, ValueError):
        pass
    found = set()
    for folder in ("index", "rejects", "duplicates"):
        for name in os.listdir(os.path.join(output, folder)) if os.path.isdir(
                os.path.join(output, folder)) else []:
            if name.endswith(".parquet") and "-" in name:
                found.add(name.rsplit("-", 1)[0])
    return sorted(found)


def stage_table(output: str, subset: str | None = None) -> list[dict]:
    """RS5M's PUB11 table (per source) of ``subset`` (default: the whole build)."""
    con = duckdb.connect()
    sql = STAGE_SQL.format(
        index=_table(output, "index", "source,caption", subset),
        rejects=_table(output, "rejects", "source,stage,reason", subset),
        duplicates=_table(output, "duplicates", "source,stage,method", subset),
    )
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _stage_rank(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def funnel_table(output: str, subset: str) -> tuple[list[str], list[list]]:
    """(header, rows) of a subset's funnel: per source, input, what each stage took out
    (``stage ✗`` rejected, ``stage ≡`` duplicate), kept; a TOTAL row last."""
    con = duckdb.connect()
    index = _table(output, "index", "source,caption", subset)
    rejects = _table(output, "rejects", "source,stage,reason", subset)
    dups = _table(output, "duplicates", "source,stage,method", subset)
    kept = dict(con.execute(f"SELECT source, count(*) FROM {index} GROUP BY 1").fetchall())
    out: dict[tuple[str, str], dict[str, int]] = {}
    for kind, rel in (("✗", rejects), ("≡", dups)):
        for source, stage, n in con.execute(
                f"SELECT source, stage, count(*) FROM {rel} GROUP BY 1, 2").fetchall():
            out.setdefault((stage, kind), {})[source] = n
    columns = sorted(out, key=lambda sk: (_stage_rank(sk[0]), sk[1]))
    sources = sorted(set(kept) | {s for v in out.values() for s in v})
    rows = []
    for source in sources:
        taken = [out[c].get(source, 0) for c in columns]
        rows.append([source, kept.get(source, 0) + sum(taken), *taken, kept.get(source, 0)])
    if rows:
        rows.append(["TOTAL", *[sum(r[i] for r in rows) for i in range(1, len(rows[0]))]])
    return ["source", "input", *[f"{st} {k}" for st, k in columns], "kept"], rows


def reason_table(output: str, subset: str | None = None) -> list[tuple[str, str, str, int]]:
    """(outcome, stage, reason, count) over ``subset`` (default: the build), largest first."""
    con = duckdb.connect()
    rejects = _table(output, "rejects", "source,stage,reason", subset)
    dups = _table(output, "duplicates", "source,stage,method", subset)
    return con.execute(
        f"""SELECT 'rejected', stage, reason, count(*) FROM {rejects} GROUP BY ALL
            UNION ALL
            SELECT 'duplicate', stage, method, count(*) FROM {dups} GROUP BY ALL
            ORDER BY 4 DESC, 1, 2, 3"""
    ).fetchall()


def caption_token_lengths(output: str) -> dict[tuple[str, str], np.ndarray]:
    """Training-caption lengths in CLIP tokens, start and end tokens counted, per
    (subset, source): the build's own count (``caption_tokens``, from the tokenizer of its CLIP
    model) where a row has one, else open_clip's BPE tokenizer (the trainer's default)."""
    from open_clip.tokenizer import _tokenizer

    con = duckdb.connect()
    index = _table(output, "index", "subset,source,caption,caption_tokens")
    out: dict[tuple[str, str], list[int]] = {}
    for subset, source, caption, tokens in con.execute(
            f"SELECT subset, source, caption, caption_tokens FROM {index} "
            "ORDER BY subset, source").fetchall():
        n = tokens if tokens is not None else len(_tokenizer.encode(caption)) + 2
        out.setdefault((subset, source), []).append(int(n))
    return {k: np.array(v, dtype=np.int64) for k, v in out.items()}


def caption_length_table(output: str, context_length: int = 77
                         ) -> tuple[list[str], list[list]]:
    """Per subset and source: caption-token quantiles and the share over the context."""
    header = ["subset", "source", "n", "mean", "p5", "p50", "p95", "max",
              f"> {context_length} ctx"]
    rows = []
    by_source = caption_token_lengths(output)
    everything = [a for a in by_source.values()]
    items = list(by_source.items())
    if len(items) > 1:
        items.append((("ALL", ""), np.concatenate(everything)))
    for (subset, source), a in items:
        q = np.percentile(a, [5, 50, 95]).round(1)
        over = float((a > context_length).mean() * 100)
        rows.append([subset, source, len(a), round(float(a.mean()), 1), *q, int(a.max()),
                     f"{over:.1f}%"])
    return header, rows


def _fmt_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def pub11_table(output: str, subset: str = "pub11") -> tuple[list[str], list[list]]:
    rows = stage_table(output, subset)
    total = {k: sum(r[k] for r in rows) for k, _ in COLUMNS}
    body = [[r["source"]] + [r[k] for k, _ in COLUMNS] for r in rows]
    body.append(["TOTAL"] + [total[k] for k, _ in COLUMNS])
    return ["source"] + [label for _, label in COLUMNS], body


def report(output: str, context_length: int = 77) -> str:
    out = []
    for subset in subsets_of(output):
        if subset == "pub11":
            header, body = pub11_table(output, subset)
            out.append(f"Subset {subset}: stages per source (RS5M PUB11 shape):")
        else:
            header, body = funnel_table(output, subset)
            out.append(f"Subset {subset}: stages per source (✗ rejected, ≡ duplicate):")
        out += [_fmt_table(header, body), ""]
        reasons = reason_table(output, subset)
        if reasons:
            out += [f"Subset {subset}: rejects and duplicates by reason:",
                    _fmt_table(["outcome", "stage", "reason", "count"],
                               [list(r) for r in reasons]), ""]
    header, rows = caption_length_table(output, context_length)
    if rows:
        out += ["Training-caption length in CLIP tokens, start/end included (kept samples):",
                _fmt_table(header, rows)]
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
