"""Near-duplicate variants: precision and recall per variant for sha256, pHash and semantic dedup.

Fixture: 40 base scenes (``render_scene``, 256 px, JPEG q90) and, per base, one copy of each
variant kind below. Every image goes through the pipeline's own ``normalise_image`` (sha256 of
the input bytes, pHash of the decoded picture and of its centre crops) and the embedding
handler (``OpenClipImageEmbedder``) of the demo's tiny CLIP (RANDOM weights, seed 3).

For each variant kind the candidate set is the 40 bases + their 40 variants; a method's
detections are all pairs of that set it calls duplicates, a true pair is (base i, variant i):
precision = true detections / detections, recall = true detections / 40.

Methods, at the recipe's defaults: ``sha256`` equal digests; ``phash full`` the full-picture
pHash alone within 4 bits (``--dedup_crops=false``); ``phash`` the default, ``dedup.distance``
(full pHash against full or centre-crop pHashes) within 4 bits (``--phash_hamming``);
``semantic`` cosine ≥ 1 − 0.0002 (``--semdedup_eps`` on the demo world; the random-weight model
puts distinct scenes up to ~0.9995 apart, so ε must be tiny there); ``phash+semantic`` either.

Asserted: exact copies by sha256 (recall 1); re-encode, resize and the centred crops (5% and
10% a side) by the default ``phash`` and by ``phash+semantic``, and re-encode and resize by
``semantic`` alone, each with precision ≥ 0.95 and recall ≥ 0.95. Reported, not asserted: flip,
90° rotation, colour jitter, overlay and an off-centre crop, which pHash is not built to catch
(semantic dedup with a trained model is), and crops by ``semantic`` with random weights (a 5%
crop's cosine, ~0.99, is below that of distinct scenes).
"""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from pipelines.demo.scenes import CLASSES, render_scene
from pipelines.demo.tiny_models import build_tiny_clip
from pipelines.models.handlers import OpenClipImageEmbedder
from pipelines.stages.dedup import DEFAULT_MAX_HAMMING
from pipelines.stages.images import ImageConfig, normalise_image, split_hashes

N_BASES = 40
PHASH_HAMMING = DEFAULT_MAX_HAMMING
SEM_EPS = 0.0002


def _jpeg(img, q=90):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _decoded(data):
    return Image.open(io.BytesIO(data)).convert("RGB")


def _crop(img, frac=0.05):
    w, h = img.size
    dx, dy = round(w * frac), round(h * frac)
    return img.crop((dx, dy, w - dx, h - dy))


def _overlay(img):
    out = img.copy()
    d = ImageDraw.Draw(out)
    w, h = out.size
    d.rectangle((int(w * 0.70), int(h * 0.85), w - 6, h - 6), fill=(255, 255, 255))
    d.text((int(w * 0.72), int(h * 0.87)), "(c) demo", fill=(0, 0, 0))
    return out


VARIANTS = {
    "exact copy": lambda data: data,
    "jpeg re-encode": lambda data: _jpeg(_decoded(data), 50),
    "resize": lambda data: _jpeg(_decoded(data).resize((150, 150), Image.BILINEAR)),
    "small crop": lambda data: _jpeg(_crop(_decoded(data))),
    "crop 10%": lambda data: _jpeg(_crop(_decoded(data), 0.10)),
    "off-centre crop": lambda data: _jpeg(_decoded(data).crop((0, 0, 230, 230))),
    "flip": lambda data: _jpeg(ImageOps.mirror(_decoded(data))),
    "rotation 90": lambda data: _jpeg(_decoded(data).rotate(90, expand=True)),
    "colour jitter": lambda data: _jpeg(ImageEnhance.Color(
        ImageEnhance.Brightness(_decoded(data)).enhance(1.15)).enhance(1.2)),
    "overlay": lambda data: _jpeg(_overlay(_decoded(data))),
}
METHODS = ("sha256", "phash full", "phash", "semantic", "phash+semantic")
CAUGHT_BY_DEFAULTS = ("jpeg re-encode", "resize", "small crop", "crop 10%")


