"""The RS-image detector: a linear probe on CLIP image embeddings.

RS5M kept only the web images a trained "RS detector" called remote-sensing. Ours is a logistic
regression on open_clip image-tower features (by default the L2-normalised image embedding),
trained from two folders of labelled images (``rs/`` and ``non_rs/``)::

    python -m pipelines.models.rs_probe train --rs DIR --non_rs DIR \\
        --model NAME_OR_DIR [--pretrained CKPT] [--features F] --out rs_probe.json
    python -m pipelines.models.rs_probe eval --probe rs_probe.json --rs DIR --non_rs DIR

Features (``--features``, stored in the probe):

* ``embedding`` (default): the L2-normalised CLIP image embedding — the right input for real
  CLIP weights (RemoteCLIP, GeoRSCLIP, SkyCLIP...).
* ``embedding+token_stats``: that embedding concatenated with the per-channel mean and std of
  the image tower's last-layer patch tokens (same forward pass; ``forward_images``). The demo's
  tiny CLIP uses it: with random weights the 64-d embedding is a random projection of the CLS
  token alone and separates the demo's aerial scenes from ground-level photos only ~95% of the
  time, while the spread of the patch tokens (uniform sky vs textured ground) lifts that to
  ~99%. It is still a function of the CLIP image tower alone.

How it is fitted (deterministic for a given ``seed``):

* every image is embedded once with the CLIP image tower (``encode_images``);
* a stratified ``val_fraction`` of each class is held out; the rest is the training split;
* features are standardised on the training split and ``C`` is chosen from a fixed grid by
  stratified k-fold cross-validation *inside* the training split, so the held-out split is
  used for nothing but the reported precision / recall / accuracy (no selection bias);
* the standardisation is folded back into the weights, so the probe is a plain
  ``sigmoid(features @ weights + bias)`` — one dot product per image in the pipeline.

With real RS CLIP weights point ``--model`` / ``--pretrained`` at them and give a few hundred
labelled images per class.

The probe is stored as JSON (never pickle): weights, bias, threshold, the model it belongs to
and the validation metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import posixpath
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from apache_beam.io.filesystems import FileSystems
from PIL import Image

log = logging.getLogger(__name__)

FORMAT = "rs-corpus/rs-probe"
VERSION = 1
EMBEDDING = "embedding"
EMBEDDING_TOKEN_STATS = "embedding+token_stats"
FEATURES = (EMBEDDING, EMBEDDING_TOKEN_STATS)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


@dataclasses.dataclass
class RSProbe:
    """``score(x) = sigmoid(x @ weights + bias)``; ``x`` = ``inputs(embedding, token_stats)``.

    For ``features="embedding"`` (the default) ``x`` is just the L2-normalised CLIP image
    embedding, so ``probe.score(embeddings)`` is all there is to it.
    """

    weights: np.ndarray  # float32 [input dim]
    bias: float
    threshold: float = 0.5
    model: str | None = None
    pretrained: str | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    features: str = EMBEDDING

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float32).reshape(-1)
        self.bias = float(self.bias)
        self.threshold = float(self.threshold)
        if self.features not in FEATURES:
            raise ValueError(f"unsupported probe features {self.features!r}; one of {FEATURES}")

    @property
    def dim(self) -> int:
        return int(self.weights.shape[0])

    @property
    def needs_token_stats(self) -> bool:
        return self.features == EMBEDDING_TOKEN_STATS

    def inputs(self, embeddings: np.ndarray, token_stats: np.ndarray | None = None) -> np.ndarray:
        """The probe's input rows from embeddings (and token stats, if its features use them)."""
        return probe_inputs(self.features, embeddings, token_stats)

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"probe input dim {x.shape[-1]} != probe dim {self.dim}: the probe "
                f"({self.features}) was trained for model {self.model!r}"
            )
        return x @ self.weights.astype(np.float64) + self.bias

    def score(self, x: np.ndarray) -> np.ndarray:
        """P(remote-sensing) for ``[N, dim]`` (→ ``[N]``) or ``[dim]`` (→ 0-d) probe inputs."""
        from scipy.special import expit  # numerically stable sigmoid

        return expit(self.logits(x))

    def predict(self, embeddings: np.ndarray, threshold: float | None = None) -> np.ndarray:
        t = self.threshold if threshold is None else threshold
        return self.score(embeddings) >= t

    # ---- JSON ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "features": self.features,
            "model": self.model,
            "pretrained": self.pretrained,
            "dim": self.dim,
            "weights": [float(w) for w in self.weights],  # float32 → exact in JSON
            "bias": self.bias,
            "threshold": self.threshold,
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RSProbe:
        if obj.get("format") != FORMAT:
            raise ValueError(f"not an RS probe file (format={obj.get('format')!r})")
        if int(obj.get("version", 0)) > VERSION:
            raise ValueError(f"RS probe version {obj['version']} is newer than this code ({VERSION})")
        probe = cls(
            weights=np.asarray(obj["weights"], dtype=np.float32),
            bias=obj["bias"],
            threshold=obj.get("threshold", 0.5),
            model=obj.get("model"),
            pretrained=obj.get("pretrained"),
            metrics=obj.get("metrics") or {},
            features=obj.get("features", EMBEDDING),
        )
        if "dim" in obj and int(obj["dim"]) != probe.dim:
            raise ValueError("RS probe file is corrupt: dim does not match the weights")
        return probe

    def save(self, path: str) -> str:
        data = json.dumps(self.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        with FileSystems.create(path) as f:
            f.write(data)
        return path

    @classmethod
    def load(cls, path: str) -> RSProbe:
        with FileSystems.open(path) as f:
            return cls.from_json(json.loads(f.read().decode()))


def probe_inputs(
    features: str, embeddings: np.ndarray, token_stats: np.ndarray | None = None
) -> np.ndarray:
    """Rows of probe inputs for ``features`` (see the module doc)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if features == EMBEDDING:
        return emb
    if features == EMBEDDING_TOKEN_STATS:
        if token_stats is None:
            raise ValueError("this probe needs token stats (encode_images(token_stats=True))")
        return np.concatenate([emb, np.asarray(token_stats, dtype=np.float32)], axis=-1)
    raise ValueError(f"unsupported probe features {features!r}; one of {FEATURES}")


# ---- data --------------------------------------------------------------------------------
def list_images(folder: str) -> list[str]:
    """Image files directly inside ``folder`` (local, gs://, s3://), sorted by path."""
    pattern = FileSystems.join(folder, "*")
    found = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    return sorted(p for p in found if posixpath.splitext(p.lower())[1] in IMAGE_EXTENSIONS)


def read_image(path: str) -> Image.Image:
    with FileSystems.open(path) as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def embed_folder(
    net, preprocess, folder: str, features: str = EMBEDDING, batch_size: int = 64
) -> np.ndarray:
    """Probe inputs (``features``) of every image in ``folder``, in path order."""
    from pipelines.models.open_clip_loader import encode_images

    paths = list_images(folder)
    if not paths:
        raise ValueError(f"no images in {folder}")
    images = (read_image(p) for p in paths)
    if features == EMBEDDING:
        return encode_images(net, preprocess, images, batch_size=batch_size)
    emb, stats = encode_images(net, preprocess, images, batch_size=batch_size, token_stats=True)
    return probe_inputs(features, emb, stats)


def _stratified_split(
    y: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = round(len(idx) * val_fraction) if val_fraction > 0 else 0
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def binary_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> dict[str, Any]:
    """precision / recall / accuracy / f1 of ``score >= threshold`` (positive = RS) + counts."""
    y_true = np.asarray(y_true).astype(bool)
    pred = np.asarray(y_score) >= threshold
    tp = int(np.sum(pred & y_true))
    fp = int(np.sum(pred & ~y_true))
    fn = int(np.sum(~pred & y_true))
    tn = int(np.sum(~pred & ~y_true))
    n = tp + fp + fn + tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out: dict[str, Any] = {
        "n": n, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": round(precision, 6),
        "recall": round(recall, 6),
        "accuracy": round((tp + tn) / n, 6) if n else 0.0,
        "f1": round(f1, 6),
    }
    if 0 < y_true.sum() < n:
        from sklearn.metrics import roc_auc_score

        out["roc_auc"] = round(float(roc_auc_score(y_true, y_score)), 6)
    return out


def fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    seed: int = 0,
    val_fraction: float = 0.2,
    threshold: float = 0.5,
    features: str = EMBEDDING,
) -> tuple[RSProbe, dict[str, Any]]:
    """Fit the probe on probe inputs ``x`` [N, D] with labels ``y`` (1 = RS); see module doc."""
    from threadpoolctl import threadpool_limits

    # one BLAS thread: the fits are tiny, threads only contend (5x slower on 2 shared cores),
    # and single-threaded sums are the same on every machine
    with threadpool_limits(limits=1):
        return _fit_probe(x, y, seed, val_fraction, threshold, features)


def _fit_probe(
    x: np.ndarray, y: np.ndarray, seed: int, val_fraction: float, threshold: float, features: str
) -> tuple[RSProbe, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y, minlength=2)
    if counts.min() < 2:
        raise ValueError(f"need at least 2 images per class, got rs={counts[1]} non_rs={counts[0]}")
    tr, va = _stratified_split(y, val_fraction, seed)
    xt, yt = x[tr], y[tr]
    mu = xt.mean(axis=0)
    sd = np.maximum(xt.std(axis=0), 1e-6)
    zt = (xt - mu) / sd

    def make(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=1000, class_weight="balanced")

    k = int(min(5, np.bincount(yt, minlength=2).min()))
    cv_acc: dict[str, float] = {}
    if k >= 2:
        folds = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(zt, yt))
        for c in C_GRID:
            accs = []
            for a, b in folds:
                m = make(c).fit(zt[a], yt[a])
                # balanced accuracy: classes may be unequal
                pred = m.predict(zt[b])
                accs.append(np.mean([np.mean(pred[yt[b] == cl] == cl) for cl in (0, 1)]))
            cv_acc[str(c)] = float(np.mean(accs))
        # best CV score; ties → the stronger regularisation (smaller C)
        best_c = max(C_GRID, key=lambda c: (round(cv_acc[str(c)], 9), -c))
    else:
        best_c = 1.0
    clf = make(best_c).fit(zt, yt)
    wz = clf.coef_.reshape(-1)
    weights = (wz / sd).astype(np.float32)
    bias = float(clf.intercept_[0] - np.sum(wz * mu / sd))
    probe = RSProbe(weights=weights, bias=bias, threshold=threshold, features=features)

    info: dict[str, Any] = {
        "C": best_c,
        "cv_balanced_accuracy": {k_: round(v, 6) for k_, v in cv_acc.items()},
        "n_train": len(tr),
        "n_val": len(va),
        "n_rs": int(counts[1]),
        "n_non_rs": int(counts[0]),
        "seed": seed,
        "val_fraction": val_fraction,
        "train": binary_metrics(yt, probe.score(xt), threshold),
    }
    if len(va):
        info["val"] = binary_metrics(y[va], probe.score(x[va]), threshold)
    probe.metrics = info
    return probe, info


def train_rs_probe(
    rs_dir: str,
    non_rs_dir: str,
    model: str,
    pretrained: str | None,
    out_path: str | None,
    seed: int = 0,
    val_fraction: float = 0.2,
    device: str | None = None,
    threshold: float = 0.5,
    features: str = EMBEDDING,
) -> RSProbe:
    """Embed ``rs_dir`` + ``non_rs_dir`` with the CLIP image tower, fit, save to ``out_path``."""
    from pipelines.models.open_clip_loader import load_open_clip

    if features not in FEATURES:
        raise ValueError(f"unsupported probe features {features!r}; one of {FEATURES}")
    net, preprocess, _ = load_open_clip(model, pretrained, device=device)
    x_rs = embed_folder(net, preprocess, rs_dir, features)
    x_non = embed_folder(net, preprocess, non_rs_dir, features)
    x = np.concatenate([x_rs, x_non])
    y = np.concatenate([np.ones(len(x_rs), np.int64), np.zeros(len(x_non), np.int64)])
    probe, info = fit_probe(x, y, seed=seed, val_fraction=val_fraction, threshold=threshold,
                            features=features)
    probe.model, probe.pretrained = model, pretrained
    v = info.get("val", info["train"])
    log.info(
        "RS probe (%s, %s, C=%s): %s precision %.3f recall %.3f accuracy %.3f on %d images",
        model, features, info["C"], "val" if "val" in info else "train", v["precision"],
        v["recall"],
        v["accuracy"], v["n"],
    )
    if out_path:
        probe.save(out_path)
    return probe


def evaluate_rs_probe(
    probe: RSProbe,
    rs_dir: str,
    non_rs_dir: str,
    model: str | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Precision / recall / accuracy of ``probe`` on two labelled folders."""
    from pipelines.models.open_clip_loader import load_open_clip

    if model is None:  # the probe's own model
        model, pretrained = probe.model, pretrained or probe.pretrained
    if not model:
        raise ValueError("the probe names no model: pass model=")
    net, preprocess, _ = load_open_clip(model, pretrained, device=device)
    x_rs = embed_folder(net, preprocess, rs_dir, probe.features)
    x_non = embed_folder(net, preprocess, non_rs_dir, probe.features)
    y = np.r_[np.ones(len(x_rs)), np.zeros(len(x_non))]
    scores = probe.score(np.concatenate([x_rs, x_non]))
    return binary_metrics(y, scores, probe.threshold if threshold is None else threshold)


# ---- CLI -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.models.rs_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fit a probe on labelled rs/ and non_rs/ folders")
    t.add_argument("--rs", required=True, help="folder of remote-sensing images")
    t.add_argument("--non_rs", required=True, help="folder of other images")
    t.add_argument("--model", required=True, help="open_clip architecture or local model dir")
    t.add_argument("--pretrained", help="local checkpoint file for --model")
    t.add_argument("--out", required=True, help="probe JSON to write")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val_fraction", type=float, default=0.2)
    t.add_argument("--threshold", type=float, default=0.5)
    t.add_argument("--features", choices=FEATURES, default=EMBEDDING,
                   help="probe inputs (see above; default: the normalised embedding)")
    t.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    e = sub.add_parser("eval", help="precision/recall of a probe on labelled folders")
    e.add_argument("--probe", required=True)
    e.add_argument("--rs", required=True)
    e.add_argument("--non_rs", required=True)
    e.add_argument("--model", help="default: the probe's")
    e.add_argument("--pretrained", help="default: the probe's")
    e.add_argument("--threshold", type=float, help="default: the probe's")
    e.add_argument("--device")
    args = ap.parse_args(argv)
    # open_clip logs its every step at INFO on the root logger: show ours only
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    if args.cmd == "train":
        probe = train_rs_probe(args.rs, args.non_rs, args.model, args.pretrained, args.out,
                               seed=args.seed, val_fraction=args.val_fraction,
                               device=args.device, threshold=args.threshold,
                               features=args.features)
        print(json.dumps({k: v for k, v in probe.metrics.items() if k in ("C", "val", "train")},
                         indent=2))
    else:
        probe = RSProbe.load(args.probe)
        m = evaluate_rs_probe(probe, args.rs, args.non_rs, args.model, args.pretrained,
                              args.device, args.threshold)
        print(json.dumps(m, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
