"""Semantic dedup (SemDeDup): drop images whose CLIP embedding is within 1 − ε of another's.

Pure core first (``train_centroids``, ``assign``, ``cluster_edges``, ``resolve``; the perf
harness ``pipelines.perf.dedup`` runs these directly on 10^6 embeddings), Beam wrapper last.

**Clustering.** Spherical k-means (faiss) on L2-normalised embeddings, centroids trained on a
*seeded* sample: the ``sample_size`` records with the smallest ``stable_hash(key)`` (the same
sample on every runner), ``k = ceil(n / cluster_size)``. A cluster whose share of the sample
says it will hold more than ``max_cluster`` records is split by a sub-k-means on its sample
members, and the centroid list is flattened, so the expected size of every Beam group (the
cluster id is the key) is bounded before any record is grouped. Inside a group larger than
``max_cluster`` (sampling noise) the similarity matrix is computed in row blocks, so memory is
``O(block · n)``, never ``O(n²)``.

**Boundary replication.** Two near-duplicates may fall on either side of a cell boundary. Each
record has one *home* cluster (its nearest centroid) and is also sent, as a *guest*, to up to
``max_extra`` other clusters whose centroid similarity is within ``margin`` of its best. Pairs
are formed home×home and home×guest, so a pair is found when either member's home is among the
other's clusters. (For cos(a, b) ≥ 1 − ε, |cos(a, c) − cos(b, c)| ≤ √(2ε) for every centroid c,
so ``margin = 2√(2ε)`` with unlimited ``max_extra`` would find every pair; the defaults trade
that guarantee for speed and measure ≥ 0.99 recall against exact search, ``make perf-dedup``.)

**Decision.** Pairs with cosine ≥ 1 − ε become edges; edges become connected components (a
global union-find over edges only, like the pHash stage). **Survivor rule:** the member with
the highest ``clip_score`` (the caption that fits its image best), then the smallest key;
across subsets built together, the subset's priority first (``pipelines.recipes.kit``).
Every other member is a ``duplicates/`` row, ``method=semantic``, ``duplicate_of`` = the
survivor, ``similarity`` = its cosine to the survivor when they are linked directly (the usual
star of near-copies), else the strongest cosine that linked it into the component.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines.records import DUPLICATES, duplicate_row, stable_hash
from pipelines.stages.dedup import EdgeList

STAGE = "semantic_dedup"
METHOD = "semantic"
EMBEDDING_FIELD = "_img_emb"


@dataclasses.dataclass(frozen=True)
class SemDedupConfig:
    #: drop a record whose cosine to another is ≥ 1 − eps
    eps: float = 0.05
    #: target mean cluster size: k = ceil(n / cluster_size)
    cluster_size: int = 1000
    #: a cluster expected above this many records (from the sample) is split by sub-k-means
    max_cluster: int = 5000
    #: centroids are trained on at most this many records (a seeded sample)
    sample_size: int = 50_000
    #: also send a record to clusters whose centroid cosine is within ``margin`` of its best
    margin: float = 0.1
    max_extra: int = 3
    niter: int = 10
    seed: int = 0
    #: rows per block of the in-cluster similarity matrix
    block: int = 4096

    @property
    def threshold(self) -> float:
        return 1.0 - self.eps


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _kmeans(x: np.ndarray, k: int, cfg: SemDedupConfig) -> np.ndarray:
    import faiss

    k = max(1, min(k, len(x)))
    if k == 1:
        return normalise(x.mean(0, keepdims=True))
    km = faiss.Kmeans(x.shape[1], k, niter=cfg.niter, seed=cfg.seed, spherical=True,
                      verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=max(256, math.ceil(len(x) / k)))
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return normalise(km.centroids)


def train_centroids(sample: np.ndarray, n_total: int, cfg: SemDedupConfig) -> np.ndarray:
    """Flat list of normalised centroids [K, d] for a corpus of ``n_total`` from ``sample``."""
    sample = normalise(sample)
    if len(sample) == 0:
        raise ValueError("no sample to train centroids on")
    n_total = max(n_total, len(sample))
    k = max(1, min(math.ceil(n_total / cfg.cluster_size), len(sample) // 4 or 1))
    cents = _kmeans(sample, k, cfg)
    home = _top(sample, cents, 1)[1][:, 0]
    scale = n_total / len(sample)
    out = []
    for c in range(len(cents)):
        members = sample[home == c]
        expected = len(members) * scale
        if expected > cfg.max_cluster and len(members) >= 8:
            sub = max(2, math.ceil(expected / min(cfg.cluster_size, cfg.max_cluster)))
            out.append(_kmeans(members, min(sub, len(members) // 4), cfg))
        else:
            out.append(cents[c : c + 1])
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def _top(x: np.ndarray, cents: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the ``m`` nearest centroids of each row of ``x``, best first."""
    import faiss

    index = faiss.IndexFlatIP(cents.shape[1])
    index.add(np.ascontiguousarray(cents, dtype=np.float32))
    return index.search(np.ascontiguousarray(x, dtype=np.float32), min(m, len(cents)))


