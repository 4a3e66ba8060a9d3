"""Score a build of the demo world against its ground truth.

The demo world knows, for every parquet row, whether its image is an aerial scene, which
planted case it is and where a correct pipeline puts it (``ground_truth.parquet``). This
module joins that with what the build wrote and reports:

- every planted row whose outcome (kept / rejected / duplicate) differs from the expectation;
- the RS-image filter's precision and recall over the rows that reached it (positive = kept,
  truth = the image is an aerial scene), and the share of keyword-passing non-RS rows it
  rejected.
"""

from __future__ import annotations

import os
from typing import Any

import duckdb

from pipelines.stats import _fmt_table, _table, subsets_of


def outcomes(output: str, demo_world: str) -> list[dict[str, Any]]:
    """Ground-truth rows of every subset the build holds (``pub11``, ``rs3``, ``local``,
    ``remoteclip``, ``skyscript``),
    with the build's outcome, stage and reason added.

    Two rows may share a (source, source_id) (a planted repeated id): each truth row takes
    the outcome that matches it best, so the pair is scored as one kept and one rejected.
    When ``local`` was built with ``pub11``, PUB11's copy of the image the folder shares is
    expected as a duplicate of the folder's (the cross-subset survivor rule)."""
    con = duckdb.connect()
    built = set(subsets_of(output))
    gt = os.path.join(demo_world, "ground_truth.parquet")
    truths = []
    if "pub11" in built or not built:
        truths.append(f"SELECT 'pub11' AS subset, *, NULL::VARCHAR AS shared_key "
                      f"FROM read_parquet('{gt}')")
    for subset in ("local", "rs3", "remoteclip", "skyscript"):
        path = os.path.join(demo_world, f"{subset}_truth.parquet")
        if subset in built and os.path.exists(path):
            truths.append(f"SELECT '{subset}' AS subset, * FROM read_parquet('{path}')")
    index = _table(output, "index", "source,source_id,rs_score")
    rejects = _table(output, "rejects", "source,source_id,stage,reason,score")
    dups = _table(output, "duplicates", "source,source_id,stage,method,duplicate_of")
    cur = con.execute(
        f"""
        WITH got AS (
          SELECT source, source_id, 'kept' AS outcome, 'sink' AS stage, NULL AS reason,
                 rs_score AS score FROM {index}
          UNION ALL
          SELECT source, source_id, 'rejected', stage, reason, score FROM {rejects}
          UNION ALL
          SELECT source, source_id, 'duplicate', stage, method, NULL FROM {dups}),
        truth AS ({" UNION ALL BY NAME ".join(truths)}),
        joined AS (
          SELECT truth.*, got.outcome, got.stage AS got_stage, got.reason AS got_reason,
                 got.score AS got_score,
                 row_number() OVER (PARTITION BY truth.subset, truth.source, truth.row
                   ORDER BY (got.outcome = truth.expected) DESC NULLS LAST,
                            (got.reason = truth.expected_reason) DESC NULLS LAST) AS pick
          FROM truth LEFT JOIN got USING (source, source_id))
        SELECT * EXCLUDE (pick) FROM joined WHERE pick = 1
        ORDER BY subset DESC, source, row"""
    )
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    for r in rows:  # every image of the archive subsets is an aerial one
        if r.get("is_rs") is None and r["subset"] != "pub11":
            r["is_rs"] = True
    _scenes_and_unread(con, index, rows)
    shared = {r["shared_key"] for r in rows if r.get("shared_key")}
    for r in rows:
        if r["subset"] == "pub11" and r["key"] in shared:
            r.update(expected="duplicate", expected_stage="dedup", expected_reason="sha256",
                     planted=r["planted"] or "shared_with_local")
    return rows


def _scenes_and_unread(con: Any, index: str, rows: list[dict[str, Any]]) -> None:
    """Rows the truth cannot name one outcome for: a large scene (``expected`` "tiled") ends
    as the tiles kept from it (``{source_id}@x_y_size``); an image the recipe must not read
    (``expected`` "not_read", a caption set's test split) ends nowhere."""
    tiles: dict[tuple[str, str], int] = {}
    if any(r["expected"] == "tiled" for r in rows):
        for source, source_id in con.execute(
                f"SELECT source, source_id FROM {index} WHERE source_id LIKE '%@%'").fetchall():
            scene = (source, source_id.split("@", 1)[0])
            tiles[scene] = tiles.get(scene, 0) + 1
    for r in rows:
        if r["expected"] == "tiled" and r["outcome"] is None:
            if tiles.get((r["source"], r["source_id"])):
                r.update(outcome="tiled", got_stage="sink",
                         got_reason=f"{tiles[(r['source'], r['source_id'])]} tiles")
        elif r["expected"] == "not_read" and r["outcome"] is None:
            r.update(outcome="not_read")


