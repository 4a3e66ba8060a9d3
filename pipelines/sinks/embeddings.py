"""The embeddings folder of a build, in clip-retrieval's layout, one folder per subset::

    {embeddings_dir}/{subset}/img_emb/img_emb_{N}.npy    float16 [n_N, D], L2-normalised images
    {embeddings_dir}/{subset}/text_emb/text_emb_{N}.npy  float16 [n_N, D], L2-normalised captions
    {embeddings_dir}/{subset}/metadata/metadata_{N}.parquet  key, shard, caption, url, source,
                                     source_id, clip_score: row i describes row i of both .npy

Part ``N`` holds exactly the samples of shard ``{subset}-{N:05d}.tar``, sorted by key like the
shard: the shard writer (``pipelines.sinks.shards``) writes both from the same rows, so the same
input and config give byte-identical files on any runner. clip-retrieval's ``clip_index`` /
``embedding_reader`` read a subset's folder as is (file numbering without zero padding, as
theirs). ``load_embeddings(folder)`` reads it back (numpy + pyarrow) for tests and notebooks:
a subset's folder, or the embeddings folder (every subset, in name order).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

import schemas
from pipelines.sinks.shards import join, matching, parquet_bytes, shard_name

IMAGE_FIELD = "_img_emb"
TEXT_FIELD = "_txt_emb"

def _l2_f16(rows: list[np.ndarray]) -> np.ndarray:
    x = np.stack([np.asarray(r, np.float32) for r in rows])
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x.astype(np.float16)


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def part_files(rows: list[dict[str, Any]], subset: str, index: int) -> dict[str, bytes]:
    """{relative path: bytes} of part ``index`` for ``rows`` (any order)."""
    rows = sorted(rows, key=lambda r: r["key"])
    meta = pa.Table.from_pylist([
        {"key": r["key"], "shard": f"{shard_name(subset, index)}.tar", "caption": r.get("caption"),
         "url": r.get("url"), "source": r.get("source"), "source_id": r.get("source_id"),
         "clip_score": r.get("clip_score")} for r in rows], schema=schemas.EMBEDDING_METADATA_SCHEMA)
    return {
        f"img_emb/img_emb_{index}.npy": npy_bytes(_l2_f16([r[IMAGE_FIELD] for r in rows])),
        f"text_emb/text_emb_{index}.npy": npy_bytes(_l2_f16([r[TEXT_FIELD] for r in rows])),
        f"metadata/metadata_{index}.parquet": parquet_bytes(meta),
    }


def subset_parts(folder: str, subset: str) -> list[str]:
    """The files of ``subset``'s part of the embeddings folder ``folder``."""
    found = []
    for d, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        found += matching(join(folder, subset, d, f"{d}_*.{ext}"))
    return sorted(found)


def load_embeddings(folder: str) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """(image embeddings, text embeddings, metadata) of every part, in part order; given the
    embeddings folder itself, every subset's parts in subset name order."""
    import pyarrow.parquet as pq

    subsets = sorted({m.path.rstrip("/").split("/")[-3] for m in FileSystems.match(
        [join(folder, "*", "img_emb", "img_emb_*.npy")])[0].metadata_list})
    if subsets and not matching(join(folder, "img_emb", "*")):
        loaded = [load_embeddings(join(folder, s)) for s in subsets]
        return (np.concatenate([x[0] for x in loaded]), np.concatenate([x[1] for x in loaded]),
                pa.concat_tables([x[2] for x in loaded]))

    def parts(d: str, ext: str) -> list[str]:
        found = matching(join(folder, d, f"{d}_*.{ext}"))
        return sorted(found, key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))

    def npy(p: str) -> np.ndarray:
        with FileSystems.open(p) as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)

    def table(p: str) -> pa.Table:
        with FileSystems.open(p) as f:
            return pq.read_table(io.BytesIO(f.read()))

    img = [npy(p) for p in parts("img_emb", "npy")]
    txt = [npy(p) for p in parts("text_emb", "npy")]
    meta = [table(p) for p in parts("metadata", "parquet")]
    if not img:
        return np.zeros((0, 0), np.float16), np.zeros((0, 0), np.float16), schemas.EMBEDDING_METADATA_SCHEMA.empty_table()
    return np.concatenate(img), np.concatenate(txt), pa.concat_tables(meta)
