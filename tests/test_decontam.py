"""Test-set decontamination: planted benchmark images (exact and altered) are removed and
reported under the right benchmark."""

import io
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines.demo.scenes import CLASSES, render_scene
from pipelines.demo.tiny_models import build_tiny_clip
from pipelines.models.handlers import OpenClipImageEmbedder
from pipelines.records import REJECTS
from pipelines.stages.decontam import Decontaminate, list_images, parse_specs
from pipelines.stages.embed import Embed
from pipelines.stages.images import ImageConfig, normalise_image


def _jpeg(img, q=90):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("decontam")
    rng = np.random.default_rng(11)
    imgs = [render_scene(CLASSES[i % len(CLASSES)], rng, 128)[0] for i in range(16)]
    # classification benchmark: class folders; images 0-3
    for i in range(4):
        d = root / "cls" / CLASSES[i]
        d.mkdir(parents=True)
        (d / f"img{i}.jpg").write_bytes(_jpeg(imgs[i]))
    # retrieval benchmark: Karpathy-style caption JSON + images/; images 4-5
    (root / "ret" / "images").mkdir(parents=True)
    doc = {"images": []}
    for i in (4, 5):
        imgs[i].save(root / "ret" / "images" / f"r{i}.png", "PNG")
        doc["images"].append({"filename": f"r{i}.png", "split": "test",
                              "sentences": [{"raw": "an aerial image"}]})
    (root / "ret" / "dataset_ret.json").write_text(json.dumps(doc))
    # training records: exact copy of 0, re-encoded 1, resized 2, cropped 3 (6% a side,
    # centred: caught through the crop pHashes), re-encoded 4, resized 5, and ten unrelated
    # scenes (6..15)
    variants = {
        "exact0": (root / "cls" / CLASSES[0] / "img0.jpg").read_bytes(),
        "reenc1": _jpeg(imgs[1], 50),
        "resize2": _jpeg(imgs[2].resize((100, 100), Image.BILINEAR)),
        "crop3": _jpeg(imgs[3].crop((8, 8, 120, 120))),
        "reenc4": _jpeg(imgs[4], 60),
        "resize5": _jpeg(imgs[5].resize((90, 90), Image.BILINEAR)),
    }
    variants.update({f"clean{i}": _jpeg(imgs[i]) for i in range(6, 16)})
    cfg = ImageConfig(image_size=64)
    recs = []
    for name, data in variants.items():
        res = normalise_image(data, cfg)
        recs.append({"key": name, "subset": "t", "source": "s", "source_id": name, "url": None,
                     "caption": "an aerial image", "_image": res.data, "phash": res.phash,
                     "_phash_crops": res.phash_crops})
    tiny = build_tiny_clip(str(root / "tiny-clip"), seed=3)
    return root, recs, cfg, tiny


def test_specs_and_listing(world):
    root, *_ = world
    specs = parse_specs([f"cls={root / 'cls'},ret={root / 'ret'}"])
    assert [n for n, _ in specs] == ["cls", "ret"]
    assert [r for r, _ in list_images(str(root / "cls"))] == sorted(
        f"{CLASSES[i]}/img{i}.jpg" for i in range(4))
    assert [r for r, _ in list_images(str(root / "ret" / "dataset_ret.json"))] == ["r4.png",
                                                                                   "r5.png"]
    with pytest.raises(ValueError):
        parse_specs(["nameless"])


@pytest.mark.parametrize("use_embeddings", [False, True])
def test_planted_benchmark_images_are_removed(world, use_embeddings):
    root, recs, cfg, tiny = world
    specs = parse_specs([f"cls={root / 'cls'}", f"ret={root / 'ret'}"])
    embedder = OpenClipImageEmbedder(tiny, batch_size=8) if use_embeddings else None
    expected = [("exact0", f"cls: {CLASSES[0]}/img0.jpg"), ("reenc1", f"cls: {CLASSES[1]}/img1.jpg"),
                ("resize2", f"cls: {CLASSES[2]}/img2.jpg"), ("crop3", f"cls: {CLASSES[3]}/img3.jpg"),
                ("reenc4", "ret: r4.png"),
                ("resize5", "ret: r5.png")]
    with TestPipeline() as p:
        records = p | beam.Create(recs)
        if use_embeddings:
            records = (records | Embed(tiny, batch_size=8)).records
        out = records | Decontaminate(specs, cfg, embedder, max_hamming=4, min_cosine=0.9998)
        assert_that(
            out[REJECTS] | beam.Map(lambda r: (r["key"], r["detail"].split(" (")[0], r["stage"],
                                               r["reason"])),
            equal_to([(k, d, "decontam", "benchmark_overlap") for k, d in expected]),
            label="rejects")
        assert_that(out["records"] | beam.Map(lambda r: r["key"]),
                    equal_to([f"clean{i}" for i in range(6, 16)]), label="kept")


def _random_index(n, rng, dim=16, k=4):
    from pipelines.stages.decontam import BenchmarkIndex

    phashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    crops = rng.integers(0, 2**63, (n, k), dtype=np.uint64)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return BenchmarkIndex([f"b{i % 3}" for i in range(n)], [f"img{i}" for i in range(n)],
                          phashes, crops, emb)


def _flip(h, bits, rng):
    for b in rng.choice(64, bits, replace=False):
        h ^= 1 << int(b)
    return h


def test_band_lookup_finds_what_brute_force_finds():
    rng = np.random.default_rng(3)
    idx = _random_index(3000, rng)
    queries = []
    for q in range(400):
        i = int(rng.integers(len(idx)))
        kind = q % 4
        full = int(rng.integers(0, 2**63)) * 2
        crops = "".join(f"{int(rng.integers(0, 2**63)):016x}" for _ in range(4))
        if kind == 0:  # near a benchmark image's full hash
            full = _flip(int(idx.phashes[i]), int(rng.integers(0, 7)), rng)
        elif kind == 1:  # near one of its crop hashes
            full = _flip(int(idx.crops[i, q % 4]), int(rng.integers(0, 7)), rng)
        elif kind == 2:  # one of our crops is near its full hash
            c = _flip(int(idx.phashes[i]), int(rng.integers(0, 7)), rng)
            crops = f"{c:016x}" + crops[16:]
        queries.append((f"{full:016x}", crops))
    found = 0
    for t in (0, 2, 4):
        for phash, crops in queries:
            ham = idx.hamming(phash, crops)
            want = (int(ham.min()), int(np.argmin(ham))) if ham.min() <= t else None
            assert idx.phash_match(phash, crops, t) == want
            found += want is not None
    assert found > 300  # the planted near matches are there to be found


def test_nearest_is_exact_and_independent_of_batch_company():
    from pipelines.stages import decontam

    rng = np.random.default_rng(4)
    idx = _random_index(decontam.BENCH_BLOCK + 500, rng)  # two benchmark blocks
    q = rng.normal(size=(decontam.EMB_BATCH + 40, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best, arg = idx.nearest(q)
    sims = q.astype(np.float64) @ idx.embeddings.T.astype(np.float64)
    assert np.array_equal(arg, sims.argmax(axis=1))
    np.testing.assert_allclose(best, sims.max(axis=1), atol=1e-5)
    alone = [idx.nearest(q[i : i + 1]) for i in (0, 7, decontam.EMB_BATCH + 3)]
    for (b, a), i in zip(alone, (0, 7, decontam.EMB_BATCH + 3), strict=True):
        assert a[0] == arg[i] and b[0] == best[i]  # bitwise
