"""What the report shows, computed from a build's own files with DuckDB.

Counts (funnel, rejects by reason, caption kinds, classes, tags, the datasheet) are exact:
DuckDB aggregates whole columns of ``index/``, ``rejects/`` and ``duplicates/`` without
materialising rows. Row-level views are capped (:class:`Caps`) and drawn by a seeded order,
``md5(key || seed)``, so the same build and seed give the same page on any machine:

* the sample grid reads the index files of at most ``grid_shards`` shards per subset (chosen by
  seeded hash of the file name; a sample's shard is a hash of its key, so each shard is a
  uniform draw of its subset) and shows ``grid`` samples of them;
* caption lengths and top words: the build's own ``caption_tokens`` where every row has one
  (exact over all rows); else ``caption_sample`` captions per subset are tokenised (exact when
  the subset is no larger);
* the map plots at most ``map_points`` geolocated samples (the count of all is exact).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from collections import Counter
from typing import Any

import duckdb
import numpy as np

from pipelines import stats as build_stats
from pipelines.stats import _table

CONTEXT_LENGTH = 77  # CLIP's text context, start and end tokens included

INDEX_COLUMNS = ("key,subset,source,source_id,url,license,shard,caption,caption_kind,"
                 "caption_tokens,clip_score,lat,lon,labels,tags")
REJECT_COLUMNS = "key,subset,source,source_id,url,caption,stage,reason,detail,score"
DUPLICATE_COLUMNS = "key,subset,source,source_id,url,stage,duplicate_of,method,similarity"
STOPWORDS = frozenset(
    ["the", "a", "an", "of", "and", "in", "on", "with", "at", "to", "for", "from", "by", "is", "are", "this", "that", "its", "it", "as", "near", "into", "over", "under", "image", "photo", "picture", "view"])


@dataclasses.dataclass(frozen=True)
class Caps:
    """How much of a large build the report reads (the counts are always exact)."""

    grid: int = 12  # seeded random kept samples shown per subset
    grid_shards: int = 4  # ... drawn from at most this many shards per subset
    extremes: int = 6  # lowest and highest clip_score samples of the build, each
    duplicates_per_method: int = 3
    reject_examples: int = 3  # example rows per (stage, reason)
    caption_sample: int = 2_000  # captions tokenised per subset when the build has no count
    map_points: int = 20_000
    top: int = 15  # top words / classes / tags per subset


def connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    return con


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def columns_of(con: duckdb.DuckDBPyConnection, rel: str) -> set[str]:
    """The columns a relation has (an older build, or an empty folder, lacks some)."""
    return {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {rel}").fetchall()}


def index_rel(output: str, subset: str | None = None) -> str:
    return _table(output, "index", INDEX_COLUMNS, subset)


def order(seed: int) -> str:
    """A seeded, deterministic row order."""
    return f"md5(key || {_q(str(seed))})"


def rows(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _pick(col: str, have: set[str], cast: str = "VARCHAR") -> str:
    return col if col in have else f"NULL::{cast} AS {col}"


# ----------------------------------------------------------------------------- 1 funnel


def load_stats(output: str) -> dict[str, Any]:
    with open(os.path.join(output, "stats.json"), encoding="utf-8") as f:
        return json.load(f)


OUTCOME = {"kept": "kept", "rejected": "rejected", "duplicate": "duplicates"}


def stats_counts(stats: dict[str, Any]) -> dict[tuple[str, str], dict[str, int]]:
    """{(subset, source): {input, kept, rejected, duplicates}} from ``stats.json``'s counts."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for c in stats.get("counts", []):
        d = out.setdefault((c["subset"], c["source"]),
                           {"input": 0, "kept": 0, "rejected": 0, "duplicates": 0})
        d["input"] += c["count"]
        d[OUTCOME[c["outcome"]]] += c["count"]
    return out


