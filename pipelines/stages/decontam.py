"""Test-set decontamination: drop training samples that show a benchmark's image.

Benchmarks are given as ``name=path`` (``--decontam``, repeatable or comma-separated):

* a **classification set**, class-per-folder: ``path/<class>/<image>`` (EuroSAT, RESISC45, AID,
  UCM as distributed);
* a **retrieval set**: a caption JSON (Karpathy-style ``{"images": [{"filename", "sentences",
  ...}]}`` as RSICD/RSITMD/UCM-captions ship, or a plain list of ``{"image"|"filename": ...}``)
  with its image folder: ``name=captions.json`` (images looked up beside it, then in
  ``images/``/``imgs/``), or ``name=captions.json::image_dir``, or a folder holding one JSON.

Every benchmark image goes through the same ``normalise_image`` as training images (so hashes
and embeddings are comparable), gets a pHash and, when an embedding model is configured, an
image embedding from the same model the training side uses. A training record matches when
its pHash is within ``max_hamming`` bits of a benchmark image's (RemoteCLIP's rule, Hamming
< 2, is ``max_hamming=1``), or its embedding's cosine is ≥ ``min_cosine``. pHash is checked
first; the reported match is the closest benchmark image (lowest Hamming, then highest cosine,
then benchmark name and path).

Rejects: stage ``decontam``, reason ``benchmark_overlap``, detail ``"<benchmark>: <image>
(phash hamming H)"`` or ``"... (cosine C)"``, ``score`` = 1 − H/64 or C.
``report(output)`` prints the per-benchmark table of what was removed.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.records import MAIN, REJECTS, Reject, reject_row
from pipelines.stages.images import split_hashes

STAGE = "decontam"
OVERLAP = "benchmark_overlap"
#: records per matrix product against the benchmark embeddings, and benchmark rows per block
EMB_BATCH = 256
BENCH_BLOCK = 8192


def parse_specs(specs: Sequence[str] | str | None) -> list[tuple[str, str]]:
    """``["eurosat=/d/EuroSAT", "rsicd=/d/rsicd.json"]`` (or comma-joined) → [(name, path)]."""
    if not specs:
        return []
    if isinstance(specs, str):
        specs = [specs]
    out = []
    for item in (s for spec in specs for s in spec.split(",") if s.strip()):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--decontam wants name=path, got {item!r}")
        out.append((name.strip(), path.strip()))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names must be unique: {names}")
    return out


def _match(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


def list_images(path: str) -> list[tuple[str, str]]:
    """(image id relative to the benchmark, full path) of every image of one benchmark (the
    formats and their path checks: :func:`pipelines.sources.benchmarks.benchmark_images`)."""
    from pipelines.sources.benchmarks import benchmark_images

    return benchmark_images(path)


def list_benchmarks(specs: Sequence[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(benchmark, image id, path) for every image of every benchmark, sorted."""
    return [(name, rel, p) for name, path in specs for rel, p in list_images(path)]