def assign(x: np.ndarray, cents: np.ndarray, cfg: SemDedupConfig,
           chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memberships of the rows of ``x``: (item index, cluster id, is_home) arrays."""
    items, clusters, homes = [], [], []
    m = 1 + cfg.max_extra
    for s in range(0, len(x), chunk):
        d, i = _top(x[s : s + chunk], cents, m)
        keep = d >= (d[:, :1] - cfg.margin)
        keep[:, 0] = True
        r, c = np.nonzero(keep)
        items.append(r + s)
        clusters.append(i[r, c])
        homes.append(c == 0)
    return np.concatenate(items), np.concatenate(clusters), np.concatenate(homes)


def assign_one(e: np.ndarray, cents: np.ndarray, cfg: SemDedupConfig) -> list[tuple[int, bool]]:
    """(cluster id, is_home) for one embedding (numpy only: cheap per record)."""
    sims = cents @ e
    order = np.argsort(-sims, kind="stable")[: 1 + cfg.max_extra]
    best = sims[order[0]]
    return [(int(c), j == 0) for j, c in enumerate(order) if j == 0 or sims[c] >= best - cfg.margin]


def cluster_edges(emb: np.ndarray, home: np.ndarray, threshold: float,
                  block: int = 4096) -> Iterator[tuple[int, int, float]]:
    """Pairs (i, j, cosine), i < j, of one cluster's rows with cosine ≥ ``threshold`` and at
    least one member at home here. Row blocks bound memory to ``block × n`` floats."""
    n = len(emb)
    if n < 2:
        return
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    home = np.asarray(home, dtype=bool)
    for s in range(0, n, block):
        sims = emb[s : s + block] @ emb.T
        rows, cols = np.nonzero(sims >= threshold)
        rows_g = rows + s
        ok = (cols > rows_g) & (home[rows_g] | home[cols])
        for r, c, g in zip(rows[ok], cols[ok], rows_g[ok], strict=True):
            yield int(g), int(c), float(sims[r, c])


def resolve(edges: Iterable[tuple[Any, Any, float]], rank) -> dict[Any, tuple[Any, float]]:
    """Union-find over ``edges`` (a, b, cosine): non-survivor → (survivor, similarity).

    ``rank(node)`` orders nodes, smallest = survivor (see the module docstring)."""
    parent: dict[Any, Any] = {}
    best: dict[Any, float] = {}
    direct: dict[tuple[Any, Any], float] = {}

    def find(x):
        parent.setdefault(x, x)
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b, s in edges:
        direct[(a, b)] = direct[(b, a)] = s
        best[a] = max(best.get(a, -1.0), s)
        best[b] = max(best.get(b, -1.0), s)
        ra, rb = find(a), find(b)
        if ra != rb:
            if rank(rb) < rank(ra):
                ra, rb = rb, ra
            parent[rb] = ra
    out = {}
    for n in list(parent):
        r = find(n)
        if r != n:
            out[n] = (r, direct.get((n, r), best[n]))
    return out


def semdedup_arrays(emb: np.ndarray, cfg: SemDedupConfig, scores: np.ndarray | None = None,
                    sample_seed: int | None = None) -> dict[str, Any]:
    """SemDeDup on an in-memory array (the perf harness and tests; same functions as Beam).

    Returns ``pairs`` (set of (i, j) found), ``dropped`` (index → (survivor, similarity)),
    ``centroids`` and the memberships. Survivor: highest ``scores`` (default 0), then index.
    """
    emb = normalise(emb)
    n = len(emb)
    rng = np.random.default_rng(cfg.seed if sample_seed is None else sample_seed)
    sample_idx = rng.choice(n, size=min(n, cfg.sample_size), replace=False)
    cents = train_centroids(emb[np.sort(sample_idx)], n, cfg)
    items, clusters, homes = assign(emb, cents, cfg)
    order = np.lexsort((items, clusters))
    items, clusters, homes = items[order], clusters[order], homes[order]
    bounds = np.flatnonzero(np.diff(clusters)) + 1
    pairs: dict[tuple[int, int], float] = {}
    for grp in np.split(np.arange(len(items)), bounds):
        idx = items[grp]
        for i, j, s in cluster_edges(emb[idx], homes[grp], cfg.threshold, cfg.block):
            a, b = int(idx[i]), int(idx[j])
            pairs[(min(a, b), max(a, b))] = s
    sc = np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32)
    dropped = resolve(((a, b, s) for (a, b), s in pairs.items()),
                      lambda i: (-float(sc[i]), i))
    return {"pairs": pairs, "dropped": dropped, "centroids": cents,
            "replication": len(items) / max(n, 1)}


# ----------------------------------------------------------------------------- Beam


def _rank(score: float | None, key: str, subset_rank: int = 0) -> tuple[int, float, str]:
    """Survivor order: the subset's priority (``recipes.kit``), then clip_score, then key."""
    return (subset_rank, -(score if score is not None else -math.inf), key)


def _cluster_edges_fn(item, threshold: float, block: int):
    _, members = item
    members = sorted(members, key=lambda m: (m[0], not m[3]))  # by key: same matrix every run
    seen, uniq = set(), []
    for m in members:
        if m[0] not in seen:
            seen.add(m[0])
            uniq.append(m)
    emb = np.stack([m[2] for m in uniq])
    home = np.array([m[3] for m in uniq])
    for i, j, s in cluster_edges(emb, home, threshold, block):
        a, b = uniq[i], uniq[j]
        yield (a[0], a[1]), (b[0], b[1]), s


class _Components(EdgeList):
    def extract_output(self, acc):
        # nodes are (key, rank); dedupe edges found in several clusters
        uniq = {}
        for a, b, s in acc:
            k = (a, b) if a[0] < b[0] else (b, a)
            uniq[k] = max(uniq.get(k, -1.0), s)
        res = resolve(((a, b, s) for (a, b), s in sorted(uniq.items())), lambda n: n[1])
        return {n[0]: (r[0], s) for n, (r, s) in res.items()}


class SemanticDedup(beam.PTransform):
    """Records with ``_img_emb`` (and ``clip_score``) → unique records (``records``) and
    ``duplicates`` rows (stage ``semantic_dedup``, method ``semantic``)."""

    def __init__(self, cfg: SemDedupConfig | None = None, enabled: bool = True,
                 embedding_field: str = EMBEDDING_FIELD) -> None:
        super().__init__()
        self.cfg = cfg or SemDedupConfig()
        self.enabled = enabled
        self.embedding_field = embedding_field

    def expand(self, records):
        if not self.enabled:
            dups = records.pipeline | "NoSemanticDuplicates" >> beam.Create([])
            return {"records": records, DUPLICATES: dups}
        cfg, field = self.cfg, self.embedding_field

        def sample_item(r):
            return stable_hash(r["key"]), r["key"], np.asarray(r[field], np.float32)

        def train(sample, n):
            if not sample:
                return None
            return train_centroids(np.stack([s[2] for s in sorted(sample)]), n, cfg)

        count = records | "Count" >> beam.combiners.Count.Globally()
        sample = (
            records
            | "SampleItems" >> beam.Map(sample_item)
            | "Sample" >> beam.combiners.Top.Of(cfg.sample_size, key=lambda s: (s[0], s[1]),
                                                reverse=True)
        )
        centroids = sample | "Centroids" >> beam.Map(train, n=beam.pvalue.AsSingleton(count))

        def to_clusters(r, cents):
            e = normalise(np.asarray(r[field], np.float32))
            rank = _rank(r.get("clip_score"), r["key"], int(r.get("_subset_rank") or 0))
            targets = [(0, True)] if cents is None else assign_one(e, cents, cfg)
            for c, is_home in targets:
                yield c, (r["key"], rank, e, is_home)

        decisions = (
            records
            | "Clusters" >> beam.FlatMap(to_clusters, cents=beam.pvalue.AsSingleton(centroids))
            | "GroupClusters" >> beam.GroupByKey()
            | "Edges" >> beam.FlatMap(_cluster_edges_fn, threshold=cfg.threshold,
                                      block=cfg.block)
            | "Components" >> beam.CombineGlobally(_Components())
        )

        def route(r, dup_map):
            hit = dup_map.get(r["key"])
            if hit is None:
                yield r
                return
            survivor, sim = hit
            yield beam.pvalue.TaggedOutput(
                DUPLICATES,
                duplicate_row(r, stage=STAGE, duplicate_of=survivor, method=METHOD,
                              similarity=sim),
            )

        return records | "Route" >> beam.FlatMap(
            route, dup_map=beam.pvalue.AsSingleton(decisions)
        ).with_outputs(DUPLICATES, main="records")


def exact_pairs(emb: np.ndarray, threshold: float, queries: Sequence[int] | None = None,
                chunk: int = 4096) -> dict[tuple[int, int], float]:
    """Brute force (faiss exact inner product range search): pairs (i, j), i < j, with cosine
    ≥ ``threshold``; with ``queries``, only pairs that involve one of those rows."""
    import faiss

    emb = np.ascontiguousarray(normalise(emb))
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    q = np.arange(len(emb)) if queries is None else np.asarray(queries)
    out: dict[tuple[int, int], float] = {}
    # range_search keeps results with inner product > radius
    radius = float(np.nextafter(np.float32(threshold), np.float32(-1)))
    for s in range(0, len(q), chunk):
        qi = q[s : s + chunk]
        lims, d, ids = index.range_search(emb[qi], radius)
        for r, i in enumerate(qi):
            for j, v in zip(ids[lims[r] : lims[r + 1]], d[lims[r] : lims[r + 1]], strict=True):
                if j != i and v >= threshold:
                    out[(min(int(i), int(j)), max(int(i), int(j)))] = float(v)
    return out
