"""Embedding stage, CLIP-score filter and the clip-retrieval embeddings folder."""

import io

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.demo.scenes import CLASSES, render_scene
from pipelines.demo.tiny_models import build_tiny_clip
from pipelines.models.handlers import OpenClipImageTextEmbedder
from pipelines.records import REJECTS
from pipelines.sinks.embeddings import load_embeddings
from pipelines.sinks.shards import WriteShards
from pipelines.stages.clip_filter import (
    BINS,
    ClipScoreFilter,
    boundary,
    score_bin,
    top_cutoff,
    top_decision,
)
from pipelines.stages.embed import Embed
from pipelines.stages.images import ImageConfig, normalise_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_clip(str(tmp_path_factory.mktemp("m") / "tiny-clip"), seed=3)


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, _ = render_scene(CLASSES[i % len(CLASSES)], rng, 96)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        res = normalise_image(buf.getvalue(), ImageConfig(image_size=64))
        out.append({"key": f"{i:04x}aaaa", "subset": "t", "source": ["a", "b"][i % 2],
                    "source_id": str(i), "url": f"http://x/{i}", "caption":
                    f"an aerial image of a {CLASSES[i % len(CLASSES)]}", "caption_kind": "web",
                    "_image": res.data, "phash": res.phash})
    return out


def test_embeddings_do_not_depend_on_batch_company(tiny):
    recs = _records(5)
    h = OpenClipImageTextEmbedder(tiny, batch_size=4)
    model = h.load_model()
    alone = [h.run_inference([r], model)[0].inference for r in recs]
    together = list(h.run_inference(recs[:4], model)) + list(h.run_inference(recs[4:], model))
    for a, b in zip(alone, together, strict=True):
        b = b.inference
        assert np.array_equal(a.image, b.image) and np.array_equal(a.text, b.text)
        assert a.score == b.score
        assert abs(np.linalg.norm(a.text) - 1) < 1e-5
        assert a.score == pytest.approx(float(np.dot(a.image, a.text)))


def test_clip_top_percent_is_per_source_and_deterministic():
    items = [(0.3, "k1"), (0.3, "k0"), (0.1, "k2"), (0.2, "k3")]
    cut = top_cutoff(items, 50)  # keep 2 of 4: both 0.3, ties broken by key
    assert cut == (-0.3, "k1")
    keep = [k for s, k in items
            if isinstance(top_decision({"key": k, "source": "a", "clip_score": s}, cut, 50), dict)]
    assert sorted(keep) == ["k0", "k1"]
    rej = top_decision({"key": "k2", "source": "a", "clip_score": 0.1}, cut, 50)
    assert rej.reason == "low_clip_score" and rej.score == 0.1 and rej.stage == "clip_filter"


def test_histogram_boundary_finds_the_exact_cut():
    import random

    rnd = random.Random(4)
    for n, percent in ((1, 50), (7, 10), (500, 30), (2000, 99.9), (300, 100)):
        # coarse scores: many ties, many records per bin
        items = [(round(rnd.uniform(-0.2, 0.5), 2), f"k{i:05d}") for i in range(n)]
        hist = {}
        for sc, _ in items:
            hist[score_bin(sc)] = hist.get(score_bin(sc), 0) + 1
        b, need = boundary(hist, percent)
        inside = sorted((-sc, k) for sc, k in items if score_bin(sc) == b)
        assert inside[need - 1] == top_cutoff(items, percent)
    assert score_bin(-1.0) == 0 and score_bin(1.0) == BINS - 1 and score_bin(7) == BINS - 1


def test_top_percent_in_beam_matches_the_exact_sort():
    import random

    rnd = random.Random(9)
    recs = [{"key": f"k{i:04d}", "subset": "t", "source": "ab"[i % 2], "source_id": str(i),
             "url": None, "clip_score": round(rnd.uniform(0.0, 0.4), 3)} for i in range(400)]
    recs[5]["clip_score"] = None
    recs[6]["clip_score"] = float("nan")
    expected = []
    for src in "ab":
        items = [(r["clip_score"], r["key"]) for r in recs
                 if r["source"] == src and r["clip_score"] is not None
                 and r["clip_score"] == r["clip_score"]]
        cut = top_cutoff(items, 25)
        expected += [k for sc, k in items if (-sc, k) <= cut]
    assert len(expected) == 50 + 50  # ceil(25% of 199) + ceil(25% of 200)
    with TestPipeline() as p:
        out = p | beam.Create(recs) | ClipScoreFilter(top_percent=25)
        assert_that(out["records"] | beam.Map(lambda r: r["key"]), equal_to(expected))
        assert_that(out[REJECTS] | "N" >> beam.combiners.Count.Globally(),
                    equal_to([400 - len(expected)]), label="rejects")


def test_embed_filter_and_embeddings_folder(tiny, tmp_path):
    recs = _records(12)
    folder = str(tmp_path / "emb")
    with TestPipeline() as p:
        emb = p | beam.Create(recs) | Embed(tiny, batch_size=4)
        kept = emb.records | ClipScoreFilter(top_percent=50)
        # the shard writer writes each shard's embeddings part from the same rows
        _ = kept["records"] | WriteShards(str(tmp_path / "out"), "t", samples_per_shard=4,
                                          embeddings_dir=folder)
        assert_that(kept[REJECTS] | beam.Map(lambda r: (r["source"], r["reason"])),
                    equal_to([("a", "low_clip_score")] * 3 + [("b", "low_clip_score")] * 3))
    img, txt, meta = load_embeddings(folder)
    assert (meta["shard"].to_pylist()
            == pq.read_table(str(tmp_path / "out" / "index")).column("shard").to_pylist())
    assert img.dtype == np.float16 and txt.dtype == np.float16
    assert img.shape == txt.shape == (6, 64) and meta.num_rows == 6
    np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
    # rows aligned: recompute the embeddings of the metadata's keys
    by_key = {r["key"]: r for r in recs}
    h = OpenClipImageTextEmbedder(tiny, batch_size=4)
    m = h.load_model()
    for i, key in enumerate(meta["key"].to_pylist()):
        inf = h.run_inference([by_key[key]], m)[0].inference
        np.testing.assert_allclose(img[i].astype(np.float32), inf.image, atol=2e-3)
        np.testing.assert_allclose(txt[i].astype(np.float32), inf.text, atol=2e-3)
        assert meta["clip_score"][i].as_py() == pytest.approx(inf.score, abs=1e-6)
