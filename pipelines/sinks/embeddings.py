"""The embeddings folder of a build, in clip-retrieval's layout::

    {embeddings_dir}/img_emb/img_emb_{N}.npy       float16 [n_N, D], L2-normalised image embeddings
    {embeddings_dir}/text_emb/text_emb_{N}.npy     float16 [n_N, D], L2-normalised caption embeddings
    {embeddings_dir}/metadata/metadata_{N}.parquet key, shard, caption, url, source, source_id,
                                                   clip_score: row i describes row i of both .npy

Part ``N`` holds exactly the samples of shard ``{subset}-{N:05d}.tar`` (same stable-hash
assignment and count as ``pipelines.sinks.shards``), sorted by key like the shard, so the same
input and config give byte-identical files on any runner. clip-retrieval's ``clip_index`` /
``embedding_reader`` read the folder as is (file numbering without zero padding, as theirs).
``load_embeddings(folder)`` reads it back (numpy + pyarrow) for tests and notebooks.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

import schemas
from pipelines.records import stable_hash
from pipelines.sinks.shards import join, num_files, parquet_bytes, shard_name, write_atomic

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


class _WritePart(beam.DoFn):
    def __init__(self, folder: str, subset: str):
        self.folder = folder
        self.subset = subset

    def process(self, item: tuple[int, Iterable[dict]]):
        index, rows = item
        rows = list(rows)
        for rel, data in part_files(rows, self.subset, index).items():
            write_atomic(join(self.folder, *rel.split("/")), data)
        yield index, len(rows)


class WriteEmbeddings(beam.PTransform):
    """Kept records (with ``_img_emb``/``_txt_emb``) → the clip-retrieval folder; parts follow
    the shard assignment of ``WriteShards(samples_per_shard)``. Output: (part, rows)."""

    def __init__(self, folder: str, subset: str, samples_per_shard: int = 10_000):
        super().__init__()
        self.folder = folder
        self.subset = subset
        self.samples_per_shard = samples_per_shard

    def expand(self, records):
        per = self.samples_per_shard
        count = records | "EmbCount" >> beam.combiners.Count.Globally()
        slim = records | "EmbSlim" >> beam.Map(lambda r: {
            k: r.get(k) for k in ("key", "caption", "url", "source", "source_id", "clip_score",
                                  IMAGE_FIELD, TEXT_FIELD)})
        return (
            slim
            | "EmbAssign" >> beam.Map(lambda r, n: (stable_hash(r["key"]) % num_files(n, per), r),
                                      n=beam.pvalue.AsSingleton(count))
            | "EmbGroup" >> beam.GroupByKey()
            | "EmbWrite" >> beam.ParDo(_WritePart(self.folder, self.subset))
        )


def clear(folder: str) -> None:
    """Remove the parts of an earlier build from ``folder``."""
    pats = [join(folder, d, f"{d}_*.{ext}") for d, ext in
            (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet"))]
    for pat in pats:
        found = [m.path for m in FileSystems.match([pat])[0].metadata_list]
        if found:
            FileSystems.delete(found)


def load_embeddings(folder: str) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """(image embeddings, text embeddings, metadata) of every part, in part order."""
    import pyarrow.parquet as pq

    def parts(d: str, ext: str) -> list[str]:
        found = [m.path for m in FileSystems.match([join(folder, d, f"{d}_*.{ext}")])[0]
                 .metadata_list]
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