def funnel(output: str, subset: str) -> dict[str, Any]:
    """A subset's funnel: the per-source stage table (``pipelines.stats``), the steps of its
    chart (what remains after each stage, per source) and, for ``pub11``, RS5M's table."""
    header, body = build_stats.funnel_table(output, subset)
    steps: list[str] = ["input"]
    per_source: dict[str, list[int]] = {}
    stage_cols = header[2:-1]
    for row in body:
        if row[0] == "TOTAL":
            continue
        left = [row[1]]
        for n in row[2:-1]:
            left.append(left[-1] - n)
        per_source[row[0]] = left
    steps += [f"after {c}" for c in stage_cols]
    out: dict[str, Any] = {"header": header, "rows": body, "steps": steps,
                           "per_source": per_source, "rs5m": None}
    if subset == "pub11":
        h, b = build_stats.pub11_table(output, subset)
        rs5m_steps = ["input", "keyword hits", "downloaded", "valid", "after dedup", "RS",
                      "kept"]
        per = {}
        for r in build_stats.stage_table(output, subset):
            valid = r["downloaded"] - r["invalid"]
            after = valid - r["duplicates"]
            per[r["source"]] = [r["input"], r["keyword_hits"], r["downloaded"], valid, after,
                                after - r["non_rs"], r["kept"]]
        out["rs5m"] = {"header": h, "rows": b, "steps": rs5m_steps, "per_source": per}
    return out


# ----------------------------------------------------------------------------- 2 samples


SAMPLE_COLS = ("key", "subset", "source", "shard", "caption", "caption_kind", "clip_score")


def _select(have: set[str], cols: tuple[str, ...] = SAMPLE_COLS) -> str:
    casts = {"clip_score": "FLOAT"}
    return ", ".join(_pick(c, have, casts.get(c, "VARCHAR")) for c in cols)


def grid(con: duckdb.DuckDBPyConnection, output: str, subset: str, caps: Caps, seed: int
         ) -> list[dict]:
    """Seeded random kept samples of ``subset``, read from at most ``caps.grid_shards`` index
    files (never the whole index)."""
    files = sorted(glob.glob(os.path.join(output, "index", f"{subset}-*.parquet")))
    if not files:
        return []
    files = sorted(files, key=lambda f: hashlib.md5(
        f"{seed}:{os.path.basename(f)}".encode()).hexdigest())[:caps.grid_shards]
    rel = "read_parquet([" + ", ".join(_q(f) for f in sorted(files)) + "])"
    have = columns_of(con, rel)
    return rows(con, f"SELECT {_select(have)} FROM {rel} ORDER BY {order(seed)} "
                     f"LIMIT {int(caps.grid)}")


def extremes(con: duckdb.DuckDBPyConnection, output: str, caps: Caps
             ) -> tuple[list[dict], list[dict]] | None:
    """The lowest and highest ``clip_score`` kept samples of the build (None: no scores)."""
    rel = index_rel(output)
    have = columns_of(con, rel)
    if "clip_score" not in have:
        return None
    n = con.execute(f"SELECT count(clip_score) FROM {rel}").fetchone()[0]
    if not n:
        return None
    sel = _select(have)
    low = rows(con, f"SELECT {sel} FROM {rel} WHERE clip_score IS NOT NULL "
                    f"ORDER BY clip_score, key LIMIT {int(caps.extremes)}")
    high = rows(con, f"SELECT {sel} FROM {rel} WHERE clip_score IS NOT NULL "
                     f"ORDER BY clip_score DESC, key LIMIT {int(caps.extremes)}")
    return low, high


def lookup(con: duckdb.DuckDBPyConnection, output: str, keys: list[str]) -> dict[str, dict]:
    """Index rows of ``keys`` (those kept)."""
    if not keys:
        return {}
    rel = index_rel(output)
    have = columns_of(con, rel)
    found = rows(con, f"SELECT {_select(have)} FROM {rel} WHERE key IN "
                      f"(SELECT unnest(?::VARCHAR[]))", [sorted(set(keys))])
    return {r["key"]: r for r in found}


# ----------------------------------------------------------------------------- 3 duplicates