@dataclasses.dataclass
class BenchmarkIndex:
    """Every benchmark image: names, ids, 64-bit pHashes and (optionally) embeddings."""

    benchmarks: list[str]
    images: list[str]
    phashes: np.ndarray  # uint64 [n]
    crops: np.ndarray  # uint64 [n, len(CROP_SCALES)] (or [n, 0]): centre-crop pHashes
    embeddings: np.ndarray | None  # float32 [n, D], L2-normalised
    # max_hamming -> band tables (:meth:`_band_tables`), built on first use on each worker
    _bands: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, items: Sequence[dict[str, Any]]) -> BenchmarkIndex:
        items = sorted(items, key=lambda r: (r["benchmark"], r["image"]))
        embs = [r.get("embedding") for r in items]
        has = bool(items) and all(e is not None for e in embs)
        return cls(
            [r["benchmark"] for r in items], [r["image"] for r in items],
            np.array([int(r["phash"], 16) for r in items], dtype=np.uint64),
            _crop_matrix([r.get("phash_crops") for r in items]),
            np.stack(embs).astype(np.float32) if has else None,
        )

    def __len__(self) -> int:
        return len(self.images)

    def hamming(self, phash: str, crops: str | None = None,
                ids: np.ndarray | None = None) -> np.ndarray:
        """int64: ``dedup.distance`` from one image's hashes to the benchmark images ``ids``
        (all of them by default: brute force; :meth:`phash_match` looks up candidates)."""
        full, bench = np.uint64(int(phash, 16)), self.phashes
        bench_crops = self.crops
        if ids is not None:
            bench, bench_crops = bench[ids], bench_crops[ids]
        ham = np.bitwise_count(bench ^ full).astype(np.int64)
        if bench_crops.shape[1]:
            ham = np.minimum(ham, np.bitwise_count(bench_crops ^ full).min(axis=1))
        for c in split_hashes(crops):
            ham = np.minimum(ham, np.bitwise_count(bench ^ np.uint64(c)))
        return ham

    def _band_tables(self, max_hamming: int) -> tuple[dict, dict]:
        """(band → ids by full or crop hash, band → ids by full hash), built once per worker.

        Two hashes within ``max_hamming`` bits share one of ``max_hamming + 1`` bands
        (pigeonhole, as in dedup), so a lookup finds every benchmark image in reach."""
        cache = self._bands
        if max_hamming not in cache:
            from pipelines.stages.dedup import band_keys

            any_hash: dict[tuple[int, int], list[int]] = {}
            full_hash: dict[tuple[int, int], list[int]] = {}
            for i, h in enumerate(self.phashes.tolist()):
                for b in band_keys(h, max_hamming):
                    any_hash.setdefault(b, []).append(i)
                    full_hash.setdefault(b, []).append(i)
                for c in self.crops[i].tolist():
                    for b in band_keys(c, max_hamming):
                        any_hash.setdefault(b, []).append(i)
            cache[max_hamming] = (any_hash, full_hash)
        return cache[max_hamming]

    def phash_match(self, phash: str, crops: str | None, max_hamming: int
                    ) -> tuple[int, int] | None:
        """(distance, index) of the closest benchmark image within ``max_hamming`` bits (ties:
        the first in (benchmark, image) order), or None."""
        from pipelines.stages.dedup import band_keys

        any_hash, full_hash = self._band_tables(max_hamming)
        cand: set[int] = set()
        for b in band_keys(int(phash, 16), max_hamming):
            cand.update(any_hash.get(b, ()))
        for c in split_hashes(crops):
            for b in band_keys(c, max_hamming):
                cand.update(full_hash.get(b, ()))
        if not cand:
            return None
        ids = np.array(sorted(cand), dtype=np.int64)
        ham = self.hamming(phash, crops, ids)
        j = int(np.argmin(ham))
        return (int(ham[j]), int(ids[j])) if ham[j] <= max_hamming else None

    def nearest(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(best cosine, index) per row of ``embeddings`` [m, D], exact.

        Rows go through the matrix product in blocks of :data:`EMB_BATCH` (the last padded
        with zeros) against benchmark blocks of :data:`BENCH_BLOCK`: every product has the same
        shape whatever the batch's company, so a row's cosines, and the decision, do not
        depend on which records share its batch. Ties: the first benchmark image."""
        q = np.asarray(embeddings, np.float32).reshape(len(embeddings), -1)
        best = np.full(len(q), -np.inf, np.float32)
        arg = np.zeros(len(q), np.int64)
        bench = self.embeddings
        for r0 in range(0, len(q), EMB_BATCH):
            block = np.zeros((EMB_BATCH, q.shape[1]), np.float32)
            rows = q[r0 : r0 + EMB_BATCH]
            block[: len(rows)] = rows
            for c0 in range(0, len(bench), BENCH_BLOCK):
                sims = block @ bench[c0 : c0 + BENCH_BLOCK].T
                j = sims.argmax(axis=1)[: len(rows)]
                v = sims[np.arange(len(rows)), j]
                better = v > best[r0 : r0 + len(rows)]
                best[r0 : r0 + len(rows)][better] = v[better]
                arg[r0 : r0 + len(rows)][better] = j[better] + c0
        return best, arg

    def match_many(self, records: Sequence[dict[str, Any]], max_hamming: int,
                   min_cosine: float | None, embedding_field: str = "_img_emb"
                   ) -> list[tuple[str, str, str, float] | None]:
        """(benchmark, image, how, score) of the closest benchmark image per record, or None.

        pHash first (with the record's ``_phash_crops``), then the embedding's cosine."""
        out: list[tuple[str, str, str, float] | None] = [None] * len(records)
        if not len(self):
            return out
        todo = []
        for n, r in enumerate(records):
            hit = None
            if r.get("phash") is not None and max_hamming >= 0:
                hit = self.phash_match(r["phash"], r.get("_phash_crops"), max_hamming)
            if hit is not None:
                h, i = hit
                out[n] = (self.benchmarks[i], self.images[i], f"phash hamming {h}", 1.0 - h / 64.0)
            elif r.get(embedding_field) is not None:
                todo.append(n)
        if todo and self.embeddings is not None and min_cosine is not None:
            best, arg = self.nearest(np.stack([records[n][embedding_field] for n in todo]))
            for n, v, i in zip(todo, best.tolist(), arg.tolist(), strict=True):
                if v >= min_cosine:
                    out[n] = (self.benchmarks[i], self.images[i], f"cosine {v:.4f}", float(v))
        return out


def _crop_matrix(crops: Sequence[str | None]) -> np.ndarray:
    rows = [split_hashes(c) for c in crops]
    k = min((len(r) for r in rows), default=0)
    return np.array([r[:k] for r in rows], dtype=np.uint64).reshape(len(rows), k)


def decontam_decisions(records: Sequence[dict[str, Any]], index: BenchmarkIndex,
                       max_hamming: int, min_cosine: float | None,
                       embedding_field: str = "_img_emb") -> list[dict[str, Any] | Reject]:
    """Each record, or its ``benchmark_overlap`` reject."""
    out: list[dict[str, Any] | Reject] = []
    for r, hit in zip(records, index.match_many(records, max_hamming, min_cosine,
                                                embedding_field), strict=True):
        if hit is None:
            out.append(r)
            continue
        bench, image, how, score = hit
        out.append(Reject(stage=STAGE, reason=OVERLAP, detail=f"{bench}: {image} ({how})",
                          score=score))
    return out


def benchmark_record(item: tuple[str, str, str], image_cfg) -> dict[str, Any] | None:
    """A benchmark image as the pipeline sees a training image (normalised, hashed)."""
    from pipelines.stages.images import normalise_image

    name, rel, path = item
    res = normalise_image(_read(path), image_cfg)
    if isinstance(res, Reject):
        return None
    return {"key": f"{name}/{rel}", "benchmark": name, "image": rel, "phash": res.phash,
            "phash_crops": res.phash_crops, "_image": res.data}


class Decontaminate(beam.PTransform):
    """Records (with ``phash`` and, when embedding, ``_img_emb``) → ``records`` + ``rejects``.

    Args:
      specs: [(name, path)] (``parse_specs``); listed on the workers (a gs:// benchmark
        costs the launcher no bucket access; a missing one fails the job there).
      image_cfg: the recipe's ``ImageConfig`` (benchmark images are normalised like ours).
      embedder: an ``OpenClipImageEmbedder`` (same model as the Embed stage) or None: pHash only.
      max_hamming / min_cosine: match thresholds (``min_cosine=None``: no embedding match).
    """

    def __init__(self, specs: Sequence[tuple[str, str]], image_cfg, embedder=None,
                 max_hamming: int = 4, min_cosine: float | None = None,
                 embedding_field: str = "_img_emb") -> None:
        super().__init__()
        self.specs = [(str(n), str(p)) for n, p in specs]
        self.image_cfg = image_cfg
        self.embedder = embedder
        self.max_hamming = max_hamming
        self.min_cosine = min_cosine if embedder is not None else None
        self.embedding_field = embedding_field

    def expand(self, records):
        from apache_beam.ml.inference.base import RunInference

        cfg = self.image_cfg
        bench = (
            records.pipeline
            | "BenchmarkSpecs" >> beam.Create(self.specs)
            | "BenchmarkImages" >> beam.FlatMap(lambda spec: list_benchmarks([spec]))
            | "BenchmarkSpread" >> beam.Reshuffle()
            | "BenchmarkNormalise" >> beam.Map(benchmark_record, image_cfg=cfg)
            | "BenchmarkDecoded" >> beam.Filter(lambda r: r is not None)
        )
        if self.embedder is not None:
            bench = (
                bench
                | "BenchmarkEmbed" >> RunInference(self.embedder)
                | "BenchmarkWithEmb" >> beam.Map(
                    lambda pr: {**{k: v for k, v in pr.example.items() if k != "_image"},
                                "embedding": pr.inference})
            )
        else:
            bench = bench | "BenchmarkSlim" >> beam.Map(
                lambda r: {k: v for k, v in r.items() if k != "_image"})
        index = (
            bench
            | "BenchmarkList" >> beam.combiners.ToList()
            | "BenchmarkIndex" >> beam.Map(BenchmarkIndex.build)
        )
        t, c, field = self.max_hamming, self.min_cosine, self.embedding_field

        def route(batch, idx):
            for r, d in zip(batch, decontam_decisions(batch, idx, t, c, field), strict=True):
                if isinstance(d, Reject):
                    yield beam.pvalue.TaggedOutput(REJECTS, reject_row(r, d))
                else:
                    yield d

        return (
            records
            | "DecontamBatch" >> beam.BatchElements(min_batch_size=1, max_batch_size=EMB_BATCH)
            | "Decontam" >> beam.FlatMap(route, idx=beam.pvalue.AsSingleton(index))
            .with_outputs(REJECTS, main=MAIN)
        )


def removed_table(output: str) -> list[dict[str, Any]]:
    """Per benchmark: removed training samples, by pHash / by embedding, distinct images hit."""
    import io

    import pyarrow.parquet as pq

    rows: dict[str, dict[str, Any]] = {}
    for p in _match(posixpath.join(output, "rejects", "*.parquet")):
        with FileSystems.open(p, compression_type="uncompressed") as f:
            t = pq.read_table(io.BytesIO(f.read()), columns=["stage", "detail"])
        for stage, detail in zip(t["stage"].to_pylist(), t["detail"].to_pylist(), strict=True):
            if stage != STAGE or not detail:
                continue
            bench, _, rest = detail.partition(": ")
            image, _, how = rest.rpartition(" (")
            r = rows.setdefault(bench, {"benchmark": bench, "removed": 0, "by_phash": 0,
                                        "by_embedding": 0, "images": set()})
            r["removed"] += 1
            r["by_phash" if how.startswith("phash") else "by_embedding"] += 1
            r["images"].add(image)
    out = []
    for b in sorted(rows):
        r = rows[b]
        out.append({**r, "images": len(r["images"])})
    return out


def report(output: str, specs: Sequence[tuple[str, str]] = ()) -> str:
    """The per-benchmark table of what decontamination removed."""
    from pipelines.stats import _fmt_table

    table = {r["benchmark"]: r for r in removed_table(output)}
    sizes = {}
    for name, path in specs:
        try:
            sizes[name] = len(list_images(path))
        except (OSError, ValueError):
            sizes[name] = None
    names = sorted(set(table) | set(sizes))
    body = [[n, sizes.get(n, "?") if sizes.get(n) is not None else "?",
             table.get(n, {}).get("images", 0), table.get(n, {}).get("removed", 0),
             table.get(n, {}).get("by_phash", 0), table.get(n, {}).get("by_embedding", 0)]
            for n in names]
    text = "Decontamination (training samples removed per benchmark):\n" + _fmt_table(
        ["benchmark", "bench images", "bench images hit", "removed", "by pHash", "by embedding"],
        body)
    per_source = removed_by_source(output)
    if per_source:
        text += "\n\nDecontamination (removed per training subset and source):\n" + _fmt_table(
            ["subset", "source", "benchmark", "removed"], [list(r) for r in per_source])
    return text


def removed_by_source(output: str) -> list[tuple[str, str, str, int]]:
    """(subset, source, benchmark, removed) of the decontamination rejects: which training
    dataset shipped the benchmark's images (RemoteCLIP's per-dataset leakage table)."""
    from pipelines.stats import _table

    rejects = _table(output, "rejects", "subset,source,stage,detail")
    import duckdb

    return [tuple(r) for r in duckdb.connect().execute(
        f"""SELECT subset, source, split_part(detail, ': ', 1) AS benchmark, count(*)
            FROM {rejects} WHERE stage = '{STAGE}' GROUP BY ALL ORDER BY ALL""").fetchall()]
