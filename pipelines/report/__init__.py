"""``make report OUTPUT=dir``: a corpus report people would rather look at than read.

``python -m pipelines.report OUTPUT [--out DIR] [--seed N] [--max-samples N]`` writes
``OUTPUT/report/index.html`` and the PNG charts it shows, computed from the build's own files
(DuckDB over ``index/``, ``rejects/``, ``duplicates/``; ``stats.json``; ``manifest.json``; the
shards for the pictures). One self-contained page: pictures embedded as small base64 JPEGs,
charts beside it, no script, no network, nothing remote referenced. Sections:

1. **Funnel** per subset and source: what each stage took out (the stage table of
   ``pipelines.stats``; RS5M's PUB11 shape for ``pub11``) as a chart with the numbers, checked
   against ``stats.json``.
2. **Samples**: a seeded random grid of kept samples per subset (image, training caption, key,
   source) and the lowest and highest ``clip_score`` samples of the build.
3. **Duplicates** side by side: survivor (from its shard) and dropped copy (its input, when
   that is a local file that still exists) with method and similarity, a few per method.
4. **Rejects** by reason per stage, with a few example rows each.
5. **Captions**: length in CLIP tokens with the context limit, the share over it, caption
   kinds, top words, classes and tags.
6. **Map** of geolocated samples over Natural Earth's land, shipped in the package.
7. **Datasheet**: sources and licences, counts, the manifest's config and versions, the git
   revision, the decontamination tables when there are any.

A column a build does not have, or has empty, leaves its part out with a sentence saying so.
Large builds are sampled (caps: :class:`pipelines.report.queries.Caps`); counts are exact.
Same build and seed → same bytes.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

from pipelines.report import charts, queries, thumbs
from pipelines.report.page import card, clip, e, img, num, page, table
from pipelines.report.queries import CONTEXT_LENGTH, Caps

__all__ = ["Caps", "build_report"]


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def _funnel_section(output: str, folder: str, stats: dict[str, Any], subsets: list[str]
                    ) -> str:
    expected = queries.stats_counts(stats)
    per_subset = {d["subset"]: d for d in stats.get("by_subset", [])}
    parts = [(f'<p class="note">Recomputed from the files with DuckDB and checked against '
             f"<code>stats.json</code> (input {num(stats.get('input'))}, kept "
             f"{num(stats.get('kept'))}, rejected {num(stats.get('rejected'))}, duplicates "
             f"{num(stats.get('duplicates'))}). ✗ rejected, ≡ duplicate.</p>")]
    for subset in subsets:
        f = queries.funnel(output, subset)
        d = per_subset.get(subset, {})
        parts.append(f"<h3>{e(subset)} <small class=\"note\">recipe {e(d.get('recipe'))}"
                     "</small></h3>")
        # per source, from the files: input, kept, rejected, duplicates
        header = f["header"]
        acc = []
        for row in f["rows"]:
            rej = sum(n for h, n in zip(header[2:-1], row[2:-1], strict=True)
                      if h.endswith("✗"))
            dup = sum(n for h, n in zip(header[2:-1], row[2:-1], strict=True)
                      if h.endswith("≡"))
            acc.append([row[0], row[1], row[-1], rej, dup])
        bad = []
        for source, n_in, kept, rej, dup in acc:
            if source == "TOTAL":
                want = {k: d.get(k) for k in ("input", "kept", "rejected", "duplicates")}
            else:
                want = expected.get((subset, source), {})
            got = {"input": n_in, "kept": kept, "rejected": rej, "duplicates": dup}
            bad += [f"{source} {k}: files {v}, stats.json {want.get(k)}"
                    for k, v in got.items() if want.get(k) != v]
        parts.append(
            f'<p class="ok">✓ the files agree with stats.json for every source of {e(subset)}'
            "</p>" if not bad else
            '<p class="bad">✗ the files disagree with stats.json: ' + e("; ".join(bad)) + "</p>")
        if f["rs5m"]:
            r = f["rs5m"]
            name = charts.funnel(folder, f"funnel-{_slug(subset)}-rs5m.png",
                                 f"{subset}: RS5M's stage table", r["steps"], r["per_source"])
            parts.append(f'<div class="cols"><div>{img(name, f"{subset} RS5M funnel")}</div>'
                         f'<div>{table(r["header"], r["rows"], f"rs5m-{subset}", "funnel")}'
                         "</div></div>")
        name = charts.funnel(folder, f"funnel-{_slug(subset)}.png",
                             f"{subset}: samples remaining after each stage", f["steps"],
                             f["per_source"])
        parts.append(
            f'<div class="cols"><div>{img(name, f"{subset} funnel")}</div><div>'
            + table(header, f["rows"], f"funnel-{subset}", "funnel")
            + table(["source", "input", "kept", "rejected", "duplicates"], acc,
                    f"accounting-{subset}", "accounting") + "</div></div>")
    return "\n".join(parts)


def _samples_section(con, output: str, subsets: list[str], caps: Caps, seed: int) -> str:
    grids = {s: queries.grid(con, output, s, caps, seed) for s in subsets}
    ext = queries.extremes(con, output, caps)
    wanted = [(r["shard"], r["key"]) for g in grids.values() for r in g]
    if ext:
        wanted += [(r["shard"], r["key"]) for side in ext for r in side]
    pics = thumbs.read_members(output, wanted)
    uris = {k: thumbs.data_uri(b) for k, b in pics.items()}
    parts = [(f'<p class="note">{caps.grid} seeded random kept samples per subset (seed '
             f"{seed}), drawn from at most {caps.grid_shards} shards of it; the image as "
             "written to the shard and the training caption.</p>")]
    for s in subsets:
        parts.append(f"<h3>{e(s)}</h3>")
        if not grids[s]:
            parts.append('<p class="note">No kept samples.</p>')
            continue
        parts.append(f'<div class="grid" id="grid-{e(s)}">'
                     + "".join(card(r, uris.get(r["key"])) for r in grids[s]) + "</div>")
    parts.append("<h3>Lowest and highest clip_score</h3>")
    if not ext:
        parts.append('<p class="note">This build has no clip_score (built without '
                     "--embed).</p>")
    else:
        for label, side in (("lowest", ext[0]), ("highest", ext[1])):
            parts.append(f"<p><b>{label} {len(side)}</b></p>"
                         f'<div class="grid" id="clip-{label}">'
                         + "".join(card(r, uris.get(r["key"])) for r in side) + "</div>")
    return "\n".join(parts)


def _duplicates_section(con, output: str, caps: Caps, seed: int) -> str:
    d = queries.duplicates(con, output, caps, seed)
    if not d["counts"]:
        return '<p class="note">No duplicates in this build.</p>'
    parts = [table(["method", "duplicates"], d["counts"], "duplicate-methods"),
             (f'<p class="note">{caps.duplicates_per_method} seeded examples per method: the '
             "survivor as kept in its shard, and the dropped copy's input where it is a local "
             "file that still exists (web inputs are never fetched: their URL is shown as "
             "text).</p>")]
    pics = thumbs.read_members(output, [(x["survivor"]["shard"], x["survivor"]["key"])
                                        for x in d["examples"] if x["survivor"]])
    method = None
    for x in d["examples"]:
        if x["method"] != method:
            if method is not None:
                parts.append("</div>")
            method = x["method"]
            parts.append(f'<h3>{e(method)}</h3><div class="pairs">')
        surv = x["survivor"]
        s_uri = thumbs.data_uri(pics[surv["key"]]) if surv and surv["key"] in pics else None
        local = thumbs.local_file(x["url"])
        d_uri = thumbs.data_uri(local) if local else None
        dropped = (f'<img src="{e(d_uri)}" alt="{e(x["key"])}">' if d_uri else
                   '<div class="noimg">not stored in the build</div>')
        sim = x["similarity"]
        parts.append(
            '<div class="pair">' + card(surv, s_uri, " · survivor")
            + f"<figure>{dropped}<figcaption><div class=\"meta\">{e(x['key'])} · "
            f"{e(x['subset'])} · {e(x['source'])} · dropped</div>"
            f"<div class=\"meta\">{e(x['source_id'])}</div>"
            f"<div class=\"meta\">{e(x['url'])}</div></figcaption></figure>"
            f'<div class="why"><b>{e(x["method"])}</b> at stage {e(x["stage"])}<br>'
            f"similarity {'' if sim is None else f'{float(sim):.4f}'}<br>"
            f"duplicate of <code>{e(x['duplicate_of'])}</code></div></div>")
    if method is not None:
        parts.append("</div>")
    return "\n".join(parts)


def _rejects_section(con, folder: str, output: str, subsets: list[str], caps: Caps,
                     seed: int) -> str:
    parts = []
    for s in subsets:
        r = queries.rejects(con, output, s, caps, seed)
        parts.append(f"<h3>{e(s)}</h3>")
        if not r["counts"]:
            parts.append('<p class="note">No rejects.</p>')
            continue
        items = [(f"{stage}: {reason}", n) for stage, reason, n in r["counts"]]
        body = []
        for stage, reason, n in r["counts"]:
            ex = "".join(
                '<div class="ex">' + " · ".join(
                    e(v) for v in (x["source"], x["source_id"], x["url"],
                                   x["caption"] and clip(x["caption"], 160),
                                   x["detail"] and clip(x["detail"], 240),
                                   x["score"] is not None and f"score {x['score']:.3f}")
                    if v) + "</div>"
                for x in r["examples"].get((stage, reason), []))
            body.append(f'<tr><td>{e(stage)}</td><td>{e(reason)}</td><td class="n">{num(n)}'
                        f"</td><td>{ex}</td></tr>")
        chart = charts.bars(folder, f"rejects-{_slug(s)}.png", f"{s}: rejected, by reason",
                            items[: caps.top * 2])
        parts.append(
            f'<div class="cols"><div>{img(chart, f"{s} rejects")}</div><div>'
            f'<table id="rejects-{e(s)}" class="rejects"><thead><tr><th>stage</th>'
            "<th>reason</th><th>rejected</th><th>examples (source · id · url · caption · "
            "detail)</th></tr></thead><tbody>" + "".join(body) + "</tbody></table></div></div>")
    return "\n".join(parts)


def _captions_section(con, folder: str, output: str, subsets: list[str], caps: Caps,
                      seed: int) -> str:
    parts = []
    summary = []
    for s in subsets:
        c = queries.captions(con, output, s, caps, seed)
        a = c["lengths"]
        summary.append([s, c["total"], len(a), round(float(a.mean()), 1) if len(a) else None,
                        int(a.max()) if len(a) else None, c["over_count"],
                        f"{100 * c['over_share']:.1f}%"])
        parts.append(f"<h3>{e(s)}</h3><p class=\"note\">Lengths: {e(c['how'])}.</p>")
        if not len(a):
            parts.append('<p class="note">No kept samples.</p>')
            continue
        row = [charts.caption_lengths(folder, f"captions-{_slug(s)}.png",
                                      f"{s}: caption length", a, CONTEXT_LENGTH)]
        if len(c["kinds"]) > 1:
            row.append(charts.bars(folder, f"kinds-{_slug(s)}.png", f"{s}: caption kinds",
                                   c["kinds"]))
        parts.append('<div class="cols">' + "".join(img(n, n) for n in row) + "</div>")
        cols = [table(["caption kind", "samples"], c["kinds"], f"kinds-{s}")]
        if c["words"]:
            cols.append(table([f"top words (of {c['words_over']:,} captions)", "count"],
                              c["words"], f"words-{s}"))
        cols.append(table(["class (labels)", "samples"], c["labels"], f"labels-{s}")
                    if c["labels"] else '<p class="note">No class labels.</p>')
        cols.append(table(["OSM tag", "samples"], c["tags"], f"tags-{s}")
                    if c["tags"] else '<p class="note">No OSM tags.</p>')
        parts.append('<div class="cols">' + "".join(f"<div>{x}</div>" for x in cols)
                     + "</div>")
    head = table(["subset", "samples", "lengths counted", "mean", "max",
                  f"> {CONTEXT_LENGTH} tokens", "share over"], summary, "caption-lengths")
    return head + "\n" + "\n".join(parts)


def _map_section(con, folder: str, output: str, caps: Caps, seed: int) -> str:
    g = queries.geo(con, output, caps, seed)
    if g is None:
        return '<p class="note">No geolocated samples (no lat/lon in this build).</p>'
    name = charts.world_map(folder, "map.png", g["points"])
    return (f'<p class="note">{len(g["points"]):,} of '
            f'{sum(n for _, n in g["points"] and g["per_subset"]):,} geolocated samples '
            f"shown (cap {caps.map_points:,}); land: Natural Earth 1:110m, shipped with the "
            "package.</p>" + table(["subset", "geolocated samples"], g["per_subset"], "geo")
            + img(name, "map of geolocated samples"))


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out = []
        for k in sorted(d):
            out += _flatten(d[k], f"{prefix}{k}.")
        return out
    return [(prefix[:-1], d if not isinstance(d, list) else ", ".join(map(str, d)))]


def _datasheet_section(con, output: str, stats: dict[str, Any]) -> str:
    parts = ["<h3>Sources and licences</h3>",
             table(["subset", "source", "licence", "kept samples"],
                   queries.licences(con, output), "licences")]
    expected = queries.stats_counts(stats)
    parts += ["<h3>Counts (stats.json)</h3>",
              table(["subset", "source", "input", "kept", "rejected", "duplicates"],
                    [[s, src, *(v[k] for k in ("input", "kept", "rejected", "duplicates"))]
                     for (s, src), v in sorted(expected.items())], "datasheet-counts")]
    m = queries.load_manifest(output)
    if m is None:
        parts.append('<p class="note">No manifest.json.</p>')
    else:
        top = [("recipe", m.get("recipe")), ("git revision", m.get("git_revision")),
               ("schema version", m.get("schema_version")), ("runner", m.get("runner")),
               ("python", m.get("python")), ("built subsets", m.get("built_subsets"))]
        top += [(f"version {k}", v) for k, v in sorted((m.get("versions") or {}).items())]
        parts += ["<h3>Build</h3>", table(["", ""], [[k, v if not isinstance(v, list) else
                                                       ", ".join(map(str, v))]
                                                      for k, v in top], "manifest")]
        per = m.get("subsets") or {}
        configs = {s: per[s].get("config") for s in sorted(per) if isinstance(per[s], dict)}
        if not configs:
            configs = {"build": m.get("config") or {}}
        for s, cfg in configs.items():
            parts.append(f"<details><summary>config of {e(s)}</summary>"
                         + table(["flag", "value"], _flatten(cfg or {}), f"config-{s}")
                         + "</details>")
    removed, by_source = queries.decontamination(con, output)
    parts.append("<h3>Decontamination</h3>")
    if not removed:
        parts.append('<p class="note">No sample was removed as a benchmark copy (or the build '
                     "ran without --decontam).</p>")
    else:
        parts.append(table(["benchmark", "removed", "by pHash", "by embedding",
                            "benchmark images hit"],
                           [[r["benchmark"], r["removed"], r["by_phash"], r["by_embedding"],
                             r["images"]] for r in removed], "decontam"))
        parts.append(table(["subset", "source", "benchmark", "removed"], by_source,
                           "decontam-by-source"))
    return "\n".join(parts)


def build_report(output: str, out_dir: str | None = None, seed: int = 0,
                 caps: Caps | None = None) -> str:
    """Write the report of the build in ``output``; returns the path of ``index.html``."""
    caps = caps or Caps()
    # the CLIP tokenizer comes with torch (seconds to import): import it while DuckDB works
    threading.Thread(target=importlib.import_module, args=("open_clip.tokenizer",),
                     daemon=True).start()
    if not os.path.isfile(os.path.join(output, "stats.json")):
        raise FileNotFoundError(f"{output} has no stats.json: build it first "
                                f"(make build-rs5m OUTPUT={output})")
    folder = out_dir or os.path.join(output, "report")
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # charts of an earlier report
        if name.endswith(".png"):
            os.remove(os.path.join(folder, name))
    stats = queries.load_stats(output)
    subsets = queries.build_stats.subsets_of(output)
    con = queries.connect()
    sections = {
        "funnel": _funnel_section(output, folder, stats, subsets),
        "samples": _samples_section(con, output, subsets, caps, seed),
        "duplicates": _duplicates_section(con, output, caps, seed),
        "rejects": _rejects_section(con, folder, output, subsets, caps, seed),
        "captions": _captions_section(con, folder, output, subsets, caps, seed),
        "map": _map_section(con, folder, output, caps, seed),
        "datasheet": _datasheet_section(con, output, stats),
    }
    title = f"Corpus report: {os.path.basename(os.path.abspath(output))}"
    sub = (f"recipe {stats.get('recipe')} · subsets {', '.join(subsets)} · "
           f"{stats.get('input', 0):,} input → {stats.get('kept', 0):,} kept · seed {seed}")
    path = os.path.join(folder, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page(title, sub, sections))
    return path