def duplicates(con: duckdb.DuckDBPyConnection, output: str, caps: Caps, seed: int
               ) -> dict[str, Any]:
    """Counts per method and a few seeded examples of each, with their survivor's row."""
    rel = _table(output, "duplicates", DUPLICATE_COLUMNS)
    counts = con.execute(f"SELECT method, count(*) FROM {rel} GROUP BY 1 ORDER BY 2 DESC, 1"
                         ).fetchall()
    examples = rows(con, f"""
        SELECT * EXCLUDE (rn) FROM (
          SELECT key, subset, source, source_id, url, stage, duplicate_of, method, similarity,
                 row_number() OVER (PARTITION BY method ORDER BY {order(seed)}) AS rn
          FROM {rel}) WHERE rn <= {int(caps.duplicates_per_method)}
        ORDER BY method, rn""")
    survivors = lookup(con, output, [e["duplicate_of"] for e in examples])
    for e in examples:
        e["survivor"] = survivors.get(e["duplicate_of"])
    return {"counts": counts, "examples": examples}


# ----------------------------------------------------------------------------- 4 rejects


def rejects(con: duckdb.DuckDBPyConnection, output: str, subset: str, caps: Caps, seed: int
            ) -> dict[str, Any]:
    """Counts per (stage, reason), stages in pipeline order, and example rows of each."""
    rel = _table(output, "rejects", REJECT_COLUMNS, subset)
    counts = con.execute(f"SELECT stage, reason, count(*) FROM {rel} GROUP BY 1, 2").fetchall()
    counts.sort(key=lambda r: (build_stats._stage_rank(r[0]), -r[2], r[1]))
    have = columns_of(con, rel)
    ex = rows(con, f"""
        SELECT * EXCLUDE (rn) FROM (
          SELECT stage, reason, source, source_id, {_pick('url', have)},
                 {_pick('caption', have)}, {_pick('detail', have)},
                 {_pick('score', have, 'FLOAT')},
                 row_number() OVER (PARTITION BY stage, reason ORDER BY {order(seed)}) AS rn
          FROM {rel}) WHERE rn <= {int(caps.reject_examples)}
        ORDER BY stage, reason, rn""")
    by: dict[tuple[str, str], list[dict]] = {}
    for e in ex:
        by.setdefault((e["stage"], e["reason"]), []).append(e)
    return {"counts": counts, "examples": by}


# ----------------------------------------------------------------------------- 5 captions


def _tokens(captions: list[str]) -> np.ndarray:
    from open_clip.tokenizer import _tokenizer

    known: dict[str, int] = {}  # web alt text repeats: each distinct caption once
    for c in captions:
        if c not in known:
            known[c] = len(_tokenizer.encode(c)) + 2
    return np.array([known[c] for c in captions], dtype=np.int64)


