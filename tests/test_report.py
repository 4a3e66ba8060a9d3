"""``make report``: the corpus report of a real small build (the local recipe on a small demo
world, tiny CLIP) and of synthetic builds (duplicates, OSM-less geo rows, hostile text, a build
whose index lacks the optional columns).

The page is parsed back: every section is there, its numbers equal ``stats.json`` (funnel per
subset, source and stage; rejects by reason) and DuckDB (caption-length share over the
context), and nothing in it references a remote URL. The browser check is by hand (see the
module docstring of ``pipelines.report``); the suite needs no Chromium.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from html.parser import HTMLParser

import duckdb
import numpy as np
import pytest

from pipelines import stats as build_stats
from pipelines.report import build_report
from pipelines.report.__main__ import main as report_main
from pipelines.report.page import SECTIONS
from pipelines.report.synthetic import write_synthetic

#: a reference that makes a browser reach out: src=/href= or CSS url() to http(s) or //
REMOTE = re.compile(r"""(?:\b(?:src|href|srcset|action|poster)\s*=\s*["']?\s*|url\(\s*["']?\s*)"""
                    r"""(?:https?:)?//""", re.IGNORECASE)


class Tables(HTMLParser):
    """Every <table id=...> of a page as rows of cell texts; <img src> values; section ids."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.sections: list[str] = []
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id") or f"_{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "section":
            self.sections.append(a.get("id"))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path: str) -> tuple[str, Tables]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    t = Tables()
    t.feed(text)
    return text, t


def as_int(cell: str) -> int:
    return int(cell.replace(",", ""))


def body(table: list[list[str]]) -> dict[str, dict[str, str]]:
    """{first cell: {header: cell}} of a table's body rows."""
    header = table[0]
    return {r[0]: dict(zip(header, r, strict=True)) for r in table[1:]}


def check_against_stats(out: str, tables: Tables) -> None:
    """The funnel (per subset, source and stage) and the rejects by reason equal stats.json."""
    stats = build_stats.subsets_of(out)
    import json

    with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
        doc = json.load(f)
    by_stage: Counter = Counter()
    totals: dict[tuple[str, str], Counter] = {}
    for c in doc["counts"]:
        mark = {"rejected": "✗", "duplicate": "≡", "kept": None}[c["outcome"]]
        t = totals.setdefault((c["subset"], c["source"]), Counter())
        t["input"] += c["count"]
        t[{"rejected": "rejected", "duplicate": "duplicates", "kept": "kept"}[c["outcome"]]] \
            += c["count"]
        if mark:
            by_stage[(c["subset"], c["source"], f"{c['stage']} {mark}")] += c["count"]
    assert stats == doc["subsets"]
    for subset in doc["subsets"]:
        funnel = body(tables.tables[f"funnel-{subset}"])
        acc = body(tables.tables[f"accounting-{subset}"])
        sources = {s for (sub, s) in totals if sub == subset}
        assert set(funnel) == sources | {"TOTAL"} == set(acc)
        for source in sources:
            row = funnel[source]
            for col, cell in row.items():
                if col.endswith(("✗", "≡")):
                    assert as_int(cell) == by_stage[(subset, source, col)], (subset, source, col)
            for k in ("input", "kept", "rejected", "duplicates"):
                assert as_int(acc[source][k]) == totals[(subset, source)][k], (source, k)
            assert as_int(row["input"]) == totals[(subset, source)]["input"]
            assert as_int(row["kept"]) == totals[(subset, source)]["kept"]
        stage_cols = [c for c in tables.tables[f"funnel-{subset}"][0] if c.endswith(("✗", "≡"))]
        assert sorted(stage_cols) == sorted({k[2] for k in by_stage if k[0] == subset})
        sub = next(d for d in doc["by_subset"] if d["subset"] == subset)
        assert {k: as_int(acc["TOTAL"][k]) for k in ("input", "kept", "rejected", "duplicates")} \
            == {k: sub[k] for k in ("input", "kept", "rejected", "duplicates")}
        # rejects by reason
        want = Counter()
        for c in doc["counts"]:
            if c["subset"] == subset and c["outcome"] == "rejected":
                want[(c["stage"], c["reason"])] += c["count"]
        got = {(r[0], r[1]): as_int(r[2]) for r in tables.tables.get(f"rejects-{subset}", [])[1:]}
        assert got == dict(want)


def check_page(path: str) -> tuple[str, Tables]:
    text, t = parse(path)
    assert t.sections == [sid for sid, _ in SECTIONS]
    assert not REMOTE.search(text), REMOTE.search(text).group(0)
    assert "<script" not in text.lower()
    folder = os.path.dirname(path)
    for src in t.images:
        assert src.startswith("data:image/jpeg;base64,") or (
            "/" not in src and os.path.isfile(os.path.join(folder, src))), src[:60]
    return text, t


# ----------------------------------------------------------------------------- a real build


@pytest.fixture(scope="module")
def local_build(tmp_path_factory):
    from pipelines.demo.local import build_local
    from pipelines.demo.pub11 import build_pub11
    from pipelines.demo.recipes import recipe_args
    from pipelines.demo.tiny_models import build_tiny_clip
    from pipelines.recipes import local

    root = tmp_path_factory.mktemp("report_world")
    build_pub11(str(root), "http://127.0.0.1:9", seed=4, n_rs=12, n_non_rs=6, n_probe=4)
    build_local(str(root), seed=4, n=12)
    build_tiny_clip(str(root / "models" / "tiny-clip"), seed=4)
    out = tmp_path_factory.mktemp("report_build")
    local.run([*recipe_args(str(root), "local"), "--output", str(out),
               "--samples_per_shard", "6"])
    return str(out)


@pytest.mark.slow
def test_report_of_a_real_build_equals_its_stats(local_build, tmp_path):
    out = local_build
    report_main([out, "--seed", "3"])
    path = os.path.join(out, "report", "index.html")
    text, t = check_page(path)
    check_against_stats(out, t)
    # caption length share over the context: what DuckDB + the tokenizer compute
    lengths = build_stats.caption_token_lengths(out)
    for row in t.tables["caption-lengths"][1:]:
        a = np.concatenate([v for (s, _), v in lengths.items() if s == row[0]])
        assert as_int(row[5]) == int((a > 77).sum())
        assert row[6] == f"{100 * float((a > 77).mean()):.1f}%"
        assert as_int(row[2]) == len(a)
    # the grid shows real pictures read from the shards, the map the geolocated samples
    con = duckdb.connect()
    kept = con.execute(f"SELECT count(*) FROM '{out}/index/*.parquet'").fetchone()[0]
    geo = con.execute(f"SELECT count(*) FROM '{out}/index/*.parquet' WHERE lat IS NOT NULL"
                      ).fetchone()[0]
    thumbs = [s for s in t.images if s.startswith("data:")]
    assert len(thumbs) >= min(kept, 12)
    assert geo and "map.png" in t.images
    assert as_int(body(t.tables["geo"])["local"]["geolocated samples"]) == geo
    assert t.tables["licences"][1:] and t.tables["manifest"]
    assert "No duplicates in this build." in text or "duplicate-methods" in t.tables
    # same build, same seed: the same bytes
    again = build_report(out, str(tmp_path / "again"), seed=3)
    files = sorted(os.listdir(os.path.dirname(path)))
    assert files == sorted(os.listdir(os.path.dirname(again)))
    for name in files:
        with open(os.path.join(os.path.dirname(path), name), "rb") as a, \
                open(os.path.join(os.path.dirname(again), name), "rb") as b:
            assert a.read() == b.read(), name


# ----------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic") / "build")
    write_synthetic(out, 3000, seed=1)
    return out


def test_report_of_a_synthetic_build_with_duplicates_geo_and_hostile_text(synthetic):
    path = build_report(synthetic, seed=2)
    text, t = check_page(path)
    check_against_stats(synthetic, t)
    # duplicates: per method, survivor pictures from the shards, the web copy never fetched
    methods = {r[0]: as_int(r[1]) for r in t.tables["duplicate-methods"][1:]}
    con = duckdb.connect()
    assert methods == dict(con.execute(
        f"SELECT method, count(*) FROM '{synthetic}/duplicates/*.parquet' GROUP BY 1"
    ).fetchall())
    assert text.count('class="pair"') == 3 * len(methods)
    assert "https://example.invalid/dup/" in text  # as escaped text, not as a reference
    # hostile captions of rejects are escaped
    assert "&lt;script&gt;alert(" in text and "&quot; onerror=&quot;x" in text
    # caption share over the context (geo has the build's own token counts)
    share = con.execute(f"SELECT avg((caption_tokens > 77)::INT) FROM "
                        f"'{synthetic}/index/geo-*.parquet'").fetchone()[0]
    row = next(r for r in t.tables["caption-lengths"][1:] if r[0] == "geo")
    assert row[6] == f"{100 * share:.1f}%"
    assert "map.png" in t.images and t.tables["labels-geo"][1:]


def test_a_build_without_the_optional_columns_says_so(synthetic, tmp_path):
    bare = str(tmp_path / "bare")
    shutil.copytree(synthetic, bare)
    con = duckdb.connect()
    for f in sorted(os.listdir(os.path.join(bare, "index"))):
        p = os.path.join(bare, "index", f)
        con.execute(f"COPY (SELECT * EXCLUDE (lat, lon, clip_score, caption_tokens, labels, "
                    f"license) FROM '{p}') TO '{p}.tmp' (FORMAT parquet)")
        os.replace(f"{p}.tmp", p)
    shutil.rmtree(os.path.join(bare, "duplicates"))
    path = build_report(bare)
    text, t = check_page(path)
    assert "No geolocated samples" in text and "map.png" not in t.images
    assert "no clip_score" in text and "No class labels." in text
    assert "duplicate-methods" not in t.tables


def test_a_folder_without_stats_json_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="no stats.json: build it first"):
        report_main([str(tmp_path)])