def _distances(full, crops):
    """[n, n] ``dedup.distance`` of every pair, vectorised: full vs full, full vs crops."""
    d = np.bitwise_count(full[:, None] ^ full[None, :]).astype(np.int64)
    for k in range(crops.shape[1]):
        dk = np.bitwise_count(full[:, None] ^ crops[None, :, k]).astype(np.int64)
        d = np.minimum(d, np.minimum(dk, dk.T))
    return d


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    rng = np.random.default_rng(5)
    bases = [_jpeg(render_scene(CLASSES[i % len(CLASSES)], rng, 256)[0]) for i in range(N_BASES)]
    tiny = build_tiny_clip(str(tmp_path_factory.mktemp("m") / "tiny-clip"), seed=3)
    handler = OpenClipImageEmbedder(tiny, batch_size=32)
    model = handler.load_model()
    cfg = ImageConfig()

    def describe(datas):
        norm = [normalise_image(d, cfg) for d in datas]
        embs = []
        for s in range(0, len(norm), 32):
            e, _ = handler.embed([{"_image": n.data} for n in norm[s : s + 32]], model)
            embs += e
        return ([n.sha256 for n in norm], np.array([int(n.phash, 16) for n in norm], np.uint64),
                np.stack(embs),
                np.array([split_hashes(n.phash_crops) for n in norm], np.uint64))

    base = describe(bases)
    table = {}
    for kind, make in VARIANTS.items():
        var = describe([make(b) for b in bases])
        sha = base[0] + var[0]
        ph = np.concatenate([base[1], var[1]])
        emb = np.concatenate([base[2], var[2]])
        crops = np.concatenate([base[3], var[3]])
        n = len(sha)
        iu = np.triu_indices(n, 1)
        ham = np.bitwise_count(ph[:, None] ^ ph[None, :])
        cos = emb @ emb.T
        flags = {
            "sha256": np.array([[a == b for b in sha] for a in sha]),
            "phash full": ham <= PHASH_HAMMING,
            "phash": _distances(ph, crops) <= PHASH_HAMMING,
            "semantic": cos >= 1 - SEM_EPS,
        }
        flags["phash+semantic"] = flags["phash"] | flags["semantic"]
        truth = np.zeros((n, n), bool)
        truth[np.arange(N_BASES), np.arange(N_BASES) + N_BASES] = True
        for m, f in flags.items():
            det = f[iu]
            tp = int((det & truth[iu]).sum())
            table[(kind, m)] = {
                "detected": int(det.sum()), "tp": tp,
                "precision": tp / det.sum() if det.sum() else float("nan"),
                "recall": tp / N_BASES,
            }
    return table


def _report(table):
    lines = [f"{'variant':16s}" + "".join(f"{m:>22s}" for m in METHODS),
             f"{'':16s}" + "".join(f"{'P     R':>22s}" for _ in METHODS)]
    for kind in VARIANTS:
        cells = []
        for m in METHODS:
            r = table[(kind, m)]
            p = "  n/a" if np.isnan(r["precision"]) else f"{r['precision']:.2f}"
            cells.append(f"{p:>16s} {r['recall']:.2f}")
        lines.append(f"{kind:16s}" + "".join(cells))
    return "\n".join(lines)


def test_report_and_defaults_catch_reencode_resize_and_crop(measured):
    print("\nnear-duplicate detection per variant (P = precision, R = recall; "
          f"{N_BASES} bases, tiny random-weight CLIP)\n" + _report(measured))
    assert measured[("exact copy", "sha256")]["recall"] == 1.0
    for kind in CAUGHT_BY_DEFAULTS:
        for m in ("phash", "phash+semantic"):
            r = measured[(kind, m)]
            assert r["precision"] >= 0.95 and r["recall"] >= 0.95, (kind, m, r)
    for kind in ("jpeg re-encode", "resize"):
        r = measured[(kind, "semantic")]
        assert r["precision"] >= 0.95 and r["recall"] >= 0.95, (kind, "semantic", r)


def test_crop_hashes_are_what_catch_crops(measured):
    # the full-picture pHash alone misses most 5% crops: the crop hashes do the work
    assert measured[("small crop", "phash full")]["recall"] < 0.5
    assert measured[("small crop", "phash")]["recall"] >= 0.95