def captions(con: duckdb.DuckDBPyConnection, output: str, subset: str, caps: Caps, seed: int
             ) -> dict[str, Any]:
    """Caption lengths in CLIP tokens (start/end included), kinds, top words, classes, tags."""
    rel = index_rel(output, subset)
    have = columns_of(con, rel)
    total = con.execute(f"SELECT count(*) FROM {rel}").fetchone()[0]
    counted = (con.execute(f"SELECT count(caption_tokens) FROM {rel}").fetchone()[0]
               if "caption_tokens" in have else 0)
    sample = rows(con, f"SELECT caption, {_pick('caption_tokens', have, 'INTEGER')} "
                       f"FROM {rel} ORDER BY {order(seed)} LIMIT {int(caps.caption_sample)}")
    if total and counted == total:
        # the build's own count on every row: exact over all rows
        lengths = np.array([r[0] for r in con.execute(
            f"SELECT caption_tokens FROM {rel}").fetchall()], dtype=np.int64)
        how = "the build's own caption_tokens, every row"
    else:
        have_n = [r["caption_tokens"] for r in sample if r["caption_tokens"] is not None]
        need = [r["caption"] for r in sample if r["caption_tokens"] is None]
        lengths = np.concatenate([np.array(have_n, dtype=np.int64), _tokens(need)]) \
            if sample else np.zeros(0, dtype=np.int64)
        how = ("open_clip's BPE tokenizer (caption_tokens where present), every row"
               if len(sample) == total else
               f"open_clip's BPE tokenizer over a seeded sample of {len(sample):,} of "
               f"{total:,} rows")
    over = float((lengths > CONTEXT_LENGTH).mean()) if len(lengths) else 0.0
    kinds = con.execute(f"SELECT caption_kind, count(*) FROM {rel} GROUP BY 1 "
                        "ORDER BY 2 DESC, 1").fetchall()
    words: Counter[str] = Counter()
    for r in sample:
        words.update(w for w in re.findall(r"[a-z]+", (r["caption"] or "").lower())
                     if len(w) > 2 and w not in STOPWORDS)
    top_words = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:caps.top]
    labels: list[tuple] = []
    if "labels" in have:
        labels = con.execute(
            f"SELECT l, count(*) FROM (SELECT unnest(labels) AS l FROM {rel}) "
            f"WHERE l IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {int(caps.top)}"
        ).fetchall()
    tags: list[tuple] = []
    if "tags" in have:
        tags = con.execute(
            f"SELECT e.key || '=' || e.value, count(*) FROM "
            f"(SELECT unnest(map_entries(tags)) AS e FROM {rel} WHERE tags IS NOT NULL) "
            f"GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {int(caps.top)}").fetchall()
    return {"total": total, "lengths": lengths, "how": how, "over_share": over,
            "over_count": int((lengths > CONTEXT_LENGTH).sum()), "kinds": kinds,
            "words": top_words, "words_over": len(sample), "labels": labels, "tags": tags}


# ----------------------------------------------------------------------------- 6 map


def geo(con: duckdb.DuckDBPyConnection, output: str, caps: Caps, seed: int
        ) -> dict[str, Any] | None:
    """Geolocated kept samples (at most ``caps.map_points`` of them), or None."""
    rel = index_rel(output)
    have = columns_of(con, rel)
    if not {"lat", "lon"} <= have:
        return None
    where = ("lat IS NOT NULL AND lon IS NOT NULL AND lat BETWEEN -90 AND 90 "
             "AND lon BETWEEN -180 AND 180")
    per = con.execute(f"SELECT subset, count(*) FROM {rel} WHERE {where} GROUP BY 1 ORDER BY 1"
                      ).fetchall()
    if not per:
        return None
    pts = con.execute(f"SELECT subset, lat::DOUBLE, lon::DOUBLE FROM {rel} WHERE {where} "
                      f"ORDER BY {order(seed)} LIMIT {int(caps.map_points)}").fetchall()
    return {"per_subset": per, "points": pts}


# ----------------------------------------------------------------------------- 7 datasheet


def licences(con: duckdb.DuckDBPyConnection, output: str) -> list[tuple]:
    rel = index_rel(output)
    have = columns_of(con, rel)
    return con.execute(f"SELECT subset, source, coalesce(license, '(not given)'), count(*) "
                       f"FROM (SELECT subset, source, {_pick('license', have)} FROM {rel}) "
                       "GROUP BY ALL ORDER BY 1, 2, 3 NULLS FIRST").fetchall()


DECONTAM_STAGE = "decontam"  # pipelines.stages.decontam.STAGE (that module imports Beam)


def decontamination(con: duckdb.DuckDBPyConnection, output: str
                    ) -> tuple[list[dict], list[tuple]]:
    """The decontamination stage's tables (``pipelines.stages.decontam``), when it removed
    anything (the module, and Beam with it, is only imported then)."""
    rel = _table(output, "rejects", REJECT_COLUMNS)
    if not con.execute(f"SELECT count(*) FROM {rel} WHERE stage = {_q(DECONTAM_STAGE)}"
                       ).fetchone()[0]:
        return [], []
    from pipelines.stages import decontam

    return decontam.removed_table(output), decontam.removed_by_source(output)


def load_manifest(output: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(output, "manifest.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