def rs_filter_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    reached = [
        r for r in rows if r.get("subset", "pub11") == "pub11" and (
            r["outcome"] == "kept" or (r["outcome"] == "rejected" and r["got_stage"] == "rs_filter"))
    ]
    tp = sum(1 for r in reached if r["outcome"] == "kept" and r["is_rs"])
    fp = sum(1 for r in reached if r["outcome"] == "kept" and not r["is_rs"])
    fn = sum(1 for r in reached if r["outcome"] != "kept" and r["is_rs"])
    tn = sum(1 for r in reached if r["outcome"] != "kept" and not r["is_rs"])
    return {
        "reached": len(reached),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "non_rs_rejected": tn / (tn + fp) if tn + fp else float("nan"),
    }


def mismatches(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose outcome or stage differs from the ground truth's expectation.

    Only rows the world can predict are checked: RS rows and planted cases (a non-RS row's
    fate at the RS filter is the filter's accuracy, reported separately).
    """
    bad = []
    for r in rows:
        if r["outcome"] is None:
            bad.append(r)
            continue
        if not (r["is_rs"] or r["planted"]) or r["expected_stage"] == "rs_filter":
            continue
        if r["outcome"] == "kept" and r["expected"] == "kept":
            continue
        if r["outcome"] == r["expected"] and (
            r["expected_stage"] is None or r["expected_stage"] == r["got_stage"]
            or r["outcome"] == "duplicate"
        ):
            continue
        if r["is_rs"] and not r["planted"] and r["got_stage"] == "rs_filter":
            continue  # an RS scene the filter missed: counted in its recall
        bad.append(r)
    return bad


def rs3_scores(output: str, demo_world: str, context_length: int = 77) -> dict[str, Any] | None:
    """How RS3's kept captions fare against the world's truth: the share whose picked and
    top generated captions name the scene, the share whose training caption exceeds the
    context, and whether each caption ends with its whole picked generated caption."""
    truth = os.path.join(demo_world, "rs3_truth.parquet")
    if "rs3" not in subsets_of(output) or not os.path.exists(truth):
        return None
    con = duckdb.connect()
    index = _table(output, "index", "source,source_id,caption,generated,generated_pick,"
                   "caption_tokens,meta_caption", subset="rs3")
    rows = con.execute(
        f"""SELECT i.source, i.source_id, i.caption, i.generated, i.generated_pick,
                   i.caption_tokens, i.meta_caption, t.scene_class FROM {index} i
            JOIN read_parquet('{truth}') t USING (source, source_id)
            WHERE t.scene_class IS NOT NULL""").fetchall()
    if not rows:
        return None
    n = len(rows)
    from pipelines.demo.scenes import names_scene

    picked = sum(names_scene(r[3][r[4]], r[7]) for r in rows)
    top = sum(names_scene(r[3][0], r[7]) for r in rows)
    over = sum((r[5] or 0) > context_length for r in rows)
    whole = sum(r[2].endswith(r[3][r[4]]) for r in rows)
    return {"n": n, "pick_names_scene": picked / n, "top_names_scene": top / n,
            "over_context": over / n, "keeps_generated": whole / n,
            "max_tokens": max(r[5] or 0 for r in rows)}


def report(output: str, demo_world: str) -> str:
    rows = outcomes(output, demo_world)
    s = rs_filter_scores(rows)
    planted = sorted({r["planted"] for r in rows if r["planted"]})
    per_case = []
    for case in planted:
        members = [r for r in rows if r["planted"] == case]
        got = sorted({f"{r['outcome']}:{r['got_stage']}/{r['got_reason']}" for r in members})
        exp = ", ".join(sorted({r["expected"] for r in members}))
        per_case.append([case, len(members), exp, ", ".join(got)])
    bad = mismatches(rows)
    lines = [
        "Demo world: planted cases and where they ended:",
        _fmt_table(["planted", "rows", "expected", "got (outcome:stage/reason)"], per_case),
        "",
        f"Rows not where the ground truth expects them: {len(bad)}",
    ]
    if s["reached"]:  # the RS filter ran (pub11 was built)
        lines.insert(-1, f"RS filter vs ground truth: precision {s['precision']:.3f}  "
                         f"recall {s['recall']:.3f}  (tp {s['tp']} fp {s['fp']} fn {s['fn']} "
                         f"tn {s['tn']}); non-RS keyword hits rejected: "
                         f"{s['non_rs_rejected']:.1%}")
    rs3 = rs3_scores(output, demo_world)
    if rs3:
        lines.insert(-1, f"RS3 captions ({rs3['n']} kept scenes): the picked caption names the "
                         f"scene in {rs3['pick_names_scene']:.0%} (the top by generation "
                         f"{rs3['top_names_scene']:.0%}); over the 77-token context: "
                         f"{rs3['over_context']:.0%} (max {rs3['max_tokens']} tokens); whole "
                         f"generated caption kept: {rs3['keeps_generated']:.0%}")
    for r in bad[:20]:
        lines.append(
            f"  {r['subset']}/{r['source']}:{r['source_id']} planted={r['planted']} "
            f"expected={r['expected']}"
            f"/{r['expected_stage']} got={r['outcome']}/{r['got_stage']}/{r['got_reason']}"
        )
    return "\n".join(lines)
