"""Semantic dedup: the pure core against exact search, and the Beam transform."""

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.perf.dedup import synthetic
from pipelines.records import DUPLICATES
from pipelines.stages.semdedup import (
    SemanticDedup,
    SemDedupConfig,
    cluster_edges,
    exact_pairs,
    normalise,
    resolve,
    semdedup_arrays,
    train_centroids,
)


def test_core_finds_the_exact_pairs_on_planted_groups():
    x, group = synthetic(8000, seed=1, dim=64)
    cfg = SemDedupConfig(eps=0.05, cluster_size=500)
    res = semdedup_arrays(x, cfg)
    exact = exact_pairs(x, cfg.threshold)
    assert exact, "the fixture plants near-duplicates"
    found = set(res["pairs"])
    recall = len(found & set(exact)) / len(exact)
    assert recall >= 0.99 and found <= set(exact), recall
    # every dropped row is a planted variant, pointing at a member of its own group
    for i, (s, sim) in res["dropped"].items():
        assert group[i] >= 0 and group[i] == group[s] and sim >= cfg.threshold - 1e-6


def test_survivor_is_highest_score_then_smallest_key():
    edges = [("b", "a", 0.99), ("c", "b", 0.98)]
    scores = {"a": 0.1, "b": 0.3, "c": 0.3}
    out = resolve(edges, lambda k: (-scores[k], k))
    assert out == {"a": ("b", 0.99), "c": ("b", 0.98)}


def test_oversized_clusters_are_split_and_blocks_bound_memory():
    rng = np.random.default_rng(0)
    # one tight blob of 4000 points: a single k-means cell at cluster_size 4000
    base = normalise(rng.standard_normal(32).astype(np.float32))
    x = normalise(base + 0.3 * rng.standard_normal((4000, 32)).astype(np.float32))
    cfg = SemDedupConfig(cluster_size=4000, max_cluster=500)
    cents = train_centroids(x, len(x), cfg)
    assert len(cents) >= 8  # 4000 expected in one cell > 500: split by sub-k-means
    # block size does not change the pairs
    e = x[:300]
    home = np.ones(300, bool)
    a = sorted(cluster_edges(e, home, 0.9, block=4096))
    b = sorted(cluster_edges(e, home, 0.9, block=7))
    assert [p[:2] for p in a] == [p[:2] for p in b]


def _rec(key, emb, score, source="s"):
    return {"key": key, "subset": "t", "source": source, "source_id": key, "url": None,
            "caption": key, "_img_emb": emb, "clip_score": score}


def test_beam_transform_writes_semantic_duplicate_rows():
    rng = np.random.default_rng(3)
    bases = normalise(rng.standard_normal((40, 16)).astype(np.float32))
    recs = [_rec(f"k{i:03d}", bases[i], 0.2) for i in range(40)]
    # k900 and k901: copies of k005 (k901 scores higher, so it survives), k902 copy of k010
    recs.append(_rec("k900", normalise(bases[5] + 0.001), 0.1))
    recs.append(_rec("k901", normalise(bases[5] + 0.002), 0.9))
    recs.append(_rec("k902", normalise(bases[10] - 0.001), 0.1))
    cfg = SemDedupConfig(eps=0.01, cluster_size=10, sample_size=30)
    with TestPipeline() as p:
        out = p | beam.Create(recs) | SemanticDedup(cfg)
        dups = out[DUPLICATES] | "D" >> beam.Map(
            lambda d: (d["key"], d["duplicate_of"], d["method"], d["stage"]))
        assert_that(dups, equal_to([("k005", "k901", "semantic", "semantic_dedup"),
                                    ("k900", "k901", "semantic", "semantic_dedup"),
                                    ("k902", "k010", "semantic", "semantic_dedup")]),
                    label="dups")
        assert_that(out["records"] | beam.Map(lambda r: r["key"]),
                    equal_to([r["key"] for r in recs if r["key"] not in
                              ("k005", "k900", "k902")]), label="kept")
