"""A synthetic build of N kept rows, to time the report on a large index (not a test fixture:
its pictures are one tiny JPEG and its captions are templates).

``python -m pipelines.report OUT --synthetic 1000000`` writes into ``OUT`` what a recipe would:
two subsets (``web``: web captions with no token count, no geo; ``geo``: archive rows with
``caption_tokens``, lat/lon and class labels), 10,000 samples per shard as real webdataset tars
(``{key}.jpg``, ``{key}.txt``, ``{key}.json`` per sample, keys sorted, like the sink), the
parquet index per shard, rejects and duplicates (a third and a twentieth of the kept count),
``stats.json`` (built and checked by the sink's own functions) and ``manifest.json``.
DuckDB generates the tables; only the tar members are written row by row.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile

import duckdb
from PIL import Image

PER_SHARD = 10_000
WORDS = ["farmland", "harbor", "airport", "forest", "river", "parking lot", "stadium",
         "beach", "industrial area", "residential area", "desert", "lake"]


def _jpeg() -> bytes:
    img = Image.new("RGB", (64, 64), (90, 140, 80))
    for x in range(0, 64, 8):
        img.paste((200, 190, 150), (x, 0, x + 4, 64))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _tar(path: str, rows: list[tuple[str, str]], jpg: bytes) -> None:
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w",
                                             format=tarfile.USTAR_FORMAT) as tar:
        for key, caption in rows:
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.txt", caption.encode()),
                               (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 946684800
                tar.addfile(info, io.BytesIO(data))


def write_synthetic(output: str, n: int, seed: int = 0) -> dict:
    """Write a synthetic build of ``n`` kept rows into ``output`` (replacing it)."""
    from pipelines.sinks.shards import build_stats, merge_stats

    shutil.rmtree(output, ignore_errors=True)
    for d in ("index", "shards", "rejects", "duplicates"):
        os.makedirs(os.path.join(output, d))
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    words = "[" + ", ".join(f"'{w}'" for w in WORDS) + "]"
    jpg = _jpeg()
    docs = []
    for subset, share in (("web", 0.7), ("geo", 0.3)):
        m = max(1, int(n * share))
        shards = math.ceil(m / PER_SHARD)
        geo = subset == "geo"
        con.execute(f"""
            CREATE OR REPLACE TABLE idx AS
            SELECT substr(md5('{seed}:{subset}:' || i), 1, 20) AS key,
              '{subset}' AS subset,
              {"'archive-' || (i % 3)" if geo else "'laion-' || (i % 4)"} AS source,
              i::VARCHAR AS source_id,
              {"'/data/" + subset + "/' || i || '.jpg'" if geo else
               "'https://example.invalid/img/' || i || '.jpg'"} AS url,
              {"'CC-BY-4.0'" if geo else "NULL::VARCHAR"} AS license,
              printf('{subset}-%05d.tar', i % {shards}) AS shard,
              i % {shards} AS shard_no,
              'an aerial image of a ' || {words}[1 + (i % 12)::INTEGER]
                || repeat(' with trees', (i % 17)::INTEGER) || ', no. ' || i AS caption,
              {"'meta'" if geo else "'web'"} AS caption_kind,
              {"(8 + i % 80)::INTEGER" if geo else "NULL::INTEGER"} AS caption_tokens,
              (hash(i) % 1000 / 2000.0)::FLOAT AS clip_score,
              {"((hash(i * 7) % 15000) / 100.0 - 60)" if geo else "NULL::DOUBLE"} AS lat,
              {"((hash(i * 13) % 36000) / 100.0 - 180)" if geo else "NULL::DOUBLE"} AS lon,
              {"[" + words + "[1 + (i % 12)::INTEGER]]" if geo else "NULL::VARCHAR[]"}
                AS labels
            FROM range({m}) t(i)""")
        for k in range(shards):
            name = f"{subset}-{k:05d}"
            con.execute(f"COPY (SELECT * EXCLUDE (shard_no) FROM idx WHERE shard_no = {k} "
                        f"ORDER BY key) TO '{output}/index/{name}.parquet' (FORMAT parquet)")
            rows = con.execute(f"SELECT key, caption FROM idx WHERE shard_no = {k} "
                               "ORDER BY key").fetchall()
            _tar(os.path.join(output, "shards", f"{name}.tar"), rows, jpg)
        r = max(1, m // 3)
        con.execute(f"""
            COPY (SELECT substr(md5('{seed}:{subset}:rej:' || i), 1, 20) AS key,
              '{subset}' AS subset, 'laion-' || (i % 4) AS source, i::VARCHAR AS source_id,
              'https://example.invalid/bad/' || i AS url,
              'caption <script>alert(' || i || ')</script>" onerror="x' AS caption,
              ['read', 'fetch', 'decode', 'rs_filter'][1 + (i % 4)::INTEGER] AS stage,
              ['bad_row', 'timeout', 'http_404', 'too_small', 'non_rs'][1 + (i % 5)::INTEGER]
                AS reason, 'detail ' || i AS detail, NULL::FLOAT AS score
            FROM range({r}) t(i)) TO '{output}/rejects/{subset}-00000.parquet'
            (FORMAT parquet)""")
        dn = max(1, m // 20)
        con.execute(f"""
            COPY (SELECT substr(md5('{seed}:{subset}:dup:' || i), 1, 20) AS key,
              '{subset}' AS subset, 'laion-' || (i % 4) AS source, i::VARCHAR AS source_id,
              'https://example.invalid/dup/' || i AS url, 'dedup' AS stage,
              substr(md5('{seed}:{subset}:' || ((i * 37) % {m})), 1, 20) AS duplicate_of,
              ['sha256', 'phash', 'phash_crop', 'url', 'semantic'][1 + (i % 5)::INTEGER]
                AS method, 1.0::FLOAT AS similarity
            FROM range({dn}) t(i)) TO '{output}/duplicates/{subset}-00000.parquet'
            (FORMAT parquet)""")
        kept = dict(con.execute("SELECT source, count(*) FROM idx GROUP BY 1").fetchall())
        rej = {(a, b, c): d for a, b, c, d in con.execute(
            f"SELECT source, stage, reason, count(*) FROM "
            f"'{output}/rejects/{subset}-00000.parquet' GROUP BY ALL").fetchall()}
        dup = {(a, b, c): d for a, b, c, d in con.execute(
            f"SELECT source, stage, method, count(*) FROM "
            f"'{output}/duplicates/{subset}-00000.parquet' GROUP BY ALL").fetchall()}
        inputs: dict[str, int] = dict(kept)
        for (s, _, _), c in [*rej.items(), *dup.items()]:
            inputs[s] = inputs.get(s, 0) + c
        docs.append(build_stats(recipe="synthetic", subset=subset, input_by_source=inputs,
                                kept=kept, rejected=rej, duplicates=dup, shards=shards))
    stats = merge_stats("synthetic", docs)
    with open(os.path.join(output, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({"recipe": "synthetic", "config": {"rows": n, "seed": seed},
                   "git_revision": None, "versions": {}}, f, indent=2)
    with open(os.path.join(output, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    return stats
