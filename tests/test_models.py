"""The tiny CLIP build, the local-only open_clip loader, the RS probe and the RS filter stage.

Every model here is the project's tiny random-init CLIP, built into a tmp dir; nothing is
downloaded (HF_HUB_OFFLINE=1). Images are synthetic: top-down textures ("aerial") vs
ground-level pictures with a sky gradient and a horizon.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import io
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.internal import pickler
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to, is_not_empty
from PIL import Image, ImageDraw

from pipelines.demo.tiny_models import (
    CONFIG_NAME,
    TINY_ARCH,
    WEIGHTS_NAME,
    build_tiny_clip,
    build_tiny_models,
)
from pipelines.models.handlers import OpenClipImageEmbedder, RSInference, RSScorer
from pipelines.models.open_clip_loader import encode_images, load_open_clip
from pipelines.models.rs_probe import RSProbe, fit_probe, train_rs_probe
from pipelines.records import REJECTS, Reject
from pipelines.stages.rs_filter import RSFilter, rs_decision


# ---- synthetic images ---------------------------------------------------------------------
def aerial_image(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Top-down texture: coarse land-cover patches, blocks, maybe a road; no horizon."""
    coarse = rng.normal(0, 25, (8, 8, 3)) + rng.integers(40, 160, 3)
    resample = Image.Resampling.NEAREST if rng.random() < 0.5 else Image.Resampling.BILINEAR
    im = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((size, size), resample)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 12))):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(3, size // 3, 2))
        d.rectangle([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(30, 220, 3)))
    if rng.random() < 0.6:
        d.line([0, int(rng.integers(0, size)), size, int(rng.integers(0, size))],
               fill=(120, 120, 120), width=int(rng.integers(1, 4)))
    a = np.asarray(im, np.float32) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def ground_image(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Ground-level picture: vertical sky gradient, a horizon, ground below, maybe objects."""
    hy = int(rng.integers(int(size * 0.35), int(size * 0.7)))
    top = np.array([rng.integers(60, 140), rng.integers(120, 190), rng.integers(200, 255)],
                   np.float32)
    bottom = np.array([220, 225, 235], np.float32) * rng.uniform(0.85, 1.0)
    t = np.linspace(0, 1, hy)[:, None, None]
    a = np.zeros((size, size, 3), np.float32)
    a[:hy] = (1 - t) * top + t * bottom
    g = np.array([rng.integers(40, 140), rng.integers(60, 150), rng.integers(20, 90)], np.float32)
    a[hy:] = g + rng.normal(0, 12, (size - hy, size, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(0, 3))):
        x, w, h = int(rng.integers(0, size)), int(rng.integers(4, 16)), int(rng.integers(4, hy))
        d.rectangle([x, hy - h, x + w, hy + 2], fill=tuple(int(c) for c in rng.integers(30, 200, 3)))
    a = np.asarray(im, np.float32) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_probe_set(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label, render in (("rs", aerial_image), ("non_rs", ground_image)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            (root / label / f"{i:03d}.jpg").write_bytes(jpeg(render(rng)))
    return root


def record(key: str, image: bytes) -> dict:
    return {"key": key, "subset": "pub11", "source": "test", "source_id": key,
            "url": f"http://example.invalid/{key}.jpg", "caption": "aerial view", "_image": image}


# ---- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return build_tiny_clip(str(tmp_path_factory.mktemp("models") / "tiny-clip"), seed=0)


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory) -> Path:
    return write_probe_set(tmp_path_factory.mktemp("data") / "probe", n=50, seed=1)


@pytest.fixture(scope="module")
def probe_path(tiny_clip, probe_data, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("probe") / "rs_probe.json")
    train_rs_probe(str(probe_data / "rs"), str(probe_data / "non_rs"), tiny_clip, None, out,
                   device="cpu")
    return out


@pytest.fixture(scope="module")
def held_out() -> tuple[list[Image.Image], list[Image.Image]]:
    rng = np.random.default_rng(99)
    return [aerial_image(rng) for _ in range(40)], [ground_image(rng) for _ in range(40)]


# ---- tiny model build ---------------------------------------------------------------------
def _digest(d: str) -> dict[str, str]:
    return {n: hashlib.sha256((Path(d) / n).read_bytes()).hexdigest()
            for n in (CONFIG_NAME, WEIGHTS_NAME)}


def test_tiny_clip_build_is_deterministic(tiny_clip, tmp_path):
    torch.manual_seed(1234)  # the caller's RNG state must not matter
    again = build_tiny_clip(str(tmp_path / "again"), seed=0)
    assert _digest(again) == _digest(tiny_clip)
    other = build_tiny_clip(str(tmp_path / "seed1"), seed=1)
    assert _digest(other)[WEIGHTS_NAME] != _digest(tiny_clip)[WEIGHTS_NAME]
    cfg = json.loads((Path(tiny_clip) / CONFIG_NAME).read_text())
    assert cfg["model_cfg"]["embed_dim"] == 64 and "preprocess_cfg" in cfg


# ---- loader -------------------------------------------------------------------------------
def test_loader_directory_and_checkpoints_agree(tiny_clip, tmp_path, held_out):
    images = held_out[0][:4] + held_out[1][:4]
    net, pre, tok = load_open_clip(tiny_clip)
    assert not net.training
    ref = encode_images(net, pre, images)
    assert ref.shape == (8, 64) and ref.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, rtol=1e-5)
    assert tuple(tok(["an aerial view of a harbor"]).shape) == (1, 77)

    # open_clip_train's epoch_N.pt: {"state_dict": ...} saved from DDP (module. prefix)
    sd = net.state_dict()
    ckpt = tmp_path / "epoch_0.pt"
    torch.save({"epoch": 0, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in sd.items()}},
               ckpt)
    bare = tmp_path / "bare.bin"
    torch.save(dict(sd), bare)
    variants = [
        (f"local-dir:{tiny_clip}", None),
        (TINY_ARCH, str(ckpt)),
        (TINY_ARCH, str(bare)),
        (TINY_ARCH, str(Path(tiny_clip) / WEIGHTS_NAME)),  # safetensors
        (tiny_clip, str(ckpt)),  # directory for the architecture, file for the weights
    ]
    for model, pretrained in variants:
        n2, p2, _ = load_open_clip(model, pretrained)
        np.testing.assert_array_equal(encode_images(n2, p2, images), ref, err_msg=str(model))

    # no weights at all → random init, which differs from the saved weights
    n3, p3, _ = load_open_clip(TINY_ARCH, None)
    assert not np.allclose(encode_images(n3, p3, images), ref)


@pytest.mark.parametrize("model,pretrained", [
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None),
    ("https://example.com/model.pt", None),
    ("ViT-B-32", "openai"),  # a pretrained *tag* is a hub download
    ("ViT-B-32", "https://example.com/epoch_1.pt"),
    ("not-an-architecture", None),
    ("some-org/some-model", None),
])
def test_loader_refuses_hub_names(model, pretrained):
    with pytest.raises(ValueError):
        load_open_clip(model, pretrained)


def test_loader_refuses_unknown_precision(tiny_clip):
    with pytest.raises(ValueError):
        load_open_clip(tiny_clip, precision="int8")


# ---- probe --------------------------------------------------------------------------------
def test_probe_trains_and_separates(probe_path, tiny_clip, held_out):
    probe = RSProbe.load(probe_path)
    val = probe.metrics["val"]
    assert val["n"] == 20 and val["accuracy"] >= 0.9, val
    assert val["precision"] >= 0.9 and val["recall"] >= 0.9, val
    assert probe.model == tiny_clip and probe.pretrained is None
    assert probe.features == "embedding" and probe.dim == 64
    # a fresh held-out set, never seen during fitting or C selection
    net, pre, _ = load_open_clip(tiny_clip)
    rs, non_rs = held_out
    s_rs = probe.score(encode_images(net, pre, rs))
    s_non = probe.score(encode_images(net, pre, non_rs))
    acc = (np.sum(s_rs >= probe.threshold) + np.sum(s_non < probe.threshold)) / 80
    assert acc >= 0.9, (acc, s_rs, s_non)


def test_probe_json_round_trip(probe_path, tmp_path):
    probe = RSProbe.load(probe_path)
    again = RSProbe.load(probe.save(str(tmp_path / "copy.json")))
    np.testing.assert_array_equal(again.weights, probe.weights)
    assert again.weights.dtype == np.float32
    assert (again.bias, again.threshold, again.model) == (probe.bias, probe.threshold, probe.model)
    assert again.metrics == probe.metrics
    x = np.random.default_rng(0).normal(size=(5, probe.dim)).astype(np.float32)
    np.testing.assert_array_equal(again.score(x), probe.score(x))
    assert probe.score(x[0]).shape == ()
    (tmp_path / "bad.json").write_text(json.dumps({"weights": [1.0], "bias": 0}))
    with pytest.raises(ValueError):
        RSProbe.load(str(tmp_path / "bad.json"))


def test_probe_fit_is_deterministic():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.3, 1, (30, 8)), rng.normal(-0.3, 1, (30, 8))])
    y = np.r_[np.ones(30), np.zeros(30)].astype(int)
    a, _ = fit_probe(x, y, seed=3)
    b, _ = fit_probe(x, y, seed=3)
    assert json.dumps(a.to_json()) == json.dumps(b.to_json())


def test_build_tiny_models_finds_probe_data(tmp_path, held_out):
    write_probe_set(tmp_path / "probe", n=12, seed=5)
    out = build_tiny_models(str(tmp_path / "models"), seed=0)
    assert out["clip"] == str(tmp_path / "models" / "tiny-clip")
    probe = RSProbe.load(out["rs_probe"])
    # the demo probe: 64-d embedding + mean/std of the 96-wide patch tokens
    assert probe.features == "embedding+token_stats" and probe.dim == 64 + 2 * 96
    scorer = RSScorer(None, None, out["rs_probe"], device="cpu")
    res = scorer.run_inference([record("a", jpeg(held_out[0][2])), record("g", jpeg(held_out[1][2]))],
                               scorer.load_model())
    assert res[0].inference.score > 0.5 > res[1].inference.score
    assert res[0].inference.embedding.shape == (64,)
    assert build_tiny_models(str(tmp_path / "alone" / "models"))["rs_probe"] is None


# ---- handlers -----------------------------------------------------------------------------
def test_handlers_pickle_and_embed(tiny_clip, probe_path, held_out):
    scorer = RSScorer(None, None, probe_path, device="cpu", batch_size=8)  # model from probe
    embedder = OpenClipImageEmbedder(tiny_clip, device="cpu", batch_size=8)
    for h in (scorer, embedder):
        # the round trip Beam itself makes when it ships a DoFn to a worker
        assert pickler.loads(pickler.dumps(h)).batch_elements_kwargs() == {
            "min_batch_size": 1, "max_batch_size": 8}
    batch = [record("a", jpeg(held_out[0][0])), record("g", jpeg(held_out[1][0])),
             record("bad", b"not an image")]
    assert embedder.get_num_bytes(batch) == sum(len(r["_image"]) for r in batch)
    res = list(embedder.run_inference(batch, embedder.load_model()))
    assert [r.example["key"] for r in res] == ["a", "g", "bad"]
    assert res[0].inference.dtype == np.float32 and res[0].inference.shape == (64,)
    assert abs(np.linalg.norm(res[0].inference) - 1) < 1e-5 and res[2].inference is None
    scored = list(scorer.run_inference(batch, scorer.load_model()))
    assert isinstance(scored[0].inference, RSInference)
    np.testing.assert_allclose(scored[0].inference.embedding, res[0].inference, atol=1e-6)
    assert scored[0].inference.score > 0.5 > scored[1].inference.score
    assert scored[2].inference is None


# ---- stage --------------------------------------------------------------------------------
def test_rs_decision():
    rec = record("k", b"")
    kept = rs_decision(rec, 0.8, 0.5)
    assert kept["rs_score"] == 0.8 and "rs_score" not in rec
    rej = rs_decision(rec, 0.2, 0.5)
    assert isinstance(rej, Reject)
    assert (rej.stage, rej.reason, rej.score) == ("rs_filter", "non_rs", 0.2)
    assert rs_decision(rec, 0.5, 0.5)["rs_score"] == 0.5  # threshold is inclusive
    assert rs_decision(rec, None, 0.5).reason == "undecodable"


def test_rs_filter_pipeline_routes_rejects(tiny_clip, probe_path, held_out):
    records = [record("aerial0", jpeg(held_out[0][1])), record("ground0", jpeg(held_out[1][1]))]
    with TestPipeline() as p:
        out = p | beam.Create(records) | RSFilter(tiny_clip, None, probe_path, device="cpu")
        kept = out.records | "KeptKeys" >> beam.Map(
            lambda r: (r["key"], r["rs_score"] is not None and r["rs_score"] >= 0.5))
        assert_that(kept, equal_to([("aerial0", True)]), label="kept")
        rejected = out[REJECTS] | "RejectKeys" >> beam.Map(
            lambda r: (r["key"], r["stage"], r["reason"], r["score"] < 0.5))
        assert_that(rejected, equal_to([("ground0", "rs_filter", "non_rs", True)]),
                    label="rejected")


def test_rs_filter_disabled_keeps_everything():
    records = [record("x", b"..."), record("y", b"...")]
    with TestPipeline() as p:
        out = p | beam.Create(records) | RSFilter(None, None, None, enabled=False)
        assert_that(out.records | beam.Map(lambda r: (r["key"], r["rs_score"])),
                    equal_to([("x", None), ("y", None)]), label="kept")
        assert_that(out[REJECTS], equal_to([]), label="no_rejects")
        assert_that(out.records, is_not_empty(), label="not_empty")


def test_rs_scores_do_not_depend_on_batch_company(tiny_clip, probe_path):
    """Byte-identical builds need a record's score to be the same whatever shares its batch."""
    rng = np.random.default_rng(7)
    recs = [record(f"k{i}", jpeg(aerial_image(rng) if i % 2 else ground_image(rng)))
            for i in range(9)]
    handler = RSScorer(tiny_clip, None, probe_path, device="cpu", batch_size=8)
    model = handler.load_model()
    alone = [handler.run_inference([r], model)[0].inference for r in recs[:3]]
    together = handler.run_inference(recs[:8], model)[:3]
    for a, t in zip(alone, together, strict=True):
        assert a.score == t.inference.score
        assert np.array_equal(a.embedding, t.inference.embedding)


# ---- weights on a Beam filesystem; configs that name a hub --------------------------------
def _stub_filesystem(root):
    """A Beam FileSystem where ``stubfs://x`` is ``root/x`` on disk: the loader sees a remote
    filesystem (as gs:// on Dataflow) while the test needs no network."""
    from apache_beam.io.filesystem import FileMetadata
    from apache_beam.io.localfilesystem import LocalFileSystem

    prefix = "stubfs://"

    class StubFileSystem(LocalFileSystem):
        @classmethod
        def scheme(cls):
            return "stubfs"

        def _local(self, path):  # the base class calls back with local paths too
            return os.path.join(root, path[len(prefix):]) if path.startswith(prefix) else path

        def join(self, basepath, *paths):
            return "/".join([basepath.rstrip("/"), *paths])

        def _list(self, dir_or_prefix):
            for m in super()._list(self._local(dir_or_prefix)):
                rel = os.path.relpath(m.path, root)
                yield FileMetadata(prefix + rel, m.size_in_bytes, m.last_updated_in_seconds)

        def open(self, path, *a, **kw):
            return super().open(self._local(path), *a, **kw)

        def exists(self, path):
            return super().exists(self._local(path))

        def size(self, path):
            return super().size(self._local(path))

        def last_updated(self, path):
            return super().last_updated(self._local(path))

        def metadata(self, path):
            m = super().metadata(self._local(path))
            return FileMetadata(path, m.size_in_bytes, m.last_updated_in_seconds)

    return StubFileSystem


def test_model_directory_on_a_beam_filesystem_loads(tiny_clip, tmp_path, monkeypatch, held_out):
    """A model directory and a checkpoint on a FileSystems path other than local disk (as
    gs:// on Dataflow) are copied once to local disk and load like the local originals."""
    import shutil

    from pipelines.models import open_clip_loader as loader

    bucket = tmp_path / "bucket"
    shutil.copytree(tiny_clip, bucket / "models" / "tiny-clip")
    fs = _stub_filesystem(str(bucket))  # noqa: F841 — defining it registers the scheme
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path / "cache"))
    images = held_out[0][:3]
    ref = encode_images(*load_open_clip(tiny_clip)[:2], images)
    net, pre, _ = load_open_clip("stubfs://models/tiny-clip")
    np.testing.assert_array_equal(encode_images(net, pre, images), ref)
    copies = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(copies) == 1 and copies[0].endswith("tiny-clip")
    load_open_clip("stubfs://models/tiny-clip")  # the second load reuses the copy
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == copies
    # a checkpoint file on the filesystem, with the architecture by name
    net2, pre2, _ = load_open_clip(TINY_ARCH, f"stubfs://models/tiny-clip/{WEIGHTS_NAME}")
    np.testing.assert_array_equal(encode_images(net2, pre2, images), ref)
    with pytest.raises(FileNotFoundError):
        load_open_clip("stubfs://models/nothing-here")


def test_a_model_config_that_names_a_hub_model_is_refused(tiny_clip, tmp_path):
    """open_clip would download an HF text tower (AutoConfig.from_pretrained) or tokenizer
    named in the config, whatever pretrained_text says: refuse before it tries."""
    import shutil

    bad = tmp_path / "hub-text"
    shutil.copytree(tiny_clip, bad)
    cfg = json.loads((bad / CONFIG_NAME).read_text())
    cfg["model_cfg"]["text_cfg"]["hf_model_name"] = "some-org/some-text-tower"
    (bad / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hf_model_name"):
        load_open_clip(str(bad))
    with pytest.raises(ValueError, match="SigLIP"):
        load_open_clip("ViT-B-16-SigLIP")
